"""Where the helper's socket lives and what goes over it: one request and one reply per connection, each a
4-byte big-endian length and a JSON object. Imports nothing heavy: the CLI uses it before numpy is loaded."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import sys
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from .. import __version__
from ..filters import DateBound, EmptyReason, SearchFilter
from ..query import QueryTerm, SearchHit, SearchQuery

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_IDLE_SECONDS = 900.0
MAX_SOCKET_PATH_BYTES = 100
# The environment that changes what a search answers: where models and collections are, how dates are read.
_PATH_ENV_KEYS = ("CLIPSEARCH_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "HOME", "HF_HOME", "HF_HUB_CACHE")
_ENV_KEYS = (*_PATH_ENV_KEYS, "HF_HUB_OFFLINE", "TZ")


@dataclass(frozen=True)
class HelperAddress:
    """The socket of the helper for this code and environment, and the lock file its process holds."""

    socket_path: Path
    lock_path: Path


def enabled() -> bool:
    return (os.name == "posix" and hasattr(socket, "AF_UNIX")
            and os.environ.get("CLIPSEARCH_HELPER", "1").strip().lower() not in ("0", "no", "false", "off"))


def idle_seconds() -> float:
    try:
        return max(1.0, float(os.environ.get("CLIPSEARCH_HELPER_IDLE", DEFAULT_IDLE_SECONDS)))
    except ValueError:
        return DEFAULT_IDLE_SECONDS


def address() -> HelperAddress | None:
    """Where the helper listens, or None when helpers are off or no private folder can be had."""
    if not enabled():
        return None
    folder = private_folder()
    if folder is None:
        return None
    key = helper_key()
    socket_path = folder / f"helper-{key}.sock"
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH_BYTES:
        return None  # AF_UNIX paths are limited (108 bytes on Linux, 104 on macOS)
    return HelperAddress(socket_path, folder / f"helper-{key}.lock")


def private_folder() -> Path | None:
    """A folder only this user can enter: $XDG_RUNTIME_DIR/clipsearch, else /tmp/clipsearch-UID."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = (Path(runtime) / "clipsearch" if runtime and os.path.isdir(runtime)
              else Path(tempfile.gettempdir()) / f"clipsearch-{os.getuid()}")
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None  # someone else's, or open to others: no helper rather than a shared one
    return folder


def helper_key() -> str:
    facts = [__version__, sys.executable, _code_signature()]
    environment = helper_environment()
    facts += [f"{k}={environment.get(k, '')}" for k in _ENV_KEYS]
    return hashlib.sha256("\n".join(facts).encode("utf-8", "surrogateescape")).hexdigest()[:20]


def helper_environment() -> dict[str, str]:
    """This process's environment with relative folders made absolute: the helper runs in "/", and a relative
    CLIPSEARCH_HOME must mean there what it means here (and name the helper by what it means)."""
    environment = dict(os.environ)
    for key in _PATH_ENV_KEYS:
        if environment.get(key):
            environment[key] = os.path.abspath(os.path.expanduser(environment[key]))
    return environment


@lru_cache(maxsize=1)
def _code_signature() -> str:
    """The clipsearch package's source files (names, sizes, mtimes): an edited or upgraded install gets a new
    helper instead of answers from the code that was loaded before."""
    root = Path(__file__).resolve().parent.parent
    entries = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                try:
                    info = os.stat(os.path.join(folder, name))
                except OSError:
                    continue
                entries.append(f"{folder}/{name}:{info.st_size}:{info.st_mtime_ns}")
    return hashlib.sha256("\n".join(sorted(entries)).encode("utf-8", "surrogateescape")).hexdigest()


# -- framing ---------------------------------------------------------------------------------------
ACK = {"ack": True}  # the helper's first message on each connection, sent as soon as it has read the request


def send(sock: socket.socket, message: dict) -> None:
    data = json.dumps(message, ensure_ascii=True).encode("ascii")  # lone surrogates travel as \udcXX
    sock.sendall(struct.pack(">I", len(data)) + data)


def receive(sock: socket.socket) -> dict:
    header = _read_exactly(sock, 4)
    (size,) = struct.unpack(">I", header)
    if size > MAX_MESSAGE_BYTES:
        raise ConnectionError(f"message of {size} bytes")
    message = json.loads(_read_exactly(sock, size))
    if not isinstance(message, dict):
        raise ConnectionError("a message is not a JSON object")
    return message


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# -- queries and answers -----------------------------------------------------------------------------
def query_to_wire(query: SearchQuery) -> dict:
    """A query whose image terms are absolute paths (bytes are not sent: such queries stay in-process)."""
    raw = asdict(query)
    raw["terms"] = [asdict(t) for t in query.terms]
    raw["filter"] = asdict(query.filter) if query.filter is not None else None
    return raw


def query_from_wire(raw: dict) -> SearchQuery:
    terms = tuple(QueryTerm(kind=str(t["kind"]), value=t["value"], weight=float(t["weight"])) for t in raw["terms"])
    filter_raw = raw.get("filter")
    search_filter = None
    if filter_raw is not None:
        bounds = {k: DateBound(**filter_raw[k]) if filter_raw.get(k) else None for k in ("after", "before")}
        search_filter = SearchFilter(folders=tuple(filter_raw["folders"]), orientation=filter_raw["orientation"],
                                     min_width=filter_raw["min_width"], min_height=filter_raw["min_height"], **bounds)
    return SearchQuery(terms=terms, k=int(raw["k"]), include_query_images=bool(raw["include_query_images"]),
                       rerank=bool(raw["rerank"]), rerank_k=raw["rerank_k"], min_match=raw["min_match"],
                       filter=search_filter, nprobe=raw["nprobe"])


def hits_to_wire(hits: list[SearchHit]) -> list[dict]:
    return [asdict(h) for h in hits]


def hits_from_wire(raw: list[dict]) -> list[SearchHit]:
    return [SearchHit(**h) for h in raw]


def reason_to_wire(reason: EmptyReason | None) -> dict | None:
    return asdict(reason) if reason is not None else None


def reason_from_wire(raw: dict | None) -> EmptyReason | None:
    return EmptyReason(**raw) if raw else None
