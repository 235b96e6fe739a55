"""BLIP (transformers BlipForImageTextRetrieval) → bundle: parity of the ONNX graphs and the torch-free tokenizer
and transform with transformers, indexing and search through the normal runtime, and the offline error.

The model is a tiny random BlipConfig; its tokenizer is BLIP's (bert-base-uncased WordPiece plus the [DEC] and
[ENC] tokens, vocabulary 30524) rebuilt from the vocabulary the bundled emoji-mini model ships, since the
hub cannot be reached here. Everything is saved with save_pretrained and exported from that folder, so the
real `from_pretrained` loading path runs too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clipsearch.model.bundle import read_bundle, verify_bundle
from clipsearch.model.preprocess import image_to_pixels
from clipsearch.model.runtime import ClipModel
from blip_fixtures import IMAGE_SIZE
from photo_fixtures import block_image, make_photos
from test_model_layer import VARIED_TEXTS

# The export extra (installed by scripts/test) brings both: a missing one is a failure, never a skip.
import torch  # noqa: E402
import transformers  # noqa: E402

# the tiny BLIP and its fixtures (blip_source, blip_bundle: one export per test session) live in blip_fixtures.py
# and conftest.py


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (50 + 19 * i, 80 + 29 * i, 3), dtype=np.uint8)) for i in range(count)]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_bundle_layout_and_checksums_cover_the_itm_graph(blip_bundle, tmp_path):
    info = read_bundle(blip_bundle)
    assert info.text.tokenizer == "wordpiece" and info.text.inputs == ("input_ids", "attention_mask")
    assert info.embed_dim == 24 and info.context_length == 512
    assert info.extra["itm"]["file"] == "itm.onnx" and info.extra["itm"]["image_tokens"] == "image_tokens"
    assert info.extra["itm"]["image_tokens_shape"] == [(IMAGE_SIZE // 16) ** 2 + 1, 32]
    assert info.extra["itm"]["enc_token_id"] == 30523 and info.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)
    assert {"itm.onnx", "itm.onnx.data", "visual.onnx", "textual.onnx"} <= set(info.files)
    assert json.loads((blip_bundle / "preprocess.json").read_text())["resize_mode"] == "squash"
    assert verify_bundle(info) == []
    copy = tmp_path / "copy"
    shutil.copytree(blip_bundle, copy)
    with open(copy / "itm.onnx.data", "r+b") as handle:
        handle.write(b"\x00\x01\x02\x03")
    assert verify_bundle(read_bundle(copy)) == ["itm.onnx.data: sha256 differs from model.json"]


def test_token_ids_equal_transformers(blip_bundle, blip_source):
    _, _, tokenizer = blip_source
    texts = VARIED_TEXTS + ["[ENC] [DEC] [CLS] literal specials [SEP] [PAD] [MASK]", "Ça coûte 5€ — naïve résumé"]
    ours = ClipModel(blip_bundle).tokenizer.token_ids(texts)
    reference = tokenizer(texts)["input_ids"]  # what BlipProcessor feeds the model (it only drops token_type_ids)
    for text, ref_ids, our_ids in zip(texts, reference, ours):
        assert our_ids == ref_ids, f"token ids differ for {text!r}"
    overlong = "word " * 600  # longer than the 512 positions: both cut to 512 and keep [SEP] last
    assert ClipModel(blip_bundle).tokenizer.token_ids([overlong])[0] == tokenizer(overlong, truncation=True, max_length=512)["input_ids"]


def test_image_transform_equals_blip_image_processor(blip_bundle):
    model = ClipModel(blip_bundle)
    images = _images(4)
    ours = np.stack([image_to_pixels(image, model.preprocess) for image in images])
    pil = transformers.BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    assert np.abs(ours - pil(images, return_tensors="np")["pixel_values"]).max() < 1e-5
    # The default (torchvision) backend resamples a little differently: under 1/255 before normalisation.
    torchvision = transformers.BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    tv = torchvision(images, return_tensors="pt")["pixel_values"].numpy()
    assert np.abs(ours - tv).max() < 0.03


def test_itc_embeddings_and_itm_logits_match_transformers(blip_bundle, blip_source):
    import onnxruntime as ort

    _, model, tokenizer = blip_source
    clip = ClipModel(blip_bundle)
    texts = [t for t in VARIED_TEXTS if t.strip()][:8]
    images = _images(len(texts))
    pixels = np.stack([image_to_pixels(i, clip.preprocess)
                       for i in images])
    batch = clip.tokenizer(texts)
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        pv = torch.from_numpy(pixels)
        ref_tokens = model.vision_model(pixel_values=pv).last_hidden_state
        ref_image = torch.nn.functional.normalize(model.vision_proj(ref_tokens[:, 0]), dim=-1).numpy()
        text_states = model.text_encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        ref_text = torch.nn.functional.normalize(model.text_proj(text_states[:, 0]), dim=-1).numpy()
        ref_itc = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pv,
                        use_itm_head=False).itm_score.numpy()
        ref_itm = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pv,
                        use_itm_head=True).itm_score.numpy()
    assert np.array_equal(batch.inputs["input_ids"], enc["input_ids"].numpy())
    image = clip.encode_pixels(pixels)
    text = clip.encode_text(texts)
    image_cos, text_cos = (image * ref_image).sum(axis=1), (text * ref_text).sum(axis=1)
    assert image_cos.min() >= 0.9999 and text_cos.min() >= 0.9999, (image_cos, text_cos)
    assert np.abs(image @ text.T - ref_itc).max() < 1e-4

    embeds, tokens = ort.InferenceSession(str(blip_bundle / "visual.onnx")).run(None, {"pixel_values": pixels})
    assert np.abs(tokens - ref_tokens.numpy()).max() < 1e-4
    logits = ort.InferenceSession(str(blip_bundle / "itm.onnx")).run(
        ["itm_logits"], {**batch.inputs, "image_tokens": tokens})[0]
    assert logits.shape == (len(texts), 2)
    print("ITM match probabilities:", _softmax(ref_itm)[:, 1].round(3).tolist())
    assert np.abs(logits - ref_itm).max() < 1e-4
    assert (logits.argmax(axis=1) == ref_itm.argmax(axis=1)).all()
    assert np.abs(_softmax(logits)[:, 1] - _softmax(ref_itm)[:, 1]).max() <= 1e-4
    print("BLIP parity: min cos image %.7f text %.7f, max |itm logit diff| %.2e, max |itc diff| %.2e" % (
        image_cos.min(), text_cos.min(), np.abs(logits - ref_itm).max(), np.abs(image @ text.T - ref_itc).max()))


def test_bundle_indexes_and_searches_through_the_runtime(blip_bundle, tmp_path):
    from clipsearch.indexer.pipeline import IndexOptions
    from clipsearch.indexer.runner import index_paths
    from clipsearch.search import SearchQuery, Searcher
    from clipsearch.store.collection import Collection

    model = ClipModel(blip_bundle, threads=1)
    folder = tmp_path / "photos"
    make_photos(folder, 8)
    block_image(0).resize((96, 72), Image.Resampling.BILINEAR).save(folder / "zz_copy_of_0.jpg", quality=90)
    collection = Collection.create("blip", tmp_path / "idx")
    summary = index_paths(collection, model, [str(folder)], IndexOptions(batch_size=4, workers=0))
    assert summary.added == 9
    searcher = Searcher(collection, model)
    hits = searcher.search(SearchQuery.build(image=folder / "photo_000.png", k=3, include_query_images=True))
    assert [os.path.basename(h.path) for h in hits[:2]] == ["photo_000.png", "zz_copy_of_0.jpg"]
    text_hits = searcher.search(SearchQuery.build(text="a red square", k=5))
    assert len(text_hits) == 5 and all(-1.0 <= h.score <= 1.0 for h in text_hits)


NO_TORCH_SCRIPT = """
import json, sys
import numpy as np
import onnxruntime as ort
from PIL import Image
from clipsearch.model.runtime import ClipModel
m = ClipModel(sys.argv[1])
t = m.encode_text(["a photo of a cat", "a dog"])
i = m.encode_images([Image.new("RGB", (90, 60), (200, 30, 30))])
batch = m.tokenizer(["a photo of a cat"])
tokens = ort.InferenceSession(sys.argv[1] + "/visual.onnx").run(["image_tokens"], {"pixel_values": np.zeros((1, 3, 64, 64), np.float32)})[0]
logits = ort.InferenceSession(sys.argv[1] + "/itm.onnx").run(None, {**batch.inputs, "image_tokens": tokens})[0]
print(json.dumps({"torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules,
                  "shapes": [list(t.shape), list(i.shape), list(logits.shape)]}))
"""


def test_bundle_runs_without_torch(blip_bundle):
    done = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, str(blip_bundle)], capture_output=True, text=True,
                          check=True, timeout=120)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"torch": False, "transformers": False, "shapes": [[2, 24], [1, 24], [1, 2]]}


def _cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "clipsearch", *args], capture_output=True, text=True, env=env, timeout=240)


def test_offline_hub_id_fails_with_a_fix(tmp_path):
    for env in ({"CLIPSEARCH_OFFLINE": "1"}, {"CLIPSEARCH_OFFLINE": "0", "HF_HUB_OFFLINE": "1"}):
        done = _cli("models", "export-blip", "Salesforce/blip-itm-base-coco", "--out", str(tmp_path / "blip"),
                    env_extra={**env, "HF_HOME": str(tmp_path / "hf-home")})
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        assert "Salesforce/blip-itm-base-coco is not cached" in done.stderr and "offline mode" in done.stderr
        assert "clipsearch models export-blip Salesforce/blip-itm-base-coco --out DIR" in done.stderr
        assert "--model emoji-mini" in done.stderr
        assert not (tmp_path / "blip").exists()


def test_cli_export_int8_stays_close_to_fp32(blip_source, blip_bundle, tmp_path):
    import onnxruntime as ort

    folder, _, _ = blip_source
    out = tmp_path / "tiny-blip-int8"
    done = _cli("models", "export-blip", str(folder), "--out", str(out), "--precision", "int8")
    assert done.returncode == 0, done.stderr
    info = read_bundle(out)
    assert info.precision == "int8" and verify_bundle(info) == [] and "itm.onnx" in info.files
    fp32, int8 = ClipModel(blip_bundle), ClipModel(out)
    texts = [t for t in VARIED_TEXTS if t.strip()][:8]
    images = _images(len(texts))
    text_cos = (fp32.encode_text(texts) * int8.encode_text(texts)).sum(axis=1).min()
    image_cos = (fp32.encode_images(images) * int8.encode_images(images)).sum(axis=1).min()
    pixels = np.stack([image_to_pixels(i, fp32.preprocess)
                       for i in images])
    batch = fp32.tokenizer(texts)
    logits = {}
    for precision, bundle in (("fp32", blip_bundle), ("int8", out)):
        tokens = ort.InferenceSession(str(bundle / "visual.onnx")).run(["image_tokens"], {"pixel_values": pixels})[0]
        logits[precision] = ort.InferenceSession(str(bundle / "itm.onnx")).run(None, {**batch.inputs, "image_tokens": tokens})[0]
    print("BLIP int8 vs fp32: min cos text %.5f image %.5f, max |itm prob diff| %.2e" % (
        text_cos, image_cos, np.abs(_softmax(logits["fp32"])[:, 1] - _softmax(logits["int8"])[:, 1]).max()))
    assert min(text_cos, image_cos) >= 0.98
    # ITM under int8 is only checked to run: the test head is scaled up 30x (see _spread_itm_logits), which
    # magnifies the quantisation noise of the hidden states far beyond what a trained head sees.
    assert logits["int8"].shape == (len(texts), 2) and np.isfinite(logits["int8"]).all()


def test_a_captioning_checkpoint_is_refused_clearly(blip_source, tmp_path):
    from clipsearch.errors import ModelNotAvailable
    from clipsearch.model.blip import load_blip

    folder, _, _ = blip_source
    copy = tmp_path / "captioning"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["architectures"] = ["BlipForConditionalGeneration"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotAvailable, match="not a BlipForImageTextRetrieval"):
        load_blip(str(copy))
