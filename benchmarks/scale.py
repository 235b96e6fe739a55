"""The index policy at scale: 1,000,000 clustered synthetic unit vectors (dim 384) through `VectorIndex.build`.

    python benchmarks/scale.py [--count 1000000] [--dim 384] [--queries 1000]
                               [--results benchmarks/RESULTS.md [--force]]

Synthetic vectors, not image embeddings (embedding a million images does not fit in time on these machines):
2,000 random centres with Gaussian spread, L2-normalised. The index is built by the same code as
`clipsearch index` (`VectorIndex.build`: policy choice, training sample, streamed refine file, nprobe/refine
tuning) from in-memory batches instead of SQLite, saved, and loaded back as a searcher loads it (mapped).
Queries are noisy copies of stored vectors (cosine about 0.6 to them), not stored vectors themselves.

Reported: build time; resident bytes per vector, both by the index's own account (`resident_bytes`: codes,
list ids, id map, centroids) and measured (growth of the process's anonymous RSS across loading and 200
searches; mapped file pages are page cache, reported apart as the file pages touched); latency after a
warm-up pass of 200 queries (the first, cold pass is reported too); recall@10 against exact search; single-query latency
p50/p99 (text encoding excluded) beside FAISS exact flat search and rclip's way (numpy matrix product and a
full argsort). Targets on the 2-core machines: recall@10 >= 0.97, <= 150 resident bytes/vector, p99 <= 5 ms.

RESULTS.md is written only with --results, and refused when the 1-minute load average at the start was above
half the cores, unless --force (the figures are then labelled as taken on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_setup import log, machine_note  # noqa: E402

TARGET_RECALL, TARGET_BYTES, TARGET_P99_MS = 0.97, 150, 5.0


def clustered(n: int, dim: int, seed: int = 0, centres: int = 2_000, chunk: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        part = middle[rng.integers(0, centres, size)] + 0.7 * rng.standard_normal((size, dim)).astype(np.float32)
        out[start:start + size] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return out


def anon_rss(kind: str = "RssAnon") -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) * 1024
    return 0


def percentiles(times: list[float]) -> tuple[float, float]:
    ms = np.asarray(times) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def timed(fn, queries: np.ndarray) -> tuple[list, list[float]]:
    out, times = [], []
    for q in queries:
        started = time.perf_counter()
        out.append(fn(q[None, :]))
        times.append(time.perf_counter() - started)
    return out, times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--budget", default=None, help="memory budget in bytes (default: the policy's, 25%% of RAM)")
    parser.add_argument("--results", type=Path, default=None, help="write a section of this RESULTS.md")
    parser.add_argument("--force", action="store_true", help="write RESULTS.md even when the machine was busy")
    args = parser.parse_args()

    import faiss

    from clipsearch.store.index.vectors import VectorIndex

    at_start = machine_note()
    load_start = os.getloadavg()[0]
    busy = load_start > 0.5 * (os.cpu_count() or 1)
    log(f"machine at start: {at_start}{'  (BUSY)' if busy else ''}")
    log(f"generating {args.count:,} x {args.dim} clustered unit vectors")
    x = clustered(args.count, args.dim)
    ids = np.arange(1, args.count + 1, dtype=np.int64)
    rng = np.random.default_rng(1)
    sample = lambda n: x[np.sort(rng.choice(args.count, n, replace=False))]  # noqa: E731
    batches = ((ids[i:i + 65_536], x[i:i + 65_536]) for i in range(0, args.count, 65_536))
    work = Path(tempfile.mkdtemp(prefix="clipsearch-scale-"))
    log("building (policy, training, streamed refine file, tuning)")
    started = time.perf_counter()
    built = VectorIndex.build(batches, count=args.count, dim=args.dim, model_id="synthetic", generation=1,
                              sample=sample, budget_bytes=int(args.budget) if args.budget else None, workdir=work)
    built.save(work)
    build_s = time.perf_counter() - started
    layout = built.meta.layout
    del built
    log(f"built in {build_s:.1f} s: {layout.factory}, nprobe {layout.nprobe}, refine x{layout.refine_factor}, "
        f"tuned recall {layout.tuned_recall}")

    qrng = np.random.default_rng(2)
    queries = x[qrng.choice(args.count, args.queries, replace=False)] + \
        0.07 * qrng.standard_normal((args.queries, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    before, before_file = anon_rss(), anon_rss("RssFile")
    index = VectorIndex.load(work, mmap=True)
    cold, cold_times = timed(lambda q: index.search(q, 10)[0], queries[:200])  # first touches of mapped pages
    ours, ours_times = timed(lambda q: index.search(q, 10)[0], queries)
    resident_measured = anon_rss() - before
    file_pages = anon_rss("RssFile") - before_file
    own_account = index.resident_bytes()

    log("exact flat search (FAISS IndexFlatIP) for the ground truth and its latency")
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    _, truth = flat.search(queries, 10)
    _, flat_times = timed(lambda q: flat.search(q, 10), queries[:200])
    recall = float(np.mean([len({i for i, _ in hits} & set((t + 1).tolist())) / 10 for hits, t in zip(ours, truth)]))
    flat.reset()  # frees the copy of the vectors
    log("rclip's way: numpy scan + full argsort")
    _, numpy_times = timed(lambda q: np.argsort(-(x @ q[0]))[:10], queries[:50])

    p50, p99 = percentiles(ours_times)
    f50, f99 = percentiles(flat_times)
    n50, n99 = percentiles(numpy_times)
    disk = sum(p.stat().st_size for p in work.iterdir() if p.is_file())
    at_end = machine_note()
    per_vector_own, per_vector_rss = own_account / args.count, resident_measured / args.count
    verdicts = [
        ("recall@10", f"{recall:.3f}", f">= {TARGET_RECALL}", recall >= TARGET_RECALL),
        ("resident bytes/vector (own account)", f"{per_vector_own:.1f}", f"<= {TARGET_BYTES}", per_vector_own <= TARGET_BYTES),
        ("resident bytes/vector (anon RSS growth)", f"{per_vector_rss:.1f}", f"<= {TARGET_BYTES}", per_vector_rss <= TARGET_BYTES),
        ("search p99 ms", f"{p99:.2f}", f"<= {TARGET_P99_MS}", p99 <= TARGET_P99_MS),
    ]
    report = {
        "count": args.count, "dim": args.dim, "data": "clustered synthetic unit vectors (2,000 centres)",
        "factory": layout.factory, "nlist": layout.nlist, "nprobe": layout.nprobe, "refine_factor": layout.refine_factor,
        "tuned_recall": layout.tuned_recall, "reasons": list(layout.reasons), "build_seconds": round(build_s, 1),
        "bytes_on_disk": disk, "resident_bytes_own_account": own_account, "resident_anon_rss_growth": resident_measured,
        "mapped_file_pages_touched": file_pages, "cold_first_200_ms_p50_p99": [round(v, 2) for v in percentiles(cold_times)],
        "recall_at_10": round(recall, 4), "ours_ms_p50_p99": [round(p50, 3), round(p99, 3)],
        "flat_ms_p50_p99": [round(f50, 2), round(f99, 2)], "numpy_sort_ms_p50_p99": [round(n50, 1), round(n99, 1)],
        "machine_at_start": at_start, "machine_at_end": at_end, "busy": busy,
        "verdicts": {name: {"value": value, "target": target, "met": met} for name, value, target, met in verdicts},
    }
    print(json.dumps(report, indent=2))
    for name, value, target, met in verdicts:
        print(f"{'PASS' if met else 'FAIL'}  {name}: {value} (target {target})")
    for child in work.iterdir():
        child.unlink()
    work.rmdir()
    if args.results is not None:
        if busy and not args.force:
            log(f"not writing {args.results}: the machine was busy at the start ({at_start}); rerun when idle, or --force")
            return 3
        from results import write_section

        rows = "\n".join(f"| {name} | {value} | {target} | {'met' if met else 'NOT met'} |" for name, value, target, met in verdicts)
        body = (f"{'**Taken on a busy machine (--force).** ' if busy else ''}{args.count:,} clustered synthetic unit "
                f"vectors, dim {args.dim} (not image embeddings). Policy: `{layout.factory}`, nprobe {layout.nprobe}, "
                f"refine x{layout.refine_factor} (tuned recall {layout.tuned_recall}). Build {build_s:.0f} s; "
                f"{disk / 1e6:,.0f} MB on disk.\n\n| | value | target | |\n|---|---|---|---|\n{rows}\n\n"
                f"| search (1 query, top 10) | p50 ms | p99 ms |\n|---|---|---|\n| clipsearch policy | {p50:.2f} | {p99:.2f} |\n"
                f"| FAISS exact flat | {f50:.1f} | {f99:.1f} |\n| numpy scan + full sort (rclip) | {n50:.0f} | {n99:.0f} |\n\n"
                f"Machine at start: {at_start}; at end: {at_end}.\n")
        write_section(args.results, "Index policy at scale", " ".join(["python"] + sys.argv), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
