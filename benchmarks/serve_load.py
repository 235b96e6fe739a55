"""Load test of the REST API: N concurrent clients on loopback send text searches to `clipsearch serve`
for a fixed time; reports queries/s, p50/p99 latency and the error count (which must be 0).

    python benchmarks/serve_load.py [--clients 1 4 16] [--seconds 30] [--count 10000] [--work-dir DIR]

The server is the real CLI (`clipsearch serve`, uvicorn, one process) over a collection of `--count`
random unit vectors built with a random-init ViT-B-32 bundle (search cost does not depend on what the
vectors mean; the text tower is the real architecture). Clients run in a separate process (asyncio +
httpx, one connection each) so their work is not counted in the server's; both share this machine's
cores. Every client cycles through different queries, so nothing can be answered from a cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import export_clipsearch_bundle, log, machine_note  # noqa: E402
from results import write_section  # noqa: E402
from search_latency import fill_collection  # noqa: E402

TITLE = "REST API load (benchmarks/serve_load.py)"
SUBJECTS = ["dog", "cat", "beach", "mountain", "city street", "birthday cake", "red car", "snow", "forest path",
            "sunset", "bicycle", "old church", "kitchen", "concert", "boat", "bridge", "flowers", "child"]
PLACES = ["at night", "in the rain", "on a sunny day", "from above", "close up", "in winter", "indoors", "by the sea"]


def queries() -> list[str]:
    return [f"a photo of a {subject} {place}" for subject in SUBJECTS for place in PLACES]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def run_clients(url: str, clients: int, seconds: float, k: int) -> dict:
    """`clients` concurrent loops of GET /api/search for `seconds`; latencies of every completed request."""
    import httpx

    texts = queries()
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    async def client(number: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            i = number * 7
            while time.perf_counter() < deadline:
                text = texts[i % len(texts)]
                i += 1
                started = time.perf_counter()
                try:
                    response = await http.get("/api/search", params={"q": text, "k": k})
                    ok = response.status_code == 200 and len(response.json()["results"]) == k
                    if not ok:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                    continue
                latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": len(latencies), "errors": len(errors),
            "error_samples": errors[:5], "qps": round(len(latencies) / elapsed, 2),
            "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
            "p99_ms": round(latencies[max(0, int(len(latencies) * 0.99) - 1)], 1) if latencies else None}


def start_server(index_dir: Path, collection: str, port: int, home: Path) -> subprocess.Popen:
    env = {**os.environ, "CLIPSEARCH_HOME": str(home)}
    env.pop("CLIPSEARCH_API_KEY", None)
    command = [sys.executable, "-m", "clipsearch", "serve", "--port", str(port), "--collection", collection,
               "--index-dir", str(index_dir), "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"clipsearch serve exited:\n{process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.terminate()
    raise SystemExit("clipsearch serve did not start within 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--count", type=int, default=10_000, help="indexed vectors")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "clipsearch-serve-load")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    bundle = export_clipsearch_bundle(args.arch, work / "bundles" / f"{args.arch.lower()}-random", f"{args.arch}-random")
    index_dir = work / "collections"
    name = f"load{args.count}"
    log(f"filling collection {name} with {args.count} random vectors")
    index_kind = fill_collection(index_dir, name, bundle, args.count)

    port = free_port()
    log(f"starting clipsearch serve on 127.0.0.1:{port}")
    server = start_server(index_dir, name, port, work / "home")
    rows = []
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(run_clients(url, 2, 3.0, args.k))  # warm-up, not reported
        for clients in args.clients:
            log(f"{clients} client(s) for {args.seconds:.0f} s")
            row = asyncio.run(run_clients(url, clients, args.seconds, args.k))
            log(json.dumps(row))
            rows.append(row)
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(json.dumps(rows, indent=2))
    total_errors = sum(r["errors"] for r in rows)
    body = (f"`clipsearch serve` (uvicorn, 1 process, 127.0.0.1) over {args.count:,} vectors ({index_kind} index), "
            f"random-init {args.arch} text tower; `GET /api/search?q=...&k={args.k}` with {len(queries())} distinct "
            f"queries; clients in a separate process (asyncio + httpx, keep-alive). {machine_note()} at the end; the "
            "clients share the cores with the server.\n\n"
            "| concurrent clients | seconds | requests | QPS | p50 latency (ms) | p99 latency (ms) | errors |\n"
            "|---:|---:|---:|---:|---:|---:|---:|\n")
    for r in rows:
        body += (f"| {r['clients']} | {r['seconds']:.0f} | {r['requests']} | {r['qps']:.1f} | {r['p50_ms']} | "
                 f"{r['p99_ms']} | {r['errors']} |\n")
    body += f"\nErrors in total: {total_errors} (must be 0).\n"
    if not args.no_write:
        command = "python benchmarks/serve_load.py " + " ".join(
            [f"--clients {' '.join(map(str, args.clients))}", f"--seconds {args.seconds:g}", f"--count {args.count}"])
        write_section(args.out, TITLE, command, body)
        log(f"wrote the section '{TITLE}' in {args.out}")
    if total_errors:
        raise SystemExit(f"{total_errors} requests failed: {rows}")


if __name__ == "__main__":
    main()
