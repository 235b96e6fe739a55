"""Every text family `models export` accepts reproduces open_clip's token ids and text embeddings; the rest is refused.

Families: CLIP BPE (tests/model_configs/clipsearch-tiny.json) and a Hugging Face text tower with a Hugging Face
fast tokenizer (clipsearch-tiny-hf*.json). No network here, so the HF tower is a tiny random BertModel config and
a BERT fast tokenizer built from the bundled MiniLM vocabulary, saved to a temporary folder that the configs name
by a relative path (open_clip and transformers load it from the working directory).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from clipsearch.errors import ModelNotAvailable
from test_model_layer import VARIED_TEXTS

HF_ARCH = "clipsearch-tiny-hf"  # mean pooler, clean "whitespace" (HFTokenizer's default)
HF_STRIP_ARCH = "clipsearch-tiny-hf-stripsep"  # strip_sep_token, clean "canonicalize", CLS pooling
HF_TOWER_DIR = "clipsearch-tiny-hf-tower"  # the relative hf_model_name / hf_tokenizer_name of both configs
MINILM_TOKENIZER = Path(__file__).parents[1] / "clipsearch/model/bundled/emoji-mini/tokenizer.json"

# test_model_layer's varied texts, plus what an HF WordPiece tokenizer treats specially
TEXTS = [*VARIED_TEXTS, "snake_case_words and under_scores", "MiXeD CaSe WORDS [SEP] [CLS] [PAD] literal specials",
         "word " * 60]


@pytest.fixture(scope="module")
def hf_tower_cwd(tmp_path_factory):
    """A working directory holding the tiny BERT tower + fast tokenizer the HF test configs name."""
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertTokenizerFast

    root = tmp_path_factory.mktemp("hf-cwd")
    folder = root / HF_TOWER_DIR
    tokenizer = BertTokenizerFast(tokenizer_object=Tokenizer.from_file(str(MINILM_TOKENIZER)), unk_token="[UNK]",
                                  sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    tokenizer.save_pretrained(folder)
    BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64).save_pretrained(folder)
    previous = os.getcwd()
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(previous)


def _open_clip_ids(arch: str, texts: list[str]) -> list[list[int]]:
    """open_clip's own ids, padding removed (trailing pad ids; the CLIP tokenizer pads with 0)."""
    from clipsearch.model.export import import_open_clip

    tokenizer = import_open_clip().get_tokenizer(arch)
    pad = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", 0) or 0
    rows = []
    for row in tokenizer(texts).tolist():
        while row and row[-1] in (pad, 0):
            row.pop()
        rows.append(row)
    return rows, tokenizer


@pytest.mark.parametrize("arch", ["clipsearch-tiny", HF_ARCH, HF_STRIP_ARCH])
def test_token_ids_equal_open_clip(arch, hf_tower_cwd):
    from clipsearch.model.export import tokenizer_for
    from clipsearch.model.tokenizer import TextTokenizer

    text = tokenizer_for(arch)
    runtime = TextTokenizer(text.tokenizer, text.spec, text.context_length, text.rules)
    reference, oc_tokenizer = _open_clip_ids(arch, TEXTS)
    ours = runtime.token_ids(TEXTS)
    for sample, ref_row, our_row in zip(TEXTS, reference, ours):
        trimmed = list(our_row)
        while trimmed and trimmed[-1] in (text.spec.pad_id, 0):  # strip_sep_token turns a final [SEP] into 0
            trimmed.pop()
        assert trimmed == ref_row, f"{arch}: token ids differ for {sample!r}"
    if text.family == "hf":
        # the whole padded batch, as the text graph receives it, equals open_clip's tensor
        batch = runtime(TEXTS).inputs["input_ids"]
        assert batch.tolist() == oc_tokenizer(TEXTS).tolist()
        assert text.spec.pad_to == "context" and text.spec.inputs == ("input_ids",)


def test_hf_rules_recorded(hf_tower_cwd):
    from clipsearch.model.export import tokenizer_for

    plain, strip = tokenizer_for(HF_ARCH), tokenizer_for(HF_STRIP_ARCH)
    assert (plain.spec.tokenizer, plain.spec.clean, plain.spec.pad_id) == ("hf_open_clip", "open_clip_whitespace", 0)
    assert "replace_ids" not in plain.rules
    assert strip.spec.clean == "open_clip_canonicalize" and strip.rules["replace_ids"] == {"102": 0}  # [SEP] -> 0
    assert plain.context_length == 32  # the tokenizer's context length, not BERT's 64 positions


def _torch_text_embeddings(arch: str, texts: list[str], seed: int = 0) -> np.ndarray:
    import torch

    from clipsearch.model.export import import_open_clip, load_open_clip

    model = load_open_clip(arch, None, True, seed=seed)
    ids = import_open_clip().get_tokenizer(arch)(texts)
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_text(ids), dim=-1).numpy()


@pytest.mark.parametrize("arch", [HF_ARCH, HF_STRIP_ARCH])
def test_hf_tower_bundle_matches_open_clip(arch, hf_tower_cwd, tmp_path):
    from clipsearch.model.bundle import read_bundle
    from clipsearch.model.export import ExportRequest, export_bundle
    from clipsearch.model.runtime import ClipModel

    out = export_bundle(ExportRequest(arch=arch, pretrained=None, random_init=True, out=tmp_path / "b", seed=0))
    info = read_bundle(out)
    assert info.text.tokenizer == "hf_open_clip" and info.text.pad_to == "context" and info.context_length == 32
    raw = json.loads((out / "model.json").read_text(encoding="utf-8"))
    assert raw["text_rules"]["truncation"] == "tokenizer.json"
    reference = _torch_text_embeddings(arch, TEXTS)
    ours = ClipModel(out).encode_text(TEXTS)
    cosine = (ours * reference).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine


def test_clip_bundle_matches_open_clip(tiny_bundle, tiny_torch_model):
    import open_clip
    import torch

    from clipsearch.model.runtime import ClipModel

    with torch.no_grad():
        reference = torch.nn.functional.normalize(
            tiny_torch_model.encode_text(open_clip.get_tokenizer("clipsearch-tiny")(TEXTS)), dim=-1).numpy()
    cosine = (ClipModel(tiny_bundle).encode_text(TEXTS) * reference).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine


def test_listed_architectures_are_exactly_the_exportable_ones():
    from typer.testing import CliRunner

    from clipsearch.cli import app
    from clipsearch.model.export import import_open_clip
    from clipsearch.model.tokenizer_export import architecture_refusal

    result = CliRunner().invoke(app, ["models", "list", "--architectures", "--json"])
    assert result.exit_code == 0, result.output
    listed = {row["arch"] for row in json.loads(result.output)}
    open_clip = import_open_clip()
    assert "ViT-B-32" in listed and "xlm-roberta-base-ViT-B-32" in listed
    assert all(architecture_refusal(open_clip, arch) is None for arch in listed)
    assert not any("siglip" in arch.lower() for arch in listed)
    offered = {arch for arch, _ in open_clip.list_pretrained()}
    refused = offered - listed
    assert refused and all(architecture_refusal(open_clip, arch) for arch in refused)


@pytest.mark.parametrize("random_init", [True, False])
def test_siglip_refused_before_any_download(random_init, monkeypatch, tmp_path):
    import open_clip

    from clipsearch.model import export

    def forbidden(*args, **kwargs):
        raise AssertionError("export went on to build or download the model")

    monkeypatch.setattr(open_clip, "create_model", forbidden)
    monkeypatch.setattr(open_clip, "get_tokenizer", forbidden)
    monkeypatch.setattr(export, "_hub_reachable", forbidden)
    request = export.ExportRequest(arch="ViT-B-16-SigLIP", pretrained=None if random_init else "webli",
                                   random_init=random_init, out=tmp_path / "out")
    with pytest.raises(ModelNotAvailable) as caught:
        export.export_bundle(request)
    message = str(caught.value)
    assert "cannot export ViT-B-16-SigLIP exactly" in message and "SigLIP" in message
    assert "models list --architectures" in message  # the hint
    assert not (tmp_path / "out").exists()


def test_export_cli_refusal_is_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    import sys

    from clipsearch.cli import main

    monkeypatch.setattr(sys, "argv", ["clipsearch", "models", "export", "ViT-L-14-CLIPA", "--random-init",
                                      "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as caught:
        main()
    assert caught.value.code == 1
    err = capsys.readouterr().err
    assert "error: cannot export ViT-L-14-CLIPA exactly" in err and "models list --architectures" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("config, expected", [
    ({"text_cfg": {"hf_tokenizer_name": "t", "hf_model_name": "m", "tokenizer_mode": "clips"}}, "tokenizer mode"),
    ({"text_cfg": {"hf_tokenizer_name": "t", "hf_model_name": "m", "tokenizer_kwargs": {"clean": "odd"}}}, "clean mode"),
    ({"text_cfg": {"hf_tokenizer_name": "t", "hf_model_name": "m", "tokenizer_kwargs": {"language": "x"}}}, "language"),
    ({"text_cfg": {"hf_tokenizer_name": "t"}}, "own text transformer"),
    ({"text_cfg": {"hf_model_name": "m"}}, "no hf_tokenizer_name"),
    ({"text_cfg": {"vocab_size": 1000}}, "overflow"),
    ({"text_cfg": {"tokenizer_kwargs": {"clean": "canonicalize"}}}, "clean mode"),
    ({"init_logit_bias": -10, "text_cfg": {}}, "SigLIP"),
])
def test_config_refusals(config, expected):
    from clipsearch.model.tokenizer_export import config_refusal

    config = {"embed_dim": 8, "vision_cfg": {}, **config}
    assert expected in (config_refusal("some-arch", config) or "")


def test_hf_config_accepted_from_config_alone():
    from clipsearch.model.tokenizer_export import config_refusal

    config = {"text_cfg": {"hf_tokenizer_name": "t", "hf_model_name": "m",
                           "tokenizer_kwargs": {"clean": "lower", "strip_sep_token": True}}}
    assert config_refusal("some-arch", config) is None
    assert config_refusal("ViT-B-32", {"text_cfg": {"vocab_size": 49408}}) is None


def test_slow_tokenizer_refused():
    from types import SimpleNamespace

    from open_clip import tokenizer as oc

    from clipsearch.model.tokenizer_export import bundle_tokenizer

    slow = object.__new__(oc.HFTokenizer)
    slow.tokenizer_mode, slow.clean_fn, slow.strip_sep_token, slow.context_length = "", oc._clean_whitespace, False, 16
    slow.tokenizer = SimpleNamespace(is_fast=False, pad_token_id=0)
    with pytest.raises(ModelNotAvailable, match="slow"):
        bundle_tokenizer("x", slow, None)
    odd = object.__new__(oc.HFTokenizer)
    odd.tokenizer_mode, odd.clean_fn, odd.strip_sep_token, odd.context_length = "", str.upper, False, 16
    with pytest.raises(ModelNotAvailable, match="clean function"):
        bundle_tokenizer("x", odd, None)


@pytest.mark.parametrize("cfg, expected", [
    ({"resize_mode": "random_crop"}, "resize mode"),
    ({"interpolation": "lanczos"}, "interpolation"),
])
def test_preprocessing_the_runtime_cannot_reproduce_is_refused(cfg, expected):
    from types import SimpleNamespace

    from clipsearch.model.export import preprocess_spec_of

    model = SimpleNamespace(visual=SimpleNamespace(preprocess_cfg={"size": 64, **cfg}, image_size=64))
    with pytest.raises(ModelNotAvailable, match=expected):
        preprocess_spec_of(model)
