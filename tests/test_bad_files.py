"""A corpus of bad files never aborts a run: each is skipped with its reason, good files are indexed,
unicode names survive, and a bad file that gets fixed is picked up by the next run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from clipsearch.store.collection import Collection
from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.reader import ReadTask, read_one
from clipsearch.indexer.runner import index_paths
from clipsearch.indexer.walk import WalkOptions, walk
from clipsearch.model.runtime import ClipModel
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
    assert summary.skipped[0].path == str(folder) + "/bad-\\xff-name.png"  # escaped, not "bad-?-name.png"


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


def test_decoders_started_ahead_are_adopted_by_the_reader_and_known_hashes_still_apply(tmp_path, model):
    # `clipsearch index` starts its decoder processes before its imports and walk; the reader then uses those
    # very processes, and the settings it sends them afterwards (here: a known hash) are the ones they apply.
    from clipsearch.indexer.reader import ParallelReader, StartedDecoders

    paths = make_photos(tmp_path / "p", 6)
    tasks = [ReadTask(str(p), p.stat().st_size, 0) for p in paths]
    known = read_one(tasks[0], model.preprocess).content_hash
    with StartedDecoders(workers=3) as started:
        pids = started.worker_pids()
        assert len(pids) == 3
        with ParallelReader(model.preprocess, [known], workers=2, chunk_size=2, started=started) as reader:
            assert reader.worker_pids() == pids[:2] and started.worker_pids() == []  # the third was not wanted: stopped
            by_path = {r.task.path: r for r in reader.read(tasks)}
            assert reader.worker_pids() == pids[:2] and reader.restarts == 0
    assert by_path[tasks[0].path].known and by_path[tasks[0].path].pixels is None
    for task in tasks[1:]:
        np.testing.assert_array_equal(by_path[task.path].pixels, read_one(task, model.preprocess).pixels)
    for pid in pids:  # all ended and reaped
        assert not os.path.exists(f"/proc/{pid}")


def test_decoders_started_ahead_and_never_used_are_stopped(tmp_path):
    from clipsearch.indexer.reader import StartedDecoders

    with StartedDecoders(workers=2) as started:
        pids = started.worker_pids()
        assert len(pids) == 2 and all(os.path.exists(f"/proc/{pid}") for pid in pids)
    assert started.worker_pids() == []
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")
    with StartedDecoders(workers=0) as none:  # --workers 0 decodes in the calling process: nothing to start
        assert none.worker_pids() == []


def test_decoder_processes_give_what_read_one_gives_in_this_process(tmp_path, model):
    from clipsearch.indexer.reader import ParallelReader

    paths = make_photos(tmp_path / "p", 5)
    exif = Image.Exif()
    exif[274], exif[306] = 6, "2021:03:04 05:06:07"  # rotated 90 degrees, with a capture time
    block_image(4, size=(80, 40)).save(tmp_path / "p" / "rotated.jpg", exif=exif)
    paths.append(tmp_path / "p" / "rotated.jpg")
    tasks = [ReadTask(str(p), p.stat().st_size, 0) for p in paths]
    with ParallelReader(model.preprocess, workers=2, chunk_size=2) as reader:
        by_path = {r.task.path: r for r in reader.read(tasks)}
    for task in tasks:
        local, remote = read_one(task, model.preprocess), by_path[task.path]
        assert remote.error is None and remote.pixels.dtype == np.uint8
        assert remote.pixels.shape == (*model.preprocess.size, 3)
        np.testing.assert_array_equal(remote.pixels, local.pixels)
        assert (remote.content_hash, remote.width, remote.height, remote.taken_at) == \
            (local.content_hash, local.width, local.height, local.taken_at)
    assert (by_path[tasks[-1].path].width, by_path[tasks[-1].path].height) == (40, 80)
    assert by_path[tasks[-1].path].taken_at == "2021-03-04T05:06:07"


def test_an_exif_time_that_is_no_real_time_is_not_stored(tmp_path, model):
    # Dates are compared as text: '2024-13-45T99:00:00' would pass `--after 2024-12-01`, and a camera's
    # '2024:00:00 00:00:00' fail `--after 2024`. Such a time is skipped for the next one EXIF holds, else the
    # date filters use the file's mtime.
    folder = tmp_path / "p"
    folder.mkdir()
    cases = {"month-13.jpg": ("2024:13:45 99:00:00", None, None),
             "unset.jpg": ("2024:00:00 00:00:00", None, None),
             "fallback.jpg": ("2024:02:30 10:00:00", "2023:07:14 18:02:11", "2023-07-14T18:02:11"),
             "leap-day.jpg": ("2024:02:29 23:59:59", None, "2024-02-29T23:59:59")}
    for name, (original, plain, _) in cases.items():
        exif = Image.Exif()
        exif.get_ifd(0x8769)[36867] = original  # DateTimeOriginal
        if plain:
            exif[306] = plain  # DateTime
        block_image(3, size=(40, 30)).save(folder / name, exif=exif)
    for name, (_, _, expected) in cases.items():
        path = folder / name
        assert read_one(ReadTask(str(path), path.stat().st_size, 0), model.preprocess).taken_at == expected, name


def test_a_decoder_process_decodes_without_importing_numpy(tmp_path, model):
    # Workers import Pillow only (numpy would double each worker's start-up): decode a photo the way a worker
    # does, in a fresh interpreter, and look at what got imported.
    import subprocess

    path = make_photos(tmp_path / "p", 1)[0]
    code = ("import sys; from clipsearch.indexer.reader import ReadTask, _Decoded, _read_image; "
            "from clipsearch.model.bundle import read_bundle, read_preprocess; "
            f"spec = read_preprocess(read_bundle({str(model.info.path)!r})); "
            f"result, image = _read_image(ReadTask({str(path)!r}, {path.stat().st_size}, 0), spec, frozenset()); "
            "message = _Decoded.wrap(result, image); "
            "print(result.error, len(message.raw), message.width, message.height, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    height, width = model.preprocess.size
    assert out.stdout.split() == ["None", str(width * height * 3), str(width), str(height), "False"]


# --- Big photos: the project's pixel limit, not Pillow's 89.5 MP default ------------------------------

def _camera_jpeg(width: int, height: int) -> bytes:
    """A big JPEG made cheaply: colour blocks scaled up with NEAREST, low quality (~1.6 MB at 100 MP)."""
    blocks = Image.fromarray(np.random.default_rng(5).integers(0, 256, (6, 8, 3), dtype=np.uint8))
    out = io.BytesIO()
    blocks.resize((width, height), Image.Resampling.NEAREST).save(out, format="JPEG", quality=10)
    return out.getvalue()


def _jpeg_claiming_size(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF header claims `width` x `height` (refused before any pixel is decoded)."""
    out = io.BytesIO()
    block_image(3, size=(16, 16)).save(out, format="JPEG")
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_a_100_megapixel_camera_jpeg_is_indexed_and_one_over_the_limit_is_skipped(tmp_path, model):
    from clipsearch.model.preprocess import MAX_IMAGE_PIXELS

    assert MAX_IMAGE_PIXELS >= 200_000_000
    pillow_default = Image.MAX_IMAGE_PIXELS
    folder = tmp_path / "camera"
    folder.mkdir()
    (folder / "medium-format.jpg").write_bytes(_camera_jpeg(12000, 8400))
    over = 20000 * 12600  # 252 MP
    assert over > MAX_IMAGE_PIXELS
    (folder / "too-big.jpg").write_bytes(_jpeg_claiming_size(20000, 12600))
    collection = Collection.create("c", tmp_path / "idx")
    summary = index_paths(collection, model, [str(folder)], IndexOptions(workers=1))
    assert summary.total == 1 and summary.added == 1
    record = collection.store.find_by_path(str(folder / "medium-format.jpg"))
    assert (record.width, record.height) == (12000, 8400)
    [skipped] = summary.skipped
    assert skipped.path == str(folder / "too-big.jpg")
    assert skipped.reason == ("20000x12600 is 252.0 megapixels, more than the 250-megapixel limit "
                              "(refused as a possible decompression bomb)")
    # Pillow's own limit is untouched for code outside open_image.
    assert Image.MAX_IMAGE_PIXELS == pillow_default
    with pytest.raises(Image.DecompressionBombError):
        Image.open(folder / "too-big.jpg")


# --- 16-bit images: native depth, bounded memory ------------------------------------------------------

def test_16_bit_values_are_scaled_full_range():
    from clipsearch.model.preprocess import open_image

    out = io.BytesIO()
    Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16)).save(out, format="PNG")
    assert Image.open(io.BytesIO(out.getvalue())).mode == "I;16"
    rgb = np.asarray(open_image(out.getvalue()))
    assert rgb.tolist() == [[[0, 0, 0], [1, 1, 1], [128, 128, 128], [255, 255, 255]]]


_RSS_PROBE = r"""
import json, resource, sys
from clipsearch.model.bundle import PreprocessSpec
from clipsearch.indexer.reader import ReadTask, read_one
from clipsearch.model.preprocess import open_image
open_image(sys.argv[2])  # warm up: Pillow plugins and numpy code paths loaded before the baseline
path = sys.argv[1]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = read_one(ReadTask(path, 0, 0), PreprocessSpec(size=(224, 224)))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pixels = result.pixels
print(json.dumps({"growth_mb": (after - before) / 1024, "error": result.error, "size": [result.width, result.height],
                  "top": pixels[5, 112].tolist(), "bottom": pixels[218, 112].tolist()}))
"""


@pytest.mark.slow
def test_a_9400px_16_bit_png_decodes_in_bounded_memory(tmp_path):
    import json
    import subprocess

    values = np.full((9400, 9400), 65535, dtype=np.uint16)
    values[4700:] = 32896  # bottom half: mid grey
    Image.fromarray(values).save(tmp_path / "scan.png")
    del values
    assert (tmp_path / "scan.png").stat().st_size < 400_000  # a few hundred kB on disk, 88 MP, 16 bits each
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint16)).save(small)
    probe = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(tmp_path / "scan.png"), str(small)],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout)
    assert report["error"] is None and report["size"] == [9400, 9400]
    assert report["top"] == [255, 255, 255] and report["bottom"] == [128, 128, 128]
    # The decoded 16-bit image itself is 177 MB; the float64 conversion this replaced grew RSS by ~1.8 GB.
    assert report["growth_mb"] < 300, report


# --- Non-regular files: refused before they are opened, reported with a reason ------------------------

def _within(seconds: float, function, unblock: str | None = None):
    """Run `function` in a thread; fail (instead of hanging the suite) if it does not return in time."""
    import threading

    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if unblock:  # let a reader blocked on the FIFO go
            os.close(os.open(unblock, os.O_RDWR | os.O_NONBLOCK))
        pytest.fail(f"{function} did not return within {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _special_files(folder) -> dict[str, str]:
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "pipe.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "socket.png"))
    server.close()
    os.symlink("/dev/null", folder / "device.jpg")
    os.symlink("gone.jpg", folder / "dangling.jpg")
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.mkfifo(folder / "notes.txt")  # not an image name: ignored like any other non-image file
    return {"pipe.jpg": "not a regular file (fifo)", "socket.png": "not a regular file (socket)",
            "device.jpg": "not a regular file (character device)", "dangling.jpg": "dangling symlink",
            "loop.jpg": "symlink loop"}


def test_walk_reports_fifos_sockets_devices_and_broken_symlinks(tmp_path):
    expected = _special_files(tmp_path / "p")
    make_photos(tmp_path / "p", 2)
    result = _within(30, lambda: walk([tmp_path / "p"]))
    assert sorted(os.path.basename(f.path) for f in result.files) == ["photo_000.png", "photo_001.jpg"]
    assert {os.path.basename(p): r for p, r in result.problems} == expected
    # The same entries given as roots.
    roots = [tmp_path / "p" / name for name in expected]
    as_roots = _within(30, lambda: walk(roots))
    assert {os.path.basename(p): r for p, r in as_roots.problems} == expected and as_roots.files == []


def test_index_skips_special_files_with_reasons_and_does_not_hang(tmp_path, model):
    expected = _special_files(tmp_path / "p")
    make_photos(tmp_path / "p", 3)
    collection = Collection.create("c", tmp_path / "idx")
    summary = _within(120, lambda: index_paths(collection, model, [str(tmp_path / "p")], IndexOptions(workers=1)),
                      unblock=str(tmp_path / "p" / "pipe.jpg"))
    assert summary.total == 3
    assert {os.path.basename(s.path): s.reason for s in summary.skipped} == expected
    assert collection.check().ok


def test_open_image_and_the_reader_refuse_a_fifo_without_blocking(tmp_path, model):
    from clipsearch.errors import ImageError
    from clipsearch.model.preprocess import open_image, read_image_file

    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)  # e.g. a file replaced by a FIFO after the walk saw a regular file
    for function in (open_image, read_image_file):
        with pytest.raises(ImageError, match=r"swapped\.jpg: not a regular file \(fifo\)"):
            _within(10, lambda: function(fifo), unblock=str(fifo))
    result = _within(10, lambda: read_one(ReadTask(str(fifo), 10, 0), model.preprocess), unblock=str(fifo))
    assert result.error == "not a regular file (fifo)"
    os.symlink("nowhere.jpg", tmp_path / "dangling.jpg")
    with pytest.raises(ImageError, match="dangling symlink"):
        open_image(tmp_path / "dangling.jpg")


# --- Decoder workers that crash on a file or get stuck ------------------------------------------------

_CRASHING_DECODER = '''
import os, signal
import clipsearch.model.preprocess as preprocess

_open_image = preprocess.open_image

def open_image(source, *args, **kwargs):
    if isinstance(source, bytes) and source.startswith(b"CRASH-ME"):
        os.kill(os.getpid(), signal.SIGSEGV)  # what a native decoder bug does to the process
    return _open_image(source, *args, **kwargs)

preprocess.open_image = open_image
'''


def test_a_file_that_crashes_the_decoder_is_skipped_and_every_other_file_read(tmp_path, model, monkeypatch):
    from clipsearch.indexer.reader import ParallelReader

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_CRASHING_DECODER)  # loaded by the worker processes only
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])))
    paths = make_photos(tmp_path / "p", 9)
    (tmp_path / "p" / "crash.png").write_bytes(b"CRASH-ME" + bytes(100))
    paths.insert(4, tmp_path / "p" / "crash.png")
    tasks = [ReadTask(str(p), p.stat().st_size, 0) for p in paths]
    started = time.monotonic()
    with ParallelReader(model.preprocess, workers=2, chunk_size=3) as reader:
        results = list(reader.read(tasks))
        assert reader.restarts == 2  # tried twice, in two fresh workers, before it is blamed
    assert time.monotonic() - started < 60
    assert sorted(r.task.path for r in results) == sorted(map(str, paths))
    errors = {os.path.basename(r.task.path): r.error for r in results if r.error}
    assert errors == {"crash.png": "the image decoder crashed on this file"}

    collection = Collection.create("c", tmp_path / "idx")
    summary = index_paths(collection, model, [str(tmp_path / "p")], IndexOptions(workers=1, chunk_size=4))
    assert summary.total == 9 and [(os.path.basename(s.path), s.reason) for s in summary.skipped] == [
        ("crash.png", "the image decoder crashed on this file")]
    assert collection.check().ok


def test_classify_of_a_folder_survives_a_file_that_crashes_the_decoder(tmp_path, tiny_bundle):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_CRASHING_DECODER)  # a native decoder bug, in every process started
    made = make_photos(tmp_path / "p", 5)
    (tmp_path / "p" / "crash.png").write_bytes(b"CRASH-ME" + bytes(100))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", "from clipsearch.cli import main; main()", "classify",
                             str(tmp_path / "p"), "--labels", "cat,dog", "--model", str(tiny_bundle), "--json"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    classified = sorted(os.path.basename(r["path"]) for r in json.loads(result.stdout))
    assert classified == sorted(p.name for p in made)
    assert f"skipped {tmp_path / 'p' / 'crash.png'}: the image decoder crashed on this file" in result.stderr


def test_a_stuck_decoder_is_replaced_after_the_file_timeout(tmp_path, model):
    import signal

    from clipsearch.indexer.reader import ParallelReader

    paths = make_photos(tmp_path / "p", 8)
    tasks = [ReadTask(str(p), p.stat().st_size, 0) for p in paths]
    results = []
    started = time.monotonic()
    with ParallelReader(model.preprocess, workers=1, chunk_size=2, file_timeout=2) as reader:
        stopped = []
        for result in reader.read(tasks):
            if not results:  # freeze the worker mid-run, as a decoder stuck in an endless loop would be
                stopped = reader.worker_pids()
                os.kill(stopped[0], signal.SIGSTOP)
            results.append(result)
        assert reader.restarts == 1 and reader.worker_pids() != stopped
    assert time.monotonic() - started < 60
    assert sorted(r.task.path for r in results) == sorted(map(str, paths))
    assert [r.error for r in results if r.error] == []  # the file it held was read by the new worker
    assert not os.path.exists(f"/proc/{stopped[0]}")


def test_files_are_read_whole_up_to_one_byte_past_the_limit_even_when_they_grow(tmp_path):
    from clipsearch.model.preprocess import read_at_most

    path = tmp_path / "photo.bin"
    path.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes
    with open(path, "rb") as handle:
        assert read_at_most(handle, 1_000_000) == path.read_bytes()
    with open(path, "rb") as handle:
        assert len(read_at_most(handle, 1000)) == 1001  # one past the limit: the caller refuses it as too large
    assert read_at_most(io.BytesIO(b"abc"), 10) == b"abc"  # no file descriptor: read to the limit

    class Grown:
        """A file that grew after it was measured: fstat reports the first 100 bytes only."""

        def __init__(self, handle, measured) -> None:
            self.handle, self.measured = handle, measured

        def fileno(self) -> int:
            return self.measured.fileno()

        def read(self, size: int) -> bytes:
            return self.handle.read(size)

    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 100)
    with open(path, "rb") as handle, open(small, "rb") as measured:
        assert read_at_most(Grown(handle, measured), 1_000_000) == path.read_bytes()
    with open(path, "rb") as handle, open(small, "rb") as measured:
        assert len(read_at_most(Grown(handle, measured), 5000)) == 5001
