"""Near-duplicates over the web: `GET /api/duplicates` (JSON groups) and the page at `/duplicates`.

The groups come from `clipsearch.duplicates.find_duplicates` (the index's stored vectors; no file is read). An
answer is kept per collection, store generation and threshold, so reloading the page does not scan the
collection again until it changes. Images are shown through the thumbnail route by id, never by path.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from clipsearch.duplicates import DEFAULT_NEIGHBOURS, MAX_NEIGHBOURS, DuplicateReport, find_duplicates

from .api import CollectionParam, State
from .openapi import error_responses
from .page import PAGE_CSP, STATIC_DIR
from .parsing import StrictRoute
from .urls import image_urls

router = APIRouter(prefix="/api", route_class=StrictRoute)
page_router = APIRouter(include_in_schema=False)

CACHED_REPORTS = 8
THRESHOLD_DESCRIPTION = ("Cosine similarity at which two images count as copies (above 0, at most 1: 422 beyond); "
                         "default: the model's own near-duplicate threshold (400 with a hint for a model without one)")


class DuplicateImageOut(BaseModel):
    id: int
    path: str
    bytes: int = Field(description="File size")
    width: int | None
    height: int | None
    similarity: float = Field(description="Cosine similarity to the group's suggested keeper (1 for the keeper)")
    keep: bool = Field(description="The suggested copy to keep: the most pixels, then the largest file")
    thumbnail_url: str
    image_url: str


class DuplicateGroupOut(BaseModel):
    count: int
    keep: int = Field(description="The id of the suggested copy to keep (listed first)")
    images: list[DuplicateImageOut]


class DuplicatesResponse(BaseModel):
    collection: str
    model_id: str
    threshold: float
    threshold_source: str = Field(description="'model' (the model's own threshold) or 'given' (the request's)")
    images: int = Field(description="How many images were compared")
    redundant: int = Field(description="Images that are not their group's suggested keeper")
    took_ms: float
    groups: list[DuplicateGroupOut] = Field(description="Largest groups first")


class _ReportCache:
    """The last few reports, by (collection folder, store generation, threshold, neighbours)."""

    def __init__(self, size: int = CACHED_REPORTS) -> None:
        self.size = size
        self.reports: OrderedDict[tuple, DuplicateReport] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple) -> DuplicateReport | None:
        with self.lock:
            report = self.reports.get(key)
            if report is not None:
                self.reports.move_to_end(key)
            return report

    def put(self, key: tuple, report: DuplicateReport) -> None:
        with self.lock:
            self.reports[key] = report
            while len(self.reports) > self.size:
                self.reports.popitem(last=False)


def _cache(request: Request) -> _ReportCache:
    cache = getattr(request.app.state, "duplicates_cache", None)
    if cache is None:
        cache = request.app.state.duplicates_cache = _ReportCache()
    return cache


@router.get("/duplicates", response_model=DuplicatesResponse, responses=error_responses(400, 401, 422, 503),
            summary="Groups of near-identical images (resized, re-encoded, slightly cropped or colour-shifted copies)",
            description="Compares the index's stored vectors (no image file is read). Each group lists the suggested "
                        "copy to keep first.")
async def duplicates(request: Request, state: State, collection: CollectionParam = None,
               threshold: Annotated[float | None, Query(gt=0, le=1, allow_inf_nan=False,
                                                        description=THRESHOLD_DESCRIPTION)] = None,
               neighbours: Annotated[int, Query(ge=1, le=MAX_NEIGHBOURS, description="Nearest images each image is "
                                                "compared with")] = DEFAULT_NEIGHBOURS) -> DuplicatesResponse:
    searcher = await state.searcher_for(collection)
    cache = _cache(request)

    def report() -> DuplicateReport:
        searcher.follow()  # a rebuild's switch: the generation below is then the current one
        with searcher.lock:
            key = (str(searcher.collection.folder), searcher.collection.store.generation, threshold, neighbours)
        found = cache.get(key)
        if found is None:
            found = find_duplicates(searcher, threshold, neighbours)
            cache.put(key, found)
        return found

    # A scan reads every vector: in the bounded executor like every other blocking call (503 when it is full).
    return _response(request, await state.run(report))


def _response(request: Request, report: DuplicateReport) -> DuplicatesResponse:
    groups = []
    for group in report.groups:
        images = []
        for image in group.images:
            thumbnail_url, image_url = image_urls(request, image.id, report.collection)
            images.append(DuplicateImageOut(**image.to_dict(), thumbnail_url=thumbnail_url, image_url=image_url))
        groups.append(DuplicateGroupOut(count=len(images), keep=group.keep.id, images=images))
    return DuplicatesResponse(collection=report.collection, model_id=report.model_id, threshold=report.threshold.value,
                              threshold_source=report.threshold.source, images=report.images,
                              redundant=report.redundant, took_ms=report.took_ms, groups=groups)


@page_router.get("/duplicates")
def duplicates_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "duplicates.html", media_type="text/html",
                        headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})
