"""`clipsearch index` and its decoder processes live and die together: SIGKILL of the command leaves no
process of its session behind (none holding its stdout/stderr open), SIGTERM and Ctrl-C stop the run
cleanly with an "interrupted" line and exit 143 / 130, and the next run completes the index."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipsearch.store.collection import Collection
from photo_fixtures import block_image

CLI = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
TOTAL = 800


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    for i in range(TOTAL):
        block_image(7000 + i, size=(48, 48)).save(folder / f"{i:04d}.png")
    return folder


def session_processes(session_id: int) -> list[tuple[int, str, str]]:
    """(pid, state, command line) of every live (non-zombie) process whose session id is `session_id`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read().decode("utf-8", "replace")
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == session_id and fields[0] not in ("Z", "X"):
            found.append((int(entry), fields[0], command.strip()))
    return found


def wait_until_gone(session_id: int, seconds: float = 5.0) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + seconds
    while True:
        left = session_processes(session_id)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def committed(root: Path, name: str) -> int:
    if not (root / name / "meta.sqlite").exists():
        return 0
    try:
        with Collection.open(name, root) as peek:
            return peek.store.count()
    except Exception:  # the database may be mid-creation
        return 0


def index_command(folder: Path, root: Path, name: str, bundle: Path) -> list[str]:
    return [*CLI, "index", str(folder), "--collection", name, "--index-dir", str(root), "--model", str(bundle),
            "--workers", "2", "--threads", "1", "--batch-size", "1", "--json"]


def start_mid_run(command: list[str], env: dict, root: Path, name: str) -> subprocess.Popen:
    """Start an indexing run in its own session and return once it has committed some images
    and its two decoder workers are up."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if committed(root, name) >= 20 and len(session_processes(process.pid)) >= 3:
            return process
        time.sleep(0.02)
    process.kill()
    out, err = process.communicate(timeout=30)
    pytest.fail(f"the run was not caught mid-way (exit {process.returncode}): {err.decode()[-2000:]}")


@pytest.fixture()
def env(tmp_path) -> dict:
    return {**os.environ, "CLIPSEARCH_HOME": str(tmp_path / "home")}


def finish_and_compare(command: list[str], env: dict, root: Path, name: str, interrupted: int) -> None:
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["total"] == TOTAL and summary["skipped"] == []
    assert summary["unchanged"] == interrupted and summary["added"] == TOTAL - interrupted
    with Collection.open(name, root) as collection:
        assert collection.check().ok and collection.store.count() == TOTAL


def test_a_finished_run_leaves_no_process_and_a_closed_database(tmp_path, env, tiny_bundle):
    # `clipsearch index` ends with os._exit once it has returned (no interpreter teardown): everything must be
    # finished by then. Its decoder processes are started before the collection is even opened.
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(12):
        block_image(9000 + i, size=(48, 48)).save(photos / f"{i:02d}.png")
    root = tmp_path / "idx"
    command = [*CLI, "index", str(photos), "--collection", "f", "--index-dir", str(root), "--model", str(tiny_bundle),
               "--workers", "2", "--json"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()
    assert json.loads(out)["added"] == 12
    assert wait_until_gone(process.pid) == []
    assert not list((root / "f").glob("*-wal")) and not list((root / "f").glob("*-journal"))  # closed, checkpointed
    with Collection.open("f", root) as collection:
        assert collection.check().ok and collection.store.count() == 12


@pytest.mark.slow
def test_sigkill_leaves_no_process_behind_and_the_next_run_completes(tmp_path, env, many_photos, tiny_bundle):
    root = tmp_path / "idx"
    command = index_command(many_photos, root, "k", tiny_bundle)
    process = start_mid_run(command, env, root, "k")
    workers = [p for p in session_processes(process.pid) if p[0] != process.pid]
    assert len(workers) >= 2, workers
    process.send_signal(signal.SIGKILL)  # the command only: its children must follow by themselves
    assert wait_until_gone(process.pid) == []
    # Nothing holds the command's stdout/stderr open any more: a supervisor reading them sees EOF.
    process.communicate(timeout=10)
    assert process.returncode == -signal.SIGKILL
    interrupted = committed(root, "k")
    assert 20 <= interrupted < TOTAL
    finish_and_compare(command, env, root, "k", interrupted)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_sigterm_and_ctrl_c_stop_the_run_cleanly(tmp_path, env, many_photos, tiny_bundle, how):
    root = tmp_path / "idx"
    command = index_command(many_photos, root, "t", tiny_bundle)
    process = start_mid_run(command, env, root, "t")
    if how == "SIGTERM":
        process.send_signal(signal.SIGTERM)
        expected_status = 143
    else:  # a terminal sends SIGINT to the whole foreground process group, workers included
        os.killpg(process.pid, signal.SIGINT)
        expected_status = 130
    out, err = process.communicate(timeout=60)
    assert process.returncode == expected_status, err.decode()
    assert "t: interrupted; run again to finish" in err.decode()
    assert "Traceback" not in err.decode() and out == b""
    assert wait_until_gone(process.pid) == []
    with Collection.open("t", root) as collection:
        interrupted = collection.store.count()
        # Stopped like Ctrl-C: what SQLite committed is in the FAISS index too.
        assert collection.check().ok
    assert 20 <= interrupted < TOTAL
    assert f"({interrupted} images indexed so far)" in err.decode()
    finish_and_compare(command, env, root, "t", interrupted)
