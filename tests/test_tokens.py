"""ITM image tokens stored at index time (issue 9): the int8 quantiser's error bound, tokens equal to what the
visual graph gives, the memory-mapped file agreeing with SQLite (and stale rows read from SQLite), re-ranking
from stored tokens ranking as fresh tokens do, collections without tokens explaining how to add them and
`index --tokens` adding them incrementally, deletions, `check` finding damaged rows, the per-collection choice
(remembered; big heads only on request), fp16 storage and the bundle's itc_weight, and SIGKILLs mid-index
leaving tokens consistent.

The model is the tiny random BLIP (blip_fixtures.py) (17 tokens x 32: 612 bytes/image as int8)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.errors import CollectionError, QueryError
from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.runner import index_paths
from clipsearch.model.runtime import ClipModel
from clipsearch.search import SearchQuery, Searcher
from clipsearch.store.collection import Collection
from clipsearch.store.tokens import TOKENS_FILE, TokenCodec, TokenFile, dequantize_int8, quantize_int8
from photo_fixtures import block_image, make_photos
from test_processes import session_processes, wait_until_gone

NAME = "tok"
PHOTOS = 12
TEXT = "a dog on a beach"
CLI = [sys.executable, "-c", "from clipsearch.cli import main; main()"]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def _index(folder: Path, index_dir: Path, bundle: Path, tokens: bool | None = None, name: str = NAME):
    with Collection.create(name, index_dir) as collection:
        return index_paths(collection, ClipModel(bundle, threads=1), [str(folder)],
                           IndexOptions(batch_size=5, workers=0, tokens=tokens))


@pytest.fixture(scope="module")
def model(blip_bundle) -> ClipModel:
    return ClipModel(blip_bundle, threads=1)


@pytest.fixture(scope="module")
def indexed(blip_bundle, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tokens")
    make_photos(root / "photos", PHOTOS)
    summary = _index(root / "photos", root / "collections", blip_bundle)
    assert summary.added == PHOTOS and summary.tokens == "int8" and summary.token_bytes_per_image == 17 * 32 + 17 * 4
    return root / "photos", root / "collections"


def _stored(collection: Collection) -> dict[int, np.ndarray]:
    codec = collection.token_codec
    blobs = collection.store.token_blobs(collection.store.ids().tolist())
    return {i: codec.decode([b])[0] for i, b in blobs.items()}


def test_int8_quantiser_error_is_at_most_half_a_step_of_each_token():
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((7, 10, 256)).astype(np.float32) * rng.uniform(0.01, 50, (7, 10, 1)).astype(np.float32)
    tokens[0, 3] = 0.0  # an all-zero token
    tokens[1, 2, 5] = 1e4  # one outlier: only its own token gets a coarse step
    values, scales = quantize_int8(tokens)
    assert values.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (7, 10)
    error = np.abs(dequantize_int8(values, scales) - tokens)
    bound = np.abs(tokens).max(axis=-1, keepdims=True) / 254
    assert (error <= bound * (1 + 1e-5) + 1e-12).all()
    assert error[0, 3].max() == 0.0 and scales[0, 3] == 0.0
    assert error[1, 1].max() < 1e-2 * np.abs(tokens[1, 1]).max()  # the outlier's neighbours keep their precision

    codec = TokenCodec("int8", (10, 256))
    assert codec.bytes_per_image == 2600  # the emoji-mini head: 10 tokens x 256, ~2.6 KB
    blobs = codec.encode(tokens)
    assert all(len(b) == 2600 for b in blobs)
    assert np.array_equal(codec.decode(blobs), dequantize_int8(values, scales))
    half = TokenCodec("fp16", (10, 256))
    assert half.bytes_per_image == 5120
    assert np.abs(half.decode(half.encode(tokens[2:])) - tokens[2:]).max() <= np.abs(tokens[2:]).max() / 1024
    assert TokenCodec("int8", (577, 768)).bytes_per_image == 577 * 768 + 577 * 4  # BLIP-base: ~445 KB
    with pytest.raises(CollectionError, match="do not match"):
        codec.encode(tokens[:, :5])
    assert not codec.valid(blobs[0][:-1]) and not codec.valid(np.float32(np.nan).tobytes() + blobs[0][4:])


def test_tokens_stored_at_index_time_equal_the_visual_graphs(indexed, model, blip_bundle):
    folder, index_dir = indexed
    with Collection.open(NAME, index_dir) as collection:
        assert collection.check().ok, collection.check().problems
        assert collection.tokens_setting == "on" and collection.token_codec == TokenCodec("int8", (17, 32))
        stored = _stored(collection)
        records = collection.store.get_many(stored)
        assert set(stored) == set(collection.store.ids().tolist())
        mapped = TokenFile(collection.folder / TOKENS_FILE)
        assert mapped.count == PHOTOS and mapped.tokens_gen == collection.store.tokens_generation
        from_file = mapped.tokens([mapped.rows(list(stored))[i] for i in stored])
        assert np.array_equal(from_file, np.stack(list(stored.values())))
        stats = collection.stats()
        assert (stats.tokens, stats.tokens_stored, stats.token_bytes_per_image) == ("on", PHOTOS, 612)
    ids = sorted(stored)
    fresh = model.image_tokens([Image.open(records[i].path).convert("RGB") for i in ids])
    got = np.stack([stored[i] for i in ids])
    bound = np.abs(fresh).max(axis=-1, keepdims=True) / 254
    excess = np.abs(got - fresh) - bound
    print("largest |stored - fresh| beyond the int8 bound:", float(excess.max()))
    assert excess.max() < 1e-3  # the quantiser's bound, plus the reader's resize against image_to_pixels'

    checked = _cli("check", "--collection", NAME, "--index-dir", str(index_dir))
    assert checked.returncode == 0 and f"{PHOTOS} with ITM tokens (612 bytes/image)" in checked.stdout
    stats = _cli("stats", "--collection", NAME, "--index-dir", str(index_dir))
    assert f"tokens       {PHOTOS} images, int8 17x32, 612 bytes/image" in stats.stdout


def test_reranking_from_stored_tokens_orders_as_fresh_tokens_do(indexed, model):
    _, index_dir = indexed
    with Searcher(Collection.open(NAME, index_dir), model) as searcher:
        itc = searcher.search(SearchQuery.build(text=TEXT, k=PHOTOS))
        ranked = searcher.search(SearchQuery.build(text=TEXT, k=PHOTOS, rerank=True, rerank_k=PHOTOS))
        records = searcher.records([h.id for h in itc])
    fresh = model.image_tokens([Image.open(records[h.id].path).convert("RGB") for h in itc])
    itm = model.itm.score(TEXT, fresh)
    finals = itm.match_logit + np.array([h.score for h in itc])
    expected = [itc[i].id for i in sorted(range(len(itc)), key=lambda i: (-finals[i], i))]
    assert [h.id for h in ranked] == expected
    assert np.abs(np.array([h.score for h in ranked]) - np.sort(finals)[::-1]).max() < 0.02
    assert [h.id for h in ranked] != [h.id for h in itc]
    # only within the top k; min_match keeps only confident ones
    top = 5
    with Searcher(Collection.open(NAME, index_dir), model) as searcher:
        part = searcher.search(SearchQuery.build(text=TEXT, k=PHOTOS, rerank=True, rerank_k=top))
        assert {h.id for h in part[:top]} == {h.id for h in itc[:top]} and part[top:] == itc[top:]
        threshold = sorted(h.match for h in ranked)[PHOTOS // 2]
        kept = searcher.search(SearchQuery.build(text=TEXT, k=PHOTOS, rerank=True, rerank_k=PHOTOS, min_match=threshold))
        assert kept and all(h.match >= threshold for h in kept) and len(kept) < PHOTOS


def test_stale_token_file_rows_come_from_sqlite(indexed, model, tmp_path):
    folder, index_dir = indexed
    copy = tmp_path / "collections"
    shutil.copytree(index_dir, copy)
    with Searcher(Collection.open(NAME, copy), model) as searcher:
        store = searcher.collection.store
        ids = store.ids().tolist()
        before = searcher.stored_tokens(ids)
        codec = searcher.collection.token_codec
        changed = np.full((1, 17, 32), 0.5, dtype=np.float32)
        assert store.write_tokens([(ids[0], codec.encode(changed)[0])]) == 1  # tokens.bin is now stale
        assert store.write_tokens([(10 ** 9, codec.encode(changed)[0])]) == 0  # no such image: nothing written
        after = searcher.stored_tokens(ids)
        assert np.allclose(after[ids[0]], 0.5, atol=0.5 / 254)
        assert all(np.array_equal(after[i], before[i]) for i in ids[1:])
        report = searcher.collection.check()
        assert any("tokens generation" in p for p in report.problems), report.problems
        searcher.collection.update_vectors()  # what the next indexing run does
        assert searcher.collection.check().ok
        assert np.array_equal(searcher.stored_tokens(ids)[ids[0]], after[ids[0]])


def test_a_collection_without_tokens_explains_and_index_tokens_adds_them(blip_bundle, tmp_path):
    folder, index_dir = tmp_path / "photos", tmp_path / "collections"
    make_photos(folder, 8)
    base = ["--collection", NAME, "--index-dir", str(index_dir), "--model", str(blip_bundle), "--workers", "0"]
    done = _cli("index", str(folder), *base, "--no-tokens", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tokens"] == ""
    with Collection.open(NAME, index_dir) as collection:
        assert collection.tokens_setting == "off" and collection.store.count_tokens() == 0
        vectors = dict(zip(*collection.store.all_vectors(24)))
        assert collection.check().ok
    search = ["search", TEXT, "--rerank", "--collection", NAME, "--index-dir", str(index_dir)]
    refused = _cli(*search)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "has no stored image tokens" in refused.stderr and "--tokens" in refused.stderr
    assert f"clipsearch index {folder} --collection {NAME} --tokens" in refused.stderr
    with Searcher(Collection.open(NAME, index_dir), ClipModel(blip_bundle, threads=1)) as searcher:
        with pytest.raises(QueryError, match="no stored image tokens") as caught:
            searcher.search(SearchQuery.build(text=TEXT, rerank=True))
        assert "--tokens" in caught.value.hint

    # A later run without the flag keeps the remembered choice.
    again = _cli("index", str(folder), *base, "--json")
    assert json.loads(again.stdout)["tokens"] == "" and json.loads(again.stdout)["tokens_added"] == 0

    added = _cli("index", str(folder), *base, "--tokens")
    assert added.returncode == 0, added.stderr
    assert "storing ITM image tokens (int8 17x32, 612 B/image)" in added.stderr
    assert "0 added, 0 updated" in added.stdout and "8 unchanged" in added.stdout
    assert "ITM image tokens: int8, 612 B/image, 8 added to indexed images" in added.stdout
    with Collection.open(NAME, index_dir) as collection:
        assert collection.check().ok, collection.check().problems
        assert collection.store.count_tokens() == 8 and collection.tokens_setting == "on"
        after = dict(zip(*collection.store.all_vectors(24)))
        assert vectors.keys() == after.keys() and all(np.array_equal(vectors[i], after[i]) for i in vectors)
    ranked = _cli(*search, "--json")
    assert ranked.returncode == 0, ranked.stderr
    assert all(r["match"] is not None for r in json.loads(ranked.stdout))

    # New files from now on get their tokens with their vectors; --no-tokens drops them all.
    block_image(777).save(folder / "new.png")
    more = json.loads(_cli("index", str(folder), *base, "--json").stdout)
    assert more["added"] == 1 and more["tokens"] == "int8" and more["tokens_added"] == 0
    with Collection.open(NAME, index_dir) as collection:
        assert collection.store.count_tokens() == 9 and collection.check().ok
    _cli("index", str(folder), *base, "--no-tokens")
    with Collection.open(NAME, index_dir) as collection:
        assert collection.store.count_tokens() == 0 and not (collection.folder / TOKENS_FILE).exists()
        assert collection.check().ok


def test_an_older_collection_gets_tokens_from_a_plain_rerun(blip_bundle, tmp_path):
    folder, index_dir = tmp_path / "photos", tmp_path / "collections"
    make_photos(folder, 6)
    _index(folder, index_dir, blip_bundle, tokens=False)
    with Collection.open(NAME, index_dir) as collection:  # as if indexed before tokens existed
        with collection.store.conn:
            collection.store.conn.execute("DELETE FROM meta WHERE key IN ('tokens', 'tokens_storage', 'tokens_shape')")
            collection.store.conn.execute("PRAGMA user_version = 2")
            collection.store.conn.execute("DROP TABLE image_tokens")
    with Collection.open(NAME, index_dir) as collection:  # migrated to v3 on open
        assert collection.store.conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert collection.tokens_setting is None and collection.check().ok
    summary = _index(folder, index_dir, blip_bundle)
    assert summary.tokens_added == 6 and summary.unchanged == 6 and summary.added == 0
    with Collection.open(NAME, index_dir) as collection:
        assert collection.check().ok and collection.store.count_tokens() == 6


def test_big_heads_store_tokens_only_when_asked(blip_bundle, tmp_path):
    model = ClipModel(blip_bundle, threads=1)
    collection = Collection.create(NAME, tmp_path)
    assert collection.choose_tokens(model, None).codec == TokenCodec("int8", (17, 32))
    big = collection.choose_tokens(model, None, max_default_bytes=600)
    assert big.codec is None and "612 B/image" in big.reason and "--tokens" in big.reason
    assert collection.choose_tokens(model, True, max_default_bytes=600).codec is not None
    assert collection.choose_tokens(model, False).codec is None


def test_a_model_without_an_itm_head_refuses_tokens(tiny_bundle, tmp_path):
    make_photos(tmp_path / "photos", 2)
    with Collection.create(NAME, tmp_path / "c") as collection:
        with pytest.raises(CollectionError, match="has no ITM head"):
            index_paths(collection, ClipModel(tiny_bundle, threads=1), [str(tmp_path / "photos")],
                        IndexOptions(workers=0, tokens=True))
        summary = index_paths(collection, ClipModel(tiny_bundle, threads=1), [str(tmp_path / "photos")],
                              IndexOptions(workers=0))
        assert summary.tokens == "" and collection.store.count_tokens() == 0 and collection.check().ok


def test_deleted_and_changed_files_lose_or_replace_their_tokens(blip_bundle, tmp_path):
    folder, index_dir = tmp_path / "photos", tmp_path / "collections"
    paths = make_photos(folder, 6)
    _index(folder, index_dir, blip_bundle)
    with Collection.open(NAME, index_dir) as collection:
        ids = {r.path: r.id for r in collection.store.get_many(collection.store.ids()).values()}
        before = _stored(collection)
    os.remove(paths[0])
    block_image(999).save(paths[1])  # same path, new bytes: same id, new tokens
    summary = _index(folder, index_dir, blip_bundle)
    assert summary.removed == 1 and summary.updated == 1
    with Collection.open(NAME, index_dir) as collection:
        assert collection.check().ok, collection.check().problems
        after = _stored(collection)
        gone, changed = ids[str(paths[0])], ids[str(paths[1])]
        assert gone not in after and gone not in TokenFile(collection.folder / TOKENS_FILE).rows([gone])
        assert not np.array_equal(after[changed], before[changed])
        assert all(np.array_equal(after[i], before[i]) for i in after if i != changed)
        # A copy of an indexed image reuses its vector and its tokens.
    shutil.copy(paths[2], folder / "copy.png")
    summary = _index(folder, index_dir, blip_bundle)
    assert summary.reused == 1
    with Collection.open(NAME, index_dir) as collection:
        copy = collection.store.find_by_path(str(folder / "copy.png")).id
        assert np.array_equal(_stored(collection)[copy], before[ids[str(paths[2])]]) and collection.check().ok


def test_check_flags_damaged_missing_and_mismatched_tokens(indexed, tmp_path):
    _, index_dir = indexed
    copy = tmp_path / "collections"
    shutil.copytree(index_dir, copy)

    def problems() -> list[str]:
        with Collection.open(NAME, copy) as collection:
            return collection.check().problems

    with Collection.open(NAME, copy) as collection:
        ids = collection.store.ids().tolist()
        conn = collection.store.conn
        with conn:
            conn.execute("UPDATE image_tokens SET data = substr(data, 1, 100) WHERE id = ?", [ids[0]])
    found = problems()
    assert any("wrong size" in p and str(ids[0]) in p for p in found), found
    done = _cli("check", "--collection", NAME, "--index-dir", str(copy))
    assert done.returncode == 1 and "wrong size" in done.stderr

    with Collection.open(NAME, copy) as collection:
        with collection.store.conn:
            collection.store.conn.execute("DELETE FROM image_tokens WHERE id = ?", [ids[0]])
            blob = collection.store.token_blobs([ids[1]])[ids[1]]
            collection.store.conn.execute("UPDATE image_tokens SET data = ? WHERE id = ?",
                                          [np.float32(np.nan).tobytes() + blob[4:], ids[1]])
    found = problems()
    assert any("1 of 12 images have no stored image tokens" in p for p in found), found
    assert any("non-finite" in p and str(ids[1]) in p for p in found), found
    # A row whose file is not here (imported from another machine) cannot get tokens: not a problem to fix.
    with Collection.open(NAME, copy) as collection:
        with collection.store.conn:
            collection.store.conn.execute("UPDATE images SET path = ? WHERE id = ?", ["/elsewhere/imported.png", ids[0]])
    assert not any("have no stored image tokens" in p for p in problems())

    shutil.rmtree(copy)
    shutil.copytree(index_dir, copy)
    token_file = copy / NAME / TOKENS_FILE
    data = bytearray(token_file.read_bytes())
    data[-5] ^= 0x55  # one value of the last image's tokens
    token_file.write_bytes(bytes(data))
    found = problems()
    assert any("differ from the ones in SQLite" in p for p in found), found
    token_file.unlink()
    found = problems()
    assert any(f"{TOKENS_FILE} is missing" in p for p in found), found
    with Collection.open(NAME, copy) as collection:  # the next run writes it again
        collection.update_vectors()
    assert problems() == []


def test_fp16_storage_and_the_bundles_itc_weight(blip_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(blip_bundle, bundle)
    meta = json.loads((bundle / "model.json").read_text())
    meta["itm"].update(image_tokens_storage="fp16", itc_weight=0.0)
    (bundle / "model.json").write_text(json.dumps(meta))
    make_photos(tmp_path / "photos", 6)
    summary = _index(tmp_path / "photos", tmp_path / "c", bundle)
    assert summary.tokens == "fp16" and summary.token_bytes_per_image == 17 * 32 * 2
    model = ClipModel(bundle, threads=1)
    with Searcher(Collection.open(NAME, tmp_path / "c"), model) as searcher:
        assert searcher.collection.check().ok
        hits = searcher.search(SearchQuery.build(text=TEXT, k=6, rerank=True, rerank_k=6))
        records = searcher.records([h.id for h in hits])
    fresh = model.image_tokens([Image.open(records[h.id].path).convert("RGB") for h in hits])
    itm = model.itm.score(TEXT, fresh)
    # λ = 0: the final score is the ITM match logit alone
    assert np.abs(np.array([h.score for h in hits]) - itm.match_logit).max() < 0.02
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def _committed(root: Path, what: str) -> int:
    try:
        with Collection.open(NAME, root) as peek:
            return peek.store.count() if what == "images" else peek.store.count_tokens()
    except Exception:  # not created yet, or mid-creation
        return 0


def _kill_when(command: list[str], root: Path, what: str, target: int) -> bool:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               preexec_fn=lambda: os.nice(19))
    deadline = time.monotonic() + 300
    while process.poll() is None and _committed(root, what) < target and time.monotonic() < deadline:
        time.sleep(0.01)
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert wait_until_gone(process.pid) == [], session_processes(process.pid)
    return killed


def _consistent(root: Path, complete: bool) -> tuple[int, int]:
    """No token row lacks an image and every blob has the right size, even right after a SIGKILL; `complete`:
    every image has its tokens too (they are written in the same transaction as its vector)."""
    with Collection.open(NAME, root) as collection:
        store = collection.store
        assert np.array_equal(store.ids(), store.token_ids()) or not complete
        assert not len(np.setdiff1d(store.token_ids(), store.ids()))
        assert store.token_blob_sizes() in ({}, {collection.token_codec.bytes_per_image: store.count_tokens()})
        return store.count(), store.count_tokens()


@pytest.mark.slow
def test_sigkill_mid_index_and_mid_backfill_leaves_tokens_consistent(blip_bundle, tmp_path):
    total = 160
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(total):
        block_image(5000 + i, size=(48, 48)).save(folder / f"{i:04d}.png")
    root = tmp_path / "idx"
    command = [*CLI, "index", str(folder), "--collection", NAME, "--index-dir", str(root), "--model", str(blip_bundle),
               "--workers", "1", "--threads", "1", "--batch-size", "2", "--json"]
    assert _kill_when(command, root, "images", total // 3)
    images, tokens = _consistent(root, complete=True)
    assert 0 < images < total and images == tokens
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    with Collection.open(NAME, root) as collection:
        assert collection.check().ok and collection.store.count_tokens() == total

    # Turn tokens off, then on again with --tokens, killed while it adds them: the next plain run finishes.
    assert subprocess.run([*command, "--no-tokens"], capture_output=True, timeout=600).returncode == 0
    assert _kill_when([*command, "--tokens"], root, "tokens", total // 3)
    images, tokens = _consistent(root, complete=False)
    assert images == total and 0 < tokens < total
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["tokens_added"] == total - tokens and summary["added"] == 0
    with Collection.open(NAME, root) as collection:
        assert collection.check().ok and collection.store.count_tokens() == total


def test_tokens_of_another_itm_head_are_refused_and_an_index_run_recomputes_them(blip_bundle, tmp_path):
    """A re-trained head keeps the model id (its embedding is unchanged) but changes the tokens: tokens recorded
    as made by another visual graph are not re-ranked with, and the next index run computes them again."""
    folder, index_dir = tmp_path / "photos", tmp_path / "collections"
    make_photos(folder, 6)
    _index(folder, index_dir, blip_bundle)
    made_by = ClipModel(blip_bundle, threads=1).info.files["visual.onnx"]
    with Collection.open(NAME, index_dir) as collection:
        assert collection.store.get_meta("tokens_source") == made_by
        collection.store.set_meta({"tokens_source": "0" * 64})  # as if an earlier head had made them
    with Searcher(Collection.open(NAME, index_dir), ClipModel(blip_bundle, threads=1)) as searcher:
        with pytest.raises(QueryError, match="another ITM head") as caught:
            searcher.search(SearchQuery.build(text=TEXT, rerank=True))
        assert f"clipsearch index {folder} --collection {NAME}" in caught.value.hint
    summary = _index(folder, index_dir, blip_bundle)
    assert summary.unchanged == 6 and summary.added == 0 and summary.tokens_added == 6
    with Collection.open(NAME, index_dir) as collection:
        assert collection.store.get_meta("tokens_source") == made_by and collection.check().ok
    with Searcher(Collection.open(NAME, index_dir), ClipModel(blip_bundle, threads=1)) as searcher:
        hits = searcher.search(SearchQuery.build(text=TEXT, rerank=True, k=6))
        assert len(hits) == 6 and all(h.match is not None for h in hits)

    # Tokens stored before their source was recorded are trusted by search but computed again by the next run.
    with Collection.open(NAME, index_dir) as collection:
        with collection.store.conn:
            collection.store.conn.execute("DELETE FROM meta WHERE key = 'tokens_source'")
    with Searcher(Collection.open(NAME, index_dir), ClipModel(blip_bundle, threads=1)) as searcher:
        assert len(searcher.search(SearchQuery.build(text=TEXT, rerank=True, k=3))) == 3
    assert _index(folder, index_dir, blip_bundle).tokens_added == 6
