"""Shared setup of the benchmarks: a camera-like photo corpus, random-init model exports, and a real
rclip (PyPI) in its own venv that runs offline on a random-init ViT-B-32-256.

Nothing here downloads model weights: every model is random-init (timing does not depend on weights).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RCLIP_VERSION = "3.3.0"
RCLIP_MODEL_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"
CAMERA_SIZE = (4032, 3024)

# Photographs shipped by Debian packages (ukui-wallpapers, mate-backgrounds, plasma-workspace-wallpapers).
PHOTO_GLOBS = (
    "/usr/share/backgrounds/*_by_*.jpg",
    "/usr/share/backgrounds/mate/nature/*.jpg",
    "/usr/share/wallpapers/Autumn/contents/images/2560x1600.jpg",
    "/usr/share/wallpapers/BytheWater/contents/images/2560x1600.jpg",
    "/usr/share/wallpapers/ColorfulCups/contents/images/2560x1600.jpg",
    "/usr/share/wallpapers/EveningGlow/contents/images/2560x1600.jpg",
    "/usr/share/wallpapers/FallenLeaf/contents/images/2560x1600.jpg",
    "/usr/share/wallpapers/Path/contents/images/2560x1600.jpg",
)
APT_PACKAGES = ("ukui-wallpapers", "mate-backgrounds", "plasma-workspace-wallpapers")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def source_photos() -> list[Path]:
    found = sorted({Path(p) for pattern in PHOTO_GLOBS for p in glob.glob(pattern)})
    if not found:
        raise SystemExit("no Debian wallpaper photos found; install them with:\n  apt-get install -y " + " ".join(APT_PACKAGES))
    return found


def build_camera_corpus(out: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` 4032x3024 JPEGs re-encoded from real photos like a phone camera writes them: a random 4:3 crop
    of each photo, scaled to 12 MP, mild sensor-like noise, quality 92, 4:2:0, EXIF with a capture time."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.jpg"))
    if len(existing) >= count:
        return existing[:count]
    sources = source_photos()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = out / f"IMG_{i:04d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        with Image.open(sources[i % len(sources)]) as src:
            image = src.convert("RGB")
        w, h = image.size
        scale = rng.uniform(0.75, 1.0)
        crop_w = min(w, int(h * 4 / 3)) * scale
        crop_h = crop_w * 3 / 4
        left = rng.uniform(0, w - crop_w)
        top = rng.uniform(0, h - crop_h)
        image = image.resize(CAMERA_SIZE, Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 2.5, size=(CAMERA_SIZE[1], CAMERA_SIZE[0], 1)).astype(np.int16)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        exif = Image.Exif()
        exif[271], exif[272], exif[274] = "clipsearch-bench", "camera-like", 1
        exif.get_ifd(0x8769)[36867] = f"2024:05:{1 + i % 28:02d} 12:{i % 60:02d}:00"
        image.save(path, quality=92, subsampling="4:2:0", exif=exif.tobytes())
    return paths


def export_clipsearch_bundle(arch: str, out: Path, name: str, precision: str = "fp32") -> Path:
    """A random-init open_clip model as a clipsearch bundle (fp32, or int8 with clipsearch's default recipes in
    clipsearch/model/quantize.py)."""
    if (out / "model.json").is_file():
        return out
    from clipsearch.model.export import ExportRequest, export_bundle

    log(f"exporting random-init {arch} {precision} bundle to {out}")
    return export_bundle(ExportRequest(arch=arch, pretrained=None, random_init=True, out=out, precision=precision,
                                       seed=0, name=name))


def export_int8_bundle(arch: str, out: Path, name: str) -> Path:
    return export_clipsearch_bundle(arch, out, name, precision="int8")


def export_rclip_models(datadir: Path, bundle: Path) -> Path:
    """rclip's model files from a clipsearch bundle of the same architecture (random-init ViT-B-32-256): the very
    same ONNX graphs with their inputs/outputs renamed to rclip's "input" -> "output", plus open_clip's BPE
    vocabulary, where rclip looks for them ($RCLIP_DATADIR). rclip only checks that the files exist."""
    target = datadir / RCLIP_MODEL_SUBDIR
    vocab_dir = datadir / "tokenizer"
    if (target / "visual.onnx").is_file() and (target / "textual.onnx").is_file() and any(vocab_dir.glob("*.gz")):
        return datadir
    import onnx
    import open_clip

    log(f"writing rclip model files into {target}")
    target.mkdir(parents=True, exist_ok=True)
    vocab_dir.mkdir(parents=True, exist_ok=True)
    for name in ("visual.onnx", "textual.onnx"):
        graph_model = onnx.load(str(bundle / name))
        graph = graph_model.graph
        renames = {graph.input[0].name: "input", graph.output[0].name: "output"}
        for value in list(graph.input) + list(graph.output):
            value.name = renames.get(value.name, value.name)
        for node in graph.node:
            node.input[:] = [renames.get(n, n) for n in node.input]
            node.output[:] = [renames.get(n, n) for n in node.output]
        onnx.save(graph_model, str(target / name))
    vocab = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    shutil.copy(vocab, vocab_dir / vocab.name)
    return datadir


def rclip_venv(root: Path) -> Path:
    """A venv with PyPI rclip==3.3.0; returns the path of its `rclip` executable."""
    venv = root / "rclip-venv"
    exe = venv / "bin" / "rclip"
    if exe.is_file():
        return exe
    log(f"creating {venv} with rclip=={RCLIP_VERSION}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"rclip=={RCLIP_VERSION}"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return exe


def rclip_env(datadir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")}
    env.update({"RCLIP_DATADIR": str(datadir), "HF_HUB_OFFLINE": "1"})
    return env


def compile_bytecode() -> None:
    """Compile clipsearch's modules to .pyc files, as `pip install` does (an editable install, as in this checkout,
    leaves that to the first import, which PYTHONDONTWRITEBYTECODE prevents): timed runs then start as they do for a
    user, and as the tools they are compared with do (rclip's venv and site-packages were compiled by pip)."""
    import compileall

    import clipsearch
    import clipsearch.indexer
    import clipsearch.web

    for package in (clipsearch, clipsearch.indexer, clipsearch.web):
        for folder in package.__path__:
            compileall.compile_dir(folder, quiet=1)


def without_bytecode_veto(env: dict[str, str]) -> dict[str, str]:
    """`env` less PYTHONDONTWRITEBYTECODE: bytecode caching on, as for a user."""
    return {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}


def warm_page_cache(files: list[Path]) -> None:
    """Read every file once, so the timed run that follows reads from memory. This VM's kernel pages out memory
    left idle for about a minute (a DAMON pageout scheme, /sys/kernel/mm/damon), page cache included, so without
    this whichever system runs first after a pause pays for the disk."""
    for path in files:
        with open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass


def machine_note() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} cores, load average (1/5/15 min) {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"


def export_emoji_mini_standin(out: Path) -> Path:
    """A random-init bundle of the bundled default model's architecture (emoji-mini: ConvImageTower at 64 px +
    MiniLM text tower), for timing while the trained bundle is not installed. Same graphs, same cost."""
    if (out / "model.json").is_file():
        return out
    from clipsearch.train.export_bundle import write_emoji_bundle
    from clipsearch.train.towers import ConvImageTower, ConvTowerConfig, TextHead
    from clipsearch.train.trainer import preprocess_spec
    import torch

    log(f"exporting a random-init emoji-mini-architecture stand-in to {out}")
    torch.manual_seed(0)
    cfg = ConvTowerConfig()
    tower = ConvImageTower(cfg).eval()
    head = TextHead(384, cfg.embed_dim)
    return write_emoji_bundle(tower, head, out, "emoji-mini-arch-random", "fp32", preprocess_spec(cfg.image_size), 100.0,
                              {"kind": "random-init stand-in for timing"})
