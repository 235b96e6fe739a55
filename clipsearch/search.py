"""The query service: text, an image (path or bytes) or an indexed image as the query, combined with
weights ("beach" and not "people"; a text's weight is a prefix: "^2:beach"), answered from a collection's
FAISS index and joined with SQLite metadata.

A `Searcher` keeps its model and index loaded across queries (the REST API holds one per collection);
it is safe to call from several threads. Example::

    searcher = Searcher.open("default")
    hits = searcher.search(SearchQuery.build(text="beach", not_texts=["people"], k=20))

Filters (`filter=SearchFilter.parse(folders=..., after=..., before=..., orientation=..., min_size=...)`, see
clipsearch.filters) act inside the nearest-neighbour search: the ids that pass are read from SQLite and only
they are ranked, so a filtered query returns k hits whenever k images pass. They compose with every query kind
and with re-ranking (which re-scores the filtered candidates).

Re-ranking (`rerank=True`, models with an ITM head such as BLIP bundles): the top `rerank_k` ITC candidates
are scored by the cross-encoder from the image tokens stored at index time (no image file is read), see
`Searcher.search`.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from .store.collection import DEFAULT_COLLECTION, Collection, data_folder
from .errors import CollectionError, QueryError
from .filters import EmptyReason, SearchFilter, empty_reason, image_date
from .text import is_utf8

MAX_QUERY_CHARS = 10_000
MAX_K = 10_000
STALE_REFRESH_SECONDS = 10.0
ALLOWED_CACHE_SIZE = 8  # allow-lists of recent filters, per store generation (the page re-queries as you type)
# "^W:text": a caret, a decimal weight, a colon. Nothing else at the start of a text is read as a weight,
# so "2:beach" or "12:30 sunset" are plain text; a text that really starts with a caret escapes it: "\\^_^".
_WEIGHT_RE = re.compile(r"^\^([+-]?(?:\d+(?:\.\d*)?|\.\d+)):(.*)$", re.S)
WEIGHT_SYNTAX_HELP = ('A weight goes first as ^W: ("^2:beach", "^0.5:sunset"; W > 0, --not subtracts). '
                      'Other text is taken as it is ("12:30 sunset"); a text starting with ^ is written \\^ ("\\^_^").')

# Re-ranking with an ITM head. The final score of a re-ranked hit is
#     ITM match logit + λ * ITC cosine
# where the match logit is logits[match] - logits[no match] = log(p / (1 - p)) of the head's match probability
# p, and the ITC cosine is the hit's ordinary score. λ is the bundle's own (model.json's itm object,
# "itc_weight"; chosen on held-out queries of the styles the head was trained on), DEFAULT_ITC_WEIGHT when it
# does not say. With weight 1 the ITC term (in [-1, 1], in practice a spread of a few tenths) breaks
# near-ties; 1 is what BLIP's own retrieval evaluation uses (it ranks the top-k ITC candidates by
# itm logits[:, 1] + raw ITC cosine); we take the margin instead of logits[:, 1] alone because it does not
# move when a head shifts both logits.
DEFAULT_ITC_WEIGHT = 1.0
DEFAULT_RERANK_K = 32
MAX_RERANK_K = 256
RERANK_BATCH = DEFAULT_RERANK_K  # candidates per ITM call
EXPORT_BLIP_HINT = ("Re-ranking needs a model with an ITM head: export a BLIP retrieval model with "
                    "`clipsearch models export-blip Salesforce/blip-itm-base-coco --out DIR` and index with "
                    "--model DIR, or search without --rerank.")


def itc_weight(model) -> float:
    """λ of a model with an ITM head: model.json's itm object "itc_weight" (`ItmSpec.itc_weight`)."""
    scorer = model.itm if getattr(model, "has_itm", False) else None
    return scorer.spec.itc_weight if scorer is not None else DEFAULT_ITC_WEIGHT


@dataclass(frozen=True)
class QueryTerm:
    """One part of a query. `kind` is "text" (value: str), "image" (value: path str or bytes) or
    "like" (value: an indexed image id). A negative `weight` subtracts the term ("not")."""

    kind: str
    value: str | bytes | int
    weight: float = 1.0

    def describe(self) -> str:
        shown = f"<{len(self.value)} bytes>" if isinstance(self.value, bytes) else str(self.value)
        return f"{self.weight:+g}×{self.kind}:{shown}"


@dataclass(frozen=True)
class SearchQuery:
    """A query. With `rerank`, the top `rerank_k` hits are re-scored by the model's ITM head (text queries
    only: the positive texts, joined by spaces, are what the head reads; negative terms act through the
    ITC stage). `min_match` (a probability in [0, 1]) needs `rerank` (a QueryError otherwise: the match
    probability only exists for re-ranked hits) and keeps only re-ranked hits whose match probability is at
    least that."""

    terms: tuple[QueryTerm, ...]
    k: int = 10
    include_query_images: bool = False  # return the query image itself (by id, path or identical bytes)
    rerank: bool = False
    rerank_k: int = DEFAULT_RERANK_K
    min_match: float | None = None
    filter: SearchFilter | None = None  # only images that pass it are ranked
    nprobe: int | None = None  # inverted lists an IVF index probes (None: the value tuned when it was built)

    @classmethod
    def build(cls, text: str | None = None, image: str | os.PathLike[str] | bytes | None = None,
              like: int | None = None, and_texts: Sequence[str] = (), not_texts: Sequence[str] = (),
              and_images: Sequence[str | os.PathLike[str] | bytes] = (),
              not_images: Sequence[str | os.PathLike[str] | bytes] = (), k: int = 10,
              include_query_images: bool = False, rerank: bool = False, rerank_k: int | None = None,
              min_match: float | None = None, filter: SearchFilter | None = None,
              nprobe: int | None = None) -> "SearchQuery":
        """Assemble a query; texts may carry a weight prefix, e.g. "^2:beach" or "^0.5:sunset" (see `parse_weight`)."""
        terms: list[QueryTerm] = []
        if text is not None:
            terms.append(text_term(text))
        if image is not None:
            terms.append(image_term(image))
        if like is not None:
            terms.append(QueryTerm("like", int(like)))
        terms.extend(text_term(t) for t in and_texts)
        terms.extend(image_term(i) for i in and_images)
        terms.extend(text_term(t, negate=True) for t in not_texts)
        terms.extend(image_term(i, negate=True) for i in not_images)
        return cls(terms=tuple(terms), k=k, include_query_images=include_query_images, rerank=bool(rerank),
                   rerank_k=DEFAULT_RERANK_K if rerank_k is None else rerank_k, min_match=min_match,
                   filter=filter if filter is not None and filter.active else None, nprobe=nprobe)

    @property
    def itm_text(self) -> str:
        """What the ITM head reads when re-ranking: the positive texts in order, joined by spaces."""
        return " ".join(str(t.value) for t in self.terms if t.kind == "text" and t.weight > 0)

    def validate(self) -> None:
        if not self.terms:
            raise QueryError("empty query: give a text, --image PATH or --like ID")
        if not any(t.weight > 0 for t in self.terms):
            raise QueryError("a query needs at least one positive term (--not only subtracts)")
        if not 1 <= self.k <= MAX_K:
            raise QueryError(f"k must be between 1 and {MAX_K}, not {self.k}")
        if self.nprobe is not None and (isinstance(self.nprobe, bool) or not isinstance(self.nprobe, int)
                                        or not 1 <= self.nprobe <= 65_536):
            raise QueryError(f"nprobe must be between 1 and 65536, not {self.nprobe}")
        for term in self.terms:
            if term.kind == "text":
                text = str(term.value)
                if not text.strip():
                    raise QueryError("empty text query")
                if len(text) > MAX_QUERY_CHARS:
                    raise QueryError(f"text query of {len(text):,} characters is longer than {MAX_QUERY_CHARS:,}")
                if not is_utf8(text):
                    raise QueryError(f"text query {text[:40].encode('utf-8', 'backslashreplace').decode()!r} is not "
                                     "valid UTF-8")
            elif term.kind not in ("image", "like"):
                raise QueryError(f"unknown query term kind {term.kind!r}")
        self._validate_rerank()

    def _validate_rerank(self) -> None:
        if isinstance(self.rerank_k, bool) or not isinstance(self.rerank_k, int) or not 1 <= self.rerank_k <= MAX_RERANK_K:
            raise QueryError(f"rerank_k must be between 1 and {MAX_RERANK_K}, not {self.rerank_k}")
        if self.min_match is not None:
            if not (isinstance(self.min_match, (int, float)) and 0.0 <= float(self.min_match) <= 1.0):
                raise QueryError(f"min_match must be a probability between 0 and 1, not {self.min_match}")
            if not self.rerank:
                raise QueryError("min_match needs re-ranking: the match probability comes from the ITM head",
                                 "Add --rerank (REST: rerank=true), or leave out --min-match.")
        if self.rerank and any(t.kind in ("image", "like") and t.weight > 0 for t in self.terms):
            raise QueryError("re-ranking needs a text query: the ITM head compares a text with each image, and "
                             "this query searches by an image",
                             "Search by text with --rerank, or leave out --rerank for image queries.")


def parse_weight(text: str) -> tuple[float, str]:
    """Split an optional weight prefix off a query text.

    '^2:beach' -> (2.0, 'beach'); '^.5:sunset' -> (0.5, 'sunset'); 'beach', '2:beach', '12:30 sunset' ->
    weight 1 and the text unchanged; '\\^_^' -> (1.0, '^_^') (a backslash before a leading caret escapes it).
    A text starting with '^' that is not '^W:' with W > 0 is a QueryError (negative weights are written
    with --not, which subtracts the term)."""
    if text.startswith("\\^"):
        return 1.0, text[1:]
    if not text.startswith("^"):
        return 1.0, text
    match = _WEIGHT_RE.match(text)
    if match is None:
        raise QueryError(f"malformed weight in {text[:40]!r}: write ^W:text with a number W, e.g. ^2:beach",
                         "A text that starts with a caret is written with a backslash before it: \\^")
    weight = float(match.group(1))
    if not (weight > 0 and math.isfinite(weight)):
        raise QueryError(f"weight {match.group(1)} in {text[:40]!r} must be a positive number",
                         "To subtract a text, give it with --not (it takes a weight too: --not '^2:people').")
    return weight, match.group(2).strip()


def text_term(text: str, negate: bool = False) -> QueryTerm:
    weight, body = parse_weight(text)
    return QueryTerm("text", body, -abs(weight) if negate else weight)


def image_term(image: str | os.PathLike[str] | bytes, negate: bool = False, weight: float = 1.0) -> QueryTerm:
    value = image if isinstance(image, bytes) else os.fspath(image)
    return QueryTerm("image", value, -abs(weight) if negate else weight)


@dataclass(frozen=True)
class SearchHit:
    id: int
    path: str
    score: float
    width: int | None
    height: int | None
    taken_at: str | None = None
    # Re-ranked hits only (None otherwise): `score` is then the final score (ITM match logit +
    # λ * itc_score, λ = `itc_weight(model)`), `itc_score` the cosine of the ITC stage, `match` the ITM match probability.
    itc_score: float | None = None
    match: float | None = None
    # With a date filter (after/before) only: the date it compared, as local ISO text, and which one it is:
    # "taken_at" (the EXIF capture time) or "mtime" (the file's modification time, for files without one).
    date: str | None = None
    date_source: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QueryVector:
    """A combined, L2-normalised query and the ids it must not return."""

    vector: np.ndarray
    exclude_ids: set[int] = field(default_factory=set)


class Searcher:
    """Answers `SearchQuery`s over one collection; model and index load lazily and stay loaded."""

    def __init__(self, collection: Collection, model=None, model_spec: str | None = None) -> None:
        """`model`: a loaded `ClipModel` to use; `model_spec`: what the user gave as --model. Either is checked
        against the collection's model right away (a spec by reading its bundle's model.json, without
        loading the model), so a wrong or unknown --model fails even when every query text is cached."""
        self.collection = collection
        self.collection_model = collection.require_model()
        self._model = model
        self._model_given = model is not None
        self._model_spec = model_spec
        self._model_info = None  # the resolved bundle of model_spec
        self._index = None
        self._index_generation: int | None = None
        self._index_loaded_at = 0.0
        self._tokens = None  # the collection's memory-mapped TokenFile, loaded by the first re-ranking
        self._text_key: str | None = None  # the query cache's key (see _text_cache_key)
        self._allowed: dict[tuple[SearchFilter, tuple[int, int]], np.ndarray] = {}  # (filter, db version) -> ids
        self._lock = threading.RLock()
        self.model_threads: int | None = None  # onnxruntime threads of a model this searcher loads (None: all cores)
        if model is not None:
            self._check_model(model)
        elif model_spec is not None:
            from .model.resolve import resolve_model

            self._model_info = resolve_model(model_spec)
            self._check_model(self._model_info)

    @classmethod
    def open(cls, collection: str = DEFAULT_COLLECTION, index_dir: str | os.PathLike[str] | None = None,
             model: str | None = None) -> "Searcher":
        """Open a collection by name; `model` (a spec) overrides the model it remembers, if it is the same one."""
        return cls(Collection.open(collection, index_dir), model_spec=model)

    def close(self) -> None:
        self.collection.close()

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- loading --------------------------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:
            with self._lock:
                if self._model is None:
                    from .model.resolve import load_model
                    from .model.runtime import ClipModel

                    model = (ClipModel(self._model_info, threads=self.model_threads) if self._model_info is not None
                             else load_model(self.collection_model.spec, threads=self.model_threads))
                    self._check_model(model)
                    self._model = model
        return self._model

    def _check_model(self, model) -> None:
        """`model`: a ClipModel or a BundleInfo (both have model_id)."""
        if model.model_id != self.collection_model.model_id:
            raise CollectionError(
                f"collection {self.collection.name!r} was built with {self.collection_model.model_id}; "
                f"model {model.model_id} cannot search it",
                "Leave out --model to use the collection's own model, or re-index with --rebuild.")

    def _follow_rebuild(self) -> None:
        """After a rebuild switched the collection to a new generation: reopen it, drop the old index, and
        the model when it was the collection's own (a given --model must still match; it is checked again).
        The usual case (no switch: CURRENT still names the folder in use) takes no lock."""
        if data_folder(self.collection.root) == self.collection.folder:
            return
        with self._lock:
            if not self.collection.refresh():
                return
            self.collection_model = self.collection.require_model()
            self._index = None
            self._index_generation = None
            self._index_loaded_at = 0.0
            self._tokens = None
            self._text_key = None
            if self._model_given or self._model_info is not None:
                self._check_model(self._model if self._model is not None else self._model_info)
            elif self._model is not None and self._model.model_id != self.collection_model.model_id:
                self._model = None

    @property
    def index(self):
        """The FAISS index. After an indexing run changed the collection it is reloaded; while a run is still
        writing (SQLite ahead of the saved index) it is refreshed at most every STALE_REFRESH_SECONDS."""
        with self._lock:
            generation = self.collection.store.generation
            if self._index is not None and generation == self._index_generation:
                return self._index
            fresh = self.collection.vectors_fresh()
            recently = time.monotonic() - self._index_loaded_at < STALE_REFRESH_SECONDS
            if self._index is None or fresh or not recently:
                self._index = self.collection.load_vectors(mmap=True)
                self._index_generation = generation if fresh else None
                self._index_loaded_at = time.monotonic()
            return self._index

    @property
    def lock(self) -> threading.RLock:
        """Serialises use of the collection's single SQLite connection; hold it for direct store access."""
        return self._lock

    @contextmanager
    def reading(self) -> Iterator:
        """The `Store` that query reads go to: here the collection's one connection, under `lock`. A subclass
        that serves many threads gives each its own read-only connection instead (web.served)."""
        with self._lock:
            yield self.collection.store

    def records(self, ids: Iterable[int]) -> dict:
        """id -> `ImageRecord` of the given ids (unknown ids left out)."""
        self._follow_rebuild()
        with self.reading() as store:
            return store.get_many(ids)

    def stored_vectors(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        """id -> stored image vector of the given ids (unknown ids left out)."""
        self._follow_rebuild()
        dim = self.collection_model.embed_dim
        found: dict[int, np.ndarray] = {}
        with self.reading() as store:
            for image_id in ids:
                vector = store.vector(int(image_id), dim)
                if vector is not None:
                    found[int(image_id)] = vector
        return found

    def stats(self):
        self._follow_rebuild()
        with self._lock:
            return self.collection.stats()

    # -- queries --------------------------------------------------------------------------------
    def query_vector(self, query: SearchQuery, text_vectors: Mapping[str, np.ndarray] | None = None) -> QueryVector:
        """The combined query; `text_vectors` (text -> embedding, e.g. from a batched encoder call) answers
        the texts it holds, the others are embedded here."""
        query.validate()
        self._follow_rebuild()
        dim = self.collection_model.embed_dim
        total = np.zeros(dim, dtype=np.float32)
        exclude: set[int] = set()
        texts = [t for t in query.terms if t.kind == "text"]
        if texts:
            known = dict(text_vectors or {})
            missing = [str(t.value) for t in texts if str(t.value) not in known]
            encoded = {**known, **(self.text_vectors(missing) if missing else {})}
            for term in texts:
                total += term.weight * encoded[str(term.value)]
        for term in query.terms:
            if term.kind == "like":
                image_id = int(term.value)
                with self.reading() as store:
                    vector = store.vector(image_id, dim)
                if vector is None:
                    raise QueryError(f"no indexed image with id {image_id} in collection {self.collection.name!r}")
                total += term.weight * vector
                exclude.add(image_id)
            elif term.kind == "image":
                vector, same = self._image_vector(term.value)
                total += term.weight * vector
                exclude.update(same)
        norm = float(np.linalg.norm(total))
        if not np.isfinite(norm) or norm < 1e-6:
            raise QueryError("the query terms cancel each other out")
        return QueryVector(total / norm, set() if query.include_query_images else exclude)

    def text_vectors(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Embed texts, answering repeated ones from the collection's query cache (no model load at all)."""
        model_id, dim = self._text_cache_key(), self.collection_model.embed_dim
        with self.reading() as store:
            found = store.cached_text_vectors(model_id, texts, dim)
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            fresh = dict(zip(missing, self.model.encode_text(missing)))
            self._remember_texts(model_id, fresh)
            found.update(fresh)
        return found

    def _remember_texts(self, model_id: str, vectors: dict[str, np.ndarray]) -> None:
        """Add freshly embedded texts to the query cache (a serving subclass queues them for a writer thread)."""
        with self._lock:
            self.collection.store.cache_text_vectors(model_id, vectors, time.time())

    def _text_cache_key(self) -> str:
        """The query cache's key: the collection's model id (which follows the image tower) plus the sha256 of
        the text graph that answers, read from model.json without loading it. A bundle whose text tower changed
        (e.g. a new int8 recipe) then never answers from vectors of the old one."""
        if self._text_key is None:
            info = self._model.info if self._model is not None else self._model_info
            if info is None:
                from .errors import ClipsearchError
                from .model.resolve import resolve_model

                try:
                    info = resolve_model(self.collection_model.spec, export_missing=False)
                except ClipsearchError:  # the model is gone: encoding will say so; cached entries can't be told apart
                    return self.collection_model.model_id
            text_sha = info.files.get("textual.onnx", "")[:12]
            self._text_key = f"{self.collection_model.model_id}+text@{text_sha}" if text_sha else info.model_id
        return self._text_key

    def _image_vector(self, value: str | bytes | int) -> tuple[np.ndarray, set[int]]:
        """Embed an image file or bytes; also return the ids of indexed copies of those very bytes."""
        from .errors import ImageError
        from .model.preprocess import MAX_IMAGE_FILE_BYTES, open_image, read_image_file

        if isinstance(value, bytes):
            data = value
        else:
            try:  # never opens a FIFO, socket or device (which would hang or read forever)
                data = read_image_file(value, max_bytes=MAX_IMAGE_FILE_BYTES)
            except ImageError as exc:
                raise QueryError(exc.message, exc.hint) from exc
        image = open_image(data, draft_size=self.model.preprocess.size[::-1])
        vector = self.model.encode_images([image])[0]
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        with self.reading() as store:
            same = {row[0] for row in store.conn.execute(
                "SELECT id FROM images WHERE content_hash = ?", [digest])}
            if not isinstance(value, bytes) and is_utf8(str(value)):  # stored paths are UTF-8 text
                record = store.find_by_path(os.path.abspath(str(value)))
                if record is not None:
                    same.add(record.id)
        return vector, same

    def search(self, query: SearchQuery, text_vectors: Mapping[str, np.ndarray] | None = None) -> list[SearchHit]:
        """Best-first hits joined with their metadata (`text_vectors`: embeddings of query texts computed
        already, see `query_vector`).

        With `query.rerank`: the top `rerank_k` ITC hits are scored against the query text by the ITM head from
        the image tokens stored at index time (`stored_tokens`; no file is decoded), RERANK_BATCH per call.
        Those hits are sorted by ITM match logit + λ * ITC cosine (`score`; `itc_score` and `match` added, λ =
        `itc_weight(model)`), then come the candidates without stored tokens (ITC order, unscored), then, when
        k > rerank_k, the remaining hits in ITC order; the first k are returned. With `min_match` only
        re-ranked hits whose match probability reaches it are returned (unscored hits have no probability and
        are left out). QueryError when the model has no ITM head, or the collection stores no tokens."""
        query.validate()
        if query.rerank:
            self._require_itm()
            self._require_tokens()
        qv = self.query_vector(query, text_vectors)
        if not query.rerank:
            return self.search_vector(qv.vector, query.k, qv.exclude_ids, query.filter, nprobe=query.nprobe)
        hits = self.search_vector(qv.vector, max(query.k, query.rerank_k), qv.exclude_ids, query.filter,
                                  nprobe=query.nprobe)
        return self._rerank(query, hits)[:query.k]

    def _require_itm(self):
        model = self.model
        scorer = model.itm if getattr(model, "has_itm", False) else None
        if scorer is None:
            raise QueryError(f"model {model.info.name} cannot re-rank (no ITM head)", EXPORT_BLIP_HINT)
        return scorer

    def _require_tokens(self) -> None:
        """QueryError when the collection holds no image tokens at all (indexed before they were stored, or
        with --no-tokens, or with a head too big to store them by default)."""
        self._follow_rebuild()
        with self._lock:
            collection = self.collection
            if collection.store.has_any_tokens():
                return
            name = collection.name
            roots = list(collection.store.indexed_roots())
        where = " ".join(_shell_quote(r) for r in roots[:3]) if roots else "PATH"
        raise QueryError(
            f"collection {name!r} has no stored image tokens, which re-ranking reads (it was indexed before they "
            "were stored, or without them)",
            f"Add them with: clipsearch index {where} --collection {name} --tokens (computes the tokens of the "
            "images already indexed; their vectors are kept), or re-run the indexing with --tokens; "
            "or search without --rerank.")

    def stored_tokens(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        """id -> float32 [T, D] ITM image tokens of those `ids` that have them: from the memory-mapped token
        file when it reflects SQLite, else (an indexing run in progress or killed) the rows it holds that did
        not change since it was written from there, and the others straight from SQLite."""
        self._follow_rebuild()
        wanted = [int(i) for i in ids]
        if not wanted:
            return {}
        with self._lock:
            collection = self.collection
            store = collection.store
            codec = collection.token_codec
            if codec is None:
                return {}
            generation = store.tokens_generation
            mapped = self._token_file(generation)
            if mapped is not None and (mapped.codec != codec or mapped.header.model_id != self.collection_model.model_id):
                mapped = None
            if mapped is not None and mapped.tokens_gen == generation:
                from_file = mapped.rows(wanted)
                from_sql: list[int] = []
            else:
                written = store.token_generations(wanted)
                rows = mapped.rows([i for i, g in written.items() if g <= mapped.tokens_gen]) if mapped else {}
                from_file = rows
                from_sql = [i for i in written if i not in rows]
            blobs = store.token_blobs(from_sql) if from_sql else {}
        found: dict[int, np.ndarray] = {}
        if from_file:
            order = list(from_file)
            for image_id, tokens in zip(order, mapped.tokens([from_file[i] for i in order])):
                found[image_id] = tokens
        for image_id, blob in blobs.items():
            if codec.valid(blob):  # a damaged row is left unscored (check reports it)
                found[image_id] = codec.decode([blob])[0]
        return found

    def _token_file(self, generation: int):
        """The loaded TokenFile, reloaded when a newer one was written since (call with the lock held)."""
        from .store.tokens import TOKENS_FILE

        current = self._tokens
        if current is not None and current.tokens_gen == generation:
            return current
        path = self.collection.folder / TOKENS_FILE
        try:
            stat = path.stat()
            identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except OSError:
            identity = None
        if current is None or identity != current.identity:
            self._tokens = self.collection.load_tokens() if identity is not None else None
        return self._tokens

    def _rerank(self, query: SearchQuery, hits: list[SearchHit]) -> list[SearchHit]:
        from dataclasses import replace

        scorer = self._require_itm()
        weight = itc_weight(self.model)
        candidates, rest = hits[:query.rerank_k], hits[query.rerank_k:]
        stored = self.stored_tokens([hit.id for hit in candidates])
        ready = [hit for hit in candidates if hit.id in stored]
        unscored = [hit for hit in candidates if hit.id not in stored]
        scored: list[SearchHit] = []
        # RERANK_BATCH candidates per ITM call (one call for the default k): a large rerank_k must not feed the
        # head every candidate's tokens at once.
        for start in range(0, len(ready), RERANK_BATCH):
            chunk = ready[start:start + RERANK_BATCH]
            itm = scorer.score(query.itm_text, np.stack([stored[hit.id] for hit in chunk]))
            for hit, margin, probability in zip(chunk, itm.match_logit, itm.probability):
                final = float(margin) + weight * hit.score
                scored.append(replace(hit, score=round(final, 6), itc_score=hit.score,
                                      match=round(float(probability), 6)))
        if scored:
            order = sorted(range(len(scored)), key=lambda i: (-scored[i].score, i))  # ties keep ITC order
            scored = [scored[i] for i in order]
        if query.min_match is not None:
            return [hit for hit in scored if hit.match is not None and hit.match >= query.min_match]
        return scored + unscored + rest

    def search_vector(self, vector: np.ndarray, k: int, exclude_ids: Iterable[int] = (),
                      filter: SearchFilter | None = None, nprobe: int | None = None) -> list[SearchHit]:
        """The k nearest images to `vector`; with an active `filter`, the k nearest of those that pass it.
        `nprobe` overrides the IVF index's tuned value for this search."""
        self._follow_rebuild()
        index = self.index
        allowed = self.allowed_ids(filter) if filter is not None and filter.active else None
        ranked = index.search(np.asarray(vector, dtype=np.float32)[None, :], k, exclude_ids, allowed=allowed,
                              nprobe=nprobe)[0]
        with self.reading() as store:
            records = store.get_many([i for i, _ in ranked])
        hits = []
        dated = filter is not None and filter.uses_date
        for image_id, score in ranked:
            record = records.get(image_id)
            if record is None:  # the index is ahead of SQLite: never show a row we cannot name
                continue
            date, source = image_date(record.taken_at, record.mtime_ns) if dated else (None, None)
            hits.append(SearchHit(id=image_id, path=record.path, score=round(score, 6), width=record.width,
                                  height=record.height, taken_at=record.taken_at, date=date, date_source=source))
        return hits

    def allowed_ids(self, filter: SearchFilter) -> np.ndarray:
        """Sorted ids of the images that pass `filter`, from SQLite (the last few filters' lists are kept until
        the database changes: its generation, or any commit by another connection, which PRAGMA data_version
        counts — e.g. an indexing run recording a touched file's new mtime without a new generation)."""
        self._follow_rebuild()
        with self._lock:
            store = self.collection.store
            version = (store.generation, int(store.conn.execute("PRAGMA data_version").fetchone()[0]))
            key = (filter, version)
            found = self._allowed.get(key)
            if found is None:
                found = store.ids_where(*filter.sql())
                self._allowed = {k: v for k, v in self._allowed.items() if k[1] == version}
                if len(self._allowed) >= ALLOWED_CACHE_SIZE:
                    self._allowed.pop(next(iter(self._allowed)))
                self._allowed[key] = found
            return found

    def why_empty(self, filter: SearchFilter | None) -> EmptyReason | None:
        """For a search that found nothing: why, when its filters match no image at all (None otherwise)."""
        if filter is None or not filter.active:
            return None
        self._follow_rebuild()
        with self._lock:
            return empty_reason(self.collection.store, filter)


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def search(query: SearchQuery, collection: str = DEFAULT_COLLECTION,
           index_dir: str | os.PathLike[str] | None = None, model: str | None = None) -> list[SearchHit]:
    """One-shot convenience: open, search, close."""
    with Searcher.open(collection, index_dir, model) as searcher:
        return searcher.search(query)
