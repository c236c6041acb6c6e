"""A person's session in a real browser: each tab, an upload, a box dragged with the mouse, results seen.

Screenshots go to $SCREENSHOT_DIR (default: a temporary folder), one per tab.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest
from browser import CHROMIUM, drag_box, launch, touch_drag_box
from conftest import ROOT

COLLECTION = ROOT / "assets" / "collection"
MAX_SCREENSHOT_BYTES = 300_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is missing: install Debian's chromium (apt-get install -y chromium) to run browser tests",
)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, app_server):
    url, _ = app_server
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.goto(url)
    page.get_by_role("tab", name="Image retrieval").wait_for()
    return page


def save_screenshot(page, folder: Path, name: str) -> Path:
    """A PNG of the page, reduced to a palette if needed to stay small enough for the README."""
    from PIL import Image

    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if path.stat().st_size > MAX_SCREENSHOT_BYTES:
        Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def gallery_captions(page, selector: str, count: int) -> list[str]:
    items = page.locator(f"{selector} .thumbnail-item")
    items.nth(count - 1).wait_for(timeout=60_000)
    return [t.strip() for t in page.locator(f"{selector} .caption-label").all_inner_texts()]


def json_text(page, selector: str) -> str:
    """The text of a gr.JSON output with whitespace removed, opening its accordion first."""
    page.locator("button:has-text('JSON'):visible").first.click()
    holder = page.locator(selector)
    holder.wait_for()
    return re.sub(r"\s+", "", holder.inner_text())


def test_image_retrieval_tab_shows_similar_images(page, screenshots):
    page.get_by_role("tab", name="Image retrieval").click()
    page.locator("#query input[type=file]").set_input_files(str(COLLECTION / "mate-red-marigold.jpg"))
    page.locator("#query img").first.wait_for()
    page.locator("#search-image").click()
    captions = gallery_captions(page, "#image-results", 6)
    assert captions[0].startswith("red and yellow marigold flower · 1.000"), captions
    save_screenshot(page, screenshots, "image-retrieval")
    # Clicking a result searches with it: it becomes the query, and finds itself first.
    page.locator("#image-results .thumbnail-item").nth(2).click()
    page.wait_for_function(
        """c => document.querySelector('#image-results .caption-label')?.innerText.trim() !== c""",
        arg=captions[0], timeout=60_000)
    assert gallery_captions(page, "#image-results", 6)[0].startswith(captions[2].split(" · ")[0])


def test_region_retrieval_tab_searches_a_box_drawn_with_the_mouse(page, screenshots, app_server, monkeypatch):
    engine, embedded_in = app_server[1], []
    real = engine.embedder.embed
    monkeypatch.setattr(engine.embedder, "embed",
                        lambda images: embedded_in.append(threading.current_thread().name) or real(images))
    page.get_by_role("tab", name="Region retrieval").click()
    page.locator("#region-input input[type=file]").set_input_files(str(COLLECTION / "mate-ladybird-on-grass.jpg"))
    drag_box(page, "#region-input canvas", (512, 320), (322, 132, 398, 196))
    page.get_by_label("Show where each result is similar (heat map)").check()
    page.locator("#search-region").click()
    captions = gallery_captions(page, "#region-results", 6)
    assert captions[0].startswith("ladybird on a grass stem"), captions
    save_screenshot(page, screenshots, "region-retrieval")
    first_box = re.search(r'"box":\[([-\d.,]+)\]', json_text(page, "#region-json")).group(1)
    query_box = [float(v) for v in first_box.split(",")]
    assert query_box == pytest.approx([322, 132, 398, 196], abs=4)  # the dragged box reached the server
    # The photo was embedded once, as it landed, while the box was being drawn; the search took that.
    assert len(embedded_in) == 1 and embedded_in[0].startswith("prepare-upload"), embedded_in


def test_patch_matching_tab_draws_matches_for_a_box_on_a(page, screenshots):
    page.get_by_role("tab", name="Patch matching").click()
    page.locator("#match-a input[type=file]").set_input_files(str(COLLECTION / "plasma-foggy-pier.jpg"))
    page.locator("#match-b input[type=file]").set_input_files(str(COLLECTION / "plasma-wooden-jetty-lake.jpg"))
    page.locator("#match-b img").first.wait_for()
    drag_box(page, "#match-a canvas", (512, 320), (60, 130, 470, 320))
    page.locator("#match-patches").click()
    summary = page.locator("#match-summary textarea")
    page.wait_for_function("""() => /matches, mean similarity/.test(document.querySelector('#match-summary textarea')?.value || '')""",
                           timeout=60_000)
    assert "matches, mean similarity" in summary.input_value()
    page.locator("#match-picture img").first.wait_for()
    save_screenshot(page, screenshots, "patch-matching")
    box = re.search(r'"box":\[([-\d.,]+)\]', json_text(page, "#match-json")).group(1)
    assert [float(v) for v in box.split(",")] == pytest.approx([60, 130, 470, 320], abs=4)


def test_face_photo_shows_a_clear_message_and_the_page_keeps_working(page, screenshots):
    import matplotlib.cbook

    page.get_by_role("tab", name="Image retrieval").click()
    page.locator("#query input[type=file]").set_input_files(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    page.locator("#query img").first.wait_for()
    page.locator("#search-image").click()
    notice = page.locator("#image-notice")
    notice.get_by_text("This image shows a person's face").wait_for(timeout=60_000)
    page.wait_for_timeout(6_000)  # longer than a toast stays: the message is still where the results go
    assert notice.is_visible() and "person's face" in notice.inner_text()
    assert page.locator("#image-results .thumbnail-item").count() == 0  # no earlier results under it
    assert page.get_by_text("Error", exact=True).count() == 0  # no red "Error" badges on the panels
    save_screenshot(page, screenshots, "refusal")
    page.locator("#query input[type=file]").set_input_files(str(COLLECTION / "lomiri-dogs-at-window.jpg"))
    page.locator("#search-image").click()
    page.wait_for_function(
        """() => document.querySelector('#image-results .caption-label')?.innerText.startsWith('two spaniel dogs')""",
        timeout=60_000)
    notice.wait_for(state="hidden")  # the next search clears it


def test_region_example_with_its_box_searches_in_one_click(page):
    page.get_by_role("tab", name="Region retrieval").click()
    examples = [e for e in page.locator("button.gallery-item").all() if e.is_visible()]
    examples[1].click()  # the dogs, box on the upper dog's head
    page.wait_for_timeout(500)
    page.locator("#search-region").click()
    page.wait_for_function(
        """() => document.querySelector('#region-results .caption-label')?.innerText.startsWith('two spaniel dogs')""",
        timeout=60_000)


def test_what_dino_sees_tab_shows_the_maps_of_a_photo_and_plays_a_clip(page, screenshots, tmp_path):
    from conftest import write_clip

    page.get_by_role("tab", name="What DINO sees").click()
    assert "tiny-dino-vit" in page.locator("#sees-model").inner_text()  # the model in use is named
    page.locator("#sees-photo input[type=file]").set_input_files(str(COLLECTION / "lomiri-dogs-at-window.jpg"))
    page.locator("#sees-photo img").first.wait_for()
    page.locator("#sees-look").click()
    for picture in ("#sees-maps", "#sees-mask", "#sees-colours"):
        page.wait_for_function(f"""() => document.querySelector('{picture} img')?.naturalWidth > 0""", timeout=60_000)
    assert page.locator("#sees-maps img").evaluate("i => i.naturalWidth") > 500  # photo, mean and heads in a row
    clip = write_clip(tmp_path / "pan.mp4", seconds=2, fps=24)
    page.locator("#sees-clip input[type=file]").set_input_files(str(clip))
    page.locator("#sees-clip video").first.wait_for()
    page.locator("#sees-look-clip").click()
    # the browser decodes the result video: its first frame is ready and it is as long as the clip
    page.wait_for_function("""() => { const v = document.querySelector('#sees-video video');
                                      return v && v.readyState >= 2 && v.duration > 1.5; }""", timeout=60_000)
    width = page.locator("#sees-video video").evaluate("v => v.videoWidth / v.videoHeight")
    assert width > 1.9  # mask and colours side by side
    page.wait_for_timeout(500)
    save_screenshot(page, screenshots, "what-dino-sees")


@pytest.mark.parametrize("tab", ["image", "region", "match"])
def test_the_browser_latency_benchmark_times_each_click_until_its_results_are_shown(page, tab, monkeypatch):
    """benchmarks/browser_latency.py: each click is timed until that call's results are on the page."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from browser_latency import SHOWN, TABS, measure

    waits = measure({"new": page}, TABS[tab], runs=2, think=0.1)["new"]
    assert len(waits) == 2 and all(0 < ms < 60_000 for ms in waits), waits
    shown = page.evaluate(SHOWN, TABS[tab].results)
    if tab == "image":  # the last photo picked (the third) finds itself first
        assert gallery_captions(page, "#image-results", 6)[0].endswith("· 1.000")
    assert ".jp" in shown and page.locator(f"{TABS[tab].results} img").first.is_visible()


def test_on_a_phone_results_are_seen_two_a_row_and_a_box_is_drawn_with_a_finger(browser, app_server, screenshots):
    """A 390 px wide touch screen: the results two a row, each picture below the gallery's label and under a
    caption that leaves most of it free; the region tab reached from Gradio's "More tabs" menu, and a box
    dragged with a finger reaches the server in the image's pixels."""
    url, _ = app_server
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        page.goto(url)
        page.locator("#query input[type=file]").set_input_files(str(COLLECTION / "mate-red-marigold.jpg"))
        page.locator("#query img").first.wait_for()
        page.locator("#search-image").tap()
        assert gallery_captions(page, "#image-results", 6)[0].startswith("red and yellow marigold flower")
        page.wait_for_timeout(300)
        layout = page.evaluate("""() => { const g = document.querySelector('#image-results');
            const box = s => g.querySelector(s).getBoundingClientRect();
            return {columns: getComputedStyle(g.querySelector('.grid-container')).gridTemplateColumns.split(' ').length,
                    label: box('label').bottom, tile: box('.thumbnail-item').top, height: box('.thumbnail-item').height,
                    caption: box('.caption-label').height}; }""")
        assert layout["columns"] == 2, layout
        assert layout["tile"] >= layout["label"] and layout["caption"] < 0.4 * layout["height"], layout
        save_screenshot(page, screenshots, "phone-image-retrieval")

        page.get_by_label("More tabs").tap()
        page.locator(".overflow-dropdown button", has_text="Region retrieval").tap()
        page.locator("#region-input input[type=file]").set_input_files(str(COLLECTION / "mate-ladybird-on-grass.jpg"))
        touch_drag_box(page, "#region-input canvas", (512, 320), (322, 132, 398, 196))
        page.locator("#search-region").tap()
        assert gallery_captions(page, "#region-results", 6)[0].startswith("ladybird on a grass stem")
        box = re.search(r'"box":\[([-\d.,]+)\]', json_text(page, "#region-json")).group(1)
        assert [float(v) for v in box.split(",")] == pytest.approx([322, 132, 398, 196], abs=6)
    finally:
        context.close()
