"""`hf:` models without network: a tiny exported model laid out in the Hugging Face Hub's cache, both as a
clipsearch bundle and as an Immich CLIP export, loaded with HF_HUB_OFFLINE=1; embeddings equal the source's."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.errors import BundleError, ModelNotAvailable
from clipsearch.model.hub import parse_hub_spec
from clipsearch.model.resolve import resolve_model
from clipsearch.model.runtime import ClipModel

from photo_fixtures import block_image, make_photos

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEXTS = ["a dog", "  A photo\tof   a CAT!  ", "C'est l'été &amp; “quotes”", " ".join(["mountain"] * 120), ""]
CONFIG = Path(__file__).resolve().parent / "model_configs" / "clipsearch-tiny.json"


def put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str = COMMIT,
                     ref: str = "main") -> Path:
    """Lay files out as huggingface_hub's cache does: blobs/<hash>, snapshots/<commit>/<path> -> blob, refs/<ref>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    for path, content in files.items():
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _bundle_files(bundle: Path) -> dict[str, Path]:
    return {p.name: p for p in bundle.iterdir() if p.is_file()}


@pytest.fixture(scope="session")
def immich_repo(tmp_path_factory, tiny_bundle, tiny_torch_model) -> Path:
    """The tiny model exported as Immich's exporter does: towers traced with batch 1, "image"/"text" (int32,
    fixed context length) inputs, normalised "embedding" outputs, HF tokenizer files, open_clip configs."""
    import torch
    from tokenizers import Tokenizer, processors

    root = tmp_path_factory.mktemp("immich") / "repo"
    (root / "visual").mkdir(parents=True)
    (root / "textual").mkdir()
    model = tiny_torch_model

    class Image_(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = model

        def forward(self, image):
            return self.clip.encode_image(image, normalize=True)

    class Text(Image_):
        def forward(self, text):
            return self.clip.encode_text(text, normalize=True)

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # as Immich's exporter does
    with torch.no_grad():
        torch.onnx.export(Image_(), (torch.randn(1, 3, 64, 64),), str(root / "visual" / "model.onnx"),
                          input_names=["image"], output_names=["embedding"], opset_version=17, dynamo=False)
        torch.onnx.export(Text(), (torch.ones(1, 77, dtype=torch.int32),), str(root / "textual" / "model.onnx"),
                          input_names=["text"], output_names=["embedding"], opset_version=17, dynamo=False)
    torch.backends.mha.set_fastpath_enabled(fastpath)
    tokenizer = Tokenizer.from_file(str(tiny_bundle / "tokenizer.json"))
    bos, eos = "<start_of_text>", "<end_of_text>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))])
    tokenizer.save(str(root / "textual" / "tokenizer.json"))
    (root / "textual" / "tokenizer_config.json").write_text(json.dumps({"pad_token": eos, "model_max_length": 77}))
    (root / "config.json").write_text(CONFIG.read_text())
    preprocess = json.loads((tiny_bundle / "preprocess.json").read_text())
    preprocess.pop("fill_color", None)
    (root / "visual" / "preprocess_cfg.json").write_text(json.dumps({**preprocess, "mode": "RGB", "fill_color": 0}))
    (root / "README.md").write_text("---\nlicense: mit\ntags:\n - immich\n - clip\n---\n# tiny\n")
    return root


def _repo_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def _images() -> list[Image.Image]:
    return [block_image(seed, size) for seed, size in ((1, (160, 120)), (2, (90, 200)), (3, (64, 64)))]


def test_spec_parsing():
    ref = parse_hub_spec("hf:immich-app/ViT-B-32__openai@v1.2")
    assert (ref.repo_id, ref.subfolder, ref.revision) == ("immich-app/ViT-B-32__openai", "", "v1.2")
    assert ref.cache_name == "hf--immich-app--ViT-B-32__openai@v1.2"
    assert parse_hub_spec("hf:org/repo/bundles/fp32").subfolder == "bundles/fp32"
    for bad in ("hf:justone", "hf:org/../x", "hf:org/repo@", "hf:org/re po"):
        with pytest.raises(ModelNotAvailable):
            parse_hub_spec(bad)


def test_published_bundle_from_hub_cache_equals_source(hub_cache, tiny_bundle):
    put_in_hub_cache(hub_cache, "test-org/tiny-bundle", {**_bundle_files(tiny_bundle), "README.md": b"---\nlicense: apache-2.0\n---\n"})
    info = resolve_model("hf:test-org/tiny-bundle")
    assert info.path.name == "hf--test-org--tiny-bundle"
    assert info.extra["hub"]["commit"] == COMMIT and info.extra["hub"]["layout"] == "bundle"
    assert info.extra["license"] == "apache-2.0"
    source, pulled = ClipModel(tiny_bundle), ClipModel(info)
    assert pulled.model_id == source.model_id  # same vector space: collections built from the folder still match
    assert np.array_equal(pulled.encode_text(TEXTS), source.encode_text(TEXTS))
    assert np.array_equal(pulled.encode_images(_images()), source.encode_images(_images()))


def test_bundle_in_a_subfolder_is_found_and_a_revision_selects_the_commit(hub_cache, tiny_bundle):
    files = {f"bundles/tiny/{name}": path for name, path in _bundle_files(tiny_bundle).items()}
    put_in_hub_cache(hub_cache, "test-org/several", files)
    info = resolve_model(f"hf:test-org/several@{COMMIT}")
    assert info.extra["hub"]["subfolder"] == "bundles/tiny"
    assert np.array_equal(ClipModel(info).encode_text(["a cat"]), ClipModel(tiny_bundle).encode_text(["a cat"]))


def test_tampered_published_bundle_is_refused(hub_cache, tiny_bundle):
    files = dict(_bundle_files(tiny_bundle))
    files["preprocess.json"] = (tiny_bundle / "preprocess.json").read_bytes().replace(b"bicubic", b"bilinear")
    put_in_hub_cache(hub_cache, "test-org/tampered", files)
    with pytest.raises(BundleError, match="do not match its model.json"):
        resolve_model("hf:test-org/tampered")


def test_immich_layout_converts_to_a_bundle_with_equal_embeddings(hub_cache, tiny_bundle, immich_repo):
    from clipsearch.model.bundle import read_bundle
    from clipsearch.model.hub import pull

    put_in_hub_cache(hub_cache, "immich-app/tiny__test", _repo_files(immich_repo))
    info = read_bundle(pull("hf:immich-app/tiny__test", precision="fp32"))
    assert info.precision == "fp32" and info.extra["hub"]["precision"] == "fp32"
    assert info.source["kind"] == "immich" and info.extra["license"] == "mit"
    assert info.extra["hub"]["commit"] == COMMIT and "visual/model.onnx" in info.extra["hub"]["files"]
    assert info.text.pad_to == "context" and info.context_length == 77
    source, pulled = ClipModel(tiny_bundle), ClipModel(info)
    texts = pulled.encode_text(TEXTS)  # a batch: the batch-1 graph runs once per row
    assert texts.shape == (len(TEXTS), 64)
    expected = source.encode_text(TEXTS)
    plain = [i for i, t in enumerate(TEXTS) if "&" not in t]  # see below for the one that differs
    assert np.allclose(texts[plain], expected[plain], atol=1e-5)
    # Immich cleans whitespace only; open_clip's ftfy + HTML unescaping ("&amp;" -> "&", curly quotes) is not
    # part of Immich's contract, so that query's ids follow Immich, not the open_clip bundle.
    odd = TEXTS.index("C'est l'été &amp; “quotes”")
    assert pulled.tokenizer.token_ids([TEXTS[odd]]) != source.tokenizer.token_ids([TEXTS[odd]])
    assert np.allclose(pulled.encode_images(_images()), source.encode_images(_images()), atol=1e-5)
    assert np.allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)


def test_immich_pull_is_int8_by_default_and_close_to_the_original(hub_cache, tiny_bundle, immich_repo):
    import onnx

    from clipsearch.model.hub import pull

    put_in_hub_cache(hub_cache, "immich-app/tiny__test", _repo_files(immich_repo))
    info = resolve_model("hf:immich-app/tiny__test")  # what --model hf:… pulls: int8, as models export writes
    assert info.precision == "int8" and info.extra["hub"]["precision"] == "int8"
    choice = info.extra["text_int8"]
    assert choice["recipe"] in ("dynamic", "weights") and choice["mean_cosine_to_fp32"][choice["recipe"]] > 0.99
    visual_ops = {n.op_type for n in onnx.load(str(info.path / "visual.onnx")).graph.node for a in n.attribute
                  if a.HasField("g") for n in a.g.node}  # the quantised batch-1 graph inside the Scan
    assert "DynamicQuantizeLinear" in visual_ops
    source, pulled = ClipModel(tiny_bundle), ClipModel(info)
    plain = [t for t in TEXTS if "&" not in t]
    assert ((pulled.encode_text(plain) * source.encode_text(plain)).sum(axis=1) > 0.98).all()
    assert ((pulled.encode_images(_images()) * source.encode_images(_images())).sum(axis=1) > 0.98).all()
    # the same commit at another precision is converted again; at the same one it is kept
    before = (info.path / "visual.onnx").stat().st_mtime_ns
    assert pull("hf:immich-app/tiny__test") == info.path and (info.path / "visual.onnx").stat().st_mtime_ns == before
    fp32 = ClipModel(pull("hf:immich-app/tiny__test", precision="fp32"))
    assert fp32.info.precision == "fp32"
    assert np.allclose(fp32.encode_images(_images()), source.encode_images(_images()), atol=1e-5)


def test_immich_tokenizer_that_cannot_be_reproduced_is_refused(hub_cache, immich_repo, tmp_path):
    from tokenizers import Tokenizer, processors

    files = _repo_files(immich_repo)
    tokenizer = Tokenizer.from_file(str(immich_repo / "textual" / "tokenizer.json"))
    bos = "<start_of_text>"  # a start token only: truncation keeps no end token, which a bundle cannot express
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    files["textual/tokenizer.json"] = tmp_path / "tokenizer.json"
    put_in_hub_cache(hub_cache, "immich-app/odd__tokenizer", files)
    with pytest.raises(BundleError, match="cannot reproduce Immich's token ids") as caught:
        resolve_model("hf:immich-app/odd__tokenizer")
    assert caught.value.hint


def test_offline_miss_names_the_model_and_the_fix(hub_cache):
    with pytest.raises(ModelNotAvailable) as caught:
        resolve_model("hf:nobody/not-cached")
    text = str(caught.value)
    assert "hf:nobody/not-cached" in text and "clipsearch models pull hf:nobody/not-cached" in text
    assert "--model emoji-mini" in text


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipsearch", *args], capture_output=True, text=True, env=dict(os.environ))


def test_offline_miss_on_the_command_line_is_one_message(hub_cache):
    done = _cli("embed", "--model", "hf:nobody/not-cached", "--text", "a dog")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "hf:nobody/not-cached is not cached" in done.stderr and "models pull" in done.stderr


def test_pull_info_list_index_and_search_end_to_end(hub_cache, immich_repo, tmp_path):
    put_in_hub_cache(hub_cache, "immich-app/tiny__test", _repo_files(immich_repo))
    spec = "hf:immich-app/tiny__test"
    pulled = _cli("models", "pull", spec)
    assert pulled.returncode == 0, pulled.stderr
    assert "licence: mit" in pulled.stdout
    info = json.loads(_cli("models", "info", spec, "--verify").stdout)
    assert info["verified"] is True and info["license"] == "mit"
    assert info["provenance"]["repo"] == "immich-app/tiny__test" and info["provenance"]["commit"] == COMMIT
    listed = {row["name"]: row for row in json.loads(_cli("models", "list", "--json").stdout)}
    assert listed["hf--immich-app--tiny__test"]["photos"] is True and listed["emoji-mini"]["photos"] is False
    photos = make_photos(tmp_path / "photos", 4)
    indexed = _cli("index", str(tmp_path / "photos"), "--model", spec)
    assert indexed.returncode == 0, indexed.stderr
    assert "note: using the bundled model" not in indexed.stderr
    found = _cli("search", "a photo", "--model", spec, "--json")
    assert found.returncode == 0, found.stderr
    results = json.loads(found.stdout)
    assert len(results) == 4 and {Path(r["path"]).name for r in results} == {p.name for p in photos}


def test_index_with_the_default_emoji_model_says_so_once(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPSEARCH_MODEL", raising=False)
    make_photos(tmp_path / "photos", 2)
    done = _cli("index", str(tmp_path / "photos"))
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith("note: using the bundled model")]
    assert len(notes) == 1 and "--model hf:immich-app/ViT-B-32__openai" in notes[0]
    again = _cli("index", str(tmp_path / "photos"))  # the collection now remembers its model
    assert "note: using the bundled model" not in again.stderr


NO_TORCH_PULL = """
import json, sys
from clipsearch.model.hub import pull
from clipsearch.model.runtime import ClipModel
folder = pull(sys.argv[1])
vectors = ClipModel(folder).encode_text(["a dog", "a cat"])
print(json.dumps({"torch": "torch" in sys.modules, "onnx_loaded": "onnx" in sys.modules, "shape": list(vectors.shape),
                  "sizes": {p.name: p.stat().st_size for p in folder.iterdir()}}))
"""


def test_pull_and_conversion_never_import_torch(hub_cache, immich_repo):
    put_in_hub_cache(hub_cache, "immich-app/tiny__test", _repo_files(immich_repo))
    done = subprocess.run([sys.executable, "-c", NO_TORCH_PULL, "hf:immich-app/tiny__test"], capture_output=True,
                          text=True, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torch"] is False and report["shape"] == [2, 64]
    sizes = report["sizes"]
    assert sizes["visual.onnx.data"] > 50_000 and sizes["visual.onnx"] < 100_000  # weights memory-mapped beside
