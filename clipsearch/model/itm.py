"""Image-text matching (ITM) with a bundle's cross-encoder head, torch-free: onnxruntime + numpy + tokenizers.

Bundles exported by `clipsearch models export-blip` carry `itm.onnx` and an "itm" object in model.json::

    "itm": {"file": "itm.onnx", "inputs": ["input_ids", "attention_mask", "image_tokens"],
            "output": "itm_logits", "image_tokens": "image_tokens", "image_tokens_shape": [T, Dv],
            "match_index": 1, ...}

The head reads one text and the token sequence of one image (visual.onnx's second output, see
`ClipModel.image_tokens`) and gives two logits, "no match" and "match". `ItmScorer` scores one text against
K images in a single call of the graph: the graph does not broadcast, so the text's ids are repeated K times.
The session opens on the first score, so a model that never re-ranks never loads the graph.

Two kinds of head:

* BLIP (`clipsearch models export-blip`): itm.onnx holds its own text encoder with cross-attention; it
  reads the token ids.
* fusion (`clipsearch train itm`, the bundled emoji-mini): a small head over the frozen dual encoder. It
  reads the text tower's hidden states, a second output of textual.onnx named by "text_tokens"::

    "itm": {"kind": "fusion", "inputs": ["token_features", "attention_mask", "image_tokens"],
            "text_tokens": "token_features", "itc_weight": λ, ...}

"itc_weight" is the λ of the final re-ranking score, ITM match logit + λ·ITC cosine (1.0 when absent).

"calibration" (optional, `clipsearch train calibrate-match`): {"scale": a, "bias": b, ...} turns the final score
s into the match probability σ(a·s + b), fitted (Platt scaling) on held-out re-ranked candidates, so `match` and
`--min-match` mean "how likely this image is what the query names" and follow the result order. Without it the
head's own softmax is reported, which a head trained partly to rank does not keep calibrated.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BundleError
from .bundle import BundleInfo
from .integrity import check_files, check_text_side
from .tokenizer import TextTokenizer


@dataclass(frozen=True)
class ItmSpec:
    """model.json's "itm" object."""

    file: str
    inputs: tuple[str, ...]
    output: str
    image_tokens: str  # the name of visual.onnx's token output
    match_index: int
    text_tokens: str | None = None  # fusion heads: the name of textual.onnx's hidden-state output
    itc_weight: float = 1.0  # λ of the final score: ITM match logit + λ·ITC cosine
    image_tokens_shape: tuple[int, int] | None = None  # (T, D) of one image's tokens, when model.json says
    image_tokens_storage: str | None = None  # how the index stores them ("int8", "fp16"), when model.json says
    calibration: tuple[float, float] | None = None  # (a, b): match probability σ(a·final score + b), when fitted

    def match_probability(self, final_score: np.ndarray, softmax: np.ndarray) -> np.ndarray:
        """The `match` reported for re-ranked hits: calibrated from the final score when model.json has a
        calibration, else the head's softmax probability."""
        if self.calibration is None:
            return softmax
        return calibrated_match(final_score, *self.calibration)

    @classmethod
    def from_dict(cls, raw: Any) -> "ItmSpec":
        if not isinstance(raw, dict):
            raise BundleError("model.json's \"itm\" entry is not an object")
        try:
            return cls(file=str(raw.get("file", "itm.onnx")),
                       inputs=tuple(str(i) for i in raw.get("inputs", ("input_ids", "attention_mask", "image_tokens"))),
                       output=str(raw.get("output", "itm_logits")),
                       image_tokens=str(raw.get("image_tokens", "image_tokens")),
                       match_index=int(raw.get("match_index", 1)),
                       text_tokens=str(raw["text_tokens"]) if raw.get("text_tokens") else None,
                       itc_weight=_finite(raw.get("itc_weight", 1.0), "itc_weight"),
                       image_tokens_shape=((int(raw["image_tokens_shape"][0]), int(raw["image_tokens_shape"][1]))
                                           if raw.get("image_tokens_shape") else None),
                       image_tokens_storage=(str(raw["image_tokens_storage"]) if raw.get("image_tokens_storage")
                                             else None),
                       calibration=_calibration(raw.get("calibration")))
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise BundleError(f"model.json's \"itm\" entry is malformed: {exc}") from exc


def calibrated_match(final_score: np.ndarray, scale: float, bias: float) -> np.ndarray:
    """σ(scale·final score + bias): the calibrated match probability (model.json itm.calibration)."""
    return 1.0 / (1.0 + np.exp(-(scale * np.asarray(final_score, dtype=np.float64) + bias)))


def _calibration(raw: Any) -> tuple[float, float] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("calibration must be an object with scale and bias")
    scale = _finite(raw["scale"], "calibration scale")
    if scale <= 0:
        raise ValueError(f"calibration scale must be positive (a higher score is a likelier match), not {scale}")
    return scale, _finite(raw["bias"], "calibration bias")


def _finite(value: Any, name: str) -> float:
    number = float(value)
    if not np.isfinite(number):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    return number


@dataclass(frozen=True)
class ItmScores:
    """ITM results for one text against K images, in the images' order.

    logits        float32 [K, C]  the head's raw output (C = 2 for BLIP: no match, match)
    match_logit   float32 [K]     logits[:, match_index] minus the log-sum-exp of the other logits; for two
                                  classes simply logits[:, match] - logits[:, other] = log(p / (1 - p))
    probability   float32 [K]     softmax(logits)[:, match_index]
    """

    logits: np.ndarray
    match_logit: np.ndarray
    probability: np.ndarray


def itm_scores(logits: np.ndarray, match_index: int) -> ItmScores:
    """Match logit and probability from raw ITM logits [K, C] (exposed for tests and experiments)."""
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[1] < 2 or not 0 <= match_index < logits.shape[1]:
        raise BundleError(f"ITM logits of shape {list(logits.shape)} do not fit match_index {match_index}")
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probability = exp[:, match_index] / exp.sum(axis=1)
    others = np.delete(logits, match_index, axis=1)
    top = others.max(axis=1)
    other = top + np.log(np.exp(others - top[:, None]).sum(axis=1))
    return ItmScores(logits=logits, match_logit=(logits[:, match_index] - other).astype(np.float32),
                     probability=probability.astype(np.float32))


class ItmScorer:
    """Scores a text against images' tokens with a bundle's ITM graph (opened lazily)."""

    def __init__(self, info: BundleInfo, options=None, tokenizer: TextTokenizer | None = None,
                 textual=None) -> None:
        """`textual`: the bundle's text graph session (an `OnnxSession`), which a fusion head reads the text's
        hidden states from; opened here when not given."""
        from .runtime import OnnxSession, SessionOptions

        if "itm" not in info.extra:
            raise BundleError(f"model {info.name} has no ITM head (no \"itm\" object in its model.json)")
        self.info = info
        self.spec = ItmSpec.from_dict(info.extra["itm"])
        path = info.file(self.spec.file)
        if not path.is_file():
            raise BundleError(f"{info.path} is not a complete model bundle: missing {self.spec.file}",
                              "Export it again with `clipsearch models export-blip`.")
        self.session = OnnxSession(path, options or SessionOptions(),
                                   verify=lambda: check_files(info, (self.spec.file, f"{self.spec.file}.data"),
                                                              "re-ranking scores"))
        self.textual = None
        if self.spec.text_tokens is not None:
            self.textual = textual or OnnxSession(info.file("textual.onnx"), options or SessionOptions(),
                                                  verify=lambda: check_text_side(info))
        self._tokenizer = tokenizer
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """True once the ITM graph has been opened."""
        return self.session.loaded

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = TextTokenizer.from_bundle(self.info)
        return self._tokenizer

    def logits(self, text: str, image_tokens: np.ndarray) -> np.ndarray:
        """float32 [K, C]: the head's logits for `text` against each of K token sequences [K, T, Dv]."""
        if not isinstance(text, str):
            raise TypeError("ItmScorer scores one text (a str) against many images")
        tokens = np.ascontiguousarray(image_tokens, dtype=np.float32)
        if tokens.ndim != 3:
            raise ValueError(f"image_tokens must be [K, T, Dv], not {list(tokens.shape)}")
        count = tokens.shape[0]
        if count == 0:
            return np.zeros((0, 2), dtype=np.float32)
        batch = self.tokenizer([text])
        text_inputs = dict(batch.inputs)
        if self.textual is not None:  # a fusion head reads the text tower's hidden states, not the ids
            states = self.textual.run(batch.inputs, output=self.spec.text_tokens)
            text_inputs = {self.spec.inputs[0]: np.asarray(states, dtype=np.float32),
                           "attention_mask": batch.inputs.get("attention_mask", np.ones_like(batch.inputs["input_ids"]))}
        inputs = {name: np.repeat(value, count, axis=0) for name, value in text_inputs.items()}
        inputs[next((n for n in self.spec.inputs if n not in inputs), "image_tokens")] = tokens
        return np.asarray(self.session.run(inputs, output=self.spec.output), dtype=np.float32)

    def score(self, text: str, image_tokens: np.ndarray) -> ItmScores:
        """Logits, match logit and match probability of `text` against K images, in one graph call."""
        return itm_scores(self.logits(text, image_tokens), self.spec.match_index)
