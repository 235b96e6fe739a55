"""Hugging Face BLIP image-text retrieval (`BlipForImageTextRetrieval`) → clipsearch bundle (needs the `export`
extra: torch, transformers, onnx). The bundle runs without torch like every other.

BLIP is two models in one: a dual encoder (ITC: image and text embeddings compared by cosine, which is what
the index holds) and a cross-encoder (ITM: the text encoder attending to the image's token sequence, then a
2-way "match / no match" head) that is too slow to run over a whole collection but good at re-ranking the
top hits of the ITC search. The bundle therefore holds three graphs:

    visual.onnx   pixel_values float32 [batch, 3, H, W]
                  -> image_embeds float32 [batch, D]            (L2-normalised; vision_proj of the CLS token)
                  -> image_tokens float32 [batch, T, Dv]        (the vision model's last hidden states, for ITM)
    textual.onnx  input_ids, attention_mask int64 [batch, seq]
                  -> text_embeds float32 [batch, D]             (L2-normalised; text_proj of [CLS], no cross-attention)
    itm.onnx      input_ids, attention_mask int64 [batch, seq], image_tokens float32 [batch, T, Dv]
                  -> itm_logits float32 [batch, 2]              (softmax(...)[:, 1] is the probability of a match)

model.json gets an "itm" object naming the file and its inputs/outputs, and the sha256 of itm.onnx (and of
its external weights) under "files", so `clipsearch models info --verify` covers it.

optimum has no BLIP exporter, so the graphs are written out here from the modules' weights with plain ops
(batch-first attention, additive padding mask), which keeps the batch and sequence axes dynamic when traced.
The math is the eager path of transformers' modeling_blip / modeling_blip_text.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .bundle import PreprocessSpec, TextSpec, staged_folder, write_model_json
from .export import HUB_HOST, OPSET, PRECISIONS, _hub_reachable, export_extra_missing, externalize_weights
from .quantize import convert_graph
from ..errors import ModelNotAvailable

DEFAULT_MODEL_ID = "Salesforce/blip-itm-base-coco"
ITM_FILE = "itm.onnx"
# Added to attention scores at padded positions. exp() of it is 0 in fp32 as with transformers' finfo.min,
# and it stays finite when the graph is converted to fp16.
_MASKED = -1.0e4
_RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL / PILImageResampling codes


def import_transformers(model: str = "a BLIP model"):
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as exc:
        raise export_extra_missing(model, "torch and transformers") from exc
    return transformers


def _offline_requested() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in ("CLIPSEARCH_OFFLINE", "HF_HUB_OFFLINE"))


def _cached(model_id: str) -> bool:
    """True when the hub cache holds this model's config (then loading is attempted from the cache only)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def _not_available(model_id: str, cause: str) -> ModelNotAvailable:
    return ModelNotAvailable(
        f"BLIP model {model_id} is not cached and cannot be downloaded: {cause}",
        f"Fix: connect to the internet and run `clipsearch models export-blip {model_id} --out DIR` once "
        "(the bundle then works offline), pass a local folder saved with save_pretrained, "
        "or use the bundled offline model: --model emoji-mini",
    )


def load_blip(model_id: str = DEFAULT_MODEL_ID):
    """`(model, tokenizer, image_processor)` of a hub id or a local save_pretrained folder, model in eval mode.

    With nothing cached and the hub unreachable (or CLIPSEARCH_OFFLINE / HF_HUB_OFFLINE set), raises
    ModelNotAvailable naming the model, the cause and the fix instead of a long download traceback."""
    transformers = import_transformers(model_id)
    local = Path(model_id).expanduser()
    if local.is_dir():
        source, local_only = str(local), True
    else:
        source = model_id
        local_only = _offline_requested() or not _hub_reachable()
        if local_only and not _cached(model_id):
            cause = ("offline mode is on (CLIPSEARCH_OFFLINE or HF_HUB_OFFLINE)" if _offline_requested()
                     else f"{HUB_HOST} is unreachable (offline?)")
            raise _not_available(model_id, cause)
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=local_only)
        architectures = list(getattr(config, "architectures", None) or [])
        if architectures and "BlipForImageTextRetrieval" not in architectures:
            raise ModelNotAvailable(
                f"{model_id} is a {', '.join(architectures)}, not a BlipForImageTextRetrieval (no ITM head to export)",
                "Use a retrieval checkpoint such as Salesforce/blip-itm-base-coco, blip-itm-large-coco or blip-itm-base-flickr.")
        model = transformers.BlipForImageTextRetrieval.from_pretrained(source, local_files_only=local_only)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        image_processor = transformers.AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
    except OSError as exc:  # missing files, a partial cache, a hub id that does not exist
        if local_only and not local.is_dir():
            raise _not_available(model_id, f"the cache is incomplete ({exc})") from exc
        raise ModelNotAvailable(f"could not load BLIP model {model_id}: {exc}",
                                "Check the id (e.g. Salesforce/blip-itm-base-coco) or the folder.") from exc
    model.eval()
    return model, tokenizer, image_processor


def random_blip(config, seed: int = 0):
    """A `BlipForImageTextRetrieval` with random weights from a `BlipConfig` (tests), in eval mode."""
    transformers = import_transformers()
    import torch

    torch.manual_seed(seed)
    model = transformers.BlipForImageTextRetrieval(config)
    model.eval()
    return model


def preprocess_spec_of(image_processor) -> PreprocessSpec:
    """BlipImageProcessor (resize to size without crop, rescale 1/255, normalise) as a clipsearch transform."""
    size = getattr(image_processor, "size", None) or {"height": 384, "width": 384}
    size = dict(size) if not isinstance(size, int) else {"height": size, "width": size}
    if "height" not in size or "width" not in size:
        raise ModelNotAvailable(f"unsupported BLIP image size {size!r}: expected height and width")
    if getattr(image_processor, "do_center_crop", False):
        raise ModelNotAvailable("unsupported BLIP image processor: it centre-crops, which clipsearch's 'squash' mode does not")
    if not getattr(image_processor, "do_resize", True):
        raise ModelNotAvailable("unsupported BLIP image processor: do_resize is off")
    rescale = float(getattr(image_processor, "rescale_factor", 1 / 255)) if getattr(image_processor, "do_rescale", True) else 1.0
    if abs(rescale - 1 / 255) > 1e-9:
        raise ModelNotAvailable(f"unsupported BLIP image processor: rescale factor {rescale} (clipsearch scales by 1/255)")
    resample = getattr(image_processor, "resample", 3)
    resample = int(getattr(resample, "value", resample))
    if resample not in _RESAMPLE_NAMES:
        raise ModelNotAvailable(f"unsupported BLIP resampling filter {resample}")
    normalize = getattr(image_processor, "do_normalize", True)
    mean = list(image_processor.image_mean) if normalize else [0.0, 0.0, 0.0]
    std = list(image_processor.image_std) if normalize else [1.0, 1.0, 1.0]
    return PreprocessSpec.from_dict({"size": [int(size["height"]), int(size["width"])], "resize_mode": "squash",
                                     "interpolation": _RESAMPLE_NAMES[resample], "mean": mean, "std": std})


def _build_graph_modules(blip):
    import torch
    import torch.nn.functional as F

    def heads(x, count):  # [B, L, H*d] -> [B, H, L, d]
        return x.unflatten(-1, (count, -1)).transpose(1, 2)

    def attend(q, k, v, mask=None):
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if mask is not None:
            scores = scores + mask
        return (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)

    def vision_tokens(pixel_values):
        vision = blip.vision_model
        emb = vision.embeddings
        x = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = x[:, :1] * 0 + emb.class_embedding.to(x.dtype)  # [B, 1, D] without a traced batch size
        x = torch.cat([cls, x], dim=1) + emb.position_embedding[:, : x.shape[1] + 1].to(x.dtype)
        for layer in vision.encoder.layers:
            attn = layer.self_attn
            h = layer.layer_norm1(x)
            q, k, v = attn.qkv(h).chunk(3, dim=-1)
            n = attn.num_heads
            x = x + attn.projection(attend(heads(q, n), heads(k, n), heads(v, n)))
            x = x + layer.mlp(layer.layer_norm2(x))
        return vision.post_layernorm(x)

    def attention_block(block, hidden, context, mask):
        self_attn = block.self
        n = self_attn.num_attention_heads
        q = heads(self_attn.query(hidden), n)
        k = heads(self_attn.key(context), n)
        v = heads(self_attn.value(context), n)
        out = block.output
        return out.LayerNorm(out.dense(attend(q, k, v, mask)) + hidden)

    def text_states(input_ids, attention_mask, image_tokens=None):
        text = blip.text_encoder
        emb = text.embeddings
        seq = input_ids.shape[1]
        x = emb.word_embeddings(input_ids) + emb.position_embeddings.weight[:seq].unsqueeze(0)
        x = emb.LayerNorm(x)
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * _MASKED  # [B, 1, 1, S]
        for layer in text.encoder.layer:
            x = attention_block(layer.attention, x, x, mask)
            if image_tokens is not None and not hasattr(layer, "crossattention"):
                raise ModelNotAvailable("this BLIP text encoder has no cross-attention (text_config.is_decoder is off): no ITM")
            if image_tokens is not None:
                x = attention_block(layer.crossattention, x, image_tokens, None)  # every image token is real
            x = layer.output(layer.intermediate(x), x)
        return x

    class VisualGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blip = blip

        def forward(self, pixel_values):
            tokens = vision_tokens(pixel_values)
            return F.normalize(blip.vision_proj(tokens[:, 0]), dim=-1), tokens

    class TextGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blip = blip

        def forward(self, input_ids, attention_mask):
            return F.normalize(blip.text_proj(text_states(input_ids, attention_mask)[:, 0]), dim=-1)

    class ItmGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blip = blip

        def forward(self, input_ids, attention_mask, image_tokens):
            return blip.itm_head(text_states(input_ids, attention_mask, image_tokens)[:, 0])

    return VisualGraph().eval(), TextGraph().eval(), ItmGraph().eval()


def _export(module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    import torch

    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)


def text_spec_of(tokenizer) -> TextSpec:
    """BlipProcessor's text side: the BERT tokenizer with its own [CLS] … [SEP] template, no token_type_ids."""
    pad_id = tokenizer.pad_token_id
    return TextSpec(tokenizer="wordpiece", inputs=("input_ids", "attention_mask"), clean="none", bos_id=None,
                    eos_id=None, pad_id=int(pad_id if pad_id is not None else 0), pad_to="longest")


def _save_tokenizer(tokenizer, path: Path) -> None:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: the caller's stays as it was
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(path))


def write_blip_bundle(model, tokenizer, image_processor, out: Path | str, name: str, source: dict[str, Any],
                      precision: str = "fp32") -> Path:
    """Write a loaded BlipForImageTextRetrieval (eval mode) as a bundle folder at `out`, atomically."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    out = Path(out)
    spec = preprocess_spec_of(image_processor)
    config = model.config
    vision_size = config.vision_config.image_size
    vision_size = tuple(vision_size) if isinstance(vision_size, (list, tuple)) else (vision_size, vision_size)
    if tuple(spec.size) != vision_size:
        raise ModelNotAvailable(f"the image processor resizes to {spec.size} but the vision model takes {vision_size}")
    text = text_spec_of(tokenizer)
    max_positions = int(config.text_config.max_position_embeddings)
    model_max = getattr(tokenizer, "model_max_length", max_positions) or max_positions
    context_length = int(min(max_positions, model_max))

    with staged_folder(out) as staging:
        visual, textual, itm = _build_graph_modules(model)
        _save_tokenizer(tokenizer, staging / "tokenizer.json")
        (staging / "preprocess.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n", encoding="utf-8")

        pixels = torch.zeros(2, 3, *spec.size)
        ids = torch.full((2, 7), text.pad_id, dtype=torch.long)
        ids[:, 0], ids[:, 1:6], ids[:, 6] = tokenizer.cls_token_id, 1000 % config.text_config.vocab_size, tokenizer.sep_token_id
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 5:] = 0
        batch_seq = {0: "batch", 1: "seq"}
        _export(visual, (pixels,), staging / "visual.onnx", ["pixel_values"], ["image_embeds", "image_tokens"],
                {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}, "image_tokens": {0: "batch"}})
        _export(textual, (ids, mask), staging / "textual.onnx", ["input_ids", "attention_mask"], ["text_embeds"],
                {"input_ids": batch_seq, "attention_mask": batch_seq, "text_embeds": {0: "batch"}})
        with torch.no_grad():
            embeds, tokens = visual(pixels)
        _export(itm, (ids, mask, tokens), staging / ITM_FILE, ["input_ids", "attention_mask", "image_tokens"],
                ["itm_logits"], {"input_ids": batch_seq, "attention_mask": batch_seq,
                                 "image_tokens": {0: "batch", 1: "image_seq"}, "itm_logits": {0: "batch"}})
        graphs = ("visual.onnx", "textual.onnx", ITM_FILE)
        for graph in graphs:  # the ITM graph reads text: it gets the text recipe
            convert_graph(staging / graph, precision, text=graph != "visual.onnx")
            externalize_weights(staging / graph)

        from .. import __version__

        meta = {
            "name": name, "source": source, "embed_dim": int(embeds.shape[-1]),
            "logit_scale": _logit_scale(model), "precision": precision, "context_length": context_length,
            "image_size": list(spec.size), "text": text, "clipsearch_version": __version__,
            "itm": {
                "file": ITM_FILE, "inputs": ["input_ids", "attention_mask", "image_tokens"], "output": "itm_logits",
                "image_tokens": "image_tokens", "image_tokens_shape": [int(tokens.shape[1]), int(tokens.shape[2])],
                "match_index": 1,
                # transformers feeds ITM the tokens as they are ([CLS] first), and this graph matches it; the
                # original BLIP code puts this token in [CLS]'s place for ITM. Recorded for experiments only.
                "enc_token_id": _token_id(tokenizer, "[ENC]"),
            },
        }
        write_model_json(staging, meta)  # hashes itm.onnx too, so --verify covers it
    return out


def _logit_scale(model) -> float:
    """The ITC temperature for zero-shot softmax. BlipForImageTextRetrieval checkpoints do not keep BLIP's
    learned `temp`, so this is the config's initial value (exp(2.6592) = 1/0.07) unless the model has one."""
    scale = getattr(model, "logit_scale", None)
    if scale is not None:
        return float(scale.exp().item())
    return float(math.exp(getattr(model.config, "logit_scale_init_value", math.log(1 / 0.07))))


def _token_id(tokenizer, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return int(token_id) if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else None


def default_bundle_name(model_id: str, precision: str) -> str:
    base = Path(model_id).name if Path(model_id).expanduser().is_dir() else model_id.replace("/", "__")
    return base if precision == "fp32" else f"{base}__{precision}"


def export_blip(model_id: str, out: Path | str, precision: str = "fp32", name: str | None = None) -> Path:
    """Load a BLIP retrieval model (hub id or local folder) and write it as a clipsearch bundle."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    model, tokenizer, image_processor = load_blip(model_id)
    source = {"kind": "transformers-blip", "model_id": model_id,
              "revision": getattr(model.config, "_commit_hash", None)}
    return write_blip_bundle(model, tokenizer, image_processor, out, name or default_bundle_name(model_id, precision),
                             source, precision)
