"""Search: image queries find themselves and their resized copies, like/and/not queries combine as
documented, results are joined with metadata, and bad queries fail with a clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.store.collection import Collection
from clipsearch.errors import CollectionError, ImageError, QueryError
from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.runner import index_paths
from clipsearch.model.runtime import ClipModel
from clipsearch.query import parse_weight
from clipsearch.search import SearchQuery, Searcher
from photo_fixtures import block_image, make_photos

CLI = [sys.executable, "-c", "from clipsearch.cli import main; main()"]


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return ClipModel(tiny_bundle, threads=1)


@pytest.fixture()
def indexed(tmp_path, model):
    folder = tmp_path / "photos"
    make_photos(folder, 16)
    original = folder / "photo_000.png"
    Image.open(original).resize((96, 72), Image.Resampling.BILINEAR).save(folder / "zz_resized_copy.jpg", quality=90)
    collection = Collection.create("s", tmp_path / "idx")
    index_paths(collection, model, [str(folder)], IndexOptions(batch_size=8, workers=1))
    return collection, folder


def test_image_query_returns_itself_first_and_its_resized_copy_next(indexed, model):
    collection, folder = indexed
    searcher = Searcher(collection, model)
    query_path = folder / "photo_000.png"
    with_self = searcher.search(SearchQuery.build(image=query_path, k=3, include_query_images=True))
    assert [os.path.basename(h.path) for h in with_self[:2]] == ["photo_000.png", "zz_resized_copy.jpg"]
    assert with_self[0].score == pytest.approx(1.0, abs=1e-4) and with_self[0].score >= with_self[1].score >= with_self[2].score
    # By default the query image itself is not returned: the copy comes first.
    hits = searcher.search(SearchQuery.build(image=query_path, k=3))
    assert os.path.basename(hits[0].path) == "zz_resized_copy.jpg"
    assert all(h.path != str(query_path) for h in hits)
    # The same bytes uploaded (no path) are recognised as the query image too.
    uploaded = searcher.search(SearchQuery.build(image=query_path.read_bytes(), k=3))
    assert [h.id for h in uploaded] == [h.id for h in hits]


def test_an_example_file_leaves_out_only_itself_so_its_copies_are_found(tmp_path, model):
    # "Where is this photo in my library?": a file from elsewhere finds its byte-identical copies; an indexed file
    # leaves out its own row only (like=ID does the same), not its copies at other paths.
    import shutil

    folder = tmp_path / "library"
    make_photos(folder, 6)
    shutil.copy(folder / "photo_000.png", folder / "copy_of_000.png")
    outside = tmp_path / "outside.png"
    shutil.copy(folder / "photo_000.png", outside)
    collection = Collection.create("copies", tmp_path / "idx")
    index_paths(collection, model, [str(folder)], IndexOptions(batch_size=8, workers=0))
    searcher = Searcher(collection, model)
    from_outside = searcher.search(SearchQuery.build(image=outside, k=2))
    assert sorted(os.path.basename(h.path) for h in from_outside) == ["copy_of_000.png", "photo_000.png"]
    assert all(h.score == pytest.approx(1.0, abs=1e-4) for h in from_outside)
    from_inside = searcher.search(SearchQuery.build(image=folder / "photo_000.png", k=1))
    assert [os.path.basename(h.path) for h in from_inside] == ["copy_of_000.png"]
    uploaded = searcher.search(SearchQuery.build(image=outside.read_bytes(), k=1))  # no name: its bytes are itself
    assert os.path.basename(uploaded[0].path) not in ("copy_of_000.png", "photo_000.png")
    (tmp_path / "via-link").symlink_to(folder)  # the indexed file itself, named through a link
    through_link = searcher.search(SearchQuery.build(image=tmp_path / "via-link" / "photo_000.png", k=2))
    assert "photo_000.png" not in [os.path.basename(h.path) for h in through_link]
    assert os.path.basename(through_link[0].path) == "copy_of_000.png"


def test_like_an_indexed_image_excludes_it_and_finds_its_copy(indexed, model):
    collection, folder = indexed
    searcher = Searcher(collection, model)
    source = collection.store.find_by_path(str(folder / "photo_000.png"))
    hits = searcher.search(SearchQuery.build(like=source.id, k=5))
    assert source.id not in [h.id for h in hits]
    assert os.path.basename(hits[0].path) == "zz_resized_copy.jpg"
    first = hits[0]
    record = collection.store.get(first.id)
    assert (first.width, first.height, first.path) == (record.width, record.height, record.path) == (96, 72, record.path)
    with pytest.raises(QueryError, match="no indexed image with id 99999"):
        searcher.search(SearchQuery.build(like=99999))
    huge = 10**20  # past SQLite's 64-bit integers: the same answer, not an OverflowError
    with pytest.raises(QueryError, match=f"no indexed image with id {huge}"):
        searcher.search(SearchQuery.build(like=huge))
    assert collection.store.get(huge) is None and collection.store.get_many([huge, source.id]).keys() == {source.id}


def test_text_query_ranks_by_cosine_and_caps_k(indexed, model):
    collection, _ = indexed
    searcher = Searcher(collection, model)
    hits = searcher.search(SearchQuery.build(text="a red square", k=100))
    assert len(hits) == 17
    ids, vectors = collection.store.all_vectors(model.embed_dim)
    query = model.encode_text(["a red square"])[0]
    expected = ids[np.argsort(-(vectors @ query), kind="stable")]
    assert [h.id for h in hits[:5]] == expected[:5].tolist()
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_and_not_and_weights_combine_like_rclip(indexed, model):
    collection, _ = indexed
    searcher = Searcher(collection, model)
    beach, people, sunset = model.encode_text(["beach", "people", "sunset"])
    combined = searcher.query_vector(SearchQuery.build(text="beach", and_texts=["^0.5:sunset"], not_texts=["^2:people"]))
    expected = beach + 0.5 * sunset - 2 * people
    np.testing.assert_allclose(combined.vector, expected / np.linalg.norm(expected), atol=1e-5)
    ranked = searcher.search(SearchQuery.build(text="beach", not_texts=["people"], k=17))
    ids, vectors = collection.store.all_vectors(model.embed_dim)
    direction = (beach - people) / np.linalg.norm(beach - people)
    assert ranked[0].id == int(ids[np.argmax(vectors @ direction)])
    assert parse_weight("^2:beach") == (2.0, "beach")
    assert parse_weight("^.5:sunset") == (0.5, "sunset")
    assert parse_weight("photo: a dog") == (1.0, "photo: a dog")


def test_search_many_answers_each_query_as_its_own_search_would(indexed, model):
    """Plain text queries of the same k share one FAISS call; the others (an image, a like, a filter, a deep k) are
    searched one by one; a query that fails gets its own error and the others still get their hits."""
    from clipsearch.filters import SearchFilter

    collection, folder = indexed
    searcher = Searcher(collection, model)
    source = collection.store.find_by_path(str(folder / "photo_000.png"))
    queries = [
        SearchQuery.build(text="a red square", k=5),
        SearchQuery.build(text="a blue circle", k=5),
        SearchQuery.build(text="beach", not_texts=["^2:people"], k=5),
        SearchQuery.build(text="a red square", k=3),
        SearchQuery.build(text="a red square", k=200),  # deeper than batches take
        SearchQuery.build(image=folder / "photo_000.png", k=4),
        SearchQuery.build(like=source.id, k=4),
        SearchQuery.build(text="a red square", k=5, filter=SearchFilter(orientation="landscape")),
        SearchQuery.build(like=99999),  # fails
    ]
    assert [Searcher.batchable(q) for q in queries] == [True, True, True, True, False, False, False, False, False]
    texts = ["a red square", "a blue circle", "beach", "people"]
    vectors = dict(zip(texts, model.encode_text(texts)))
    calls = []
    index = searcher.index
    original = index.search

    def counted(rows, k, *args, **kwargs):
        calls.append((len(rows), k))
        return original(rows, k, *args, **kwargs)

    index.search = counted
    answers = searcher.search_many(queries, vectors)
    del index.search
    # The four others one by one (the failing one never reaches the index), then the batchable ones: a call per k.
    assert len(calls) == 6 and sorted(calls[-2:]) == [(1, 3), (3, 5)]
    assert isinstance(answers[-1], QueryError) and "99999" in answers[-1].message
    for query, answer in zip(queries[:-1], answers[:-1]):
        alone = searcher.search(query, vectors)
        assert [(h.id, h.path, h.score) for h in answer] == [(h.id, h.path, h.score) for h in alone]
        assert answer
    assert len(answers[4]) == 17


def test_weight_prefix_never_collides_with_ordinary_text():
    # Only "^W:" at the very start is a weight: times, ratios and "N:" stay text.
    for text in ("12:30 sunset", "2:beach", "16:9 panorama", " ^2:leading space", "photo: a dog", "a ^2:b"):
        assert parse_weight(text) == (1.0, text)
    assert parse_weight("^2:beach") == (2.0, "beach")
    assert parse_weight("^0.5: sunset ") == (0.5, "sunset")
    assert parse_weight("^+3:x") == (3.0, "x")
    # A text that really starts with a caret escapes it.
    assert parse_weight("\\^_^ smiley") == (1.0, "^_^ smiley")
    assert parse_weight("\\^2:beach") == (1.0, "^2:beach")
    for bad in ("^-1:people", "^0:beach", "^_^", "^2 beach", "^:beach", "^1e3:x"):
        with pytest.raises(QueryError):
            parse_weight(bad)
    assert parse_weight("^1000000:x") == (1e6, "x")
    # Past a million a weight only overflowed the combined vector, which then read as "terms cancel each other out".
    with pytest.raises(QueryError, match="larger than 1,000,000"):
        parse_weight("^99999999999999999999999999:heart")
    query = SearchQuery.build(text="12:30 sunset", and_texts=["^2:beach"], not_texts=["^0.5:people", "9:00"])
    assert [(t.value, t.weight) for t in query.terms] == [("12:30 sunset", 1.0), ("beach", 2.0), ("people", -0.5),
                                                         ("9:00", -1.0)]


def test_bad_queries_fail_clearly(indexed, model, tmp_path):
    collection, folder = indexed
    searcher = Searcher(collection, model)
    with pytest.raises(QueryError, match="empty query"):
        searcher.search(SearchQuery.build())
    with pytest.raises(QueryError, match="empty text"):
        searcher.search(SearchQuery.build(text="   "))
    with pytest.raises(QueryError, match="longer than"):
        searcher.search(SearchQuery.build(text="dog " * 5000))
    with pytest.raises(QueryError, match="at least one positive"):
        searcher.search(SearchQuery(terms=SearchQuery.build(not_texts=["dog"]).terms))
    with pytest.raises(QueryError, match="cancel"):
        searcher.search(SearchQuery.build(text="dog", not_texts=["dog"]))
    with pytest.raises(QueryError, match="no such file"):
        searcher.search(SearchQuery.build(image=tmp_path / "missing.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match=f"^{re.escape(str(broken))}: (not a recognised|corrupt)"):
        searcher.search(SearchQuery.build(image=broken))  # the file given is named, not "<upload>"
    empty = tmp_path / "zero.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=f"^{re.escape(str(empty))}: empty file"):
        searcher.search(SearchQuery.build(image=empty))
    long_but_fine = searcher.search(SearchQuery.build(text="a photo of a dog " * 200, k=3))  # truncated by the tokenizer
    assert len(long_but_fine) == 3


def test_a_searcher_sees_later_indexing_runs(indexed, model):
    collection, folder = indexed
    searcher = Searcher(collection, model)
    before = searcher.search(SearchQuery.build(text="x", k=100))
    block_image(4242).save(folder / "new.png")
    index_paths(Collection.open("s", collection.folder.parent), model, [str(folder)], IndexOptions(workers=0))
    after = searcher.search(SearchQuery.build(text="x", k=100))
    assert len(after) == len(before) + 1
    assert str(folder / "new.png") in {h.path for h in after}


def test_another_model_cannot_search_a_collection(indexed, tiny_bundle, tmp_path):
    import shutil

    collection, _ = indexed
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    meta = json.loads((other / "model.json").read_text())
    meta["name"] = "not-the-same"
    (other / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CollectionError, match="cannot search it"):
        Searcher(collection, ClipModel(other)).search(SearchQuery.build(text="x"))


def test_search_cli_json_contract_and_errors(indexed, tmp_path):
    collection, folder = indexed
    root = str(collection.folder.parent)
    result = subprocess.run([*CLI, "search", "a dog", "-k", "4", "--collection", "s", "--index-dir", root, "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 4 and all(set(r) == {"id", "path", "score", "width", "height", "missing"} for r in rows)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    plain = subprocess.run([*CLI, "search", "--image", str(folder / "photo_000.png"), "-k", "1", "--collection", "s",
                            "--index-dir", root], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and plain.stdout.split() == ["1", plain.stdout.split()[1], str(folder / "zz_resized_copy.jpg")]
    missing = subprocess.run([*CLI, "search", "x", "--collection", "nope", "--index-dir", root], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 1 and "no collection named 'nope'" in missing.stderr and "Traceback" not in missing.stderr
    empty = subprocess.run([*CLI, "search", "", "--collection", "s", "--index-dir", root], capture_output=True, text=True,
                           timeout=120)
    assert empty.returncode == 1 and "empty text query" in empty.stderr


def test_a_text_side_changed_after_export_answers_no_new_query(indexed, tiny_bundle, tiny_bundles, tmp_path):
    # The collection is bound to visual.onnx's checksum, so a bundle whose text tower or tokenizer was swapped or
    # damaged still opens it: its query vectors would rank every photo by another model's text vectors.
    import shutil

    from clipsearch.errors import BundleError

    collection, folder = indexed
    swapped = tmp_path / "swapped-text"
    shutil.copytree(tiny_bundle, swapped)
    for name in ("textual.onnx", "textual.onnx.data"):
        if (tiny_bundles["int8"] / name).exists():
            shutil.copy(tiny_bundles["int8"] / name, swapped / name)
    model = ClipModel(swapped, threads=1)
    assert model.model_id == ClipModel(tiny_bundle).model_id
    searcher = Searcher(collection, model)
    with pytest.raises(BundleError, match="textual.onnx.* not match the sha256 .* query vectors would not be") as raised:
        searcher.search(SearchQuery.build(text="a never asked query", k=3))
    assert "--verify" in raised.value.hint and not model.textual.loaded
    # The image side is intact: an example image is still answered, by the genuine visual tower.
    hits = searcher.search(SearchQuery.build(image=folder / "photo_000.png", k=1))
    assert os.path.basename(hits[0].path) == "zz_resized_copy.jpg"
    retokenized = tmp_path / "edited-tokenizer"
    shutil.copytree(tiny_bundle, retokenized)
    with open(retokenized / "tokenizer.json", "a", encoding="utf-8") as extra:
        extra.write("\n")
    with pytest.raises(BundleError, match="tokenizer.json does not match"):
        ClipModel(retokenized, threads=1).encode_text(["a dog"])
    done = subprocess.run([*CLI, "search", "another new query", "--model", str(swapped), "--collection", "s",
                           "--index-dir", str(collection.folder.parent)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CLIPSEARCH_HELPER": "0"})
    assert done.returncode == 1 and "query vectors would not be the model's" in done.stderr
    assert "Traceback" not in done.stderr


def test_text_listings_escape_control_characters_in_names_and_null_output_keeps_them(tmp_path, model):
    # A name can clear the screen or retitle the terminal (ESC sequences), or split a listing line (a newline).
    folder = tmp_path / "odd"
    folder.mkdir()
    evil = "evil\x1b[2J\x1b]0;TITLE\x07\nline.png"
    block_image(3).save(folder / evil)
    with Collection.create("odd", tmp_path / "idx") as collection:
        index_paths(collection, model, [str(folder)], IndexOptions(workers=0))
    base = [*CLI, "search", "a picture", "--collection", "odd", "--index-dir", str(tmp_path / "idx")]
    env = {**os.environ, "CLIPSEARCH_HELPER": "0"}
    text = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env)
    assert text.returncode == 0, text.stderr
    assert "\x1b" not in text.stdout and "\x07" not in text.stdout and text.stdout.count("\n") == 1
    assert text.stdout.rstrip("\n").endswith("evil\\x1b[2J\\x1b]0;TITLE\\x07\\nline.png")
    raw = subprocess.run([*base, "-0"], capture_output=True, timeout=120, env=env)
    assert raw.stdout == os.fsencode(str(folder / evil)) + b"\0"
    piped = subprocess.run([*base, "--paths-only"], capture_output=True, timeout=120, env=env)
    assert piped.stdout == os.fsencode(str(folder / evil)) + b"\n"  # into a pipe: exact, for scripts
    from terminal_fixtures import popen_on_terminal, read_terminal

    proc, master = popen_on_terminal([*base, "--paths-only"], "stdout", env, raw=True)
    shown = read_terminal(master)
    assert proc.wait(timeout=120) == 0
    assert b"\x1b" not in shown and b"\x07" not in shown and shown.count(b"\n") == 1  # on a terminal: escaped
    assert shown.endswith(b"evil\\x1b[2J\\x1b]0;TITLE\\x07\\nline.png\n")
    # A file that cannot be indexed is named escaped in the run's "skipped" lines too.
    (folder / "bad\x1b[31mred\nx.jpg").write_bytes(b"not an image")
    skipped = subprocess.run([*CLI, "index", str(folder), "--collection", "odd", "--index-dir", str(tmp_path / "idx"),
                              "--workers", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert skipped.returncode == 0 and "\x1b" not in skipped.stderr
    assert "skipped " + str(folder) + "/bad\\x1b[31mred\\nx.jpg:" in skipped.stderr, skipped.stderr
    duplicates = subprocess.run([*CLI, "duplicates", "--collection", "odd", "--index-dir", str(tmp_path / "idx"),
                                 "--threshold", "0.5"], capture_output=True, text=True, timeout=120, env=env)
    assert duplicates.returncode == 0 and "\x1b" not in duplicates.stdout


def test_in_a_relative_folder_from_a_folder_reached_through_a_link(tmp_path, model):
    # Stored paths keep the link a folder was indexed through; os.getcwd() names the physical folder, the shell's
    # $PWD the linked one. Either way round, --in . finds the photos under the current folder.
    real = tmp_path / "real"
    make_photos(real / "sub", 3)
    (tmp_path / "link").symlink_to(real)
    with Collection.create("linked", tmp_path / "idx") as collection:
        index_paths(collection, model, [str(tmp_path / "link")], IndexOptions(workers=0))
    inside = tmp_path / "link" / "sub"
    base = [*CLI, "search", "a picture", "--collection", "linked", "--index-dir", str(tmp_path / "idx"), "-0"]
    env = {**os.environ, "CLIPSEARCH_HELPER": "0", "PWD": str(inside)}
    here = subprocess.run([*base, "--in", "."], capture_output=True, timeout=120, cwd=inside, env=env)
    assert here.returncode == 0, here.stderr
    assert len(here.stdout.split(b"\0")) - 1 == 3 and all(p.startswith(os.fsencode(inside)) for p in here.stdout.split(b"\0")[:-1])
    doubled = subprocess.run([*base, "--in", "/" + str(inside)], capture_output=True, timeout=120, env=env)
    assert doubled.returncode == 0 and len(doubled.stdout.split(b"\0")) - 1 == 3, doubled.stderr


def test_a_repeated_text_query_is_answered_without_loading_the_text_model(indexed, tiny_bundle):
    collection, _ = indexed
    first_model = ClipModel(tiny_bundle, threads=1)
    first = Searcher(collection, first_model).search(SearchQuery.build(text="a cat on a sofa", k=5))
    assert first_model.textual.loaded
    fresh_model = ClipModel(tiny_bundle, threads=1)
    again = Searcher(collection, fresh_model).search(SearchQuery.build(text="a cat on a sofa", k=5))
    assert not fresh_model.textual.loaded and not fresh_model.visual.loaded
    assert [(h.id, h.score) for h in again] == [(h.id, h.score) for h in first]


def test_model_is_checked_even_when_the_query_text_is_cached(indexed, tiny_bundle, tmp_path):
    import shutil

    from clipsearch.errors import ModelNotAvailable

    collection, _ = indexed
    Searcher(collection, ClipModel(tiny_bundle, threads=1)).search(SearchQuery.build(text="a cached query", k=3))
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    meta = json.loads((other / "model.json").read_text())
    meta["name"] = "not-the-same"
    (other / "model.json").write_text(json.dumps(meta))
    query = SearchQuery.build(text="a cached query", k=3)
    with pytest.raises(CollectionError, match="cannot search it"):
        Searcher(collection, model_spec=str(other)).search(query)
    with pytest.raises(ModelNotAvailable, match="no model 'no-such-model'"):
        Searcher(collection, model_spec="no-such-model").search(query)
    # The collection's own model given explicitly: validated from model.json, still not loaded for a cached text.
    same = Searcher(collection, model_spec=str(tiny_bundle))
    assert len(same.search(query)) == 3 and same._model is None
    root = str(collection.folder.parent)
    for spec, message in ((str(other), "cannot search it"), ("no-such-model", "no model 'no-such-model'")):
        result = subprocess.run([*CLI, "search", "a cached query", "--collection", "s", "--index-dir", root,
                                 "--model", spec], capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_a_cached_search_never_imports_sqlite_utils_and_keeps_the_cache_recent(indexed, tiny_bundle):
    collection, _ = indexed
    Searcher(collection, ClipModel(tiny_bundle, threads=1)).search(SearchQuery.build(text="beach at noon", k=3))
    collection.store.conn.execute("UPDATE text_cache SET used_at = 1.0")  # last used long ago
    collection.store.conn.commit()
    script = ("import sys, json; from clipsearch.search import SearchQuery, Searcher\n"
              f"s = Searcher.open('s', {str(collection.folder.parent)!r})\n"
              "hits = s.search(SearchQuery.build(text='beach at noon', k=3))\n"
              "print(json.dumps([len(hits), 'sqlite_utils' in sys.modules, s._model is None]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [3, False, True]
    used_at = collection.store.conn.execute("SELECT used_at FROM text_cache WHERE text = 'beach at noon'").fetchone()[0]
    assert used_at > 1.0  # the hit marked the row as recently used


def test_search_by_a_fifo_or_device_is_refused_not_hung(indexed, tmp_path):
    collection, _ = indexed
    root = str(collection.folder.parent)
    fifo = tmp_path / "query.jpg"
    os.mkfifo(fifo)  # nobody ever writes to it: opening it for reading would block forever
    for target, reason in ((fifo, "not a regular file (fifo)"), (Path("/dev/zero"), "not a regular file")):
        result = subprocess.run([*CLI, "search", "--image", str(target), "--collection", "s", "--index-dir", root],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert reason in result.stderr and "Traceback" not in result.stderr


def test_a_changed_text_graph_never_answers_from_the_old_graphs_cached_vectors(tmp_path, tiny_bundles):
    """The model id follows the image tower, so a bundle whose text graph is replaced (a new int8 recipe) keeps
    its collections; their query cache must not keep answering with the old text graph's vectors."""
    import json
    import shutil

    from clipsearch.model.bundle import write_model_json

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["fp32"], bundle)
    folder = tmp_path / "photos"
    make_photos(folder, 4)
    collection = Collection.create("t", tmp_path / "idx")
    index_paths(collection, ClipModel(bundle, threads=1), [str(folder)], IndexOptions(batch_size=8, workers=1))
    old = Searcher(collection).text_vectors(["a cached query"])["a cached query"]

    for name in ("textual.onnx", "textual.onnx.data"):  # the int8 export's text graph, same image tower
        (bundle / name).unlink(missing_ok=True)
        if (tiny_bundles["int8"] / name).exists():
            shutil.copyfile(tiny_bundles["int8"] / name, bundle / name)
    meta = json.loads((bundle / "model.json").read_text(encoding="utf-8"))
    write_model_json(bundle, meta)
    new_model = ClipModel(bundle, threads=1)
    assert new_model.model_id == collection.require_model().model_id  # same vector space: still searchable

    fresh = Searcher(Collection.open("t", tmp_path / "idx")).text_vectors(["a cached query"])["a cached query"]
    expected = new_model.encode_text(["a cached query"])[0]
    assert np.allclose(fresh, expected, atol=1e-6) and not np.allclose(fresh, old, atol=1e-4)


def test_an_empty_collection_says_so_when_indexed_and_when_searched(tmp_path, tiny_bundle):
    # Both were silent and exited 0: a user could not tell an empty collection from a query that matched nothing.
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.jpg").write_text("not an image")
    env = {**os.environ, "CLIPSEARCH_HOME": str(tmp_path / "home")}
    root = str(tmp_path / "idx")
    for folder, why in (("empty", f"no image files were found in {tmp_path / 'empty'}"),
                        ("notes", "none of the files found could be read")):
        indexed = subprocess.run([*CLI, "index", str(tmp_path / folder), "-c", folder, "--index-dir", root, "--model",
                                  str(tiny_bundle)], capture_output=True, text=True, env=env, timeout=120)
        assert indexed.returncode == 0, indexed.stderr
        assert f"note: collection {folder} holds no images: {why}" in indexed.stderr
        assert "img/s" not in indexed.stdout  # no "0.0 img/s" for a run that embedded nothing
        assert "ITM image tokens" not in indexed.stdout
        found = subprocess.run([*CLI, "search", "a dog", "-c", folder, "--index-dir", root], capture_output=True,
                               text=True, env=env, timeout=120)
        assert found.returncode == 0 and found.stdout == ""
        assert f"no results: collection '{folder}' has no images yet" in found.stderr
        assert f"clipsearch index FOLDER --collection {folder}" in found.stderr


def test_a_text_query_that_names_an_image_file_or_url_gets_a_note(tmp_path, model):
    folder = tmp_path / "pics"
    make_photos(folder, 2)
    with Collection.create("named", tmp_path / "idx") as collection:
        index_paths(collection, model, [str(folder)], IndexOptions(workers=0))
    base = [*CLI, "search", "--collection", "named", "--index-dir", str(tmp_path / "idx"), "-k", "1"]
    env = {**os.environ, "CLIPSEARCH_HELPER": "0"}
    photo = str(next(folder.glob("*.png")))
    named = subprocess.run([*base, photo], capture_output=True, text=True, timeout=120, env=env)
    assert named.returncode == 0 and f"to search by that image use --image {photo}" in named.stderr
    url = subprocess.run([*base, "https://example.com/cat.jpg"], capture_output=True, text=True, timeout=120, env=env)
    assert url.returncode == 0 and "searching the words of the URL" in url.stderr
    words = subprocess.run([*base, "a red square"], capture_output=True, text=True, timeout=120, env=env)
    assert words.returncode == 0 and "note:" not in words.stderr


def test_a_collections_bundle_moved_or_replaced_is_named_as_such(tmp_path, tiny_bundle):
    import json as _json

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    meta = _json.loads((bundle / "model.json").read_text())
    meta["name"] = "tiny-of-this-test"  # a name no model cache or bundled model answers to
    (bundle / "model.json").write_text(_json.dumps(meta))
    folder = tmp_path / "pics"
    make_photos(folder, 2)
    with Collection.create("mv", tmp_path / "idx") as collection:
        index_paths(collection, ClipModel(bundle, threads=1), [str(folder)], IndexOptions(workers=0))
    base = [*CLI, "search", "a red square", "--collection", "mv", "--index-dir", str(tmp_path / "idx")]
    env = {**os.environ, "CLIPSEARCH_HELPER": "0"}
    moved = tmp_path / "moved"
    bundle.rename(moved)
    gone = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env)
    assert gone.returncode == 1 and f"whose bundle was at {bundle} and is not there any more" in gone.stderr, gone
    assert "pass --model with its new folder" in gone.stderr and "Traceback" not in gone.stderr
    assert subprocess.run([*base, "--model", str(moved)], capture_output=True, timeout=120, env=env).returncode == 0
    index = subprocess.run([*CLI, "index", str(folder), "--collection", "mv", "--index-dir", str(tmp_path / "idx"),
                            "--workers", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert index.returncode == 1 and "is not there any more" in index.stderr
    # Another model now where the collection's bundle was (exported over it, say).
    shutil.copytree(moved, bundle)
    meta = _json.loads((bundle / "model.json").read_text())
    meta["name"] = "someone-else"
    (bundle / "model.json").write_text(_json.dumps(meta))
    replaced = subprocess.run([*base[:4], "a new text", *base[5:]], capture_output=True, text=True, timeout=120,
                              env=env)  # a text not in the query cache: the model is loaded
    assert replaced.returncode == 1 and f"but {bundle} holds model someone-else@" in replaced.stderr
    assert "the bundle there was replaced" in replaced.stderr
    assert "Leave out --model" not in replaced.stderr
