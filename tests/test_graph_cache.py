"""The optimised-graph cache: the first text session saves onnxruntime's optimised graph, later ones load it and
embed exactly the same; a damaged copy or a changed graph is never used."""

from __future__ import annotations

import os
import shutil

import numpy as np

from clipsearch.model.runtime import ClipModel
from clipsearch.paths import graph_cache_dir

TEXTS = ["a dog on a beach", "two red apples", "un café à Paris"]


def _encode(bundle) -> tuple[np.ndarray, str]:
    model = ClipModel(bundle, threads=1)
    vectors = model.encode_text(TEXTS)
    return vectors, str(model.textual.opened_from)


def test_the_second_session_loads_the_saved_graph_and_embeds_the_same(tiny_bundle, monkeypatch):
    monkeypatch.setenv("CLIPSEARCH_GRAPH_CACHE", "0")
    plain, plain_path = _encode(tiny_bundle)
    assert plain_path.endswith("textual.onnx") and not graph_cache_dir().exists()
    monkeypatch.delenv("CLIPSEARCH_GRAPH_CACHE")
    first, first_path = _encode(tiny_bundle)  # optimises and saves
    saved = list(graph_cache_dir().glob("*.ort"))
    assert first_path.endswith("textual.onnx") and len(saved) == 1
    second, second_path = _encode(tiny_bundle)
    assert second_path == str(saved[0])
    np.testing.assert_allclose(second, plain, atol=1e-6)
    np.testing.assert_allclose(first, plain, atol=1e-6)


def test_a_damaged_copy_is_replaced_and_a_changed_graph_gets_its_own(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    reference, _ = _encode(bundle)
    (saved,) = graph_cache_dir().glob("*.ort")
    saved.write_bytes(saved.read_bytes()[:1000])  # truncated
    vectors, path = _encode(bundle)
    np.testing.assert_allclose(vectors, reference, atol=1e-6)
    assert path.endswith("textual.onnx") and saved.stat().st_size > 1000  # optimised again and saved again
    _, path = _encode(bundle)
    assert path == str(saved)

    graph = bundle / "textual.onnx"
    later = graph.stat().st_mtime_ns + 5_000_000_000
    os.utime(graph, ns=(later, later))  # replaced in place (same name): not the saved copy's graph any more
    _, path = _encode(bundle)
    assert path.endswith("textual.onnx")
    (fresh,) = graph_cache_dir().glob("*.ort")  # the old copy is dropped when the new one is saved
    assert fresh != saved
