"""Which open_clip text families a bundle reproduces exactly, and the bundle tokenizer for each.

Supported (token ids equal open_clip's `get_tokenizer(arch)`, parity-tested in tests/test_tokenizer_families.py):

- CLIP byte-level BPE (`SimpleTokenizer` with its default "lower" cleaning): tokenizer.json rebuilt from
  open_clip's BPE file, open_clip's cleaning at runtime, batches padded to their longest query.
- A Hugging Face *fast* tokenizer (`HFTokenizer`) feeding a Hugging Face text tower (`hf_model_name`): its
  `backend_tokenizer` is written as tokenizer.json (special tokens and truncation as transformers applies them),
  the clean mode, pad id, padding to the fixed context length and `strip_sep_token` are recorded in model.json.
  The text graph takes input_ids only and derives the attention mask from the pad id inside the graph, exactly
  as open_clip's `HFTextEncoder.forward` does.

Everything else is refused at export, from the model config alone (before any download) where possible:
SigLIP/SigLIP2 (sigmoid loss with a logit bias the bundle cannot carry; SentencePiece tokenizers fed to open_clip's
own text transformer, not verified here), HF tokenizers feeding open_clip's own text transformer (CLIPA,
"worldwide"), tokenizer modes and options the runtime does not reproduce, slow-only tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .bundle import TextSpec
from ..errors import ModelNotAvailable

CLIP_VOCAB_SIZE = 49408
# open_clip clean modes of HFTokenizer -> the runtime's cleaner name (clipsearch/model/tokenizer.py CLEANERS)
HF_CLEAN_MODES = {"whitespace": "open_clip_whitespace", "lower": "open_clip_lower", "canonicalize": "open_clip_canonicalize"}
HF_TOKENIZER_KWARGS = {"clean", "strip_sep_token"}
REFUSAL_HINT = ("Export one of the architectures listed by `clipsearch models list --architectures`, "
                "or use a ready model: clipsearch models pull hf:immich-app/ViT-B-32__openai")


def config_refusal(arch: str, config: dict[str, Any] | None) -> str | None:
    """Why `arch` cannot be exported exactly, decided from its open_clip config alone; None when it can."""
    if not config:
        return f"open_clip has no config for '{arch}'"
    text_cfg = config.get("text_cfg") or {}
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    hf_tokenizer = text_cfg.get("hf_tokenizer_name")
    hf_model = text_cfg.get("hf_model_name")
    if "init_logit_bias" in config or "siglip" in arch.lower():
        return ("SigLIP-family models (sigmoid loss) are not supported: their logit bias has no place in a bundle and "
                "their SentencePiece (T5/Gemma) tokenizer feeding open_clip's text transformer has no parity test here")
    if text_cfg.get("tokenizer_mode"):
        return f"tokenizer mode '{text_cfg['tokenizer_mode']}' is not reproduced by the bundle runtime"
    if "hf_tokenizer_name" in text_cfg:
        if not hf_tokenizer:
            return "its config names an empty hf_tokenizer_name"
        if not hf_model:
            return (f"its Hugging Face tokenizer '{hf_tokenizer}' feeds open_clip's own text transformer "
                    "(as in CLIPA and the 'worldwide' models), a combination without a parity test here")
        unknown = sorted(set(kwargs) - HF_TOKENIZER_KWARGS)
        if unknown:
            return f"tokenizer options {', '.join(unknown)} are not reproduced by the bundle runtime"
        clean = kwargs.get("clean", "whitespace")
        if clean not in HF_CLEAN_MODES:
            return f"clean mode '{clean}' is not reproduced by the bundle runtime"
        return None
    if hf_model:
        return (f"its Hugging Face text tower '{hf_model}' has no hf_tokenizer_name, so open_clip would feed it CLIP BPE ids")
    unknown = sorted(set(kwargs) - {"clean"})
    if unknown:
        return f"tokenizer options {', '.join(unknown)} are not reproduced by the bundle runtime"
    if kwargs.get("clean", "lower") != "lower":
        return f"CLIP BPE with clean mode '{kwargs['clean']}' is not reproduced by the bundle runtime"
    vocab = int(text_cfg.get("vocab_size", CLIP_VOCAB_SIZE))
    if vocab < CLIP_VOCAB_SIZE:
        return f"its text vocabulary ({vocab}) is smaller than CLIP BPE's ({CLIP_VOCAB_SIZE}): ids would overflow"
    return None


def architecture_refusal(open_clip, arch: str) -> str | None:
    return config_refusal(arch, open_clip.get_model_config(arch))


def refuse(arch: str, reason: str) -> ModelNotAvailable:
    return ModelNotAvailable(f"cannot export {arch} exactly: {reason}", REFUSAL_HINT)


def check_exportable(open_clip, arch: str) -> None:
    """Raise ModelNotAvailable (before any download) when `arch` is not a supported family."""
    reason = architecture_refusal(open_clip, arch)
    if reason:
        raise refuse(arch, reason)


def exportable_architectures(open_clip) -> set[str]:
    return {arch for arch in open_clip.list_models() if architecture_refusal(open_clip, arch) is None}


@dataclass(frozen=True)
class BundleTokenizer:
    """What write_bundle stores: tokenizer.json, model.json's text spec and "text_rules", the context length."""

    tokenizer: Any  # tokenizers.Tokenizer
    spec: TextSpec
    rules: dict[str, Any]
    context_length: int
    family: str  # "clip_bpe" | "hf"


def bundle_tokenizer(arch: str, oc_tokenizer, clip_bpe_builder) -> BundleTokenizer:
    """The bundle tokenizer reproducing open_clip's tokenizer object `oc_tokenizer` exactly, or ModelNotAvailable."""
    from open_clip import tokenizer as oc

    if isinstance(oc_tokenizer, oc.SimpleTokenizer):
        if oc_tokenizer.clean_fn is not oc._clean_lower or oc_tokenizer.reduction_fn is not None \
                or len(oc_tokenizer.all_special_ids) != 2 or oc_tokenizer.vocab_size != CLIP_VOCAB_SIZE:
            raise refuse(arch, "its CLIP tokenizer has a clean mode, reduction mask or special tokens the runtime does not reproduce")
        tokenizer, bos_id, eos_id = clip_bpe_builder()
        if (bos_id, eos_id) != (oc_tokenizer.sot_token_id, oc_tokenizer.eot_token_id):
            raise refuse(arch, "its CLIP tokenizer's start/end ids differ from open_clip's BPE file")
        spec = TextSpec(tokenizer="clip_bpe", inputs=("input_ids",), clean="open_clip", bos_id=bos_id, eos_id=eos_id,
                        pad_id=0, pad_to="longest")
        return BundleTokenizer(tokenizer, spec, {}, int(oc_tokenizer.context_length), "clip_bpe")
    if type(oc_tokenizer) is oc.HFTokenizer:
        return _hf_bundle_tokenizer(arch, oc_tokenizer, oc)
    raise refuse(arch, f"open_clip tokenizer {type(oc_tokenizer).__name__} is not reproduced by the bundle runtime")


def _hf_bundle_tokenizer(arch: str, oc_tokenizer, oc) -> BundleTokenizer:
    from tokenizers import Tokenizer

    cleaners = {oc._clean_whitespace: "whitespace", oc._clean_lower: "lower", oc._clean_canonicalize: "canonicalize"}
    clean = cleaners.get(oc_tokenizer.clean_fn)
    if clean is None:
        raise refuse(arch, "its tokenizer's clean function is not one the runtime reproduces")
    if oc_tokenizer.tokenizer_mode:
        raise refuse(arch, f"tokenizer mode '{oc_tokenizer.tokenizer_mode}' is not reproduced by the bundle runtime")
    hf = oc_tokenizer.tokenizer
    backend = getattr(hf, "backend_tokenizer", None)
    if not getattr(hf, "is_fast", False) or backend is None:
        raise refuse(arch, f"its tokenizer ({type(hf).__name__}) is a slow (Python) tokenizer without a tokenizer.json")
    if hf.pad_token_id is None:
        raise refuse(arch, "its tokenizer has no pad token (open_clip pads to the context length)")
    if getattr(hf, "padding_side", "right") != "right":
        raise refuse(arch, "its tokenizer pads on the left; the runtime pads on the right")
    side = getattr(hf, "truncation_side", "right")
    if side not in ("right", "left"):
        raise refuse(arch, f"unknown truncation side '{side}'")
    context_length = int(oc_tokenizer.context_length)
    tokenizer = Tokenizer.from_str(backend.to_str())
    tokenizer.no_padding()
    # what transformers sets for `max_length=context_length, truncation=True`
    tokenizer.enable_truncation(max_length=context_length, stride=0, strategy="longest_first", direction=side)
    rules: dict[str, Any] = {"truncation": "tokenizer.json", "truncation_side": side}
    if oc_tokenizer.strip_sep_token:
        if hf.sep_token_id is None:
            raise refuse(arch, "strip_sep_token is set but its tokenizer has no separator token")
        rules["replace_ids"] = {str(int(hf.sep_token_id)): 0}  # open_clip writes zeros, not the pad id
    spec = TextSpec(tokenizer="hf_open_clip", inputs=("input_ids",), clean=HF_CLEAN_MODES[clean], bos_id=None, eos_id=None,
                    pad_id=int(hf.pad_token_id), pad_to="context")
    return BundleTokenizer(tokenizer, spec, rules, context_length, "hf")
