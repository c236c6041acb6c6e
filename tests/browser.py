"""Driving Debian's Chromium with Playwright, for the browser tests and benchmarks/browser_latency.py."""
from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


def launch(playwright):
    """A headless Chromium of Debian's (never a downloaded browser)."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)


def drag_box(page, canvas_selector: str, image_size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    """Drag out `box` (in the image's pixels) with the mouse on the annotator's canvas."""
    start, end = on_screen(page, canvas_selector, image_size, box)
    page.mouse.move(*start)
    page.mouse.down()
    for x, y in steps(start, end):
        page.mouse.move(x, y)
    page.mouse.up()


def touch_drag_box(page, canvas_selector: str, image_size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    """Drag out `box` with a finger (the page's context made with has_touch=True): Chromium's own touch events."""
    start, end = on_screen(page, canvas_selector, image_size, box)
    touch = page.context.new_cdp_session(page)
    touch.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [dict(zip("xy", start))]})
    for x, y in steps(start, end):
        touch.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]})
    touch.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    touch.detach()
    page.wait_for_timeout(500)  # as a person's next tap comes: one sooner would be taken for a double tap


def on_screen(page, canvas_selector: str, image_size: tuple[int, int], box: tuple[int, int, int, int]):
    """The page coordinates of `box`'s corners (image pixels) on the annotator's canvas, once it shows the image."""
    canvas = page.locator(canvas_selector)
    canvas.wait_for()
    page.wait_for_timeout(300)  # the annotator fits the image into the canvas after it loads
    x, y, w, h = canvas.evaluate("""c => { const r = c.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }""")
    scale = min(w / image_size[0], h / image_size[1])  # the image is centred in the canvas
    left, top = x + (w - image_size[0] * scale) / 2, y + (h - image_size[1] * scale) / 2
    return (left + box[0] * scale, top + box[1] * scale), (left + box[2] * scale, top + box[3] * scale)


def steps(start: tuple[float, float], end: tuple[float, float], count: int = 10) -> list[tuple[float, float]]:
    """The points a drag passes from `start` to `end`, the last of them `end`."""
    return [(start[0] + (end[0] - start[0]) * i / count, start[1] + (end[1] - start[1]) * i / count)
            for i in range(1, count + 1)]
