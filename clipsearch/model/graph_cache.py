"""A per-user cache of onnxruntime's optimised graphs (ORT format), so a session opens without re-optimising.

Opening `textual.onnx` costs onnxruntime its graph optimisation every time (fusions, constant folding,
layout changes): for a one-shot `clipsearch search` that is a large share of the wall time. The first
session that opens a graph also saves the optimised result as an `.ort` file; later sessions load that file
and skip the optimiser. The key binds everything the saved graph depends on: the graph's sha256 from
model.json (or its path), the size and mtime of the graph and its external weights, the optimisation level,
the onnxruntime version and the CPU (level "all" may insert CPU-specific kernels). Only CPU-only sessions
are cached. Any failure (no space, a graph too large for the ORT format, an onnxruntime that refuses the file)
falls back to the plain graph: the cache only ever makes opening faster. `CLIPSEARCH_GRAPH_CACHE=0` turns it off.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..paths import graph_cache_dir


@dataclass(frozen=True)
class CachedGraph:
    """Where the optimised copy of one graph lives (it may not exist yet)."""

    path: Path
    source: Path

    @property
    def ready(self) -> bool:
        return self.path.is_file()

    def temp_path(self) -> Path:
        return self.path.with_name(f"{self.path.stem}.{os.getpid()}.{id(self)}.tmp.ort")

    def publish(self, temp: Path) -> None:
        """Move a freshly written copy into place and drop older copies of the same graph file."""
        try:
            if not temp.is_file():
                return
            os.replace(temp, self.path)
            prefix = self.path.name.split("-", 1)[0] + "-"
            for other in self.path.parent.glob(prefix + "*.ort"):
                if other != self.path and ".tmp." not in other.name:
                    other.unlink(missing_ok=True)
        except OSError:  # a full disk or a read-only cache: the session works without the copy
            pass


def enabled() -> bool:
    return os.environ.get("CLIPSEARCH_GRAPH_CACHE", "1").strip().lower() not in ("0", "no", "false", "off")


def cached_graph(source: Path, sha256: str | None, level: str) -> CachedGraph | None:
    """The cache entry for `source` optimised at `level`, or None when caching is off or impossible."""
    if not enabled():
        return None
    try:
        import onnxruntime as ort

        stats = [source.stat()]
        data = source.with_name(source.name + ".data")
        if data.exists():
            stats.append(data.stat())
        folder = graph_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    place = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    facts = [sha256 or "", level, ort.__version__, _cpu_fingerprint()]
    facts += [f"{s.st_size}:{s.st_mtime_ns}" for s in stats]
    key = hashlib.sha256("|".join(facts).encode()).hexdigest()[:24]
    return CachedGraph(path=folder / f"{place}-{key}.ort", source=source)


@lru_cache(maxsize=1)
def _cpu_fingerprint() -> str:
    """The machine type and, on Linux, the CPU's feature flags (an optimised graph may use AVX-512 kernels)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()}|{platform.processor()}|{flags}".encode()).hexdigest()[:16]
