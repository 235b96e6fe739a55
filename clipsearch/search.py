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
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from .store.collection import DEFAULT_COLLECTION, Collection, data_folder, token_source
from .errors import CollectionError, QueryError
from .filters import EmptyReason, SearchFilter, empty_reason, image_date
from .query import DEFAULT_RERANK_K, SearchHit, SearchQuery
from .text import is_utf8

STALE_REFRESH_SECONDS = 10.0
BATCHED_MAX_K = 100  # deeper searches are not batched with others (Searcher.batchable)
ALLOWED_CACHE_SIZE = 8  # allow-lists of recent filters, per store generation (the page re-queries as you type)

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
RERANK_BATCH = DEFAULT_RERANK_K  # candidates per ITM call
EXPORT_BLIP_HINT = ("Re-ranking needs a model with an ITM head: export a BLIP retrieval model with "
                    "`clipsearch models export-blip Salesforce/blip-itm-base-coco --out DIR` and index with "
                    "--model DIR, or search without --rerank.")


def itc_weight(model) -> float:
    """λ of a model with an ITM head: model.json's itm object "itc_weight" (`ItmSpec.itc_weight`)."""
    scorer = model.itm if getattr(model, "has_itm", False) else None
    return scorer.spec.itc_weight if scorer is not None else DEFAULT_ITC_WEIGHT


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
        # While an indexing run writes (SQLite ahead of the saved index): how long a loaded index may answer before
        # it is loaded or rebuilt again. 0: never answer from an index older than SQLite (the resident helper).
        self.stale_refresh_seconds = STALE_REFRESH_SECONDS
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
                    from .model.runtime import ClipModel

                    model = (ClipModel(self._model_info, threads=self.model_threads) if self._model_info is not None
                             else self.collection_model.load(self.collection.name, threads=self.model_threads))
                    self._check_model(model)
                    self._model = model
        return self._model

    @property
    def loaded_model(self):
        """The model if a query loaded it already, else None (nothing is loaded)."""
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

    def follow(self) -> Path:
        """Follow a rebuild's switch of generations, if one happened, and return the data folder searches now use:
        a caller that reads the index and then rows compares it afterwards (a changed folder means they may be of
        different generations, whose ids never meet: search again)."""
        self._follow_rebuild()
        return self.collection.folder

    @property
    def index(self):
        """The FAISS index. After an indexing run changed the collection it is reloaded; while a run is still
        writing (SQLite ahead of the saved index) it is refreshed at most every `stale_refresh_seconds`."""
        with self._lock:
            generation = self.collection.store.generation
            if self._index is not None and generation == self._index_generation:
                return self._index
            fresh = self.collection.vectors_fresh()
            recently = time.monotonic() - self._index_loaded_at < self.stale_refresh_seconds
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

    def imported(self, ids: Iterable[int]) -> dict[int, dict]:
        """id -> {"image_path", "url", "caption", "extra"} as `clipsearch import-embeddings` read them from
        clip-retrieval's metadata, for those of `ids` that were imported (store.interchange)."""
        from .store.interchange import imported_metadata

        self._follow_rebuild()
        with self.reading() as store:
            return imported_metadata(store, list(ids))

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
            unknown = [str(t.value) for t in texts if str(t.value) not in encoded]
            if unknown:  # left out by text_vectors: its vocabulary knows none of their words
                from .model.tokenizer import unknown_words_error  # (tokenizers: not imported by a cached search)

                raise unknown_words_error(self.model.info.name, unknown[0])
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
        """Embed texts, answering repeated ones from the collection's query cache (no model load at all); a text
        the model's vocabulary knows no word of is left out."""
        model_id, dim = self._text_cache_key(), self.collection_model.embed_dim
        with self.reading() as store:
            found = store.cached_text_vectors(model_id, texts, dim)
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            # A text of which the vocabulary knows no word (all [UNK]: emoji typed to a WordPiece model) embeds like
            # every other such text, so its ranking would mean nothing: it is left out (query_vector says why), not
            # cached. CLIP's byte-level BPE tokenises anything. Per text, so a batch of queries is unaffected.
            tokenizer = self.model.tokenizer
            missing = [t for t in missing if not tokenizer.knows_none_of(t)]
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
        """Embed an image file or bytes; also return the ids that are the query image itself: a file's own row when
        it is indexed (copies of it at other paths are other files, as `like=ID` leaves them in), and for bytes
        without a name (an upload) the rows holding those very bytes."""
        from .errors import ImageError
        from .model.preprocess import MAX_IMAGE_FILE_BYTES, open_image, read_image_file

        if isinstance(value, bytes):
            data = value
        else:
            try:  # never opens a FIFO, socket or device (which would hang or read forever)
                data = read_image_file(value, max_bytes=MAX_IMAGE_FILE_BYTES)
            except ImageError as exc:
                raise QueryError(exc.message, exc.hint) from exc
        image = open_image(data, draft_size=self.model.preprocess.size[::-1],
                           name=None if isinstance(value, bytes) else str(value))  # errors name the file given
        vector = self.model.encode_images([image])[0]
        same: set[int] = set()
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        with self.reading() as store:
            copies = store.conn.execute("SELECT id, path FROM images WHERE content_hash = ?", [digest]).fetchall()
            if isinstance(value, bytes):
                same = {image_id for image_id, _ in copies}
            elif is_utf8(str(value)):  # stored paths are UTF-8 text
                record = store.find_by_path(os.path.abspath(str(value)))
                if record is not None:
                    same.add(record.id)
                # The same file named another way (through a symbolic link, or a link the folder was indexed by).
                here = os.path.realpath(str(value))
                same.update(image_id for image_id, path in copies if os.path.realpath(path) == here)
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
            made_by = collection.store.get_meta("tokens_source")
            has_tokens = collection.store.has_any_tokens()
            current = token_source(self.model)
            if has_tokens and (made_by is None or current is None or made_by == current):
                return
            if not has_tokens and collection.store.count() == 0:
                return  # nothing indexed yet: nothing to re-rank, and no tokens missing
            name = collection.name
            roots = list(collection.store.indexed_roots())
        where = " ".join(_shell_quote(r) for r in roots[:3]) if roots else "PATH"
        if has_tokens:
            raise QueryError(
                f"collection {name!r} holds image tokens of another ITM head than model {self.model.info.name}'s "
                "(the bundle's re-ranker was updated since they were computed)",
                f"Compute them again with: clipsearch index {where} --collection {name} (their vectors are "
                "kept); or search without --rerank.")
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
            finals = itm.match_logit.astype(np.float64) + weight * np.array([hit.score for hit in chunk])
            probabilities = scorer.spec.match_probability(finals, itm.probability)
            for hit, final, probability in zip(chunk, finals, probabilities):
                scored.append(replace(hit, score=round(float(final), 6), itc_score=hit.score,
                                      match=round(float(probability), 6)))
        if scored:
            order = sorted(range(len(scored)), key=lambda i: (-scored[i].score, i))  # ties keep ITC order
            scored = [scored[i] for i in order]
        if query.min_match is not None:
            return [hit for hit in scored if hit.match is not None and hit.match >= query.min_match]
        return scored + unscored + rest

    @staticmethod
    def batchable(query: SearchQuery) -> bool:
        """Whether `search_many` answers `query` in a shared FAISS call: text terms only, no filter, no re-ranking,
        the index's own nprobe and at most BATCHED_MAX_K hits, so its cost is one row of a batched search (never a
        filter's SQLite scan, an ITM pass or a deep probe that would hold up the queries batched with it)."""
        return (not query.rerank and (query.filter is None or not query.filter.active) and query.nprobe is None
                and query.k <= BATCHED_MAX_K and all(term.kind == "text" for term in query.terms))

    def search_many(self, queries: Sequence[SearchQuery], text_vectors: Mapping[str, np.ndarray]
                    ) -> list[list[SearchHit] | Exception]:
        """`search` for several queries: the `batchable` ones of the same k in one FAISS call and one SQLite read
        (the same k, so an IVF index's refine stage sees what a lone search sees), the others one by one. Each
        entry is that query's hits, or the exception its search raised."""
        answers: list[list[SearchHit] | Exception | None] = [None] * len(queries)
        groups: dict[int, list[tuple[int, np.ndarray]]] = {}  # k -> (position, query vector)
        for position, query in enumerate(queries):
            try:
                if not self.batchable(query):
                    answers[position] = self.search(query, text_vectors)
                    continue
                vector = self.query_vector(query, text_vectors).vector
                groups.setdefault(query.k, []).append((position, vector))
            except Exception as exc:  # noqa: BLE001 - this query's error, not the others'
                answers[position] = exc
        if groups:
            folder = self.follow()
            index = self.index
            for k, rows in groups.items():
                try:
                    ranked = index.search(np.stack([vector for _, vector in rows]), k)  # batchable: tuned nprobe
                    with self.reading() as store:
                        records = store.get_many(list({i for found in ranked for i, _ in found}))
                    if self.collection.folder != folder:  # a rebuild switched generations meanwhile: as search_vector
                        for position, vector in rows:
                            answers[position] = self.search_vector(vector, k)
                        continue
                except Exception as exc:  # noqa: BLE001 - every query of the group hears it
                    for position, _ in rows:
                        answers[position] = exc
                    continue
                for (position, _), found in zip(rows, ranked):
                    answers[position] = _hits_from(found, records)
        return [answer if answer is not None else [] for answer in answers]

    def search_vector(self, vector: np.ndarray, k: int, exclude_ids: Iterable[int] = (),
                      filter: SearchFilter | None = None, nprobe: int | None = None) -> list[SearchHit]:
        """The k nearest images to `vector`; with an active `filter`, the k nearest of those that pass it.
        `nprobe` overrides the IVF index's tuned value for this search."""
        for _ in range(2):
            folder = self.follow()
            index = self.index
            allowed = self.allowed_ids(filter) if filter is not None and filter.active else None
            ranked = index.search(np.asarray(vector, dtype=np.float32)[None, :], k, exclude_ids, allowed=allowed,
                                  nprobe=nprobe)[0]
            with self.reading() as store:
                records = store.get_many([i for i, _ in ranked])
            if self.collection.folder == folder:
                break
            # A rebuild switched generations during this search (another thread followed it): the index and the
            # rows may be of different generations, whose ids never meet. Searched once more, in the new one.
        return _hits_from(ranked, records, dated=filter is not None and filter.uses_date)

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
        """For a search that found nothing: why, when the collection holds no image or its filters match none
        (None otherwise)."""
        self._follow_rebuild()
        with self._lock:
            store = self.collection.store
            if store.count() == 0:
                name = self.collection.name
                return EmptyReason(f"collection {name!r} has no images yet",
                                   f"Index a folder of photos into it: clipsearch index FOLDER --collection {name}")
            if filter is None or not filter.active:
                return None
            return empty_reason(store, filter)


def _hits_from(ranked: Sequence[tuple[int, float]], records: Mapping[int, object],
               dated: bool = False) -> list[SearchHit]:
    """(id, score) best first -> hits with their metadata; ids SQLite does not know (yet) are left out."""
    hits = []
    for image_id, score in ranked:
        record = records.get(image_id)
        if record is None:  # the index is ahead of SQLite: never show a row we cannot name
            continue
        date, source = image_date(record.taken_at, record.mtime_ns) if dated else (None, None)
        hits.append(SearchHit(id=image_id, path=record.path, score=round(score, 6), width=record.width,
                              height=record.height, taken_at=record.taken_at, date=date, date_source=source))
    return hits


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def search(query: SearchQuery, collection: str = DEFAULT_COLLECTION,
           index_dir: str | os.PathLike[str] | None = None, model: str | None = None) -> list[SearchHit]:
    """One-shot convenience: open, search, close."""
    with Searcher.open(collection, index_dir, model) as searcher:
        return searcher.search(query)
