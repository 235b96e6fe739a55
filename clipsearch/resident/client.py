"""What `clipsearch search` calls: `ask` the user's helper for the answer, else search in-process and `start`
one for next time. Every failure of the helper (none running, it died, it timed out, it hit a bug) means "answer
in-process": the helper only ever makes a search faster, never different."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from .. import errors
from ..filters import EmptyReason
from ..query import SearchHit, SearchQuery
from . import protocol

CONNECT_SECONDS = 1.0
ACK_SECONDS = 2.0  # a helper acknowledges a request as soon as it has read it: one that does not (stopped, stuck,
# swapped out) is not waited for
ANSWER_SECONDS = 300.0  # the first query of a big collection loads its index in the helper


@dataclass(frozen=True)
class Answer:
    hits: list[SearchHit]
    empty: EmptyReason | None  # why a filtered search found nothing (as Searcher.why_empty)


def eligible(query: SearchQuery, model: str | None) -> bool:
    """Queries the helper answers: the collection's own model, image terms given as files (not bytes)."""
    return model is None and not any(isinstance(t.value, bytes) for t in query.terms)


def ask(collection: str, index_dir: Path | None, query: SearchQuery) -> Answer | None:
    """The helper's answer, a ClipsearchError it raised (re-raised here), or None: search in-process."""
    where = protocol.address()
    if where is None:
        return None
    terms = tuple(t if t.kind != "image" else type(t)(t.kind, os.path.abspath(t.value), t.weight)
                  for t in query.terms)
    request = {"op": "search", "collection": collection,
               "index_dir": os.path.abspath(index_dir) if index_dir is not None else None,
               "query": protocol.query_to_wire(replace(query, terms=terms))}
    reply = _exchange(where, request, ANSWER_SECONDS)
    if reply is None:
        return None
    if reply.get("ok"):
        try:
            return Answer(protocol.hits_from_wire(reply["hits"]), protocol.reason_from_wire(reply.get("empty")))
        except (KeyError, TypeError):
            return None
    error = reply.get("error")
    if isinstance(error, dict):
        kind = getattr(errors, str(error.get("type")), None)
        if isinstance(kind, type) and issubclass(kind, errors.ClipsearchError):
            raise kind(str(error.get("message", "")), error.get("hint"))
    return None  # the helper could not answer (a bug, a crash): the in-process search will


def request(op: str) -> dict | None:
    """Send a bare request ("status", "stop") to this environment's helper; None when none is listening."""
    where = protocol.address()
    return _exchange(where, {"op": op}, 30.0) if where is not None else None


def _exchange(where: protocol.HelperAddress, message: dict, answer_seconds: float) -> dict | None:
    """One request and its reply; None when nothing answers on the socket (or not in time, or not sensibly)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CONNECT_SECONDS)
            sock.connect(str(where.socket_path))
            protocol.send(sock, message)
            sock.settimeout(ACK_SECONDS)
            if protocol.receive(sock) != protocol.ACK:
                return None
            sock.settimeout(answer_seconds)
            return protocol.receive(sock)
    except (OSError, ConnectionError, ValueError):
        return None


def start(collection: str, index_dir: Path | None) -> bool:
    """Start the helper in the background with this collection preloaded, unless helpers are off or one is
    already listening. Returns whether a process was started."""
    where = protocol.address()
    if where is None or _listening(where.socket_path):
        return False
    command = [sys.executable, "-m", "clipsearch.resident.helper", "--socket", str(where.socket_path),
               "--lock", str(where.lock_path), "--idle", str(protocol.idle_seconds()), "--collection", collection]
    if index_dir is not None:
        command += ["--index-dir", os.path.abspath(index_dir)]
    try:
        subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         close_fds=True, start_new_session=True, cwd="/", env=protocol.helper_environment())
    except OSError:
        return False
    return True


def _listening(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CONNECT_SECONDS)
            sock.connect(str(path))
        return True
    except OSError:
        return False
