"""Near-duplicates (`clipsearch duplicates`, GET /api/duplicates, the /duplicates page) with the bundled models.

The measured collection: the 300 Noto images of sample_data/ (distinct; never used to choose the threshold, which
was calibrated on the training styles' validation split) plus four altered copies of every third one (JPEG on
white, half size, 5% crop, +10% brightness; `clipsearch.train.duplicate_threshold.altered_copy`). Pairwise
precision and recall of the groups against the true families are asserted against floors a little below what
was measured (MODEL_CARD.md, "Near-duplicate threshold")."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipsearch.duplicates import (DuplicateReport, check_threshold, choose_threshold, connected_groups,
                                   find_duplicates, keeper_order, neighbour_pairs)
from clipsearch.errors import BundleError, QueryError
from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.runner import index_paths
from clipsearch.model.bundle import DuplicateSpec
from clipsearch.model.resolve import load_model, resolve_model
from clipsearch.search import Searcher
from clipsearch.store.collection import Collection
from clipsearch.store.database import ImageRecord
from clipsearch.train.duplicate_threshold import ALTERATIONS, altered_copy, pair_score
from clipsearch.web import ServerSettings, create_app

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
CLI = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
EVERY = 3  # every third sample image gets altered copies

# Measured on this collection (100 sources x 4 copies among 300 distinct images), see MODEL_CARD.md:
#   emoji-mini      threshold 0.91    precision 0.909, recall 0.988 (1,087 pairs grouped, 1,000 true pairs)
#   emoji-mini-int8 threshold 0.9125  precision 0.940, recall 0.988 (1,051 pairs grouped)
FLOORS = {"emoji-mini": {"precision": 0.88, "recall": 0.96}, "emoji-mini-int8": {"precision": 0.91, "recall": 0.96}}


@dataclass(frozen=True)
class DuplicateFolder:
    index_dir: Path
    name: str
    root: Path
    family: dict[str, str]  # path -> the source image's path (sources map to themselves)
    ids: dict[str, int]

    def family_by_id(self) -> dict[int, str]:
        return {self.ids[path]: source for path, source in self.family.items()}


def make_folder(root: Path, every: int = EVERY, limit: int | None = None) -> dict[str, str]:
    """sample_data's PNGs in root/ and altered copies of every `every`-th one in root/copies/."""
    (root / "copies").mkdir(parents=True, exist_ok=True)
    family: dict[str, str] = {}
    for number, source in enumerate(sorted(SAMPLE.glob("*.png"))[:limit]):
        target = root / source.name
        target.write_bytes(source.read_bytes())
        family[str(target)] = str(target)
        if number % every:
            continue
        with Image.open(source) as image:
            image.load()
            for how in ALTERATIONS:
                data, suffix = altered_copy(image, how)
                copy = root / "copies" / f"{source.stem}--{how}{suffix}"
                copy.write_bytes(data)
                family[str(copy)] = str(target)
    return family


def index_folder(root: Path, index_dir: Path, name: str, model: str) -> dict[str, int]:
    with Collection.create(name, index_dir) as collection:
        index_paths(collection, load_model(model, threads=2), [str(root)],
                    IndexOptions(batch_size=64, workers=0, tokens=False))
        return {path: state.id for path, state in collection.store.file_states().items()}


@pytest.fixture(scope="module", params=["emoji-mini", "emoji-mini-int8"])
def folder(request, tmp_path_factory) -> DuplicateFolder:
    root = tmp_path_factory.mktemp("dups")
    family = make_folder(root / "images")
    ids = index_folder(root / "images", root / "collections", "dups", request.param)
    return DuplicateFolder(root / "collections", "dups", root / "images", family, ids)


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory) -> Path:
    """The index folder of the `small` and `distinct` collections (one server serves both)."""
    return tmp_path_factory.mktemp("shared") / "collections"


@pytest.fixture(scope="module")
def distinct(tmp_path_factory, shared_dir) -> DuplicateFolder:
    """Twelve distinct sample images, no copies."""
    images = tmp_path_factory.mktemp("distinct") / "images"
    images.mkdir()
    family = {}
    for source in sorted(SAMPLE.glob("*.png"))[::25]:
        (images / source.name).write_bytes(source.read_bytes())
        family[str(images / source.name)] = str(images / source.name)
    ids = index_folder(images, shared_dir, "distinct", "emoji-mini")
    return DuplicateFolder(shared_dir, "distinct", images, family, ids)


def report_of(folder: DuplicateFolder, threshold: float | None = None) -> DuplicateReport:
    with Searcher.open(folder.name, folder.index_dir) as searcher:
        return find_duplicates(searcher, threshold)


def model_of(folder: DuplicateFolder) -> str:
    with Collection.open(folder.name, folder.index_dir) as collection:
        return collection.require_model().name


# -- quality on held-out images ------------------------------------------------------------------
def test_copies_are_grouped_with_their_source_and_distinct_images_are_not(folder):
    report = report_of(folder)
    model = model_of(folder)
    assert report.threshold.source == "model"
    assert report.threshold.value == resolve_model(model, export_missing=False).duplicates.threshold
    assert report.images == len(folder.family) == 300 + 4 * 100
    score = pair_score([[i.id for i in g.images] for g in report.groups], folder.family_by_id(),
                       report.threshold.value)
    print(f"{model}: threshold {report.threshold.value}: precision {score.precision:.3f}, recall {score.recall:.3f}, "
          f"{score.groups} groups, {score.grouped_pairs} grouped pairs, {score.true_pairs} true pairs")
    assert score.precision >= FLOORS[model]["precision"], score
    assert score.recall >= FLOORS[model]["recall"], score
    # Every group's keeper has the most pixels: never the half-size copy.
    for group in report.groups:
        assert group.keep.pixels == max(i.pixels for i in group.images)
        assert "--half" not in group.keep.path


def test_a_higher_threshold_splits_groups_and_is_reported_as_given(folder):
    default = report_of(folder)
    strict = report_of(folder, 0.995)
    assert strict.threshold.source == "given" and strict.threshold.value == 0.995
    assert strict.redundant < default.redundant
    grouped = {i.id: g for g, group in enumerate(default.groups) for i in group.images}
    for group in strict.groups:  # a stricter threshold only splits groups, never joins new images
        assert len({grouped.get(i.id) for i in group.images}) == 1
        assert len(group.images) >= 2 and group.images[0].similarity == 1.0


# -- CLI -----------------------------------------------------------------------------------------
def cli(*args: str, index_dir: Path | None = None) -> subprocess.CompletedProcess:
    extra = ["--index-dir", str(index_dir)] if index_dir is not None else []
    return subprocess.run([*CLI, "duplicates", *args, *extra], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CLIPSEARCH_OFFLINE": "1"})


@pytest.fixture(scope="module")
def small(tmp_path_factory, shared_dir) -> DuplicateFolder:
    """The first 30 sample images with copies of every tenth (3 groups of 5), emoji-mini."""
    root = tmp_path_factory.mktemp("small")
    family = make_folder(root / "images", every=10, limit=30)
    ids = index_folder(root / "images", shared_dir, "small", "emoji-mini")
    return DuplicateFolder(shared_dir, "small", root / "images", family, ids)


def test_cli_prints_groups_with_sizes_dimensions_and_paths(small):
    result = cli("--collection", small.name, index_dir=small.index_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # 3 sources x 4 copies; the brightened copy of the (light grey) bone fades into the white background: 11 found
    assert re.match(rf"{small.name}: 3 groups of near-duplicates, 1[12] redundant images among 42 \(threshold 0\.91, "
                    r"emoji-mini's own\); keep = ", lines[0]), lines[0]
    assert sum(line.startswith("group ") for line in lines) == 3
    keepers = [line for line in lines if line.startswith("  keep ")]
    assert len(keepers) == 3
    for source in {s for p, s in small.family.items() if p != s}:
        keeper = next(line for line in keepers if Path(source).stem in line)
        assert "64×64" in keeper and " bytes " in keeper
    half = next(line for line in lines if "--half.png" in line)
    size = (small.root / "copies" / half.split("/copies/")[1]).stat().st_size
    assert "32×32" in half and f"{size:,} bytes" in half
    # emoji-mini is not made for photographs: a listing that invites deleting files says so (on stderr)
    assert "emoji-mini is not made for photographs" in result.stderr and "--rebuild --model hf:" in result.stderr


def test_cli_json_shape(small):
    result = cli("--collection", small.name, "--json", index_dir=small.index_dir)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert set(body) == {"collection", "model_id", "threshold", "threshold_source", "images", "redundant", "took_ms",
                         "groups"}
    assert body["collection"] == small.name and body["model_id"].startswith("emoji-mini@753152f5ab09")
    assert body["threshold"] == 0.91 and body["threshold_source"] == "model" and body["images"] == 42
    assert len(body["groups"]) == 3 and body["redundant"] in (11, 12)
    truth = small.family_by_id()
    for group in body["groups"]:
        assert set(group) == {"count", "keep", "images"} and group["count"] == len(group["images"]) >= 4
        assert group["images"][0]["id"] == group["keep"] and group["images"][0]["keep"] is True
        assert [i["keep"] for i in group["images"]].count(True) == 1
        assert len({truth[i["id"]] for i in group["images"]}) == 1
        for image in group["images"]:
            assert set(image) == {"id", "path", "bytes", "width", "height", "similarity", "keep"}
            assert image["bytes"] == os.path.getsize(image["path"])
            with Image.open(image["path"]) as opened:
                assert (image["width"], image["height"]) == opened.size
            assert 0.9 <= image["similarity"] <= 1.0
        sims = [i["similarity"] for i in group["images"][1:]]
        assert sims == sorted(sims, reverse=True)


def test_cli_threshold_override(small):
    result = cli("--collection", small.name, "--threshold", "0.9999", "--json", index_dir=small.index_dir)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["threshold"] == 0.9999 and body["threshold_source"] == "given"
    assert body["redundant"] < 11
    text = cli("--collection", small.name, "-t", "0.9999", index_dir=small.index_dir)
    assert "threshold 0.9999, given" in text.stdout.splitlines()[0]


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan", "inf"])
def test_cli_refuses_bad_thresholds(value, small):
    result = cli("--collection", small.name, "--threshold", value, index_dir=small.index_dir)
    assert result.returncode == 1, result.stdout
    assert "threshold must be a cosine similarity above 0 and at most 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_refuses_a_threshold_that_is_not_a_number(small):
    result = cli("--collection", small.name, "--threshold", "high", index_dir=small.index_dir)
    assert result.returncode == 2 and "high" in result.stderr and "Traceback" not in result.stderr


def test_no_duplicates_and_missing_collection(distinct):
    result = cli("--collection", distinct.name, index_dir=distinct.index_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"{distinct.name}: no near-duplicates among {len(distinct.family)} images "
                                     "(threshold 0.91, emoji-mini's own)")
    body = json.loads(cli("--collection", distinct.name, "--json", index_dir=distinct.index_dir).stdout)
    assert body["groups"] == [] and body["redundant"] == 0 and body["images"] == len(distinct.family)
    missing = cli("--collection", "nope", index_dir=distinct.index_dir)
    assert missing.returncode == 1 and "no collection named 'nope'" in missing.stderr


def test_a_collection_of_one_image(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.png").write_bytes((SAMPLE / "red-heart.png").read_bytes())
    index_folder(tmp_path / "one", tmp_path / "c", "one", "emoji-mini")
    report = report_of(DuplicateFolder(tmp_path / "c", "one", tmp_path / "one", {}, {}))
    assert report.images == 1 and report.groups == ()


def test_exact_copies_are_one_group(tmp_path):
    folder = tmp_path / "same"
    folder.mkdir()
    for i in range(20):  # more copies than neighbours searched (16): still one group
        (folder / f"copy-{i:02d}.png").write_bytes((SAMPLE / "red-heart.png").read_bytes())
    (folder / "other.png").write_bytes((SAMPLE / "rocket.png").read_bytes())
    index_folder(folder, tmp_path / "c", "same", "emoji-mini")
    report = report_of(DuplicateFolder(tmp_path / "c", "same", folder, {}, {}))
    assert len(report.groups) == 1 and len(report.groups[0].images) == 20
    assert report.groups[0].keep.path.endswith("copy-00.png")  # equal pixels and bytes: the first indexed


def test_threshold_1_groups_identical_files_and_a_link_is_never_the_keeper(tmp_path):
    # Identical vectors score 0.99999994 in float32: threshold 1 ("identical") found none. A symbolic link and
    # the file it points to are indexed as two paths: deleting the "redundant" file would leave the kept link
    # dangling, so the file is the one to keep.
    folder = tmp_path / "album"
    folder.mkdir()
    (folder / "photo.png").write_bytes((SAMPLE / "red-heart.png").read_bytes())
    (folder / "copy.png").write_bytes((SAMPLE / "red-heart.png").read_bytes())
    (folder / "a-link.png").symlink_to("photo.png")  # indexed first: "a" sorts before "c" and "p"
    (folder / "other.png").write_bytes((SAMPLE / "rocket.png").read_bytes())
    index_folder(folder, tmp_path / "c", "links", "emoji-mini")
    with Searcher(Collection.open("links", tmp_path / "c")) as searcher:
        report = find_duplicates(searcher, threshold=1.0)
    assert len(report.groups) == 1 and len(report.groups[0].images) == 3
    # The link was indexed first (equal pixels and bytes would have made it the keeper): the first file is kept.
    assert report.groups[0].keep.path == str(folder / "copy.png")
    assert str(folder / "a-link.png") in {image.path for image in report.groups[0].images}


# -- threshold choice ----------------------------------------------------------------------------
def test_bundled_models_carry_a_threshold_and_keep_their_ids():
    for name, model_id in (("emoji-mini", "emoji-mini@753152f5ab09"), ("emoji-mini-int8", "emoji-mini-int8@5854eae4b323")):
        info = resolve_model(name, export_missing=False)
        assert info.model_id == model_id
        assert 0.85 < info.duplicates.threshold < 1 and "F1" in info.duplicates.how


def test_a_model_without_a_threshold_is_refused_with_a_hint():
    info = resolve_model("emoji-mini", export_missing=False)
    bare = dataclasses.replace(info, extra={k: v for k, v in info.extra.items() if k != "duplicates"})
    assert bare.duplicates is None and bare.model_id == info.model_id
    with pytest.raises(QueryError) as raised:
        choose_threshold(None, bare)
    assert "has no near-duplicate threshold" in raised.value.message
    assert "--threshold" in raised.value.hint and "duplicate-threshold" in raised.value.hint
    assert choose_threshold(0.97, bare).value == 0.97
    with pytest.raises(QueryError):
        choose_threshold(None, None)


@pytest.mark.parametrize("raw", [{"threshold": 1.5}, {"threshold": "0.9"}, {"threshold": float("nan")}, {"how": "x"},
                                 [0.9], {"threshold": True}])
def test_a_malformed_threshold_in_model_json_is_a_bundle_error(raw):
    with pytest.raises(BundleError):
        DuplicateSpec.from_raw(Path("/x"), raw)


@pytest.mark.parametrize("value", [0, -1, 1.0001, math.nan, math.inf, True, "0.9"])
def test_check_threshold(value):
    with pytest.raises(QueryError):
        check_threshold(value)


# -- grouping pieces -----------------------------------------------------------------------------
def test_keeper_is_most_pixels_then_largest_file_then_first_indexed():
    def record(i: int, w: int, h: int, size: int) -> ImageRecord:
        return ImageRecord(i, f"/p/{i}", size, 0, "", w, h, None, "", "m")

    records = {1: record(1, 32, 32, 9000), 2: record(2, 64, 64, 100), 3: record(3, 64, 64, 200),
               4: record(4, 64, 64, 200)}
    assert keeper_order(records) == [3, 4, 2, 1]


def test_union_find_chains_edges_into_groups():
    assert connected_groups([1, 2, 7, 10], [2, 3, 8, 7]) == [[1, 2, 3], [7, 8, 10]]
    assert connected_groups([], []) == []


@pytest.mark.parametrize("count, ivf_threshold", [(20_000, 50_000), (20_000, 10_000)])
def test_grouping_through_the_collection_index_layouts(count, ivf_threshold):
    """Random vectors with 500 planted near-copies (cosine about 0.99), through a collection's own index layouts
    (flat; IVF-PQ with its refine stage): exactly the planted pairs come out. (100k images with 384 dimensions on
    IVF-PQ: 41 s of k-NN and grouping on the shared 2-core machine, see MODEL_CARD.md.)"""
    from clipsearch.store.index.vectors import VectorIndex

    rng = np.random.default_rng(0)
    dim = 64
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    copies = rng.choice(count, 500, replace=False)
    noisy = vectors[copies] + 0.02 * rng.standard_normal((500, dim)).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    everything = np.concatenate([vectors, noisy])
    ids = np.arange(1, len(everything) + 1, dtype=np.int64)
    index = VectorIndex.build([(ids, everything)], count=len(ids), dim=dim, model_id="m", generation=1,
                              ivf_threshold=ivf_threshold,
                              sample=lambda n: everything[rng.choice(len(everything), n, replace=False)])
    assert index.meta.layout.kind == ("flat" if count < ivf_threshold else "ivfpq")
    started = time.perf_counter()
    batches = ((ids[i:i + 2048], everything[i:i + 2048]) for i in range(0, len(ids), 2048))
    a, b, _ = neighbour_pairs(index.index.search, batches, ids, 0.95, 16)
    groups = connected_groups(a, b)
    assert sorted(tuple(g) for g in groups) == sorted((int(c) + 1, count + n + 1) for n, c in enumerate(copies))
    assert time.perf_counter() - started < 120


# -- REST and the page ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(small, distinct):
    settings = ServerSettings(allowed_hosts=("testserver",), collection=small.name, index_dir=small.index_dir)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_rest_duplicates(client, small):
    answer = client.get("/api/duplicates")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["collection"] == small.name and body["threshold"] == 0.91 and body["threshold_source"] == "model"
    assert len(body["groups"]) == 3 and body["images"] == 42
    cli_body = json.loads(cli("--collection", small.name, "--json", index_dir=small.index_dir).stdout)
    assert [[i["id"] for i in g["images"]] for g in body["groups"]] == \
        [[i["id"] for i in g["images"]] for g in cli_body["groups"]]
    image = body["groups"][0]["images"][0]
    assert image["thumbnail_url"] == f"/api/images/{image['id']}/thumbnail"
    assert image["image_url"] == f"/api/images/{image['id']}/file"
    thumb = client.get(image["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    given = client.get("/api/duplicates", params={"threshold": 0.9999}).json()
    assert given["threshold_source"] == "given" and given["redundant"] < body["redundant"]
    again = client.get("/api/duplicates").json()
    assert again["groups"] == body["groups"]


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "nan", "inf", "high"])
def test_rest_refuses_bad_thresholds(client, value):
    answer = client.get("/api/duplicates", params={"threshold": value})
    assert answer.status_code == 422 and "threshold" in answer.json()["detail"]


def test_rest_other_collection_and_unknown_collection(client, distinct):
    body = client.get("/api/duplicates", params={"collection": distinct.name})
    assert body.status_code == 200 and body.json()["groups"] == [] and body.json()["images"] == len(distinct.family)
    unknown = client.get("/api/duplicates", params={"collection": "nope"})
    assert unknown.status_code == 400 and "unknown collection" in unknown.json()["detail"]


def test_page_is_served_with_its_assets(client):
    page = client.get("/duplicates")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'src="static/duplicates.js"' in page.text
    assert client.get("/static/duplicates.js").status_code == 200
    assert client.get("/static/duplicates.css").status_code == 200
    assert "/api/duplicates" in client.get("/openapi.json").json()["paths"]
