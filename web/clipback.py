"""Endpoints that behave like clip-retrieval's clip-back, so its `ClipClient` and front end work unchanged.

clip-back reads bodies with `get_json(force=True)`: clients (ClipClient, the front end's fetch) send
JSON without a JSON content type, so the body is parsed whatever the header says. Every field the
clients send is accepted; nulls mean "default"; unknown fields are ignored; the safety and aesthetic
fields are accepted and ignored (a local photo collection has no LAION safety/aesthetic models).

One addition that ClipClient never sends: `rerank` (with `rerank_k`, `min_match`) re-scores the top text→image
hits with the model's ITM head, as `rerank=true` does on /api/search. `similarity` is then the final score and
re-scored results add `match` (the match probability, as on /api/search) and `itc_score`.

Also never sent by ClipClient: the filters of /api/search, `in` (a folder or a list of them), `after`, `before`,
`orientation` and `min_size`. They act inside the search, like there: num_result_ids neighbours among the
images that pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, field_validator

from clipsearch.filters import SearchFilter
from clipsearch.paths import is_url_path
from clipsearch.search import SearchQuery, Searcher
from clipsearch.store.database import ImageRecord

from .errors import ApiError, describe_validation_errors
from .openapi import error_responses
from .parsing import StrictRoute, parse_json_body
from .remote import fetch_image
from .schemas import (AFTER_DESCRIPTION, BEFORE_DESCRIPTION, IN_DESCRIPTION, MIN_MATCH_DESCRIPTION, MIN_SIZE_DESCRIPTION,
                      ORIENTATION_DESCRIPTION, RERANK_K_DESCRIPTION, ImageId)
from .state import WebState
from .uploads import check_image, decode_base64_image, release_freed_memory
from .urls import absolute, image_urls

router = APIRouter(tags=["clip-back compatibility"], route_class=StrictRoute)

DEFAULT_NUM_IMAGES = 40
DEDUPLICATE_THRESHOLD = 0.94  # clip-back's cosine threshold for near-duplicate results
MAX_METADATA_IDS = 10_000


class KnnRequest(BaseModel):
    """What `ClipClient` and clip-front post to /knn-service."""

    model_config = ConfigDict(extra="ignore")

    text: str | None = None
    image: str | None = Field(None, description="base64 image")
    image_url: str | None = Field(None, description="Refused unless the server allows remote images")
    embedding_input: list[StrictFloat | StrictInt] | None = None  # numbers only: true/false are not vector values
    modality: str | None = Field("image", description="'image' (this server has no caption index)")
    num_images: int | None = Field(None, description=f"Results to return (default {DEFAULT_NUM_IMAGES}; at most the "
                                   "server's max_k, more is served as max_k)")
    num_result_ids: int | None = Field(None, description="Neighbours to consider before filtering (default num_images; "
                                       "more than max_k is served as max_k)")
    indice_name: str | None = Field(None, description="A collection name (see /indices-list)")
    deduplicate: bool | None = None
    use_mclip: Any = None
    use_safety_model: Any = None
    use_violence_detector: Any = None
    aesthetic_score: Any = None
    aesthetic_weight: Any = None
    rerank: bool | None = Field(None, description="Not part of clip-back: re-score the top rerank_k hits of a text "
                                                  "query with the model's ITM head (models exported with `clipsearch "
                                                  "models export-blip`; 400 for other models and non-text queries). "
                                                  "similarity is then the final score; re-scored results add match "
                                                  "and itc_score")
    rerank_k: int | None = Field(None, ge=1, le=256, description=RERANK_K_DESCRIPTION)
    min_match: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description=MIN_MATCH_DESCRIPTION)
    in_folders: list[str] | str | None = Field(None, alias="in", description="Not part of clip-back: " + IN_DESCRIPTION)
    after: str | None = Field(None, description="Not part of clip-back: " + AFTER_DESCRIPTION)
    before: str | None = Field(None, description="Not part of clip-back: " + BEFORE_DESCRIPTION)
    orientation: str | None = Field(None, description="Not part of clip-back: " + ORIENTATION_DESCRIPTION)
    min_size: str | None = Field(None, description="Not part of clip-back: " + MIN_SIZE_DESCRIPTION)

    @field_validator("text", "image", "image_url", "modality", "indice_name", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ids: list[ImageId] = Field(default_factory=list)
    indice_name: str | None = None


async def json_body(request: Request) -> dict:
    """The body as a JSON object, whatever the content type (clip-back's `get_json(force=True)`), through the
    same strict parser as every other route (`parsing.parse_json_body`)."""
    raw = await request.body()
    body = parse_json_body(raw) if raw.strip() else None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def parse(model: type[BaseModel], body: dict) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ApiError(422, describe_validation_errors(list(exc.errors()))) from exc


def _schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@router.get("/indices-list", summary="Collections this server can search (clip-back)",
            responses=error_responses(400, 401))
async def indices_list(request: Request) -> list[str]:
    state: WebState = request.app.state.web
    return await state.run(state.collection_names)


@router.post("/knn-service", summary="Nearest images to a text, an image or an embedding (clip-back)",
             openapi_extra=_schema(KnnRequest), responses=error_responses(400, 401, 413, 415, 422, 503))
async def knn_service(request: Request) -> list[dict]:
    state: WebState = request.app.state.web
    knn = parse(KnnRequest, await json_body(request))
    if knn.modality not in (None, "image"):
        raise ApiError(400, f"modality {knn.modality!r} is not available: this server indexes images only",
                       "Use modality 'image'.")
    max_k = state.settings.max_k
    num_images = DEFAULT_NUM_IMAGES if knn.num_images is None else knn.num_images
    num_result_ids = num_images if knn.num_result_ids is None else knn.num_result_ids
    if num_images < 1 or num_result_ids < 1:
        raise ApiError(422, "num_images and num_result_ids must be at least 1")
    # Counts above this server's max_k are served as max_k, not refused: clip-front asks for 3,000 neighbours with
    # every query, and clip-back answers what it has.
    num_images, num_result_ids = min(num_images, max_k), min(num_result_ids, max_k)
    if knn.text is not None and len(knn.text) > state.settings.max_text_chars:
        raise ApiError(422, f"text of {len(knn.text):,} characters is longer than the limit of "
                            f"{state.settings.max_text_chars:,}")
    name = await state.run(state.resolve_name, knn.indice_name)
    searcher = await state.searcher_for(name)

    image: bytes | None = None
    if knn.text is None and knn.image is not None:
        image = await state.run(decode_base64_image, knn.image, state.settings.max_upload_bytes)
    elif knn.text is None and knn.image_url is not None:
        if not state.settings.allow_remote_images:
            raise ApiError(400, "image_url is disabled on this server (it makes no requests to other hosts)",
                           "Send the image itself as base64 in 'image', or start the server with --allow-remote-images.")
        image = await state.run(fetch_image, knn.image_url, state.settings.max_upload_bytes,
                                state.settings.remote_timeout_seconds)
    if image is not None:
        image = (await state.run(check_image, image, state.settings.max_image_pixels)).data

    check_rerank(knn)
    search_filter = SearchFilter.parse(folders=knn.in_folders, after=knn.after, before=knn.before,
                                       orientation=knn.orientation, min_size=knn.min_size)

    text_vectors = None
    if knn.text is not None and not knn.rerank:  # embedded together with other requests' texts (web/batching.py)
        text_query = SearchQuery.build(text=knn.text)
        text_query.validate()  # a bad text is this request's 400, never a batch's failure
        text_vectors = await state.text_vectors(searcher, [str(text_query.terms[0].value)])

    def run() -> list[dict]:
        for _ in range(2):  # once more when a rebuild switched generations between the index and the rows
            folder = searcher.follow()
            hits = ranked()
            found = searcher.records([hit.id for hit in hits])
            imported = searcher.imported(found)
            if searcher.collection.folder == folder:
                break
        return [result_item(request, name, found[hit.id], hit, imported.get(hit.id)) for hit in hits if hit.id in found]

    def ranked() -> list[Hit]:
        if knn.rerank:
            hits = reranked(searcher, knn, num_result_ids, search_filter)
        else:
            allowed = searcher.allowed_ids(search_filter) if search_filter.active else None
            hits = [Hit(i, score) for i, score in
                    searcher.index.search(query_vector()[None, :], num_result_ids, allowed=allowed)[0]]
        if knn.deduplicate:
            hits = deduplicate(searcher, hits)
        return hits[:num_images]

    def query_vector() -> np.ndarray:
        if knn.text is not None or image is not None:
            query = SearchQuery.build(text=knn.text, image=image if knn.text is None else None, k=num_result_ids,
                                      include_query_images=True)
            return searcher.query_vector(query, text_vectors).vector
        if knn.embedding_input is not None:
            return embedding_vector(knn.embedding_input, searcher.collection_model.embed_dim)
        raise ApiError(400, "must fill one of text, image, image_url and embedding_input")

    try:
        return await state.run(run)
    finally:
        if image is not None:
            del image
            await state.run(release_freed_memory)


class Hit(NamedTuple):
    id: int
    similarity: float
    match: float | None = None
    itc_score: float | None = None


def check_rerank(knn: KnnRequest) -> None:
    """400 for re-ranking fields that cannot apply: rerank without a text, min_match without rerank."""
    if knn.rerank and knn.text is None:
        raise ApiError(400, "rerank needs a text query: the ITM head compares a text with each image",
                       "Send 'text', or leave out 'rerank' for image and embedding queries.")
    if knn.min_match is not None and not knn.rerank:
        raise ApiError(400, "min_match needs rerank: the match probability comes from the ITM head",
                       "Add \"rerank\": true, or leave out min_match.")


def reranked(searcher: Searcher, knn: KnnRequest, k: int, search_filter: SearchFilter | None = None) -> list[Hit]:
    """The text query's hits re-ranked by the ITM head (Searcher.search: a QueryError, i.e. 400, for a model
    without one). Results are the query's k best by final score, then any unscored ones in ITC order."""
    query = SearchQuery.build(text=knn.text, k=k, include_query_images=True, rerank=True, rerank_k=knn.rerank_k,
                              min_match=knn.min_match, filter=search_filter)
    return [Hit(hit.id, hit.score, hit.match, hit.itc_score) for hit in searcher.search(query)]


@router.post("/metadata", summary="Metadata of result ids (clip-back)", openapi_extra=_schema(MetadataRequest),
             responses=error_responses(400, 401, 413, 422, 503))
async def metadata(request: Request) -> list[dict]:
    state: WebState = request.app.state.web
    wanted = parse(MetadataRequest, await json_body(request))
    if len(wanted.ids) > MAX_METADATA_IDS:
        raise ApiError(400, f"at most {MAX_METADATA_IDS} ids per request")
    def run() -> list[dict]:
        name = state.resolve_name(wanted.indice_name)
        searcher = state.searcher(name)
        found = searcher.records(wanted.ids)
        imported = searcher.imported(found)
        # As clip-back: one entry per id asked, in that order; an id with no image gets empty metadata.
        return [{"id": i, "metadata": metadata_of(request, name, found[i], imported.get(i)) if i in found else {}}
                for i in wanted.ids]

    return await state.run(run)


def embedding_vector(values: list[float], dim: int) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    if vector.shape != (dim,):
        raise ApiError(400, f"embedding_input has {vector.size} values; this collection's model has {dim} dimensions")
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm < 1e-12:
        raise ApiError(400, "embedding_input must be a finite, non-zero vector")
    return vector / norm


def deduplicate(searcher: Searcher, hits: list[Hit]) -> list[Hit]:
    """clip-back's deduplication: results whose stored vectors are linked by a chain of cosines above its threshold
    form one group, and only each group's best-ranked result is kept (a ~ b ~ c drops b and c even where a and c are
    not alike). Results without a stored vector are left out."""
    vectors = searcher.stored_vectors([hit.id for hit in hits])
    present = [hit for hit in hits if vectors.get(hit.id) is not None]
    if len(present) < 2:
        return present
    matrix = np.stack([vectors[hit.id] for hit in present])
    linked = np.triu((matrix @ matrix.T) > DEDUPLICATE_THRESHOLD, 1)
    group = list(range(len(present)))  # union-find; a group's root is its best-ranked member (lowest index)

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i, j in zip(*np.nonzero(linked)):
        a, b = root(int(i)), root(int(j))
        if a != b:
            group[max(a, b)] = min(a, b)
    return [hit for i, hit in enumerate(present) if root(i) == i]


def metadata_of(request: Request, collection: str, record: ImageRecord, imported: dict | None = None) -> dict:
    """clip-back's metadata of one image. `imported`: what `clipsearch import-embeddings` read from clip-retrieval's
    metadata for it (Searcher.imported): its caption, for a URL row its original image_path, and the metadata's
    other columns (NSFW, key, ...), as clip-back would answer from that metadata."""
    _, image_url = image_urls(request, record.id, collection)
    imported = imported or {}
    # A URL row of `clipsearch import-embeddings` (stored path = its URL): clip-back's own behaviour for such rows,
    # the original URL, never a link to this server (which serves local files only and never fetches URLs).
    url_row = is_url_path(record.path)
    url = record.path if url_row else absolute(request, image_url)
    image_path = (imported.get("image_path") or record.path) if url_row else record.path
    caption = imported.get("caption")
    item = {"image_path": image_path, "caption": Path(record.path).name if caption is None else caption, "url": url,
            "width": record.width, "height": record.height}
    for name, value in (imported.get("extra") or {}).items():  # the metadata's other columns (NSFW, key, ...)
        item.setdefault(name, value)
    return item


def result_item(request: Request, collection: str, record: ImageRecord, hit: Hit, imported: dict | None = None) -> dict:
    """clip-back's result shape; a re-scored hit also has `match` and `itc_score`."""
    item = {"id": record.id, "similarity": round(float(hit.similarity), 6),
            **metadata_of(request, collection, record, imported)}
    if hit.match is not None:
        item["match"] = round(float(hit.match), 6)
        item["itc_score"] = round(float(hit.itc_score), 6)
    return item
