"""The committed `emoji-mini` bundles: findable by name, intact, usable without torch, and still as good as
measured on the held-out Noto images of sample_data/ (so a regression fails CI). No network needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import clipsearch
from clipsearch.model.bundle import verify_bundle
from clipsearch.model.resolve import resolve_model
from clipsearch.train.evaluate import evaluate_bundle, folder_gallery

BUNDLED = Path(clipsearch.__file__).parent / "model" / "bundled"
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"

# Floors about 3 points under what the committed bundles measure on sample_data (see MODEL_CARD.md), so a real
# regression fails CI. Measured: emoji-mini R@1 70.3% / R@10 90.7%, emoji-mini-int8 R@1 71.0% / R@10 90.3%
# (300 images, text graph with int8 weights and fp32 activations); a different CPU's rounding moves these by a
# query or two, not by 3 points.
FLOORS = {
    "emoji-mini": {"r1": 0.67, "r10": 0.87},
    "emoji-mini-int8": {"r1": 0.68, "r10": 0.87},
}


@pytest.mark.parametrize("name", ["emoji-mini", "emoji-mini-int8"])
def test_bundled_model_resolves_by_name_and_is_intact(name: str) -> None:
    info = resolve_model(name, export_missing=False)
    assert info.path == BUNDLED / name
    assert verify_bundle(info) == []
    assert info.text.tokenizer == "wordpiece" and info.text.inputs == ("input_ids", "attention_mask")
    assert info.embed_dim == 384
    size = sum(f.stat().st_size for f in info.path.iterdir() if f.is_file())
    assert size < 32e6, f"{name} is {size / 1e6:.1f} MB"


def test_emoji_mini_searches_without_torch() -> None:
    code = """
import sys
sys.modules["torch"] = None  # any `import torch` now fails
import numpy as np
from PIL import Image
from clipsearch.model.resolve import load_model
model = load_model("emoji-mini")
text = model.encode_text(["red heart", "a cat next to a pizza"])
image = model.encode_images([Image.open(sys.argv[1])])
assert text.shape == (2, 384) and image.shape == (1, 384)
print(float((text @ image.T)[0, 0]))
"""
    result = subprocess.run([sys.executable, "-c", code, str(SAMPLE / "red-heart.png")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert -1.0 <= float(result.stdout.strip()) <= 1.0


def test_sample_data_is_the_documented_noto_set() -> None:
    entries = json.loads((SAMPLE / "index.json").read_text(encoding="utf-8"))
    assert 200 <= len(entries) <= 400
    assert all((SAMPLE / e["file"]).is_file() for e in entries)
    assert (SAMPLE / "LICENSE-NOTO.txt").read_text(encoding="utf-8").count("Apache License") >= 1
    assert "Noto" in (SAMPLE / "ATTRIBUTION.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_recall_floor_on_held_out_noto_sample(name: str) -> None:
    report = evaluate_bundle(BUNDLED / name, folder_gallery(SAMPLE), threads=2)
    assert report.full.queries == report.full.gallery >= 200
    assert report.full.r1 >= FLOORS[name]["r1"], str(report.full)
    assert report.full.r10 >= FLOORS[name]["r10"], str(report.full)



# Re-ranking the top 32 with the bundled ITM head on the same 300 images (evaluate_rerank: the torch-free runtime,
# image tokens rounded to int8 as the index stores them). Measured: emoji-mini R@1 70.3 -> 71.0, R@10 90.7 -> 92.7;
# emoji-mini-int8 R@1 71.0 -> 71.0, R@10 90.3 -> 92.7. Floors about 3 points under.
RERANK_FLOORS = {"emoji-mini": {"r1": 0.68, "r10": 0.89}, "emoji-mini-int8": {"r1": 0.68, "r10": 0.89}}


@pytest.mark.parametrize("name", sorted(RERANK_FLOORS))
def test_rerank_floor_on_held_out_noto_sample(name: str) -> None:
    from clipsearch.train.evaluate_rerank import evaluate_rerank

    gallery = folder_gallery(SAMPLE)
    report = evaluate_rerank(BUNDLED / name, gallery, dict(enumerate(gallery.queries)), k=32, threads=2,
                             log=lambda _: None)
    assert report.reranked.queries == 300 and report.k == 32
    assert report.reranked.r1 / 100 >= RERANK_FLOORS[name]["r1"], report.lines()
    assert report.reranked.r10 / 100 >= RERANK_FLOORS[name]["r10"], report.lines()


def test_a_query_of_only_words_the_vocabulary_lacks_is_refused_with_a_hint(tmp_path) -> None:
    from clipsearch.errors import QueryError
    from clipsearch.model.resolve import load_model
    from clipsearch.search import SearchQuery, Searcher
    from clipsearch.store.collection import Collection
    from clipsearch.indexer.runner import index_paths

    model = load_model("emoji-mini")
    # Every emoji is [UNK] to its WordPiece vocabulary, so every emoji query embeds the same: a ranking of nothing.
    same = model.encode_text(["❤️", "😀🍌"])
    assert float(same[0] @ same[1]) > 0.9999
    assert model.tokenizer.knows_none_of("❤️ 😀") and not model.tokenizer.knows_none_of("red heart ❤️")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("red-heart.png", "banana.png", "bicycle.png"):
        (folder / name).write_bytes((SAMPLE / name).read_bytes())
    collection = Collection.create("e", tmp_path / "idx")
    index_paths(collection, model, [folder])
    searcher = Searcher(collection, model)
    with pytest.raises(QueryError, match="knows none of the words in '❤️'") as raised:
        searcher.search(SearchQuery.build(text="❤️", k=3))
    assert "red heart" in (raised.value.hint or "")
    hits = searcher.search(SearchQuery.build(text="red heart ❤️", k=3))  # one known word is enough
    assert Path(hits[0].path).name == "red-heart.png"
    collection.close()


def test_rest_answers_an_all_unknown_query_with_400_and_the_others_as_usual(tmp_path) -> None:
    import concurrent.futures

    from fastapi.testclient import TestClient

    from clipsearch.web import create_app
    from web_fixtures import app_settings, build_indexed_photos

    indexed = build_indexed_photos(tmp_path, BUNDLED / "emoji-mini", count=6)
    with TestClient(create_app(app_settings(indexed))) as client:
        for answer in (client.get("/api/search", params={"q": "😀🍌"}),
                       client.post("/api/search", json={"text": "😀🍌"}),
                       client.post("/knn-service", json={"text": "😀🍌", "modality": "image", "num_images": 3,
                                                         "indice_name": indexed.name})):
            assert answer.status_code == 400, answer.text
            assert "knows none of the words in '😀🍌'" in answer.json()["detail"] and "red heart" in answer.json()["hint"]
        # Sent together (one batched encoder call): the unknown one fails alone.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda q: client.get("/api/search", params={"q": q, "k": 3}),
                                    ["😀🍌", "red heart", "banana", "❤️"]))
        assert [a.status_code for a in answers] == [400, 200, 200, 400]
        assert all(len(a.json()["results"]) == 3 for a in answers[1:3])
        # Labels too: two all-[UNK] labels got 50% each.
        image = ("h.png", indexed.photos[0].read_bytes(), "image/png")
        labels = client.post("/api/classify", files={"file": image}, data={"labels": "❤️,🐶"})
        assert labels.status_code == 400 and "knows none of the words in the label '❤️'" in labels.json()["detail"]
        assert client.post("/api/classify", files={"file": image}, data={"labels": "red heart,dog ❤️"}).status_code == 200
