"""The Gradio app: four tabs over one Engine, and six stable API endpoints.

Region input is a RECTANGLE the user drags with the mouse (gradio_image_annotation, single box):
a box is one gesture, maps exactly onto whole patches of the grid, and is what clients send
(x0, y0, x1, y1); brush masks or clicked points need more gestures and a second conversion.

Events run with preprocess=False: the handlers get the uploaded file's path undecoded, so
`images.load_image` (size limits, clear errors) is the only decoder, and the engine's face gate
sees every image. Layout: payload helpers and the `Handlers` (callable without building the page)
first, then one function per tab that lays it out and wires its own events, then `build_ui`, and last
`launch_options` with the `PrepareUploads` middleware (each uploaded image prepared before its request).

API (gradio_client, see README):
  /search_image   (image, k)                              -> (gallery, json)
  /search_region  (image, x0, y0, x1, y1, k, heat)        -> (gallery, json)
  /match_patches  (image_a, image_b, x0, y0, x1, y1, n)   -> (picture, summary, json)
  /co_segment     (image_a, image_b)                      -> (picture, json)
  /what_dino_sees (image, share)                          -> (maps, mask, colours, json)
  /what_dino_sees_video (video, share)                    -> (video, json)
  Boxes are in the image's own pixels; for /match_patches leave x0..y1 as None for no box.
  `share` is the percentage of the attention mass the object mask keeps (DINO's 60 by default).
"""
from __future__ import annotations

import base64
import functools
import json
import re
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr
from gradio import processing_utils
from gradio import utils as gr_utils
from gradio_image_annotation import image_annotator
from starlette.middleware import Middleware

from .attention import DEFAULT_SHARE
from .backbones import short_name
from .config import BUNDLED_COLLECTION, Settings
from .engine import Engine, MatchResult, Progress, SearchResults
from .errors import UserError
from .faces import FaceRefused
from .geometry import Box
from .matching import MATCH_LINES

EXAMPLE_QUERIES = ["mate-ladybird-on-grass.jpg", "lomiri-dogs-at-window.jpg", "mate-red-marigold.jpg"]
EXAMPLE_REGIONS = [  # file, box around the object in its pixels
    ("mate-ladybird-on-grass.jpg", (322, 132, 398, 196)),
    ("lomiri-dogs-at-window.jpg", (98, 112, 182, 202)),
    ("mate-red-marigold.jpg", (180, 55, 512, 300)),
]
EXAMPLE_SIGHTS = ["lomiri-dogs-at-window.jpg", "mate-ladybird-on-grass.jpg", "plasma-foggy-pier.jpg"]
EXAMPLE_CLIP = BUNDLED_COLLECTION.parent / "clips" / "marigold-pan.mp4"
EXAMPLE_PAIRS = [("mate-red-marigold.jpg", "mate-yellow-flower.jpg"),
                 ("plasma-foggy-pier.jpg", "plasma-wooden-jetty-lake.jpg")]
CSS = """
#intro p { margin: 0; }
#match-a { flex: 1 1 0% !important; }  /* the annotator asks for its canvas's width; share the row with B */
/* Captions carry the label and the score: let them wrap instead of cutting the score off. */
#image-results .caption-label, #region-results .caption-label {
    white-space: normal !important; overflow: visible !important; text-overflow: clip !important;
    max-width: calc(100% - 8px) !important; font-size: 12px !important; line-height: 1.25 !important;
}
/* A refused input is explained where the results would be, and stays until the next search. */
.refusal { border: 2px solid #d97706; background: #fffbeb; border-radius: 8px; padding: 10px 14px !important; }
.refusal p { margin: 0; color: #7c2d12; }
.refusal .refusal { border: none; background: none; padding: 0 !important; }  /* the block's inner copy of the class */
#sees-model p { margin: 0; }
/* A phone: two results a row with short captions, below the gallery's label (two lines there), and the
   gallery as tall as its results instead of a box that scrolls inside the page. */
@media (max-width: 640px) {
    #image-results, #region-results, #image-results .grid-wrap, #region-results .grid-wrap {
        height: auto !important; max-height: none !important;
    }
    #image-results .grid-container, #region-results .grid-container {
        grid-template-columns: repeat(2, minmax(0, 1fr)) !important; padding-top: 52px !important;
    }
    #image-results .caption-label, #region-results .caption-label { font-size: 10px !important; line-height: 1.2 !important; }
    /* a wide picture is short on a phone: its label goes above it instead of over it */
    #match-picture label.float, #parts-picture label.float, #sees-maps label.float { position: relative !important; }
}
"""
# Every event: handlers get payloads undecoded (see above), and all share one concurrency group:
# Gradio otherwise limits each event separately, so `concurrency` would apply per endpoint and
# mixed requests would run several at once on the same cores.
QUERY_LABEL = "Query image: upload, paste or take a photo"
EVENT_OPTIONS = {"preprocess": False, "concurrency_id": "engine"}
BOX_CORNERS = ("x0", "y0", "x1", "y1")
UPLOAD_ROUTE = "/gradio_api/upload"  # where Gradio takes the files a client sends before its request
CONTENT_NAMED = re.compile(r"/file=.*/[0-9a-f]{64}/[^/]+$")  # a file Gradio serves from a folder named by its hash
# Result pictures go out as JPEG (a tenth of a ms to encode; WebP took ~4 ms a picture); gallery_of encodes
# a gallery's drawn pictures itself, in the format the components are given.
PICTURE_FORMAT = "jpeg"


# --- turning Gradio payloads into plain values ---------------------------------------------------

def image_path(payload: Any) -> str | bytes | None:
    """The uploaded file of an unprocessed image payload: its path in Gradio's cache, or webcam bytes."""
    if payload is None:
        return None
    if isinstance(payload, str):
        return uploaded_file(payload)
    if payload.get("path"):
        return uploaded_file(payload["path"])
    url = payload.get("url") or ""
    if url.startswith("data:") and "," in url:
        return base64.b64decode(url.split(",", 1)[1])
    return None


def uploaded_file(path: str) -> str:
    """`path` if it is a file uploaded to this app; any other server path is refused unread.

    Events run with preprocess=False, so Gradio's own "was it uploaded?" check does not see a payload
    without its FileData tag: without this, {"path": "/etc/passwd"} would reach the decoder.
    """
    uploads = Path(gr_utils.get_upload_folder()).resolve()
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(uploads):
        raise gr.Error("Upload the image itself: this app only reads files uploaded to it, "
                       "not paths or URLs on the server.", print_exception=False)
    if not resolved.is_file():
        raise gr.Error("The uploaded image is no longer on the server (uploads are deleted after a while); "
                       "please upload it again.", print_exception=False)
    return str(resolved)


def percentage(value: Any) -> float:
    """A slider's or a client's share as a number; the engine says what range it must lie in."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"The share of attention to keep must be a number from 1 to 100 (got {value!r}).") from None


def drawn_box(boxes: list[dict] | None) -> Box | None:
    """The last box drawn on an annotator, in the image's own pixels; None when none was drawn.

    The annotator sends each box in its canvas's pixels with the `scaleFactor` it showed the image at;
    dividing and rounding is all `image_annotator.preprocess_boxes` does, done here on the payload so
    that no component instance is needed.
    """
    if not boxes:
        return None
    box = boxes[-1]
    scale = box.get("scaleFactor", 1)
    return Box(*(round(box[corner] / scale) for corner in ("xmin", "ymin", "xmax", "ymax")))


def annotation_box(value: dict | None) -> tuple[str | bytes | None, Box | None]:
    """(image, box) from an unprocessed annotator value; box is None when none was drawn."""
    if not value:
        return None, None
    if value.get("orientation"):  # the box would be in the rotated picture's pixels, not the file's
        raise gr.Error("Please rotate the image back to how it was uploaded before drawing the box.")
    return image_path(value.get("image")), drawn_box(value.get("boxes"))


def number_box(x0: float | None, y0: float | None, x1: float | None, y1: float | None) -> Box | None:
    """A box from four numbers; None when all are unset."""
    values = (x0, y0, x1, y1)
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise gr.Error("Give all four box corners x0, y0, x1, y1 (in the image's pixels), or none.")
    return Box(*values)


def whole_number(value: Any, what: str) -> int:
    """`value` as an int; API clients can send anything, and the engine checks ints only."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise gr.Error(f"The {what} must be a whole number (got {value!r}).") from None


def shown_id(ids: list[int] | None, index: Any) -> int:
    """The image id behind the clicked gallery position; the gallery may have changed since it was drawn."""
    if not isinstance(index, int) or not 0 <= index < len(ids or []):
        raise gr.Error("That result is no longer shown; run the search again.")
    return ids[index]


# --- formatting results --------------------------------------------------------------------------

def gallery_of(results: SearchResults) -> list[tuple]:
    """A gallery's value as JPEG files in Gradio's cache, so that Gradio's gallery step only names them (it
    encoded 8 pictures in 7.5 ms on threads of its own, against 0.9 ms for 8 files): a thumbnail shown as
    stored is its own file, not decoded and encoded again; a drawn one is encoded here, as Gradio would."""
    cache = gr_utils.get_upload_folder()
    return [(processing_utils.save_bytes_to_cache(item.jpeg, f"result-{item.id}.jpg", cache) if item.jpeg else
             processing_utils.save_pil_to_cache(item.picture, cache, f"result-{item.id}", format=PICTURE_FORMAT),
             item.caption) for item in results.items]


def ids_of(results: SearchResults) -> list[int]:
    """The ids in gallery order, kept in a gr.State so a click on a result can search from it."""
    return [item.id for item in results.items]


def show_match(result: MatchResult) -> tuple:
    return result.picture, result.summary, result.to_json()


def shown_in_place(handler: Callable, blank: tuple) -> Callable:
    """`handler` for a button on the page: a refusal (a gr.Error) becomes a notice in the results area
    (the extra last output) with `blank` results, instead of a toast that fades and red "Error"
    badges; success hides the notice. The public API events keep raising, which clients expect."""
    @functools.wraps(handler)
    def on_page(*args, **kwargs):
        try:
            return (*handler(*args, **kwargs), gr.update(value="", visible=False))
        except gr.Error as e:
            return (*blank, gr.update(value=f"**Not searched.** {e.message}", visible=True))
    on_page.__name__ = on_page.__qualname__ = f"{handler.__name__}_on_page"  # events are named after it
    return on_page


def refusal_notice(elem_id: str) -> gr.Markdown:
    return gr.Markdown("", visible=False, elem_id=elem_id, elem_classes="refusal")


def reporter(progress: gr.Progress) -> Progress:
    """The engine's (fraction, what) progress callback, shown on Gradio's progress bar."""
    return lambda fraction, what: progress(fraction, desc=what)


def user_errors(fn: Callable) -> Callable:
    """Show a UserError to the person as a Gradio error message; the server carries on."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:  # FaceRefused included: its message says why and what to do
            raise gr.Error(str(e), print_exception=False) from None
    return wrapper


# --- the events' handlers ------------------------------------------------------------------------

class Handlers:
    """The function of every event, over one engine. Each turns payloads into plain values, calls one
    engine method and formats the result. Gradio names an event after its function's name, and the
    `gr.Progress` default and `gr.SelectData` hint are how it knows what to pass: keep both."""

    def __init__(self, engine: Engine, upload_lifetime: int = 3600):
        self.engine, self.upload_lifetime = engine, upload_lifetime

    def intro_on_page(self) -> str:
        """The page's header as the index is now (images added or removed since the app started)."""
        return intro(self.engine)

    @user_errors
    def search_image(self, image: Any, k: Any, progress: gr.Progress = gr.Progress()) -> tuple:
        results = self.engine.search_image(image_path(image), whole_number(k, "number of results"), reporter(progress))
        return gallery_of(results), results.to_json(), ids_of(results)

    @user_errors
    def search_from_result(self, ids: list[int], k: Any, evt: gr.SelectData,
                           progress: gr.Progress = gr.Progress()) -> tuple:
        """A click on a result searches with its stored vector; the clicked image becomes the query."""
        image_id = shown_id(ids, evt.index)
        results = self.engine.search_similar(image_id, whole_number(k, "number of results"), reporter(progress))
        return self.engine.result_image(image_id), gallery_of(results), results.to_json(), ids_of(results)

    @user_errors
    def search_region(self, image: Any, x0: Any, y0: Any, x1: Any, y1: Any, k: Any, heat: Any,
                      progress: gr.Progress = gr.Progress()) -> tuple:
        results = self.engine.search_region(image_path(image), number_box(x0, y0, x1, y1),
                                            whole_number(k, "number of results"), bool(heat), reporter(progress))
        return gallery_of(results), results.to_json()

    @user_errors
    def search_region_drawn(self, value: dict | None, k: Any, heat: Any,
                            progress: gr.Progress = gr.Progress()) -> tuple:
        image, box = annotation_box(value)
        results = self.engine.search_region(image, box, whole_number(k, "number of results"), bool(heat),
                                            reporter(progress))
        return gallery_of(results), results.to_json()

    @user_errors
    def match_patches(self, image_a: Any, image_b: Any, x0: Any, y0: Any, x1: Any, y1: Any, n: Any,
                      progress: gr.Progress = gr.Progress()) -> tuple:
        return show_match(self.engine.match(image_path(image_a), image_path(image_b), number_box(x0, y0, x1, y1),
                                            whole_number(n, "number of lines"), reporter(progress)))

    @user_errors
    def match_patches_drawn(self, value_a: dict | None, image_b: Any, n: Any,
                            progress: gr.Progress = gr.Progress()) -> tuple:
        image_a, box = annotation_box(value_a)
        return show_match(self.engine.match(image_a, image_path(image_b), box, whole_number(n, "number of lines"),
                                            reporter(progress)))


    @user_errors
    def co_segment(self, image_a: Any, image_b: Any, progress: gr.Progress = gr.Progress()) -> tuple:
        result = self.engine.co_segment(image_path(image_a), image_path(image_b), reporter(progress))
        return result.picture, result.to_json()

    @user_errors
    def co_segment_drawn(self, value_a: dict | None, image_b: Any, progress: gr.Progress = gr.Progress()) -> tuple:
        image_a, _ = annotation_box(value_a)  # the parts of the whole of A: a box does not apply
        return self.co_segment(image_a, image_b, progress)

    @user_errors
    def what_dino_sees(self, image: Any, share: Any, progress: gr.Progress = gr.Progress()) -> tuple:
        result = self.engine.what_dino_sees(image_path(image), percentage(share), reporter(progress))
        return result.maps, result.mask, result.colours, result.to_json()

    @user_errors
    def what_dino_sees_video(self, video: Any, share: Any, progress: gr.Progress = gr.Progress()) -> tuple:
        path = image_path(video)  # an unprocessed video payload is a FileData like an image's
        if not isinstance(path, str):
            raise gr.Error("Upload a short clip first (MP4, WebM or GIF).", print_exception=False)
        try:
            result = self.engine.what_dino_sees_video(path, percentage(share), self.clip_folder(), reporter(progress))
        except FaceRefused:
            Path(path).unlink(missing_ok=True)  # nothing of a clip showing a person is kept
            raise
        return str(result.video), result.to_json()

    def clip_folder(self) -> Path:
        """Where result videos are written (Gradio serves them from its copy); older ones are deleted."""
        folder = Path(gr_utils.get_upload_folder()) / "what-dino-sees"
        cutoff = time.time() - self.upload_lifetime
        for old in folder.glob("*.mp4"):
            if old.stat().st_mtime < cutoff:
                old.unlink(missing_ok=True)
        return folder


# --- pieces the tabs share -----------------------------------------------------------------------

def example(name: str) -> str:
    return str(BUNDLED_COLLECTION / name)


def results_slider(settings: Settings) -> gr.Slider:
    return gr.Slider(1, settings.max_k, value=settings.k, step=1, label="Number of results")


def json_accordion(label: str, elem_id: str) -> gr.JSON:
    """The raw result, folded away: people look at the pictures, developers at this."""
    with gr.Accordion("JSON", open=False):
        return gr.JSON(label=label, elem_id=elem_id)


def box_drawer(label: str, elem_id: str, height: int, **options: Any) -> image_annotator:
    """An image on which one box is dragged out; editing handles are off so one drag replaces the box."""
    return image_annotator(label=label, single_box=True, image_type="filepath", disable_edit_boxes=True,
                           box_min_size=4, sources=["upload", "clipboard"], height=height, show_remove_button=True,
                           elem_id=elem_id, **options)


def box_numbers() -> list[gr.Number]:
    """The four corners an API client sends instead of drawing a box."""
    return [gr.Number(None, label=name) for name in BOX_CORNERS]


def _box_dict(box: tuple) -> dict:
    x0, y0, x1, y1 = box
    return {"xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1}


# --- the tabs: each lays out its components and wires its own events -----------------------------

def image_tab(handlers: Handlers, settings: Settings) -> None:
    """Image retrieval, and /search_image; clicking a result searches with it."""
    with gr.Tab("Image retrieval", id="image"):
        with gr.Row():
            with gr.Column(scale=2):
                query = gr.Image(type="filepath", label=QUERY_LABEL,
                                 sources=["upload", "clipboard", "webcam"], height=320, elem_id="query")
                k = results_slider(settings)
                button = gr.Button("Search", variant="primary", elem_id="search-image")
                gr.Examples([[example(f)] for f in EXAMPLE_QUERIES], inputs=[query], label="Examples")
            with gr.Column(scale=3):
                notice = refusal_notice("image-notice")
                gallery = gr.Gallery(label="Most similar images (click one to search with it)", columns=3,
                                     height=540, allow_preview=False, object_fit="contain", elem_id="image-results",
                                     format=PICTURE_FORMAT)
                result_json = json_accordion("Results", "image-json")
        ids = gr.State([])
        with gr.Row(visible=False):  # the API-only /search_image, so that the page's button can show refusals
            api_image = gr.Image(type="filepath", label=QUERY_LABEL)  # same description as before the split
            api_button = gr.Button("search_image")
    outputs = [gallery, result_json, ids]
    api_button.click(handlers.search_image, [api_image, k], outputs, api_name="search_image", **EVENT_OPTIONS)
    button.click(shown_in_place(handlers.search_image, ([], None, [])), [query, k], [*outputs, notice],
                 api_visibility="private", **EVENT_OPTIONS)
    gallery.select(shown_in_place(handlers.search_from_result, (gr.update(), [], None, [])), [ids, k],
                   [query, *outputs, notice], api_visibility="private", **EVENT_OPTIONS)


def region_tab(handlers: Handlers, settings: Settings) -> None:
    """Region retrieval from a dragged box, and /search_region from four numbers."""
    with gr.Tab("Region retrieval", id="region"):
        with gr.Row():
            with gr.Column(scale=2):
                drawn = box_drawer("Upload an image, then drag a box over the region to search", "region-input",
                                   360, handles_cursor=True, use_default_label=False)
                k = results_slider(settings)
                heat = gr.Checkbox(False, label="Show where each result is similar (heat map)")
                button = gr.Button("Search region", variant="primary", elem_id="search-region")
                gr.Examples([[{"image": example(f), "boxes": [_box_dict(b)]}] for f, b in EXAMPLE_REGIONS],
                            inputs=[drawn], label="Examples (box already drawn)")
            with gr.Column(scale=3):
                notice = refusal_notice("region-notice")
                gallery = gr.Gallery(label="Images holding a similar region (boxed)", columns=3,
                                     height=540, object_fit="contain", elem_id="region-results", format=PICTURE_FORMAT)
                result_json = json_accordion("Results with boxes", "region-json")
        with gr.Row(visible=False):  # inputs of the API-only /search_region: an image and four numbers
            api_image, api_box = gr.Image(type="filepath", label="image"), box_numbers()
            api_button = gr.Button("search_region")
    outputs = [gallery, result_json]
    api_button.click(handlers.search_region, [api_image, *api_box, k, heat], outputs, api_name="search_region",
                     **EVENT_OPTIONS)
    button.click(shown_in_place(handlers.search_region_drawn, ([], None)), [drawn, k, heat], [*outputs, notice],
                 api_visibility="private", **EVENT_OPTIONS)


def match_tab(handlers: Handlers) -> None:
    """Patch matching between A (optionally only a dragged box) and B, and /match_patches."""
    with gr.Tab("Patch matching", id="match"):
        with gr.Row():
            drawn_a = box_drawer("Image A (optional: drag a box to match only that region)", "match-a", 320,
                                 scale=1, min_width=300)
            image_b = gr.Image(type="filepath", label="Image B", sources=["upload", "clipboard"], height=320,
                               elem_id="match-b", scale=1, min_width=300)
        with gr.Row():
            n = gr.Slider(1, 200, value=MATCH_LINES, step=1, label="Lines to draw (strongest first)", scale=3)
            button = gr.Button("Match patches", variant="primary", scale=1, elem_id="match-patches")
        gr.Examples([[{"image": example(a), "boxes": []}, example(b)] for a, b in EXAMPLE_PAIRS],
                    inputs=[drawn_a, image_b], label="Example pairs")
        notice = refusal_notice("match-notice")
        picture = gr.Image(label="Matching patches (red: strongest, blue: weakest)", type="pil",
                           interactive=False, format=PICTURE_FORMAT, elem_id="match-picture")
        summary = gr.Textbox(label="Summary", interactive=False, elem_id="match-summary")
        result_json = json_accordion("Matched point pairs (x, y in each image's pixels)", "match-json")
        with gr.Accordion("Co-segmentation: the parts of A and B that agree, coloured alike", open=False):
            parts_button = gr.Button("Colour the parts that agree", elem_id="co-segment")
            parts_notice = refusal_notice("parts-notice")
            parts = gr.Image(label="Parts that agree (one colour basis fitted on both images; the rest greyed)",
                             type="pil", interactive=False, format=PICTURE_FORMAT, elem_id="parts-picture")
            parts_json = json_accordion("Masks of the agreeing parts", "parts-json")
        with gr.Row(visible=False):  # inputs of the API-only /match_patches and /co_segment
            api_a, api_b = gr.Image(type="filepath", label="image_a"), gr.Image(type="filepath", label="image_b")
            api_box, api_button = box_numbers(), gr.Button("match_patches")
            api_parts_button = gr.Button("co_segment")
    outputs = [picture, summary, result_json]
    api_button.click(handlers.match_patches, [api_a, api_b, *api_box, n], outputs, api_name="match_patches",
                     **EVENT_OPTIONS)
    button.click(shown_in_place(handlers.match_patches_drawn, (None, "", None)), [drawn_a, image_b, n],
                 [*outputs, notice], api_visibility="private", **EVENT_OPTIONS)
    api_parts_button.click(handlers.co_segment, [api_a, api_b], [parts, parts_json], api_name="co_segment",
                           **EVENT_OPTIONS)
    parts_button.click(shown_in_place(handlers.co_segment_drawn, (None, None)), [drawn_a, image_b],
                       [parts, parts_json, parts_notice], api_visibility="private", **EVENT_OPTIONS)


def share_slider() -> gr.Slider:
    return gr.Slider(10, 95, value=DEFAULT_SHARE, step=5, label="Attention kept in the object mask (%)")


def sight_tab(handlers: Handlers, settings: Settings) -> None:
    """What DINO sees in a photo or a short clip, and /what_dino_sees, /what_dino_sees_video."""
    with gr.Tab("What DINO sees", id="sees"):
        gr.Markdown(f"Model: **{handlers.engine.model_name}**. The last layer's attention of the CLS token outlines "
                    "objects with no labels; the patch features' first three principal components, painted as "
                    "colours, light up the same parts alike.", elem_id="sees-model")
        with gr.Row():
            with gr.Column(scale=2):
                photo = gr.Image(type="filepath", label="Photo", sources=["upload", "clipboard", "webcam"],
                                 height=300, elem_id="sees-photo")
                share = share_slider()
                button = gr.Button("Look", variant="primary", elem_id="sees-look")
                gr.Examples([[example(f)] for f in EXAMPLE_SIGHTS], inputs=[photo], label="Examples")
            with gr.Column(scale=3):
                notice = refusal_notice("sees-notice")
                maps = gr.Image(label="Where the CLS token looks: each head of the last layer, and their mean",
                                type="pil", interactive=False, format=PICTURE_FORMAT, elem_id="sees-maps")
                with gr.Row():
                    mask = gr.Image(label="Object mask", type="pil", interactive=False, format=PICTURE_FORMAT,
                                    elem_id="sees-mask")
                    colours = gr.Image(label="Feature colours (PCA; background greyed)", type="pil",
                                       interactive=False, format=PICTURE_FORMAT, elem_id="sees-colours")
                result_json = json_accordion("Mask: box, share and run-length encoding per part", "sees-json")
        with gr.Row():
            with gr.Column(scale=2):
                clip = gr.Video(label=f"Short clip (MP4, WebM or GIF; up to {settings.video_seconds} s, "
                                f"{settings.video_fps} frames a second analysed)", sources=["upload"],
                                height=260, elem_id="sees-clip")
                clip_share = share_slider()
                clip_button = gr.Button("Look at every frame", variant="primary", elem_id="sees-look-clip")
                gr.Examples([[str(EXAMPLE_CLIP)]], inputs=[clip], label="Example clip")
            with gr.Column(scale=3):
                clip_notice = refusal_notice("sees-clip-notice")
                video = gr.Video(label="Object mask | feature colours, frame by frame", interactive=False,
                                 autoplay=True, loop=True, height=300, elem_id="sees-video")
                clip_json = json_accordion("Per frame: time, mask, timings", "sees-clip-json")
        with gr.Row(visible=False):  # inputs of the API-only endpoints
            api_photo, api_clip = gr.Image(type="filepath", label="image"), gr.Video(label="video")
            api_button, api_clip_button = gr.Button("what_dino_sees"), gr.Button("what_dino_sees_video")
    outputs = [maps, mask, colours, result_json]
    api_button.click(handlers.what_dino_sees, [api_photo, share], outputs, api_name="what_dino_sees", **EVENT_OPTIONS)
    button.click(shown_in_place(handlers.what_dino_sees, (None, None, None, None)), [photo, share],
                 [*outputs, notice], api_visibility="private", **EVENT_OPTIONS)
    api_clip_button.click(handlers.what_dino_sees_video, [api_clip, clip_share], [video, clip_json],
                          api_name="what_dino_sees_video", **EVENT_OPTIONS)
    clip_button.click(shown_in_place(handlers.what_dino_sees_video, (None, None)), [clip, clip_share],
                      [video, clip_json, clip_notice], api_visibility="private", **EVENT_OPTIONS)


# --- the app -------------------------------------------------------------------------------------

def intro(engine: Engine) -> str:
    return ("## DINO image search\nFind similar images, regions and matching parts in "
            f"**{engine.index.count} indexed images** with self-supervised "
            f"`{short_name(engine.embedder.model_id)}` features. Photos of people are refused.")


def build_ui(engine: Engine, settings: Settings) -> gr.Blocks:
    """The Blocks app with its queue set up; launch it with `launch_options(settings)`."""
    handlers = Handlers(engine, settings.upload_lifetime)
    # Uploads and result pictures live in Gradio's temp folder and are deleted once older than
    # upload_lifetime (checked every quarter of it), and all of them when the server stops.
    lifetime = settings.upload_lifetime
    with gr.Blocks(title="DINO image search", delete_cache=(max(1, lifetime // 4), lifetime)) as demo:
        header = gr.Markdown(intro(engine), elem_id="intro")
        image_tab(handlers, settings)
        region_tab(handlers, settings)
        match_tab(handlers)
        sight_tab(handlers, settings)
        # The index may change while the app runs (LiveIndex): each page load shows its count now.
        demo.load(handlers.intro_on_page, None, header, api_visibility="private", queue=False)
    return demo.queue(max_size=settings.queue_size, default_concurrency_limit=settings.concurrency)


def launch_options(settings: Settings, engine: Engine) -> dict:
    """Keyword arguments for `demo.launch` that come from the settings (Gradio 6 takes theme and css here),
    and the middleware that hands each upload to `engine` to prepare."""
    return {
        "server_name": settings.host, "server_port": settings.port, "share": settings.share,
        "max_file_size": settings.max_upload_bytes, "css": CSS, "theme": gr.themes.Soft(),
        "app_kwargs": {"middleware": [Middleware(PrepareUploads, engine=engine),
                                      Middleware(KeptFiles, max_age=settings.upload_lifetime)]},
    }


class KeptFiles:
    """ASGI middleware: a file Gradio serves from a folder named by the SHA-256 of its bytes (its upload route
    and `processing_utils.save_*_to_cache` name them so: uploads, result pictures, examples) is the same for
    as long as its URL answers, so the browser is told to keep it: a picture shown again (a thumbnail in the
    next results, an example) costs no request. Gradio's own answer says nothing, and a file rewritten with
    the same bytes (each search writes its thumbnails) got a new ETag, so the browser fetched it again."""

    def __init__(self, app, max_age: int):
        self.app, self.header = app, (b"cache-control", f"private, max-age={max_age}, immutable".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD") or not CONTENT_NAMED.search(scope["path"]):
            return await self.app(scope, receive, send)

        async def kept(message):
            if message["type"] == "http.response.start" and message["status"] == 200:
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, kept)


class PrepareUploads:
    """ASGI middleware: once Gradio's upload route has answered, each file it took is handed to
    `Engine.prepare_upload`, so the load, face gate and embedding run while the client (or the person)
    gets on to the request that will use it. Every other request passes untouched."""

    def __init__(self, app, engine: Engine):
        self.app, self.engine = app, engine

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith(UPLOAD_ROUTE):
            return await self.app(scope, receive, send)
        status, body = 0, []

        async def answer(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, answer)  # returns after the route's background copy into the cache
        if status == 200:
            try:
                paths = json.loads(b"".join(body))
            except ValueError:
                return
            for path in paths if isinstance(paths, list) else []:
                if isinstance(path, str):
                    self.engine.prepare_upload(path)
