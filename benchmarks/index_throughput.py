"""End-to-end indexing throughput on 12 MP camera-style JPEGs, side by side in one run:

  * clipsearch (`clipsearch index`, product defaults) with the product default model and with rclip's
    architecture (random-init ViT-B-32-256) for an equal-model ratio;
  * real rclip 3.3.0 from PyPI, in its own venv, offline on a random-init ViT-B-32-256 export;
  * a torch baseline as clip-retrieval does it: Pillow full decode + open_clip's transform in a DataLoader
    (2 workers), open_clip torch eager encode_image, batch 32.

Also our decode-only, encode-only rates and CPU cost per image, and the CPU bound they imply, and every
clipsearch model on a library-sized folder (--library-count photos, the corpus's first), where what a run pays
once (interpreter, imports, session, pipeline fill and drain) is spread over as many photos as a user indexes.

    python benchmarks/index_throughput.py --count 160 [--library-count 1000] [--work-dir DIR] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_setup import (build_camera_corpus, compile_bytecode, export_clipsearch_bundle,  # noqa: E402
                         export_emoji_mini_standin, export_int8_bundle, export_rclip_models, log, machine_note,
                         rclip_env, rclip_venv, warm_page_cache, without_bytecode_veto)

CLIPSEARCH = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
BOUND_TARGET = 0.9  # int8 within 10% of our CPU bound (issue 12), at the corpus and at the library size


def run_clipsearch_index(photos: Path, bundle: str, extra: list[str], home: Path) -> dict:
    """One `clipsearch index` into a new collection (its own --index-dir) of the user home `home`, which lasts the
    whole benchmark as a user's does: what a home keeps across runs (the bundle's integrity check,
    clipsearch.model.integrity) is kept, as on any run but a user's very first."""
    with tempfile.TemporaryDirectory(prefix="cs-bench-idx-") as index_dir:
        env = {**without_bytecode_veto(dict(os.environ)), "CLIPSEARCH_HOME": str(home)}
        command = [*CLIPSEARCH, "index", str(photos), "--model", bundle, "--collection", "bench", "--index-dir",
                   index_dir, "--json", *extra]
        started = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"clipsearch index failed:\n{result.stderr}")
        summary = json.loads(result.stdout)
    return {"wall_seconds": wall, "summary": summary,
            "command": "clipsearch index PHOTOS --model BUNDLE --json " + " ".join(extra)}


def run_rclip(photos: Path, exe: Path, datadir: Path, batch_size: int) -> dict:
    (datadir / "db.sqlite3").unlink(missing_ok=True)
    command = [str(exe), "-f", "-t", "1", "-b", str(batch_size), "a dog"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=photos, env=rclip_env(datadir), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"rclip failed:\n{result.stderr[-3000:]}")
    return {"wall_seconds": wall, "command": f"cd PHOTOS && RCLIP_DATADIR=... rclip -f -t 1 -b {batch_size} 'a dog'"}


def decode_only(files: list[Path], bundle: Path, workers: int) -> dict:
    """Our reader alone (hash + draft decode + resize) in `workers` processes: wall rate, and the workers' CPU
    seconds per image (with as many workers as cores, every core is busy, as in a real run)."""
    from clipsearch.model.bundle import read_bundle, read_preprocess
    from clipsearch.indexer.reader import ParallelReader, ReadTask

    spec = read_preprocess(read_bundle(bundle))
    tasks = [ReadTask(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    with ParallelReader(spec, workers=workers) as reader:
        list(reader.read(tasks[: max(2, workers)]))  # start the processes before timing
        started = time.perf_counter()
        results = list(reader.read(tasks))
        wall = time.perf_counter() - started
    errors = [r.error for r in results if r.error]
    if errors:
        raise SystemExit(f"decode errors: {errors[:3]}")
    return {"workers": workers, "images_per_second": len(tasks) / wall,
            "cpu_seconds_per_image": sum(r.cpu_seconds for r in results) / len(results)}


def decode_cpu_cost(files: list[Path], bundle: Path, sample: int = 40) -> float:
    """CPU seconds per image of our per-file work, measured in this process (one core busy, the other idle)."""
    from clipsearch.model.bundle import read_bundle, read_preprocess
    from clipsearch.indexer.reader import ReadTask, read_one

    spec = read_preprocess(read_bundle(bundle))
    chosen = files[:sample]
    started = time.process_time()
    for p in chosen:
        read_one(ReadTask(str(p), p.stat().st_size, 0), spec)
    return (time.process_time() - started) / len(chosen)


def encode_only(bundle: Path, lanes: int, batch_size: int, batches_per_lane: int = 6, repeats: int = 2) -> dict:
    """The encoder alone as `clipsearch index` runs it: `lanes` calls at once on a one-thread session, `batch_size`
    images each (indexer/lanes.py). CPU seconds per image from process CPU time, every core busy.

    Every lane first encodes one full batch untimed: measured here, a lane's first call at the batch shape costs
    about a quarter more than the next ones, which a real run pays once, not per image. Then `repeats`
    timed stretches of `batches_per_lane` calls per lane; the lower median stretch (by CPU) is reported, so
    one stretch slowed by a neighbour on the host does not lower the bound."""
    from clipsearch.indexer.lanes import EncoderLanes
    from clipsearch.model.runtime import ClipModel

    model = ClipModel(bundle, threads=1)
    h, w = model.preprocess.size
    pixels = np.random.default_rng(0).standard_normal((batch_size, 3, h, w)).astype(np.float32)
    stretches = []
    with EncoderLanes(lanes) as pool:
        for future in [pool.submit(lambda: model.encode_pixels(pixels)) for _ in range(lanes)]:
            future.result()  # load + warm up, every lane at the real batch shape
        for _ in range(repeats):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            futures = [pool.submit(lambda: model.encode_pixels(pixels)) for _ in range(lanes * batches_per_lane)]
            for future in futures:
                future.result()
            wall = time.perf_counter() - wall0
            cpu = time.process_time() - cpu0
            stretches.append((cpu, wall))
    cpu, wall = sorted(stretches)[(len(stretches) - 1) // 2]
    n = batch_size * lanes * batches_per_lane
    return {"images_per_second": n / wall, "cpu_seconds_per_image": cpu / n, "batch_size": batch_size, "lanes": lanes,
            "repeats": repeats}


def measure_components(files: list[Path], bundle: Path, cores: int, batch_size: int) -> dict:
    """Decode and encode costs of one model, and the CPU bound they imply (one measurement)."""
    warm_page_cache(files)
    cpu_decode_alone = decode_cpu_cost(files, bundle)
    decode = decode_only(files, bundle, workers=cores)
    encode = encode_only(bundle, lanes=cores, batch_size=batch_size)
    # Both costs as measured with every core busy (this VM's two vCPUs slow each other down: see the table).
    bound = min(encode["images_per_second"], cores / (decode["cpu_seconds_per_image"] + encode["cpu_seconds_per_image"]))
    bound_alone = min(encode["images_per_second"], cores / (cpu_decode_alone + encode["cpu_seconds_per_image"]))
    log(f"  [{bundle.name}] decode {decode['images_per_second']:.1f}/s ({cores} workers, "
        f"{decode['cpu_seconds_per_image'] * 1000:.0f} ms CPU; alone {cpu_decode_alone * 1000:.0f} ms), encode "
        f"{encode['images_per_second']:.1f}/s ({encode['cpu_seconds_per_image'] * 1000:.0f} ms CPU), bound {bound:.1f}/s")
    return {"decode_only": decode["images_per_second"], "decode_workers": cores,
            "decode_cpu_seconds_per_image": decode["cpu_seconds_per_image"],
            "decode_cpu_seconds_per_image_alone": cpu_decode_alone,
            "encode_only": encode["images_per_second"], "encode_cpu_seconds_per_image": encode["cpu_seconds_per_image"],
            "encode_lanes": cores, "encode_batch": batch_size, "encode_repeats": encode["repeats"],
            "cpu_bound": bound, "cpu_bound_with_decode_alone": bound_alone}


def system_name(label: str) -> str:
    """The row name of our `clipsearch index` runs with the model labelled `label`."""
    return f"clipsearch [{label}]"


def median_components(measured: list[dict]) -> dict:
    """The per-round component measurements of one model: the median of each figure, and every round's bound."""
    merged = {key: statistics.median(m[key] for m in measured) if isinstance(measured[0][key], float) else measured[0][key]
              for key in measured[0]}
    merged["cpu_bound_per_round"] = [m["cpu_bound"] for m in measured]
    return merged


def torch_baseline(photos: Path, arch: str, batch_size: int = 32, workers: int = 2) -> dict:
    """Run in a subprocess so torch's thread pools do not disturb the other measurements."""
    code = f"""
import json, time, torch, open_clip
from pathlib import Path
from PIL import Image
torch.set_num_threads({os.cpu_count() or 2})
model, _, preprocess = open_clip.create_model_and_transforms({arch!r}, pretrained=None)
model.eval()
files = sorted(Path({str(photos)!r}).glob('*.jpg'))
class Files(torch.utils.data.Dataset):
    def __len__(self): return len(files)
    def __getitem__(self, i): return preprocess(Image.open(files[i]).convert('RGB'))
loader = torch.utils.data.DataLoader(Files(), batch_size={batch_size}, num_workers={workers})
started = time.perf_counter()
n = 0
with torch.inference_mode():
    for batch in loader:
        features = model.encode_image(batch)
        features = features / features.norm(dim=-1, keepdim=True)
        n += len(batch)
print(json.dumps({{"images": n, "seconds": time.perf_counter() - started}}))
"""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"torch baseline failed:\n{result.stderr[-3000:]}")
    inner = json.loads(result.stdout.strip().splitlines()[-1])
    return {"wall_seconds": wall, "loop_seconds": inner["seconds"], "images": inner["images"],
            "command": f"torch DataLoader(workers={workers}, batch={batch_size}) + open_clip {arch} eager"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=160, help="photos in the corpus")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "clipsearch-bench")
    parser.add_argument("--default-model", default=None, help="model spec of the product default (default: DEFAULT_MODEL)")
    parser.add_argument("--skip-rclip", action="store_true")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of every system")
    parser.add_argument("--library-count", type=int, default=1000,
                        help="photos in the library-sized folder each clipsearch model also indexes in every round (the "
                             "corpus and more made the same way; 0 or at most --count: none)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--results", type=Path, help="write the section of this RESULTS.md (e.g. benchmarks/RESULTS.md)")
    parser.add_argument("--render", type=Path, help="only write the RESULTS.md section from the --json-out of an earlier run")
    parser.add_argument("--force", action="store_true", help="write RESULTS.md even when the machine was busy (labelled)")
    args = parser.parse_args()
    if args.render:
        report = json.loads(args.render.read_text())
        write_results(args, report)
        return
    from results import MachineLoad, utc_stamp

    load = MachineLoad()
    if args.results:
        load.label_for_results(args.force, args.results)  # a busy machine is refused now, not after minutes of work

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    log(f"building {args.count} camera-style photos")
    files = build_camera_corpus(work / f"photos-{args.count}", args.count)
    photos = files[0].parent
    library: list[Path] = []
    if args.library_count > len(files):
        log(f"building the {args.library_count}-photo library (its first {len(files)} are the corpus)")
        library = build_camera_corpus(work / f"photos-{args.library_count}", args.library_count)
    # Built in the same order from the same seed, the library begins with the corpus; checked, not assumed (a
    # generation resumed half-way draws other crops).
    starts_with_corpus = bool(library) and all(filecmp.cmp(a, b, shallow=False) for a, b in zip(files, library))
    megabytes = np.mean([p.stat().st_size for p in files]) / 1e6
    report: dict = {"count": len(files), "mean_file_mb": round(megabytes, 2), "machine": machine_note(),
                    "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": [],
                    "components": {}, "rounds": args.rounds, "skip_rclip": args.skip_rclip, "skip_torch": args.skip_torch,
                    "library_count": len(library), "library_starts_with_corpus": starts_with_corpus}

    same_arch = export_clipsearch_bundle("ViT-B-32-256", work / "bundles" / "vit-b-32-256-random", "ViT-B-32-256-random")
    same_int8 = export_int8_bundle("ViT-B-32-256", work / "bundles" / "vit-b-32-256-random-int8",
                                   "ViT-B-32-256-random-int8")
    models = [("rclip-arch ViT-B-32-256", str(same_arch)), ("rclip-arch ViT-B-32-256 int8", str(same_int8))]
    from clipsearch.errors import ClipsearchError
    from clipsearch.model.resolve import DEFAULT_MODEL, resolve_model

    default_spec = args.default_model or DEFAULT_MODEL
    try:
        models.insert(0, (f"product default ({default_spec})", str(resolve_model(default_spec).path)))
    except ClipsearchError as exc:
        log(f"product default model unavailable ({exc.message}); timing a random-init stand-in of its architecture")
        report["default_model_missing"] = exc.message
        standin = export_emoji_mini_standin(work / "bundles" / "emoji-mini-arch-random")
        models.insert(0, (f"product default arch ({default_spec}, random-init stand-in)", str(standin)))

    cores = os.cpu_count() or 1
    from clipsearch.cli.index_cmds import DEFAULT_CLI_BATCH

    compile_bytecode()  # as after `pip install`; the runs below keep bytecode caching on
    report["bytecode_compiled"] = True
    exe = datadir = None
    if not args.skip_rclip:
        exe = rclip_venv(work)
        datadir = export_rclip_models(work / "rclip-data", same_arch)

    # One user home for every clipsearch run, as a user has. Its first use of a bundle hashes the bundle's image side
    # (clipsearch.model.integrity: once per file version): done here, untimed, and reported.
    home = work / "clipsearch-home"
    from clipsearch.model.integrity import CACHE_FILE

    (home / CACHE_FILE).unlink(missing_ok=True)  # so that the figure below is the first use's
    integrity_seconds = {}
    for label, bundle in models:
        started = time.perf_counter()
        check = subprocess.run([sys.executable, "-c", "import sys; from clipsearch.model.bundle import read_bundle; "
                                "from clipsearch.model.integrity import check_image_side; "
                                "check_image_side(read_bundle(sys.argv[1]))", bundle],
                               env={**os.environ, "CLIPSEARCH_HOME": str(home)}, capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"the bundle's integrity check failed:\n{check.stderr}")
        integrity_seconds[label] = round(time.perf_counter() - started, 3)
    report["integrity_check_seconds"] = integrity_seconds
    log(f"  integrity check (first use of each bundle in a home, untimed): {integrity_seconds}")

    # Rounds alternate the systems so that a change in machine load hits all of them alike.
    runs: dict[str, list[float]] = {}
    cpu_efficiency: dict[str, list[float]] = {}
    component_rounds: dict[str, list[dict]] = {}  # per model label, one measurement per round
    fractions: dict[str, list[tuple[float, float]]] = {}  # per system: (of the bound, of the bound alone) per round
    walls: dict[str, list[tuple[float, float]]] = {}  # (corpus, library) seconds, per round
    library_fractions: dict[str, list[tuple[float, float]]] = {}  # per system: (of the round's bound, CPU efficiency)
    encode_in_run: dict[str, list[float]] = {}  # per system: encoder calls' CPU seconds per embedded image, per round
    commands: dict[str, str] = {}
    for round_index in range(args.rounds):
        log(f"round {round_index + 1}/{args.rounds}")
        for label, bundle in models:
            # The components are measured in every round, just before the runs they are compared with: on this
            # shared host the same work costs up to a tenth more or less CPU from one quarter hour to the next.
            parts = measure_components(files, Path(bundle), cores, DEFAULT_CLI_BATCH)
            component_rounds.setdefault(label, []).append(parts)
            warm_page_cache(files)
            result = run_clipsearch_index(photos, bundle, [], home)
            name = system_name(label)
            runs.setdefault(name, []).append(len(files) / result["wall_seconds"])
            fractions.setdefault(name, []).append((runs[name][-1] / parts["cpu_bound"],
                                                   runs[name][-1] / parts["cpu_bound_with_decode_alone"]))
            per_image = parts["decode_cpu_seconds_per_image"] + parts["encode_cpu_seconds_per_image"]
            cpu_efficiency.setdefault(name, []).append(len(files) * per_image / result["summary"]["cpu_seconds"])
            if result["summary"].get("embedded"):
                encode_in_run.setdefault(name, []).append(
                    result["summary"]["encode_cpu_seconds"] / result["summary"]["embedded"])
            commands[name] = result["command"]
            log(f"  {name}: {runs[name][-1]:.2f} img/s, CPU efficiency {cpu_efficiency[name][-1]:.2f}")
            if library:
                # The same model on a library-sized folder: what a run pays once is spread over many more photos,
                # and the difference of the two runs separates the per-image rate from that once-per-run cost.
                warm_page_cache(library)
                library_result = run_clipsearch_index(library[0].parent, bundle, [], home)
                walls.setdefault(name, []).append((result["wall_seconds"], library_result["wall_seconds"]))
                library_fractions.setdefault(name, []).append(
                    (len(library) / library_result["wall_seconds"] / parts["cpu_bound"],
                     len(library) * per_image / library_result["summary"]["cpu_seconds"]))
                log(f"  {name}, {len(library)} photos: {len(library) / library_result['wall_seconds']:.2f} img/s, "
                    f"{library_fractions[name][-1][0] * 100:.0f}% of the bound")
        if exe is not None:
            warm_page_cache(files)
            result = run_rclip(photos, exe, datadir, 8)
            name = "rclip 3.3.0 [ViT-B-32-256, ORT fp32, batch 8]"
            runs.setdefault(name, []).append(len(files) / result["wall_seconds"])
            commands[name] = result["command"]
            log(f"  {name}: {runs[name][-1]:.2f} img/s")
        if not args.skip_torch:
            warm_page_cache(files)
            result = torch_baseline(photos, "ViT-B-32-256")
            name = "torch baseline [ViT-B-32-256, eager, batch 32]"
            runs.setdefault(name, []).append(result["images"] / result["wall_seconds"])
            commands[name] = result["command"]
            log(f"  {name}: {runs[name][-1]:.2f} img/s")

    for label, measured in component_rounds.items():
        report["components"][label] = median_components(measured)
    rclip_name = next((n for n in runs if n.startswith("rclip")), None)
    for name, rates in runs.items():
        row = {"system": name, "images_per_second_median": statistics.median(rates), "per_round": rates,
               "command": commands[name]}
        if rclip_name:
            ratios = [a / b for a, b in zip(rates, runs[rclip_name])]
            row["ratio_to_rclip_median"] = statistics.median(ratios)
        for label, parts in report["components"].items():
            if name == system_name(label):  # exact: one label is a prefix of another ("... ViT-B-32-256 int8")
                # Each round's rate against the bound measured in that round, then the median over rounds.
                row["fraction_of_cpu_bound"] = statistics.median(f for f, _ in fractions[name])
                row["fraction_of_cpu_bound_alone"] = statistics.median(f for _, f in fractions[name])
                row["fraction_of_cpu_bound_per_round"] = [f for f, _ in fractions[name]]
                row["cpu_efficiency_median"] = statistics.median(cpu_efficiency[name])
                if name in encode_in_run:
                    row["encode_cpu_seconds_per_image_in_run"] = statistics.median(encode_in_run[name])
                if name in walls:
                    row.update(library_figures(walls[name], library_fractions[name], len(files), len(library)))
        report["rows"].append(row)
    report["machine_at_end"] = machine_note()
    report["measured_at"] = utc_stamp()
    load.finish()
    report["machine_label"] = load.label_for_results(True, args.results) if load.busy else f"Machine: {load.note()}."
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    write_results(args, report)


def library_figures(walls: list[tuple[float, float]], fractions: list[tuple[float, float]], count: int,
                    library: int) -> dict:
    """From same-round (corpus, library) wall times and the library runs' (fraction of their round's bound, CPU
    efficiency): the library's rate, fraction and efficiency, and what a run pays once (the corpus run's wall
    time less its photos at the marginal rate of the library's extra photos), each the median over rounds."""
    rates = [library / big for _, big in walls]
    marginal = [(library - count) / (big - small) for small, big in walls if big > small]
    figures = {"library_images_per_second_median": statistics.median(rates), "library_per_round": rates,
               "library_fraction_of_cpu_bound": statistics.median(f for f, _ in fractions),
               "library_fraction_of_cpu_bound_per_round": [f for f, _ in fractions],
               "library_cpu_efficiency_median": statistics.median(e for _, e in fractions)}
    if marginal:
        rate = statistics.median(marginal)
        figures["fixed_seconds"] = statistics.median(small - count / rate for small, _ in walls)
    return figures


def write_results(args, report: dict) -> None:
    if not args.results:
        return
    from results import write_section

    report.setdefault("rounds", args.rounds)
    skipped = "".join(f" --skip-{name}" for name in ("rclip", "torch") if report.get(f"skip_{name}"))
    library = f" --library-count {report.get('library_count') or 0}"
    command = (f"python benchmarks/index_throughput.py --count {report['count']}{library} --rounds {report['rounds']}"
               f"{skipped} --results benchmarks/RESULTS.md")
    body = markdown(report, args) + ("\n" + report["machine_label"] if "machine_label" in report else "")
    # --render re-writes the section later: it keeps the time the figures were taken (reports from before
    # measured_at was kept: the time the run started).
    write_section(args.results, "Indexing throughput (benchmarks/index_throughput.py)", command, body,
                  measured=report.get("measured_at") or report.get("started_at"))


def markdown(report: dict, args) -> str:
    # Reports written before the per-round components did not record this; they timed 2 stretches.
    repeats = next(iter(report["components"].values()), {}).get("encode_repeats", 2)
    lines = [
        f"{report['count']} camera-style JPEGs, 4032x3024 (mean {report['mean_file_mb']} MB), re-encoded from the photographs "
        "in Debian's ukui-wallpapers, mate-backgrounds and plasma-workspace-wallpapers (random 4:3 crop, mild sensor noise, "
        "quality 92, 4:2:0, EXIF). Every system indexes the same folder from scratch, end to end as a user runs it "
        "(process start, model load, index written), its files read once just before (page cache warm for every "
        "system alike); rounds alternate the systems. "
        + ("clipsearch's modules were compiled to bytecode first and its runs keep bytecode caching on, as after "
           "`pip install` (which compiled rclip's and every other package's). " if report.get("bytecode_compiled") else "")
        + (("Each clipsearch run indexes into a new collection of one user home that lasts the benchmark, as a user's "
            "does; a home's first use of a bundle checks its image side against model.json (it is hashed once per file "
            "version; a process doing only that took " + ", ".join(
                f"{sec:.2f} s for {label}" for label, sec in report["integrity_check_seconds"].items())
            + ", interpreter start included), done before the rounds, untimed, as on any run but a user's very first. ")
           if report.get("integrity_check_seconds") else "")
        + "All models random-init "
        "(speed does not depend on weights). rclip: PyPI rclip 3.3.0 in its own venv, offline, on the very same "
        "ViT-B-32-256 ONNX graphs (inputs renamed). Torch baseline: Pillow full decode + open_clip transform in a "
        "DataLoader (2 workers), open_clip eager, batch 32. "
        + (f"Run started {report['started_at']}. " if report.get("started_at") else "")
        + f"Machine: {report['machine']} at the start"
        + (f", {report['machine_at_end'].split(', ', 1)[-1]} at the end" if report.get("machine_at_end") else "")
        + ".",
        "",
        "| system | images/s (median) | x rclip (same-round median) | of our CPU bound (2 free cores) | "
        "CPU efficiency | rounds (images/s) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in report["rows"]:
        ratio = f"{row['ratio_to_rclip_median']:.2f}" if "ratio_to_rclip_median" in row else "-"
        bound = f"{row['fraction_of_cpu_bound'] * 100:.0f}%" if "fraction_of_cpu_bound" in row else "-"
        rounds = ", ".join(f"{r:.2f}" for r in row["per_round"])
        efficiency = f"{row['cpu_efficiency_median'] * 100:.0f}%" if "cpu_efficiency_median" in row else "-"
        lines.append(f"| {row['system']} | {row['images_per_second_median']:.2f} | {ratio} | {bound} | {efficiency} | {rounds} |")
    lines += ["", "Our components, measured in every round just before that round's runs of the model (the table shows "
              "medians over rounds; \"of our CPU bound\" above is the median over rounds of each run's rate against the "
              "bound of its own round), each with every core busy as in a real run: decode = our "
              "reader alone in one worker process per core (CPU ms per image from the workers' CPU time); encode = the "
              "encoder alone as `clipsearch index` runs it (one call per core at once, one onnxruntime thread per call, "
              f"the CLI's default batch, every lane warmed up by one untimed batch, the lower median of {repeats} timed "
              "stretches; CPU ms per image from process CPU time). CPU bound = min(encode-only rate, "
              "cores / (decode CPU + encode CPU)). A core's work can cost more CPU while the other core works than "
              "alone (the two vCPUs of this VM share a host), so decode CPU is also measured alone (in this process, "
              "the other core idle) and the bound from that figure is shown beside it. Encode CPU in the run = the CPU "
              "time of the threads inside the encoder calls of the runs above (their --json `encode_cpu_seconds`) per "
              "image embedded: against encode CPU alone, what sharing the cores with the decoder processes costs the "
              "encoder. CPU efficiency = images x (decode CPU + encode CPU) / CPU "
              "seconds the whole `clipsearch index` run used (main process + decode workers, from its --json "
              "`cpu_seconds`): the share of the CPU we got that went into decoding and encoding, which stays meaningful "
              "when other jobs take part of the cores):", "",
              "| model | decode-only (images/s) | decode CPU (ms/image) | decode CPU alone (ms/image) | encode-only "
              "(images/s) | encode CPU (ms/image) | encode CPU in the run (ms/image) | CPU bound (images/s) | "
              "bound with decode CPU alone | bound per round |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    in_run = {r["system"]: r["encode_cpu_seconds_per_image_in_run"] for r in report["rows"]
              if "encode_cpu_seconds_per_image_in_run" in r}  # reports from before it was measured have none
    for label, parts in report["components"].items():
        encode_in_run = in_run.get(system_name(label))
        lines.append(f"| {label} | {parts['decode_only']:.1f} | {parts['decode_cpu_seconds_per_image'] * 1000:.0f} | "
                     f"{parts['decode_cpu_seconds_per_image_alone'] * 1000:.0f} | {parts['encode_only']:.2f} | "
                     f"{parts['encode_cpu_seconds_per_image'] * 1000:.0f} | "
                     f"{'-' if encode_in_run is None else f'{encode_in_run * 1000:.0f}'} | {parts['cpu_bound']:.2f} | "
                     f"{parts['cpu_bound_with_decode_alone']:.2f} | "
                     f"{', '.join(f'{b:.2f}' for b in parts.get('cpu_bound_per_round', [parts['cpu_bound']]))} |")
    library_rows = [r for r in report["rows"] if "library_images_per_second_median" in r]
    if library_rows:
        n, extra = f"{report['library_count']:,}", f"{report['library_count'] - report['count']:,}"
        lines += ["", f"A library-sized folder: in every round each clipsearch run above was followed by a run of the same "
                  f"model on {n} photos made the same way"
                  + (f" (the first {report['count']} are the folder above)" if report.get("library_starts_with_corpus")
                     else "")
                  + ", page cache warm. What a run pays once (interpreter and imports, decoder processes starting, the "
                  "session loading, the first batch filling, the last batches draining, the index written) is then spread over as many "
                  "photos as a user's library holds. \"Once per run\" = the folder above's wall time less its photos "
                  f"at the rate of the library's {extra} extra ones. Medians over rounds:", "",
                  f"| system | {n} photos (images/s) | of our CPU bound | CPU efficiency | rounds (images/s) | "
                  "once per run (s) |", "|---|---:|---:|---:|---|---:|"]
        for r in library_rows:
            fixed = f"{r['fixed_seconds']:.2f}" if "fixed_seconds" in r else "-"
            rounds = ", ".join(f"{x:.2f}" for x in r["library_per_round"])
            lines.append(f"| {r['system']} | {r['library_images_per_second_median']:.2f} | "
                         f"{r['library_fraction_of_cpu_bound'] * 100:.0f}% | "
                         f"{r['library_cpu_efficiency_median'] * 100:.0f}% | {rounds} | {fixed} |")
    ours = [r for r in report["rows"] if r["system"].startswith("clipsearch") and "ratio_to_rclip_median" in r]
    if ours:
        lines += ["", "Against the targets (equal model, ViT-B-32-256 on both sides: fp32 >= 2.2x and int8 >= 4x rclip end "
                  "to end, int8 within 10% of our CPU bound; the product default's row uses another model and has no "
                  "ratio target):", ""]
        for r in ours:
            # Three decimals: a ratio just under its target must not print as the target itself.
            line = (f"- {r['system']}: {r['ratio_to_rclip_median']:.3f}x rclip, {r.get('fraction_of_cpu_bound', 0) * 100:.0f}% "
                    f"of the 2-free-core CPU bound ({r.get('fraction_of_cpu_bound_alone', 0) * 100:.0f}% of the bound "
                    f"with decode CPU alone), {r.get('cpu_efficiency_median', 0) * 100:.0f}% CPU efficiency")
            if r["system"].endswith("ViT-B-32-256 int8]"):
                ratio_ok = r["ratio_to_rclip_median"] >= 4.0
                bound_ok = r.get("fraction_of_cpu_bound", 0) >= BOUND_TARGET
                target = f"(>= {BOUND_TARGET * 100:.0f}%)"
                line += f": ratio {'PASS' if ratio_ok else 'FAIL'} (>= 4x), bound {'PASS' if bound_ok else 'FAIL'} {target}"
                if "library_fraction_of_cpu_bound" in r:
                    library_ok = r["library_fraction_of_cpu_bound"] >= BOUND_TARGET
                    line += (f"; on {report['library_count']:,} photos {r['library_fraction_of_cpu_bound'] * 100:.0f}% of "
                             f"the bound: {'PASS' if library_ok else 'FAIL'} {target}")
            elif r["system"].endswith("ViT-B-32-256]"):
                line += f": ratio {'PASS' if r['ratio_to_rclip_median'] >= 2.2 else 'FAIL'} (>= 2.2x)"
            lines.append(line)
    if report.get("default_model_missing"):
        lines += ["", "The bundled default model was not installed when this ran "
                  f"({report['default_model_missing'].split(':')[0]}); its row times a random-init bundle of the same "
                  "architecture (ConvImageTower at 64 px + MiniLM text tower, fp32), which costs the same."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
