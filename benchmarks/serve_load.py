"""Load test of the REST API: N concurrent clients on loopback send text searches to `clipsearch serve`, every
query text new (never repeated in the run, and the collection's query cache is emptied first: it answers none),
for a fixed time, `--rounds` times; reports queries/s, p50/p99 latency, errors and the CPU the server and the
load generator spent per query, then does it again while `clipsearch index` writes a folder of generated photos
into the same collection. The verdict takes the median QPS and the median p99 of the rounds.

    python benchmarks/serve_load.py [--clients 30] [--seconds 30] [--rounds 3] [--count 10000] [--precision int8]
                                    [--force]

The server is the real CLI (`clipsearch serve`, uvicorn, one process) over a collection of `--count` random unit
vectors built with a random-init ViT-B-32 bundle (`--precision`, int8 by default; search cost does not depend
on what the vectors mean, and the text tower is the real architecture). Clients run in a separate process
(asyncio streams, one keep-alive HTTP/1.1 connection each) and share the cores with the server, as does the indexing run.

Verdicts against issue 12's targets: 0 errors, >= 250 QPS and p99 <= 150 ms at 10k vectors with 30 clients.
Beside them, the encoder's own bound: CPU time per query of the text graph alone at batch 32 (the most the
cores could answer if they did nothing else). Load averages are recorded at the start and the end; RESULTS.md
is not written when the 1-minute load at the start is above 0.5 per core (another job would be measured too)
unless --force, which labels the figures as taken on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import export_clipsearch_bundle, log  # noqa: E402
from results import MachineLoad, write_section  # noqa: E402
from search_latency import fill_collection  # noqa: E402

TITLE = "REST API load (benchmarks/serve_load.py)"
TARGET_QPS = 250.0
TARGET_P99_MS = 150.0
SUBJECTS = ["dog", "cat", "beach", "mountain", "city street", "birthday cake", "red car", "snow", "forest path",
            "sunset", "bicycle", "old church", "kitchen", "concert", "boat", "bridge", "flower field", "child"]
PLACES = ["at night", "in the rain", "on a sunny day", "from above", "close up", "in winter", "indoors", "by the sea"]
WORDS = ["amber", "brisk", "cobalt", "dusty", "eager", "faded", "gentle", "hazy", "ivory", "jolly", "lush", "misty",
         "noisy", "olive", "pale", "quiet", "rusty", "silver", "tidy", "vivid", "windy", "young", "zesty", "bold"]


class QueryTexts:
    """Never-repeated query texts of a photo search's usual length: "a {word} {word} photo of a {subject}
    {place}", walked through all 82,944 combinations in a scrambled order from a random start, so no text
    comes back within a run (the run clears the collection's query cache first, so none from an earlier run
    is answered from it either). `tagged=True` gives the longer texts of earlier runs of this benchmark: the
    same words plus a random tag and a counter (about 20 tokens instead of 12)."""

    SPACE = len(WORDS) * len(WORDS) * len(SUBJECTS) * len(PLACES)
    STRIDE = 7_919  # a prime not dividing SPACE: n -> n * STRIDE mod SPACE visits every combination once

    def __init__(self, tag: str | None = None, tagged: bool = False) -> None:
        self.tag = tag or uuid.uuid4().hex[:6]
        self.tagged = tagged
        self._start = int(self.tag, 16) % self.SPACE if all(c in "0123456789abcdef" for c in self.tag) else 0
        self._counter = itertools.count()

    def next(self) -> str:
        n = next(self._counter)
        if n >= self.SPACE:
            raise RuntimeError(f"all {self.SPACE} query texts were used")
        m = (self._start + n * self.STRIDE) % self.SPACE
        m, subject = divmod(m, len(SUBJECTS))
        m, place = divmod(m, len(PLACES))
        first, second = divmod(m, len(WORDS))
        text = f"a {WORDS[first]} {WORDS[second]} photo of a {SUBJECTS[subject]} {PLACES[place]}"
        return f"{text} {self.tag}{n}" if self.tagged else text


@dataclass(frozen=True)
class LoadRow:
    label: str
    clients: int
    seconds: float
    requests: int
    errors: int
    error_samples: list[str]
    qps: float
    p50_ms: float | None
    p99_ms: float | None
    server_cpu_ms: float | None = None  # server process CPU per answered query
    client_cpu_ms: float | None = None  # load generator CPU per answered query
    note: str = ""


def clear_query_cache(index_dir: Path, name: str) -> int:
    """Empty the collection's query cache (texts embedded by earlier runs); returns how many it held."""
    from clipsearch.store.collection import Collection

    collection = Collection.open(name, index_dir)
    try:
        with collection.store.conn:
            return collection.store.conn.execute("DELETE FROM text_cache").rowcount
    finally:
        collection.close()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))], 1)


async def http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                   target: str) -> tuple[int, bytes]:
    """One GET on a kept-alive HTTP/1.1 connection: (status, body). The load generator is this small on
    purpose: it shares the 2 cores with the server (httpx, used before, spent 2.2 CPU ms per request in one run of
    this benchmark; this client's share is the "client CPU/query" column of RESULTS.md)."""
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = next((int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:")),
                  None)
    if length is None:
        raise ValueError(f"no Content-Length in the answer ({lines[0]})")
    return status, await reader.readexactly(length)


async def run_clients(url: str, clients: int, seconds: float, k: int, texts: QueryTexts, label: str,
                      server_pid: int | None = None) -> LoadRow:
    """`clients` concurrent loops of GET /api/search for `seconds`, each query new; latencies of completed ones,
    and the CPU time the server (`server_pid`) and this process spent per answered query."""
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds
    parts = urlsplit(url)

    async def client() -> None:
        connection = None
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                if connection is None:
                    connection = await asyncio.open_connection(parts.hostname, parts.port)
                status, body = await http_get(*connection, parts.netloc,
                                              "/api/search?" + urlencode({"q": texts.next(), "k": k}))
                if status != 200 or len(json.loads(body)["results"]) != k:
                    errors.append(f"{status}: {body[:200]!r}")
                    continue
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                errors.append(repr(exc))
                if connection is not None:
                    connection[1].close()
                connection = None
                continue
            latencies.append((time.perf_counter() - started) * 1000)
        if connection is not None:
            connection[1].close()

    started = time.perf_counter()
    cpu_started = time.process_time()
    server_started = process_cpu_seconds(server_pid) if server_pid else None
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    answered = max(1, len(latencies))
    client_cpu = round((time.process_time() - cpu_started) * 1000 / answered, 2)
    server_cpu = (round((process_cpu_seconds(server_pid) - server_started) * 1000 / answered, 2)
                  if server_pid else None)
    latencies.sort()
    return LoadRow(label=label, clients=clients, seconds=round(elapsed, 2), requests=len(latencies),
                   errors=len(errors), error_samples=errors[:5], qps=round(len(latencies) / elapsed, 1),
                   p50_ms=round(statistics.median(latencies), 1) if latencies else None,
                   p99_ms=percentile(latencies, 0.99), server_cpu_ms=server_cpu, client_cpu_ms=client_cpu)


def mean_tokens(bundle: Path, texts: QueryTexts, count: int = 512) -> float:
    """Mean tokens per query text (start and end tokens included), over texts the run then skips."""
    from clipsearch.model.bundle import read_bundle
    from clipsearch.model.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.from_bundle(read_bundle(bundle))
    return float(np.mean(tokenizer([texts.next() for _ in range(count)]).lengths))


def median_row(rows: list[LoadRow], label: str) -> LoadRow:
    """A row holding the median QPS and the median p99 of `rows` (what the verdict judges)."""
    p99s = [r.p99_ms for r in rows if r.p99_ms is not None]
    return LoadRow(label=label, clients=rows[0].clients, seconds=sum(r.seconds for r in rows),
                   requests=sum(r.requests for r in rows), errors=sum(r.errors for r in rows), error_samples=[],
                   qps=statistics.median(r.qps for r in rows), p50_ms=statistics.median(r.p50_ms or 0 for r in rows),
                   p99_ms=statistics.median(p99s) if p99s else None)


def encoder_bound(bundle: Path, texts: QueryTexts, batch: int = 32, batches: int = 4) -> float:
    """CPU milliseconds per query of the text graph alone (1 thread, batches of `batch` new queries)."""
    from clipsearch.model.runtime import ClipModel

    model = ClipModel(bundle, threads=1)
    model.encode_text([texts.next() for _ in range(batch)])  # session start and first-call costs
    started = time.process_time()
    for _ in range(batches):
        model.encode_text([texts.next() for _ in range(batch)])
    return (time.process_time() - started) * 1000 / (batch * batches)


def generated_photos(folder: Path, count: int) -> Path:
    """`count` 640x480 JPEGs of random colour blocks (distinct content, cheap to decode)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"gen_{i:05d}.jpg"
        if not path.exists():
            cells = np.random.default_rng(i).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
            Image.fromarray(cells).resize((640, 480), Image.Resampling.BILINEAR).save(path, quality=85)
    return folder


def start_server(index_dir: Path, collection: str, port: int, home: Path, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "CLIPSEARCH_HOME": str(home)}
    env.pop("CLIPSEARCH_API_KEY", None)
    command = [sys.executable, "-m", "clipsearch", "serve", "--port", str(port), "--collection", collection,
               "--index-dir", str(index_dir), "--log-level", "warning", *extra]
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


def start_indexing(folder: Path, index_dir: Path, collection: str, bundle: Path, home: Path) -> subprocess.Popen:
    env = {**os.environ, "CLIPSEARCH_HOME": str(home)}
    command = [sys.executable, "-m", "clipsearch", "index", str(folder), "--collection", collection,
               "--index-dir", str(index_dir), "--model", str(bundle)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def verdicts(row: LoadRow) -> list[str]:
    qps_ok = row.qps >= TARGET_QPS
    p99_ok = row.p99_ms is not None and row.p99_ms <= TARGET_P99_MS
    return [f"QPS {row.qps:.1f} {'>=' if qps_ok else '<'} {TARGET_QPS:.0f}: {'PASS' if qps_ok else 'FAIL'}",
            f"p99 {row.p99_ms} ms {'<=' if p99_ok else '>'} {TARGET_P99_MS:.0f} ms: {'PASS' if p99_ok else 'FAIL'}",
            f"errors {row.errors} {'==' if not row.errors else '!='} 0: {'PASS' if not row.errors else 'FAIL'}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--count", type=int, default=10_000, help="indexed vectors")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--precision", default="int8", choices=("fp32", "fp16", "int8"))
    parser.add_argument("--bundle", type=Path, help="use this bundle instead of exporting --arch/--precision")
    parser.add_argument("--index-images", type=int, default=2000,
                        help="generated photos the concurrent indexing run writes (0: skip that row)")
    parser.add_argument("--serve-option", action="append", default=[],
                        help="passed to clipsearch serve, e.g. --serve-option=--batch-window-ms=1 (repeatable)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="search-only windows in a row; the verdict takes their median QPS and median p99")
    parser.add_argument("--tagged-queries", action="store_true",
                        help="the longer query texts of earlier runs (a random tag and a counter appended: ~20 tokens)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "clipsearch-serve-load")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--force", action="store_true",
                        help="write RESULTS.md even when the 1-minute load is above 0.5 per core at the start "
                             "(the figures are labelled as taken on a busy machine)")
    args = parser.parse_args()

    load = MachineLoad()
    if not args.no_write:
        load.label_for_results(args.force, args.out)  # refuses a busy machine now, not after minutes of work
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or export_clipsearch_bundle(args.arch, work / "bundles" / f"{args.arch.lower()}-random-"
                                                     f"{args.precision}", f"{args.arch}-random-{args.precision}",
                                                     precision=args.precision)
    index_dir = work / "collections"
    name = f"load{args.count}"
    log(f"filling collection {name} with {args.count} random vectors")
    index_kind = fill_collection(index_dir, name, bundle, args.count)
    cleared = clear_query_cache(index_dir, name)
    log(f"cleared {cleared} cached query texts of earlier runs")
    texts = QueryTexts(tagged=args.tagged_queries)
    tokens = mean_tokens(bundle, texts)
    bound_ms = encoder_bound(bundle, texts)
    log(f"text encoder alone: {bound_ms:.2f} CPU ms per query at batch 32")
    photos = generated_photos(work / f"photos-{args.index_images}", args.index_images) if args.index_images else None

    port = free_port()
    log(f"starting clipsearch serve on 127.0.0.1:{port}")
    server = start_server(index_dir, name, port, work / "home", args.serve_option)
    rows: list[LoadRow] = []
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(run_clients(url, 2, 3.0, args.k, texts, "warm-up"))  # not reported
        for round_no in range(1, args.rounds + 1):
            log(f"{args.clients} clients for {args.seconds:.0f} s (round {round_no} of {args.rounds})")
            label = "search only" + (f", round {round_no}" if args.rounds > 1 else "")
            rows.append(asyncio.run(run_clients(url, args.clients, args.seconds, args.k, texts, label, server.pid)))
            log(json.dumps(asdict(rows[-1])))
        if photos is not None:
            log(f"{args.clients} clients for {args.seconds:.0f} s while `clipsearch index` writes {args.index_images} "
                "photos into the collection")
            indexer = start_indexing(photos, index_dir, name, bundle, work / "home")
            try:
                started = time.monotonic()
                row = asyncio.run(run_clients(url, args.clients, args.seconds, args.k, texts,
                                              "while an indexing run writes", server.pid))
                finished = indexer.poll() is not None
                note = (f"the indexing run ended {time.monotonic() - started:.0f} s into the window "
                        f"(exit {indexer.returncode})" if finished else "the indexing run was still writing at the end")
                rows.append(LoadRow(**{**asdict(row), "note": note}))
            finally:
                if indexer.poll() is None:
                    indexer.terminate()
                indexer.wait(timeout=60)
            log(json.dumps(asdict(rows[-1])))
    finally:
        server.terminate()
        server.wait(timeout=30)
    load.finish()

    print(json.dumps([asdict(r) for r in rows], indent=2))
    cores = os.cpu_count() or 1
    searches = [r for r in rows if r.label.startswith("search only")]
    judged = [median_row(searches, f"search only, median of {len(searches)}")] if len(searches) > 1 else searches
    judged += [r for r in rows if not r.label.startswith("search only")]
    print(f"text encoder alone: {bound_ms:.2f} CPU ms per new query at batch 32 -> at most "
          f"{cores * 1000 / bound_ms:.0f} QPS on {cores} cores doing nothing else")
    for row in judged:
        print(f"verdict ({row.label}): " + "; ".join(verdicts(row)))
    print(f"machine: {load.note()}" + ("  [BUSY: figures taken under load]" if load.busy else ""))

    query_form = ("a random tag and a counter appended to each" if args.tagged_queries
                  else '"a {word} {word} photo of a {subject} {place}", never repeated')
    body = (f"`clipsearch serve` (uvicorn, 1 process, 127.0.0.1, {' '.join(args.serve_option) or 'defaults'}) "
            f"over {args.count:,} vectors ({index_kind} index), random-init {args.arch} {args.precision} text tower; "
            f"{args.clients} clients sending `GET /api/search?q=...&k={args.k}`, every query text new ({query_form}; "
            f"{tokens:.1f} tokens on average; the query cache, emptied first, answers none); clients in a separate "
            "process (asyncio streams, one keep-alive HTTP/1.1 connection each) on the same cores. CPU columns: "
            "CPU time of the server process and of the load generator per answered query. "
            f"{load.label_for_results(True, args.out)}\n\n"
            "| load | clients | seconds | requests | QPS | p50 (ms) | p99 (ms) | errors | server CPU/query (ms) "
            "| client CPU/query (ms) | note |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    for r in rows:
        body += (f"| {r.label} | {r.clients} | {r.seconds:.0f} | {r.requests} | {r.qps:.1f} | {r.p50_ms} | {r.p99_ms} "
                 f"| {r.errors} | {r.server_cpu_ms} | {r.client_cpu_ms} | {r.note} |\n")
    body += (f"\nText encoder alone: {bound_ms:.2f} CPU ms per new query at batch 32, so at most "
             f"{cores * 1000 / bound_ms:.0f} QPS on {cores} cores doing nothing else.\n\n")
    body += "".join(f"Verdict ({r.label}): " + "; ".join(verdicts(r)) + ".  \n" for r in judged)
    if not args.no_write:
        command = (f"python benchmarks/serve_load.py --clients {args.clients} --seconds {args.seconds:g} "
                   f"--count {args.count} --precision {args.precision} --index-images {args.index_images} "
                   f"--rounds {args.rounds}" + (" --tagged-queries" if args.tagged_queries else "")
                   + (" --force" if args.force else ""))
        write_section(args.out, TITLE, command, body)
        log(f"wrote the section '{TITLE}' in {args.out}")
    total_errors = sum(r.errors for r in rows)
    if total_errors:
        raise SystemExit(f"{total_errors} requests failed: {[r.error_samples for r in rows]}")


if __name__ == "__main__":
    main()
