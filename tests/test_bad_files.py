"""A corpus of bad files never aborts a run: each is skipped with its reason, good files are indexed,
unicode names survive, and a bad file that gets fixed is picked up by the next run."""

from __future__ import annotations

import io
import os
import sys
import time

import numpy as np
import pytest
from PIL import Image

from clipsearch.collection import Collection
from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.reader import ReadTask, read_one
from clipsearch.indexer.runner import index_paths
from clipsearch.indexer.walk import WalkOptions, walk
from clipsearch.runtime import ClipModel
from photo_fixtures import block_image, bump_mtime, make_photos


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return ClipModel(tiny_bundle, threads=1)


def make_bad_corpus(folder) -> dict[str, str]:
    """Bad files and a fragment of the reason each must be reported with."""
    folder.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    block_image(1, size=(400, 300)).save(good, format="JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image")
    (folder / "random.webp").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    Image.new("1", (20_000, 20_000)).save(folder / "bomb.png")  # 400 MP in a few kB
    header_only = io.BytesIO()
    block_image(2).save(header_only, format="PNG")
    (folder / "cut.png").write_bytes(header_only.getvalue()[:60])
    return {
        "truncated.jpg": "truncated",
        "empty.png": "empty file",
        "text.jpg": "not a recognised image format",
        "random.webp": "not a recognised image format",
        "bomb.png": "decompression bomb",
        "cut.png": "",
    }


def test_bad_files_are_skipped_with_reasons_and_good_ones_indexed(tmp_path, model):
    folder = tmp_path / "photos"
    make_photos(folder, 4)
    expected = make_bad_corpus(folder / "bad")
    collection = Collection.create("c", tmp_path / "idx")
    summary = index_paths(collection, model, [str(folder)], IndexOptions(workers=1, batch_size=2))
    assert summary.total == 4 and summary.added == 4
    reasons = {os.path.basename(s.path): s.reason for s in summary.skipped}
    assert set(reasons) == set(expected)
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])
        assert reasons[name]
    assert collection.check().ok

    # Unchanged bad files are reported again without being decoded; a fixed one is indexed.
    again = index_paths(collection, model, [str(folder)], IndexOptions(workers=0))
    assert {os.path.basename(s.path) for s in again.skipped} == set(expected) and again.embedded == 0
    block_image(77).save(folder / "bad" / "cut.png")
    bump_mtime(folder / "bad" / "cut.png")
    fixed = index_paths(collection, model, [str(folder)], IndexOptions(workers=0))
    assert fixed.added == 1 and fixed.total == 5 and "cut.png" not in {os.path.basename(s.path) for s in fixed.skipped}


def test_a_file_that_turns_bad_leaves_the_index(tmp_path, model):
    folder = tmp_path / "photos"
    paths = make_photos(folder, 3)
    collection = Collection.create("c", tmp_path / "idx")
    index_paths(collection, model, [str(folder)], IndexOptions(workers=0))
    paths[0].write_bytes(b"overwritten with junk")
    summary = index_paths(collection, model, [str(folder)], IndexOptions(workers=0))
    assert summary.total == 2 and [os.path.basename(s.path) for s in summary.skipped] == [paths[0].name]
    assert collection.check().ok


def test_unicode_names_are_indexed_and_undecodable_names_skipped(tmp_path, model):
    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["plage été.jpg", "猫の写真.png", "🐶 dog.png", "Ελλάδα.webp"]
    for i, name in enumerate(names):
        block_image(300 + i).save(folder / name)
    raw = os.fsencode(str(folder)) + b"/bad-\xff-name.png"
    with open(raw, "wb") as handle:
        block_image(9).save(handle, format="PNG")
    collection = Collection.create("c", tmp_path / "idx")
    summary = index_paths(collection, model, [str(folder)], IndexOptions(workers=1))
    assert summary.total == 4
    assert {os.path.basename(p) for p in collection.store.file_states()} == set(names)
    assert [s.reason for s in summary.skipped] == ["file name is not valid UTF-8"]


def test_heic_gif_bmp_tiff_and_exif_orientation(tmp_path, model):
    folder = tmp_path / "formats"
    folder.mkdir()
    frames = [block_image(10 + i, size=(80, 60)) for i in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    block_image(20).save(folder / "a.bmp")
    block_image(21).save(folder / "a.tiff")
    block_image(22).save(folder / "a.webp")
    exif = Image.Exif()
    exif[274] = 6  # rotate 90°: stored 160x120, displayed 120x160
    exif.get_ifd(0x8769)[36867] = "2021:06:05 14:03:02"
    block_image(23).save(folder / "camera.jpg", exif=exif.tobytes())
    import pillow_heif

    pillow_heif.register_heif_opener()
    block_image(24).save(folder / "phone.heic")
    collection = Collection.create("c", tmp_path / "idx")
    summary = index_paths(collection, model, [str(folder)], IndexOptions(workers=1))
    assert summary.skipped == [] and summary.total == 6
    camera = collection.store.find_by_path(str(folder / "camera.jpg"))
    assert (camera.width, camera.height, camera.taken_at) == (120, 160, "2021-06-05T14:03:02")
    gif = collection.store.find_by_path(str(folder / "anim.gif"))
    expected = model.encode_images([frames[0].convert("RGB")])[0]
    assert float(collection.store.vector(gif.id, model.embed_dim) @ expected) > 0.99


def test_reader_reports_files_that_vanish_or_are_directories(tmp_path, model):
    gone = read_one(ReadTask(str(tmp_path / "gone.jpg"), 10, 0), model.preprocess)
    assert gone.error == "file disappeared while indexing"
    (tmp_path / "dir.jpg").mkdir()
    assert read_one(ReadTask(str(tmp_path / "dir.jpg"), 0, 0), model.preprocess).error == "is a directory"


def test_walk_reports_missing_roots_and_honours_excludes(tmp_path):
    make_photos(tmp_path / "p", 4)
    (tmp_path / "p" / "node_modules").mkdir()
    block_image(1).save(tmp_path / "p" / "node_modules" / "x.png")
    result = walk([tmp_path / "p", tmp_path / "missing"], WalkOptions(exclude=("sub",)))
    assert len(result.files) == 2 and result.problems == [(str(tmp_path / "missing"), "no such file or folder")]
    single = walk([tmp_path / "p" / "photo_000.png"])
    assert [f.path for f in single.files] == [str(tmp_path / "p" / "photo_000.png")]
    assert sys.platform != "win32"


def test_a_crashed_decoder_process_is_replaced_and_no_file_is_lost(tmp_path, model):
    import signal

    from clipsearch.indexer.reader import ParallelReader

    paths = make_photos(tmp_path / "p", 12)
    tasks = [ReadTask(str(p), p.stat().st_size, 0) for p in paths]
    results = []
    started = time.monotonic()
    with ParallelReader(model.preprocess, workers=1, chunk_size=2, window=4) as reader:
        first_pids = reader.worker_pids()
        for result in reader.read(tasks):
            if not results:  # kill the decoder process as if a native plugin had crashed it
                for pid in reader.worker_pids():
                    os.kill(pid, signal.SIGKILL)
            results.append(result)
        assert reader.restarts == 1 and reader.worker_pids() != first_pids  # the dead worker was replaced
    assert time.monotonic() - started < 60  # no hang waiting on a dead process
    assert sorted(r.task.path for r in results) == sorted(map(str, paths))
    assert [r.error for r in results if r.error] == []
    assert all(r.pixels is not None and r.pixels.shape[:2] == model.preprocess.size for r in results)
    for pid in first_pids:  # reaped, not a zombie
        assert not os.path.exists(f"/proc/{pid}")
