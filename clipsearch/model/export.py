"""open_clip → ONNX model bundle (needs the `export` extra: torch, open_clip_torch, onnx).

The image graph takes pixel_values [batch, 3, H, W]; the text graph takes input_ids [batch, seq] with a
dynamic sequence axis (the positional embedding and causal mask are sliced to `seq`, so a 5-word query
costs 7 tokens of compute, not 77). Both graphs end in L2 normalisation.

The tokenizer is open_clip's own `get_tokenizer(arch)`, reproduced exactly or refused (tokenizer_export.py):
CLIP BPE, or a Hugging Face fast tokenizer feeding a Hugging Face text tower, whose text graph takes ids padded
to the context length and derives the attention mask from the pad id as open_clip does. Other families, and
image preprocessing the runtime cannot reproduce, are refused with ModelNotAvailable before any download.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .bundle import PreprocessSpec, staged_folder, write_model_json
from .tokenizer_export import BundleTokenizer, bundle_tokenizer, check_exportable
from ..errors import ModelNotAvailable

PRECISIONS = ("fp32", "fp16", "int8")
OPSET = 17
# Extra open_clip model configs (JSON files as in open_clip's model_configs/), e.g. a custom architecture
# or the tests' tiny random-init ones: folders separated by os.pathsep.
CONFIG_DIRS_ENV = "CLIPSEARCH_OPEN_CLIP_CONFIGS"
HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class ExportRequest:
    arch: str
    pretrained: str | None  # an open_clip tag or a local checkpoint file; None with random_init
    out: Path
    precision: str = "fp32"
    random_init: bool = False
    name: str | None = None
    seed: int = 0


def export_extra_missing(model: str, packages: str) -> ModelNotAvailable:
    """The error for an export whose torch-side packages (the `export` extra) are not installed."""
    return ModelNotAvailable(
        f"exporting {model} needs {packages}, which are not installed",
        "Install them with `pip install 'clipsearch[export]'` (online), or use the bundled offline model: --model emoji-mini")


def import_open_clip(model: str = "a model"):
    try:
        import open_clip
    except ImportError as exc:
        raise export_extra_missing(model, "torch and open_clip_torch") from exc
    for folder in filter(None, os.environ.get(CONFIG_DIRS_ENV, "").split(os.pathsep)):
        if Path(folder).is_dir():
            open_clip.add_model_config(folder)
    return open_clip


def _hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """False when offline mode is asked for (CLIPSEARCH_OFFLINE=1 or HF_HUB_OFFLINE=1) or the host cannot be reached."""
    if os.environ.get("CLIPSEARCH_OFFLINE", "") not in ("", "0") or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _resolve_checkpoint(open_clip, arch: str, pretrained: str) -> str:
    """Return what to pass as open_clip's `pretrained=`: a local file, or the tag when it can be downloaded."""
    if Path(pretrained).expanduser().is_file():
        return str(Path(pretrained).expanduser())
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")):
        raise ModelNotAvailable(f"--pretrained {pretrained}: no such checkpoint file",
                                "Give the path of an open_clip checkpoint file, or an open_clip tag such as "
                                "laion2b_s34b_b79k.")
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ModelNotAvailable(
            f"open_clip has no pretrained tag '{pretrained}' for {arch} (known tags: {tags})",
            "Pass a tag listed by `python -c \"import open_clip; print(open_clip.list_pretrained())\"` or a checkpoint file.",
        )
    hub_id = (cfg.get("hf_hub") or "").rstrip("/")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
                cached = try_to_load_from_cache(hub_id, filename)
                if isinstance(cached, str):
                    return cached
        except ImportError:
            pass
    if not _hub_reachable():
        raise ModelNotAvailable(
            f"model {arch}/{pretrained} is not cached and its weights cannot be downloaded: {HUB_HOST} is unreachable (offline?)",
            "Fix: connect to the internet and run `clipsearch models export "
            f"{arch} --pretrained {pretrained} --out DIR` (or use --model {arch}/{pretrained} once online), "
            "pass a local checkpoint with --pretrained FILE, or use the bundled offline model: --model emoji-mini",
        )
    return pretrained


def load_open_clip(arch: str, pretrained: str | None, random_init: bool, seed: int = 0):
    """Create an open_clip model in eval mode; raises ModelNotAvailable instead of a long download traceback."""
    open_clip = import_open_clip(f"{arch}/{pretrained}" if pretrained and not random_init else arch)
    import torch

    if arch not in open_clip.list_models():
        raise ModelNotAvailable(f"unknown open_clip architecture '{arch}'", "List them with: clipsearch models list --architectures")
    check_exportable(open_clip, arch)  # from the config alone: refused before any download
    if random_init:
        torch.manual_seed(seed)
        # random weights throughout: no base weights for a Hugging Face text tower either
        model = open_clip.create_model(arch, pretrained=None, pretrained_text=False)
    else:
        if not pretrained:
            raise ModelNotAvailable(f"no weights given for {arch}", "Pass --pretrained TAG_OR_FILE, or --random-init for tests")
        checkpoint = _resolve_checkpoint(open_clip, arch, pretrained)
        try:
            model = open_clip.create_model(arch, pretrained=checkpoint)
        except RuntimeError as exc:
            raise ModelNotAvailable(f"could not load weights for {arch}/{pretrained}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - torch.load raises unpickling/EOF/zip errors for a file that is no checkpoint
            if not Path(checkpoint).is_file():
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotAvailable(f"--pretrained {pretrained}: not a readable checkpoint ({type(exc).__name__}: "
                                    f"{first[:200]})",
                                    "Give an open_clip checkpoint (.pt/.bin/.safetensors, as saved by open_clip "
                                    "training or downloaded from its model page), or an open_clip tag.") from exc
    model.eval()
    return model


# What clipsearch/model/preprocess.py reproduces of open_clip's image transform.
RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")


def preprocess_spec_of(model) -> PreprocessSpec:
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, int):
        size = (size, size)
    mode, interpolation = cfg.get("resize_mode", "shortest"), cfg.get("interpolation", "bicubic")
    problems = []
    if mode not in RESIZE_MODES:
        problems.append(f"resize mode '{mode}' (the runtime does {', '.join(RESIZE_MODES)})")
    if interpolation not in INTERPOLATIONS:
        problems.append(f"interpolation '{interpolation}' (the runtime does {', '.join(INTERPOLATIONS)})")
    if problems:
        from .tokenizer_export import REFUSAL_HINT

        raise ModelNotAvailable(f"cannot export this model exactly: its image preprocessing uses {' and '.join(problems)}",
                                REFUSAL_HINT)
    return PreprocessSpec.from_dict({
        "size": list(size),
        "resize_mode": cfg.get("resize_mode", "shortest"),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "mean": list(cfg.get("mean", PreprocessSpec.mean)),
        "std": list(cfg.get("std", PreprocessSpec.std)),
        "fill_color": cfg.get("fill_color", 0),
    })


def _text_tower(model):
    """The module holding the text transformer (CLIP keeps it on the model, CustomTextCLIP on .text)."""
    return model.text if hasattr(model, "text") and hasattr(model.text, "token_embedding") else model


def _plain_blocks(tower) -> bool:
    """True when every block is open_clip's pre-norm ResidualAttentionBlock around nn.MultiheadAttention."""
    import torch

    blocks = getattr(getattr(tower, "transformer", None), "resblocks", [])
    return len(blocks) > 0 and all(
        isinstance(getattr(b, "attn", None), torch.nn.MultiheadAttention) and not hasattr(b, "ln_1_kv")
        and getattr(b.attn, "_qkv_same_embed_dim", False) and hasattr(b, "ls_1") for b in blocks
    )


def _fast_vision_ok(visual) -> bool:
    """A standard open_clip ViT: square patch conv without bias, class token, token pooling, no attention pool."""
    import torch

    conv = getattr(visual, "conv1", None)
    return (
        type(visual).__name__ == "VisionTransformer" and _plain_blocks(visual)
        and isinstance(conv, torch.nn.Conv2d) and conv.bias is None and conv.kernel_size == conv.stride
        and conv.padding == (0, 0) and getattr(visual, "attn_pool", None) is None
        and getattr(visual, "pool_type", None) == "tok" and not getattr(visual, "final_ln_after_pool", False)
        and getattr(visual, "class_embedding", None) is not None
    )


def _dynamic_text_ok(tower) -> bool:
    return (
        _plain_blocks(tower)
        and getattr(tower, "attn_mask", None) is not None
        and getattr(tower, "cls_emb", None) is None
        and (getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")) in ("argmax", "eos")
    )


def _build_graph_modules(model):
    import torch
    import torch.nn.functional as F

    def _attention(attn, x, mask=None):
        """nn.MultiheadAttention's math, batch first, with shape-free ops: no (L, N, E) transposes around
        every block, and a traced graph that keeps batch and sequence axes dynamic."""
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        return _heads(attn, q, k, v, mask)

    def _heads(attn, q, k, v, mask=None):
        """Multi-head scaled dot-product attention of projected q [B, Lq, D] over k, v [B, L, D], then out_proj."""
        heads = attn.num_heads
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-1, -2)
        if mask is not None:
            scores = scores + mask
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)
        return attn.out_proj(out)

    def _blocks(blocks, x, mask=None):
        for block in blocks:
            x = x + block.ls_1(_attention(block.attn, block.ln_1(x), mask))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x

    def _constant(tensor):
        """A weight the graph computes from the model's own (a slice, a reshape) as a tensor of its own, so the export
        writes it as an initializer: int8 quantisation quantises only MatMuls whose B is an initializer (computed in
        the graph, the product stays fp32). A parameter, not a buffer: torch.onnx writes a non-persistent buffer as
        a Constant node, which the quantiser skips too."""
        return None if tensor is None else torch.nn.Parameter(tensor.detach().clone(), requires_grad=False)

    class OneTokenBlock(torch.nn.Module):
        """A tower's last block computed for the one token per sequence that the tower outputs (ViT class token,
        text end-of-text token): its query projection, attention output and MLP run on that token alone, keys and
        values still come from every token. The same math as _blocks for that token, about 1/layers less work.
        The query and key/value rows of in_proj become weights of their own (_constant)."""

        def __init__(self, block) -> None:
            super().__init__()
            self.block = block
            attn = block.attn
            width = attn.embed_dim
            bias = attn.in_proj_bias
            self.q_weight = _constant(attn.in_proj_weight[:width])
            self.kv_weight = _constant(attn.in_proj_weight[width:])
            self.q_bias = _constant(None if bias is None else bias[:width])
            self.kv_bias = _constant(None if bias is None else bias[width:])

        def forward(self, x, pick, mask=None):
            """x [B, L, D] -> the block's output [B, 1, D] for the token `pick` takes from a [B, L, D] tensor;
            `mask` (broadcast to [B, heads, 1, L]) is the attention mask row of that token."""
            block = self.block
            h = block.ln_1(x)
            q = F.linear(pick(h), self.q_weight, self.q_bias)
            k, v = F.linear(h, self.kv_weight, self.kv_bias).chunk(2, dim=-1)
            token = pick(x) + block.ls_1(_heads(block.attn, q, k, v, mask))
            return token + block.ls_2(block.mlp(block.ln_2(token)))

    class VisualGraph(torch.nn.Module):
        """Image tower → L2-normalised embedding. Standard ViTs take a lean path: the patch convolution as
        one MatMul over unfolded patches (so int8 quantisation covers it), batch-first attention, and the last
        block computed for the class token only (OneTokenBlock; 8% less encoder CPU on ViT-B/32)."""

        def __init__(self, clip) -> None:
            super().__init__()
            self.clip = clip
            self.fast = _fast_vision_ok(clip.visual)
            if self.fast:
                # The patch weights as one [C*ph*pw, D] weight of their own (_constant): computed from conv1.weight
                # in the graph, the patch product stayed fp32 in int8 bundles.
                self.patch_weight = _constant(clip.visual.conv1.weight.flatten(1).t().contiguous())
                self.last = OneTokenBlock(clip.visual.transformer.resblocks[-1])

        def forward(self, pixel_values):
            if not self.fast:
                return F.normalize(self.clip.encode_image(pixel_values), dim=-1)
            visual = self.clip.visual
            conv = visual.conv1
            ph, pw = conv.kernel_size
            patches = pixel_values.unflatten(2, (-1, ph)).unflatten(4, (-1, pw))  # B,C,gh,ph,gw,pw
            patches = patches.permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)  # B,gh*gw,C*ph*pw
            x = patches @ self.patch_weight
            cls = x[:, :1] * 0 + visual.class_embedding.to(x.dtype)  # [B, 1, D] without a traced batch size
            x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
            x = _blocks(visual.transformer.resblocks[:-1], visual.ln_pre(x))
            pooled = visual.ln_post(self.last(x, lambda t: t[:, :1])[:, 0])  # the class token
            if visual.proj is not None:
                pooled = pooled @ visual.proj
            return F.normalize(pooled, dim=-1)

    class DynamicTextGraph(torch.nn.Module):
        """CLIP text encoder with the sequence length taken from the input instead of context_length, its last
        block computed for the pooled token only (OneTokenBlock)."""

        def __init__(self, tower, eos_id: int) -> None:
            super().__init__()
            self.tower = tower
            self.pool = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
            self.eos_id = eos_id
            self.last = OneTokenBlock(tower.transformer.resblocks[-1])

        def forward(self, input_ids):
            tower = self.tower
            seq = input_ids.shape[1]
            cast = tower.transformer.get_cast_dtype()
            x = tower.token_embedding(input_ids).to(cast)
            x = x + tower.positional_embedding[:seq].to(cast)
            mask = tower.attn_mask[:seq, :seq].to(cast)
            x = _blocks(tower.transformer.resblocks[:-1], x, mask)
            if self.pool == "eos":
                index = (input_ids == self.eos_id).int().argmax(dim=-1)
            else:
                index = input_ids.argmax(dim=-1)
            rows = torch.arange(x.shape[0])
            token = self.last(x, lambda t: t[rows, index].unsqueeze(1), mask[index].unsqueeze(1).unsqueeze(1))
            pooled = tower.ln_final(token[:, 0])  # the pooled (end-of-text) token; ln_final is per token
            projection = tower.text_projection
            if projection is not None:
                pooled = projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection
            return F.normalize(pooled, dim=-1)

    class FixedTextGraph(torch.nn.Module):
        def __init__(self, clip) -> None:
            super().__init__()
            self.clip = clip

        def forward(self, input_ids):
            return F.normalize(self.clip.encode_text(input_ids), dim=-1)

    return VisualGraph, DynamicTextGraph, FixedTextGraph


def build_clip_tokenizer(bpe_path: str | Path):
    """A `tokenizers` file equivalent to open_clip's SimpleTokenizer (after its ftfy/HTML cleaning)."""
    import gzip

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import ByteLevel

    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(ByteLevel.alphabet())
    # open_clip orders the base vocabulary by its bytes_to_unicode() table; rebuild that order exactly.
    ordered = _bytes_to_unicode_chars()
    assert set(ordered) == set(byte_chars)
    vocab_list = ordered + [c + "</w>" for c in ordered] + ["".join(m) for m in merges]
    vocab_list += ["<start_of_text>", "<end_of_text>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                              fuse_unk=False, dropout=None, unk_token=None))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Lowercase(),
    ])
    pattern = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
    # open_clip maps the literal marker strings to their special ids (its BPE cache holds them whole).
    tokenizer.add_special_tokens([AddedToken(t, normalized=True) for t in ("<start_of_text>", "<end_of_text>")])
    return tokenizer, vocab["<start_of_text>"], vocab["<end_of_text>"]


def _bytes_to_unicode_chars() -> list[str]:
    """The GPT-2/CLIP byte → printable character table, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _default_bpe_path() -> Path:
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


def export_onnx(module, args: tuple, path: Path, input_names: list[str], output_name: str, dynamic_axes: dict) -> None:
    import torch

    # nn.MultiheadAttention's inference fast path has no ONNX symbolic; trace the plain math instead.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(
                module, args, str(path), input_names=input_names, output_names=[output_name],
                dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def convert_precision(folder: Path, precision: str, text_feeds: dict | None = None) -> dict | None:
    """Rewrite visual.onnx and textual.onnx of a fp32 bundle folder in fp16 or int8 (in place); returns the int8
    text recipe chosen on `text_feeds` (clipsearch.model.quantize), for model.json."""
    from .quantize import convert_graph

    convert_graph(folder / "visual.onnx", precision, text=False)
    choice = convert_graph(folder / "textual.onnx", precision, text=True, feeds=text_feeds)
    return choice.to_dict() if choice else None


def externalize_weights(graph: Path, min_bytes: int = 1024) -> None:
    """Move a graph's weights into `<graph>.data` beside it. onnxruntime memory-maps such a file instead of
    parsing weights out of the protobuf: opening ViT-B-32's text graph drops from 1.4 s to 0.5 s, which is
    most of a cold `clipsearch search`."""
    import onnx

    model = onnx.load(str(graph))
    data = graph.with_name(graph.name + ".data")
    onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=min_bytes)


def clip_bpe_tokenizer(context_length: int = 77) -> BundleTokenizer:
    from .bundle import TextSpec

    tokenizer, bos_id, eos_id = build_clip_tokenizer(_default_bpe_path())
    spec = TextSpec(tokenizer="clip_bpe", inputs=("input_ids",), clean="open_clip", bos_id=bos_id, eos_id=eos_id,
                    pad_id=0, pad_to="longest")
    return BundleTokenizer(tokenizer, spec, {}, context_length, "clip_bpe")


def tokenizer_for(arch: str) -> BundleTokenizer:
    """The bundle tokenizer reproducing open_clip's own `get_tokenizer(arch)`, or ModelNotAvailable."""
    open_clip = import_open_clip(arch)
    check_exportable(open_clip, arch)
    return bundle_tokenizer(arch, open_clip.get_tokenizer(arch), lambda: build_clip_tokenizer(_default_bpe_path()))


def write_bundle(model, out: Path, name: str, source: dict[str, Any], precision: str = "fp32",
                 text: BundleTokenizer | None = None) -> Path:
    """Export an open_clip model (already loaded, eval mode) as a bundle folder at `out`, atomically.
    `text` is the bundle tokenizer (default: CLIP BPE, for a model with a CLIP text tower)."""
    import torch

    from .tokenizer import TextTokenizer

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    out = Path(out)
    if text is None:
        text = clip_bpe_tokenizer(int(getattr(model, "context_length", 77)))
    with staged_folder(out) as staging:
        VisualGraph, DynamicTextGraph, FixedTextGraph = _build_graph_modules(model)
        spec = preprocess_spec_of(model)
        text.tokenizer.save(str(staging / "tokenizer.json"))
        (staging / "preprocess.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n", encoding="utf-8")

        pixels = torch.zeros(2, 3, *spec.size)
        export_onnx(VisualGraph(model).eval(), (pixels,), staging / "visual.onnx", ["pixel_values"], "image_embeds",
                    {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}})

        tower = _text_tower(model)
        context_length = text.context_length
        # Hugging Face towers take ids padded to the context length: the graph derives the attention mask from
        # the pad id inside (open_clip's HFTextEncoder.forward), so no mask input is needed.
        dynamic = text.family == "clip_bpe" and _dynamic_text_ok(tower)
        text_spec = replace(text.spec, pad_to="longest" if dynamic else "context")
        text_module = DynamicTextGraph(tower, text_spec.eos_id).eval() if dynamic else FixedTextGraph(model).eval()
        sample = TextTokenizer(text.tokenizer, text_spec, context_length, text.rules)
        ids = torch.from_numpy(sample(["a photo of a dog on the beach", "a cat"]).inputs["input_ids"])
        axes = {"input_ids": {0: "batch", 1: "seq"}} if dynamic else {"input_ids": {0: "batch"}}
        axes["text_embeds"] = {0: "batch"}
        export_onnx(text_module, (ids,), staging / "textual.onnx", ["input_ids"], "text_embeds", axes)
        from .quantize import FIDELITY_CAPTIONS

        text_int8 = convert_precision(staging, precision, sample(list(FIDELITY_CAPTIONS)).inputs)
        for graph in ("visual.onnx", "textual.onnx"):
            externalize_weights(staging / graph)

        with torch.no_grad():
            logit_scale = float(model.logit_scale.exp().item())
            embed_dim = int(VisualGraph(model)(pixels[:1]).shape[-1])
        from .. import __version__

        meta = {
            "name": name, "source": source, "embed_dim": embed_dim, "logit_scale": logit_scale,
            "precision": precision, "context_length": context_length, "image_size": list(spec.size),
            "text": text_spec, "clipsearch_version": __version__,
        }
        if text.rules:
            meta["text_rules"] = text.rules
        if text_int8:
            meta["text_int8"] = text_int8
        write_model_json(staging, meta)
    return out


def default_bundle_name(arch: str, pretrained: str | None, random_init: bool, precision: str) -> str:
    tag = "random-init" if random_init or not pretrained else Path(pretrained).stem if Path(pretrained).is_file() else pretrained
    name = f"{arch}__{tag}"
    return name if precision == "fp32" else f"{name}__{precision}"


def export_bundle(request: ExportRequest) -> Path:
    """Load an open_clip architecture (pretrained tag, checkpoint file, or random init) and write a bundle."""
    model = load_open_clip(request.arch, request.pretrained, request.random_init, seed=request.seed)
    text = tokenizer_for(request.arch)
    name = request.name or default_bundle_name(request.arch, request.pretrained, request.random_init, request.precision)
    source = {"kind": "open_clip", "arch": request.arch,
              "pretrained": None if request.random_init else request.pretrained,
              "random_init": request.random_init, "seed": request.seed if request.random_init else None}
    return write_bundle(model, request.out, name, source, request.precision, text)
