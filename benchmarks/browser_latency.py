"""What a person in a browser waits: from the button's click to the results on screen, pictures loaded.

A person picks a photo (for a region, drags a box over it), then presses the button a moment later
(`--think`, 1 s: choosing a box takes longer). This runs that in Debian's Chromium (headless, Playwright)
on the app's pages: this checkout's app and, with `--baseline REV`, the app of commit REV beside it, each
its own `python app.py` with the same settings (ViT-S/16-sized random weights, the real face gate, the
default index of the shipped photos), one page each, calls alternating. The wait is timed inside the page:
from the click to the first animation frame in which the results have changed and every picture among
them has loaded. Prints p50 / p95 in ms and, with a baseline, the ratio of the p50s.

Unlike benchmarks/latency.py (gradio_client), the browser keeps its connections and hears the answer
on its open event stream; Chromium shares the machine's cores with the apps, as a client there does.

    python benchmarks/browser_latency.py [--runs 20] [--think 1000] [--baseline 4f124cb]
                                         [--tabs image,region,match]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from browser import drag_box, launch  # noqa: E402  (tests/browser.py: Chromium as the browser tests drive it)
from latency import COLLECTION, running_apps  # noqa: E402  (benchmarks/ is on the path when run as a script)

# The results (their pictures and captions) as they stand: a call is seen once this differs from before
# the click and every picture in it has loaded.
SHOWN = """sel => [...document.querySelectorAll(sel + ' img')].map(i => i.src).join('|') + '#'
    + [...document.querySelectorAll(sel + ' .caption-label')].map(c => c.innerText).join('|')"""
CLICK_UNTIL_SHOWN = """([button, sel, before]) => new Promise((resolve, reject) => {
    setTimeout(() => reject(new Error(`no results shown in ${sel} within 60 s`)), 60000);
    const shown = () => { const imgs = [...document.querySelectorAll(sel + ' img')];
        return (%s)(sel) !== before && imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); };
    const started = performance.now();
    const look = () => shown() ? resolve(performance.now() - started) : requestAnimationFrame(look);
    document.querySelector(button).click();
    requestAnimationFrame(look);
})""" % SHOWN


@dataclass(frozen=True)
class Tab:
    name: str  # the tab's label
    button: str
    results: str  # the element holding the results
    inputs: tuple[str, ...]  # file inputs, in order (a second one gets the next photo)
    box: tuple[int, int, int, int] | None = None  # dragged on the first input's annotator (512 x 320 photos)


TABS = {
    "image": Tab("Image retrieval", "#search-image", "#image-results", ("#query",)),
    "region": Tab("Region retrieval", "#search-region", "#region-results", ("#region-input",), (100, 60, 300, 260)),
    "match": Tab("Patch matching", "#match-patches", "#match-picture", ("#match-a", "#match-b")),
}


def one_call(page, tab: Tab, photos: list[Path], i: int, think: float) -> float:
    """Picks photo i (and i + 1), drags the box, waits until `think` s after the pick, clicks; ms until shown."""
    before = page.evaluate(SHOWN, tab.results)
    picked = time.perf_counter()
    for n, holder in enumerate(tab.inputs):
        page.locator(f"{holder} input[type=file]").set_input_files(str(photos[(i + n) % len(photos)]))
    if tab.box:
        drag_box(page, f"{tab.inputs[0]} canvas", (512, 320), tab.box)
    for holder in tab.inputs:
        page.locator(f"{holder} img, {holder} canvas").first.wait_for()
    page.wait_for_timeout(max(0.0, think - (time.perf_counter() - picked)) * 1000)
    return page.evaluate(CLICK_UNTIL_SHOWN, [tab.button, tab.results, before])


def measure(pages: dict, tab: Tab, runs: int, think: float) -> dict[str, list[float]]:
    """Each app's waits for `runs` calls (after one to warm up), alternating between the apps."""
    photos = sorted(COLLECTION.glob("*.jpg"))
    for page in pages.values():
        page.get_by_role("tab", name=tab.name).click()
        one_call(page, tab, photos, 0, think)
    waits = {name: [] for name in pages}
    for i in range(1, runs + 1):
        for name, page in pages.items():
            waits[name].append(one_call(page, tab, photos, i, think))
    return waits


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--think", type=float, default=1000, metavar="MS", help="from picking the photo to the click")
    p.add_argument("--baseline", metavar="REV", help="also run the app of this commit, side by side")
    p.add_argument("--tabs", default=",".join(TABS), help="comma-separated, of: " + ", ".join(TABS))
    args = p.parse_args()
    if unknown := set(args.tabs.split(",")) - set(TABS):
        p.error(f"unknown tabs: {', '.join(sorted(unknown))}")
    from playwright.sync_api import sync_playwright

    with (tempfile.TemporaryDirectory() as tmp, running_apps(Path(tmp), "cpu", args.baseline) as (urls, _),
          sync_playwright() as playwright):
        browser = launch(playwright)
        pages = {}
        for name, url in urls.items():
            pages[name] = browser.new_page(viewport={"width": 1280, "height": 860})
            pages[name].goto(url)
            pages[name].get_by_role("tab", name="Image retrieval").wait_for()
        print(f"{args.runs} clicks per tab and app in Chromium, {args.think:.0f} ms from picking the photo "
              "to the click; ms from the click to the results shown, p50 / p95")
        for key in args.tabs.split(","):
            waits = measure(pages, TABS[key], args.runs, args.think / 1000)
            for name, times in waits.items():
                print(f"{key:<8}{name:<5}{np.percentile(times, 50):8.1f} /{np.percentile(times, 95):8.1f}")
            if "old" in waits:
                new, old = (np.percentile(waits[n], 50) for n in ("new", "old"))
                print(f"{key:<8}p50 new / old = {new / old:.2f}")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
