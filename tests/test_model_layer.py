"""Model bundles: tokenizer and embedding parity with open_clip, precision variants, no torch at runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.model.bundle import read_bundle, verify_bundle
from clipsearch.model.runtime import ClipModel

VARIED_TEXTS = [
    "a dog on a beach",
    "",
    "   ",
    "Café crème brûlée à la française",
    "东京タワーの夜景 서울 北京",
    "🐶🐱🍕 emoji!! 👩🏽‍🚀",
    "  lots   of\t\nwhitespace \u00a0 and\u2003em spaces  ",
    "don't you're it's I'll we've she'd I'm",
    "<b>html</b> &amp; &lt;tag&gt; &amp;amp;",
    "“curly quotes” ‘single’ — em dash… ellipsis",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ",
    "İstanbul straße ǅemal ﬁsh",
    "punctuation!!! ??? ... ,,, ;;; --- ___ ***",
    "numbers 1234567890 3.14159 1,000,000 $5 100%",
    "MiXeD CaSe WORDS",
    "word " * 120,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "tab\tseparated\tvalues\r\nand carriage returns",
    "<start_of_text> literal special tokens <end_of_text>",
]


def _random_images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    images = []
    for i in range(count):
        h, w = 60 + 17 * i, 90 + 23 * i  # varied aspect ratios exercise resize + centre crop
        images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return images


def test_tokenizer_ids_equal_open_clip(tiny_bundle):
    import open_clip

    reference = open_clip.get_tokenizer("clipsearch-tiny")(VARIED_TEXTS).numpy()
    ours = ClipModel(tiny_bundle).tokenizer.token_ids(VARIED_TEXTS)
    for text, ref_row, our_row in zip(VARIED_TEXTS, reference, ours):
        ref_ids = [int(t) for t in ref_row if t != 0]
        assert our_row == ref_ids, f"token ids differ for {text!r}"
    # the overlong text is cut to the context length and still ends with end-of-text
    longest = max(ours, key=len)
    assert len(longest) == 77 and longest[-1] == 49407


def test_text_batch_is_padded_to_longest_query_not_context(tiny_bundle):
    model = ClipModel(tiny_bundle)
    batch = model.tokenizer(["a red heart", "a cat"])
    assert batch.inputs["input_ids"].shape == (2, 5)  # <sot> a red heart <eot>
    assert read_bundle(tiny_bundle).text.pad_to == "longest"


def test_fp32_embeddings_match_open_clip(tiny_bundle, tiny_torch_model):
    import open_clip
    import torch

    model = ClipModel(tiny_bundle)
    tokens = open_clip.get_tokenizer("clipsearch-tiny")(VARIED_TEXTS)
    _, _, transform = open_clip.create_model_and_transforms("clipsearch-tiny")
    images = _random_images(5)
    with torch.no_grad():
        ref_text = torch.nn.functional.normalize(tiny_torch_model.encode_text(tokens), dim=-1).numpy()
        ref_image = torch.nn.functional.normalize(
            tiny_torch_model.encode_image(torch.stack([transform(im) for im in images])), dim=-1).numpy()
    text_cos = (model.encode_text(VARIED_TEXTS) * ref_text).sum(axis=1)
    image_cos = (model.encode_images(images) * ref_image).sum(axis=1)
    assert text_cos.min() >= 0.9999, text_cos
    assert image_cos.min() >= 0.9999, image_cos


def test_precision_variants_stay_close_to_fp32(tiny_bundles):
    images = _random_images(4)
    fp32 = ClipModel(tiny_bundles["fp32"])
    ref_text, ref_image = fp32.encode_text(VARIED_TEXTS), fp32.encode_images(images)
    figures = {}
    for precision in ("fp16", "int8"):
        model = ClipModel(tiny_bundles[precision])
        assert read_bundle(tiny_bundles[precision]).precision == precision
        text_cos = (model.encode_text(VARIED_TEXTS) * ref_text).sum(axis=1).min()
        image_cos = (model.encode_images(images) * ref_image).sum(axis=1).min()
        figures[precision] = (float(text_cos), float(image_cos))
    print("precision parity (min cosine text, image):", figures)
    assert min(figures["fp16"]) >= 0.999
    # int8: the image tower dynamically quantised (measured 0.99+ on this tiny model); the text tower with the
    # recipe model.json names, chosen by its fidelity (see the next test)
    choice = json.loads((tiny_bundles["int8"] / "model.json").read_text(encoding="utf-8"))["text_int8"]
    assert choice["recipe"] in ("dynamic", "weights") and choice["floor"] == 0.995
    assert figures["int8"][1] >= 0.98 and figures["int8"][0] >= 0.99

    def graph_bytes(folder: Path, graph: str) -> int:
        return sum(p.stat().st_size for p in folder.glob(f"{graph}*"))  # graph + external weights

    for graph in ("visual.onnx", "textual.onnx"):
        assert graph_bytes(tiny_bundles["int8"], graph) < 0.6 * graph_bytes(tiny_bundles["fp32"], graph)


def _onnx_graph(path: Path):
    """The graph of an ONNX file, without its external weights."""
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


def test_int8_image_tower_quantises_every_weight_product_including_the_patch_embedding(tiny_bundles):
    def image_graph(folder: Path):
        return _onnx_graph(folder / "visual.onnx")

    def weight_products(graph) -> tuple[list[str], list[str]]:
        """(fp32 MatMuls whose B is a weight, int8 MatMulIntegers) of an image graph."""
        weights = {t.name for t in graph.initializer}
        fp32 = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
        return fp32, [n.name for n in graph.node if n.op_type == "MatMulInteger"]

    fp32_graph = image_graph(tiny_bundles["fp32"])
    fp32_products, none_int8 = weight_products(fp32_graph)
    assert not none_int8
    # The patch convolution is exported as a MatMul of the unfolded patches by a weight initializer (not by
    # conv1.weight flattened in the graph), so the quantiser sees it: it is the first product of the tower.
    first = next(n for n in fp32_graph.node if n.op_type == "MatMul")
    assert first.name in fp32_products
    left_fp32, int8_products = weight_products(image_graph(tiny_bundles["int8"]))
    assert left_fp32 == [] and len(int8_products) == len(fp32_products)


def _tokens_into_each_mlp(graph_path: Path, feeds: dict, profile_dir: Path) -> list[int]:
    """How many tokens per sequence each transformer block's MLP took when the graph ran `feeds` (one sequence),
    in block order: read from onnxruntime's profile (the activations of each [width, 4 x width] weight product)."""
    import onnxruntime as ort

    graph = _onnx_graph(graph_path)
    dims = {t.name: list(t.dims) for t in graph.initializer}
    mlp_in = [n.name for n in graph.node if n.op_type == "MatMul" and len(dims.get(n.input[1], [])) == 2
              and dims[n.input[1]][1] == 4 * dims[n.input[1]][0]]
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(profile_dir / graph_path.stem)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # nodes keep their names
    session = ort.InferenceSession(str(graph_path), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    tokens = {e["name"].removesuffix("_kernel_time"): list(e["args"]["input_type_shape"][0].values())[0][1]
              for e in events if e.get("cat") == "Node" and e["name"].removesuffix("_kernel_time") in mlp_in}
    return [tokens[name] for name in mlp_in]


def test_towers_run_their_last_block_for_the_pooled_token_only(tiny_bundle, tmp_path):
    """A tower outputs one token per sequence (the ViT class token, the text end-of-text token), so the exported
    last block runs its query projection, attention output and MLP on that token alone; keys and values still
    come from every token (parity with open_clip: test_fp32_embeddings_match_open_clip)."""
    visual = tiny_bundle / "visual.onnx"
    graph = _onnx_graph(visual)
    patch_product = next(n for n in graph.node if n.op_type == "MatMul").input[1]
    patch_rows = next(list(t.dims) for t in graph.initializer if t.name == patch_product)[0]  # C x patch h x w
    height, width = (int(d.dim_value) for d in graph.input[0].type.tensor_type.shape.dim[2:])
    tokens = 1 + 3 * height * width // patch_rows  # class token + patches
    image_mlps = _tokens_into_each_mlp(visual, {graph.input[0].name: np.zeros((1, 3, height, width), np.float32)},
                                       tmp_path)
    assert image_mlps == [tokens] * (len(image_mlps) - 1) + [1], image_mlps

    ids = ClipModel(tiny_bundle).tokenizer(["a dog on a beach"]).inputs["input_ids"]
    text_mlps = _tokens_into_each_mlp(tiny_bundle / "textual.onnx", {"input_ids": ids}, tmp_path)
    assert ids.shape == (1, 7) and text_mlps == [7] * (len(text_mlps) - 1) + [1], text_mlps


def test_int8_text_recipe_is_the_faster_one_only_when_it_stays_faithful(tiny_bundle, tmp_path, monkeypatch):
    import onnx

    from clipsearch.model import quantize
    from clipsearch.model.tokenizer import TextTokenizer

    feeds = TextTokenizer.from_bundle(read_bundle(tiny_bundle))(list(quantize.FIDELITY_CAPTIONS)).inputs
    source = tiny_bundle / "textual.onnx"

    def ops(graph: Path) -> set[str]:
        return {node.op_type for node in onnx.load(str(graph)).graph.node}

    monkeypatch.setattr(quantize, "TEXT_FIDELITY_FLOOR", 0.0)  # any fidelity will do: the fast recipe
    fast = quantize.choose_text_int8(source, tmp_path / "fast.onnx", feeds)
    assert fast.recipe == "dynamic" and set(fast.fidelity) == {"dynamic"}
    assert "DynamicQuantizeLinear" in ops(tmp_path / "fast.onnx")

    monkeypatch.setattr(quantize, "TEXT_FIDELITY_FLOOR", 1.01)  # unreachable: int8 weights, fp32 activations
    accurate = quantize.choose_text_int8(source, tmp_path / "accurate.onnx", feeds)
    assert accurate.recipe == "weights" and accurate.fidelity["dynamic"] == fast.fidelity["dynamic"]
    assert accurate.fidelity["weights"] >= 0.999 and accurate.fidelity["weights"] > accurate.fidelity["dynamic"]
    graph = onnx.load(str(tmp_path / "accurate.onnx")).graph
    assert not {"DynamicQuantizeLinear", "MatMulInteger"} & {node.op_type for node in graph.node}
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    dequantized = {node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    assert int8_weights and {t.name for t in int8_weights} <= dequantized


def test_bundle_checksums_detect_tampering(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    assert verify_bundle(read_bundle(copy)) == []
    with open(copy / "preprocess.json", "a", encoding="utf-8") as handle:
        handle.write(" ")
    assert verify_bundle(read_bundle(copy)) == ["preprocess.json: sha256 differs from model.json"]


@pytest.mark.parametrize("content, reason", [
    ('{"size": "big"}', "size must be a positive whole number"), ("[]", "expected a JSON object, not list"),
    ('{"size": [48]}', "size must be"), ('{"size": 0}', "size must be"), ('{"mean": [0.5, 0.5]}', "mean must be three"),
    ('{"std": [0, 1, 1]}', "std must be positive"), ('{"resize_mode": "zoom"}', "unknown resize_mode 'zoom'"),
    ('{"interpolation": "lanczos"}', "unknown interpolation"),
])
def test_a_malformed_preprocess_json_is_a_bundle_error_not_a_traceback(tiny_bundle, tmp_path, content, reason):
    import shutil

    from clipsearch.errors import BundleError

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    (copy / "preprocess.json").write_text(content, encoding="utf-8")  # was ValueError/AttributeError/IndexError
    with pytest.raises(BundleError, match=f"preprocess.json is malformed: {reason}") as raised:
        ClipModel(copy)
    assert raised.value.hint


def test_text_query_does_not_load_visual_graph(tiny_bundle):
    model = ClipModel(tiny_bundle)
    vectors = model.encode_text(["a cat"])
    assert vectors.shape == (1, 64)
    assert np.isclose(np.linalg.norm(vectors), 1.0, atol=1e-5)
    assert model.textual.loaded and not model.visual.loaded


NO_TORCH_SCRIPT = """
import sys, json
from PIL import Image
import numpy as np
from clipsearch.model.runtime import ClipModel
from clipsearch.model.preprocess import open_image
m = ClipModel(sys.argv[1])
t = m.encode_text(["a photo of a cat", "a dog"])
i = m.encode_images([open_image(sys.argv[2], draft_size=(64, 64))])
print(json.dumps({"torch": "torch" in sys.modules, "open_clip": "open_clip" in sys.modules,
                  "shapes": [list(t.shape), list(i.shape)]}))
"""


def test_runtime_never_imports_torch(tiny_bundle, tmp_path):
    photo = tmp_path / "photo.jpg"
    _random_images(1)[0].resize((640, 480)).save(photo, quality=90)
    done = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, str(tiny_bundle), str(photo)],
                          capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"torch": False, "open_clip": False, "shapes": [[2, 64], [1, 64]]}


def _cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "clipsearch", *args], capture_output=True, text=True, env=env)


def test_offline_pretrained_request_fails_with_a_fix(isolated_home):
    done = _cli("embed", "--model", "ViT-B-32/laion2b_s34b_b79k", "--text", "a dog")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "ViT-B-32/laion2b_s34b_b79k" in done.stderr
    assert "clipsearch models export ViT-B-32 --pretrained laion2b_s34b_b79k" in done.stderr
    assert "--model emoji-mini" in done.stderr


def test_a_pretrained_checkpoint_path_that_does_not_exist_is_named_as_a_missing_file(tmp_path):
    done = _cli("models", "export", "clipsearch-tiny", "--pretrained", "/nonexistent/ckpt.pt", "--out",
                str(tmp_path / "b"))
    assert done.returncode == 1 and "--pretrained /nonexistent/ckpt.pt: no such checkpoint file" in done.stderr
    assert "no pretrained tag" not in done.stderr and "Traceback" not in done.stderr


def test_a_checkpoint_file_that_is_not_one_is_one_line_not_a_traceback(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("garbage\n")
    done = _cli("models", "export", "clipsearch-tiny", "--pretrained", str(garbage), "--out", str(tmp_path / "b"))
    assert done.returncode == 1 and f"--pretrained {garbage}: not a readable checkpoint" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "b").exists()


@pytest.mark.parametrize("spec, says", [
    ("{tmp}/nowhere/bundle", "no such folder, so no model bundle there"),
    ("./nowhere-dir", "no such folder, so no model bundle there"),
    ("{tmp}", "not a model bundle (missing model.json"),
])
def test_a_model_path_that_holds_no_bundle_says_so_not_unknown_architecture(tmp_path, spec, says):
    from clipsearch.errors import ModelNotAvailable
    from clipsearch.model.resolve import resolve_model

    with pytest.raises(ModelNotAvailable) as raised:
        resolve_model(spec.format(tmp=tmp_path), export_missing=False)
    assert says in raised.value.message and "architecture" not in raised.value.message


def test_a_bundle_copied_without_the_sibling_it_shares_files_with_says_so(tmp_path):
    import shutil

    from clipsearch.model.resolve import resolve_model

    alone = tmp_path / "emoji-mini-int8"
    shutil.copytree(resolve_model("emoji-mini-int8", export_missing=False).path, alone)
    done = _cli("embed", "-m", str(alone), "--text", "red heart")
    assert done.returncode == 1 and "with the bundle beside it, ../emoji-mini, which is not there" in done.stderr
    assert "Copy emoji-mini next to it" in done.stderr
    shutil.copytree(resolve_model("emoji-mini", export_missing=False).path, tmp_path / "emoji-mini")
    assert _cli("embed", "-m", str(alone), "--text", "red heart").returncode == 0


def test_unknown_model_name_lists_the_fix(isolated_home):
    done = _cli("embed", "--model", "no-such-model", "--text", "a dog")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "no model 'no-such-model'" in done.stderr


def test_cli_embed_json_matches_library(tiny_bundle):
    done = _cli("embed", "--model", str(tiny_bundle), "--text", "a red heart", "--text", "a cat", "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.strip().splitlines()]
    expected = ClipModel(tiny_bundle).encode_text(["a red heart", "a cat"])
    assert np.allclose(np.array(rows), expected, atol=1e-5)


def test_cli_embed_refuses_a_text_of_no_known_word_as_search_does():
    done = _cli("embed", "--model", "emoji-mini", "--text", "❤️")
    assert done.returncode == 1 and "knows none of the words" in done.stderr and "Traceback" not in done.stderr
    assert _cli("embed", "--model", "emoji-mini", "--text", "red heart").returncode == 0


def test_cli_models_export_info_and_cache_lookup(isolated_home, tmp_path):
    out = isolated_home / "models" / "my-tiny"
    done = _cli("models", "export", "clipsearch-tiny", "--random-init", "--out", str(out))
    assert done.returncode == 0, done.stderr
    info = json.loads(_cli("models", "info", "my-tiny", "--verify").stdout)
    assert info["verified"] is True and info["embed_dim"] == 64 and info["precision"] == "int8"  # the default
    assert set(info["files"]) == {"visual.onnx", "textual.onnx", "tokenizer.json", "preprocess.json",
                                  "visual.onnx.data", "textual.onnx.data"}  # weights as memory-mapped external data
    listed = json.loads(_cli("models", "list", "--json").stdout)
    assert any(row["name"] == "my-tiny" and row["origin"] == "cache" for row in listed)
    bad = _cli("models", "export", "clipsearch-tiny", "--out", str(tmp_path / "x"))
    assert bad.returncode != 0 and "--random-init" in bad.stderr


def test_damaged_bundles_give_one_line_errors_and_are_listed_as_damaged(isolated_home, tiny_bundle):
    import shutil

    models = isolated_home / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_bundle, models / "good")

    def damaged(name: str, edit) -> Path:
        folder = models / name
        shutil.copytree(tiny_bundle, folder)
        edit(folder)
        return folder

    meta = json.loads((tiny_bundle / "model.json").read_text())
    cases = {
        damaged("empty-tokenizer", lambda f: (f / "tokenizer.json").write_text("{}")): "tokenizer.json does not match",
        damaged("unrecorded-tokenizer", lambda f: ((f / "tokenizer.json").write_text("{}"), (f / "model.json").write_text(
            json.dumps({**meta, "files": {k: v for k, v in meta["files"].items() if k != "tokenizer.json"}})))):
            "cannot be read as a tokenizer",
        damaged("list-json", lambda f: (f / "model.json").write_text("[1, 2]")): "model.json is malformed",
        damaged("no-context", lambda f: (f / "model.json").write_text(json.dumps({**meta, "context_length": 0}))):
            "context_length at least 2",
    }
    for folder, message in cases.items():
        done = _cli("embed", "--model", str(folder), "--text", "a dog")
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    listed = _cli("models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["good"]["embed_dim"] == meta["embed_dim"] and "error" not in rows["good"]
    assert "model.json is malformed" in rows["list-json"]["error"] and rows["no-context"]["error"]
    plain = _cli("models", "list")
    assert plain.returncode == 0 and "DAMAGED" in plain.stdout and "good" in plain.stdout
    unverifiable = damaged("no-checksums", lambda f: (f / "model.json").write_text(
        json.dumps({k: v for k, v in meta.items() if k != "files"})))
    verified = _cli("models", "info", str(unverifiable), "--verify")
    assert verified.returncode == 1
    answer = json.loads(verified.stdout)
    assert answer["verified"] is False and answer["problems"] == ["model.json records no checksums: nothing could be verified"]


def test_extreme_aspect_ratio_is_resized_without_blowing_up_memory():
    from clipsearch.model.bundle import PreprocessSpec
    from clipsearch.model.preprocess import image_to_pixels

    spec = PreprocessSpec(size=(224, 224))
    strip = Image.new("RGB", (1, 100_000), (200, 30, 30))  # resize-then-crop would allocate 224 x 22.4M px
    pixels = image_to_pixels(strip, spec)
    assert pixels.shape == (3, 224, 224)
    expected_red = (200 / 255 - spec.mean[0]) / spec.std[0]
    assert np.allclose(pixels[0], expected_red, atol=1e-4)


HEIC_BYTES_SCRIPT = """
import io, sys
from clipsearch.model.preprocess import open_image
data = open(sys.argv[1], "rb").read()
image = open_image(data)  # bytes, no file name: recognised by its ftyp box
print(image.size, "pillow_heif" in sys.modules)
"""


def test_heic_bytes_decode_without_a_file_name(tmp_path):
    import pillow_heif

    pillow_heif.register_heif_opener()
    path = tmp_path / "phone.heic"
    Image.new("RGB", (40, 30), (10, 200, 10)).save(path)
    done = subprocess.run([sys.executable, "-c", HEIC_BYTES_SCRIPT, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(40, 30) True"
    plain = subprocess.run([sys.executable, "-c", "import sys, io\nfrom PIL import Image\nfrom clipsearch.model.preprocess import open_image\n"
                            "b = io.BytesIO(); Image.new('RGB', (8, 8)).save(b, 'PNG'); open_image(b.getvalue())\n"
                            "print('pillow_heif' in sys.modules)"], capture_output=True, text=True)
    assert plain.stdout.strip() == "False"  # a PNG query never pays for the HEIF import


def _bundle_like(folder: Path, label: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps({"label": label}))


def test_a_model_json_whose_embed_dim_is_not_the_graphs_is_refused(tiny_bundle, tmp_path):
    import shutil

    from clipsearch.errors import BundleError

    edited = tmp_path / "edited"
    shutil.copytree(tiny_bundle, edited)
    meta = json.loads((edited / "model.json").read_text())
    meta["embed_dim"] = meta["embed_dim"] * 2
    (edited / "model.json").write_text(json.dumps(meta))
    model = ClipModel(edited, threads=1)
    with pytest.raises(BundleError, match=rf"textual.onnx outputs vectors of shape \[{meta['embed_dim'] // 2}\], its "
                                          rf"model.json says embed_dim {meta['embed_dim']}"):
        model.encode_text(["a dog"])
    with pytest.raises(BundleError, match="visual.onnx outputs vectors of shape"):
        model.encode_images([Image.new("RGB", (32, 32))])


def test_a_bundle_never_replaces_a_folder_that_is_not_one(tmp_path, monkeypatch):
    """`--out` names where a bundle goes; an existing folder of other files would be deleted whole by the swap,
    so it is refused (by the CLI before any export or training work, and by the swap itself), as is `--out .`."""
    import clipsearch.model.bundle as bundle
    from clipsearch.errors import BundleError

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(BundleError, match="not a model bundle: writing a bundle there would delete") as refused:
        with bundle.staged_folder(precious) as staging:
            _bundle_like(staging, "v1")
    assert "new or empty folder" in refused.value.hint
    assert (precious / "thesis.txt").read_text() == "years of work" and sorted(os.listdir(tmp_path)) == ["precious"]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(BundleError, match="exists and is not a folder"):
        bundle.check_bundle_target(tmp_path / "a-file")
    monkeypatch.chdir(precious)
    for here in (".", str(precious), str(tmp_path)):
        with pytest.raises(BundleError, match="cannot replace the current folder"):
            bundle.check_bundle_target(here)
    for allowed in (tmp_path / "new", tmp_path / "empty"):  # new, empty, or a bundle: written
        (tmp_path / "empty").mkdir(exist_ok=True)
        with bundle.staged_folder(allowed) as staging:
            _bundle_like(staging, "v1")
        with bundle.staged_folder(allowed) as staging:
            _bundle_like(staging, "v2")
        assert json.loads((allowed / "model.json").read_text()) == {"label": "v2"}
    cli = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
    for command in (["models", "export", "ViT-B-32", "--random-init", "--out", str(precious)],
                    ["train", "--pairs", "pairs.csv", "--out", str(tmp_path / "new"), "--precision", "fp32",
                     "--precision", "int8"]):
        (tmp_path / "new-int8").mkdir(exist_ok=True)
        (tmp_path / "new-int8" / "notes.txt").write_text("mine")
        done = subprocess.run([*cli, *command], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 1 and "not a model bundle" in done.stderr and "Traceback" not in done.stderr
    assert (precious / "thesis.txt").read_text() == "years of work"
    assert (tmp_path / "new-int8" / "notes.txt").read_text() == "mine"


def test_staged_folder_swap_never_leaves_no_bundle(tmp_path, monkeypatch):
    import clipsearch.model.bundle as bundle

    out = tmp_path / "models" / "b"
    with bundle.staged_folder(out) as staging:
        _bundle_like(staging, "v1")
    assert json.loads((out / "model.json").read_text()) == {"label": "v1"}
    mask = os.umask(0)
    os.umask(mask)  # a bundle gets the modes of folders and files made by hand (its staging folder was 0700)
    assert (out.stat().st_mode & 0o777, (out / "model.json").stat().st_mode & 0o777) == (0o777 & ~mask, 0o666 & ~mask)

    # 1. A failure between "old aside" and "new in": the old bundle is put straight back.
    real_rename = bundle._rename
    calls = []

    def failing_second_rename(source, target):
        calls.append((source, target))
        if len(calls) == 2:
            raise OSError("simulated failure between the two renames")
        real_rename(source, target)

    monkeypatch.setattr(bundle, "_rename", failing_second_rename)
    with pytest.raises(OSError, match="simulated"):
        with bundle.staged_folder(out) as staging:
            _bundle_like(staging, "v2")
    monkeypatch.setattr(bundle, "_rename", real_rename)
    assert json.loads((out / "model.json").read_text()) == {"label": "v1"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["b"]

    # 2. A crash (the process dies) between the renames: the next call, or resolving the model, recovers it.
    script = f"""
import os, json, pathlib
import clipsearch.model.bundle as bundle
real = bundle._rename
def crash_after_first(source, target):
    real(source, target)
    os._exit(9)
bundle._rename = crash_after_first
with bundle.staged_folder(pathlib.Path({str(out)!r})) as staging:
    (staging / "model.json").write_text(json.dumps({{"label": "v3"}}))
"""
    crashed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert crashed.returncode == 9
    assert not out.exists() and (out.parent / ".b.old" / "model.json").is_file()
    bundle.recover_staged(out)
    assert json.loads((out / "model.json").read_text()) == {"label": "v1"}

    # 3. A crash after the new bundle moved in but before the old one was deleted: the leftover goes.
    (out.parent / ".b.old").mkdir()
    with bundle.staged_folder(out) as staging:
        _bundle_like(staging, "v4")
    assert json.loads((out / "model.json").read_text()) == {"label": "v4"}
    assert [p.name for p in out.parent.iterdir() if not p.name.startswith(".b.") or p.name == ".b.old"] == ["b"]


def test_model_resolution_recovers_a_bundle_left_aside_by_a_crash(tiny_bundle, isolated_home):
    import shutil

    from clipsearch.model.resolve import resolve_model
    from clipsearch.paths import model_cache_dir

    cached = model_cache_dir() / "tiny-cached"
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_bundle, cached.parent / ".tiny-cached.old")  # the state a crash mid-swap leaves
    assert resolve_model("tiny-cached").path == cached and (cached / "model.json").is_file()


def test_a_graph_that_outputs_zero_vectors_is_refused_not_stored(tiny_bundle, tmp_path, monkeypatch):
    """Damaged weights that pass the checksum cache (edited in place, mtime put back) made the visual graph output
    zeros, and 300 zero vectors were indexed: every search then scored 0. Not unit length means damaged."""
    from clipsearch.errors import BundleError
    from clipsearch.indexer.pipeline import IndexOptions
    from clipsearch.indexer.runner import index_paths
    from clipsearch.model.runtime import OnnxSession
    from clipsearch.store.collection import Collection
    from photo_fixtures import make_photos

    model = ClipModel(tiny_bundle, threads=1)
    real_run = OnnxSession.run

    def zeros(self, inputs, output=None):
        out = real_run(self, inputs, output)
        return np.zeros_like(out) if self.path.name == "visual.onnx" else out

    monkeypatch.setattr(OnnxSession, "run", zeros)
    with pytest.raises(BundleError, match="not unit length"):
        model.encode_images([Image.new("RGB", (64, 64), "red")])
    photos = make_photos(tmp_path / "photos", 3)
    with Collection.create("c", tmp_path / "idx") as collection:
        with pytest.raises(BundleError, match="damaged"):
            index_paths(collection, model, [str(photos[0].parent)], IndexOptions(workers=0))
    from clipsearch.store.collection import list_collections

    assert "c" not in list_collections(tmp_path / "idx")  # a first run that stored nothing leaves no collection
    monkeypatch.setattr(OnnxSession, "run", real_run)
    vectors = model.encode_images([Image.new("RGB", (64, 64), "red")])
    assert abs(float(np.linalg.norm(vectors[0])) - 1.0) < 1e-3  # a healthy graph passes


def test_embed_refuses_an_empty_text_as_search_does(tiny_bundle):
    done = _cli("embed", "-m", str(tiny_bundle), "--text", "a dog", "--text", "   ")
    assert done.returncode == 2 and "empty text" in done.stderr and done.stdout == ""
    assert _cli("embed", "-m", str(tiny_bundle), "--text", "a dog").returncode == 0


def test_one_image_whose_vector_is_unusable_is_left_out_not_the_run(tiny_bundle, tmp_path, monkeypatch):
    """Damaged weights give unusable vectors for every image (the run is refused, above); one odd image's NaN must
    not stop a run that can never finish otherwise: that file is skipped with the reason, the rest are indexed."""
    from clipsearch.indexer.pipeline import UNUSABLE_VECTOR, IndexOptions
    from clipsearch.indexer.runner import index_paths
    from clipsearch.model.runtime import OnnxSession
    from clipsearch.store.collection import Collection
    from photo_fixtures import make_photos

    model = ClipModel(tiny_bundle, threads=1)
    real_run = OnnxSession.run

    def one_nan(self, inputs, output=None):
        out = real_run(self, inputs, output)
        if self.path.name == "visual.onnx" and len(out) > 1:
            out = out.copy()
            out[1] = np.nan
        return out

    monkeypatch.setattr(OnnxSession, "run", one_nan)
    photos = make_photos(tmp_path / "photos", 4)
    with Collection.create("c", tmp_path / "idx") as collection:
        summary = index_paths(collection, model, [str(photos[0].parent)], IndexOptions(workers=0, batch_size=4))
        assert (summary.added, len(summary.skipped), summary.total) == (3, 1, 3)
        assert summary.skipped[0].reason == UNUSABLE_VECTOR
        assert collection.check().ok
    from clipsearch.errors import BundleError

    with pytest.raises(BundleError, match="not unit length"):  # a query of one image is refused, never ranked
        model.encode_pixels(np.full((1, 3, 64, 64), np.nan, np.float32))
