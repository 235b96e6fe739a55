"""import-embeddings / export-embeddings: clip-retrieval's `clip inference` layout (img_emb/img_emb_N.npy +
metadata/metadata_N.parquet) into a collection and back, searched through the library, the CLI and clip-back's
/knn-service (including the real ClipClient)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from clipsearch.indexer.pipeline import IndexOptions  # noqa: E402
from clipsearch.indexer.runner import index_paths  # noqa: E402
from clipsearch.model.bundle import read_bundle  # noqa: E402
from clipsearch.model.runtime import ClipModel  # noqa: E402
from clipsearch.search import SearchQuery, Searcher  # noqa: E402
from clipsearch.store.collection import Collection, list_collections  # noqa: E402
from clipsearch.store.interchange import (ImportOptions, InterchangeError, find_shards, import_embeddings,  # noqa: E402
                                          imported_metadata)
from clipsearch.store.interchange_export import export_embeddings  # noqa: E402
from photo_fixtures import block_image, make_photos  # noqa: E402

CLI = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
URL = "https://example.com/images/remote-cat.jpg"


@dataclass(frozen=True)
class Layout:
    """A clip-inference output folder: shard 0 (fp16) = photos 0-2, shard 1 (fp32) = photos 3-4 + a URL-only
    row. `rows` lists (stored path, url, caption, vector as written) in import order."""

    folder: Path
    photos: list[Path]
    rows: list[tuple[str, str | None, str, np.ndarray]]


@pytest.fixture(scope="module")
def model(tiny_bundle) -> ClipModel:
    return ClipModel(tiny_bundle, threads=1)


def write_shard(folder: Path, label: str, vectors: np.ndarray, columns: dict[str, list]) -> None:
    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    np.save(folder / "img_emb" / f"img_emb_{label}.npy", vectors)
    pq.write_table(pa.table(columns), folder / "metadata" / f"metadata_{label}.parquet")


def build_layout(root: Path, model: ClipModel) -> Layout:
    photos = make_photos(root / "photos", 5)
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in photos] + [block_image(777)]  # the last one is not on disk
    vectors = model.encode_images(images)
    folder = root / "clip-out"
    first = vectors[:3].astype(np.float16)
    write_shard(folder, "0", first, {"image_path": [str(p) for p in photos[:3]],
                                     "caption": [f"photo {i}" for i in range(3)]})
    second = vectors[3:].astype(np.float32)
    write_shard(folder, "1", second, {"image_path": [str(photos[3]), str(photos[4]), "000123"],
                                      "caption": ["photo 3", "photo 4", "a remote cat"],
                                      "url": [None, None, URL]})
    rows = [(str(photos[i]), None, f"photo {i}", first[i].astype(np.float32)) for i in range(3)]
    rows += [(str(photos[3]), None, "photo 3", second[0]), (str(photos[4]), None, "photo 4", second[1]),
             (URL, URL, "a remote cat", second[2])]
    return Layout(folder, photos, rows)


@pytest.fixture()
def layout(tmp_path, model) -> Layout:
    return build_layout(tmp_path, model)


def run_import(index_dir: Path, folder: Path, bundle: Path | None, name: str = "imported", **options):
    info = read_bundle(bundle) if bundle is not None else None
    return import_embeddings(Collection.create(name, index_dir), folder, info, ImportOptions(**options))


def contents(index_dir: Path, name: str) -> list[tuple]:
    """(id, path, width, height, taken_at, url, caption, vector bytes) of every image, in id order."""
    with Collection.open(name, index_dir) as collection:
        store = collection.store
        ids, vectors = store.all_vectors(collection.require_model().embed_dim)
        records = store.get_many(ids.tolist())
        extra = imported_metadata(store, ids.tolist())
        return [(int(i), records[int(i)].path, records[int(i)].width, records[int(i)].height, records[int(i)].taken_at,
                 extra.get(int(i), {}).get("url"), extra.get(int(i), {}).get("caption"), v.tobytes())
                for i, v in zip(ids, vectors)]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180, env=env or dict(os.environ))


# -- import -------------------------------------------------------------------------------------------------------
def test_import_keeps_rows_ids_metadata_and_vectors(tmp_path, layout, tiny_bundle, model):
    index_dir = tmp_path / "collections"
    summary = run_import(index_dir, layout.folder, tiny_bundle)
    assert (summary.shards, summary.rows, summary.imported, summary.unchanged) == (2, 6, 6, 0)
    assert summary.skipped == [] and summary.url_rows == 1 and summary.missing_files == 0 and summary.total == 6
    rows = contents(index_dir, "imported")
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5, 6]  # shard order, row order
    for (image_id, path, width, height, _, url, caption, vector), (want_path, want_url, want_caption, want) in zip(
            rows, layout.rows):
        assert (path, url, caption) == (want_path, want_url, want_caption)
        assert vector == want.astype(np.float32).tobytes()  # exact: fp16 widened, fp32 as written
        assert (width, height) == ((160, 120) if url is None else (None, None))  # read from the files' headers
    with Collection.open("imported", index_dir) as collection:
        report = collection.check()
        assert report.ok, report.problems
        assert collection.require_model().model_id == model.model_id
        store = collection.store
        url_row = store.get(6)
        assert (url_row.path, url_row.size, url_row.mtime_ns) == (URL, 0, 0)
        local = store.get(1)
        stat = os.stat(layout.photos[0])
        assert (local.size, local.mtime_ns) == (stat.st_size, stat.st_mtime_ns)
        # the web server serves files only from recorded folders: the photos' folder, never anything for the URL
        # Served (the page shows them) but never walked: `index --rebuild` re-embeds indexed folders only.
        assert set(store.served_roots()) == {str(layout.photos[0].parent)} and store.indexed_roots() == {}


def test_imported_collection_searches_by_text_image_and_vector(tmp_path, layout, tiny_bundle, model):
    index_dir = tmp_path / "collections"
    run_import(index_dir, layout.folder, tiny_bundle)
    vectors = np.stack([r[3] for r in layout.rows])
    with Searcher.open("imported", index_dir) as searcher:
        text = model.encode_text(["a blue square"])[0]
        expected = (np.argsort(-(vectors @ text), kind="stable") + 1).tolist()
        hits = searcher.search(SearchQuery.build(text="a blue square", k=6))
        assert [h.id for h in hits] == expected
        assert {h.path for h in hits} == {r[0] for r in layout.rows}  # the URL row answers with its URL
        by_image = searcher.search(SearchQuery.build(image=str(layout.photos[4]), k=1, include_query_images=True))
        assert by_image[0].id == 5
        by_vector = searcher.search_vector(layout.rows[5][3], 1)
        assert by_vector[0].id == 6 and by_vector[0].path == URL


def test_reimport_adds_nothing_and_new_shards_are_imported_alone(tmp_path, layout, tiny_bundle):
    index_dir = tmp_path / "collections"
    partial = tmp_path / "partial"
    shutil.copytree(layout.folder, partial)
    for name in ("img_emb/img_emb_1.npy", "metadata/metadata_1.parquet"):
        (partial / name).unlink()
    first = run_import(index_dir, partial, tiny_bundle)
    assert (first.imported, first.total) == (3, 3)
    # clip inference wrote another shard: only its rows are read and imported (the model is remembered)
    for name in ("img_emb/img_emb_1.npy", "metadata/metadata_1.parquet"):
        shutil.copy(layout.folder / name, partial / name)
    second = run_import(index_dir, partial, None)
    assert (second.imported, second.unchanged, second.shards_unchanged, second.total) == (3, 3, 1, 6)
    before = contents(index_dir, "imported")
    again = run_import(index_dir, partial, tiny_bundle)
    assert (again.imported, again.unchanged, again.shards_unchanged, again.skipped) == (0, 6, 2, [])
    # the same rows from another folder (a copy): read, and every row skipped as already there
    copy = run_import(index_dir, layout.folder, None)
    assert copy.imported == 0 and len(copy.skipped) == 6
    assert copy.skipped_by_reason() == {"already in the collection": 6}
    assert contents(index_dir, "imported") == before
    with Collection.open("imported", index_dir) as collection:
        assert collection.check().ok
    # A shard rewritten with files of the same sizes (here: one more row's URL of the same length) is read again: it
    # was taken as unchanged by its row count and byte sizes alone, and the new row never came in.
    metadata = partial / "metadata" / "metadata_1.parquet"
    table = pq.read_table(metadata).to_pydict()
    table["url"] = [None, None, URL.replace("cat", "dog")]  # a remote row with another URL of the same length
    size = metadata.stat().st_size
    pq.write_table(pa.table(table), metadata)
    assert metadata.stat().st_size == size  # the sizes alone cannot tell
    rewritten = run_import(index_dir, partial, None)
    assert (rewritten.shards_unchanged, rewritten.imported) == (1, 1)


def test_shards_recorded_before_their_file_times_were_are_still_known(tmp_path, layout, tiny_bundle):
    index_dir = tmp_path / "collections"
    run_import(index_dir, layout.folder, tiny_bundle)
    with Collection.open("imported", index_dir) as collection:  # the table as earlier versions wrote it
        with collection.store.conn as conn:
            conn.execute('CREATE TABLE old AS SELECT source, shard, "rows", npy_bytes, parquet_bytes, imported, '
                         "skipped, imported_at FROM import_shards")
            conn.execute("DROP TABLE import_shards")
            conn.execute("ALTER TABLE old RENAME TO import_shards")
    again = run_import(index_dir, layout.folder, None)
    assert (again.imported, again.shards_unchanged, again.skipped) == (0, 2, [])
    with Collection.open("imported", index_dir) as collection:
        columns = {row[1] for row in collection.store.conn.execute("PRAGMA table_info(import_shards)")}
    assert {"npy_mtime_ns", "parquet_mtime_ns"} <= columns


def test_a_later_index_run_keeps_the_imported_vectors(tmp_path, layout, tiny_bundle, model):
    index_dir = tmp_path / "collections"
    run_import(index_dir, layout.folder, tiny_bundle)
    before = contents(index_dir, "imported")
    with Collection.create("imported", index_dir) as collection:
        summary = index_paths(collection, model, [str(layout.photos[0].parent)], IndexOptions(workers=0))
    assert (summary.added, summary.updated, summary.unchanged, summary.removed) == (0, 0, 5, 0)
    assert contents(index_dir, "imported") == before


def test_a_later_index_run_with_an_itm_model_keeps_the_imported_vectors_and_adds_tokens(tmp_path, blip_bundle):
    # A model with an ITM head stores image tokens: imported rows have none, so the run reads their files for them.
    # It re-embedded 5 rows as "updated" while still counting them unchanged (10 of 6 images), over the vectors.
    blip = ClipModel(blip_bundle, threads=1)
    layout = build_layout(tmp_path, blip)
    index_dir = tmp_path / "collections"
    run_import(index_dir, layout.folder, blip_bundle)
    before = contents(index_dir, "imported")
    with Collection.create("imported", index_dir) as collection:
        summary = index_paths(collection, blip, [str(layout.photos[0].parent)], IndexOptions(workers=0))
        hashes = {p: s.content_hash for p, s in collection.store.file_states().items()}
    assert (summary.added, summary.updated, summary.reused, summary.unchanged, summary.tokens_added) == (0, 0, 0, 5, 5)
    assert contents(index_dir, "imported") == before  # the vectors clip-retrieval computed
    assert not any(h.startswith("imported:") for p, h in hashes.items() if p in map(str, layout.photos))
    with Collection.create("imported", index_dir) as collection:
        again = index_paths(collection, blip, [str(layout.photos[0].parent)], IndexOptions(workers=0))
    assert (again.embedded, again.unchanged, again.tokens_added) == (0, 5, 0)


def test_an_import_into_a_collection_that_stores_tokens_passes_check(tmp_path, blip_bundle):
    # check said "2 of 3 images have no stored image tokens; run `clipsearch index` on the collection's folders" right
    # after an import, and indexing those folders could not help: imported rows get tokens when their folder is
    # indexed, and re-ranking leaves them unscored until then, as documented.
    blip = ClipModel(blip_bundle, threads=1)
    own = make_photos(tmp_path / "own", 2, start_seed=300)
    index_dir = tmp_path / "collections"
    with Collection.create("imported", index_dir) as collection:
        index_paths(collection, blip, [str(own[0].parent)], IndexOptions(workers=0))
        assert collection.store.token_ids().size == 2
    layout = build_layout(tmp_path, blip)
    run_import(index_dir, layout.folder, None)
    with Collection.open("imported", index_dir) as collection:
        report = collection.check()
        assert report.ok, report.problems


def test_a_rebuild_does_not_drop_imported_rows_unasked(tmp_path, layout, tiny_bundle):
    """`index A --rebuild` on a collection that also holds imported rows dropped them all without a word (their
    vectors came with them: nothing to walk or embed). Refused, naming the ways out; --forget-missing goes ahead."""
    index_dir = tmp_path / "collections"
    run_import(index_dir, layout.folder, tiny_bundle)
    own = make_photos(tmp_path / "own", 2, start_seed=400)
    base = [*CLI, "index", str(own[0].parent), "--collection", "imported", "--index-dir", str(index_dir),
            "--workers", "0"]
    assert cli(*base[3:]).returncode == 0
    refused = cli(*base[3:], "--rebuild")
    assert refused.returncode == 1 and "holds 6 images brought in by import-embeddings" in refused.stderr
    assert "--forget-missing" in refused.stderr
    assert len(contents(index_dir, "imported")) == 8
    done = cli(*base[3:], "--rebuild", "--forget-missing", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["total"], summary["removed"]) == (2, 6)


# -- errors -------------------------------------------------------------------------------------------------------
def test_dimension_mismatch_is_refused_before_anything_is_written(tmp_path, tiny_bundle):
    folder = tmp_path / "clip-out"
    vectors = np.random.default_rng(0).normal(size=(2, 512)).astype(np.float32)
    write_shard(folder, "0", vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
                {"image_path": ["/a.jpg", "/b.jpg"]})
    with pytest.raises(InterchangeError) as error:
        run_import(tmp_path / "collections", folder, tiny_bundle)
    assert "have 512 dimensions but model" in error.value.message and "64-dimensional" in error.value.message
    assert "--model" in error.value.hint and "ViT-B-32/openai" in error.value.hint
    assert list_collections(tmp_path / "collections") == []


def test_a_new_collection_needs_the_model(tmp_path, layout):
    with pytest.raises(InterchangeError, match="is new: name the model") as error:
        run_import(tmp_path / "collections", layout.folder, None)
    assert "--model" in error.value.hint
    assert list_collections(tmp_path / "collections") == []


def test_malformed_folders_are_clear_errors(tmp_path, layout, tiny_bundle):
    index_dir = tmp_path / "collections"

    def broken(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(layout.folder, target)
        return target

    missing = broken("missing-metadata")
    (missing / "metadata" / "metadata_1.parquet").unlink()
    with pytest.raises(InterchangeError, match=r"1 shard\(s\) have no metadata file: metadata/metadata_1.parquet"):
        find_shards(missing)
    misaligned = broken("misaligned")
    pq.write_table(pa.table({"image_path": ["/x.jpg"]}), misaligned / "metadata" / "metadata_1.parquet")
    with pytest.raises(InterchangeError, match="img_emb_1.npy has 3 rows but metadata_1.parquet has 1"):
        run_import(index_dir, misaligned, tiny_bundle)
    no_columns = broken("no-columns")
    pq.write_table(pa.table({"caption": ["a", "b", "c"]}), no_columns / "metadata" / "metadata_1.parquet")
    with pytest.raises(InterchangeError, match="neither an image_path nor a url column"):
        run_import(index_dir, no_columns, tiny_bundle)
    not_parquet = broken("not-parquet")
    (not_parquet / "metadata" / "metadata_0.parquet").write_bytes(b"not parquet")
    with pytest.raises(InterchangeError, match="not a readable parquet file"):
        run_import(index_dir, not_parquet, tiny_bundle)
    with pytest.raises(InterchangeError, match="no img_emb/ folder"):
        run_import(index_dir, tmp_path, tiny_bundle)
    assert list_collections(index_dir) == []  # every check ran before anything was written


def test_non_normalised_vectors_are_refused_or_scaled(tmp_path, layout, tiny_bundle):
    index_dir = tmp_path / "collections"
    raw = layout.folder / "img_emb" / "img_emb_1.npy"
    vectors = np.load(raw)
    scaled = vectors * 3
    scaled[1] = 0  # a zero row can never be used
    np.save(raw, scaled)
    with pytest.raises(InterchangeError, match="2 of 3 vectors are not L2-normalised") as error:
        run_import(index_dir, layout.folder, tiny_bundle)
    assert "--normalize" in error.value.hint and "Shards before this one were imported" in error.value.hint
    with Collection.open("imported", index_dir) as collection:  # shard 0 is in, SQLite and FAISS agree
        assert collection.store.count() == 3 and collection.check().ok
    summary = run_import(index_dir, layout.folder, tiny_bundle, normalize=True)
    assert (summary.imported, summary.unchanged, summary.normalized) == (2, 3, 2)
    # Refused at its first shard, a first import leaves no empty collection behind (it bound the model first).
    only_bad = tmp_path / "only-bad"
    write_shard(only_bad, "0", scaled, {"image_path": ["/x/a.jpg", "/x/b.jpg", "/x/c.jpg"]})
    with pytest.raises(InterchangeError, match="not L2-normalised"):
        run_import(index_dir, only_bad, tiny_bundle, name="refused")
    assert list_collections(index_dir) == ["imported"]
    assert [(s.row, s.reason) for s in summary.skipped] == [(1, "vector is zero or not finite")]
    rows = contents(index_dir, "imported")
    assert [r[1] for r in rows] == [r[0] for r in layout.rows[:4]] + [URL]
    assert np.frombuffer(rows[3][7], dtype=np.float32) == pytest.approx(vectors[0], abs=1e-6)


# -- export -------------------------------------------------------------------------------------------------------
def test_export_then_import_round_trip_is_exact(tmp_path, layout, tiny_bundle):
    index_dir = tmp_path / "collections"
    run_import(index_dir, layout.folder, tiny_bundle)
    out = tmp_path / "exported"
    with Collection.open("imported", index_dir) as collection:
        summary = export_embeddings(collection, out, shard_size=4)
    assert (summary.rows, summary.shards, summary.dim, summary.dtype) == (6, 2, 64, "float32")
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy"]
    table = pq.read_table(out / "metadata" / "metadata_1.parquet").to_pydict()
    assert table["id"] == [5, 6] and table["url"] == [None, URL] and table["image_path"] == [str(layout.photos[4]), "000123"]
    assert table["caption"] == ["photo 4", "a remote cat"] and table["width"] == [160, None]
    assert json.loads((out / "clipsearch.json").read_text())["embed_dim"] == 64
    shards = find_shards(out)
    assert [(s.label, s.rows, s.dtype) for s in shards] == [("0", 4, "float32"), ("1", 2, "float32")]
    run_import(index_dir, out, None, name="again")  # the export names its model
    assert contents(index_dir, "again") == contents(index_dir, "imported")
    # fp16, as clip inference writes: one rounding, then stable
    with Collection.open("again", index_dir) as collection:
        export_embeddings(collection, tmp_path / "half", fp16=True)
    assert np.load(tmp_path / "half" / "img_emb" / "img_emb_0.npy").dtype == np.float16
    run_import(index_dir, tmp_path / "half", tiny_bundle, name="half")
    for original, half in zip(contents(index_dir, "imported"), contents(index_dir, "half")):
        assert original[:7] == half[:7]
        rounded = np.frombuffer(original[7], dtype=np.float32).astype(np.float16).astype(np.float32)
        assert np.frombuffer(half[7], dtype=np.float32).tobytes() == rounded.tobytes()


def test_an_export_naming_its_model_by_another_machines_path_is_imported_by_the_models_name(tmp_path, layout,
                                                                                             tiny_bundle, isolated_home):
    # A bundled or cached model's spec is the folder it had on the exporting machine; here it is elsewhere.
    name = json.loads((tiny_bundle / "model.json").read_text())["name"]
    shutil.copytree(tiny_bundle, isolated_home / "models" / name)
    index_dir = tmp_path / "collections"
    run_import(index_dir, layout.folder, tiny_bundle)
    out = tmp_path / "exported"
    with Collection.open("imported", index_dir) as collection:
        export_embeddings(collection, out)
    record = json.loads((out / "clipsearch.json").read_text())
    record["spec"] = "/home/someone-else/site-packages/clipsearch/model/bundled/" + name
    (out / "clipsearch.json").write_text(json.dumps(record))
    run_import(index_dir, out, None, name="moved")
    assert contents(index_dir, "moved") == contents(index_dir, "imported")


def test_an_indexed_collection_exports_and_imports_exactly(tmp_path, tiny_bundle, model):
    index_dir = tmp_path / "collections"
    photos = make_photos(tmp_path / "photos", 6)
    with Collection.create("indexed", index_dir) as collection:
        index_paths(collection, model, [str(tmp_path / "photos")], IndexOptions(workers=0))
    with Collection.open("indexed", index_dir) as collection:
        export_embeddings(collection, tmp_path / "out", shard_size=5)
    table = pq.read_table(tmp_path / "out" / "metadata" / "metadata_0.parquet")
    assert table.column_names == ["image_path", "id", "width", "height", "taken_at"]  # no url/caption: none has one
    run_import(index_dir, tmp_path / "out", None, name="copy")
    original, copy = contents(index_dir, "indexed"), contents(index_dir, "copy")
    assert copy == original and sorted(r[1] for r in copy) == sorted(map(str, photos))


def test_export_refuses_a_folder_that_holds_embeddings_and_an_empty_collection(tmp_path, layout, tiny_bundle):
    index_dir = tmp_path / "collections"
    run_import(index_dir, layout.folder, tiny_bundle)
    with Collection.open("imported", index_dir) as collection:
        with pytest.raises(InterchangeError, match="already holds embeddings"):
            export_embeddings(collection, layout.folder)
    (layout.folder / "clipsearch.json").write_text(json.dumps({"model_id": "someone-else", "name": "other",
                                                               "spec": "other", "embed_dim": 64}))
    with pytest.raises(InterchangeError, match="was exported from a collection of model other"):
        run_import(index_dir, layout.folder, tiny_bundle)


# -- CLI and clip-back ----------------------------------------------------------------------------------------------
def test_cli_import_export_and_search(tmp_path, layout, tiny_bundle):
    index_dir = str(tmp_path / "collections")
    result = cli("import-embeddings", str(layout.folder), "-c", "clip", "--model", str(tiny_bundle),
                 "--index-dir", index_dir)
    assert result.returncode == 0, result.stderr
    assert "clip: 6 imported, 0 already imported (0 of 2 shards unchanged), 0 skipped; 6 images in total" in result.stdout
    assert "1 rows have a URL and no local file" in result.stdout
    again = cli("import-embeddings", str(layout.folder), "-c", "clip", "--index-dir", index_dir, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["imported"] == 0 and json.loads(again.stdout)["shards_unchanged"] == 2
    found = cli("search", "a blue square", "-k", "6", "-c", "clip", "--index-dir", index_dir, "--json")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert sorted(h["id"] for h in hits) == [1, 2, 3, 4, 5, 6] and URL in {h["path"] for h in hits}
    exported = cli("export-embeddings", str(tmp_path / "out"), "-c", "clip", "--index-dir", index_dir, "--fp16")
    assert exported.returncode == 0, exported.stderr
    assert "clip: 6 rows in 1 shard(s) of 64-dim float16 vectors written to" in exported.stdout
    wrong = cli("import-embeddings", str(layout.folder), "-c", "new", "--index-dir", index_dir)
    assert wrong.returncode == 1 and "error: collection 'new' is new: name the model" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    refused = cli("export-embeddings", str(tmp_path / "out"), "-c", "clip", "--index-dir", index_dir)
    assert refused.returncode == 1 and "already holds embeddings" in refused.stderr


@pytest.fixture()
def served(tmp_path, layout, tiny_bundle):
    from fastapi.testclient import TestClient

    from clipsearch.web import ServerSettings, create_app
    from web_fixtures import TEST_HOSTS

    index_dir = tmp_path / "collections"
    run_import(index_dir, layout.folder, tiny_bundle, name="photos")
    settings = ServerSettings(allowed_hosts=TEST_HOSTS, collection="photos", index_dir=index_dir)
    with TestClient(create_app(settings)) as client:
        yield client, settings


def test_knn_service_answers_from_an_imported_collection(served, layout, model):
    client, _ = served
    body = {"indice_name": "photos", "num_images": 6, "num_result_ids": 6, "deduplicate": False, "modality": "image"}
    vectors = np.stack([r[3] for r in layout.rows])
    for target in (1, 5):  # a local file and the URL row
        query = vectors[target]
        response = client.post("/knn-service", content=json.dumps({**body, "embedding_input": (query * 2).tolist()}))
        assert response.status_code == 200, response.text
        results = response.json()
        assert [r["id"] for r in results] == (np.argsort(-(vectors @ query), kind="stable") + 1).tolist()
        assert results[0]["id"] == target + 1 and results[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    # As clip-back answers from the metadata it was given: the imported captions, a URL row's own image_path and url.
    url_hit = next(r for r in results if r["id"] == 6)
    assert (url_hit["image_path"], url_hit["url"], url_hit["caption"]) == ("000123", URL, "a remote cat")
    local_hit = next(r for r in results if r["id"] == 2)
    assert (local_hit["image_path"], local_hit["caption"]) == (str(layout.photos[1]), "photo 1")
    meta = client.post("/metadata", content=json.dumps({"ids": [6, 2], "indice_name": "photos"})).json()
    assert [m["metadata"]["caption"] for m in meta] == ["a remote cat", "photo 1"]
    text = client.post("/knn-service", content=json.dumps({**body, "text": "a blue square"})).json()
    expected = np.argsort(-(vectors @ model.encode_text(["a blue square"])[0]), kind="stable") + 1
    assert [r["id"] for r in text] == expected.tolist()
    # local files are served by id; the URL row is never fetched or served
    assert client.get("/api/images/1/file").status_code == 200
    refused = client.get("/api/images/6/file")
    assert refused.status_code == 404 and f"image 6 was imported as a URL ({URL})" in refused.json()["detail"]
    assert "no longer on disk" not in refused.json()["detail"]


def test_real_clip_client_embedding_input_against_an_imported_collection(served, layout):
    from test_clipback import load_clip_client_class
    from clipsearch.web import create_app
    from web_fixtures import LiveServer

    ClipClient, Modality = load_clip_client_class()
    _, settings = served
    with LiveServer(create_app(settings)) as server:
        client = ClipClient(url=f"{server.url}/knn-service", indice_name="photos", num_images=3,
                            modality=Modality.IMAGE, deduplicate=False)
        results = client.query(embedding_input=layout.rows[3][3].tolist())
        assert [r["id"] for r in results][:1] == [4]
        assert results[0]["image_path"] == str(layout.photos[3])
        by_text = client.query(text="a red circle")
        assert len(by_text) == 3 and all({"id", "similarity", "image_path", "url"} <= set(r) for r in by_text)


def test_imported_sizes_and_capture_times_are_kept_only_when_they_are_real(tmp_path, model, tiny_bundle):
    # A date filter compares stored times as text: free text or month 13 stored as they are would pass any --after.
    folder = tmp_path / "shards"
    vectors = model.encode_images([block_image(i) for i in range(6)])
    urls = [f"https://example.com/{i}.jpg" for i in range(6)]
    write_shard(folder, "0", vectors, {
        "url": urls,
        "width": [640.0, 640.0, 1e3, 1.5, 3e9, float("nan")],
        "height": [480, 1000, -2, 0, 480, 480],
        "taken_at": ["2024-05-01T14:30:00Z", "2024-05-01", "2024-05-01T14:30:00+02:00", "notadate",
                     "2024-13-45T99:99:99", "1700000000"]})
    index_dir = tmp_path / "collections"
    run_import(index_dir, folder, tiny_bundle, name="odd")
    rows = {r[1]: r[2:5] for r in contents(index_dir, "odd")}
    assert [rows[u] for u in urls] == [
        (640, 480, "2024-05-01T14:30:00"), (640, 1000, "2024-05-01T00:00:00"), (1000, None, "2024-05-01T14:30:00"),
        (None, None, None), (None, 480, None), (None, 480, None)]


def test_an_export_that_fails_half_way_leaves_the_folder_as_it_found_it(tmp_path, layout, tiny_bundle, monkeypatch):
    import clipsearch.store.interchange_export as export_module

    index_dir = tmp_path / "collections"
    run_import(index_dir, layout.folder, tiny_bundle, name="photos")
    real = export_module._metadata_table
    calls = []

    def failing(rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(rows)

    monkeypatch.setattr(export_module, "_metadata_table", failing)
    out = tmp_path / "out"
    with Collection.open("photos", index_dir) as collection, pytest.raises(OSError):
        export_embeddings(collection, out, shard_size=4)
    assert not out.exists()  # it made the folder: nothing of it is left
    monkeypatch.setattr(export_module, "_metadata_table", real)
    with Collection.open("photos", index_dir) as collection:
        summary = export_embeddings(collection, out, shard_size=4)  # into the same folder, now that it works
    assert summary.rows == 6 and summary.shards == 2


def test_the_metadatas_other_columns_are_kept_served_as_clip_back_does_and_exported(tmp_path, model, tiny_bundle):
    # clip-back answers with the metadata's columns (NSFW is in its default columns_to_return); they were dropped.
    from fastapi.testclient import TestClient

    from clipsearch.web import ServerSettings, create_app
    from web_fixtures import TEST_HOSTS

    folder = tmp_path / "shards"
    vectors = model.encode_images([block_image(i) for i in range(3)])
    write_shard(folder, "0", vectors, {
        "url": [f"https://example.com/{i}.jpg" for i in range(3)], "caption": ["a", "b", "c"],
        "NSFW": ["UNLIKELY", "NSFW", None], "key": ["000000000", "000000001", "000000002"],
        "punsafe": [0.01, 0.97, float("nan")], "exif": [{"Make": "x"}, {"Make": "y"}, None]})  # a struct: not kept
    index_dir = tmp_path / "collections"
    run_import(index_dir, folder, tiny_bundle, name="meta")
    settings = ServerSettings(allowed_hosts=TEST_HOSTS, collection="meta", index_dir=index_dir)
    with TestClient(create_app(settings)) as client:
        body = {"indice_name": "meta", "num_images": 3, "deduplicate": False, "embedding_input": vectors[1].tolist()}
        first = client.post("/knn-service", content=json.dumps(body)).json()[0]
        meta = client.post("/metadata", content=json.dumps({"ids": [3], "indice_name": "meta"})).json()[0]["metadata"]
    assert (first["id"], first["NSFW"], first["key"], first["punsafe"]) == (2, "NSFW", "000000001", 0.97)
    assert "exif" not in first and first["caption"] == "b"  # the row's own caption, not a column of the same name
    assert meta["key"] == "000000002" and "NSFW" not in meta and "punsafe" not in meta  # missing values: absent
    with Collection.open("meta", index_dir) as collection:
        export_embeddings(collection, tmp_path / "out")
    table = pq.read_table(tmp_path / "out" / "metadata" / "metadata_0.parquet").to_pydict()
    assert table["NSFW"] == ["UNLIKELY", "NSFW", None] and table["key"] == ["000000000", "000000001", "000000002"]
    assert table["punsafe"] == [0.01, 0.97, None] and "exif" not in table


def test_a_rewritten_shard_replaces_what_it_imported_and_nothing_else(tmp_path, layout, tiny_bundle, model):
    """clip inference run again into the same folder: the shard's rows with new vectors are updated in place, rows
    it no longer holds leave, identical rows stay as they were; rows the collection got elsewhere are untouched."""
    index_dir = tmp_path / "collections"
    first = run_import(index_dir, layout.folder, tiny_bundle)
    assert first.imported == 6
    before = {row[1]: row for row in contents(index_dir, "imported")}
    # A photo of shard 0 is indexed by clipsearch itself (its vector now comes from the file, not the import).
    from PIL import Image

    with Collection.open("imported", index_dir) as collection:
        owned_id = collection.store.conn.execute("SELECT id FROM images WHERE path = ?",
                                                 [str(layout.photos[0])]).fetchone()[0]
        own_vector = model.encode_images([Image.open(layout.photos[0]).convert("RGB")])[0] * -1.0
        collection.store.conn.execute("UPDATE images SET content_hash = 'file-bytes' WHERE id = ?", [owned_id])
        collection.store.conn.execute("UPDATE embeddings SET vector = ? WHERE id = ?",
                                      [own_vector.astype(np.float32).tobytes(), owned_id])
        collection.store.conn.commit()
    # Shard 0 rewritten: photo 0 and photo 1 with other vectors, photo 2 the same, a caption changed.
    rng = np.random.default_rng(5)
    changed = rng.standard_normal((2, layout.rows[0][3].shape[0])).astype(np.float32)
    changed /= np.linalg.norm(changed, axis=1, keepdims=True)
    vectors = np.stack([changed[0], changed[1], layout.rows[2][3]]).astype(np.float32)
    write_shard(layout.folder, "0", vectors, {"image_path": [str(p) for p in layout.photos[:3]],
                                              "caption": ["photo 0", "photo 1, retaken", "photo 2"]})
    # Shard 1 rewritten without its URL row.
    table = pq.read_table(layout.folder / "metadata" / "metadata_1.parquet").to_pydict()
    second = np.load(layout.folder / "img_emb" / "img_emb_1.npy")[:2]
    write_shard(layout.folder, "1", second, {key: values[:2] for key, values in table.items()})

    again = run_import(index_dir, layout.folder, None)
    assert (again.imported, again.updated, again.removed) == (0, 1, 1)
    assert again.unchanged == 3  # photo 2 of shard 0, photos 3 and 4 of shard 1
    assert again.skipped_by_reason() == {"already in the collection": 1}  # photo 0: indexed from its file since
    after = {row[1]: row for row in contents(index_dir, "imported")}
    assert URL not in after  # the row the rewritten shard no longer has
    assert after[str(layout.photos[0])][7] == own_vector.astype(np.float32).tobytes()  # never overwritten
    photo1 = after[str(layout.photos[1])]
    assert photo1[0] == before[str(layout.photos[1])][0]  # updated in place: same id
    assert photo1[7] == changed[1].tobytes() and photo1[6] == "photo 1, retaken"
    for unchanged in layout.photos[2:5]:
        assert after[str(unchanged)] == before[str(unchanged)]
    with Collection.open("imported", index_dir) as collection:
        assert collection.check().ok
    with Searcher.open("imported", index_dir) as searcher:  # the FAISS index holds the new vector
        assert searcher.search_vector(changed[1], k=1)[0].path == str(layout.photos[1])
    # Read again unchanged: nothing to do.
    third = run_import(index_dir, layout.folder, None)
    assert (third.imported, third.updated, third.removed, third.shards_unchanged) == (0, 0, 0, 2)


def test_rows_that_move_between_shards_stay_and_a_gone_shards_rows_leave(tmp_path, layout, tiny_bundle, monkeypatch):
    """clip inference run again may partition differently: a row of shard 1 now in shard 0 was skipped there ("already
    in the collection") and then removed as no longer in shard 1, for good. Ownership is the folder's, not a shard's;
    removals wait until every shard was read."""
    import clipsearch.store.interchange as interchange

    index_dir = tmp_path / "collections"
    run_import(index_dir, layout.folder, tiny_bundle)
    before = {row[1]: row for row in contents(index_dir, "imported")}
    photo3 = str(layout.photos[3])
    first = pq.read_table(layout.folder / "metadata" / "metadata_0.parquet").to_pydict()
    second = pq.read_table(layout.folder / "metadata" / "metadata_1.parquet").to_pydict()
    v0 = np.load(layout.folder / "img_emb" / "img_emb_0.npy").astype(np.float32)
    v1 = np.load(layout.folder / "img_emb" / "img_emb_1.npy").astype(np.float32)
    # photo 3 moves from shard 1 to shard 0; shard 1 keeps photo 4 and the URL row.
    write_shard(layout.folder, "0", np.concatenate([v0, v1[:1]]),
                {"image_path": first["image_path"] + [photo3], "caption": first["caption"] + ["photo 3"]})
    write_shard(layout.folder, "1", v1[1:], {key: values[1:] for key, values in second.items()})

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # an import stopped after its shards, before the removals

    monkeypatch.setattr(interchange._Importer, "_remove_what_no_shard_holds", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_import(index_dir, layout.folder, None)
    monkeypatch.undo()
    again = run_import(index_dir, layout.folder, None)  # reads the rewritten shards again and finishes
    assert (again.imported, again.removed, again.skipped) == (0, 0, [])
    after = {row[1]: row for row in contents(index_dir, "imported")}
    assert after == before  # the same rows, ids and vectors (photo 3 now comes from shard 0)
    with Collection.open("imported", index_dir) as collection:
        shard_of = dict(collection.store.conn.execute(
            "SELECT images.path, imported.shard FROM imported JOIN images USING (id)").fetchall())
    assert shard_of[photo3] == "0"
    # Shard 1 rewritten again with a new row in place of photo 4 (clip inference run on a folder that changed): the
    # new row comes in and stays, photo 4 leaves.
    extra = layout.photos[4].parent / "extra.png"
    block_image(4321).save(extra)
    v_extra = ClipModel(tiny_bundle, threads=1).encode_images([block_image(4321)])
    now = pq.read_table(layout.folder / "metadata" / "metadata_1.parquet").to_pydict()
    rows = np.load(layout.folder / "img_emb" / "img_emb_1.npy").astype(np.float32)
    write_shard(layout.folder, "1", np.concatenate([v_extra, rows[1:]]),
                {"image_path": [str(extra), *now["image_path"][1:]], "caption": ["extra", *now["caption"][1:]],
                 "url": [None, *now["url"][1:]]})
    fourth = run_import(index_dir, layout.folder, None)
    assert (fourth.imported, fourth.removed, fourth.total) == (1, 1, 6), fourth
    paths = {row[1] for row in contents(index_dir, "imported")}
    assert str(extra) in paths and str(layout.photos[4]) not in paths
    assert run_import(index_dir, layout.folder, None).total == 6  # and it stays
    # A shard file deleted: its rows leave (and its record), the other shard's stay.
    for name in ("img_emb/img_emb_1.npy", "metadata/metadata_1.parquet"):
        (layout.folder / name).unlink()
    third = run_import(index_dir, layout.folder, None)
    assert (third.removed, third.total) == (2, 4)  # the extra row and the URL row
    assert URL not in {row[1] for row in contents(index_dir, "imported")}
    with Collection.open("imported", index_dir) as collection:
        assert collection.check().ok
        assert [label for (label,) in collection.store.conn.execute("SELECT shard FROM import_shards")] == ["0"]
