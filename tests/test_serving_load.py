"""Serving under load (issue 12): blocking work runs in the bounded executor, so a search held up on purpose
delays neither /healthz nor other searches; concurrent text queries share encoder calls (dynamic batching)
and each still gets its own vector; an index refresh is built aside and swapped in, searches answering from
the old index until then; a full executor answers 503 with Retry-After.

Nothing here measures time: slowness is an Event the test holds, and every assertion is about which request
finished while which was still held. Timeouts only bound how long a broken build can hang."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from clipsearch.model.runtime import ClipModel
from clipsearch.store.collection import Collection
from clipsearch.store.database import NewImage
from clipsearch.web import ServerSettings, create_app
from web.batching import BatchPolicy, TextBatcher
from web.executor import BoundedExecutor, ExecutorLimits, ServerBusy
from web_fixtures import IndexedPhotos, LiveServer, build_indexed_photos

HOLD = 60  # seconds a held call waits at most (a deadlock guard, never a measurement)
SLOW_K = 7


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_bundle) -> IndexedPhotos:
    return build_indexed_photos(tmp_path_factory.mktemp("serving-load"), tiny_bundle)


def unique(text: str) -> str:
    """A query text no earlier run has cached (tests pass when run twice over the same collection)."""
    return f"{text} {uuid.uuid4().hex[:8]}"


def settings(indexed: IndexedPhotos, **overrides) -> ServerSettings:
    return ServerSettings(**{"collection": indexed.name, "index_dir": indexed.index_dir, **overrides})


def search(url: str, text: str, k: int = 3) -> requests.Response:
    return requests.get(f"{url}/api/search", params={"q": text, "k": k}, timeout=HOLD)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + HOLD
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_a_held_search_delays_neither_healthz_nor_other_searches(indexed, monkeypatch):
    app = create_app(settings(indexed, workers=2, batch_lanes=2))
    searcher = app.state.web.searcher()
    index = searcher.index
    original = index.search
    entered, release = threading.Event(), threading.Event()

    def held_search(queries, k, *args, **kwargs):
        if k == SLOW_K:
            entered.set()
            assert release.wait(HOLD)
        return original(queries, k, *args, **kwargs)

    monkeypatch.setattr(index, "search", held_search)
    with LiveServer(app) as live, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(search, live.url, unique("a held query"), SLOW_K)
        try:
            assert entered.wait(HOLD), "the held search never reached the index"
            health = requests.get(f"{live.url}/healthz", timeout=HOLD)
            other = search(live.url, unique("another query"))
            stats = requests.get(f"{live.url}/api/stats", timeout=HOLD)
            assert not slow.done(), "the held search finished before it was released"
        finally:
            release.set()
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert other.status_code == 200 and len(other.json()["results"]) == 3
        assert stats.status_code == 200
        answer = slow.result(timeout=HOLD)
        assert answer.status_code == 200 and len(answer.json()["results"]) == SLOW_K


def test_healthz_answers_while_every_worker_is_held_and_the_queue_is_full(indexed, monkeypatch):
    """workers=1, queue_limit=1: one search held, one waiting; a third is refused with 503 + Retry-After at once
    and /healthz still answers."""
    app = create_app(settings(indexed, workers=1, queue_limit=1, batch_lanes=1))  # the held search holds the lane
    state = app.state.web
    searcher = state.searcher()
    index = searcher.index
    original = index.search
    entered, release = threading.Event(), threading.Event()

    def held_search(queries, k, *args, **kwargs):
        if k == SLOW_K:
            entered.set()
            assert release.wait(HOLD)
        return original(queries, k, *args, **kwargs)

    monkeypatch.setattr(index, "search", held_search)
    with LiveServer(app) as live, ThreadPoolExecutor(2) as pool:
        held = pool.submit(search, live.url, unique("held"), SLOW_K)
        try:
            assert entered.wait(HOLD)
            waiting = pool.submit(search, live.url, unique("waiting"))
            wait_until(lambda: state.executor.stats().admitted == 2, "the second search to queue")
            refused = search(live.url, unique("refused"))
            health = requests.get(f"{live.url}/healthz", timeout=HOLD)
            assert not held.done() and not waiting.done()
        finally:
            release.set()
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "busy" in refused.json()["detail"]
        assert health.status_code == 200
        assert held.result(timeout=HOLD).status_code == 200
        assert waiting.result(timeout=HOLD).status_code == 200
        assert state.executor.stats().refused == 1


def test_concurrent_text_queries_share_encoder_calls_over_http(indexed, monkeypatch):
    app = create_app(settings(indexed, workers=2, max_batch=32, batch_window_ms=0, batch_lanes=1))
    state = app.state.web
    searcher = state.searcher()
    model = searcher.model
    original = model.encode_text
    calls: list[list[str]] = []
    entered, release = threading.Event(), threading.Event()

    def counted(texts):
        calls.append(list(texts))
        if len(calls) == 1:
            entered.set()
            assert release.wait(HOLD)
        return original(texts)

    monkeypatch.setattr(model, "encode_text", counted)
    first = unique("the first query")
    others = [unique(f"query number {i}") for i in range(8)]
    with LiveServer(app) as live, ThreadPoolExecutor(9) as pool:
        held = pool.submit(search, live.url, first, 20)
        try:
            assert entered.wait(HOLD)
            answers = {text: pool.submit(search, live.url, text, 20) for text in others}
            batcher = state.batcher(searcher)
            wait_until(lambda: batcher.waiting() == len(others), "the other queries to queue behind the first")
        finally:
            release.set()
        assert held.result(timeout=HOLD).status_code == 200
        responses = {text: future.result(timeout=HOLD) for text, future in answers.items()}
    assert len(calls) == 2, calls  # 9 queries, 2 encoder calls: the held one, then the 8 that queued behind it
    assert calls[0] == [first] and sorted(calls[1]) == sorted(others)
    stats = batcher.stats()
    assert (stats.search_calls, stats.largest_search) == (2, 8)  # and 2 searches of the index, the second for 8
    for text, response in responses.items():
        assert response.status_code == 200
        assert [r["id"] for r in response.json()["results"]] == indexed.text_ranking(text)[:20]


def test_batched_vectors_equal_encoding_each_text_alone(tiny_bundle):
    model = ClipModel(tiny_bundle, threads=1)
    calls: list[list[str]] = []
    entered, release = threading.Event(), threading.Event()

    def embed(texts: list[str]) -> dict[str, np.ndarray]:
        calls.append(list(texts))
        if len(calls) == 1:
            entered.set()
            assert release.wait(HOLD)
        return dict(zip(texts, model.encode_text(texts)))

    batcher = TextBatcher(embed, BatchPolicy(max_batch=32, window_seconds=0, lanes=1))
    try:
        first = batcher.submit(["a dog"])
        assert entered.wait(HOLD)
        texts = [["a red car"], ["snow on a mountain", "a dog"], ["a much longer query about a birthday cake with "
                                                                  "candles on a kitchen table"], ["x"]]
        futures = [batcher.submit(t) for t in texts]
        wait_until(lambda: batcher.waiting() == len(texts), "the requests to queue")
        release.set()
        results = [f.result(timeout=HOLD) for f in futures]
        assert first.result(timeout=HOLD).keys() == {"a dog"}
    finally:
        release.set()
        batcher.close()
    assert len(calls) == 2
    assert sorted(calls[1]) == sorted({t for group in texts for t in group})
    for group, result in zip(texts, results):
        assert list(result) == group  # each request gets its own texts, nobody else's
        for text in group:
            alone = model.encode_text([text])[0]
            np.testing.assert_allclose(result[text], alone, atol=1e-5)
    assert batcher.stats().calls == 2 and batcher.stats().largest_batch == len(calls[1])


def test_lanes_run_encoder_calls_at_once_and_all_stop_on_close():
    """Two lanes: a second batch is encoded while the first call is still running (each call waits at a barrier
    that only opens with two callers inside), and close() stops every lane."""
    inside = threading.Barrier(2, timeout=HOLD)
    threads: set[str] = set()

    def embed(texts: list[str]) -> dict[str, np.ndarray]:
        threads.add(threading.current_thread().name)
        inside.wait()
        return {t: np.full(2, len(t), np.float32) for t in texts}

    batcher = TextBatcher(embed, BatchPolicy(window_seconds=0, lanes=2), name="lanes-test")
    try:
        first = batcher.submit(["one"])
        wait_until(lambda: inside.n_waiting == 1, "the first call to start")
        second = batcher.submit(["three"])
        assert first.result(timeout=HOLD)["one"][0] == 3 and second.result(timeout=HOLD)["three"][0] == 5
    finally:
        batcher.close()
    assert len(threads) == 2 and all(name.startswith("lanes-test-") for name in threads)
    assert not any(t.name.startswith("lanes-test-") and t.is_alive() for t in threading.enumerate())
    with pytest.raises(Exception, match="shutting down"):
        batcher.submit(["late"])


def test_a_batch_with_a_failing_request_still_answers_the_others():
    def embed(texts: list[str]) -> dict[str, np.ndarray]:
        if "bad" in texts:
            raise ValueError("cannot embed 'bad'")
        return {t: np.full(2, len(t), np.float32) for t in texts}

    gate = threading.Event()
    batcher = TextBatcher(lambda texts: (gate.wait(HOLD), embed(texts))[1], BatchPolicy(window_seconds=0, lanes=1))
    try:
        first = batcher.submit(["first"])
        good, bad = batcher.submit(["good"]), batcher.submit(["bad"])
        gate.set()
        assert first.result(timeout=HOLD)["first"][0] == 5
        assert good.result(timeout=HOLD)["good"][0] == 4
        with pytest.raises(ValueError):
            bad.result(timeout=HOLD)
    finally:
        gate.set()
        batcher.close()


def test_an_index_refresh_is_built_aside_and_swapped_in(tmp_path, tiny_bundle, monkeypatch):
    """An indexing run writes a new image while the server runs: searches answer from the old index while the
    new one is being built (held on an Event), /healthz too, then from the new one after the swap."""
    indexed = build_indexed_photos(tmp_path, tiny_bundle, count=4)
    app = create_app(settings(indexed))
    searcher = app.state.web.searcher()
    searcher.stale_refresh_seconds = 0  # rebuild from SQLite at once (an indexing run still writing)
    old_index = searcher.index
    building, release = threading.Event(), threading.Event()
    original = searcher._build_index

    def held_build(collection):
        building.set()
        assert release.wait(HOLD)
        return original(collection)

    monkeypatch.setattr(searcher, "_build_index", held_build)
    text = unique("a picture of the new image")
    vector = ClipModel(tiny_bundle, threads=1).encode_text([text])[0]
    with Collection.open(indexed.name, indexed.index_dir) as writer:  # what an indexing run's writer does
        model_id = writer.require_model().model_id
        new_id = writer.store.write_images(
            [NewImage(path=str(tmp_path / "photos" / "new.jpg"), size=1, mtime_ns=1, content_hash="n" * 32, width=8,
                      height=8, taken_at=None, vector=vector)], model_id, writer.store.next_run_id(), "2024")[0]
    swaps = searcher.swaps
    with LiveServer(app) as live:
        during = search(live.url, text, k=20)  # sees the change and starts the refresh
        assert building.wait(HOLD), "no refresh started"
        also_during = search(live.url, text, k=20)
        health = requests.get(f"{live.url}/healthz", timeout=HOLD)
        assert searcher.index is old_index and searcher.swaps == swaps
        release.set()
        assert searcher.wait_for_swap(swaps, HOLD), "the refreshed index was never swapped in"
        after = search(live.url, text, k=20)
        swapped_in = searcher.index
    for answer in (during, also_during):
        assert answer.status_code == 200
        assert new_id not in [r["id"] for r in answer.json()["results"]]  # the old index: 5 images
        assert len(answer.json()["results"]) == 5
    assert health.status_code == 200
    assert swapped_in is not old_index and swapped_in.count == 6
    assert after.status_code == 200 and after.json()["results"][0]["id"] == new_id


def test_reads_use_one_read_only_connection_per_thread(indexed):
    app = create_app(settings(indexed))
    searcher = app.state.web.searcher()
    seen: dict[int, object] = {}

    def read(_: int) -> None:
        with searcher.reading() as store:
            assert store.read_only
            seen[threading.get_ident()] = store
            store.count()

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(read, range(12)))
    stores = list(seen.values())
    assert len({id(s) for s in stores}) == len(seen) and all(s is not searcher.collection.store for s in stores)
    app.state.web.close()


def test_bounded_executor_counts_a_job_until_it_finishes():
    executor = BoundedExecutor(ExecutorLimits(workers=1, queue_limit=0))
    gate = threading.Event()
    try:
        running = executor.submit(gate.wait, HOLD)
        with pytest.raises(ServerBusy) as refused:
            executor.submit(lambda: None)
        assert refused.value.status_code == 503 and refused.value.headers == {"Retry-After": "1"}
        gate.set()
        assert running.result(timeout=HOLD) is True
        wait_until(lambda: executor.stats().admitted == 0, "the finished job to be released")
        assert executor.submit(lambda: 42).result(timeout=HOLD) == 42
    finally:
        gate.set()
        executor.close()


def test_the_serve_commands_batch_default_is_the_batchers():
    import typer

    from clipsearch.cli import app as cli_app
    from clipsearch.web.batching import DEFAULT_MAX_BATCH

    serve = typer.main.get_command(cli_app).commands["serve"]
    assert next(p for p in serve.params if p.name == "max_batch").default == DEFAULT_MAX_BATCH


def test_searches_right_after_a_rebuild_answer_from_the_new_generation(tmp_path, tiny_bundle, monkeypatch):
    """A rebuild numbers its images above every old id: the old index cannot answer beside the new rows (its hits
    would all be dropped, an empty 200). The first search after the switch loads the new generation's saved
    index; a search that was already running when another request followed the switch searches again."""
    from clipsearch.indexer.pipeline import IndexOptions
    from clipsearch.indexer.runner import index_paths
    from clipsearch.search import SearchQuery

    indexed = build_indexed_photos(tmp_path, tiny_bundle, count=6)
    app = create_app(settings(indexed))
    searcher = app.state.web.searcher()
    model = ClipModel(tiny_bundle, threads=1)
    query = SearchQuery.build(text="a red square", k=5)
    before = searcher.search(query)
    assert len(before) == 5

    def rebuild() -> None:
        with Collection.open(indexed.name, indexed.index_dir) as collection:
            index_paths(collection, model, [str(tmp_path / "photos")], IndexOptions(workers=0, rebuild=True))

    rebuild()
    after = searcher.search(query)
    batched = searcher.search_many([query, SearchQuery.build(text="a blue circle", k=5)], {})
    assert len(after) == 5 and min(h.id for h in after) > max(h.id for h in before)
    assert [h.path for h in after] == [h.path for h in before]
    assert [[h.id for h in hits] for hits in batched][0] == [h.id for h in after] and len(batched[1]) == 5
    assert searcher.served.folder == searcher.collection.folder
    # Another request follows a second rebuild while this search holds the index it got: it searches again.
    reading = searcher.reading
    switched = []

    def reading_after_a_switch():
        if not switched:
            switched.append(True)
            rebuild()
            searcher._follow_rebuild()
        return reading()

    monkeypatch.setattr(searcher, "reading", reading_after_a_switch)
    during = searcher.search(query)
    assert switched and len(during) == 5 and min(h.id for h in during) > max(h.id for h in after)
    assert [h.path for h in during] == [h.path for h in before]
    # clip-back's /knn-service, the first request after a switch (it read the index before following it).
    with LiveServer(app) as live:
        knn_url, body = f"{live.url}/knn-service", {"text": "a red square", "num_images": 5}
        assert len(requests.post(knn_url, json=body, timeout=HOLD).json()) == 5
        rebuild()
        knn = requests.post(knn_url, json=body, timeout=HOLD)
    assert knn.status_code == 200 and len(knn.json()) == 5, knn.text
    assert min(r["id"] for r in knn.json()) > max(h.id for h in during)


def test_a_duplicates_scan_counts_against_the_workers_and_the_queue(indexed, monkeypatch):
    """`GET /api/duplicates` reads every vector: it runs in the bounded executor like a search, so with every
    worker busy and the queue full it is refused with 503 + Retry-After instead of queueing in the server's own
    thread pool, and it holds a worker while it runs."""
    import clipsearch.web.duplicates as duplicates_route

    app = create_app(settings(indexed, workers=1, queue_limit=0, batch_lanes=1))
    entered, release = threading.Event(), threading.Event()
    original = duplicates_route.find_duplicates

    def held_scan(searcher, threshold, neighbours):
        entered.set()
        assert release.wait(HOLD)
        return original(searcher, threshold, neighbours)

    monkeypatch.setattr(duplicates_route, "find_duplicates", held_scan)
    with LiveServer(app) as live, ThreadPoolExecutor(1) as pool:
        held = pool.submit(requests.get, f"{live.url}/api/duplicates", params={"threshold": 0.9}, timeout=HOLD)
        try:
            assert entered.wait(HOLD)
            another = requests.get(f"{live.url}/api/duplicates", params={"threshold": 0.8}, timeout=HOLD)
            refused_search = search(live.url, unique("while scanning"))
            health = requests.get(f"{live.url}/healthz", timeout=HOLD)
        finally:
            release.set()
        assert another.status_code == 503 and another.headers["retry-after"] == "1"
        assert refused_search.status_code == 503
        assert health.status_code == 200
        assert held.result(timeout=HOLD).status_code == 200
