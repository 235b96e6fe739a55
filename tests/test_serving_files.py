"""/api/images/{id}/file and /thumbnail serve only the bytes that were indexed: a path re-pointed or replaced
after indexing (a symlink swapped to /etc/passwd, another file, a non-image of the same size and mtime, a
FIFO) is 404 or 410 with a JSON error, and symlinks that resolve outside the indexed folders are never
followed."""

from __future__ import annotations

import io
import os
import shutil

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipsearch.web import ServerSettings, create_app
from web_fixtures import TEST_HOSTS, IndexedPhotos, app_settings, build_indexed_photos


@pytest.fixture
def indexed(tmp_path, tiny_bundle) -> IndexedPhotos:
    return build_indexed_photos(tmp_path, tiny_bundle, count=3)


@pytest.fixture
def client(indexed):
    with TestClient(create_app(app_settings(indexed))) as test_client:
        yield test_client


def _id(indexed: IndexedPhotos, name: str) -> int:
    return next(i for p, i in indexed.ids_by_path.items() if p.endswith("/" + name))


def _path(indexed: IndexedPhotos, name: str):
    return next(p for p in indexed.photos if p.name == name)


def _both(client: TestClient, image_id: int) -> list:
    return [client.get(f"/api/images/{image_id}{suffix}") for suffix in ("/file", "/thumbnail")]


def test_unchanged_files_are_served(client, indexed):
    path = _path(indexed, "photo_000.png")
    file, thumbnail = _both(client, _id(indexed, "photo_000.png"))
    assert file.status_code == 200 and file.content == path.read_bytes()
    assert file.headers["content-length"] == str(path.stat().st_size)
    assert thumbnail.status_code == 200 and Image.open(io.BytesIO(thumbnail.content)).format == "JPEG"


def test_a_download_of_the_original_can_resume_with_a_byte_range(client, indexed):
    path = _path(indexed, "big.jpg")
    data, size = path.read_bytes(), path.stat().st_size
    url = f"/api/images/{_id(indexed, 'big.jpg')}/file"
    whole = client.get(url)
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    for asked, (start, end) in (("bytes=0-9", (0, 9)), ("bytes=100-", (100, size - 1)), ("bytes=-50", (size - 50, size - 1)),
                                (f"bytes=10-{size + 500}", (10, size - 1))):
        part = client.get(url, headers={"Range": asked})
        assert part.status_code == 206, (asked, part.text)
        assert part.content == data[start:end + 1] and part.headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert part.headers["content-length"] == str(end - start + 1)
    past = client.get(url, headers={"Range": f"bytes={size}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}" and past.json()["hint"]
    # Several ranges, another unit or nonsense: the whole file (a server may ignore Range).
    for ignored in ("bytes=0-1,5-6", "items=0-1", "bytes=x-y", "bytes=5-3"):
        assert client.get(url, headers={"Range": ignored}).content == data
    etag = whole.headers["etag"]
    assert client.get(url, headers={"Range": "bytes=0-9", "If-Range": etag}).status_code == 206
    stale = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"another-version"'})
    assert stale.status_code == 200 and stale.content == data  # another version than the download's: all of it
    weak = client.get(url, headers={"Range": "bytes=0-9", "If-Range": "W/" + etag})
    assert weak.status_code == 200  # If-Range compares strongly
    path.unlink()  # gone: a 404 whatever range is asked
    assert client.get(url, headers={"Range": f"bytes={size}-"}).status_code == 404


def test_a_file_swapped_for_a_symlink_to_etc_passwd_is_not_served(client, indexed):
    image_id = _id(indexed, "photo_001.jpg")
    assert client.get(f"/api/images/{image_id}/thumbnail").status_code == 200  # a cached thumbnail exists now
    path = _path(indexed, "photo_001.jpg")
    path.unlink()
    path.symlink_to("/etc/passwd")
    for response in _both(client, image_id):
        assert response.status_code == 404, response.text
        assert response.headers["content-type"] == "application/json"
        assert b"root:" not in response.content and "/etc" not in response.text


def test_an_indexed_symlink_to_outside_the_indexed_folders_is_never_followed(tmp_path, tiny_bundle):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (40, 30), "red").save(outside / "private.png")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 30), "blue").save(photos / "own.png")
    (photos / "link.png").symlink_to(outside / "private.png")  # indexed through the link (walk follows files)
    (photos / "alias.png").symlink_to(photos / "own.png")      # a link inside the indexed folder is fine
    from clipsearch.store.collection import Collection
    from clipsearch.indexer.pipeline import IndexOptions
    from clipsearch.indexer.runner import index_paths
    from clipsearch.model.runtime import ClipModel

    index_dir = tmp_path / "collections"
    with Collection.create("links", index_dir) as collection:
        index_paths(collection, ClipModel(tiny_bundle, threads=1), [str(photos)], IndexOptions(batch_size=4, workers=0))
        ids = {os.path.basename(path): state.id for path, state in collection.store.file_states().items()}
    assert {"own.png", "link.png"} <= set(ids)
    settings = ServerSettings(allowed_hosts=TEST_HOSTS, collection="links", index_dir=index_dir)
    with TestClient(create_app(settings)) as client:
        for response in _both(client, ids["link.png"]):
            assert response.status_code == 404, response.text
        own = client.get(f"/api/images/{ids['own.png']}/file")
        assert own.status_code == 200 and own.content == (photos / "own.png").read_bytes()
        if "alias.png" in ids:
            assert client.get(f"/api/images/{ids['alias.png']}/file").status_code == 200


def test_a_non_image_of_the_same_size_and_mtime_is_410(client, indexed):
    image_id = _id(indexed, "photo_000.png")
    path = _path(indexed, "photo_000.png")
    before = path.stat()
    path.write_bytes(b"#!/bin/sh\n" + b"x" * (before.st_size - 10))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    for response in _both(client, image_id):
        assert response.status_code == 410, response.text
        assert "#!/bin/sh" not in response.text and "detail" in response.json()


@pytest.mark.parametrize("change", ["other image", "touched", "truncated"])
def test_a_changed_file_is_410(client, indexed, change):
    image_id = _id(indexed, "big.jpg")
    path = _path(indexed, "big.jpg")
    if change == "other image":
        shutil.copyfile(_path(indexed, "photo_000.png"), path)
    elif change == "touched":
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    else:
        with open(path, "r+b") as handle:
            handle.truncate(100)
    for response in _both(client, image_id):
        assert response.status_code == 410, response.text
        assert "changed on disk" in response.json()["detail"]


def test_a_file_replaced_by_a_fifo_is_refused_without_hanging(client, indexed):
    image_id = _id(indexed, "photo_000.png")
    path = _path(indexed, "photo_000.png")
    path.unlink()
    os.mkfifo(path)
    for response in _both(client, image_id):
        assert response.status_code == 410 and "not a regular file" in response.json()["detail"]


def test_a_folder_swapped_for_a_symlink_elsewhere_is_not_followed(client, indexed, tmp_path):
    image_id = _id(indexed, "photo_000.png")
    assert client.get(f"/api/images/{image_id}/file").status_code == 200  # roots derived before the swap
    folder = _path(indexed, "photo_000.png").parent
    decoy = tmp_path / "decoy"
    shutil.copytree(folder, decoy)  # same names, same sizes; copystat keeps the mtimes
    shutil.rmtree(folder)
    folder.symlink_to(decoy)
    response = client.get(f"/api/images/{image_id}/file")
    assert response.status_code == 404, response.text



def test_a_server_started_after_the_folder_swap_still_refuses_it(indexed, tmp_path):
    """The indexer records each root's real location, so a server that first starts after the swap does not
    take the new location as an indexed folder."""
    image_id = _id(indexed, "photo_000.png")
    folder = _path(indexed, "photo_000.png").parent
    decoy = tmp_path / "decoy"
    shutil.copytree(folder, decoy)
    shutil.rmtree(folder)
    folder.symlink_to(decoy)
    with TestClient(create_app(app_settings(indexed))) as fresh:
        for response in _both(fresh, image_id):
            assert response.status_code == 404, response.text

def test_a_swap_between_resolving_and_opening_is_caught(client, indexed, monkeypatch):
    """Simulate the race: the path is resolved while it is still the photo, then becomes a symlink to
    /etc/passwd before it is opened. O_NOFOLLOW refuses the link; without it, the location of the open file
    (from /proc) is outside the indexed folders."""
    from clipsearch.web import images

    image_id = _id(indexed, "photo_000.png")
    path = _path(indexed, "photo_000.png")
    path.unlink()
    path.symlink_to("/etc/passwd")
    monkeypatch.setattr(images.os.path, "realpath", lambda p: os.fspath(p))  # "resolved before the swap"
    assert client.get(f"/api/images/{image_id}/file").status_code == 404
    monkeypatch.setattr(images.os, "O_NOFOLLOW", 0)
    response = client.get(f"/api/images/{image_id}/file")
    assert response.status_code == 404 and b"root:" not in response.content
