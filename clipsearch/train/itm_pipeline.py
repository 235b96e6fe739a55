"""`clipsearch train itm BUNDLE`: features → head → λ → a bundle that re-ranks.

Kept apart from the CLI so scripts and tests call the same code path as the command.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from ..errors import ClipsearchError
from ..model.bundle import read_bundle, read_preprocess, write_model_json
from ..model.tokenizer import TextTokenizer
from .augment import composite_white, render_batch
from .itm_data import ItmCorpus, ItmFeatures, build_corpus, encode_texts_with_states, family_split, \
    style_split
from .itm_branch import ConvBranch
from .itm_graphs import IMAGE_TOKENS, TEXT_TOKENS, expose_text_states, first_output_only, graft_image_tokens, \
    image_feature_map, tapped, text_hidden_states
from .itm_head import ItmHead, ItmHeadConfig
from .itm_train import ITC_WEIGHTS, ItmTrainConfig, load_head, save_head, train_itm_head, validation_rerank

OPSET = 17
ITM_FILE = "itm.onnx"


class TappedBundle:
    """A bundle's own graphs with the head's inputs exposed, run with onnxruntime."""

    def __init__(self, bundle: Path, threads: int | None = None, grid_side: int | None = None) -> None:
        import onnxruntime as ort

        self.info = read_bundle(bundle)
        self.preprocess = read_preprocess(self.info)
        self.tokenizer = TextTokenizer.from_bundle(self.info)
        # a bundle that already re-ranks is read as it was before its head: embeddings only
        visual = first_output_only(onnx.load(str(self.info.file("visual.onnx"))))
        textual = first_output_only(onnx.load(str(self.info.file("textual.onnx"))))
        self.visual_graph = visual
        self.feature_map = image_feature_map(visual, grid_side)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.visual = ort.InferenceSession(
            tapped(visual, {"fmap": self.feature_map}).SerializeToString(), so,
            providers=["CPUExecutionProvider"])
        self.textual = ort.InferenceSession(
            tapped(textual, {"states": text_hidden_states(textual)}).SerializeToString(), so,
            providers=["CPUExecutionProvider"])
        self.visual_out = [visual.graph.output[0].name, "fmap"]
        self.textual_out = [textual.graph.output[0].name, "states"]
        self.text_inputs = {i.name for i in self.textual.get_inputs()}

    def images(self, rgb01: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        mean = torch.tensor(self.preprocess.mean)[None, :, None, None]
        std = torch.tensor(self.preprocess.std)[None, :, None, None]
        pixels = ((rgb01 - mean) / std).numpy().astype(np.float32)
        emb, fmap = self.visual.run(self.visual_out, {"pixel_values": pixels})
        return emb, fmap

    def texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        batch = self.tokenizer(texts)
        emb, states = self.textual.run(self.textual_out, {k: v for k, v in batch.inputs.items() if k in self.text_inputs})
        return emb, states, batch.lengths


def build_features(tapped_bundle: TappedBundle, corpus: ItmCorpus, sprites: np.ndarray, sprite_concepts: np.ndarray,
                   copies: int, seed: int, log: Callable[[str], None] = print, keep_pixels: bool = False) -> ItmFeatures:
    """With `keep_pixels`, the renderings are rounded to 8 bits (as decoded images are) and kept, for a head
    with its own image branch."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed + 3)
    size = sprites.shape[1]
    embeds, fmaps, concepts, scene_of, val, unseen, pixels = [], [], [], [], [], [], []
    empty = np.zeros((0, size, size, 4), dtype=np.uint8)

    def add(rgb: torch.Tensor, concept: np.ndarray, scene: np.ndarray, is_val: bool, is_unseen: np.ndarray) -> None:
        if keep_pixels:
            levels = (rgb * 255.0).round().clamp(0, 255)
            pixels.append(levels.to(torch.uint8).numpy())
            rgb = levels / 255.0
        for start in range(0, len(rgb), 512):
            e, f = tapped_bundle.images(rgb[start:start + 512])
            embeds.append(e)
            fmaps.append(f.astype(np.float16))
        concepts.append(concept)
        scene_of.append(scene)
        val.append(np.full(len(rgb), is_val))
        unseen.append(is_unseen)

    first_unseen = len(sprites) if corpus.first_unseen is None else corpus.first_unseen

    for is_val, idx in ((False, corpus.singles), (True, corpus.val)):
        for copy in range(1 if is_val else 1 + copies):
            for start in range(0, len(idx), 2048):
                part = idx[start:start + 2048]
                rgb = (composite_white(sprites[part]) if copy == 0
                       else render_batch(sprites[part], empty, empty, np.zeros(0, np.int64), size, gen))
                add(rgb, sprite_concepts[part], np.full(len(part), -1), is_val, part >= first_unseen)
        log(f"  rendered and embedded {'validation' if is_val else 'training'} singles")
    by_concept: dict[int, list[int]] = {}
    for i in corpus.singles:
        by_concept.setdefault(int(sprite_concepts[i]), []).append(int(i))
    for start in range(0, len(corpus.scenes), 2048):
        part = corpus.scenes[start:start + 2048]
        a = sprites[[rng.choice(by_concept[s.a]) for s in part]]
        b = sprites[[rng.choice(by_concept[s.b]) for s in part]]
        rgb = render_batch(np.zeros((0, size, size, 4), np.uint8), a, b, np.array([s.layout for s in part]), size, gen)
        add(rgb, np.full(len(part), -1), np.arange(start, start + len(part)), False, np.zeros(len(part), bool))
    log(f"  rendered and embedded {len(corpus.scenes)} scenes")
    text_embeds, states, offsets = encode_texts_with_states(tapped_bundle.texts, corpus.captions, log=log)
    spec = tapped_bundle.preprocess
    return ItmFeatures(np.concatenate(embeds), np.concatenate(fmaps), np.concatenate(concepts).astype(np.int64),
                       np.concatenate(scene_of).astype(np.int64), np.concatenate(val), text_embeds, states, offsets,
                       np.concatenate(unseen), np.concatenate(pixels) if keep_pixels else None,
                       np.asarray(spec.mean, np.float32) if keep_pixels else None,
                       np.asarray(spec.std, np.float32) if keep_pixels else None)


# ------------------------------------------------------------------------------------------ export
def _export(module: torch.nn.Module, args: tuple, inputs: list[str], output: str, axes: dict) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(module, args, buffer, input_names=inputs, output_names=[output], dynamic_axes=axes,
                      opset_version=OPSET, do_constant_folding=True, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


class _BranchTokenizer(torch.nn.Module):
    """A head's own image branch and its tokenizer, as one graph: pixel_values, embeds -> image_tokens."""

    def __init__(self, head: ItmHead) -> None:
        super().__init__()
        self.branch, self.tokenizer = head.branch, head.tokenizer

    def forward(self, pixel_values: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self.tokenizer(self.branch(pixel_values), embeds)


def head_graphs(head: ItmHead) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(image tokenizer graph: feature_map (or pixel_values, for a head with its own branch), embeds ->
    image_tokens; fusion graph: text_tokens, attention_mask, image_tokens -> itm_logits)."""
    cfg = head.cfg
    emb = torch.randn(2, cfg.embed_dim)
    if head.branch is not None:
        size = int(head.branch.spec["image_size"])
        tokenizer = _export(_BranchTokenizer(head), (torch.randn(2, 3, size, size), emb), ["pixel_values", "embeds"],
                            IMAGE_TOKENS, {"pixel_values": {0: "batch"}, "embeds": {0: "batch"},
                                           IMAGE_TOKENS: {0: "batch"}})
    else:
        side = int(round(cfg.grid_tokens ** 0.5))
        fmap = torch.randn(2, cfg.grid_width, side, side)
        tokenizer = _export(head.tokenizer, (fmap, emb), ["feature_map", "embeds"], IMAGE_TOKENS,
                            {"feature_map": {0: "batch"}, "embeds": {0: "batch"}, IMAGE_TOKENS: {0: "batch"}})
    states = torch.randn(2, 5, cfg.text_width)
    mask = torch.ones(2, 5, dtype=torch.int64)
    tokens = torch.randn(2, cfg.image_tokens, cfg.width)
    fusion = _export(head.fusion, (states, mask, tokens), [TEXT_TOKENS, "attention_mask", IMAGE_TOKENS],
                     "itm_logits", {TEXT_TOKENS: {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                    IMAGE_TOKENS: {0: "batch"}, "itm_logits": {0: "batch"}})
    return tokenizer, fusion


def quantize_itm(source: Path, target: Path) -> None:
    """itm.onnx with int8 weights (dynamic quantisation, per channel): a quarter of the size."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm"])


def onnx_validation_rerank(itm_path: Path, head: ItmHead, features: ItmFeatures, corpus: ItmCorpus,
                           itc_weight: float, k: int = 32) -> tuple[float, float]:
    """R@1/R@10 of re-ranking the validation split with the graph at `itm_path` (image tokens from the torch
    tokenizer, rounded to int8 as stored) — to compare an fp32 and an int8 head graph on the training styles."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(itm_path), providers=["CPUExecutionProvider"])
    rows = np.flatnonzero(features.image_val)
    concepts = features.image_concepts[rows]
    queries = sorted(set(int(c) for c in concepts))
    with torch.no_grad():
        tokens = head.image_tokens(torch.from_numpy(features.image_inputs(rows, head.branch is not None)),
                                   torch.from_numpy(features.image_embeds[rows])).numpy()
    r1 = r10 = 0
    for concept in queries:
        cap = corpus.concept_captions[concept][0]
        sims = features.text_embeds[cap] @ features.image_embeds[rows].T
        top = np.argsort(-sims)[:k]
        states, mask = features.states([cap])
        logits = session.run(None, {TEXT_TOKENS: np.repeat(states, len(top), 0), "attention_mask": np.repeat(mask, len(top), 0),
                                    IMAGE_TOKENS: tokens[top]})[0]
        final = logits[:, 1] - logits[:, 0] + itc_weight * sims[top]
        ranked = concepts[top[np.argsort(-final, kind="stable")]]
        r1 += int(ranked[0] == concept)
        r10 += int((ranked[:10] == concept).any())
    return 100.0 * r1 / len(queries), 100.0 * r10 / len(queries)


def write_itm_bundle(source: Path, out: Path, head: ItmHead, itc_weight: float, provenance: dict,
                     itm_precision: str = "fp32") -> Path:
    """A copy of `source` whose visual.onnx also gives image tokens and whose textual.onnx also gives its
    hidden states, plus itm.onnx and the "itm" object in model.json. The embedding outputs are unchanged,
    so the bundle keeps the source's model id (model.json "model_id_from" names the original visual graph)."""
    info = read_bundle(source)
    tokenizer_graph, fusion = head_graphs(head)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "preprocess.json", "ATTRIBUTION.md", "text_head.npy"):
        if info.file(name).is_file() and source.resolve() != out.resolve():
            shutil.copyfile(info.file(name), out / name)  # a file shared with a sibling is copied here
    attribution = out / "ATTRIBUTION.md"
    if provenance.get("head_styles") and attribution.is_file():
        from .emoji_data import HEAD_ATTRIBUTION

        text = attribution.read_text(encoding="utf-8")
        if HEAD_ATTRIBUTION not in text:
            attribution.write_text(text.rstrip("\n") + "\n" + HEAD_ATTRIBUTION, encoding="utf-8")
    # a source that already re-ranks loses its old head first (embedding outputs untouched)
    visual = graft_image_tokens(first_output_only(onnx.load(str(info.file("visual.onnx")))), tokenizer_graph)
    textual = expose_text_states(first_output_only(onnx.load(str(info.file("textual.onnx")))))
    onnx.save(visual, str(out / "visual.onnx"))
    onnx.save(textual, str(out / "textual.onnx"))
    if itm_precision == "int8":
        onnx.save(fusion, str(out / (ITM_FILE + ".fp32")))
        quantize_itm(out / (ITM_FILE + ".fp32"), out / ITM_FILE)
        (out / (ITM_FILE + ".fp32")).unlink()
    else:
        onnx.save(fusion, str(out / ITM_FILE))
    meta = json.loads((source / "model.json").read_text(encoding="utf-8"))
    meta.pop("files", None)
    meta.pop("links", None)  # write_bundles shares files again between the new bundles
    meta["model_id_from"] = meta.get("model_id_from") or info.files.get("visual.onnx")
    cfg = head.cfg
    meta["itm"] = {
        "kind": "fusion", "file": ITM_FILE, "inputs": [TEXT_TOKENS, "attention_mask", IMAGE_TOKENS],
        "output": "itm_logits", "match_index": 1, "image_tokens": IMAGE_TOKENS,
        "image_tokens_shape": [cfg.image_tokens, cfg.width], "image_tokens_storage": "int8",
        "text_tokens": TEXT_TOKENS, "itc_weight": itc_weight, "precision": itm_precision, "head": cfg.to_dict(),
        "training": provenance,
    }
    write_model_json(out, meta)
    return out


@dataclass(frozen=True)
class ItmRunRequest:
    bundle: Path
    out: list[Path]  # bundles to write (the first is `bundle` re-written with the head; more share the head)
    work_dir: Path
    steps: int = 1500
    time_budget_s: float | None = None
    copies: int = 2
    n_scenes: int = 12000
    seed: int = 0
    threads: int | None = None
    init: Path | None = None  # continue from a head checkpoint (e.g. a run with the matching loss only)
    rank_queries: int = 0  # queries per step of the re-ranking loss (0: matching loss only)
    grid_side: int | None = None  # the image tokens' feature map: None = the last stage, else its side (6: 6×6)
    # Styles the towers never saw (emoji_data.HEAD_STYLES): the head trains on most of their families and λ is
    # chosen on the rest; with none, it trains on the training styles alone and λ on the towers' validation split.
    head_styles: tuple[str, ...] = ()
    head_val_fraction: float = 0.15
    # One of head_styles held out whole (no family of it trained on) for λ, as Noto is held out of everything;
    # None: held-out families of every head style (`head_val_fraction`)
    val_style: str | None = None
    # The head gets its own copy of the tower's trunk up to the feature map (initialised from it), fine-tuned on
    # the renderings' pixels by the ITM loss; it runs beside the tower in visual.onnx (itm_branch.py).
    image_branch: bool = False
    style_jitter: bool = False  # the branch sees its training renderings in jittered drawing styles


def provenance_init(init: Path | None) -> dict | None:
    """What a continued run started from: the earlier run's own provenance."""
    if init is None:
        return None
    _, raw = load_head(init)
    return {"checkpoint": Path(init).name, "provenance": raw.get("provenance")}


def run_itm(request: ItmRunRequest, sources: list[Path], log: Callable[[str], None] = print) -> dict:
    """Train the head on `request.bundle`'s features and write it into each of `sources` → `request.out`."""
    from .data import _split
    from .emoji_data import TRAIN_STYLES

    from .emoji_data import open_emoji_dataset

    if request.val_style is not None and request.val_style not in request.head_styles:
        raise ClipsearchError(f"the validation style {request.val_style!r} is not a head style",
                              "Name it with --head-style too.")
    started = time.perf_counter()
    request.work_dir.mkdir(parents=True, exist_ok=True)
    bundle = TappedBundle(request.bundle, request.threads, request.grid_side)
    size = bundle.preprocess.size[0]
    dataset = open_emoji_dataset(size)
    sets = [dataset.sprites(s) for s in TRAIN_STYLES]
    tower_sprites = sum(len(s.images) for s in sets)
    train_idx, val_idx = _split(tower_sprites, 0.03, np.random.default_rng(0))  # the towers' own split
    first_unseen = None
    if request.head_styles:  # the towers' validation sprites stay out; λ is chosen on unseen art instead
        first_unseen = tower_sprites
        head_sets = [dataset.sprites(s) for s in request.head_styles]
        if request.val_style is not None:
            head_train, head_val = style_split([len(s.concepts) for s in head_sets],
                                               request.head_styles.index(request.val_style))
        else:
            head_train, head_val = family_split(dataset.concepts, np.concatenate([s.concepts for s in head_sets]),
                                                request.head_val_fraction, request.seed)
        train_idx, val_idx = np.concatenate([train_idx, first_unseen + head_train]), first_unseen + head_val
        sets += head_sets
    sprites = np.concatenate([s.images for s in sets])
    sprite_concepts = np.concatenate([s.concepts for s in sets]).astype(np.int64)
    labels = [c.label for c in dataset.concepts]
    corpus = build_corpus(labels, sprite_concepts, train_idx, val_idx, request.n_scenes, request.seed, first_unseen)
    variant = ("" if request.grid_side is None else f"grid{request.grid_side}") + \
        "".join(f"+{s}" for s in request.head_styles) + ("+pixels" if request.image_branch else "")
    # the model id follows visual.onnx only; the text states come from textual.onnx, so its checksum is in the key
    source = bundle.info.model_id + bundle.info.files.get("textual.onnx", "")
    cache = request.work_dir / f"features-{corpus.key(source + str(request.copies) + variant)}.npz"
    if cache.is_file():
        features = ItmFeatures.load(cache)
        log(f"features from {cache}")
    else:
        log(f"computing features: {len(train_idx)} sprites × {1 + request.copies}, {len(val_idx)} validation, "
            f"{len(corpus.scenes)} scenes, {len(corpus.captions)} captions")
        features = build_features(bundle, corpus, sprites, sprite_concepts, request.copies, request.seed, log,
                                  keep_pixels=request.image_branch)
        features.save(cache)
    feature_seconds = time.perf_counter() - started
    head_cfg = ItmHeadConfig(text_width=features.text_states.shape[1], grid_width=features.feature_maps.shape[1],
                             grid_tokens=features.feature_maps.shape[2] * features.feature_maps.shape[3],
                             embed_dim=features.image_embeds.shape[1])
    cfg = ItmTrainConfig(steps=request.steps, time_budget_s=request.time_budget_s, seed=request.seed,
                         init=str(request.init) if request.init else None, rank_queries=request.rank_queries,
                         style_jitter=request.style_jitter,
                         **({"batch_singles": 32, "batch_scenes": 16, "lr": 5e-4} if request.init else {}))
    checkpoint = request.work_dir / "itm-head.pt"
    branch = ConvBranch.from_onnx(bundle.visual_graph, bundle.feature_map) if request.image_branch else None
    result = train_itm_head(features, corpus, head_cfg, cfg, log, branch)
    weights = ITC_WEIGHTS + ((round(result.learned_itc_weight, 2),) if result.learned_itc_weight else ())
    chosen, table = validation_rerank(result.head, features, corpus, weights=tuple(sorted(set(weights))))
    for row in table:
        log(f"  validation λ={row.itc_weight:g}: R@1 {row.r1:.1f}  R@10 {row.r10:.1f}")
    log(f"chosen λ = {chosen.itc_weight:g}")
    itm_precision, graph_figures = choose_itm_precision(result.head, features, corpus, chosen.itc_weight,
                                                        request.work_dir, log)
    provenance = {
        "steps": result.steps, "train_seconds": round(result.seconds, 1), "feature_seconds": round(feature_seconds, 1),
        "config": asdict(cfg), "copies": request.copies, "scenes": len(corpus.scenes),
        "captions": len(corpus.captions), "minimal_pair_concepts": len(corpus.pairs),
        "validation": [asdict(r) for r in table],
        "itc_weight_chosen_on": (f"the held-out style {request.val_style}" if request.val_style else
                                 f"held-out families of {', '.join(request.head_styles)}" if request.head_styles
                                 else "validation split of the training styles"),
        "head_styles": list(request.head_styles),
        "threads": torch.get_num_threads(), "itm_graph_validation": graph_figures,
        "learned_itc_weight": result.learned_itc_weight, "init": provenance_init(request.init),
        "image_branch": request.image_branch, "style_jitter": request.style_jitter,
        "feature_map": f"{features.feature_maps.shape[1]}×{features.feature_maps.shape[2]}×{features.feature_maps.shape[3]}",
    }
    save_head(result.head, checkpoint, {"provenance": provenance, "itc_weight": chosen.itc_weight,
                                        "itm_precision": itm_precision})
    write_bundles(result.head, chosen.itc_weight, provenance, itm_precision, sources, request.out, log)
    return provenance


def choose_itm_precision(head: ItmHead, features: ItmFeatures, corpus: ItmCorpus, itc_weight: float,
                         work_dir: Path, log: Callable[[str], None] = print) -> tuple[str, dict]:
    """int8 when the int8 head graph re-ranks the validation split within 0.5 point (R@1 and R@10) of the
    fp32 graph, fp32 otherwise."""
    fp32, int8 = work_dir / "itm-fp32.onnx", work_dir / "itm-int8.onnx"
    onnx.save(head_graphs(head)[1], str(fp32))
    quantize_itm(fp32, int8)
    figures = {"fp32": onnx_validation_rerank(fp32, head, features, corpus, itc_weight),
               "int8": onnx_validation_rerank(int8, head, features, corpus, itc_weight),
               "bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}}
    (r1_32, r10_32), (r1_8, r10_8) = figures["fp32"], figures["int8"]
    chosen = "int8" if r1_8 >= r1_32 - 0.5 and r10_8 >= r10_32 - 0.5 else "fp32"
    log(f"head graph on validation: fp32 R@1 {r1_32:.1f} R@10 {r10_32:.1f}; int8 R@1 {r1_8:.1f} R@10 {r10_8:.1f} "
        f"→ {chosen}")
    return chosen, figures


SHARED_FILES = ("textual.onnx", ITM_FILE, "tokenizer.json", "text_head.npy")


def write_bundles(head: ItmHead, itc_weight: float, provenance: dict, itm_precision: str, sources: list[Path],
                  outs: list[Path], log: Callable[[str], None] = print) -> None:
    """One bundle per source; later bundles beside the first store the files they have in common once."""
    from ..model.bundle import share_files, sha256_file

    for source, out in zip(sources, outs):
        write_itm_bundle(source, out, head, itc_weight, provenance, itm_precision)
        log(f"wrote {out}")
    first = outs[0]
    for out in outs[1:]:
        if out.resolve().parent == first.resolve().parent:
            same = tuple(n for n in SHARED_FILES if sha256_file(out / n) == sha256_file(first / n))
            share_files(out, first, same)
            log(f"{out.name} shares {', '.join(same)} with {first.name}")

