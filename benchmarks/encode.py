"""Encoder throughput, side by side in one run: open_clip torch eager vs bundle fp32 vs bundle int8.

    python benchmarks/encode.py [--arch ViT-B-32] [--batch 32] [--seconds 20] [--out benchmarks/RESULTS.md]

Random-init weights (no downloads here); speed does not depend on the weight values. Reports images/s at
batch 32 with all cores, text-query latency p50/p99 for a 5-word query, and cosine parity of each bundle
with open_clip on the same inputs. Rounds alternate between the engines so a noisy neighbour hits all of
them alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import MachineLoad, write_section  # noqa: E402

QUERY = "a dog running on the beach"  # 6 words, 7 tokens + start/end


def _timed_rate(fn, batch: int, seconds: float) -> float:
    fn()  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        done += batch
    return done / (time.perf_counter() - start)


def _latencies(fn, count: int) -> tuple[float, float]:
    for _ in range(10):
        fn()
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0, help="timing per engine per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    parser.add_argument("--force", action="store_true", help="write RESULTS.md even when the machine was busy")
    args = parser.parse_args()
    load = MachineLoad()

    import open_clip
    import torch

    from clipsearch.model.export import ExportRequest, export_bundle, load_open_clip
    from clipsearch.model.runtime import ClipModel

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="clipsearch-bench-"))
    bundles = {p: export_bundle(ExportRequest(arch=args.arch, pretrained=None, random_init=True, out=work / p,
                                              precision=p)) for p in ("fp32", "int8")}
    model = load_open_clip(args.arch, None, True)
    rng = np.random.default_rng(0)
    size = model.visual.preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    pixels = rng.standard_normal((args.batch, 3, *size)).astype(np.float32)
    tensor = torch.from_numpy(pixels)
    engines = {p: ClipModel(b) for p, b in bundles.items()}

    def torch_images():
        with torch.no_grad():
            model.encode_image(tensor)

    rates: dict[str, list[float]] = {"torch eager": [], "bundle fp32": [], "bundle int8": []}
    for _ in range(args.rounds):
        rates["torch eager"].append(_timed_rate(torch_images, args.batch, args.seconds))
        for precision, engine in engines.items():
            rates[f"bundle {precision}"].append(_timed_rate(lambda e=engine: e.encode_pixels(pixels), args.batch, args.seconds))
    best = {name: max(values) for name, values in rates.items()}

    tokenizer = open_clip.get_tokenizer(args.arch)

    def torch_text():
        with torch.no_grad():
            model.encode_text(tokenizer([QUERY]))

    text_latency = {"torch eager": _latencies(torch_text, args.queries)}
    for precision, engine in engines.items():
        text_latency[f"bundle {precision}"] = _latencies(lambda e=engine: e.encode_text([QUERY]), args.queries)

    # parity on the same inputs
    with torch.no_grad():
        ref_img = torch.nn.functional.normalize(model.encode_image(tensor[:8]), dim=-1).numpy()
        ref_txt = torch.nn.functional.normalize(model.encode_text(tokenizer([QUERY, "a red heart", "two cats"])), dim=-1).numpy()
    parity = {}
    for precision, engine in engines.items():
        img_cos = float((engine.encode_pixels(pixels[:8]) * ref_img).sum(1).min())
        txt_cos = float((engine.encode_text([QUERY, "a red heart", "two cats"]) * ref_txt).sum(1).min())
        parity[precision] = (img_cos, txt_cos)

    load.finish()
    base = best["torch eager"]
    lines = [
        f"{args.arch} random init, {size[0]} px, batch {args.batch}, {threads} threads, "
        f"{args.rounds} alternating rounds of {args.seconds:.0f} s (best round shown); "
        f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}.",
        "",
        "| engine | images/s | × torch eager | text query p50 (ms) | p99 (ms) | min cosine vs open_clip (image / text) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in rates:
        p50, p99 = text_latency[name]
        prec = name.split()[-1]
        cos = "1 (reference)" if name == "torch eager" else f"{parity[prec][0]:.5f} / {parity[prec][1]:.5f}"
        lines.append(f"| {name} | {best[name]:.1f} | {best[name] / base:.2f} | {p50:.2f} | {p99:.2f} | {cos} |")
    lines.append("")
    lines.append("All rounds (images/s): " + "; ".join(f"{n}: {', '.join(f'{v:.1f}' for v in vals)}" for n, vals in rates.items()))
    lines.append("")
    lines.append(f"Machine: {load.note()}.")
    print("\n".join(lines))
    lines[-1] = load.label_for_results(args.force, args.out)
    command = "python benchmarks/encode.py " + " ".join(sys.argv[1:])
    title = "Encoder throughput (benchmarks/encode.py)" + ("" if args.arch == "ViT-B-32" else f", {args.arch}")
    write_section(args.out, title, command.strip(), "\n".join(lines))


if __name__ == "__main__":
    main()
