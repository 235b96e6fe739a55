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
# No resident search helper outlives a test: off for the whole run and every CLI subprocess (module fixtures copy
# os.environ before per-test fixtures run); test_resident.py turns it on with a private socket folder of its own.
os.environ["CLIPSEARCH_HELPER"] = "0"


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


# -- browser tests (test_browser*.py): Debian's Chromium through Playwright, never a downloaded browser ---------------
@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    from web_fixtures import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser, server):
    """A page of the module's `server`, recording the origins it requests, script errors and failed responses."""
    from urllib.parse import urlsplit

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.requested_origins = set()  # scheme://host of every request ("blob://" for local object URLs)
    page.on("request", lambda request: page.requested_origins.add(
        f"{urlsplit(request.url).scheme}://{urlsplit(request.url).netloc}"))
    page.script_errors = []  # uncaught exceptions in the page's JavaScript
    page.on("pageerror", lambda error: page.script_errors.append(str(error)))
    page.failed_responses = []
    page.on("response", lambda response: response.status >= 400 and page.failed_responses.append(
        f"{response.status} {response.url}"))
    yield page
    context.close()
