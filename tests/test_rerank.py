"""Re-ranking text queries with a bundle's ITM head (BLIP): the order changes only within the top rerank_k,
final scores are ITM match logit + λ * ITC cosine recomputed here from the ONNX graphs (up to the int8
storage of the image tokens), min_match filters by the match probability, models without ITM and image
queries fail clearly, a text-only search never opens the ITM graph and re-ranking never opens the visual one
(tokens are stored at index time), candidates without stored tokens are kept unscored, and the CLI and REST
expose the new fields. More on stored tokens in test_tokens.py.

The model is the tiny random BLIP of blip_fixtures.py (session fixtures in conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipsearch.errors import BundleError, QueryError
from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.runner import index_paths
from clipsearch.model.itm import ItmSpec, itm_scores
from clipsearch.model.preprocess import image_to_pixels
from clipsearch.model.runtime import ClipModel
from clipsearch.search import DEFAULT_ITC_WEIGHT as ITC_WEIGHT, SearchQuery, Searcher
from clipsearch.store.collection import Collection
from clipsearch.web import ServerSettings, create_app
from photo_fixtures import make_photos
from web_fixtures import TEST_HOSTS

NAME = "rr"
PHOTOS = 14
TEXT = "a dog on a beach"
CLI = [sys.executable, "-c", "from clipsearch.cli import main; main()"]


def _index(root: Path, bundle: Path, count: int = PHOTOS) -> Path:
    make_photos(root / "photos", count)
    index_dir = root / "collections"
    with Collection.create(NAME, index_dir) as collection:
        summary = index_paths(collection, ClipModel(bundle, threads=1), [str(root / "photos")],
                              IndexOptions(batch_size=8, workers=0))
        assert summary.added == count
    return index_dir


@pytest.fixture(scope="module")
def index_dir(blip_bundle, tmp_path_factory) -> Path:
    return _index(tmp_path_factory.mktemp("rerank"), blip_bundle)


@pytest.fixture(scope="module")
def model(blip_bundle) -> ClipModel:
    return ClipModel(blip_bundle, threads=1)


@pytest.fixture()
def searcher(index_dir, model):
    with Searcher(Collection.open(NAME, index_dir), model) as s:
        yield s


# Stored tokens are int8 (the error of each value at most 1/254 of its token's largest): the final scores and
# match probabilities of the tiny model (whose ITM head is scaled up to spread its probabilities) move by a
# little, never by enough to matter here.
FINAL_TOLERANCE = 0.02
MATCH_TOLERANCE = 0.003


def _expected(bundle: Path, text: str, paths: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(final score, ITC cosine, match probability) of `text` against `paths`, straight from the three graphs."""
    clip = ClipModel(bundle, threads=1)
    pixels = np.stack([image_to_pixels(Image.open(p).convert("RGB"), clip.preprocess) for p in paths])
    embeds, tokens = ort.InferenceSession(str(bundle / "visual.onnx")).run(["image_embeds", "image_tokens"],
                                                                           {"pixel_values": pixels})
    batch = clip.tokenizer([text])
    text_embed = ort.InferenceSession(str(bundle / "textual.onnx")).run(None, batch.inputs)[0][0]
    itc = embeds @ text_embed
    logits = np.concatenate([  # one pair per call: independent of the batched path under test
        ort.InferenceSession(str(bundle / "itm.onnx")).run(None, {**batch.inputs, "image_tokens": tokens[i:i + 1]})[0]
        for i in range(len(paths))])
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probability = e[:, 1] / e.sum(axis=1)
    return logits[:, 1] - logits[:, 0] + ITC_WEIGHT * itc, itc, probability


def test_rerank_changes_order_only_within_the_top_k_and_scores_are_itm_plus_itc(searcher, blip_bundle):
    itc = searcher.search(SearchQuery.build(text=TEXT, k=PHOTOS))
    assert all(h.itc_score is None and h.match is None for h in itc)
    top = 6
    ranked = searcher.search(SearchQuery.build(text=TEXT, k=PHOTOS, rerank=True, rerank_k=top))
    assert len(ranked) == PHOTOS
    assert {h.id for h in ranked[:top]} == {h.id for h in itc[:top]}
    assert [h.id for h in ranked[top:]] == [h.id for h in itc[top:]]
    assert [(h.score, h.itc_score, h.match) for h in ranked[top:]] == [(h.score, None, None) for h in itc[top:]]
    assert [h.id for h in ranked[:top]] != [h.id for h in itc[:top]], "the ITM head should reorder something"
    finals = [h.score for h in ranked[:top]]
    assert finals == sorted(finals, reverse=True)
    by_id = {h.id: h for h in itc}
    assert all(h.itc_score == by_id[h.id].score for h in ranked[:top])

    final, cosine, probability = _expected(blip_bundle, TEXT, [h.path for h in ranked[:top]])
    print("largest differences from fresh fp32 tokens: final", np.abs(np.array(finals) - final).max(),
          "match", np.abs(np.array([h.match for h in ranked[:top]]) - probability).max())
    assert np.abs(np.array(finals) - final).max() < FINAL_TOLERANCE
    assert np.abs(np.array([h.itc_score for h in ranked[:top]]) - cosine).max() < 1e-4
    assert np.abs(np.array([h.match for h in ranked[:top]]) - probability).max() < MATCH_TOLERANCE
    print("re-ranked:", [(h.id, h.score, h.itc_score, h.match) for h in ranked[:top]])

    # rerank_k > k: the k best of the re-ranked candidates.
    deeper = searcher.search(SearchQuery.build(text=TEXT, k=3, rerank=True, rerank_k=top))
    assert [(h.id, h.score) for h in deeper] == [(h.id, h.score) for h in ranked[:3]]



def test_candidates_scored_in_several_batches_rank_as_in_one(searcher, monkeypatch):
    import clipsearch.search as search_module

    whole = searcher.search(SearchQuery.build(text=TEXT, k=PHOTOS, rerank=True, rerank_k=PHOTOS))
    monkeypatch.setattr(search_module, "RERANK_BATCH", 4)  # 14 candidates: batches of 4, 4, 4 and 2
    batched = searcher.search(SearchQuery.build(text=TEXT, k=PHOTOS, rerank=True, rerank_k=PHOTOS))
    assert [h.id for h in batched] == [h.id for h in whole]
    assert np.allclose([h.score for h in batched], [h.score for h in whole], atol=1e-5)

def test_itm_scorer_batch_equals_pairs_and_match_logit_is_the_margin(model, blip_bundle):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 70, 3), dtype=np.uint8)) for i in range(5)]
    tokens = model.image_tokens(images)
    assert tokens.shape == (5, *read_shape(blip_bundle))
    scores = model.itm.score(TEXT, tokens)
    singles = np.concatenate([model.itm.logits(TEXT, tokens[i:i + 1]) for i in range(5)])
    assert np.abs(scores.logits - singles).max() < 1e-4
    assert np.allclose(scores.match_logit, scores.logits[:, 1] - scores.logits[:, 0], atol=1e-5)
    assert np.allclose(scores.probability, 1 / (1 + np.exp(-scores.match_logit)), atol=1e-5)
    assert np.allclose(itm_scores(np.array([[0.0, 2.0], [3.0, -1.0]]), 1).match_logit, [2.0, -4.0])


def read_shape(bundle: Path) -> tuple[int, int]:
    return tuple(json.loads((bundle / "model.json").read_text())["itm"]["image_tokens_shape"])


def test_min_match_keeps_only_confident_matches(searcher):
    ranked = searcher.search(SearchQuery.build(text=TEXT, k=PHOTOS, rerank=True, rerank_k=PHOTOS))
    probabilities = sorted(h.match for h in ranked)
    threshold = probabilities[len(probabilities) // 2]
    kept = searcher.search(SearchQuery.build(text=TEXT, k=PHOTOS, rerank=True, rerank_k=PHOTOS, min_match=threshold))
    assert kept and all(h.match >= threshold for h in kept)
    assert [h.id for h in kept] == [h.id for h in ranked if h.match >= threshold]
    # Hits beyond rerank_k have no probability: with min_match they are left out.
    few = searcher.search(SearchQuery.build(text=TEXT, k=PHOTOS, rerank=True, rerank_k=3, min_match=0.0))
    assert len(few) == 3 and all(h.match is not None for h in few)
    assert searcher.search(SearchQuery.build(text=TEXT, k=PHOTOS, rerank=True, min_match=1.0)) == [
        h for h in ranked if h.match >= 1.0]
    with pytest.raises(QueryError, match="min_match needs re-ranking"):
        searcher.search(SearchQuery.build(text=TEXT, min_match=0.5))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(QueryError, match="min_match must be a probability"):
            searcher.search(SearchQuery.build(text=TEXT, rerank=True, min_match=bad))
    for bad in (0, 257):
        with pytest.raises(QueryError, match="rerank_k must be between 1 and 256"):
            searcher.search(SearchQuery.build(text=TEXT, rerank=True, rerank_k=bad))


def test_a_calibrated_bundle_reports_match_from_the_final_score_and_min_match_uses_it(index_dir, blip_bundle,
                                                                                     searcher, tmp_path):
    # model.json's itm.calibration (clipsearch train calibrate-match) makes match = sigmoid(a * score + b): the same
    # order and scores, and a probability that falls with the rank.
    calibrated = tmp_path / "calibrated"
    shutil.copytree(blip_bundle, calibrated)
    meta = json.loads((calibrated / "model.json").read_text(encoding="utf-8"))
    meta["itm"]["calibration"] = {"scale": 0.5, "bias": -1.0}
    (calibrated / "model.json").write_text(json.dumps(meta), encoding="utf-8")
    query = SearchQuery.build(text=TEXT, k=PHOTOS, rerank=True, rerank_k=PHOTOS)
    plain = searcher.search(query)
    with Searcher(Collection.open(NAME, index_dir), ClipModel(calibrated, threads=1)) as own:
        hits = own.search(query)
        assert [(h.id, h.score) for h in hits] == [(h.id, h.score) for h in plain]
        for hit in hits:
            assert hit.match == pytest.approx(1.0 / (1.0 + np.exp(-(0.5 * hit.score - 1.0))), abs=2e-6)
        assert [h.match for h in hits] == sorted((h.match for h in hits), reverse=True)
        assert [h.match for h in hits] != [h.match for h in plain]
        threshold = hits[len(hits) // 2].match
        kept = own.search(SearchQuery.build(text=TEXT, k=PHOTOS, rerank=True, rerank_k=PHOTOS, min_match=threshold))
        assert [h.id for h in kept] == [h.id for h in hits if h.match >= threshold]


@pytest.mark.parametrize("bad", [{"scale": -0.5, "bias": 0}, {"scale": 0.5}, {"scale": "nan", "bias": 0}, [0.5, 0]])
def test_a_malformed_calibration_is_refused_when_the_bundle_loads(blip_bundle, bad):
    raw = json.loads((blip_bundle / "model.json").read_text(encoding="utf-8"))["itm"]
    assert ItmSpec.from_dict({**raw, "calibration": {"scale": 0.3, "bias": -10}}).calibration == (0.3, -10.0)
    with pytest.raises(BundleError, match="itm.* entry is malformed"):
        ItmSpec.from_dict({**raw, "calibration": bad})


def test_image_queries_cannot_rerank(searcher):
    first = searcher.search(SearchQuery.build(text=TEXT, k=1))[0]
    for query in (SearchQuery.build(image=first.path, rerank=True), SearchQuery.build(like=first.id, rerank=True),
                  SearchQuery.build(text=TEXT, like=first.id, rerank=True)):
        with pytest.raises(QueryError, match="re-ranking needs a text query"):
            searcher.search(query)
    # A negative image only shapes the ITC candidates; the ITM head reads the text.
    assert searcher.search(SearchQuery.build(text=TEXT, not_images=[first.path], rerank=True, k=3))[0].match is not None


def test_an_itm_head_changed_after_export_gives_no_score(index_dir, blip_bundle, tmp_path):
    import shutil

    from clipsearch.errors import BundleError

    changed = tmp_path / "changed-itm"
    shutil.copytree(blip_bundle, changed)
    with open(changed / "itm.onnx", "ab") as graph:
        graph.write(b"\0")
    with Searcher(Collection.open(NAME, index_dir), ClipModel(changed, threads=1)) as searcher:
        assert len(searcher.search(SearchQuery.build(text=TEXT, k=2))) == 2  # the dual encoder is intact
        with pytest.raises(BundleError, match="itm.onnx does not match .* re-ranking scores would not be"):
            searcher.search(SearchQuery.build(text=TEXT, rerank=True))


def test_a_model_without_an_itm_head_cannot_rerank(tiny_bundle, tmp_path):
    index_dir = _index(tmp_path, tiny_bundle, count=4)
    with Searcher(Collection.open(NAME, index_dir), ClipModel(tiny_bundle, threads=1)) as searcher:
        assert len(searcher.search(SearchQuery.build(text=TEXT, k=2))) == 2
        with pytest.raises(QueryError) as caught:
            searcher.search(SearchQuery.build(text=TEXT, rerank=True))
    name = json.loads((tiny_bundle / "model.json").read_text())["name"]
    assert caught.value.message == f"model {name} cannot re-rank (no ITM head)"
    assert "clipsearch models export-blip" in caught.value.hint
    done = subprocess.run([*CLI, "search", TEXT, "--rerank", "--collection", NAME, "--index-dir", str(index_dir)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "cannot re-rank (no ITM head)" in done.stderr and "Traceback" not in done.stderr
    assert "clipsearch models export-blip" in done.stderr


def test_text_search_never_opens_the_itm_graph_and_reranking_never_runs_the_visual_graph(index_dir, blip_bundle):
    model = ClipModel(blip_bundle, threads=1)
    with Searcher(Collection.open(NAME, index_dir), model) as searcher:
        searcher.search(SearchQuery.build(text="something never searched before", k=3))
        assert model._itm is None and not model.visual.loaded
        assert model.itm is not None and not model.itm.loaded  # made on demand, graph still closed
        hits = searcher.search(SearchQuery.build(text=TEXT, k=3, rerank=True, rerank_k=4))
        assert model.itm.loaded and hits[0].match is not None
        assert not model.visual.loaded, "re-ranking reads stored tokens, it never runs the visual graph"

        requested = []
        session = model.visual.session
        real_run = session.run
        session.run = lambda names, feeds, *a, **kw: requested.append(list(names)) or real_run(names, feeds, *a, **kw)
        assert model.encode_images([Image.new("RGB", (30, 20))]).shape == (1, model.embed_dim)
        assert requested == [["image_embeds"]]


def test_candidates_without_stored_tokens_keep_their_itc_order_after_the_reranked_ones(blip_bundle, tmp_path):
    index_dir = _index(tmp_path, blip_bundle, count=8)
    with Searcher(Collection.open(NAME, index_dir), ClipModel(blip_bundle, threads=1)) as searcher:
        itc = searcher.search(SearchQuery.build(text=TEXT, k=8))
        gone, broken, fifo = itc[0], itc[2], itc[4]
        # Files that changed or vanished since indexing do not matter: their stored tokens are used.
        os.remove(gone.path)
        os.remove(fifo.path)
        os.mkfifo(fifo.path)
        assert all(h.match is not None for h in searcher.search(
            SearchQuery.build(text=TEXT, k=8, rerank=True, rerank_k=6))[:6])
        # Candidates whose token rows are gone (and that tokens.bin no longer vouches for) are unscored.
        store = searcher.collection.store
        with store.conn:
            store.conn.executemany("DELETE FROM image_tokens WHERE id = ?", [(gone.id,), (broken.id,), (fifo.id,)])
            store.conn.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'tokens_gen'")
        ranked = searcher.search(SearchQuery.build(text=TEXT, k=8, rerank=True, rerank_k=6))
    assert [h.id for h in ranked[3:6]] == [gone.id, broken.id, fifo.id]
    assert all(h.match is None and h.itc_score is None for h in ranked[3:])
    assert [(h.id, h.score) for h in ranked[3:]] == [(h.id, h.score) for h in (gone, broken, fifo, *itc[6:])]
    assert {h.id for h in ranked[:3]} == {itc[1].id, itc[3].id, itc[5].id}
    assert all(h.match is not None for h in ranked[:3])


def test_cli_json_has_itc_score_and_match_when_reranked(index_dir):
    base = [*CLI, "search", TEXT, "-k", "5", "--collection", NAME, "--index-dir", str(index_dir), "--json"]
    done = subprocess.run([*base, "--rerank", "--rerank-k", "3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert len(rows) == 5 and all(set(r) == {"id", "path", "score", "width", "height", "missing", "itc_score", "match"} for r in rows)
    assert all(0 <= r["match"] <= 1 and isinstance(r["itc_score"], float) for r in rows[:3])
    assert all(r["match"] is None and r["itc_score"] is None for r in rows[3:])
    plain = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert all(set(r) == {"id", "path", "score", "width", "height", "missing"} for r in json.loads(plain.stdout))
    alone = subprocess.run([*base, "--min-match", "0.5"], capture_output=True, text=True, timeout=120)
    assert alone.returncode == 1 and "min_match needs re-ranking" in alone.stderr and "--rerank" in alone.stderr


def test_rest_search_reranks_and_validates(index_dir):
    app = create_app(ServerSettings(allowed_hosts=TEST_HOSTS, collection=NAME, index_dir=index_dir))
    with TestClient(app) as client:
        plain = client.get("/api/search", params={"q": TEXT, "k": 5}).json()["results"]
        assert all(r["itc_score"] is None and r["match"] is None for r in plain)
        got = client.get("/api/search", params={"q": TEXT, "k": 5, "rerank": "true", "rerank_k": 3})
        assert got.status_code == 200, got.text
        results = got.json()["results"]
        assert {r["id"] for r in results[:3]} == {r["id"] for r in plain[:3]}
        assert [r["id"] for r in results[3:]] == [r["id"] for r in plain[3:]]
        assert all(0 <= r["match"] <= 1 and r["itc_score"] is not None for r in results[:3])
        posted = client.post("/api/search", json={"text": TEXT, "k": 5, "rerank": True, "rerank_k": 3})
        assert posted.status_code == 200 and posted.json()["results"] == results
        threshold = sorted(r["match"] for r in results[:3])[1]
        kept = client.post("/api/search", json={"text": TEXT, "k": 5, "rerank": True, "rerank_k": 3,
                                                "min_match": threshold}).json()["results"]
        assert [r["id"] for r in kept] == [r["id"] for r in results[:3] if r["match"] >= threshold]
        best = max(r["match"] for r in results[:3])
        assert best < 1.0
        for answer in (client.get("/api/search", params={"q": TEXT, "k": 5, "rerank": "true", "rerank_k": 3,
                                                         "min_match": (best + 1.0) / 2}),
                       client.post("/api/search", json={"text": TEXT, "k": 5, "rerank": True, "rerank_k": 3,
                                                        "min_match": (best + 1.0) / 2})):
            # Nothing reached the threshold: the answer says so (the page shows it), not just an empty list.
            assert answer.json()["results"] == [] and "minimum match" in answer.json()["note"], answer.text

        for params in ({"rerank_k": 0}, {"rerank_k": 257}, {"min_match": -0.1}, {"min_match": 1.01},
                       {"min_match": "nan"}, {"rerank_k": "many"}):
            answer = client.get("/api/search", params={"q": TEXT, "rerank": "true", **params})
            assert answer.status_code == 422 and "detail" in answer.json(), (params, answer.text)
            body = {"text": TEXT, "rerank": True, **params}
            answer = client.post("/api/search", json=body)
            assert answer.status_code == 422 and "detail" in answer.json(), (body, answer.text)
        alone = client.get("/api/search", params={"q": TEXT, "min_match": 0.5})
        assert alone.status_code == 400 and "min_match needs re-ranking" in alone.json()["detail"]
        by_image = client.post("/api/search", json={"image_id": plain[0]["id"], "rerank": True})
        assert by_image.status_code == 400 and "needs a text query" in by_image.json()["detail"]

        spec = client.get("/openapi.json").json()
        params = {p["name"]: p for p in spec["paths"]["/api/search"]["get"]["parameters"]}
        assert {"rerank", "rerank_k", "min_match"} <= set(params)
        assert "1-256" in params["rerank_k"]["description"] and "0-1" in params["min_match"]["description"]
        schemas = spec["components"]["schemas"]
        assert {"rerank", "rerank_k", "min_match"} <= set(schemas["SearchRequest"]["properties"])
        assert {"itc_score", "match"} <= set(schemas["ImageResult"]["properties"])
        assert "itc_score" not in schemas["ImageResult"].get("required", [])


def test_reranking_a_collection_emptied_since_answers_nothing_not_missing_tokens(blip_bundle, tmp_path):
    index_dir = _index(tmp_path, blip_bundle, count=2)
    shutil.rmtree(tmp_path / "photos")
    (tmp_path / "photos").mkdir()
    with Collection.open(NAME, index_dir) as collection:
        summary = index_paths(collection, ClipModel(blip_bundle, threads=1), [str(tmp_path / "photos")],
                              IndexOptions(batch_size=8, workers=0))
        assert (summary.removed, summary.total) == (2, 0)
    with Searcher(Collection.open(NAME, index_dir), ClipModel(blip_bundle, threads=1)) as searcher:
        assert searcher.search(SearchQuery.build(text=TEXT, k=5, rerank=True)) == []  # said: "no stored image tokens"
