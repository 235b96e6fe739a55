"""The page's filter controls in a real browser (Playwright driving Debian's Chromium, as in test_browser.py): they
go into every kind of search request, into the URL (a reload searches again the same way), show which date a date
filter compared, and show the API's messages for bad values and for a folder holding no photo."""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from PIL import Image
from playwright.sync_api import Page, expect

from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.runner import index_paths
from clipsearch.model.runtime import ClipModel
from clipsearch.store.collection import Collection
from clipsearch.web import ServerSettings, create_app
from photo_fixtures import block_image
from test_browser import shown_ids
from web_fixtures import LiveServer

pytestmark = pytest.mark.browser

NAME = "filtered"
QUERY = "a photo"
EXIF_DATETIME = 0x0132  # IFD0 DateTime: the indexer's last fallback for the capture time


def save_photo(path: Path, seed: int, size: tuple[int, int], taken: str | None = None,
               modified: datetime | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if taken is not None:
        exif[EXIF_DATETIME] = taken
    block_image(seed, size=size).save(path, quality=90, exif=exif.tobytes())
    if modified is not None:
        stamp = int(modified.timestamp())
        os.utime(path, (stamp, stamp))
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory, tiny_bundle) -> tuple[Path, Path]:
    """(the photo folder, the collections folder): 2023/ four landscape photos taken in July 2023; 2024/ two
    portrait photos taken in May 2024 and two square ones without EXIF, changed on 2024-06-10; misc/ four
    landscape photos without EXIF, changed in 2022."""
    root = tmp_path_factory.mktemp("browser-filters")
    folder = root / "photos"
    for i in range(4):
        save_photo(folder / "2023" / f"beach_{i}.jpg", i, (160, 120), taken=f"2023:07:{10 + i:02d} 12:00:00")
        save_photo(folder / "misc" / f"old_{i}.jpg", 20 + i, (200, 150), modified=datetime(2022, 3, 1 + i, 9))
    for i in range(2):
        save_photo(folder / "2024" / f"tall_{i}.jpg", 10 + i, (120, 160), taken=f"2024:05:{1 + i:02d} 08:30:00")
        save_photo(folder / "2024" / f"square_{i}.jpg", 30 + i, (128, 128), modified=datetime(2024, 6, 10, 18))
    index_dir = root / "collections"
    with Collection.create(NAME, index_dir) as collection:
        summary = index_paths(collection, ClipModel(tiny_bundle, threads=1), [str(folder)],
                              IndexOptions(batch_size=8, workers=0))
        assert summary.added == 12
    return folder, index_dir


@pytest.fixture(scope="module")
def server(photos):
    with LiveServer(create_app(ServerSettings(collection=NAME, index_dir=photos[1]))) as live:
        yield live


def api_ids(server: LiveServer, **params) -> list[int]:
    answer = requests.get(f"{server.url}/api/search", params={"q": QUERY, "k": 20, **params}, timeout=30)
    assert answer.status_code == 200, answer.text
    return [r["id"] for r in answer.json()["results"]]


def url_params(page: Page) -> dict[str, list[str]]:
    return parse_qs(urlsplit(page.url).query)


def test_filter_controls_drive_the_request_the_url_and_the_results(page, server, photos):
    folder, _ = photos
    page.goto(server.url + "/")
    expect(page.locator("#footer")).to_contain_text("12 photos")
    page.fill("#query", QUERY)
    page.press("#query", "Enter")
    expect(page.locator("#status")).to_contain_text(f"12 results for “{QUERY}”")

    # Orientation: the request carries it, the results are the API's for it, the URL keeps it.
    with page.expect_request(re.compile(r"/api/search\?.*orientation=portrait")):
        page.select_option("#filter-orientation", "portrait")
    expect(page.locator("#status")).to_contain_text("2 results")
    expect(page.locator("#status")).to_contain_text("Only photos portrait.")
    assert shown_ids(page) == api_ids(server, orientation="portrait")
    assert url_params(page)["orientation"] == ["portrait"]

    # A folder (Enter in its field) and a date: the squares of 2024/, dated by their file's time (no EXIF).
    page.select_option("#filter-orientation", "")
    page.fill("#filter-in", str(folder / "2024"))
    page.press("#filter-in", "Enter")
    expect(page.locator("#status")).to_contain_text("4 results")
    with page.expect_request(re.compile(r"/api/search\?.*after=2024-06-01")) as searched:
        page.fill("#filter-after", "2024-06-01")
    sent = parse_qs(urlsplit(searched.value.url).query)
    assert sent["in"] == [str(folder / "2024")] and sent["after"] == ["2024-06-01"]
    expect(page.locator("#status")).to_contain_text("2 results")
    expected = api_ids(server, **{"in": str(folder / "2024"), "after": "2024-06-01"})
    assert shown_ids(page) == expected
    expect(page.locator("#results .result .date")).to_have_text(["file changed 2024-06-10 18:00"] * 2)
    # Photos with EXIF say "taken".
    page.fill("#filter-after", "2024-05-01")
    expect(page.locator("#status")).to_contain_text("4 results")
    expect(page.locator("#results .result .date", has_text="taken 2024-05-0")).to_have_count(2)

    # The state is in the URL: a reload restores the controls and searches again the same way.
    page.fill("#filter-before", "2024-06-10")
    expect(page.locator("#status")).to_contain_text("2 results")
    params = url_params(page)
    assert (params["q"], params["in"], params["after"], params["before"]) == (
        [QUERY], [str(folder / "2024")], ["2024-05-01"], ["2024-06-10"])
    before_reload = shown_ids(page)
    assert len(before_reload) == 2
    page.reload()
    expect(page.locator("#filter-in")).to_have_value(str(folder / "2024"))
    expect(page.locator("#filter-after")).to_have_value("2024-05-01")
    expect(page.locator("#filter-before")).to_have_value("2024-06-10")
    expect(page.locator("#status")).to_contain_text("2 results")
    assert shown_ids(page) == before_reload == api_ids(server, **{"in": str(folder / "2024"), "after": "2024-05-01",
                                                                   "before": "2024-06-10"})

    # Clear filters: every photo again, and the URL forgets them.
    page.click("#clear-filters")
    expect(page.locator("#status")).to_contain_text("12 results")
    assert set(url_params(page)) == {"q"}
    assert page.script_errors == []


def test_bad_values_and_empty_folders_show_the_api_message(page, server, photos):
    folder, _ = photos
    page.goto(server.url + f"/?q={QUERY.replace(' ', '+')}")
    expect(page.locator("#status")).to_contain_text("12 results")
    page.fill("#filter-min-size", "big")
    page.press("#filter-min-size", "Enter")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("minimum size 'big' is not WIDTHxHEIGHT — Give whole pixels as WxH")
    expect(page.locator("#results .result")).to_have_count(0)
    page.fill("#filter-min-size", "150x100")
    page.press("#filter-min-size", "Enter")
    expect(page.locator("#status")).to_contain_text("8 results")  # 2023/ and misc/; 2024/ is at most 128 wide
    expect(page.locator("#error")).to_be_hidden()

    page.fill("#filter-in", str(folder / "nothing-here"))
    page.press("#filter-in", "Enter")
    expect(page.locator("#status")).to_contain_text(f"No photos found for “{QUERY}”. no indexed image is in "
                                                    f"{folder / 'nothing-here'}")
    expect(page.locator("#results .result")).to_have_count(0)
    assert page.script_errors == []


def test_more_like_this_and_example_searches_keep_the_filters(page, server, photos):
    folder, _ = photos
    misc = str(folder / "misc")
    page.goto(server.url + f"/?q={QUERY.replace(' ', '+')}&in={misc}")
    expect(page.locator("#status")).to_contain_text("4 results")
    expect(page.locator("#filter-in")).to_have_value(misc)

    # More like this: the POST body has the filter; the results are the API's.
    clicked = shown_ids(page)[0]
    page.locator("#results .result").first.click()
    with page.expect_request(re.compile(r"/api/search$")) as searched:
        page.click("#more-like-this")
    assert searched.value.post_data_json == {"image_id": clicked, "k": 20, "in": misc}
    expect(page.locator("#status")).to_contain_text("3 results like old_")
    like = requests.post(f"{server.url}/api/search", json={"image_id": clicked, "k": 20, "in": misc}, timeout=30)
    assert shown_ids(page) == [r["id"] for r in like.json()["results"]]
    # Changing a filter searches like that image again.
    with page.expect_request(re.compile(r"/api/search$")) as again:
        page.select_option("#filter-orientation", "portrait")
    assert again.value.post_data_json["orientation"] == "portrait"
    expect(page.locator("#status")).to_contain_text("No photos found like old_")

    # An example image (from another folder): the multipart form has the filter fields, so only misc/ answers.
    page.select_option("#filter-orientation", "")
    example = folder / "2023" / "beach_0.jpg"
    page.set_input_files("#file-input", str(example))
    expect(page.locator("#status")).to_contain_text("4 results like your image")
    with example.open("rb") as handle:
        by_image = requests.post(f"{server.url}/api/search/image", files={"file": (example.name, handle, "image/jpeg")},
                                 data={"k": "20", "in": misc}, timeout=30).json()
    assert shown_ids(page) == [r["id"] for r in by_image["results"]]
    assert all(r["path"].startswith(misc) for r in by_image["results"])
    assert page.script_errors == []
