"""The helper process: `python -m clipsearch.resident.helper --socket S --lock L [--collection C --index-dir D]`.

It holds an exclusive lock on L for its lifetime (a second helper for the same socket exits at once), listens on
S (mode 0600 in a 0700 folder), answers each connection in a thread, and keeps one `Searcher` per collection,
checked before every answer (`Helper.kept`). It exits after --idle seconds without a request, or when S is
removed or replaced.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ClipsearchError
from . import protocol

ACCEPT_POLL_SECONDS = 1.0
MAX_KEPT = 4  # collections kept loaded at once (least recently used dropped)


def _stat_key(path: Path) -> tuple | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


@dataclass
class Kept:
    """A loaded collection and what its files looked like when it was loaded."""

    searcher: object  # clipsearch.search.Searcher
    files: tuple
    lock: threading.Lock
    used_at: float

    @staticmethod
    def fingerprint(searcher) -> tuple:
        """The identity of the database file in use and of the model files loaded (not sizes or times of the
        database: its WAL changes with every cached query; what it holds is followed by the searcher itself
        through the store generation and the rebuild pointer)."""
        from ..store.collection import STORE_FILE, data_folder

        root = searcher.collection.root
        database = data_folder(root) / STORE_FILE
        try:
            info = os.stat(database)
            identity = (info.st_dev, info.st_ino)
        except OSError:
            identity = None
        return identity, Kept.model_files(searcher)

    @staticmethod
    def model_files(searcher) -> tuple:
        """model.json and every file it lists with a checksum (graphs, their external weights `*.onnx.data`, the
        tokenizer, preprocess.json, an ITM head), each where it lives (a file shared with a sibling bundle in that
        sibling's folder): any of them rewritten, even in place with its size kept, makes the helper reload, and the
        reload checks the checksums again."""
        model = searcher.loaded_model
        if model is None:
            return ()
        info = model.info
        return tuple(_stat_key(p) for p in (info.path / "model.json", *(info.file(name) for name in sorted(info.files))))

    def note_model(self, searcher) -> None:
        """Add the files of a model `searcher` loaded since it was opened. The database identity stays the one
        taken when it was opened: taken again now, it could be a new database's (the collection deleted and made
        again meanwhile), and the old searcher would then pass for current."""
        with self.lock:
            if self.searcher is searcher:
                self.files = (self.files[0] if self.files else None, Kept.model_files(searcher))


class Helper:
    def __init__(self, socket_path: Path, idle: float) -> None:
        self.socket_path = socket_path
        self.idle = idle
        self.started = self.last_request = time.monotonic()
        self.stopping = False
        self._kept: dict[tuple[str, str | None], Kept] = {}
        self._kept_lock = threading.Lock()

    # -- collections ----------------------------------------------------------------------------------
    def _open(self, collection: str, index_dir: str | None):
        from ..search import Searcher

        searcher = Searcher.open(collection, index_dir)
        searcher.stale_refresh_seconds = 0.0  # never answer from an index older than SQLite
        return searcher

    def kept(self, collection: str, index_dir: str | None) -> Kept:
        key = (collection, index_dir)
        with self._kept_lock:
            entry = self._kept.get(key)
            if entry is None:
                entry = Kept(searcher=None, files=(), lock=threading.Lock(), used_at=time.monotonic())
                self._kept[key] = entry
                self._drop_least_used()
            entry.used_at = time.monotonic()
        with entry.lock:
            if entry.searcher is not None and Kept.fingerprint(entry.searcher) != entry.files:
                entry.searcher.close()
                entry.searcher = None
            if entry.searcher is None:
                entry.searcher = self._open(collection, index_dir)
                entry.files = Kept.fingerprint(entry.searcher)
        return entry

    def _drop_least_used(self) -> None:
        while len(self._kept) > MAX_KEPT:
            key = min(self._kept, key=lambda k: self._kept[k].used_at)
            entry = self._kept.pop(key)
            if entry.searcher is not None:
                entry.searcher.close()

    def preload(self, collection: str, index_dir: str | None) -> None:
        """Load a collection's index and text model before the first request asks."""
        try:
            entry = self.kept(collection, index_dir)
            searcher = entry.searcher
            searcher.index
            searcher.model.textual.run_prepare()
            searcher.model.tokenizer
            entry.note_model(searcher)  # the model files are known now
        except Exception:  # the first request will say what is wrong, in-process
            pass

    # -- requests -------------------------------------------------------------------------------------
    def answer(self, request: dict) -> dict:
        op = request.get("op")
        if op == "status":
            return {"ok": True, **self.status()}
        if op == "stop":
            self.stopping = True
            return {"ok": True, "pid": os.getpid()}
        if op != "search":
            return {"ok": False, "fallback": f"unknown op {op!r}"}
        try:
            query = protocol.query_from_wire(request["query"])
            entry = self.kept(str(request["collection"]), request.get("index_dir"))
            searcher = entry.searcher
            hits = searcher.search(query)
            entry.note_model(searcher)  # the first search may have loaded the model: its files
            empty = searcher.why_empty(query.filter) if not hits else None
            return {"ok": True, "hits": protocol.hits_to_wire(hits), "empty": protocol.reason_to_wire(empty)}
        except ClipsearchError as exc:
            return {"ok": False, "error": {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}}
        except Exception as exc:  # a bug here must not become the user's error: the client searches in-process
            return {"ok": False, "fallback": f"{type(exc).__name__}: {exc}"[:500]}

    def handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                if not _same_user(conn):
                    return
                conn.settimeout(30.0)
                request = protocol.receive(conn)
                protocol.send(conn, protocol.ACK)  # alive and answering: the client may wait for the answer
                searching = request.get("op") == "search"  # `helper status` is not use: it does not keep it alive
                if searching:
                    self.last_request = time.monotonic()
                reply = self.answer(request)
                if searching:
                    self.last_request = time.monotonic()
                protocol.send(conn, reply)
            except (OSError, ConnectionError, ValueError):
                pass

    def status(self) -> dict:
        with self._kept_lock:
            loaded = [{"collection": c, "index_dir": d} for (c, d), e in self._kept.items() if e.searcher is not None]
        return {"pid": os.getpid(), "uptime_seconds": round(time.monotonic() - self.started, 1),
                "idle_seconds": round(time.monotonic() - self.last_request, 1), "idle_limit_seconds": self.idle,
                "resident_bytes": _resident_bytes(), "collections": loaded}

    # -- the loop -------------------------------------------------------------------------------------
    def serve(self, listener: socket.socket, bound: tuple) -> None:
        listener.settimeout(ACCEPT_POLL_SECONDS)
        while True:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                if self.stopping or time.monotonic() - self.last_request > self.idle:
                    return
                current = _stat_key(self.socket_path)
                if current is None or current[:2] != bound[:2]:
                    return  # removed or replaced: someone else answers now (or nobody should)
                continue
            conn.settimeout(None)
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
            if self.stopping:
                return


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _same_user(conn: socket.socket) -> bool:
    """On Linux, the peer's uid from the kernel (SO_PEERCRED); elsewhere the 0700 folder is the guard."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True
    raw = conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return uid == os.getuid()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipsearch.resident.helper")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--lock", type=Path, required=True)
    parser.add_argument("--idle", type=float, default=protocol.DEFAULT_IDLE_SECONDS)
    parser.add_argument("--collection")
    parser.add_argument("--index-dir")
    args = parser.parse_args(argv)
    os.umask(0o077)
    lock = open(args.lock, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another helper serves this socket
    helper = Helper(args.socket, args.idle)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = None
    try:
        args.socket.unlink(missing_ok=True)  # a dead helper's (a live one would hold the lock)
        listener.bind(str(args.socket))
        os.chmod(args.socket, 0o600)
        bound = _stat_key(args.socket)
        listener.listen(64)
        if args.collection:  # beside the accept loop: requests meanwhile are acknowledged (status, stop) at once
            threading.Thread(target=helper.preload, args=(args.collection, args.index_dir), daemon=True,
                             name="clipsearch-helper-preload").start()
        helper.serve(listener, bound)
    finally:
        listener.close()
        current = _stat_key(args.socket)
        if bound is not None and current is not None and current[:2] == bound[:2]:
            args.socket.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
