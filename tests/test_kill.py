"""SIGKILL at random (seeded) moments of `clipsearch index`, several times, then a final run: the end state
equals a clean run's on the same folder (paths, count, `clipsearch check`, search results), and no killed
run leaves a process behind."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipsearch.store.collection import Collection
from photo_fixtures import block_image
from test_processes import session_processes, wait_until_gone

CLI = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
TOTAL = 600
KILLS = 3
QUERY = "a red square on a blue background"


def _command(folder: Path, root: Path, name: str, bundle: Path) -> list[str]:
    return [*CLI, "index", str(folder), "--collection", name, "--index-dir", str(root), "--model", str(bundle),
            "--workers", "2", "--threads", "1", "--batch-size", "2", "--json"]


def _state(root: Path, name: str, env: dict) -> tuple[set[str], int, list[tuple[str, float]]]:
    with Collection.open(name, root) as collection:
        report = collection.check()
        assert report.ok, report.problems
        paths = set(collection.store.file_states())
        count = collection.store.count()
    search = subprocess.run([*CLI, "search", QUERY, "-k", "10", "--json", "--collection", name,
                             "--index-dir", str(root)], env=env, capture_output=True, text=True, timeout=300)
    assert search.returncode == 0, search.stderr
    hits = [(hit["path"], hit["score"]) for hit in json.loads(search.stdout)]
    return paths, count, hits


def _committed(root: Path, name: str) -> int:
    try:
        with Collection.open(name, root) as peek:
            return peek.store.count()
    except Exception:  # not created yet, or mid-creation
        return 0


@pytest.mark.slow
def test_random_sigkills_then_a_final_run_equal_a_clean_run(tmp_path, tiny_bundle):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(TOTAL):
        block_image(9000 + i, size=(48, 48)).save(folder / f"{i:04d}.png")
    root = tmp_path / "idx"
    env = {**os.environ, "CLIPSEARCH_HOME": str(tmp_path / "home")}

    clean = subprocess.run(_command(folder, root, "clean", tiny_bundle), env=env, capture_output=True, text=True,
                           timeout=600)
    assert clean.returncode == 0, clean.stderr
    expected = _state(root, "clean", env)
    assert expected[1] == TOTAL

    # Kill moments (seeded): one during start-up (model loading, walking), two at random points of the
    # writing (a random share of the images still to do), one as the last batch lands (sweep, FAISS save).
    rng = random.Random(8)
    # Shares stay at most half of what is left: the watcher sees progress some batches late (tens of images on
    # a busy machine), and a kill aimed near the end would land after the run had finished.
    moments = [("seconds", rng.uniform(0.2, 1.0)), ("share", rng.uniform(0.1, 0.5)),
               ("share", rng.uniform(0.1, 0.5)), ("share", 1.0)]
    command = _command(folder, root, "killed", tiny_bundle)
    kills, partial_states = 0, []
    for kind, value in moments:
        before = _committed(root, "killed")
        # The indexer runs at the lowest CPU priority, so that on a busy machine this process still sees its
        # progress in time and the kill lands at the intended moment instead of after the run has finished.
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True, preexec_fn=lambda: os.nice(19))
        if kind == "seconds":
            time.sleep(value)
        else:
            target = before + max(1, round(value * (TOTAL - before)))
            deadline = time.monotonic() + 300
            while process.poll() is None and _committed(root, "killed") < target and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.05))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.communicate(timeout=30)  # returns only once nothing holds its pipes
        assert wait_until_gone(process.pid) == [], session_processes(process.pid)
        count = _committed(root, "killed")
        if 0 < count < TOTAL:
            partial_states.append(count)
    assert kills >= 3, f"only {kills} runs were still going at their kill moment"
    assert len(partial_states) >= 2, partial_states

    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    summary = json.loads(final.stdout)
    assert summary["total"] == TOTAL and summary["skipped"] == []

    paths, count, hits = _state(root, "killed", env)
    assert (paths, count) == (expected[0], expected[1])
    assert [p for p, _ in hits] == [p for p, _ in expected[2]]
    assert [s for _, s in hits] == pytest.approx([s for _, s in expected[2]], abs=1e-5)
