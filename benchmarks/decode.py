"""The indexer's per-photo costs that do not depend on the encoder, each beside the alternative it replaced:

  * JPEG draft decoding: the smallest DCT scale keeping both sides at least the model input (the product) vs at
    least twice it (the earlier rule) vs a full decode: CPU ms per 12 MP photo for decode + resize to the model
    input, and the PSNR of that input against the full decode's;
  * importing sqlite-utils (every indexing run does) with pandas blocked (the product) and as it comes.

    python benchmarks/decode.py [--count 40] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_setup import build_camera_corpus, log  # noqa: E402

IMPORT_SCRIPT = """
import sys, time
if sys.argv[1] == "blocked":
    from clipsearch.store.database import _sqlite_utils
    t = time.perf_counter(); _sqlite_utils()
else:
    t = time.perf_counter(); import sqlite_utils
print((time.perf_counter() - t) * 1000)
"""

def draft_rows(files: list[Path], sizes: tuple[int, ...]) -> list[dict]:
    from PIL import Image

    from clipsearch.model.bundle import PreprocessSpec
    from clipsearch.model.preprocess import resize_for_model

    rows = []
    for size in sizes:
        spec = PreprocessSpec(size=(size, size), resize_mode="shortest", interpolation="bicubic",
                              mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        references = [np.asarray(resize_for_model(Image.open(p).convert("RGB"), spec), dtype=np.float64) for p in files]
        for label, factor in (("full decode", None), ("draft >= 2x input (earlier rule)", 2), ("draft >= input (product)", 1)):
            cpu, psnr, decoded = [], [], None
            for path, reference in zip(files, references):
                started = time.process_time()
                with Image.open(path) as image:
                    if factor is not None:
                        image.draft("RGB", (size * factor, size * factor))
                    image.load()
                    decoded = image.size
                    pixels = np.asarray(resize_for_model(image.convert("RGB"), spec), dtype=np.float64)
                cpu.append(time.process_time() - started)
                mse = float(np.mean((pixels - reference) ** 2))
                psnr.append(float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse))
            finite = [v for v in psnr if np.isfinite(v)]
            rows.append({"input": size, "decode": label, "decoded_size": f"{decoded[0]}x{decoded[1]}",
                         "cpu_ms": 1000 * statistics.mean(cpu),
                         "psnr_mean": statistics.mean(finite) if finite else None,
                         "psnr_min": min(finite) if finite else None})
            log(f"  {size}px {label}: {rows[-1]['cpu_ms']:.1f} ms")
    return rows


def import_rows(repeats: int) -> list[dict]:
    rows = []
    for how in ("blocked", "as it comes"):
        times = [float(subprocess.run([sys.executable, "-c", IMPORT_SCRIPT, how], capture_output=True, text=True,
                                      check=True).stdout) for _ in range(repeats)]
        rows.append({"import": f"sqlite-utils, pandas {'blocked (product)' if how == 'blocked' else 'imported'}",
                     "median_ms": statistics.median(times)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "clipsearch-bench")
    parser.add_argument("--results", type=Path)
    parser.add_argument("--force", action="store_true", help="write RESULTS.md even when the machine was busy (labelled)")
    args = parser.parse_args()
    from results import MachineLoad, write_section

    load = MachineLoad()
    if args.results:
        load.label_for_results(args.force, args.results)
    files = build_camera_corpus(args.work_dir / "photos-200", max(args.count, 1))[: args.count]
    log("draft decoding")
    report = {"count": len(files), "draft": draft_rows(files, (224, 256)), "imports": import_rows(7)}
    load.finish()
    print(json.dumps(report, indent=2))
    if not args.results:
        return
    label = load.label_for_results(True, args.results) if load.busy else f"Machine: {load.note()}."
    lines = [f"{len(files)} camera-style 12 MP JPEGs (4032x3024, quality 92, the corpus of index_throughput.py). "
             "Decode CPU = process time of open + draft + decode + resize/crop to the model input (bicubic, shortest "
             "side); PSNR of that input against the full decode's.", "",
             "| model input | decode | decoded at | CPU ms / photo | PSNR mean (dB) | PSNR min (dB) |",
             "|---:|---|---|---:|---:|---:|"]
    for row in report["draft"]:
        psnr = (f"{row['psnr_mean']:.1f} | {row['psnr_min']:.1f}" if row["psnr_mean"] is not None else "exact | exact")
        lines.append(f"| {row['input']} | {row['decode']} | {row['decoded_size']} | {row['cpu_ms']:.1f} | {psnr} |")
    lines += ["", "| import (fresh interpreter, median of 7) | ms |", "|---|---:|"]
    lines += [f"| {row['import']} | {row['median_ms']:.0f} |" for row in report["imports"]]
    write_section(args.results, "Decode and imports (benchmarks/decode.py)",
                  f"python benchmarks/decode.py --count {args.count} --results benchmarks/RESULTS.md",
                  "\n".join(lines) + "\n\n" + label)


if __name__ == "__main__":
    main()
