"""Search filters (folder, date, orientation, minimum size) act inside the nearest-neighbour search: a filter
matching 1% of a 20,000-image collection still fills the page, in exact order, on both index layouts; each
filter kind means what it says; bad values fail clearly on the CLI, REST and clip-back; filters compose with
image, like, and/not queries and re-ranking."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from clipsearch.filters import FilterError, SearchFilter, parse_date
from clipsearch.model.bundle import read_bundle
from clipsearch.search import SearchQuery, Searcher
from clipsearch.store.index import vectors as vectors_module
from clipsearch.store.collection import Collection
from clipsearch.store.database import NewImage, Store
from clipsearch.web import ServerSettings, create_app
from web_fixtures import TEST_HOSTS

CLI = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
N = 20_000
DIM = 64  # the tiny test bundle's embedding size
BASE_DATE = datetime(2020, 1, 1)
RARE = "/lib/rare"  # every 101st image: 1% of the collection (199 images)
RARE_COUNT = len(range(0, N, 101))


def local_ns(moment: datetime) -> int:
    """A naive local time as nanoseconds since the epoch (what os.stat gives as st_mtime_ns)."""
    return int(moment.timestamp()) * 1_000_000_000


def clustered_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim))
    x = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic_row(i: int, vector: np.ndarray) -> NewImage:
    """Image i: in RARE when i % 101 == 0, else in /lib/common/sub{i % 7}; dated BASE_DATE + i hours, by EXIF
    taken_at unless i % 3 == 0 (then by file mtime only); sizes cycle through landscape, portrait and square."""
    folder = RARE if i % 101 == 0 else f"/lib/common/sub{i % 7}"
    moment = BASE_DATE + timedelta(hours=i)
    width, height = [(1600, 1200), (1200, 1600), (1000, 1000), (640, 480), (1010, 1000)][i % 5]
    return NewImage(path=f"{folder}/img{i:05d}.jpg", size=1000 + i, mtime_ns=local_ns(moment),
                    content_hash=f"{i:032x}", width=width, height=height,
                    taken_at=None if i % 3 == 0 else moment.isoformat(timespec="seconds"), vector=vector)


@dataclass(frozen=True)
class Synthetic:
    index_dir: Path
    ids: np.ndarray  # row id of image i
    vectors: np.ndarray
    rows: list[NewImage]

    def exact(self, query: np.ndarray, allowed: np.ndarray, k: int) -> list[int]:
        """Brute-force order of the allowed images (indices into rows) by inner product with `query`."""
        scores = self.vectors[allowed] @ query
        return [int(self.ids[allowed[i]]) for i in np.argsort(-scores, kind="stable")[:k]]

    def where(self, predicate) -> np.ndarray:
        return np.array([i for i, row in enumerate(self.rows) if predicate(i, row)], dtype=np.int64)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, tiny_bundle) -> Synthetic:
    """The same 20,000 synthetic images in two collections: "flat" (IDMap,Flat) and "ivf" (IVF-PQ + refine,
    its threshold lowered to 1,000)."""
    index_dir = tmp_path_factory.mktemp("filters") / "collections"
    vectors = clustered_vectors(N, DIM)
    rows = [synthetic_row(i, vectors[i]) for i in range(N)]
    info = read_bundle(tiny_bundle)
    ids = None
    for name, threshold in (("flat", vectors_module.DEFAULT_IVF_THRESHOLD), ("ivf", 1000)):
        with Collection.create(name, index_dir) as collection:
            collection.bind_model(info)
            written = collection.store.write_images(rows, info.model_id, collection.store.next_run_id(), "2026-01-01")
            index = collection.sync_vectors(ivf_threshold=threshold)
            assert index.meta.layout.kind == ("flat" if name == "flat" else "ivfpq")
            ids = np.array(written, dtype=np.int64) if ids is None else ids
            assert list(written) == ids.tolist()
    return Synthetic(index_dir=index_dir, ids=ids, vectors=vectors, rows=rows)


@pytest.fixture(params=["flat", "ivf"])
def searcher(request, synthetic):
    with Searcher(Collection.open(request.param, synthetic.index_dir)) as opened:
        yield opened


# -- inside the search: full pages in exact order ------------------------------------------------------------

def test_a_one_percent_filter_fills_the_page_in_exact_order(synthetic, searcher):
    rare = synthetic.where(lambda i, row: row.path.startswith(RARE + "/"))
    assert len(rare) == RARE_COUNT == 199
    query_row = 12_345  # not itself in RARE
    query = synthetic.vectors[query_row]
    # Searching first and filtering after would leave almost nothing of a page of 50.
    unfiltered = searcher.search(SearchQuery.build(like=int(synthetic.ids[query_row]), k=50))
    assert sum(h.path.startswith(RARE) for h in unfiltered) < 10
    for k in (50, 200, 500):  # 500 > the 200 that match: all of them
        hits = searcher.search(SearchQuery.build(like=int(synthetic.ids[query_row]), k=k,
                                                 filter=SearchFilter.parse(folders=[RARE])))
        assert len(hits) == min(k, len(rare))
        assert [h.id for h in hits] == synthetic.exact(query, rare, k)
        expected_scores = synthetic.vectors[np.searchsorted(synthetic.ids, [h.id for h in hits])] @ query
        np.testing.assert_allclose([h.score for h in hits], expected_scores, atol=1e-5)
        assert all(h.path.startswith(RARE + "/") for h in hits)


def test_a_large_allow_list_of_an_ivf_index_is_searched_through_its_lists(synthetic, monkeypatch):
    """Past EXACT_SUBSET_MAX the IVF-PQ index itself searches with the selector (nprobe raised for it)."""
    landscape = synthetic.where(lambda i, row: i % 5 in (0, 3))  # 1600x1200 and 640x480: 40%
    monkeypatch.setattr(vectors_module, "EXACT_SUBSET_MAX", 1000)
    monkeypatch.setattr(vectors_module.VectorIndex, "_flat_vectors",
                        lambda self: pytest.fail("the exact path answered a large allow-list"))
    with Searcher(Collection.open("ivf", synthetic.index_dir)) as searcher:
        recalls = []
        for query_row in (7, 4242, 19_999):
            query = synthetic.vectors[query_row]
            hits = searcher.search_vector(query, 20, filter=SearchFilter.parse(orientation="landscape"))
            assert len(hits) == 20 and all(h.width > h.height for h in hits)
            exact = synthetic.exact(query, landscape, 20)
            recalls.append(len({h.id for h in hits} & set(exact)) / 20)
            # The refine stage scores exactly: every returned score is the true inner product.
            rows = np.searchsorted(synthetic.ids, [h.id for h in hits])
            np.testing.assert_allclose([h.score for h in hits], synthetic.vectors[rows] @ query, atol=1e-5)
        assert np.mean(recalls) >= 0.9, recalls


def test_an_ivf_search_that_comes_back_short_is_answered_exactly(synthetic, monkeypatch):
    """Allowed images all in inverted lists the query does not probe: the IVF pass finds none of them, and the
    exact pass over the allowed vectors answers instead (a full page, exact order)."""
    import faiss

    monkeypatch.setattr(vectors_module, "EXACT_SUBSET_MAX", 100)
    with Collection.open("ivf", synthetic.index_dir) as collection:
        index = collection.load_vectors()
    ivf = faiss.extract_index_ivf(index.index)
    query = synthetic.vectors[4242]
    near_lists = set(ivf.quantizer.search(query[None], ivf.nlist // 2)[1][0].tolist())
    lists = ivf.quantizer.search(synthetic.vectors, 1)[1][:, 0]
    far = np.array([i for i in range(N) if int(lists[i]) not in near_lists], dtype=np.int64)
    assert len(far) > 100
    exact_calls = []
    flat_vectors = vectors_module.VectorIndex._flat_vectors
    monkeypatch.setattr(vectors_module.VectorIndex, "_flat_vectors",
                        lambda self: exact_calls.append(1) or flat_vectors(self))
    hits = index.search(query[None], 30, allowed=synthetic.ids[far])[0]
    assert exact_calls == [1]
    assert [i for i, _ in hits] == synthetic.exact(query, far, 30)


def test_every_kind_of_query_composes_with_filters(synthetic, searcher, tiny_bundle):
    from clipsearch.model.runtime import ClipModel

    model = ClipModel(tiny_bundle, threads=1)  # the model the collections were bound to (the searcher loads its own)
    flt = SearchFilter.parse(folders=[RARE], orientation="square")
    allowed = synthetic.where(lambda i, row: row.path.startswith(RARE + "/") and row.width in (1000, 1010)
                              and row.height == 1000)  # square: 1000x1000, and 1010x1000 (within 1%)
    assert 0 < len(allowed) < 100
    beach, people = model.encode_text(["beach", "people"])
    direction = (beach - people) / np.linalg.norm(beach - people)
    texts = searcher.search(SearchQuery.build(text="beach", not_texts=["people"], k=10, filter=flt))
    assert [h.id for h in texts] == synthetic.exact(direction, allowed, 10)
    # "like" an image inside the allowed set: it is left out, the rest come in exact order.
    like_row = int(allowed[0])
    liked = searcher.search(SearchQuery.build(like=int(synthetic.ids[like_row]), k=10, filter=flt))
    assert [h.id for h in liked] == synthetic.exact(synthetic.vectors[like_row], allowed[1:], 10)
    with_self = searcher.search(SearchQuery.build(like=int(synthetic.ids[like_row]), k=3, filter=flt,
                                                  include_query_images=True))
    assert with_self[0].id == int(synthetic.ids[like_row])


# -- what each filter means --------------------------------------------------------------------------------

@pytest.fixture()
def small_store(tmp_path):
    """Five images chosen around each boundary; returns (store, {name: id})."""
    at = datetime(2024, 5, 1)
    specs = {  # name: (path, width, height, taken_at, mtime)
        "a": ("/p/x/a.jpg", 1000, 1000, "2024-05-01T00:00:00", at + timedelta(days=300)),
        "b": ("/p/x/sub/b.jpg", 1010, 1000, None, at - timedelta(seconds=1)),
        "c": ("/p/x2/c.jpg", 1011, 1000, "2024-05-31T23:59:59", at - timedelta(days=300)),
        "d": ("/p/y/d.jpg", 600, 800, None, datetime(2024, 6, 1)),
        "e": ("/p/y/e.jpg", None, None, "2024-05-15T12:00:00", at),
    }
    rows = [NewImage(path=p, size=1, mtime_ns=local_ns(m), content_hash=f"{n:0>32}", width=w, height=h, taken_at=t,
                     vector=np.ones(4, np.float32)) for n, (p, w, h, t, m) in specs.items()]
    store = Store(tmp_path / "meta.sqlite")
    ids = store.write_images(rows, "m@1", 1, "now")
    yield store, dict(zip(specs, ids))
    store.close()


def matching(store_and_ids, **given) -> set[str]:
    store, ids = store_and_ids
    found = set(store.ids_where(*SearchFilter.parse(**given).sql()).tolist())
    return {name for name, i in ids.items() if i in found}


def test_folder_filter_matches_the_folder_at_any_depth_and_not_its_namesakes(small_store):
    assert matching(small_store, folders=["/p/x"]) == {"a", "b"}  # not /p/x2
    assert matching(small_store, folders=["/p/x/"]) == {"a", "b"}
    assert matching(small_store, folders=["/p/x/sub", "/p/y"]) == {"b", "d", "e"}
    assert matching(small_store, folders=["/p/y/d.jpg"]) == {"d"}  # a file names itself
    assert matching(small_store, folders=["x"], base="/p") == {"a", "b"}  # the CLI's relative folders
    assert matching(small_store, folders=["/nowhere"]) == set()


def test_dates_are_taken_at_else_mtime_after_inclusive_before_exclusive(small_store):
    # a: taken exactly at midnight 2024-05-01 (its mtime, months later, is ignored); b: no EXIF, modified one
    # second before; c: taken on the last second of May (modified months earlier); d: no EXIF, modified 2024-06-01.
    assert matching(small_store, after="2024-05-01") == {"a", "c", "d", "e"}
    assert matching(small_store, before="2024-05-01") == {"b"}
    assert matching(small_store, after="2024-05", before="2024-06-01") == {"a", "c", "e"}
    assert matching(small_store, after="2024-05-01T00:00:01") == {"c", "d", "e"}
    assert matching(small_store, before="2024-05-31T23:59:59") == {"a", "b", "e"}
    assert matching(small_store, before="2024-05-31 23:59:59.5") == {"a", "b", "c", "e"}
    assert matching(small_store, after="2025") == set()
    # An offset is converted to local time first: the same instant, written in UTC.
    utc = datetime(2024, 5, 15, 12).astimezone().astimezone(timezone.utc).isoformat()
    assert matching(small_store, after=utc) == matching(small_store, after="2024-05-15T12:00:00")


def test_dates_at_the_ends_of_the_calendar_select_everything_or_nothing(small_store):
    # Past 2262 or before 1678 a date has no 64-bit nanosecond count: it is clamped, never an OverflowError.
    everything = {"a", "b", "c", "d", "e"}
    assert matching(small_store, before="9999") == everything
    assert matching(small_store, before="2262-04-12") == everything
    assert matching(small_store, after="9999-12-31T23:59:59+00:00") == set()
    assert matching(small_store, after="0001") == everything
    assert matching(small_store, before="0001-01-01") == set()
    assert matching(small_store, after="1000", before="9000") == everything
    # With an offset that carries the instant itself past datetime's range (year 10000 or year 0 in UTC).
    assert matching(small_store, after="9999-12-31T23:59:59-14:00") == set()
    assert matching(small_store, before="9999-12-31T23:00-05:00") == everything
    assert matching(small_store, before="0001-01-01T00:00:00+01:00") == set()
    assert matching(small_store, after="0001-01-01T00:00:00+14:00") == everything


def test_orientation_square_allows_one_percent_and_sizes_are_at_least(small_store):
    assert matching(small_store, orientation="square") == {"a", "b"}  # 1000x1000 and 1010x1000
    assert matching(small_store, orientation="Landscape") == {"c"}  # 1011x1000
    assert matching(small_store, orientation="portrait") == {"d"}
    assert matching(small_store, min_size="1000x1000") == {"a", "b", "c"}  # e: size unknown
    assert matching(small_store, min_size="1011X1") == {"c"}
    assert matching(small_store, min_size="600×800") == {"a", "b", "c", "d"}
    assert matching(small_store, folders=["/p"], orientation="square", after="2024-05-01") == {"a"}


def test_hits_say_which_date_a_date_filter_used(synthetic):
    with Searcher(Collection.open("flat", synthetic.index_dir)) as searcher:
        hits = searcher.search_vector(synthetic.vectors[0], 30, filter=SearchFilter.parse(after="2021-01-01"))
        plain = searcher.search_vector(synthetic.vectors[0], 3)
    assert all(h.date is None and h.date_source is None for h in plain)
    for hit in hits:
        i = int(np.searchsorted(synthetic.ids, hit.id))
        moment = (BASE_DATE + timedelta(hours=i)).isoformat(timespec="seconds")
        assert (hit.date, hit.date_source) == (moment, "mtime" if i % 3 == 0 else "taken_at")
        assert hit.date >= "2021-01-01T00:00:00"
    assert {h.date_source for h in hits} == {"mtime", "taken_at"}


# -- bad values --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, message", [
    ({"after": "2024-13-01"}, "after date '2024-13-01' is not a date"),
    ({"before": "yesterday"}, "before date 'yesterday' is not a date"),
    ({"after": "2024-06-01", "before": "2024-05-01"}, "the date range is empty"),
    ({"orientation": "diagonal"}, "unknown orientation 'diagonal'"),
    ({"min_size": "1920"}, "minimum size '1920' is not WIDTHxHEIGHT"),
    ({"min_size": "0x10"}, "out of range"),
    ({"folders": ["photos/2024"]}, "must be an absolute path"),
    ({"folders": [" "]}, "an empty folder"),
    ({"folders": ["/p/x\x00"]}, "has a NUL character"),
    ({"after": "2024-05-01T10:00+99:00"}, r"is not a date \(its UTC offset is not between -23:59 and \+23:59\)"),
])
def test_bad_filter_values_fail_with_a_hint(given, message):
    with pytest.raises(FilterError, match=message) as caught:
        SearchFilter.parse(**given)
    assert caught.value.hint


def test_an_empty_filter_is_no_filter():
    empty = SearchFilter.parse(folders=[], after="", before=None, orientation=" ", min_size="")
    assert not empty.active and empty.sql() == ("1", [])
    assert SearchQuery.build(text="x", filter=empty).filter is None
    assert parse_date("2024-05-01", "after").local_iso == "2024-05-01T00:00:00"


def test_a_folder_holding_no_image_says_so(synthetic):
    with Searcher(Collection.open("flat", synthetic.index_dir)) as searcher:
        flt = SearchFilter.parse(folders=["/lib/nothing-here"])
        assert searcher.search_vector(synthetic.vectors[0], 5, filter=flt) == []
        reason = searcher.why_empty(flt)
        assert reason.message == "no indexed image is in /lib/nothing-here"
        both = SearchFilter.parse(folders=[RARE], orientation="portrait", min_size="2000x2000")
        assert "no image passes all the filters" in searcher.why_empty(both).message
        assert searcher.why_empty(SearchFilter.parse(folders=[RARE])) is None


# -- CLI -----------------------------------------------------------------------------------------------------

def cli(synthetic, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "search", *args, "--index-dir", str(synthetic.index_dir), "-c", "flat"],
                          capture_output=True, text=True, timeout=120)


def test_cli_filters_json_text_and_errors(synthetic):
    done = cli(synthetic, "a photo", "--in", RARE, "--in", "/lib/common/sub3", "--after", "2021-06-01",
               "--before", "2022-01-01", "--orientation", "portrait", "--min-size", "1200x1600", "-k", "40", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    allowed = synthetic.where(lambda i, row: (row.path.startswith(RARE + "/") or row.path.startswith("/lib/common/sub3/"))
                              and datetime(2021, 6, 1) <= BASE_DATE + timedelta(hours=i) < datetime(2022, 1, 1)
                              and (row.width, row.height) == (1200, 1600))
    assert len(rows) == 40 < len(allowed)
    assert {r["id"] for r in rows} <= set(synthetic.ids[allowed].tolist())
    assert all(r["date_source"] in ("taken_at", "mtime") and "2021-06-01" <= r["date"] < "2022" for r in rows)

    text = cli(synthetic, "a photo", "--after", "2021-06-01", "-k", "3")
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 3
    assert all(" taken 20" in line or " mtime 20" in line for line in text.stdout.splitlines()), text.stdout

    for args, message in ((("--after", "2024-02-30"), "after date '2024-02-30' is not a date"),
                          (("--min-size", "big"), "minimum size 'big' is not WIDTHxHEIGHT"),
                          (("--orientation", "round"), "unknown orientation 'round'")):
        bad = cli(synthetic, "a photo", *args)
        assert bad.returncode == 1 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    nothing = cli(synthetic, "a photo", "--in", "/lib/nothing-here", "--json")
    assert nothing.returncode == 0 and json.loads(nothing.stdout) == []
    assert "no indexed image is in /lib/nothing-here" in nothing.stderr


# -- REST and clip-back ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(synthetic):
    settings = ServerSettings(allowed_hosts=TEST_HOSTS, collection="ivf", index_dir=synthetic.index_dir)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_rest_get_and_post_filter_inside_the_search(client, synthetic):
    rare = synthetic.where(lambda i, row: row.path.startswith(RARE + "/"))
    got = client.get("/api/search", params=[("q", "a photo"), ("k", "60"), ("in", RARE)])
    assert got.status_code == 200, got.text
    body = got.json()
    assert len(body["results"]) == 60 and body["filters"] == f"in {RARE}" and body["note"] is None
    assert {r["id"] for r in body["results"]} <= set(synthetic.ids[rare].tolist())
    like = int(synthetic.ids[12_345])
    posted = client.post("/api/search", json={"image_id": like, "k": 25, "in": [RARE], "orientation": "landscape",
                                              "after": "2020-06-01", "min_size": "1000x700"})
    assert posted.status_code == 200, posted.text
    allowed = synthetic.where(lambda i, row: row.path.startswith(RARE + "/") and (row.width, row.height) == (1600, 1200)
                              and BASE_DATE + timedelta(hours=i) >= datetime(2020, 6, 1))
    results = posted.json()["results"]
    assert [r["id"] for r in results] == synthetic.exact(synthetic.vectors[12_345], allowed, 25)
    assert all(r["date_source"] in ("taken_at", "mtime") and r["date"] for r in results)
    one_string = client.post("/api/search", json={"image_id": like, "k": 5, "in": RARE}).json()["results"]
    assert len(one_string) == 5 and all(r["path"].startswith(RARE) for r in one_string)
    empty = client.get("/api/search", params={"q": "a photo", "in": "/lib/nothing-here"}).json()
    assert empty["results"] == [] and "no indexed image is in /lib/nothing-here" in empty["note"]


@pytest.mark.parametrize("params, message", [
    ({"after": "soon"}, "after date 'soon' is not a date"),
    ({"orientation": "tall"}, "unknown orientation 'tall'"),
    ({"min_size": "10by10"}, "is not WIDTHxHEIGHT"),
    ({"in": "relative/folder"}, "must be an absolute path"),
    ({"in": "/lib/a\x00b"}, "has a NUL character"),  # matched nothing, silently, before
    ({"after": "2024-05-01T10:00+99:00"}, "its UTC offset is not between -23:59 and +23:59"),  # no timedelta repr
])
def test_rest_bad_filters_are_400_with_the_error_json(client, params, message):
    got = client.get("/api/search", params={"q": "a photo", **params})
    assert got.status_code == 400 and message in got.json()["detail"] and got.json()["hint"], got.text
    posted = client.post("/api/search", json={"text": "a photo", **params})
    assert posted.status_code == 400 and message in posted.json()["detail"], posted.text
    knn = client.post("/knn-service", content=json.dumps({"text": "a photo", **params}))
    assert knn.status_code == 400 and message in knn.json()["detail"], knn.text
    wrong_type = client.post("/api/search", json={"text": "a photo", "orientation": 3})
    assert wrong_type.status_code == 422 and wrong_type.json()["detail"].startswith("invalid request")


def test_clip_back_takes_the_filters_as_extra_fields(client, synthetic):
    rare = synthetic.where(lambda i, row: row.path.startswith(RARE + "/"))
    query = synthetic.vectors[12_345]
    body = {"embedding_input": query.tolist(), "num_images": 30, "in": [RARE]}
    got = client.post("/knn-service", content=json.dumps(body))  # no JSON content type, like ClipClient
    assert got.status_code == 200, got.text
    assert [r["id"] for r in got.json()] == synthetic.exact(query, rare, 30)
    square = client.post("/knn-service", content=json.dumps({**body, "in": RARE, "orientation": "square"})).json()
    assert len(square) == 30 and all(r["width"] == r["height"] or abs(r["width"] - r["height"]) <= 10 for r in square)
    # Without the extra fields it is plain clip-back.
    plain = client.post("/knn-service", content=json.dumps({"embedding_input": query.tolist(), "num_images": 30}))
    assert sum(r["image_path"].startswith(RARE) for r in plain.json()) < 10


# -- re-ranking --------------------------------------------------------------------------------------------

def test_rerank_re_scores_the_filtered_candidates(blip_bundle, tmp_path):
    from clipsearch.indexer.pipeline import IndexOptions
    from clipsearch.indexer.runner import index_paths
    from clipsearch.model.runtime import ClipModel
    from photo_fixtures import make_photos

    make_photos(tmp_path / "photos", 14)  # odd-numbered photos in photos/sub
    model = ClipModel(blip_bundle, threads=1)
    with Collection.create("rr", tmp_path / "collections") as collection:
        index_paths(collection, model, [str(tmp_path / "photos")], IndexOptions(batch_size=8, workers=0))
    sub = str(tmp_path / "photos" / "sub")
    flt = SearchFilter.parse(folders=[sub])
    with Searcher(Collection.open("rr", tmp_path / "collections"), model) as searcher:
        itc = searcher.search(SearchQuery.build(text="a dog", k=7, filter=flt))
        ranked = searcher.search(SearchQuery.build(text="a dog", k=7, rerank=True, rerank_k=5, filter=flt))
    assert len(itc) == len(ranked) == 7 and all(h.path.startswith(sub + "/") for h in ranked)
    assert {h.id for h in ranked[:5]} == {h.id for h in itc[:5]} and all(h.match is not None for h in ranked[:5])
    assert [h.id for h in ranked[5:]] == [h.id for h in itc[5:]]


def test_a_cached_allow_list_follows_a_new_mtime_written_by_another_connection(tmp_path, tiny_bundle):
    """Re-indexing a touched but unchanged file records its new mtime without a new generation: a server's cached
    allow-list of a date filter must still see it."""
    info = read_bundle(tiny_bundle)
    vectors = clustered_vectors(3, DIM)
    rows = [NewImage(path=f"/t/{i}.jpg", size=1, mtime_ns=local_ns(datetime(2020, 1, 1)), content_hash=f"{i:032x}",
                     width=10, height=10, taken_at=None, vector=vectors[i]) for i in range(3)]
    with Collection.create("touch", tmp_path) as collection:
        collection.bind_model(info)
        ids = collection.store.write_images(rows, info.model_id, collection.store.next_run_id(), "now")
        collection.sync_vectors()
    recent = SearchFilter.parse(after="2024-01-01")
    with Searcher(Collection.open("touch", tmp_path)) as searcher:
        assert searcher.search_vector(vectors[0], 3, filter=recent) == []
        with Collection.open("touch", tmp_path) as writer:
            writer.store.touch([ids[1]], 2, new_stats={ids[1]: (1, local_ns(datetime(2024, 2, 1)))})
        hits = searcher.search_vector(vectors[0], 3, filter=recent)
        assert [(h.id, h.date, h.date_source) for h in hits] == [(ids[1], "2024-02-01T00:00:00", "mtime")]
