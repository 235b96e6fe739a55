"""Encoder lanes (indexer/lanes.py): batches encoded in background threads, several at once, are written in the
order they were made, copies of bytes still being encoded are copied rather than encoded again, and a run with
lanes stores exactly what a serial run stores."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from clipsearch.indexer.lanes import EncoderLanes
from clipsearch.indexer.pipeline import BatchAssembler, IndexOptions, IndexSummary, Writer
from clipsearch.indexer.reader import ReadResult, ReadTask
from clipsearch.indexer.runner import index_paths
from clipsearch.model.runtime import ClipModel
from clipsearch.store.collection import Collection
from clipsearch.store.database import Store
from photo_fixtures import block_image, make_photos

DIM = 4


class GatedMapper:
    """A stand-in encoder whose first call waits for `gate`: vectors are the first pixels of each image."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.sizes: list[int] = []  # images per call, in call order

    def encode_with_tokens(self, images):
        first = not self.sizes
        self.sizes.append(len(images))
        if first:
            assert self.gate.wait(30), "the test never opened the gate"
        vectors = np.stack([img.reshape(-1)[:DIM].astype(np.float32) + 1 for img in images]) if images else \
            np.zeros((0, DIM), np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), [None] * len(images)


def read_result(path: str, content_hash: str, value: int) -> ReadResult:
    pixels = np.arange(12, dtype=np.uint8).reshape(2, 2, 3) + value
    return ReadResult(ReadTask(path, 100 + value, value), content_hash=content_hash, width=2, height=2, pixels=pixels)


@pytest.fixture()
def store(tmp_path):
    with Store(tmp_path / "meta.sqlite") as opened:
        yield opened


def assembler_for(store: Store, mapper: GatedMapper, lanes: EncoderLanes) -> tuple[BatchAssembler, IndexSummary]:
    summary = IndexSummary()
    writer = Writer(store, "m@1", store.next_run_id(), DIM, summary)
    return BatchAssembler(mapper, writer, {}, batch_size=1, lanes=lanes), summary


def test_a_later_batch_that_finishes_first_waits_so_ids_follow_the_reading_order(store):
    mapper = GatedMapper()
    with EncoderLanes(2) as lanes:
        assembler, summary = assembler_for(store, mapper, lanes)
        assembler.add(read_result("/a", "h" * 32, 1))  # batch 1: held at the gate
        assembler.add(read_result("/b", "g" * 32, 2))  # batch 2: encoded at once on the other lane
        assembler.pending[1].encoded.result(timeout=30)  # batch 2 is done, batch 1 still held
        assembler._write_ready(keep=2)
        assert store.count() == 0 and len(assembler.pending) == 2  # nothing overtakes the held batch
        mapper.gate.set()
        assembler.flush()
    assert store.count() == 2 and summary.added == 2
    assert store.find_by_path("/a").id < store.find_by_path("/b").id


def test_a_copy_of_bytes_an_earlier_pending_batch_encodes_is_copied_not_encoded(store):
    mapper = GatedMapper()
    with EncoderLanes(2) as lanes:
        assembler, summary = assembler_for(store, mapper, lanes)
        assembler.add(read_result("/a", "h" * 32, 1))  # held at the gate, so its hash is still pending
        assembler.add(read_result("/copy-of-a", "h" * 32, 1))
        mapper.gate.set()
        assembler.flush()
    assert sum(mapper.sizes) == 1  # the copy never reached the encoder
    assert (summary.added, summary.reused, summary.embedded) == (2 - 1, 1, 1)
    first, copy = store.find_by_path("/a"), store.find_by_path("/copy-of-a")
    np.testing.assert_array_equal(store.vector(first.id, DIM), store.vector(copy.id, DIM))


def test_an_encoder_error_in_a_lane_reaches_the_caller(store):
    class Broken(GatedMapper):
        def encode_with_tokens(self, images):
            raise RuntimeError("graph failed")

    with EncoderLanes(2) as lanes:
        assembler, _ = assembler_for(store, Broken(), lanes)
        with pytest.raises(RuntimeError, match="graph failed"):  # from add() or flush(), whichever writes it
            assembler.add(read_result("/a", "h" * 32, 1))
            assembler.flush()
    assert store.count() == 0


def test_flush_runs_its_side_work_while_the_last_batches_encode_and_writes_them_after(store):
    # The indexing run imports FAISS there (runner.py): after the last batch was handed to a lane, before waiting.
    mapper = GatedMapper()
    seen = []
    with EncoderLanes(2) as lanes:
        assembler, summary = assembler_for(store, mapper, lanes)
        assembler.batch_size = 4
        for i in range(3):
            assembler.add(read_result(f"/{i}", f"{i:032d}", i))

        def side_work():
            seen.append((store.count(), [p.encoded.done() for p in assembler.pending]))
            mapper.gate.set()

        assembler.flush(while_encoding=side_work)
    # It ran once the last (only) batch was in a lane and held at the gate, nothing written yet; flush then wrote it.
    assert len(seen) == 1
    written, done = seen[0]
    assert written == 0 and done == [False]
    assert store.count() == 3 and summary.added == 3


def test_the_last_partial_batch_is_shared_among_the_lanes(store):
    mapper = GatedMapper()
    mapper.gate.set()
    with EncoderLanes(2) as lanes:
        summary = IndexSummary()
        writer = Writer(store, "m@1", store.next_run_id(), DIM, summary)
        assembler = BatchAssembler(mapper, writer, {}, batch_size=32, lanes=lanes)
        for i in range(10):
            assembler.add(read_result(f"/{i}", f"{i:032d}", i))
        assembler.flush()
    assert sorted(mapper.sizes) == [5, 5] and summary.added == 10
    ids = [store.find_by_path(f"/{i}").id for i in range(10)]
    assert ids == sorted(ids)


def test_batches_taper_over_the_last_files_so_the_lanes_finish_together(store):
    # With the run's file count known, the last lanes x batch files go in small batches, so no lane is left
    # encoding a whole batch while the other core waits; without it every batch is full.
    for expected, sizes in ((40, [2] * 8 + [8] * 3), (None, [8] * 5)):
        mapper = GatedMapper()
        mapper.gate.set()
        with EncoderLanes(2) as lanes:
            summary = IndexSummary()
            writer = Writer(store, "m@1", store.next_run_id(), DIM, summary)
            assembler = BatchAssembler(mapper, writer, {}, batch_size=8, lanes=lanes, expected=expected)
            for i in range(40):
                assembler.add(read_result(f"/{expected}/{i}", f"{expected}-{i}".rjust(32, "0"), i))
            assembler.flush()
        assert sorted(mapper.sizes) == sizes and summary.added == 40
        ids = [store.find_by_path(f"/{expected}/{i}").id for i in range(40)]
        assert ids == sorted(ids)


@pytest.fixture(scope="module")
def one_thread_model(tiny_bundle):
    return ClipModel(tiny_bundle, threads=1)


def test_lanes_add_up_the_cpu_time_of_their_calls_apart_from_their_wall_time():
    def burn(seconds: float) -> None:
        started = time.thread_time()
        while time.thread_time() - started < seconds:
            pass

    with EncoderLanes(2) as lanes:
        for future in [lanes.submit(lambda: burn(0.1)), lanes.submit(lambda: time.sleep(0.2))]:
            future.result()
    assert lanes.seconds >= 0.3  # both calls' wall time
    assert 0.1 <= lanes.cpu_seconds < 0.15  # the busy call's CPU; the sleeping one costs next to none


def test_a_run_with_lanes_stores_what_a_serial_run_stores(tmp_path, one_thread_model):
    photos = tmp_path / "photos"
    make_photos(photos, 12)
    for name in ("copy1.png", "copy2.png"):  # a copy in another batch than its original
        block_image(3).save(photos / name)
    stored = {}
    for lanes, batch in ((0, 4), (2, 1), (2, 3)):
        collection = Collection.create(f"lanes{lanes}b{batch}", tmp_path / "idx")
        summary = index_paths(collection, one_thread_model, [str(photos)],
                              IndexOptions(batch_size=batch, workers=1, encoder_lanes=lanes))
        assert (summary.total, summary.embedded + summary.reused) == (14, 14)
        # The encoder calls' own CPU time is reported, inline (0 lanes) as on lane threads, and is part of the run's.
        assert 0 < summary.encode_cpu_seconds <= summary.cpu_seconds, (lanes, batch)
        states = collection.store.file_states()
        stored[(lanes, batch)] = {Path(p).name: (s.id, collection.store.vector(s.id, one_thread_model.embed_dim))
                                  for p, s in states.items()}
        assert collection.check().ok
        collection.close()
    serial = stored[(0, 4)]
    for key, rows in stored.items():
        assert {name: image_id for name, (image_id, _) in rows.items()} == \
            {name: image_id for name, (image_id, _) in serial.items()}, key
        for name, (_, vector) in rows.items():
            np.testing.assert_allclose(vector, serial[name][1], atol=1e-5)
