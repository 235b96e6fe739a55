"""What a search asks and what it answers: `SearchQuery` (terms, k, re-ranking, filter) and `SearchHit`.

Plain dataclasses without numpy, FAISS or onnxruntime, so a command can build and check a query (and hand it
to a resident helper, see clipsearch.resident) before anything heavy is imported. `Searcher` (search.py)
answers them.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Sequence

from .errors import QueryError
from .filters import SearchFilter
from .text import is_utf8

MAX_QUERY_CHARS = 10_000
MAX_K = 10_000
DEFAULT_RERANK_K = 32
MAX_RERANK_K = 256
# Weights are relative, so a million to one already leaves the smaller term nothing; past it a weight only overflows
# the combined vector (which then read as "terms cancel each other out").
MAX_WEIGHT = 1_000_000
# "^W:text": a caret, a decimal weight, a colon. Nothing else at the start of a text is read as a weight,
# so "2:beach" or "12:30 sunset" are plain text; a text that really starts with a caret escapes it: "\\^_^".
_WEIGHT_RE = re.compile(r"^\^([+-]?(?:\d+(?:\.\d*)?|\.\d+)):(.*)$", re.S)
WEIGHT_SYNTAX_HELP = ('A weight goes first as ^W: ("^2:beach", "^0.5:sunset"; W > 0, --not subtracts). '
                      'Other text is taken as it is ("12:30 sunset"); a text starting with ^ is written \\^ ("\\^_^").')


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
    include_query_images: bool = False  # return the query image itself (by id, by path, an upload by its bytes)
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
                    raise QueryError("empty text query", 'Describe what to look for, e.g. "a dog on a beach".')
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
                                 "Turn re-ranking on (CLI --rerank, REST and /knn-service rerank=true), or leave "
                                 "out the minimum match (--min-match, min_match).")
        if self.rerank and any(t.kind in ("image", "like") and t.weight > 0 for t in self.terms):
            raise QueryError("re-ranking needs a text query: the ITM head compares a text with each image, and "
                             "this query searches by an image",
                             "Re-rank text queries only (CLI --rerank, REST rerank=true); search by an image "
                             "without it.")


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
    if weight > MAX_WEIGHT:
        raise QueryError(f"weight {match.group(1)[:30]} in {text[:40]!r} is larger than {MAX_WEIGHT:,}",
                         "Weights are relative: ^2:beach counts twice as much as a text without one.")
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
