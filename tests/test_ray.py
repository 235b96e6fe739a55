"""The Ray runner (`clipsearch index PATH --ray`) on a local Ray instance started once per test session: the same
collection as the local runner (paths, vectors, metadata, skipped files), incremental re-runs, the CLI with and
without a cluster address, and the shards it writes in clip-retrieval's layout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.ray_runner import RayOptions, RayRunner, iter_shard_results, parse_address
from clipsearch.indexer.runner import LocalRunner
from clipsearch.model.runtime import ClipModel
from clipsearch.store.collection import Collection
from clipsearch.store.interchange import find_shards, import_embeddings
from photo_fixtures import block_image, bump_mtime, make_photos

CLI = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
FIELDS = ("size", "mtime_ns", "content_hash", "width", "height", "taken_at", "model_id")


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray instance for the session (2 CPUs, ~200 MB object store, no dashboard); its address."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
             log_to_driver=False, logging_level="warning")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return ClipModel(tiny_bundle, threads=1)


def _folder(root: Path) -> Path:
    """12 generated photos, one JPEG with an EXIF capture time, a byte-identical copy and a broken file."""
    folder = root / "photos"
    make_photos(folder, 12)
    exif = Image.Exif()
    exif[306] = "2023:07:14 18:02:11"  # DateTime (IFD0)
    block_image(40).save(folder / "dated.jpg", quality=90, exif=exif.tobytes())
    shutil.copy2(folder / "sub" / "photo_001.jpg", folder / "copy_of_001.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def _rows(collection: Collection) -> dict[str, tuple]:
    store = collection.store
    dim = collection.require_model().embed_dim
    rows = {}
    for path in store.file_states():
        record = store.find_by_path(path)
        rows[path] = (tuple(getattr(record, f) for f in FIELDS), store.vector(record.id, dim))
    return rows


def _skipped(summary) -> list[tuple[str, str]]:
    return sorted((s.path, s.reason) for s in summary.skipped)


def test_ray_run_equals_the_local_run(tmp_path, model, ray_instance):
    folder = _folder(tmp_path)
    options = IndexOptions(batch_size=4, workers=1)
    local = Collection.create("local", tmp_path / "idx")
    distributed = Collection.create("ray", tmp_path / "idx")
    local_summary = LocalRunner(options).run(local, model, [str(folder)])
    runner = RayRunner(options, RayOptions(concurrency=1, decode_batch=3, shard_size=5, shards_dir=tmp_path / "shards"))
    ray_summary = runner.run(distributed, model, [str(folder)])

    counts = lambda s: (s.added, s.updated, s.reused, s.removed, s.unchanged, s.embedded, s.total)  # noqa: E731
    assert counts(ray_summary) == counts(local_summary) == (13, 0, 1, 0, 0, 13, 14)
    assert _skipped(ray_summary) == _skipped(local_summary) and len(ray_summary.skipped) == 1
    expected, found = _rows(local), _rows(distributed)
    assert sorted(found) == sorted(expected)
    for path, (fields, vector) in expected.items():
        assert found[path][0] == fields, path
        np.testing.assert_allclose(found[path][1], vector, atol=1e-5, rtol=0)
    assert found[str(folder / "dated.jpg")][0][FIELDS.index("taken_at")] == "2023-07-14T18:02:11"
    assert local.store.skipped_states().keys() == distributed.store.skipped_states().keys()
    assert distributed.check().ok

    # the shards: clip-retrieval's layout, 15 rows (the broken file and the known copy carry a zero vector)
    shards = find_shards(tmp_path / "shards")
    assert [s.label for s in shards] == ["0", "1", "2"] and sum(s.rows for s in shards) == 15
    assert [p.name for p in sorted((tmp_path / "shards" / "img_emb").iterdir())] == [
        "img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    assert {r.task.path for r in iter_shard_results(tmp_path / "shards")} == {str(p) for p in folder.rglob("*.*")}
    # ... which clipsearch import-embeddings reads as clip-retrieval output: the same vectors (the broken file's
    # zero row skipped)
    imported = Collection.create("imported", tmp_path / "idx")
    result = import_embeddings(imported, tmp_path / "shards", model.info)
    assert (result.imported, len(result.skipped)) == (14, 1)
    again = _rows(imported)
    assert sorted(again) == sorted(expected)
    for path, (fields, vector) in expected.items():
        np.testing.assert_allclose(again[path][1], vector, atol=1e-5, rtol=0)


def test_ray_rerun_adds_nothing_and_then_embeds_only_new_and_changed_files(tmp_path, model, ray_instance):
    folder = tmp_path / "photos"
    make_photos(folder, 6)
    collection = Collection.create("c", tmp_path / "idx")
    runner = RayRunner(IndexOptions(batch_size=4), RayOptions(concurrency=1))
    assert runner.run(collection, model, [str(folder)]).added == 6
    generation = collection.store.generation

    again = runner.run(collection, model, [str(folder)])
    assert (again.added, again.updated, again.reused, again.removed, again.embedded) == (0, 0, 0, 0, 0)
    assert again.unchanged == 6 and again.total == 6
    assert collection.store.generation == generation  # nothing written, FAISS untouched

    make_photos(folder / "new", 2, start_seed=50)
    changed = folder / "photo_000.png"
    block_image(77).save(changed)
    bump_mtime(changed)
    (folder / "sub" / "photo_001.jpg").unlink()
    third = runner.run(collection, model, [str(folder)])
    assert (third.added, third.updated, third.removed, third.unchanged, third.total) == (2, 1, 1, 4, 7)
    assert collection.check().ok
    local = Collection.create("local", tmp_path / "idx")
    assert LocalRunner(IndexOptions(batch_size=4, workers=0)).run(local, model, [str(folder)]).total == 7
    local_rows = _rows(local)
    ray_rows = _rows(collection)
    assert sorted(ray_rows) == sorted(local_rows)
    for path, (fields, vector) in local_rows.items():
        assert ray_rows[path][0] == fields
        np.testing.assert_allclose(ray_rows[path][1], vector, atol=1e-5, rtol=0)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=240, env=os.environ.copy())


def test_cli_index_with_ray_then_with_an_address_then_nothing_to_add(tmp_path, tiny_bundle, ray_instance, isolated_home):
    folder = tmp_path / "photos"
    make_photos(folder, 5)
    # --ray alone: the command starts (and stops) a local Ray instance of its own
    first = _cli("index", str(folder), "--ray", "--collection", "x", "--model", str(tiny_bundle), "--json")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert (summary["added"], summary["total"]) == (5, 5)

    # --ray ADDRESS: connects to the running instance (the test session's) and ships the bundle
    make_photos(folder / "more", 1, start_seed=30)
    second = _cli("index", str(folder), "--collection", "x", "--ray", ray_instance, "--json")
    assert second.returncode == 0, second.stderr
    assert (json.loads(second.stdout)["added"], json.loads(second.stdout)["total"]) == (1, 6)

    third = _cli("index", str(folder), "--ray", "--collection", "x")
    assert third.returncode == 0, third.stderr
    assert "0 added, 0 updated, 0 reused, 0 removed, 6 unchanged" in third.stdout
    check = _cli("check", "--collection", "x")
    assert check.returncode == 0, check.stdout + check.stderr


def test_ray_options_are_checked_before_ray_is_used(tmp_path):
    assert parse_address(None) is None and parse_address("local") is None
    assert parse_address("ray://head:10001") == "ray://head:10001" and parse_address("10.0.0.1:6379") == "10.0.0.1:6379"
    bad = _cli("index", str(tmp_path), "--ray", "not an address")
    assert bad.returncode == 2 and "not a Ray address" in bad.stderr
    alone = _cli("index", str(tmp_path), "--ray-concurrency", "2")
    assert alone.returncode == 2 and "go with --ray" in alone.stderr
    watching = _cli("index", str(tmp_path), "--ray", "--watch")
    assert watching.returncode == 2 and "watch mode" in watching.stderr


def test_clipsearch_help_does_not_import_ray():
    probe = ("import sys; from clipsearch.cli import app; import clipsearch.cli.index_cmds; "
             "print('ray' in sys.modules, 'clipsearch.indexer.ray_runner' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_fsspec_urls_are_walked_and_read_by_the_local_reader(tmp_path, tiny_bundle):
    """A URL root (here fsspec's in-memory filesystem, in this process) is listed by the walk's name rules, and
    its files are decoded by `reader.read_one` exactly as the same bytes on disk."""
    import fsspec

    from clipsearch.indexer.ray_runner import read_task, walk_roots
    from clipsearch.indexer.reader import ReadTask, read_one
    from clipsearch.model.bundle import read_bundle, read_preprocess

    paths = make_photos(tmp_path / "photos", 3)
    fs = fsspec.filesystem("memory")
    for path in paths:
        fs.pipe(f"/clipsearch-test/{path.relative_to(tmp_path)}", path.read_bytes())
    fs.pipe("/clipsearch-test/photos/.hidden.png", paths[0].read_bytes())
    fs.pipe("/clipsearch-test/photos/notes.txt", b"text")
    try:
        walked = walk_roots(["memory://clipsearch-test/photos"], IndexOptions())
        assert walked.problems == [] and len(walked.roots) == 1
        assert sorted(f.size for f in walked.files) == sorted(p.stat().st_size for p in paths)
        assert all(f.path.startswith(walked.roots[0] + "/") for f in walked.files)
        spec = read_preprocess(read_bundle(tiny_bundle))
        for found in walked.files:
            result = read_task(ReadTask(found.path, found.size, found.mtime_ns), spec, frozenset())
            on_disk = tmp_path / found.path.split("clipsearch-test/", 1)[1]
            expected = read_one(ReadTask(str(on_disk), found.size, 0), spec)
            assert result.task.path == found.path and result.error is None
            assert (result.content_hash, result.width, result.height) == (expected.content_hash, expected.width,
                                                                          expected.height)
            np.testing.assert_array_equal(result.pixels, expected.pixels)
    finally:
        fs.rm("/clipsearch-test", recursive=True)


def test_ray_adds_an_ivf_index_in_ray_tasks_and_builds_what_the_local_runner_builds(tmp_path, model, ray_instance):
    """With the IVF threshold forced low, the Ray run trains the quantizer on the driver and adds the vectors in
    Ray tasks (one per `index_shard_size` vectors, in Ray worker processes); the index equals a serial build of
    the same vectors with the same trained quantizer, and answers as the local runner's collection does."""
    from clipsearch.store.index.parallel_build import list_content
    from clipsearch.store.index.vectors import VectorIndex

    folder = tmp_path / "photos"
    make_photos(folder, 120)
    options = IndexOptions(batch_size=16, workers=1, ivf_threshold=50)
    local = Collection.create("local", tmp_path / "idx")
    distributed = Collection.create("ray", tmp_path / "idx")
    local_summary = LocalRunner(options).run(local, model, [str(folder)])
    runner = RayRunner(options, RayOptions(concurrency=1, index_shard_size=50))
    summary = runner.run(distributed, model, [str(folder)])
    assert (summary.index_kind, summary.index_update) == (local_summary.index_kind, "rebuild") == ("ivfpq", "rebuild")
    tasks = runner.last_index_tasks
    assert (tasks.tasks, tasks.vectors) == (3, 120)  # 50 + 50 + 20 vectors
    assert tasks.workers and not any(w.endswith(f":{os.getpid()}") for w in tasks.workers)  # Ray workers, not here
    assert distributed.check().ok and distributed.parallel_adds is None

    dim = model.embed_dim
    built = distributed.load_vectors()
    assert built.meta.layout.kind == "ivfpq" and built.meta.trained_on == 120
    serial = VectorIndex.build(distributed.store.iter_vectors(dim), count=120, dim=dim, model_id=model.model_id,
                               generation=distributed.store.generation, ivf_threshold=50,
                               trained=VectorIndex.load_trained(distributed.folder), trained_on=120,
                               workdir=tmp_path / "serial")
    a, b = list_content(serial.index), list_content(built.index)
    for field in ("sizes", "labels", "codes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    np.testing.assert_array_equal(serial._positions_to_ids(), built._positions_to_ids())
    assert (serial.meta.layout.nprobe, serial.meta.layout.refine_factor) == (built.meta.layout.nprobe,
                                                                             built.meta.layout.refine_factor)
    ids, vectors = distributed.store.all_vectors(dim)
    assert serial.search(vectors, 10) == built.search(vectors, 10)

    # the local runner's collection: the same paths get the same neighbours (searching every list) ...
    local_index = local.load_vectors()
    assert local_index.meta.layout.factory == built.meta.layout.factory
    hits, stored = {}, {}
    for name, collection, index in (("local", local, local_index), ("ray", distributed, built)):
        path_of = {collection.store.find_by_path(p).id: p for p in collection.store.file_states()}
        stored[name] = {path: collection.store.vector(i, dim) for i, path in path_of.items()}
        for nprobe in (index.meta.layout.nlist, None):
            found = index.search(vectors, 10, nprobe=nprobe)
            hits[name, nprobe] = [[path_of[i] for i, _ in row] for row in found]
    assert hits["ray", local_index.meta.layout.nlist] == hits["local", local_index.meta.layout.nlist]
    # ... and when the two runs' embeddings agree bit for bit (they do on these machines), the training (a seeded
    # sample, FAISS's fixed k-means seed) gives the same quantizer and the whole index is the local one
    if all(np.array_equal(stored["ray"][path], vector) for path, vector in stored["local"].items()):
        import faiss

        assert bytes(faiss.serialize_index(VectorIndex.load_trained(local.folder))) == bytes(
            faiss.serialize_index(VectorIndex.load_trained(distributed.folder)))
        c = list_content(local_index.index)
        for field in ("sizes", "labels", "codes"):
            np.testing.assert_array_equal(getattr(c, field), getattr(b, field), err_msg=field)
        assert local_index.meta.layout == built.meta.layout
        assert hits["ray", None] == hits["local", None]

    # a few new photos: appended to the index on the driver (no retraining, no add tasks)
    make_photos(folder / "new", 2, start_seed=500)
    again = runner.run(distributed, model, [str(folder)])
    assert (again.added, again.index_update, runner.last_index_tasks.tasks) == (2, "append", 0)
    assert distributed.load_vectors().count == 122 and distributed.check().ok


_SIGTERM_IN_A_RAY_SESSION = """
import os, signal, sys
from clipsearch.indexer.ray_runner import RayOptions, ray_session

class Stopped(Exception):
    pass

def stop(signum, frame):
    raise Stopped(signum)

signal.signal(signal.SIGTERM, stop)  # as `clipsearch index` stops a run on SIGTERM (cli/index_cmds.py)
try:
    with ray_session(RayOptions(address=sys.argv[1])):
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()  # never reached when our handler raised
except Stopped as stopped:
    print("stopped by", stopped.args[0])
"""


def test_a_sigterm_during_a_ray_run_reaches_our_handler_not_rays(ray_instance):
    # ray.init put its own SIGTERM handler in place: `index --ray` then exited 15 with a stack dump, not 143 with
    # "interrupted; run again to finish" after an orderly stop.
    result = subprocess.run([sys.executable, "-c", _SIGTERM_IN_A_RAY_SESSION, ray_instance], capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip() == f"stopped by {int(__import__('signal').SIGTERM)}"
