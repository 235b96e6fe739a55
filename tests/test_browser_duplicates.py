"""The near-duplicates page at /duplicates in a real browser: Playwright driving Debian's Chromium."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from playwright.sync_api import expect

from clipsearch.web import ServerSettings, create_app
from test_browser import ARTIFACTS, KEY, fresh_page
from test_duplicates import index_folder, make_folder
from web_fixtures import LiveServer

pytestmark = pytest.mark.browser
NAME = "dups"


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """The first 30 sample images with altered copies of every tenth (3 groups), indexed with emoji-mini."""
    root = tmp_path_factory.mktemp("browser-dups")
    make_folder(root / "images", every=10, limit=30)
    index_folder(root / "images", root / "collections", NAME, "emoji-mini")
    return root / "collections"


@pytest.fixture(scope="module")
def server(collection):
    with LiveServer(create_app(ServerSettings(collection=NAME, index_dir=collection))) as live:
        yield live


def wait_for_thumbnails(page) -> None:
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('#groups img')];"
        " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }")


def shown_groups(page) -> list[list[int]]:
    return page.locator("#groups .group").evaluate_all(
        "groups => groups.map(g => [...g.querySelectorAll('.dup')].map(d => Number(d.dataset.id)))")


def test_page_shows_the_groups_keepers_first_and_follows_the_threshold(browser, server):
    with fresh_page(browser) as (context, page):
        origins, errors, failed = set(), [], []
        page.on("request", lambda r: origins.add(f"{urlsplit(r.url).scheme}://{urlsplit(r.url).netloc}"))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
        page.goto(server.url + "/duplicates")
        expected = requests.get(f"{server.url}/api/duplicates", timeout=60).json()
        expect(page.locator("#status")).to_contain_text(
            f"3 groups, {expected['redundant']} redundant copies among 42 images at the model’s own threshold 0.91")
        expect(page.locator("#groups .group")).to_have_count(3)
        assert shown_groups(page) == [[i["id"] for i in g["images"]] for g in expected["groups"]]
        for number in range(3):  # the suggested keeper comes first, marked, and only it
            group = page.locator("#groups .group").nth(number)
            expect(group.locator(".dup").first).to_have_class(re.compile(r"\bkeep\b"))
            expect(group.locator(".badge")).to_have_count(1)
            expect(group.locator(".dup").first.locator(".badge")).to_have_text("Keep")
        expect(page.locator("#collection")).to_have_value(NAME)
        expect(page.locator("#footer")).to_contain_text("emoji-mini")
        first = expected["groups"][0]["images"][1]
        card = page.locator(f".dup[data-id='{first['id']}']")
        expect(card.locator(".dims")).to_have_text(f"{first['width']} × {first['height']}")
        expect(card.locator(".similarity")).to_have_text(f"similarity {first['similarity']:.3f}")
        expect(card.locator("a.open")).to_have_attribute("href", first["image_url"])
        wait_for_thumbnails(page)
        sources = page.locator("#groups img").evaluate_all("els => els.map(e => new URL(e.src).pathname)")
        assert all(re.fullmatch(r"/api/images/\d+/thumbnail", s) for s in sources)  # by id, never by path
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser-duplicates.png"), full_page=True)

        # A stricter threshold: fewer copies, the URL keeps it, a reload asks again with it.
        page.fill("#threshold", "0.9999")
        page.click("#dup-form button[type=submit]")
        expect(page.locator("#status")).to_contain_text("your threshold 0.9999")
        strict = requests.get(f"{server.url}/api/duplicates", params={"threshold": 0.9999}, timeout=60).json()
        expect(page.locator("#groups .group")).to_have_count(len(strict["groups"]))
        assert "threshold=0.9999" in page.url
        page.reload()
        expect(page.locator("#threshold")).to_have_value("0.9999")
        expect(page.locator("#status")).to_contain_text("your threshold 0.9999")
        assert errors == [] and failed == []
        assert origins <= {server.url}


def test_page_shows_a_bad_threshold_and_no_duplicates(browser, server):
    with fresh_page(browser) as (context, page):
        page.goto(server.url + "/duplicates?threshold=2")
        expect(page.locator("#error")).to_be_visible()
        expect(page.locator("#error")).to_contain_text("threshold")
        expect(page.locator("#groups .group")).to_have_count(0)
        page.fill("#threshold", "1")
        page.click("#dup-form button[type=submit]")
        expect(page.locator("#error")).to_be_hidden()
        expect(page.locator("#status")).to_contain_text("No near-duplicates among 42 images at your threshold 1")


def test_the_search_page_links_to_the_duplicates_view(browser, server):
    with fresh_page(browser) as (context, page):
        page.goto(server.url + "/")
        page.click("#duplicates-link")
        expect(page).to_have_url(re.compile(r"/duplicates(\?collection=dups)?$"))
        expect(page.locator("#groups .group").first).to_be_visible()


def test_page_asks_for_the_api_key(browser, collection):
    with LiveServer(create_app(ServerSettings(collection=NAME, index_dir=collection, api_key=KEY))) as live:
        with fresh_page(browser) as (context, page):
            page.goto(live.url + "/duplicates")
            dialog = page.locator("#key-dialog")
            expect(dialog).to_be_visible()
            page.fill("#api-key", KEY)
            page.click("#key-form button[type=submit]")
            expect(dialog).to_be_hidden()
            expect(page.locator("#groups .group")).to_have_count(3)
            wait_for_thumbnails(page)  # fetched with the key, shown as blob: URLs
            sources = page.locator("#groups img").evaluate_all("els => els.map(e => e.src)")
            assert sources and all(s.startswith("blob:") for s in sources)
            with context.expect_page() as opened:
                page.locator("#groups a.open").first.click()
            opened.value.wait_for_url(re.compile(r"^blob:"))
            opened.value.close()
