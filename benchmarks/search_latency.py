"""Wall time of `clipsearch search "a dog"` from the shell over 10k and 100k indexed vectors, beside
`rclip -n "a dog"` (real rclip 3.3.0, offline, random-init ViT-B-32-256) over the same count.

The collections are filled with random unit vectors (search cost does not depend on what the vectors
mean); both tools load the same architecture's text tower. Each figure is the median of --repeats runs
after one warm-up run (page cache warm, as for a user who searches twice).

clipsearch is measured two ways, in separate rows:
- "one process": CLIPSEARCH_HELPER=0, every command imports numpy/onnxruntime/FAISS and opens the model and index;
- "resident helper": the helper the first search starts (clipsearch/resident) answers; the command is an
  interpreter start, the CLI's imports and one round trip.
Commands run with bytecode caching on (as after `pip install`, which compiles .pyc files), whatever
PYTHONDONTWRITEBYTECODE says in the calling shell. A breakdown of the one-process path (imports, session open,
tokenizer, index load, search) is measured in a child process.

    python benchmarks/search_latency.py [--counts 10000 100000] [--work-dir DIR] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_setup import (export_clipsearch_bundle, export_emoji_mini_standin, export_int8_bundle,  # noqa: E402
                         export_rclip_models, log, machine_note, rclip_env, rclip_venv, without_bytecode_veto)

CLIPSEARCH = [sys.executable, "-c", "from clipsearch.cli import main; main()"]


def random_units(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill_collection(index_dir: Path, name: str, bundle: Path, count: int) -> str:
    from clipsearch.model.bundle import read_bundle
    from clipsearch.store.collection import Collection
    from clipsearch.store.database import NewImage

    info = read_bundle(bundle)
    collection = Collection.create(name, index_dir)
    if collection.store.count() == count and collection.vectors_fresh():
        return collection.stats().index_kind or ""
    collection.bind_model(info, rebuild=True)
    run_id = collection.store.next_run_id()
    for start in range(0, count, 5000):
        n = min(5000, count - start)
        vectors = random_units(n, info.embed_dim, start)
        rows = [NewImage(path=f"/photos/IMG_{start + i:06d}.jpg", size=3_000_000, mtime_ns=0,
                         content_hash=f"{start + i:032x}", width=4032, height=3024, taken_at=None, vector=vectors[i])
                for i in range(n)]
        collection.store.write_images(rows, info.model_id, run_id, "2024-01-01T00:00:00")
    started = time.perf_counter()
    collection.sync_vectors()
    log(f"  built the {count} index in {time.perf_counter() - started:.1f} s")
    kind = collection.stats().index_kind or ""
    collection.close()
    return kind


def fill_rclip(exe: Path, datadir: Path, folder: Path, count: int) -> None:
    """Let rclip create its database on one real image, then add count-1 rows with random vectors."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    db_path = datadir / "db.sqlite3"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "seed.jpg")
    if db_path.exists():
        with sqlite3.connect(db_path) as con:
            if con.execute("SELECT count(*) FROM images").fetchone()[0] == count:
                return
        db_path.unlink()
    subprocess.run([str(exe), "-f", "-t", "1", "a dog"], cwd=folder, env=rclip_env(datadir), check=True,
                   capture_output=True)
    vectors = random_units(count - 1, 512, 7)
    with sqlite3.connect(db_path) as con:
        con.executemany(
            "INSERT INTO images(deleted, indexing, filepath, modified_at, size, vector, hash) VALUES (NULL, NULL, ?, ?, ?, ?, ?)",
            [(str(folder / f"IMG_{i:06d}.jpg"), 1_700_000_000.0, 3_000_000, vectors[i].tobytes(), f"{i:032x}")
             for i in range(count - 1)])
        con.commit()


def time_command(command: list[str], repeats: int, cwd: Path | None = None, env: dict | None = None) -> dict:
    subprocess.run(command, cwd=cwd, env=env, capture_output=True, check=True)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise SystemExit(f"{command} failed:\n{result.stderr[-2000:]}")
    return {"median_seconds": statistics.median(times), "min_seconds": min(times), "runs": len(times)}


def time_cold(base: list[str], repeats: int, env: dict) -> dict:
    """Each run searches a text never searched before ("a dog 1", "a dog 2", ...): the text model is loaded and run."""
    subprocess.run([*base, f"a dog warm-up {time.time()}"], env=env, capture_output=True, check=True)  # page cache
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        result = subprocess.run([*base, f"a dog {time.time_ns()} {i}"], env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise SystemExit(f"search failed:\n{result.stderr[-2000:]}")
    return {"median_seconds": statistics.median(times), "min_seconds": min(times), "runs": len(times)}


def start_helper(base: list[str], env: dict) -> None:
    """One search that starts the helper (this collection preloaded), then wait until it listens."""
    subprocess.run([*base, "a dog start"], env=env, capture_output=True, check=True)
    probe = ("import sys, time\nfrom clipsearch.resident import client, protocol\n"
             "where = protocol.address()\nend = time.monotonic() + 120\n"
             "while time.monotonic() < end and not client._listening(where.socket_path): time.sleep(0.1)\n"
             "sys.exit(0 if client._listening(where.socket_path) else 1)")
    subprocess.run([sys.executable, "-c", probe], env=env, check=True)
    subprocess.run([*base, "a dog preload"], env=env, capture_output=True, check=True)  # index + model loaded


def stop_helpers(run_dir: Path) -> None:
    """Remove the helpers' sockets (each exits within a second) and their folder."""
    import shutil

    for sock in run_dir.glob("clipsearch/*.sock"):
        sock.unlink(missing_ok=True)
    time.sleep(2)
    shutil.rmtree(run_dir, ignore_errors=True)


BREAKDOWN_SCRIPT = r"""
import json, sys, time
marks = []
t0 = time.perf_counter()
def mark(what):
    global t0
    now = time.perf_counter(); marks.append((what, (now - t0) * 1000)); t0 = now
import numpy; mark("import numpy")
import onnxruntime; mark("import onnxruntime")
import faiss; mark("import faiss")
import tokenizers; mark("import tokenizers")
import typer; mark("import typer")
import clipsearch.cli; mark("import clipsearch.cli (registers every command)")
from clipsearch.search import Searcher, SearchQuery; mark("import clipsearch.search (store, FAISS wrapper)")
import os
from clipsearch.model.runtime import ClipModel
name, index_dir = sys.argv[1], sys.argv[2]
searcher = Searcher.open(name, index_dir); mark("open the collection (SQLite)")
searcher.index; mark("load the FAISS index")
model = searcher.model; mark("read the bundle")
model.tokenizer; mark("load the tokenizer")
model.textual.run_prepare(); mark("open the text session (graph optimisation included)")
vector = model.encode_text([f"a dog {time.time_ns()}"]); mark("encode one text")
hits = searcher.search_vector(vector[0], 10); mark("FAISS search + SQLite join")
print(json.dumps(marks))
"""


def breakdown(name: str, index_dir: Path, env: dict) -> list[dict]:
    """Where the one-process path's time goes, each step timed in a fresh process (median of 5)."""
    rows: dict[str, list[float]] = {}
    command = [sys.executable, "-c", BREAKDOWN_SCRIPT, name, str(index_dir)]
    subprocess.run(command, env=env, capture_output=True, check=True)  # warm-up
    for _ in range(5):
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        for step, ms in json.loads(out.strip().splitlines()[-1]):
            rows.setdefault(step, []).append(ms)
    return [{"step": step, "median_ms": statistics.median(values)} for step, values in rows.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "clipsearch-bench")
    parser.add_argument("--skip-rclip", action="store_true")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--results", type=Path, help="write the section of this RESULTS.md (e.g. benchmarks/RESULTS.md)")
    parser.add_argument("--render", type=Path, help="only write the RESULTS.md section from the --json-out of an earlier run")
    parser.add_argument("--force", action="store_true", help="write RESULTS.md even when the machine was busy (labelled)")
    args = parser.parse_args()
    if args.render:
        report = json.loads(args.render.read_text())
        write_results(args, report)
        return
    from results import MachineLoad

    load = MachineLoad()
    if args.results:
        load.label_for_results(args.force, args.results)  # a busy machine is refused now, not after minutes of work

    work = args.work_dir
    bundle = export_clipsearch_bundle("ViT-B-32-256", work / "bundles" / "vit-b-32-256-random", "ViT-B-32-256-random")
    int8 = export_int8_bundle("ViT-B-32-256", work / "bundles" / "vit-b-32-256-random-int8", "ViT-B-32-256-random-int8")
    index_dir = work / "latency-collections"
    report: dict = {"machine": machine_note(), "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "rows": [], "counts": args.counts, "repeats": args.repeats, "breakdown": []}
    exe = datadir = None
    if not args.skip_rclip:
        exe = rclip_venv(work)
        datadir = export_rclip_models(work / "rclip-data-latency", bundle)
    models = [("ViT-B-32-256", bundle), ("ViT-B-32-256 int8", int8)]
    from clipsearch.errors import ClipsearchError
    from clipsearch.model.resolve import DEFAULT_MODEL, resolve_model

    try:
        models.append((f"{DEFAULT_MODEL} (product default)", resolve_model(DEFAULT_MODEL).path))
    except ClipsearchError:
        models.append((f"{DEFAULT_MODEL} arch, random-init stand-in",
                       export_emoji_mini_standin(work / "bundles" / "emoji-mini-arch-random")))
    run_dir = Path(tempfile.mkdtemp(prefix="cs-bench-run-"))  # the helpers' private socket folder, removed at the end
    base_env = without_bytecode_veto(dict(os.environ))
    base_env.update({"CLIPSEARCH_HOME": str(work / "home"), "XDG_RUNTIME_DIR": str(run_dir)})
    floor = time_command([sys.executable, "-c", "pass"], args.repeats)
    report["rows"].append({"system": "python -c pass (process start floor)", "model": "-", "vectors": 0, "index": "-",
                           "query": "-", **floor, "command": "python -c pass"})
    try:
        for count in args.counts:
            for model_label, model_bundle in models:
                name = f"lat-{count}-{Path(model_bundle).name}"
                log(f"clipsearch collection of {count} vectors, {model_label}")
                kind = fill_collection(index_dir, name, Path(model_bundle), count)
                base = [*CLIPSEARCH, "search", "--collection", name, "--index-dir", str(index_dir)]
                for way, helper in (("one process", "0"), ("resident helper", "1")):
                    env = {**base_env, "CLIPSEARCH_HELPER": helper}
                    if helper == "1":
                        start_helper(base, env)
                    cold = time_cold(base, args.repeats, env)
                    cached = time_command([*base, "a dog"], args.repeats, env=env)
                    for query, figures in (("cold", cold), ("cached", cached)):
                        text = '"a dog <n>"' if query == "cold" else '"a dog"'
                        report["rows"].append({"system": f"clipsearch, {way}", "model": model_label, "vectors": count,
                                               "index": kind, "query": query, **figures,
                                               "command": f"CLIPSEARCH_HELPER={helper} clipsearch search {text} "
                                                          f"--collection {name} --index-dir DIR"})
                    log(f"  {way}: cold {cold['median_seconds']:.3f} s, cached {cached['median_seconds']:.3f} s ({kind})")
                if count == max(args.counts) and model_label.startswith(DEFAULT_MODEL):
                    report["breakdown"] = breakdown(name, index_dir, {**base_env, "CLIPSEARCH_HELPER": "0"})
            if exe is not None:
                folder = work / f"rclip-latency-{count}"
                fill_rclip(exe, datadir, folder, count)
                theirs = time_command([str(exe), "-n", "a dog"], args.repeats, cwd=folder, env=rclip_env(datadir))
                report["rows"].append({"system": "rclip 3.3.0", "model": "ViT-B-32-256", "vectors": count, **theirs,
                                       "command": 'cd DIR && rclip -n "a dog"'})
                log(f"  rclip {theirs['median_seconds']:.3f} s")
    finally:
        stop_helpers(run_dir)
    report["machine_at_end"] = machine_note()
    load.finish()
    report["machine_label"] = load.label_for_results(True, args.results) if load.busy else f"Machine: {load.note()}."
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    write_results(args, report)


def write_results(args, report: dict) -> None:
    if not args.results:
        return
    from results import write_section

    counts = report.get("counts", args.counts)
    repeats = report.get("repeats", args.repeats)
    command = f"python benchmarks/search_latency.py --counts {' '.join(map(str, counts))} --repeats {repeats} --results benchmarks/RESULTS.md"
    body = markdown(report) + ("\n" + report["machine_label"] if "machine_label" in report else "")
    write_section(args.results, "Search latency from the shell (benchmarks/search_latency.py)", command, body)


def markdown(report: dict) -> str:
    lines = [
        "Wall time of one search command started from the shell (process start to exit), median of the runs after a "
        "warm-up run. Collections hold random unit vectors; both tools use the same random-init ViT-B-32-256 text "
        "graph (also shown: the same model with clipsearch's int8 recipe, and the product default model, whose text "
        "tower is MiniLM). `cold` = the query text was never seen (text model run); `cached` = the same query again "
        "(clipsearch answers repeated texts from its query cache without loading the text model; rclip has no such "
        "cache). `one process` = CLIPSEARCH_HELPER=0 (the command loads everything itself); `resident helper` = "
        "answered by the helper an earlier search started. Bytecode caching on, as after `pip install`. "
        + (f"Run started {report['started_at']}. " if report.get("started_at") else "")
        + f"Machine: {report['machine']} at the start"
        + (f", {report['machine_at_end'].split(', ', 1)[-1]} at the end." if report.get("machine_at_end") else "."),
        "", "| system | model | vectors | index | query | median (s) | min (s) | command |",
        "|---|---|---:|---|---|---:|---:|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['system']} | {row.get('model', 'ViT-B-32-256')} | {row['vectors']:,} | "
                     f"{row.get('index', 'numpy over SQLite')} | {row.get('query', 'cold')} | "
                     f"{row['median_seconds']:.3f} | {row['min_seconds']:.3f} | `{row['command']}` |")
    if report.get("breakdown"):
        lines += ["", "Where the one-process path's time goes (product default model, largest collection; each step "
                  "timed in a fresh process, median of 5; the rest of the wall time is the interpreter start, "
                  "Typer's parsing and the exit):", "", "| step | ms |", "|---|---:|"]
        lines += [f"| {r['step']} | {r['median_ms']:.1f} |" for r in report["breakdown"]]
    biggest = max((r["vectors"] for r in report["rows"]), default=0)
    theirs = [r for r in report["rows"] if r["system"].startswith("rclip") and r["vectors"] == biggest]
    verdicts = []
    for prefix, target in (("emoji-mini", 0.35), ("ViT-B-32-256 int8", 0.5)):
        for way in ("one process", "resident helper"):
            found = [r for r in report["rows"] if r["system"] == f"clipsearch, {way}" and r["vectors"] == biggest
                     and r.get("query") == "cold" and r["model"].startswith(prefix)]
            if found:
                got = found[0]["median_seconds"]
                verdicts.append(f"{prefix}, {way}: cold {got:.3f} s vs <= {target} s: {'PASS' if got <= target else 'FAIL'}"
                                + (f" (rclip {theirs[0]['median_seconds']:.2f} s = {theirs[0]['median_seconds'] / got:.1f}x)"
                                   if theirs else ""))
    if verdicts:
        lines += ["", f"Targets for a new query at {biggest:,} vectors:", ""] + [f"- {v}" for v in verdicts]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
