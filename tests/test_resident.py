"""The resident search helper: it starts itself after an in-process search, answers exactly what the in-process
search answers, follows every change to the collection, stays private to the user, exits when idle, and any
failure of it falls back to the in-process search."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from clipsearch.errors import QueryError
from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.runner import index_paths
from clipsearch.model.runtime import ClipModel
from clipsearch.query import SearchQuery
from clipsearch.resident import client, protocol
from clipsearch.search import Searcher
from clipsearch.store.collection import Collection
from photo_fixtures import block_image, make_photos

CLI = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
pytestmark = pytest.mark.skipif(os.name != "posix", reason="the helper listens on a Unix socket")


@pytest.fixture()
def run_dir(monkeypatch):
    """Helpers on, with their sockets in a fresh private folder (short: AF_UNIX paths are limited); every helper
    started in the test is stopped (its socket removed) and waited for."""
    run = Path(tempfile.mkdtemp(prefix="cs-run-"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    monkeypatch.setenv("CLIPSEARCH_HELPER", "1")
    monkeypatch.setenv("CLIPSEARCH_HELPER_IDLE", "120")
    yield run
    locks = list(run.glob("clipsearch/*.lock"))
    for sock in run.glob("clipsearch/*.sock"):
        sock.unlink()
    for lock in locks:
        assert _lock_released(lock, timeout=30), f"a helper did not exit after its socket was removed: {lock}"
    shutil.rmtree(run, ignore_errors=True)


def _lock_released(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with open(path, "a+") as f:
        while time.monotonic() < deadline:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                time.sleep(0.1)
    return False


def _wait_listening(timeout: float = 60) -> protocol.HelperAddress:
    where = protocol.address()
    assert where is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client._listening(where.socket_path):
            return where
        time.sleep(0.1)
    raise AssertionError("no helper started listening")


@pytest.fixture()
def indexed(tmp_path, tiny_bundle):
    folder = tmp_path / "photos"
    make_photos(folder, 12)
    model = ClipModel(tiny_bundle, threads=1)
    collection = Collection.create("s", tmp_path / "idx")
    index_paths(collection, model, [str(folder)], IndexOptions(batch_size=8, workers=0))
    collection.close()
    return tmp_path / "idx", folder, model


def _cli_json(root: Path, *args: str) -> list[dict]:
    result = subprocess.run([*CLI, "search", *args, "--collection", "s", "--index-dir", str(root), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _in_process(root: Path, query: SearchQuery) -> list:
    with Searcher.open("s", root) as searcher:
        return searcher.search(query)


def test_a_search_starts_a_helper_that_answers_the_same_hits(run_dir, indexed):
    root, folder, _ = indexed
    first = _cli_json(root, "a red square", "-k", "5")  # in-process; starts the helper for next time
    where = _wait_listening()
    assert stat.S_IMODE(os.stat(where.socket_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(where.socket_path.parent).st_mode) == 0o700
    query = SearchQuery.build(text="a red square", k=5)
    answer = client.ask("s", root, query)
    assert answer is not None, "the helper did not answer"
    assert [h.to_dict() for h in answer.hits] == [h.to_dict() for h in _in_process(root, query)]
    assert [(h.id, h.path, h.score) for h in answer.hits] == [(r["id"], r["path"], r["score"]) for r in first]
    again = _cli_json(root, "a red square", "-k", "5")  # now through the helper: the same output
    assert again == first
    image = SearchQuery.build(image=str(folder / "photo_000.png"), k=3)
    by_image = client.ask("s", root, image)
    assert by_image is not None and [h.to_dict() for h in by_image.hits] == [h.to_dict() for h in _in_process(root, image)]


def test_the_helper_follows_new_deleted_and_replaced_images_and_a_recreated_collection(run_dir, indexed, tiny_bundle):
    root, folder, model = indexed
    _cli_json(root, "x", "-k", "3")
    _wait_listening()
    query = SearchQuery.build(text="x", k=100)
    before = client.ask("s", root, query)
    assert before is not None and len(before.hits) == 12

    block_image(4242).save(folder / "new.png")
    index_paths(Collection.open("s", root), model, [str(folder)], IndexOptions(workers=0))
    after_add = client.ask("s", root, query)
    assert after_add is not None and str(folder / "new.png") in {h.path for h in after_add.hits}
    assert [h.to_dict() for h in after_add.hits] == [h.to_dict() for h in _in_process(root, query)]

    (folder / "new.png").unlink()
    index_paths(Collection.open("s", root), model, [str(folder)], IndexOptions(workers=0))
    after_delete = client.ask("s", root, query)
    assert after_delete is not None and len(after_delete.hits) == 12
    assert str(folder / "new.png") not in {h.path for h in after_delete.hits}

    # the collection removed and built again under the same name from other photos: new database file
    shutil.rmtree(root / "s")
    other = folder.parent / "other"
    make_photos(other, 3, start_seed=100)
    index_paths(Collection.create("s", root), model, [str(other)], IndexOptions(workers=0))
    recreated = client.ask("s", root, query)
    assert recreated is not None
    assert sorted(h.path for h in recreated.hits) == sorted(h.path for h in _in_process(root, query))
    assert len(recreated.hits) == 3


def test_a_preload_that_ends_after_the_collection_was_made_again_does_not_pass_it_off_as_current(indexed,
                                                                                                  monkeypatch):
    """The helper preloads beside its accept loop. If the collection is deleted and made again while the preload
    still loads the model, the preload must not record the new database's identity for its old searcher (which
    would then answer from the deleted database for good)."""
    from clipsearch.model.runtime import OnnxSession
    from clipsearch.resident.helper import Helper

    root, folder, model = indexed
    helper = Helper(Path("/nonexistent.sock"), 120)
    loading, release = threading.Event(), threading.Event()
    real_prepare = OnnxSession.run_prepare

    def held_prepare(self):
        if not loading.is_set():
            loading.set()
            assert release.wait(60)
        return real_prepare(self)

    monkeypatch.setattr(OnnxSession, "run_prepare", held_prepare)
    preloading = threading.Thread(target=helper.preload, args=("s", str(root)))
    preloading.start()
    try:
        assert loading.wait(60)
        old = helper._kept[("s", str(root))].searcher
        shutil.rmtree(root / "s")  # deleted and made again from other photos while the model loads
        other = folder.parent / "other"
        make_photos(other, 3, start_seed=100)
        index_paths(Collection.create("s", root), model, [str(other)], IndexOptions(workers=0))
    finally:
        release.set()
        preloading.join(60)
    entry = helper.kept("s", str(root))
    assert entry.searcher is not old
    hits = entry.searcher.search(SearchQuery.build(text="x", k=100))
    assert sorted(h.path for h in hits) == sorted(str(p) for p in other.rglob("*") if p.is_file())
    entry.searcher.close()


def test_errors_from_the_helper_are_the_in_process_errors(run_dir, indexed):
    root, _, _ = indexed
    _cli_json(root, "x", "-k", "1")
    _wait_listening()
    query = SearchQuery.build(like=987654, k=3)
    with pytest.raises(QueryError) as in_process:
        _in_process(root, query)
    with pytest.raises(QueryError) as resident:
        client.ask("s", root, query)
    assert resident.value.message == in_process.value.message
    result = subprocess.run([*CLI, "search", "--like", "987654", "--collection", "s", "--index-dir", str(root)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "no indexed image with id 987654" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_broken_helper_falls_back_to_the_in_process_search(run_dir, indexed):
    """Something that answers garbage on the helper's socket: the CLI still prints the right hits."""
    root, _, _ = indexed
    expected = [h.path for h in _in_process(root, SearchQuery.build(text="a blue circle", k=4))]
    where = protocol.address()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(where.socket_path))
    listener.listen(8)
    served = []

    def garbage() -> None:
        listener.settimeout(60)
        try:
            while True:
                conn, _ = listener.accept()
                with conn:
                    served.append(1)
                    conn.sendall(b"\x00\x00\x00\x05hello")
        except OSError:
            pass

    thread = threading.Thread(target=garbage, daemon=True)
    thread.start()
    try:
        rows = _cli_json(root, "a blue circle", "-k", "4")
    finally:
        listener.close()
        where.socket_path.unlink(missing_ok=True)
    assert served, "the CLI did not ask the socket"
    assert [r["path"] for r in rows] == expected


def test_a_helper_that_does_not_acknowledge_is_not_waited_for(run_dir, indexed):
    """A helper that accepts but never reads (stopped with SIGSTOP, stuck, swapped out): the kernel accepts the
    connection for it, so the CLI waits only for the acknowledgement (2 s), then answers in-process."""
    root, _, _ = indexed
    expected = [h.path for h in _in_process(root, SearchQuery.build(text="a red square", k=3))]
    where = protocol.address()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(where.socket_path))
    listener.listen(8)  # never accepted: what a stopped helper looks like from outside
    try:
        started = time.monotonic()
        rows = _cli_json(root, "a red square", "-k", "3")
        waited = time.monotonic() - started
    finally:
        listener.close()
        where.socket_path.unlink(missing_ok=True)
    assert [r["path"] for r in rows] == expected
    assert waited < client.ANSWER_SECONDS / 2  # not the answer timeout (300 s): the acknowledgement's


def test_the_helper_exits_when_idle_and_when_its_socket_is_removed(run_dir, indexed, monkeypatch):
    root, _, _ = indexed
    monkeypatch.setenv("CLIPSEARCH_HELPER_IDLE", "2")
    _cli_json(root, "x", "-k", "1")
    where = _wait_listening()
    assert _lock_released(where.lock_path, timeout=30)
    assert not where.socket_path.exists()


def test_no_helper_when_turned_off_or_without_a_private_folder(run_dir, indexed, monkeypatch):
    root, _, _ = indexed
    monkeypatch.setenv("CLIPSEARCH_HELPER", "0")
    assert protocol.address() is None
    _cli_json(root, "x", "-k", "1")
    assert not list(run_dir.glob("clipsearch/*.sock"))
    monkeypatch.setenv("CLIPSEARCH_HELPER", "1")
    private = run_dir / "clipsearch"
    private.mkdir(exist_ok=True)
    private.chmod(0o755)  # others can enter: refused
    assert protocol.address() is None
    private.chmod(0o700)
    assert protocol.address() is not None


def test_the_helper_is_chosen_by_code_and_settings(run_dir, monkeypatch, tmp_path):
    """Another CLIPSEARCH_HOME (other models, other default collections) is another helper; a relative one is
    named by what it means."""
    first = protocol.address()
    monkeypatch.setenv("CLIPSEARCH_HOME", str(tmp_path / "elsewhere"))
    second = protocol.address()
    assert first.socket_path != second.socket_path
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPSEARCH_HOME", "elsewhere")
    assert protocol.address().socket_path == second.socket_path


def test_a_helper_still_loading_its_collection_answers_status_and_stop(run_dir, indexed, monkeypatch):
    """A big index or model takes a while to preload: status and stop are answered meanwhile (the client waits only
    2 s for the acknowledgement), and a stop is not lost."""
    from clipsearch.resident import helper as helper_module

    root, _, _ = indexed
    loading, release = threading.Event(), threading.Event()

    def slow_preload(self, collection, index_dir):
        loading.set()
        release.wait(60)

    monkeypatch.setattr(helper_module.Helper, "preload", slow_preload)
    where = protocol.address()
    where.socket_path.parent.mkdir(mode=0o700, exist_ok=True)
    umask = os.umask(0o022)
    os.umask(umask)  # the helper's main() sets its own (0077): this process's is put back below
    serving = threading.Thread(target=helper_module.main, args=([
        "--socket", str(where.socket_path), "--lock", str(where.lock_path), "--idle", "120",
        "--collection", "s", "--index-dir", str(root)],), daemon=True)
    serving.start()
    try:
        assert loading.wait(30)
        status = client.request("status")
        assert status is not None and status.get("ok") and status["pid"] == os.getpid()
        assert client.request("stop") is not None
        serving.join(30)
        assert not serving.is_alive()  # the stop was carried out, not lost behind the preload
    finally:
        release.set()
        where.socket_path.unlink(missing_ok=True)
        serving.join(30)
        os.umask(umask)


def test_helpers_of_other_code_or_settings_are_shown_and_stopped_with_all(run_dir, indexed, monkeypatch, tmp_path):
    """After an upgrade (or with another CLIPSEARCH_HOME) the helper of the old settings has another socket: status
    says it exists and stop --all stops it (a helper exits when its socket is removed)."""
    root, _, _ = indexed
    own_home = os.environ["CLIPSEARCH_HOME"]
    monkeypatch.setenv("CLIPSEARCH_HOME", str(tmp_path / "other-home"))
    other = protocol.address()
    _cli_json(root, "x", "-k", "1")  # a helper for the other settings
    _wait_listening()
    monkeypatch.setenv("CLIPSEARCH_HOME", own_home)
    assert protocol.address().socket_path != other.socket_path
    assert "1 other helper socket of yours" in _helper_cli("status")
    assert "removed 1 other helper socket" in _helper_cli("stop", "--all")
    assert not other.socket_path.exists() and _lock_released(other.lock_path, timeout=30)


def test_helper_status_and_stop_commands(run_dir, indexed):
    root, _, _ = indexed
    assert json.loads(_helper_cli("status", "--json"))["running"] is False
    _cli_json(root, "x", "-k", "1")
    where = _wait_listening()
    # The helper preloads its collection beside its accept loop: status answers at once, and lists the collection
    # once it is loaded.
    deadline = time.monotonic() + 60
    status = json.loads(_helper_cli("status", "--json"))
    while not status["collections"] and time.monotonic() < deadline:
        time.sleep(0.1)
        status = json.loads(_helper_cli("status", "--json"))
    assert status["running"] is True and status["socket"] == str(where.socket_path)
    assert status["collections"] == [{"collection": "s", "index_dir": str(root)}]
    assert status["pid"] > 0 and status["idle_limit_seconds"] == 120
    assert f"stopped the helper (pid {status['pid']})" in _helper_cli("stop")
    assert _lock_released(where.lock_path, timeout=30) and not where.socket_path.exists()
    assert "no helper running" in _helper_cli("stop")


def _helper_cli(*args: str) -> str:
    result = subprocess.run([*CLI, "helper", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_model_file_rewritten_in_place_is_noticed(run_dir, tmp_path, tiny_bundle):
    """Any file of the bundle (here the tokenizer, not a graph) rewritten under the same size: the helper reloads, and
    the reload's checksum check refuses it as the in-process search does, instead of answering with the old model
    (or, for a graph's memory-mapped weights, with the new bytes the checksum never saw)."""
    from clipsearch.errors import BundleError

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    folder = tmp_path / "photos"
    make_photos(folder, 4)
    root = tmp_path / "idx"
    index_paths(Collection.create("s", root), ClipModel(bundle, threads=1), [str(folder)], IndexOptions(workers=0))
    _cli_json(root, "a red square", "-k", "2")
    _wait_listening()
    # A text no search embedded before (not in the query cache): the helper loads its text tower for it.
    assert client.ask("s", root, SearchQuery.build(text="a green square", k=2)) is not None
    tokenizer = bundle / "tokenizer.json"
    data = bytearray(tokenizer.read_bytes())
    at = data.index(b'"vocab"') + 1
    data[at] = ord("V")  # one byte, same size
    tokenizer.write_bytes(bytes(data))
    query = SearchQuery.build(text="a blue square", k=2)  # not in the query cache
    with pytest.raises(BundleError) as in_process:
        _in_process(root, query)
    with pytest.raises(BundleError) as resident:
        client.ask("s", root, query)
    assert resident.value.message == in_process.value.message
