"""The REST API under /api: search (text, example image, indexed image), classify, image metadata and
files, stats."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response

import clipsearch
from clipsearch.classify import Classifier, parse_labels
from clipsearch.paths import missing_local_files
from clipsearch.filters import SearchFilter
from clipsearch.model.preprocess import open_image
from clipsearch.search import SearchHit, SearchQuery, Searcher

from .errors import ApiError
from .images import not_modified, original_file
from .openapi import error_responses
from .parsing import StrictRoute
from .schemas import (AFTER_DESCRIPTION, BEFORE_DESCRIPTION, IN_DESCRIPTION, MIN_MATCH_DESCRIPTION, MIN_SIZE_DESCRIPTION, NPROBE_DESCRIPTION,
                      ORIENTATION_DESCRIPTION, RERANK_DESCRIPTION, RERANK_K_DESCRIPTION, ClassifyResponse, ImageInfo,
                      ImageResult, LabelProbability, ModelInfo, SearchRequest, SearchResponse, StatsResponse)
from .state import WebState
from .uploads import QueryImage, check_image, decode_base64_image, read_upload, release_freed_memory
from .urls import image_urls

router = APIRouter(prefix="/api", route_class=StrictRoute)

_QUERY_ERRORS = error_responses(400, 401, 404, 422, 503)
_BODY_ERRORS = error_responses(400, 401, 404, 413, 415, 422, 503)
_IMAGE_ERRORS = error_responses(400, 401, 404, 410, 422, 503)
CollectionParam = Annotated[str | None, Query(description="Another collection served by this server")]
InParam = Annotated[list[str] | None, Query(alias="in", description=IN_DESCRIPTION + " (repeat the parameter for "
                                                                                "several)")]
AfterParam = Annotated[str | None, Query(description=AFTER_DESCRIPTION)]
BeforeParam = Annotated[str | None, Query(description=BEFORE_DESCRIPTION)]
OrientationParam = Annotated[str | None, Query(description=ORIENTATION_DESCRIPTION)]
MinSizeParam = Annotated[str | None, Query(description=MIN_SIZE_DESCRIPTION)]
ImageIdParam = Annotated[str, PathParam(description="An image id (a decimal number) from a search result",
                                   openapi_examples={"an indexed image": {"value": "1"}})]


async def web_state(request: Request) -> WebState:  # async: no thread hop for a field read
    return request.app.state.web


State = Annotated[WebState, Depends(web_state)]


def parse_image_id(image_id: str) -> int:
    """Path ids are plain decimal numbers; anything else (a path, '..', encoded slashes) is simply not found."""
    if not image_id.isascii() or not image_id.isdigit() or len(image_id) > 18:
        raise ApiError(404, "no such image", "Image ids are whole numbers, those of search results (their 'id').")
    return int(image_id)


async def require_json(request: Request) -> None:
    """JSON routes answer 415 to other content types (instead of a confusing validation error)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(415, "send the query as JSON", "Set 'Content-Type: application/json'.")


def check_texts(state: WebState, texts: list[str | None], what: str = "texts") -> None:
    """The per-request text limits: at most `max_query_terms` texts of at most `max_text_chars` each (422)."""
    given = [t for t in texts if t is not None]
    limits = state.settings
    if len(given) > limits.max_query_terms:
        raise ApiError(422, f"{len(given)} {what} in one query is more than the limit of {limits.max_query_terms}",
                       "Combine fewer texts (text + and + not).")
    for text in given:
        if len(text) > limits.max_text_chars:
            raise ApiError(422, f"text of {len(text):,} characters is longer than the limit of "
                                f"{limits.max_text_chars:,}", "CLIP models read only the first 77 tokens anyway.")


def checked_labels(state: WebState, labels: str | None) -> list[str]:
    """Labels of a classify request within the limits (422), counted before any per-label work; none at all (the
    field left out or empty) is the 400 of `parse_labels`, whatever the form encoding made of an empty field."""
    limits = state.settings
    labels = labels or ""
    distinct = {item.strip() for item in labels.split(",")} - {""}
    if len(distinct) > limits.max_labels:
        raise ApiError(422, f"{len(distinct)} labels is more than the limit of {limits.max_labels} per request",
                       "Classify against fewer labels per request (several requests for more).")
    longest = max(distinct, key=len, default="")
    if len(longest) > limits.max_label_chars:
        raise ApiError(422, f"a label of {len(longest):,} characters is longer than the limit of "
                            f"{limits.max_label_chars:,}", "A label is a few words, e.g. 'a dog on a beach'.")
    return parse_labels(labels)


def checked_k(state: WebState, k: int | None) -> int:
    k = state.settings.default_k if k is None else k
    if not 1 <= k <= state.settings.max_k:
        raise ApiError(422, f"k must be between 1 and {state.settings.max_k}, not {k}",
                       f"Ask for at most {state.settings.max_k} results per request.")
    return k


def parse_filter(folders: list[str] | str | None, after: str | None, before: str | None, orientation: str | None,
                 min_size: str | None) -> SearchFilter:
    """The request's filters (a FilterError, i.e. 400 with a hint, for a bad value; folders must be absolute)."""
    return SearchFilter.parse(folders=folders, after=after, before=before, orientation=orientation, min_size=min_size)


def empty_note(searcher: Searcher, search_filter: SearchFilter, hits: list[SearchHit],
               min_match: float | None = None) -> str | None:
    """Why a search found nothing: the collection is empty, the filters match no image, or no re-ranked hit reached
    `min_match` (None otherwise)."""
    reason = searcher.why_empty(search_filter) if not hits else None
    if reason is not None:
        return reason.message + (f". {reason.hint}" if reason.hint else "")
    if not hits and min_match is not None:
        return (f"no re-ranked result reached the minimum match of {min_match:.0%}. Lower min_match (the page's "
                "Min. match) or leave it out.")
    return None


def after_search(searcher: Searcher, search_filter: SearchFilter, hits: list[SearchHit],
                 min_match: float | None = None) -> tuple[set[str], str | None]:
    """In a worker thread, never the encoder lanes (a stat on a hung network mount must not hold up every text
    search): which results' files are gone (one stat each), and why the search found nothing, if it did not."""
    gone = missing_local_files([hit.path for hit in hits])
    return gone, (empty_note(searcher, search_filter, hits, min_match) if not hits else None)


def search_response(request: Request, searcher: Searcher, query_text: str, hits: list[SearchHit],
                    started: float, search_filter: SearchFilter | None = None, note: str | None = None,
                    gone: set[str] = frozenset()) -> Response:
    """The SearchResponse as JSON. Returned as a Response, so FastAPI does not validate and encode again what
    was just built from typed hits (the route's response_model still documents it)."""
    name = searcher.collection.name
    results = []
    for hit in hits:
        thumbnail_url, image_url = image_urls(request, hit.id, name)
        results.append(ImageResult(id=hit.id, path=hit.path, score=hit.score, width=hit.width, height=hit.height,
                                   taken_at=hit.taken_at, thumbnail_url=thumbnail_url, image_url=image_url,
                                   itc_score=hit.itc_score, match=hit.match, date=hit.date, date_source=hit.date_source,
                                   missing=hit.path in gone))
    active = search_filter is not None and search_filter.active
    response = SearchResponse(query=query_text, took_ms=round((time.perf_counter() - started) * 1000, 2),
                              collection=name, results=results, filters=search_filter.describe() if active else None,
                              note=note)
    return Response(response.model_dump_json(), media_type="application/json")


def describe(text: str | None, and_texts: list[str], not_texts: list[str], image: bool, image_id: int | None) -> str:
    parts = [text] if text else []
    parts += [f"+{t}" for t in and_texts]
    parts += [f"-{t}" for t in not_texts]
    if image:
        parts.append("<image>")
    if image_id is not None:
        parts.append(f"<like #{image_id}>")
    return " ".join(parts)


@router.get("/search", response_model=SearchResponse, responses=_QUERY_ERRORS, summary="Search by text")
async def search_text(request: Request, state: State,
                q: Annotated[str, Query(description="What to look for; at most 1,000 characters (422 beyond)")],
                k: Annotated[int | None, Query(ge=1, description="How many results (default 20)")] = None,
                collection: CollectionParam = None,
                rerank: Annotated[bool, Query(description=RERANK_DESCRIPTION)] = False,
                rerank_k: Annotated[int | None, Query(ge=1, le=256, description=RERANK_K_DESCRIPTION)] = None,
                min_match: Annotated[float | None, Query(ge=0, le=1, allow_inf_nan=False,
                                                         description=MIN_MATCH_DESCRIPTION)] = None,
                in_: InParam = None, after: AfterParam = None, before: BeforeParam = None,
                orientation: OrientationParam = None, min_size: MinSizeParam = None,
                nprobe: Annotated[int | None, Query(ge=1, le=65_536, description=NPROBE_DESCRIPTION)] = None,
                ) -> Response:
    started = time.perf_counter()
    check_texts(state, [q])
    search_filter = parse_filter(in_, after, before, orientation, min_size)
    query = SearchQuery.build(text=q, k=checked_k(state, k), rerank=rerank, rerank_k=rerank_k, min_match=min_match,
                              filter=search_filter, nprobe=nprobe)
    query.validate()
    searcher = await state.searcher_for(collection)
    hits = await state.search(searcher, query)
    gone, note = await state.run(after_search, searcher, search_filter, hits, min_match)
    return search_response(request, searcher, q, hits, started, search_filter, note, gone)


@router.post("/search", response_model=SearchResponse, responses=_BODY_ERRORS, dependencies=[Depends(require_json)],
             summary="Search by a combination of text, an example image and an indexed image")
async def search_combined(request: Request, state: State, body: SearchRequest) -> Response:
    started = time.perf_counter()
    k = checked_k(state, body.k)
    check_texts(state, [body.text, *body.and_texts, *body.not_texts])
    image: bytes | None = None
    if body.image_b64 is not None:
        limits = state.settings
        image = await state.run(lambda: check_image(decode_base64_image(body.image_b64, limits.max_upload_bytes),
                                                    limits.max_image_pixels).data)
    if body.text is None and image is None and body.image_id is None:
        raise ApiError(400, "empty query: give text, image_b64 or image_id",
                       'e.g. {"text": "a dog on a beach"}; /docs lists the other fields.')
    search_filter = parse_filter(body.in_folders, body.after, body.before, body.orientation, body.min_size)
    searcher = await state.searcher_for(body.collection)
    if body.image_id is not None:
        await state.run(state.image, body.image_id, body.collection)  # 404 for an unknown id
    query = SearchQuery.build(text=body.text, image=image, like=body.image_id, and_texts=body.and_texts,
                              not_texts=body.not_texts, k=k, include_query_images=body.include_self,
                              rerank=body.rerank, rerank_k=body.rerank_k, min_match=body.min_match,
                              filter=search_filter, nprobe=body.nprobe)
    query.validate()
    text = describe(body.text, body.and_texts, body.not_texts, image is not None, body.image_id)
    try:
        hits = await state.search(searcher, query)
    finally:
        if image is not None:
            del image, query
            await state.run(release_freed_memory)
    gone, note = await state.run(after_search, searcher, search_filter, hits, body.min_match)
    return search_response(request, searcher, text, hits, started, search_filter, note, gone)


async def uploaded_image(state: WebState, file: UploadFile | None, image: UploadFile | None) -> QueryImage:
    if file is not None and image is not None:
        raise ApiError(400, "two images: 'file' and its alias 'image' were both sent", "Send one of them.")
    upload = file or image
    if upload is None:
        raise ApiError(422, "send the image as a multipart file field named 'file'",
                       "A multipart/form-data request with the image file in 'file', e.g. curl -F file=@photo.jpg.")
    data = await read_upload(upload, state.settings.max_upload_bytes)
    return await state.run(check_image, data, state.settings.max_image_pixels)


@router.post("/search/image", response_model=SearchResponse, responses=_BODY_ERRORS,
             summary="Search by an uploaded example image (multipart)")
async def search_upload(request: Request, state: State,
                        file: Annotated[UploadFile | None, File(description="The example image")] = None,
                        image: Annotated[UploadFile | None, File(description="Alias of 'file'")] = None,
                        k: Annotated[int | None, Form(ge=1)] = None,
                        text: Annotated[str | None, Form(description="Optional text to add to the image")] = None,
                        collection: Annotated[str | None, Form()] = None,
                        include_self: Annotated[bool, Form()] = False,
                        in_: Annotated[list[str] | None, Form(alias="in", description=IN_DESCRIPTION)] = None,
                        after: Annotated[str | None, Form(description=AFTER_DESCRIPTION)] = None,
                        before: Annotated[str | None, Form(description=BEFORE_DESCRIPTION)] = None,
                        orientation: Annotated[str | None, Form(description=ORIENTATION_DESCRIPTION)] = None,
                        min_size: Annotated[str | None, Form(description=MIN_SIZE_DESCRIPTION)] = None) -> Response:
    started = time.perf_counter()
    k = checked_k(state, k)
    check_texts(state, [text])
    search_filter = parse_filter(in_, after, before, orientation, min_size)
    query_image = await uploaded_image(state, file, image)
    searcher = await state.searcher_for(collection)
    query = SearchQuery.build(text=text or None, image=query_image.data, k=k, include_query_images=include_self,
                              filter=search_filter)
    query.validate()
    try:
        hits = await state.search(searcher, query)
    finally:
        del query_image, query
        await state.run(release_freed_memory)
    gone, note = await state.run(after_search, searcher, search_filter, hits)
    return search_response(request, searcher, describe(text or None, [], [], True, None), hits, started,
                           search_filter, note, gone)


@router.post("/classify", response_model=ClassifyResponse, responses=_BODY_ERRORS,
             summary="Zero-shot classify an image (multipart upload, or an indexed image by id) against labels")
async def classify(state: State,
                   labels: Annotated[str | None, Form(description="Comma-separated labels, e.g. 'cat,dog,car'; at "
                                                              "most 64 labels of at most 100 characters (422 beyond; "
                                                              "400 for none)")] = None,
                   file: Annotated[UploadFile | None, File(description="The image")] = None,
                   image: Annotated[UploadFile | None, File(description="Alias of 'file'")] = None,
                   image_id: Annotated[int | None, Form(ge=0, le=2**63 - 1, description="Or: an indexed image")] = None,
                   collection: Annotated[str | None, Form()] = None) -> ClassifyResponse:
    started = time.perf_counter()
    label_list = checked_labels(state, labels)
    searcher = await state.searcher_for(collection)

    def classifier() -> Classifier:
        return Classifier(searcher.model, label_list, cache=state.label_cache)

    if image_id is not None and (file is not None or image is not None):
        raise ApiError(400, "two images: an upload and image_id were both sent", "Send one of them.")
    if image_id is not None:
        def by_id() -> list:
            state.image(image_id, collection)  # 404 for an unknown id
            return classifier().classify_vector(searcher.stored_vectors([image_id])[image_id])

        scores = await state.run(by_id)
    else:
        query_image = await uploaded_image(state, file, image)

        def run() -> list:
            decoded = open_image(query_image.data, max_pixels=state.settings.max_image_pixels)
            return classifier().classify_image(decoded)

        try:
            scores = await state.run(run)
        finally:
            del query_image
            await state.run(release_freed_memory)
    by_label = {s.label: s.probability for s in scores}
    return ClassifyResponse(took_ms=round((time.perf_counter() - started) * 1000, 2),
                            labels=[LabelProbability(label=s.label, probability=s.probability, similarity=s.similarity)
                                    for s in scores],
                            probabilities={label: by_label[label] for label in label_list})


@router.get("/images/{image_id}", response_model=ImageInfo, responses=error_responses(400, 401, 404, 422, 503),
            summary="Metadata of an indexed image")
async def image_info(request: Request, state: State, image_id: ImageIdParam,
                     collection: CollectionParam = None) -> ImageInfo:
    found = await state.run(state.image, parse_image_id(image_id), collection)
    record = found.record
    thumbnail_url, image_url = image_urls(request, record.id, found.collection)
    return ImageInfo(id=record.id, collection=found.collection, path=record.path, file_name=Path(record.path).name,
                     width=record.width, height=record.height, size=record.size, taken_at=record.taken_at,
                     indexed_at=record.indexed_at, thumbnail_url=thumbnail_url, image_url=image_url)


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_NOT_MODIFIED = {304: {"description": "Not modified: If-None-Match named this ETag (no body)"}}
_THUMBNAIL_RESPONSES = {200: {"description": "A JPEG thumbnail", "content": {"image/jpeg": _BINARY}},
                        206: {"description": "Part of the thumbnail (a Range request)", "content": {"image/jpeg": _BINARY}},
                        416: {"description": "A Range outside the thumbnail (no body)"}, **_NOT_MODIFIED,
                        **_IMAGE_ERRORS}
_FILE_RESPONSES = {200: {"description": "The file's bytes as indexed",
                         "content": {"image/*": _BINARY, "application/octet-stream": _BINARY}},
                   206: {"description": "One byte range of the file (a Range request, e.g. a resumed download; "
                                        "If-Range with the ETag, else the whole file is sent)",
                         "content": {"image/*": _BINARY, "application/octet-stream": _BINARY}},
                   416: {"description": "A Range outside the file"}, **_NOT_MODIFIED,
                   **_IMAGE_ERRORS}
_FILE_NOTE = (" Served only while the file on disk is still the indexed image (same size and modification time, "
              "inside an indexed folder, an image): 404 when it is gone or points elsewhere, 410 when it changed.")


# GET and HEAD (a HEAD gets the headers only; HTTP's own, so not a second operation in the document); an
# If-None-Match naming the ETag is answered 304.
@router.head("/images/{image_id}/thumbnail", include_in_schema=False)
@router.get("/images/{image_id}/thumbnail", response_class=FileResponse, responses=_THUMBNAIL_RESPONSES,
            summary="A JPEG thumbnail (longest side ≤ 256 px), cached on disk", description=_FILE_NOTE.strip())
async def image_thumbnail(request: Request, state: State, image_id: ImageIdParam,
                          collection: CollectionParam = None) -> Response:
    def thumbnail() -> Response:
        found = state.image(parse_image_id(image_id), collection)
        response = state.thumbnails(found.collection).response(found.record, state.served_roots(found.collection))
        return not_modified(request.headers.get("if-none-match"), response)

    return await state.run(thumbnail)


@router.head("/images/{image_id}/file", include_in_schema=False)
@router.get("/images/{image_id}/file", response_class=FileResponse, responses=_FILE_RESPONSES,
            summary="The original file", description=_FILE_NOTE.strip())
async def image_file(request: Request, state: State, image_id: ImageIdParam,
                     collection: CollectionParam = None) -> Response:
    def file() -> Response:
        found = state.image(parse_image_id(image_id), collection)
        # If-Range names the version a download started from: another one is sent whole.
        if_range = (request.headers.get("if-range") or "").strip()  # compared strongly: a weak tag never matches
        same = not if_range or if_range == f'"{found.record.content_hash[:32]}"'
        wanted = request.headers.get("range") if same else None
        response = original_file(found.record, state.served_roots(found.collection), wanted)
        return not_modified(request.headers.get("if-none-match"), response)

    return await state.run(file)


@router.get("/stats", response_model=StatsResponse, responses=error_responses(400, 401, 422, 503),
            summary="Collection statistics")
async def stats(state: State, collection: CollectionParam = None) -> StatsResponse:
    def gather() -> StatsResponse:
        info = state.searcher(collection).stats()
        model = (ModelInfo(id=info.model.model_id, name=info.model.name, embed_dim=info.model.embed_dim)
                 if info.model else None)
        return StatsResponse(collection=info.name, images=info.images, skipped=info.skipped, model=model,
                             index_kind=info.index_kind, index_count=info.index_count, index_fresh=info.index_fresh,
                             bytes_on_disk=info.bytes_on_disk, collections=state.collection_names(),
                             version=clipsearch.__version__, can_rerank=state.can_rerank(info.name),
                             index_factory=info.index_factory, index_nprobe=info.index_nprobe,
                             index_refine_factor=info.index_refine_factor, index_recall=info.index_recall)

    return await state.run(gather)
