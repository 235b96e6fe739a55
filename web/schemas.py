"""Request and response bodies of the REST API (they also make the OpenAPI document)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

NPROBE_DESCRIPTION = ("Inverted lists an IVF index probes for this query (default: the value tuned when the index "
                      "was built, shown by GET /api/stats); more is slower and finds more. Ignored by exact indexes.")
RERANK_DESCRIPTION = ("Re-score the top rerank_k hits with the model's ITM head (text queries; models exported with "
                      "`clipsearch models export-blip`, 400 for other models or image queries); re-scored hits get "
                      "itc_score and match, and come first; hits past the top rerank_k keep their cosine as score "
                      "(another scale: ask k <= rerank_k for re-scored hits only)")
RERANK_K_DESCRIPTION = "How many top hits rerank re-scores (default 32, 1-256: 422 beyond)"
MIN_MATCH_DESCRIPTION = ("With rerank: keep only re-scored hits whose match probability is at least this (0-1: 422 "
                         "beyond; 400 without rerank)")

IN_DESCRIPTION = ("Only images in this folder, at any depth: an absolute path as result paths show it (several: "
                  "images in any of them; at most 64)")
AFTER_DESCRIPTION = ("Only images dated on or after this (inclusive): 2024-05-01, 2024-05, 2024 or 2024-05-01T14:30[:00], "
                     "optionally with a UTC offset. The date is the EXIF capture time (taken_at), else the file's "
                     "modification time; results then say which (date, date_source). 400 for a bad date")
BEFORE_DESCRIPTION = "Only images dated before this (exclusive); the same dates as after"
ORIENTATION_DESCRIPTION = ("landscape, portrait or square (sides within 1% of each other); 400 for anything else. "
                           "Images of unknown size match none")
MIN_SIZE_DESCRIPTION = "Only images at least this big, WIDTHxHEIGHT in pixels, e.g. 1920x1080 (400 otherwise)"

# Ids are SQLite integers: anything outside int64 cannot name an image (and must not reach SQLite).
ImageId = Annotated[int, Field(ge=0, le=2**63 - 1)]


class ImageResult(BaseModel):
    id: int
    path: str
    score: float = Field(description="Cosine similarity to the query; results come best first. For a hit re-scored "
                                     "with rerank: ITM match logit + ITC cosine (itc_score)")
    width: int | None
    height: int | None
    taken_at: str | None = None
    thumbnail_url: str
    image_url: str
    itc_score: float | None = Field(None, description="With rerank, for re-scored hits: the cosine similarity of the "
                                                      "first (ITC) stage; null otherwise")
    match: float | None = Field(None, description="With rerank, for re-scored hits: the probability that the image "
                                                  "matches the text (0-1), calibrated from the final score when the "
                                                  "model carries a calibration, else the ITM head's softmax; null "
                                                  "otherwise")
    date: str | None = Field(None, description="With after/before: the date the filter compared (local time, ISO); "
                                               "null otherwise")
    date_source: str | None = Field(None, description="With after/before: which date that is, 'taken_at' (EXIF capture "
                                                      "time) or 'mtime' (the file's modification time, for images "
                                                      "without one); null otherwise")
    missing: bool = Field(False, description="The file is no longer on disk (moved or deleted since it was indexed; "
                                             "it leaves the collection at the folder's next indexing run): its "
                                             "thumbnail and file routes answer 404. Never true for a URL row")


class SearchResponse(BaseModel):
    query: str = Field(description="The query as understood, e.g. 'beach -people'")
    took_ms: float
    collection: str
    results: list[ImageResult]
    filters: str | None = Field(None, description="The filters as understood (in, after, before, orientation, "
                                                  "min_size), null without filters")
    note: str | None = Field(None, description="When there are no results because no image passes the filters: why "
                                               "(e.g. a folder holding no indexed image)")


class SearchRequest(BaseModel):
    """A combined query: at least one of `text`, `image_b64`, `image_id`; `and` adds texts, `not` subtracts them.
    Texts may carry a weight prefix such as "^2:beach" (a leading caret itself is written "\\^")."""

    # strict: "k": "5" or true is a 422, not read as 5 or 1; extra="forbid": a field this route does not know (a typo,
    # or clip-back's indice_name) is a 422, never silently ignored.
    model_config = ConfigDict(populate_by_name=True, strict=True, extra="forbid", json_schema_extra={
        "examples": [{"text": "a dog on a beach", "not": ["people"], "k": 20}]})

    text: str | None = Field(None, description="At most 1,000 characters (the server's max_text_chars; 422 beyond)")
    image_b64: str | None = Field(None, description="An example image as base64 (a data: URL is fine); at most "
                                                    "20 MB decoded and the server's pixel limit (413 beyond)")
    image_id: ImageId | None = Field(None, description="The id of an indexed image: 'more like this'")
    and_texts: list[str] = Field(default_factory=list, alias="and",
                                 description="Texts to add; text + and + not: at most 16 texts per query (422 beyond)")
    not_texts: list[str] = Field(default_factory=list, alias="not", description="Texts to subtract (same limit)")
    k: int | None = Field(None, ge=1, description="How many results (default 20, at most 1000: 422 beyond)")
    collection: str | None = Field(None, description="Another collection served by this server")
    include_self: bool = Field(False, description="Also return the query image itself when it is indexed")
    rerank: bool = Field(False, description=RERANK_DESCRIPTION)
    rerank_k: int | None = Field(None, ge=1, le=256, description=RERANK_K_DESCRIPTION)
    min_match: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description=MIN_MATCH_DESCRIPTION)
    nprobe: int | None = Field(None, ge=1, le=65_536, description=NPROBE_DESCRIPTION)
    in_folders: list[str] | str | None = Field(None, alias="in", description=IN_DESCRIPTION + "; a list or one string")
    after: str | None = Field(None, description=AFTER_DESCRIPTION)
    before: str | None = Field(None, description=BEFORE_DESCRIPTION)
    orientation: str | None = Field(None, description=ORIENTATION_DESCRIPTION)
    min_size: str | None = Field(None, description=MIN_SIZE_DESCRIPTION)


class LabelProbability(BaseModel):
    label: str
    probability: float
    similarity: float


class ClassifyResponse(BaseModel):
    took_ms: float
    labels: list[LabelProbability] = Field(description="Most likely first")
    probabilities: dict[str, float] = Field(description="label -> probability, in the order the labels were given")


class ImageInfo(BaseModel):
    id: int
    collection: str
    path: str
    file_name: str
    width: int | None
    height: int | None
    size: int
    taken_at: str | None
    indexed_at: str
    thumbnail_url: str
    image_url: str


class ModelInfo(BaseModel):
    id: str
    name: str
    embed_dim: int


class StatsResponse(BaseModel):
    collection: str
    images: int
    skipped: int
    model: ModelInfo | None
    index_kind: str | None
    index_count: int | None
    index_fresh: bool
    bytes_on_disk: int
    collections: list[str]
    version: str
    can_rerank: bool = Field(False, description="Whether this collection's model has an ITM head, so text searches "
                                                "accept rerank=true (the page shows its Re-rank toggle)")
    index_factory: str | None = Field(None, description="The FAISS index the policy chose (factory string)")
    index_nprobe: int | None = Field(None, description="Inverted lists probed per query, tuned at build time")
    index_refine_factor: int | None = Field(None, description="PQ candidates re-scored per result, tuned at build time")
    index_recall: float | None = Field(None, description="recall@10 the tuned values reached on held-out queries")


class Health(BaseModel):
    status: str


class ErrorBody(BaseModel):
    """Every error response, whatever its status (422 included)."""

    detail: str = Field(description="What went wrong")
    hint: str | None = Field(None, description="How to fix it, when there is something to say")
