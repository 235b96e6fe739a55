"""Embedding text and images with a model bundle: onnxruntime + numpy + Pillow + tokenizers, no torch.

`OnnxSession` is the one session abstraction: it opens its graph on first use (so a text query never
loads visual.onnx), picks CUDA when onnxruntime-gpu offers it and the CPU with every core otherwise.
`ClipModel` puts a bundle's two graphs, tokenizer and preprocessing together; for bundles with an ITM head
(BLIP) it also gives the image tokens the head reads and a lazily opened `ItmScorer` (see itm.py).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .bundle import BundleInfo, PreprocessSpec, read_bundle, read_preprocess
from ..errors import BundleError
from .integrity import check_image_side, check_text_side
from .preprocess import image_to_pixels
from .tokenizer import TextTokenizer


@dataclass(frozen=True)
class SessionOptions:
    """How to run a graph: thread count (None = all cores) and provider preference."""

    threads: int | None = None
    providers: tuple[str, ...] | None = None
    # fp16 graphs crash onnxruntime's CPU layout optimiser (ORT_ENABLE_ALL, seen with 1.32); they get "extended".
    optimization: str = "all"

    def resolved_providers(self) -> list[str]:
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = self.providers or ("CUDAExecutionProvider", "CPUExecutionProvider")
        chosen = [p for p in wanted if p in available]
        return chosen or ["CPUExecutionProvider"]


class OnnxSession:
    """A lazily opened onnxruntime session for one graph file; `verify` (if given) runs once before it is opened
    and raises to refuse it (the bundle's checksums: integrity.py)."""

    def __init__(self, path: Path, options: SessionOptions = SessionOptions(),
                 verify: Callable[[], None] | None = None) -> None:
        self.path = path
        self.options = options
        self._verify = verify
        self._session = None
        self._input_names: frozenset[str] | None = None  # read once from the graph, not per call
        self._first_output: str | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def _open(self):
        import onnxruntime as ort

        if self._verify is not None:
            self._verify()
        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self.options.optimization == "all"
                                       else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        so.intra_op_num_threads = self.options.threads or os.cpu_count() or 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            return ort.InferenceSession(str(self.path), sess_options=so, providers=self.options.resolved_providers())
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt graphs
            raise BundleError(f"cannot load {self.path}: {exc}") from exc

    @property
    def session(self):
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = self._open()
        return self._session

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, inputs: dict[str, np.ndarray], output: str | None = None) -> np.ndarray:
        """The graph's `output` (default: its first output). Only that output is requested from onnxruntime,
        so a graph with a second, large output (BLIP's image tokens) does not hand it back to every caller."""
        session = self.session
        self.run_prepare()
        wanted = output or self._first_output
        return session.run([wanted], {k: v for k, v in inputs.items() if k in self._input_names})[0]

    def run_outputs(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """Several named outputs of one call of the graph (e.g. an image's embedding and its tokens)."""
        self.run_prepare()
        return self.session.run(list(outputs), {k: v for k, v in inputs.items() if k in self._input_names})

    def run_prepare(self) -> None:
        """Open the graph and read its input names (done by the first run)."""
        if self._input_names is None:
            session = self.session
            self._first_output = session.get_outputs()[0].name  # before _input_names: other threads test that
            self._input_names = frozenset(i.name for i in session.get_inputs())


UNIT_TOLERANCE = 0.01  # |norm - 1| a graph's output may have (fp16 and int8 graphs round; damage gives 0 or NaN)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Per row of `vectors` [N, D]: whether it is unit length within UNIT_TOLERANCE (finite)."""
    if not len(vectors):
        return np.ones(0, dtype=bool)
    norms = np.linalg.norm(np.asarray(vectors, dtype=np.float64), axis=1)
    return np.isfinite(norms) & (np.abs(norms - 1.0) <= UNIT_TOLERANCE)


class ClipModel:
    """A dual encoder loaded from a bundle: `encode_text` and `encode_images` give L2-normalised vectors."""

    def __init__(self, bundle: BundleInfo | Path | str, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        self.info = bundle if isinstance(bundle, BundleInfo) else read_bundle(bundle)
        self.preprocess: PreprocessSpec = read_preprocess(self.info)
        options = SessionOptions(threads=threads, providers=tuple(providers) if providers else None,
                                 optimization="extended" if self.info.precision == "fp16" else "all")
        self._verified: dict = {}  # bundle files this model found matching model.json (integrity.py)
        self.visual = OnnxSession(self.info.file("visual.onnx"), options, verify=self.check_image_side)
        self.textual = OnnxSession(self.info.file("textual.onnx"), options, verify=self.check_text_side)
        self._tokenizer: TextTokenizer | None = None
        self._options = options
        self._itm = None  # ItmScorer, made on first use of `itm`
        self._itm_lock = threading.Lock()

    def check_image_side(self) -> None:
        """BundleError if a file deciding image vectors no longer matches model.json (once hashed: a stat)."""
        check_image_side(self.info, verified=self._verified)

    def check_text_side(self) -> None:
        """As `check_image_side`, for query vectors."""
        check_text_side(self.info, verified=self._verified)

    @property
    def embed_dim(self) -> int:
        return self.info.embed_dim

    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self.check_text_side()  # a changed tokenizer.json is named as such, not by what parsing it says
            self._tokenizer = TextTokenizer.from_bundle(self.info)
        return self._tokenizer

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings")
        if not texts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        batch = self.tokenizer(texts)
        return self._checked(np.ascontiguousarray(self.textual.run(batch.inputs), dtype=np.float32), "textual.onnx")

    def _checked(self, vectors: np.ndarray, graph: str, bad_rows_ok: bool = False) -> np.ndarray:
        """`vectors`, unless the graph's output width is not the embed_dim model.json states (a bundle whose
        model.json was edited): nothing of another width may be stored or compared."""
        if vectors.ndim != 2 or vectors.shape[1] != self.embed_dim:
            raise BundleError(f"model {self.info.name}: {graph} outputs vectors of shape {list(vectors.shape[1:])}, "
                              f"its model.json says embed_dim {self.embed_dim}",
                              "Export or download the bundle again (model.json does not describe its graphs).")
        # Every graph ends in an L2 normalisation: rows that are not unit length (zeros, NaN) come from damaged
        # weights, and stored they would answer every search with the same score. `bad_rows_ok` (the indexer, which
        # leaves such images out one by one): only a batch of several that is bad throughout is refused.
        bad = ~unit_rows(vectors)
        if bad.any() and (not bad_rows_ok or (bad.all() and len(vectors) > 1)):
            norms = np.linalg.norm(vectors, axis=1)
            first = int(np.flatnonzero(bad)[0])
            raise BundleError(f"model {self.info.name}: {graph} output {int(bad.sum())} of {len(vectors)} vectors that "
                              f"are not unit length (row {first} has norm {float(norms[first]):.4g}): its weights are "
                              "damaged",
                              "Check it with `clipsearch models info MODEL --verify`; export or download it again.")
        return vectors

    def open_visual(self) -> None:
        """Load the visual graph now rather than on the first image."""
        self.visual.run_prepare()

    def encode_pixels(self, pixels: np.ndarray, bad_rows_ok: bool = False) -> np.ndarray:
        """`bad_rows_ok`: a row that is not unit length (damaged output for one image) is returned as it is, for the
        caller to leave out; a whole batch of them is refused all the same."""
        if len(pixels) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return self._checked(np.ascontiguousarray(
            self.visual.run({"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)}), dtype=np.float32),
            "visual.onnx", bad_rows_ok)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return self.encode_pixels(np.stack([image_to_pixels(img, self.preprocess) for img in images]))

    # -- ITM (bundles whose model.json has an "itm" object, e.g. BLIP) ----------------------------
    @property
    def has_itm(self) -> bool:
        return isinstance(self.info.extra.get("itm"), dict)

    @property
    def itm(self):
        """The bundle's `ItmScorer` (its graph opens on the first score), or None when there is no ITM head."""
        if not self.has_itm:
            return None
        if self._itm is None:
            with self._itm_lock:
                if self._itm is None:
                    from .itm import ItmScorer

                    self._itm = ItmScorer(self.info, self._options, tokenizer=self.tokenizer,
                                           textual=self.textual)
        return self._itm

    @property
    def itm_spec(self):
        """model.json's "itm" object as an `ItmSpec`, or None without an ITM head (no graph is opened)."""
        if not self.has_itm:
            return None
        from .itm import ItmSpec

        return ItmSpec.from_dict(self.info.extra["itm"])

    @property
    def image_tokens_output(self) -> str | None:
        """The name of visual.onnx's token output the ITM head reads, or None without an ITM head."""
        spec = self.itm_spec
        return spec.image_tokens if spec is not None else None

    @property
    def image_tokens_shape(self) -> tuple[int, int] | None:
        """(T, D) of one image's tokens as model.json states it, or None without an ITM head."""
        spec = self.itm_spec
        return spec.image_tokens_shape if spec is not None else None

    def encode_pixels_with_tokens(self, pixels: np.ndarray, bad_rows_ok: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """One call of the visual graph giving both the L2-normalised embeddings [N, D] and the ITM image
        tokens [N, T, Dt] (float32). BundleError for a bundle without an ITM head."""
        name = self.image_tokens_output
        if name is None:
            raise BundleError(f"model {self.info.name} has no ITM head: its visual graph gives no image tokens")
        if len(pixels) == 0:
            t, d = self.image_tokens_shape or (0, 0)
            return np.zeros((0, self.embed_dim), np.float32), np.zeros((0, t, d), np.float32)
        embeds_name = self.visual.session.get_outputs()[0].name
        embeds, tokens = self.visual.run_outputs({"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)},
                                                 [embeds_name, name])
        return (self._checked(np.ascontiguousarray(embeds, dtype=np.float32), "visual.onnx", bad_rows_ok),
                np.ascontiguousarray(tokens, dtype=np.float32))

    def image_tokens(self, images: Sequence[Image.Image]) -> np.ndarray:
        """float32 [len(images), T, Dv]: the visual graph's token output that the ITM head attends to (named
        in model.json's itm object), in one batch. BundleError for a bundle without an ITM head."""
        pixels = (np.stack([image_to_pixels(img, self.preprocess) for img in images]) if images
                  else np.zeros((0, 3, *self.preprocess.size), dtype=np.float32))
        return self.encode_pixels_with_tokens(pixels)[1]
