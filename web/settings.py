"""What an operator can configure about the server; one frozen value per app (no globals)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clipsearch.store.collection import DEFAULT_COLLECTION

from .batching import DEFAULT_MAX_BATCH, DEFAULT_WINDOW_SECONDS
from .executor import DEFAULT_QUEUE_LIMIT

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Bounded work per request (SECURITY.md lists every limit). Beyond them a request is refused with 422.
DEFAULT_MAX_QUERY_TERMS = 16     # texts in one search: text + and + not (clip-back: one text)
DEFAULT_MAX_TEXT_CHARS = 1000    # per text; CLIP reads at most 77 tokens (~ 300 characters) anyway
DEFAULT_MAX_LABELS = 64          # labels per /api/classify request (each is embedded through 7 prompts)
DEFAULT_MAX_LABEL_CHARS = 100    # per label
DEFAULT_LABEL_CACHE_SIZE = 4096  # label embeddings kept per app (LRU)
# Decoded pixels per request (a request carries at most one image; 413 beyond). Lower than the library's own
# limit for local files: a 100 MP PNG already needs ~0.7 GB while it is decoded.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# Serving under load (web/executor.py, web/batching.py): blocking work runs in `workers` threads (None: two per
# core, at least 4) with at most `queue_limit` jobs waiting (503 + Retry-After beyond); concurrent text queries
# are embedded together, up to `max_batch` texts gathered for at most `batch_window_ms`, by `batch_lanes` batcher
# threads (None: one per core, at least two); a plain text query is also searched in its lane, with its batch
# (`Searcher.search_many`), counted against the same `workers` + `queue_limit` bound.
DEFAULT_BATCH_WINDOW_MS = DEFAULT_WINDOW_SECONDS * 1000


@dataclass(frozen=True)
class ServerSettings:
    """Settings of one app instance.

    `collection` is the collection served by default (others under the same `index_dir` can be named
    per request); `api_key` set means every data route requires it; `allow_remote_images` lets the
    clip-back `image_url` field make the server fetch a URL (off: no server-side requests to arbitrary
    hosts); `cors_origins` empty means no CORS headers at all. `allowed_hosts` are the Host header names
    the server answers to besides the loopback ones (localhost, 127.0.0.1, [::1]); any port.
    `max_image_pixels` bounds the decoded pixels of a request (each request carries at most one image).
    `model_threads`: onnxruntime intra-op threads per graph (None: 1 when serving, see web.state
    SERVING_MODEL_THREADS: concurrency comes from requests running side by side — the text batcher's lanes,
    image queries in the workers — so one thread per call keeps them from oversubscribing the cores).
    `workers`, `queue_limit`, `max_batch`, `batch_window_ms`, `batch_lanes`: see the constants above.
    """

    collection: str = DEFAULT_COLLECTION
    index_dir: Path | None = None
    model: str | None = None
    api_key: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    allow_remote_images: bool = False
    remote_timeout_seconds: float = 10.0
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    thumbnail_px: int = 256
    default_k: int = 20
    max_k: int = 1000
    model_threads: int | None = None
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)
    max_query_terms: int = DEFAULT_MAX_QUERY_TERMS
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    max_labels: int = DEFAULT_MAX_LABELS
    max_label_chars: int = DEFAULT_MAX_LABEL_CHARS
    label_cache_size: int = DEFAULT_LABEL_CACHE_SIZE
    workers: int | None = None
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    max_batch: int = DEFAULT_MAX_BATCH
    batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS
    batch_lanes: int | None = None

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            object.__setattr__(self, "api_key", None)
        if self.api_key is not None and not all("!" <= c <= "~" for c in self.api_key):
            # Clients send headers in different byte encodings and trim spaces: such a key could never match.
            raise ValueError("the API key must be printable ASCII without spaces (letters, digits and punctuation: "
                             "HTTP clients cannot all send other characters in a header); e.g. from "
                             "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        if self.max_upload_bytes <= 0:
            raise ValueError("max_upload_bytes must be positive")
        if not 16 <= self.thumbnail_px <= 1024:
            raise ValueError("thumbnail_px must be between 16 and 1024")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError("default_k must be between 1 and max_k")
        for name in ("max_query_terms", "max_text_chars", "max_labels", "max_label_chars", "max_image_pixels",
                     "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.workers is not None and self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.batch_lanes is not None and self.batch_lanes < 1:
            raise ValueError("batch_lanes must be at least 1")
        if self.model_threads is not None and self.model_threads < 1:
            raise ValueError("model_threads must be at least 1")
        if self.queue_limit < 0:
            raise ValueError("queue_limit must not be negative")
        if not 0 <= self.batch_window_ms <= 1000:
            raise ValueError("batch_window_ms must be between 0 and 1000")
        from .security import allowed_host_names

        object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))
        allowed_host_names(self.allowed_hosts)  # ValueError for a malformed name

    @property
    def max_body_bytes(self) -> int:
        """Largest request body accepted: an upload as base64 in JSON (4/3 larger) plus room for fields."""
        return self.max_upload_bytes * 4 // 3 + 1024 * 1024
