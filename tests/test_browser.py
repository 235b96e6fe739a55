"""The page at / in a real browser: Playwright driving Debian's Chromium (never a downloaded browser)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from playwright.sync_api import BrowserContext, Page, expect

from clipsearch.web import ServerSettings, create_app
from web_fixtures import IndexedPhotos, LiveServer, build_indexed_photos

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
KEY = "browser-test-key"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_bundle) -> IndexedPhotos:
    return build_indexed_photos(tmp_path_factory.mktemp("browser"), tiny_bundle)


@pytest.fixture(scope="module")
def server(indexed):
    with LiveServer(create_app(ServerSettings(collection=indexed.name, index_dir=indexed.index_dir))) as live:
        yield live


@contextmanager
def fresh_page(browser) -> Iterator[tuple[BrowserContext, Page]]:
    """A page in a context of its own, closed even when the test fails (no leftovers for the next test)."""
    context = browser.new_context()
    try:
        yield context, context.new_page()
    finally:
        context.close()


def shown_ids(page: Page) -> list[int]:
    return [int(i) for i in page.locator("#results .result").evaluate_all("els => els.map(e => e.dataset.id)")]


def wait_for_thumbnails(page: Page) -> None:
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('#results img')];"
        " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }")


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def test_type_upload_classify_and_more_like_this(page, server, indexed):
    page.goto(server.url + "/")
    expect(page.locator("#footer")).to_contain_text(f"{len(indexed.photos)} photos")
    expect(page.locator("#example")).to_be_hidden()  # no example image yet
    expect(page.locator("#error")).to_be_hidden()

    # Type a query: thumbnails appear best first, in the API's order, with scores shown.
    page.locator("#query").press_sequentially("a red square", delay=20)
    expected = requests.get(f"{server.url}/api/search", params={"q": "a red square", "k": 20}, timeout=10).json()
    expect(page.locator("#status")).to_contain_text("results for “a red square”")
    expect(page.locator("#results .result")).to_have_count(len(expected["results"]))
    assert shown_ids(page) == [r["id"] for r in expected["results"]]
    wait_for_thumbnails(page)
    first_score = f"{expected['results'][0]['score']:.3f}"
    expect(page.locator("#results .result").first.locator(".score")).to_have_text(first_score)
    screenshot(page, "browser-text-search.png")

    # The k selector limits the results.
    page.select_option("#k", "10")
    expect(page.locator("#status")).to_contain_text("10 results for “a red square”")
    expect(page.locator("#results .result")).to_have_count(10)
    assert shown_ids(page) == [r["id"] for r in expected["results"][:10]]

    # Upload an example image: results are its neighbours, as the API ranks them.
    example = next(p for p in indexed.photos if p.name == "photo_004.jpg")
    page.set_input_files("#file-input", str(example))
    expect(page.locator("#status")).to_contain_text("results like your image")
    with example.open("rb") as handle:
        by_image = requests.post(f"{server.url}/api/search/image", files={"file": (example.name, handle, "image/jpeg")},
                                 data={"k": "10", "include_self": "true"}, timeout=10).json()
    expect(page.locator("#results .result")).to_have_count(len(by_image["results"]))
    assert shown_ids(page) == [r["id"] for r in by_image["results"]]
    assert shown_ids(page)[0] == indexed.ids_by_path[str(example)]  # the page shows where the example is
    expect(page.locator("#example-image")).to_be_visible()

    # Zero-shot labels for the uploaded image.
    page.fill("#labels", "a cat, a dog, a red car")
    page.click("#classify-form button[type=submit]")
    expect(page.locator("#label-results li")).to_have_count(3)
    percentages = page.locator("#label-results .probability").all_inner_texts()
    assert abs(sum(float(p.rstrip("%")) for p in percentages) - 100) < 0.5
    assert [float(p.rstrip("%")) for p in percentages] == sorted((float(p.rstrip("%")) for p in percentages), reverse=True)

    # Click a result: the viewer shows the full image; "More like this" searches by that image.
    wait_for_thumbnails(page)
    clicked = shown_ids(page)[0]
    page.locator("#results .result").first.click()
    expect(page.locator("#viewer")).to_be_visible()
    expect(page.locator("#open-full")).to_have_attribute("href", f"/api/images/{clicked}/file")
    page.wait_for_function("() => document.querySelector('#viewer-image').naturalWidth > 0")
    page.click("#more-like-this")
    expect(page.locator("#viewer")).to_be_hidden()
    like = requests.post(f"{server.url}/api/search", json={"image_id": clicked, "k": 10}, timeout=10).json()
    expect(page.locator("#status")).to_contain_text(re.compile(r"results like photo_\d+\.\w+"))
    expect(page.locator("#results .result")).to_have_count(len(like["results"]))
    assert shown_ids(page) == [r["id"] for r in like["results"]] and clicked not in shown_ids(page)
    wait_for_thumbnails(page)
    path = screenshot(page, "browser-more-like-this.png")
    assert path.stat().st_size > 10_000

    # Nothing was requested from any other host.
    assert page.requested_origins - {"blob://"} == {server.url}
    assert page.failed_responses == [] and page.script_errors == []


DROP_OR_PASTE = """async ([kind, bytes]) => {
    const file = new File([new Uint8Array(bytes)], 'example.jpg', { type: 'image/jpeg' });
    const data = new DataTransfer();
    data.items.add(file);
    if (kind === 'drop') {
        const zone = document.getElementById('drop-zone');
        zone.dispatchEvent(new DragEvent('dragover', { dataTransfer: data, bubbles: true, cancelable: true }));
        zone.dispatchEvent(new DragEvent('drop', { dataTransfer: data, bubbles: true, cancelable: true }));
    } else {
        document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: data, bubbles: true, cancelable: true }));
    }
}"""


@pytest.mark.parametrize("kind", ["drop", "paste"])
def test_drop_or_paste_an_image_to_search_by_example(page, server, indexed, kind):
    example = next(p for p in indexed.photos if p.name == "photo_010.jpg")
    page.goto(server.url + "/")
    expect(page.locator("#footer")).to_contain_text("photos")
    uploads: list[str] = []
    page.on("request", lambda request: uploads.append(request.url) if "api/search/image" in request.url else None)
    page.evaluate(DROP_OR_PASTE, [kind, list(example.read_bytes())])
    expect(page.locator("#status")).to_contain_text("results like your image")
    page.wait_for_timeout(300)
    assert len(uploads) == 1, uploads  # a drop on the zone once went up twice (the window's handler too)
    with example.open("rb") as handle:
        expected = requests.post(f"{server.url}/api/search/image", files={"file": (example.name, handle, "image/jpeg")},
                                 data={"k": "20", "include_self": "true"}, timeout=10).json()
    assert shown_ids(page) == [r["id"] for r in expected["results"]]
    own = indexed.ids_by_path[str(example)]
    assert shown_ids(page)[0] == own  # the example is in the collection: found first, as clip-back shows it
    page.uncheck("#include-self")  # "more like it" only
    expect(page.locator(f"#results .result[data-id='{own}']")).to_have_count(0)
    page.check("#include-self")
    expect(page.locator("#results .result").first).to_have_attribute("data-id", str(own))
    expect(page.locator("#example-image")).to_be_visible()
    page.click("#clear-example")
    expect(page.locator("#example")).to_be_hidden()
    expect(page.locator("#query")).to_be_focused()
    assert page.script_errors == []


def test_keyboard_navigation(page, server):
    page.goto(server.url + "/")
    expect(page.locator("#query")).to_be_focused()
    page.keyboard.type("green")
    expect(page.locator("#results .result").first).to_be_visible()
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("results for “green”")
    page.keyboard.press("ArrowDown")  # from the search box into the grid
    results = page.locator("#results .result")
    expect(results.nth(0)).to_be_focused()
    page.keyboard.press("ArrowRight")
    expect(results.nth(1)).to_be_focused()
    columns = page.evaluate(
        "() => { const b = [...document.querySelectorAll('#results .result')]; const top = b[0].getBoundingClientRect().top;"
        " const i = b.findIndex(e => e.getBoundingClientRect().top > top + 1); return i === -1 ? b.length : i; }")
    page.keyboard.press("ArrowDown")
    expect(results.nth(min(1 + columns, results.count() - 1))).to_be_focused()
    page.keyboard.press("Home")
    expect(results.nth(0)).to_be_focused()
    page.keyboard.press("Enter")  # opens the viewer
    expect(page.locator("#viewer")).to_be_visible()
    expect(page.locator("#more-like-this")).to_be_focused()
    page.keyboard.press("Escape")  # closes it and gives focus back
    expect(page.locator("#viewer")).to_be_hidden()
    expect(results.nth(0)).to_be_focused()
    page.keyboard.press("/")
    expect(page.locator("#query")).to_be_focused()


def test_a_key_pressed_before_the_viewer_close_event_keeps_its_focus(page, server):
    """A dialog's close event comes after it closed (in Chromium with the next animation frame, which a busy machine
    delays past the next key press): "/" right after Escape must leave focus in the search box, not be undone by the
    viewer putting focus back on the result it was opened from."""
    page.goto(server.url + "/")
    page.fill("#query", "green")
    page.press("#query", "Enter")
    expect(page.locator("#status")).to_contain_text("results for “green”")
    page.press("#query", "ArrowDown")
    page.keyboard.press("Enter")
    expect(page.locator("#viewer")).to_be_visible()
    # Close and press "/" in one task, so the key always comes before the close event, however fast the machine.
    page.evaluate("""() => new Promise((resolve) => {
        const viewer = document.getElementById('viewer');
        viewer.addEventListener('close', () => setTimeout(resolve, 0), { once: true });  // after the page's own
        viewer.close();
        document.activeElement.dispatchEvent(new KeyboardEvent('keydown', { key: '/', bubbles: true, cancelable: true }));
    })""")
    expect(page.locator("#viewer")).to_be_hidden()
    expect(page.locator("#query")).to_be_focused()
    # Without a later key press, closing gives focus back to the result, as before.
    page.press("#query", "ArrowDown")
    page.keyboard.press("Enter")
    expect(page.locator("#viewer")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#viewer")).to_be_hidden()
    expect(page.locator("#results .result").first).to_be_focused()
    assert page.script_errors == []


def test_a_late_search_answer_keeps_the_keyboard_in_the_grid(page, server):
    """Results that arrive while the user is already moving through the previous ones (typing paused, busy server)
    replace the grid without dropping focus to the page body: it stays at the same position."""
    page.goto(server.url + "/")
    page.fill("#query", "red")
    page.press("#query", "Enter")
    expect(page.locator("#status")).to_contain_text("results for “red”")
    held = []  # the answer to "green" is held back until the user is in the grid
    page.route(re.compile(r"/api/search\?q=green&"), lambda route: held.append(route))
    with page.expect_request(re.compile(r"/api/search\?q=green&")):
        page.fill("#query", "green")
    expect(page.locator("#status")).to_contain_text("Searching for “green”")
    results = page.locator("#results .result")
    page.keyboard.press("ArrowDown")  # into the "red" results still shown
    page.keyboard.press("ArrowRight")
    expect(results.nth(1)).to_be_focused()
    assert len(held) == 1
    held[0].continue_()
    expect(page.locator("#status")).to_contain_text("results for “green”")
    expected = requests.get(f"{server.url}/api/search", params={"q": "green", "k": 20}, timeout=10).json()
    assert shown_ids(page) == [r["id"] for r in expected["results"]]
    expect(results.nth(1)).to_be_focused()
    page.keyboard.press("ArrowLeft")  # and the arrow keys go on working in the new grid
    expect(results.nth(0)).to_be_focused()
    assert page.script_errors == [] and page.failed_responses == []


def test_error_and_empty_states(page, server):
    page.goto(server.url + "/")
    page.fill("#query", "x" * 10_001)
    page.press("#query", "Enter")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("longer than")
    expect(page.locator("#results .result")).to_have_count(0)
    page.fill("#query", "")
    page.press("#query", "Enter")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#status")).to_have_text("Type to search your photos.")
    page.set_input_files("#file-input", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}])
    expect(page.locator("#error")).to_contain_text("not an image")
    # only the two refused requests, answered with their statuses (the long query twice when the typing pause of
    # a busy machine lets its search start before Enter); no script error
    statuses = [entry.split()[0] for entry in page.failed_responses]
    assert list(dict.fromkeys(statuses)) == ["422", "415"] and statuses.count("415") == 1, statuses
    assert page.script_errors == []


def test_empty_collection_says_so(browser, tmp_path, tiny_bundle):
    from clipsearch.model.bundle import read_bundle
    from clipsearch.store.collection import Collection

    with Collection.create("empty", tmp_path) as collection:
        collection.bind_model(read_bundle(tiny_bundle))
        collection.sync_vectors()
    with LiveServer(create_app(ServerSettings(collection="empty", index_dir=tmp_path))) as live:
        with fresh_page(browser) as (context, page):
            page.goto(live.url + "/")
            expect(page.locator("#status")).to_contain_text("This collection is empty")
            page.fill("#query", "cat")
            page.press("#query", "Enter")
            expect(page.locator("#status")).to_contain_text("No photos found")


@contextmanager
def keyed_page(browser, indexed: IndexedPhotos, path: str = "/") -> Iterator[tuple[BrowserContext, Page]]:
    """A fresh page at `path` of a server of `indexed` that asks for the API key KEY."""
    settings = ServerSettings(collection=indexed.name, index_dir=indexed.index_dir, api_key=KEY)
    with LiveServer(create_app(settings)) as live, fresh_page(browser) as (context, page):
        page.goto(live.url + path)
        yield context, page


def test_page_asks_for_the_api_key_once(browser, indexed):
    with keyed_page(browser, indexed) as (context, page):
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        page.fill("#api-key", "wrong")
        page.click("#key-form button[type=submit]")
        expect(dialog).to_be_visible()  # asked again after a wrong key
        expect(page.locator("#key-message")).to_contain_text("not accepted")
        page.fill("#api-key", KEY)
        page.click("#key-form button[type=submit]")
        expect(dialog).to_be_hidden()
        expect(page.locator("#footer")).to_contain_text("photos")
        page.fill("#query", "blue")
        page.press("#query", "Enter")
        expect(page.locator("#results .result").first).to_be_visible()
        wait_for_thumbnails(page)  # thumbnails fetched with the key, shown as blob: URLs
        sources = page.locator("#results img").evaluate_all("els => els.map(e => e.src)")
        assert sources and all(re.match(r"^blob:", s) for s in sources)
        page.locator("#results .result").first.click()
        with context.expect_page() as opened:
            page.click("#open-full")  # the full file, fetched with the key
        opened.value.wait_for_url(re.compile(r"^blob:"))  # about:blank first, then the fetched file
        opened.value.close()
        page.keyboard.press("Escape")
        page.reload()  # the key is remembered for the session: no second prompt
        expect(page.locator("#footer")).to_contain_text("photos")
        expect(dialog).to_be_hidden()


# -- re-ranking ----------------------------------------------------------------------------------------------------
RERANK_QUERY = "a red square"


@pytest.fixture(scope="module")
def rerank_server(tmp_path_factory, blip_bundle):
    """A collection indexed (the normal indexing path) with the tiny random BLIP (blip_fixtures.py): its model can re-rank."""
    root = tmp_path_factory.mktemp("browser-rerank")
    built = build_indexed_photos(root / "data", blip_bundle)
    with LiveServer(create_app(ServerSettings(collection=built.name, index_dir=built.index_dir))) as live:
        yield live


def api_search(server: LiveServer, **params) -> list[dict]:
    answer = requests.get(f"{server.url}/api/search", params={"q": RERANK_QUERY, "k": 20, **params}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["results"]


def shown_matches(page: Page) -> list[str]:
    return page.locator("#results .result .match").all_inner_texts()


def as_percent(probability: float) -> str:
    return f"match {math.floor(probability * 100 + 0.5)}%"  # JavaScript's Math.round


def test_rerank_toggle_is_absent_when_the_model_cannot_rerank(page, server):
    page.goto(server.url + "/?q=green&rerank=1&min_match=0.5")  # a link made on a re-ranking collection
    expect(page.locator("#footer")).to_contain_text("photos")
    expect(page.locator("#status")).to_contain_text("results for “green”")
    expect(page.locator("#rerank-controls")).to_be_hidden()
    expect(page.get_by_label("Re-rank")).to_be_hidden()
    with page.expect_request(re.compile(r"/api/search\?")) as searched:
        page.fill("#query", "blue")
        page.press("#query", "Enter")
    assert "rerank" not in searched.value.url and "min_match" not in searched.value.url
    expect(page.locator("#status")).to_contain_text("results for “blue”")
    expect(page.locator("#results .result .match")).to_have_count(0)
    assert "rerank" not in page.url
    # Tab from the search box skips the hidden controls: the next stop after the k selector is the button.
    page.focus("#k")
    page.keyboard.press("Tab")
    expect(page.locator("#search-form button[type=submit]")).to_be_focused()
    assert page.script_errors == [] and page.failed_responses == []


def test_rerank_toggle_changes_the_request_and_shows_match_probabilities(browser, rerank_server):
    server = rerank_server
    with fresh_page(browser) as (context, page):
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.url + "/")
        toggle = page.get_by_role("checkbox", name="Re-rank")
        expect(toggle).to_be_visible()
        expect(toggle).not_to_be_checked()
        expect(page.get_by_label("Min. match")).to_be_disabled()
        expect(toggle).to_have_accessible_description(re.compile(r"image-text matching head.*how likely it matches"))

        # Off: the plain search, scores only.
        with page.expect_request(re.compile(r"/api/search\?")) as searched:
            page.fill("#query", RERANK_QUERY)
            page.press("#query", "Enter")
        assert "rerank" not in searched.value.url
        plain = api_search(server)
        expect(page.locator("#status")).to_contain_text(f"results for “{RERANK_QUERY}”")
        assert shown_ids(page) == [r["id"] for r in plain]
        expect(page.locator("#results .result .match")).to_have_count(0)
        expect(page.locator("#results .result .score").first).to_have_attribute("title", re.compile(r"^similarity"))

        # On, from the keyboard: the request asks for re-ranking and every result shows its match probability.
        toggle.focus()
        with page.expect_request(re.compile(r"/api/search\?.*rerank=true")) as searched:
            page.keyboard.press("Space")
        assert "min_match" not in searched.value.url
        # Every shown result is re-scored (rerank_k = k), so no score past the re-ranked top is on the cosine scale.
        assert "rerank_k=20" in searched.value.url
        expect(page.locator("#status")).to_contain_text(f"results for “{RERANK_QUERY}”, re-ranked")
        reranked = api_search(server, rerank="true")
        assert all(r["match"] is not None for r in reranked)
        assert shown_ids(page) == [r["id"] for r in reranked]
        assert shown_matches(page) == [as_percent(r["match"]) for r in reranked]
        first = page.locator("#results .result").first
        expect(first.locator(".score")).to_have_text(f"{reranked[0]['score']:.3f}")
        expect(first.locator(".score")).to_have_attribute(
            "title", re.compile(rf"^re-rank score: .*\({reranked[0]['itc_score']:.3f}\)"))
        expect(first).to_have_attribute("aria-label", re.compile(rf", {as_percent(reranked[0]['match'])}\. Open"))
        assert "rerank=1" in page.url and f"q={RERANK_QUERY.replace(' ', '+')}" in page.url
        screenshot(page, "browser-rerank.png")

        # A minimum match: sent as min_match; only results at least that likely are shown.
        expect(page.get_by_label("Min. match")).to_be_enabled()
        with page.expect_request(re.compile(r"/api/search\?.*rerank=true.*min_match=0.9")):
            page.select_option("#min-match", "0.9")
        likely = api_search(server, rerank="true", min_match=0.9)
        assert 0 < len(likely) < len(reranked)  # the threshold keeps some results and drops others
        expect(page.locator("#results .result")).to_have_count(len(likely))
        assert shown_ids(page) == [r["id"] for r in likely]
        assert all(int(text.split()[1].rstrip("%")) >= 90 for text in shown_matches(page))

        # The state is in the URL: a reload searches again the same way.
        assert "min_match=0.9" in page.url
        page.reload()
        expect(page.get_by_role("checkbox", name="Re-rank")).to_be_checked()
        expect(page.locator("#min-match")).to_have_value("0.9")
        expect(page.locator("#query")).to_have_value(RERANK_QUERY)
        expect(page.locator("#results .result")).to_have_count(len(likely))
        assert shown_ids(page) == [r["id"] for r in likely]

        # Off again: a plain request, no match shown, the URL forgets rerank and min_match.
        with page.expect_request(re.compile(r"/api/search\?")) as searched:
            page.get_by_role("checkbox", name="Re-rank").click()
        assert "rerank" not in searched.value.url and "min_match" not in searched.value.url
        expect(page.locator("#status")).not_to_contain_text("re-ranked")
        expect(page.locator("#results .result")).to_have_count(len(plain))
        expect(page.locator("#results .result .match")).to_have_count(0)
        assert "rerank" not in page.url and "min_match" not in page.url
        expect(page.get_by_label("Min. match")).to_be_disabled()
        assert errors == []


def test_a_refused_rerank_shows_the_api_message_and_hint(browser, rerank_server):
    """A re-ranked query the API refuses (e.g. a collection indexed before image tokens were stored) shows the
    answer's detail and hint like other errors. The refusal is stubbed: how a collection lacks tokens is the
    library's business."""
    body = {"detail": "collection 'photos' has no stored image tokens", "hint": "Run: clipsearch index --tokens"}
    with fresh_page(browser) as (context, page):
        page.route(re.compile(r"/api/search\?.*rerank=true"),
                   lambda route: route.fulfill(status=400, json=body))
        page.goto(rerank_server.url + f"/?q={RERANK_QUERY.replace(' ', '+')}&rerank=1")
        expect(page.locator("#error")).to_be_visible()
        expect(page.locator("#error")).to_have_text(f"{body['detail']} — {body['hint']}")
        expect(page.locator("#status")).to_have_text("The search failed.")
        expect(page.locator("#results .result")).to_have_count(0)


def test_the_example_and_its_labels_fit_a_phone_screen(browser, server, indexed):
    context = browser.new_context(viewport={"width": 375, "height": 800})
    try:
        page = context.new_page()
        page.goto(server.url + "/")
        expect(page.locator("#footer")).to_contain_text("photos")
        page.set_input_files("#file-input", str(indexed.photos[4]))
        expect(page.locator("#status")).to_contain_text("results like your image")
        page.fill("#labels", "a cat, a dog, a red car, an extraordinarily long label about a landscape at dusk")
        page.click("#classify-form button[type=submit]")
        expect(page.locator("#label-results li")).to_have_count(4)
        # The page once grew to 494 px here and scrolled sideways, cutting off the labels and their meters.
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        # Square thumbnails, two across (they were 327 x 256 boxes in one column, letterboxed).
        boxes = page.locator("#results .result img").evaluate_all(
            "els => els.slice(0, 4).map(e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })")
        assert all(abs(w - h) < 1.5 for _, _, w, h in boxes), boxes
        assert boxes[0][1] == boxes[1][1] and boxes[1][0] > boxes[0][0]  # side by side
        screenshot(page, "browser-phone-labels.png")
    finally:
        context.close()


def test_more_like_this_is_a_step_in_the_history_and_survives_a_reload(page, server):
    # "More like this" left the URL at / (a reload showed nothing) and replaced the history entry (Back left the page).
    page.goto(server.url + "/?q=a+red+square")
    expect(page.locator("#status")).to_contain_text("results for “a red square”")
    text_ids = shown_ids(page)
    clicked = text_ids[1]
    page.locator("#results .result").nth(1).click()
    page.click("#more-like-this")
    expect(page.locator("#status")).to_contain_text("results like")
    like_ids = shown_ids(page)
    assert f"like={clicked}" in page.url and clicked not in like_ids
    name = page.evaluate(f"() => fetch('/api/images/{clicked}').then(r => r.json()).then(i => i.file_name)")
    page.reload()  # the URL names the image by id only: the status still names its file
    expect(page.locator("#status")).to_contain_text(f"results like {name}")
    assert shown_ids(page) == like_ids
    page.go_back()
    expect(page.locator("#status")).to_contain_text("results for “a red square”")
    assert shown_ids(page) == text_ids and page.locator("#query").input_value() == "a red square"
    page.go_forward()
    expect(page.locator("#status")).to_contain_text(f"results like {name}")
    assert page.script_errors == []


def test_each_search_submitted_is_a_step_in_the_history(page, server):
    """Typing updates one entry until Enter commits it; the next search typed is a new entry, so Back goes through
    the searches made (also back to a "more like this" step a new search was typed after)."""
    page.goto(server.url + "/")
    start = page.evaluate("history.length")
    for query in ("a red square", "a blue square"):
        page.fill("#query", query)  # the typing pause searches (and writes the URL) before Enter
        expect(page.locator("#status")).to_contain_text(f"results for “{query}”")
        page.press("#query", "Enter")
    assert page.evaluate("history.length") == start + 2  # one entry per search, not per keystroke
    page.locator("#results .result").first.click()
    page.click("#more-like-this")
    expect(page.locator("#status")).to_contain_text("results like")
    like_url = page.url
    page.fill("#query", "a green square")
    expect(page.locator("#status")).to_contain_text("results for “a green square”")
    page.go_back()
    expect(page.locator("#status")).to_contain_text("results like")
    assert page.url == like_url
    page.go_back()
    expect(page.locator("#status")).to_contain_text("results for “a blue square”")
    page.go_back()
    expect(page.locator("#status")).to_contain_text("results for “a red square”")
    assert page.locator("#query").input_value() == "a red square"
    # Enter in a filter field searches (its change event) and commits the search too: the next one is a new entry.
    page.goto(server.url + "/")
    start = page.evaluate("history.length")
    page.fill("#query", "a dark square")
    expect(page.locator("#status")).to_contain_text("results for “a dark square”")
    page.fill("#filter-min-size", "1x1")
    page.press("#filter-min-size", "Enter")
    expect(page.locator("#status")).to_contain_text("Only photos")
    assert page.evaluate("history.length") == start + 1
    page.fill("#query", "a bright square")  # a new search after the committed one: a new entry
    expect(page.locator("#status")).to_contain_text("results for “a bright square”")
    assert page.evaluate("history.length") == start + 2
    page.go_back()
    expect(page.locator("#status")).to_contain_text("results for “a dark square”")
    expect(page.locator("#filter-min-size")).to_have_value("1x1")
    page.fill("#filter-min-size", "")
    page.press("#filter-min-size", "Enter")
    assert page.script_errors == []


def test_enter_in_a_filter_field_searches_once(page, server):
    page.goto(server.url + "/?q=a+red+square")
    expect(page.locator("#status")).to_contain_text("results for “a red square”")
    searches: list[str] = []
    page.on("request", lambda request: searches.append(request.url) if "api/search" in request.url else None)
    page.fill("#filter-min-size", "10x10")
    page.press("#filter-min-size", "Enter")  # fires the field's change and the form's submit
    expect(page.locator("#status")).to_contain_text("at least 10")
    page.wait_for_timeout(500)
    assert len(searches) == 1, searches


def test_an_api_key_entered_after_a_dismissed_prompt_sets_up_the_page(browser, indexed):
    with keyed_page(browser, indexed, "/?q=blue") as (context, page):
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        page.click("#key-cancel")
        expect(dialog).to_be_hidden()  # not asked again at once for the URL's search
        page.wait_for_timeout(300)
        expect(dialog).to_be_hidden()
        expect(page.locator("#error")).to_contain_text("needs an API key: search again to enter it")
        page.press("#query", "Enter")
        expect(dialog).to_be_visible()
        page.fill("#api-key", KEY)
        page.click("#key-form button[type=submit]")
        expect(page.locator("#results .result").first).to_be_visible()
        expect(page.locator("#footer")).to_contain_text("photos")  # stayed empty until a reload before


def test_an_upload_the_server_refuses_stops_being_the_example(page, server, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"this is text, not a PNG")
    page.goto(server.url + "/")
    expect(page.locator("#footer")).to_contain_text("photos")
    page.set_input_files("#file-input", str(fake))
    expect(page.locator("#error")).to_contain_text("not an image")
    expect(page.locator("#example")).to_be_hidden()  # stayed, showing a broken image, and was sent again on changes
    uploads: list[str] = []
    page.on("request", lambda request: uploads.append(request.url) if "api/search/image" in request.url else None)
    page.select_option("#k", "10")
    page.wait_for_timeout(300)
    assert uploads == []
    assert page.locator("#file-input").get_attribute("tabindex") == "-1"  # the visible button is the tab stop


def test_a_result_whose_file_is_gone_says_so_instead_of_a_broken_image(browser, tmp_path, tiny_bundle):
    import shutil

    indexed = build_indexed_photos(tmp_path, tiny_bundle, count=4)
    moved = indexed.photos[1]
    moved_id = indexed.ids_by_path[str(moved)]
    shutil.move(moved, tmp_path / moved.name)
    with LiveServer(create_app(ServerSettings(collection=indexed.name, index_dir=indexed.index_dir))) as live:
        with fresh_page(browser) as (context, page):
            asked: list[str] = []
            page.on("request", lambda request: asked.append(request.url))
            page.goto(live.url + "/")
            page.fill("#query", "a photo")
            page.press("#query", "Enter")
            tile = page.locator(f"#results .result[data-id='{moved_id}']")
            expect(tile).to_contain_text("no longer on disk")
            expect(tile).to_have_class(re.compile(r"\bmissing\b"))
            expect(page.locator("#results .result.missing")).to_have_count(1)  # the others are there
            assert "no longer on disk" in tile.get_attribute("aria-label")
            tile.click()
            expect(page.locator("#viewer-meta")).to_contain_text("no longer on disk")
            expect(page.locator("#open-full")).to_be_hidden()
            assert not [url for url in asked if f"/images/{moved_id}/" in url]  # never asked for its bytes
            page.click("#more-like-this")  # its stored vector still searches
            expect(page.locator("#results .result").first).to_be_visible()


def test_show_more_asks_for_the_next_size_and_a_urls_k_is_kept(page, server, indexed):
    total = len(indexed.photos)
    assert 10 < total < 20
    page.goto(server.url + "/?q=a+photo&k=10")
    expect(page.locator("#status")).to_contain_text("10 results")
    more = page.locator("#show-more")
    expect(more).to_be_visible()  # as many as asked for: there may be more
    first_ten = shown_ids(page)
    more.click()
    expect(page.locator("#status")).to_contain_text(f"{total} results")  # asked for 20: all there are
    assert shown_ids(page)[:10] == first_ten and page.locator("#k").input_value() == "20"
    expect(page.locator("#results .result").nth(10)).to_be_focused()  # the first new result
    expect(more).to_be_hidden()  # fewer than asked for: nothing more to show
    page.goto(server.url + "/?q=a+photo&k=7")  # a size the menu does not list is offered, not dropped for 20
    expect(page.locator("#status")).to_contain_text("7 results")
    assert page.locator("#k").input_value() == "7"
    expect(more).to_be_visible()
    page.fill("#query", "")  # cleared: no results, and nothing more to show
    expect(page.locator("#results .result")).to_have_count(0)
    expect(more).to_be_hidden()
    assert page.script_errors == []
