"""Shared fixtures: an isolated CLIPSEARCH_HOME per test and tiny random-init bundles exported once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY_ARCH = "clipsearch-tiny"
TINY_SEED = 0
TEST_MODEL_CONFIGS = Path(__file__).parent / "model_configs"  # test-only open_clip configs (not in the package)
# Set for the whole run (session fixtures export before any per-test fixture runs), and inherited by CLI subprocesses.
os.environ["CLIPSEARCH_OPEN_CLIP_CONFIGS"] = str(TEST_MODEL_CONFIGS)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch) -> Path:
    home = tmp_path_factory.mktemp("clipsearch-home")
    monkeypatch.setenv("CLIPSEARCH_HOME", str(home))
    monkeypatch.setenv("CLIPSEARCH_OFFLINE", "1")
    return home


def _export(out: Path, precision: str = "fp32") -> Path:
    from clipsearch.model.export import ExportRequest, export_bundle

    return export_bundle(ExportRequest(arch=TINY_ARCH, pretrained=None, random_init=True, out=out,
                                       precision=precision, seed=TINY_SEED, name=f"{TINY_ARCH}-test"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A tiny random-init open_clip bundle (fp32): 64 px ViT, 2 layers, embed dim 64."""
    return _export(tmp_path_factory.mktemp("bundles") / "tiny-fp32")


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory, tiny_bundle) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles-precisions")
    return {"fp32": tiny_bundle, "fp16": _export(root / "tiny-fp16", "fp16"), "int8": _export(root / "tiny-int8", "int8")}


@pytest.fixture(scope="session")
def tiny_torch_model():
    """The same weights as `tiny_bundle`, as an open_clip torch module (seeded random init)."""
    from clipsearch.model.export import load_open_clip

    return load_open_clip(TINY_ARCH, None, True, seed=TINY_SEED)


@pytest.fixture(scope="session")
def blip_source(tmp_path_factory):
    """The tiny random BLIP (blip_fixtures.py) saved with save_pretrained: (folder, torch model, tokenizer)."""
    from blip_fixtures import save_tiny_blip

    return save_tiny_blip(tmp_path_factory.mktemp("blip-source") / "tiny-blip")


@pytest.fixture(scope="session")
def blip_bundle(blip_source, tmp_path_factory) -> Path:
    """`blip_source` exported to a bundle (fp32) once per session; tests that change a bundle copy it first."""
    from clipsearch.model.blip import export_blip

    return export_blip(str(blip_source[0]), tmp_path_factory.mktemp("blip-bundles") / "tiny-blip-fp32")
