"""Core tokens (indexer/cores.py): at most `count` takers hold one at once, across processes; a run sharing its
cores this way never runs a decode and an encoder call on the same token at once, stores what a run without tokens
stores, and gets back the token of a decoder that died holding it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from clipsearch.indexer import cores
from clipsearch.indexer.cores import CoreTokens
from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.reader import ParallelReader, ReadTask, StartedDecoders
from clipsearch.indexer.runner import LocalRunner
from clipsearch.model.runtime import ClipModel
from clipsearch.store.collection import Collection
from photo_fixtures import make_photos

# Loaded by the decoder processes only (PYTHONPATH): each file's read + decode is logged as an interval of the
# system-wide monotonic clock, and a process waits as long as the test says for a token.
_DECODER_HOOKS = '''
import os, signal, time
import clipsearch.indexer.cores as cores
import clipsearch.indexer.reader as reader
import clipsearch.model.preprocess as preprocess

cores.TOKEN_WAIT = float(os.environ["CLIPSEARCH_TEST_TOKEN_WAIT"])
_read_image = reader._read_image
_open_image = preprocess.open_image

def logged_read_image(task, spec, known):
    started = time.monotonic()
    try:
        return _read_image(task, spec, known)
    finally:
        with open(os.path.join(os.environ["CLIPSEARCH_TEST_INTERVALS"], f"{os.getpid()}.txt"), "a") as log:
            log.write(f"{started!r} {time.monotonic()!r}\\n")

def open_image(source, *args, **kwargs):
    if isinstance(source, bytes) and source.startswith(b"CRASH-ME"):
        os.kill(os.getpid(), signal.SIGSEGV)  # what a native decoder bug does to the process
    return _open_image(source, *args, **kwargs)

reader._read_image = logged_read_image
preprocess.open_image = open_image
'''


@pytest.fixture()
def decoder_hooks(tmp_path, monkeypatch):
    """Install the hooks above in decoder processes started from now on; returns the folder of their logs."""
    hooks, intervals = tmp_path / "hooks", tmp_path / "intervals"
    hooks.mkdir()
    intervals.mkdir()
    (hooks / "sitecustomize.py").write_text(_DECODER_HOOKS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("CLIPSEARCH_TEST_INTERVALS", str(intervals))
    monkeypatch.setenv("CLIPSEARCH_TEST_TOKEN_WAIT", "120")
    monkeypatch.setattr(cores, "TOKEN_WAIT", 120.0)
    return intervals


def logged_intervals(folder: Path) -> list[tuple[float, float]]:
    found = []
    for log in folder.glob("*.txt"):
        found += [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
    return found


def test_no_more_than_count_takers_hold_a_token_in_any_process_and_a_waiter_wakes_when_one_is_given():
    with CoreTokens(2) as tokens:
        assert tokens.take(0) and tokens.take(0)
        assert tokens.free() == 0
        assert not tokens.take(wait=0.05)  # none came: the caller runs without one

        woke = []
        waiter = threading.Thread(target=lambda: woke.append(tokens.take(wait=60)))
        waiter.start()
        tokens.give()  # the waiter gets this one
        waiter.join(60)
        assert woke == [True] and tokens.free() == 0
        tokens.give()
        tokens.give()
        assert tokens.free() == 2

        # Another process holding the two descriptors takes from the same tokens.
        script = ("import sys; from clipsearch.indexer.cores import CoreTokens; t = CoreTokens.attach(*map(int, "
                  "sys.argv[1:3])); print(t.take(0), flush=True); sys.stdin.readline(); t.give()")
        child = subprocess.Popen([sys.executable, "-c", script, *map(str, tokens.fds)], pass_fds=tokens.fds,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "True"
            assert tokens.free() == 1
            assert tokens.take(0) and not tokens.take(0)
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.wait(60) == 0
        finally:
            child.kill()
        assert tokens.free() == 1  # the child gave its token back; this process holds the other
        tokens.give()
        assert tokens.free() == 2


def test_a_run_on_one_core_token_never_decodes_and_encodes_at_once_and_stores_what_a_run_without_tokens_stores(
        tmp_path, tiny_bundle, decoder_hooks, monkeypatch):
    photos = tmp_path / "photos"
    make_photos(photos, 12)

    plain = Collection.create("plain", tmp_path / "idx")
    plain_model = ClipModel(tiny_bundle, threads=1)
    LocalRunner(IndexOptions(workers=2, encoder_lanes=2, batch_size=4)).run(plain, plain_model, [str(photos)])
    for log in decoder_hooks.glob("*.txt"):
        log.unlink()

    model = ClipModel(tiny_bundle, threads=1)
    encoder_calls: list[tuple[float, float]] = []
    encode_pixels = model.encode_pixels

    def logged_encode(pixels, **options):
        import time

        started = time.monotonic()
        try:
            return encode_pixels(pixels, **options)
        finally:
            encoder_calls.append((started, time.monotonic()))

    monkeypatch.setattr(model, "encode_pixels", logged_encode)
    shared = Collection.create("shared", tmp_path / "idx")
    # Two decoder processes and two encoder lanes, one token: at most one of the four may compute at any time.
    with StartedDecoders(2, core_tokens=1) as decoders:
        summary = LocalRunner(IndexOptions(workers=2, encoder_lanes=2, batch_size=4, share_cores=True),
                              decoders).run(shared, model, [str(photos)])
        assert decoders.core_tokens.free() == 1  # every token taken was given back

    decodes = logged_intervals(decoder_hooks)
    assert summary.embedded == 12 and len(decodes) == 12
    assert len(encoder_calls) >= 3  # 12 images in batches of at most 4
    spans = sorted(decodes + encoder_calls)
    overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
    assert not overlaps

    def vectors(collection):
        return {path: collection.store.vector(state.id, model.embed_dim)
                for path, state in collection.store.file_states().items()}

    expected, got = vectors(plain), vectors(shared)
    assert sorted(expected) == sorted(got)
    for path in expected:
        np.testing.assert_allclose(got[path], expected[path], atol=1e-6)


def test_a_decoder_that_dies_holding_a_core_token_gives_it_back(tmp_path, tiny_bundle, decoder_hooks, monkeypatch):
    # Without the token put back, every later take would wait 5 s in vain and the token would stay lost.
    monkeypatch.setenv("CLIPSEARCH_TEST_TOKEN_WAIT", "5")
    model = ClipModel(tiny_bundle, threads=1)
    paths = make_photos(tmp_path / "p", 9)
    (tmp_path / "p" / "crash.png").write_bytes(b"CRASH-ME" + bytes(100))
    paths.insert(4, tmp_path / "p" / "crash.png")
    tasks = [ReadTask(str(p), p.stat().st_size, 0) for p in paths]
    with CoreTokens(1) as tokens:
        with ParallelReader(model.preprocess, workers=2, chunk_size=3, core_tokens=tokens) as reader:
            results = list(reader.read(tasks))
            assert reader.restarts == 2  # it crashed twice, each time holding the only token
        assert tokens.free() == 1
    assert sorted(r.task.path for r in results) == sorted(map(str, paths))
    assert [os.path.basename(r.task.path) for r in results if r.error] == ["crash.png"]
