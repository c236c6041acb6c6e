"""The Gradio app: three tabs over one Engine, and three stable API endpoints.

Region input is a RECTANGLE the user drags with the mouse (gradio_image_annotation, single box):
a box is one gesture, maps exactly onto whole patches of the grid, and is what clients send
(x0, y0, x1, y1); brush masks or clicked points need more gestures and a second conversion.

Events run with preprocess=False: the handlers get the uploaded file's path undecoded, so
`images.load_image` (size limits, clear errors) is the only decoder, and the engine's face gate
sees every image. Layout: handlers first, then the Blocks layout, then the wiring.

API (gradio_client, see README):
  /search_image   (image, k)                              -> (gallery, json)
  /search_region  (image, x0, y0, x1, y1, k, heat)        -> (gallery, json)
  /match_patches  (image_a, image_b, x0, y0, x1, y1, n)   -> (picture, summary, json)
  Boxes are in the image's own pixels; for /match_patches leave x0..y1 as None for no box.
"""
from __future__ import annotations

import base64
import functools
from pathlib import Path

import gradio as gr
from gradio import utils as gr_utils
from gradio_image_annotation import image_annotator

from .config import Settings
from .engine import Engine, MatchResult, SearchResults
from .errors import UserError

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "collection"
EXAMPLE_QUERIES = ["mate-ladybird-on-grass.jpg", "lomiri-dogs-at-window.jpg", "mate-red-marigold.jpg"]
EXAMPLE_REGIONS = [  # file, box around the object in its pixels
    ("mate-ladybird-on-grass.jpg", (322, 132, 398, 196)),
    ("lomiri-dogs-at-window.jpg", (98, 112, 182, 202)),
    ("mate-red-marigold.jpg", (180, 55, 512, 300)),
]
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
"""


# --- turning Gradio payloads into plain values ---------------------------------------------------

def image_path(payload) -> str | bytes | None:
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


def annotation_box(annotator: image_annotator, value) -> tuple[str | bytes | None, tuple | None]:
    """(image, box) from an unprocessed annotator value; box is None when none was drawn."""
    if not value:
        return None, None
    if value.get("orientation"):
        raise gr.Error("Please rotate the image back to how it was uploaded before drawing the box.")
    boxes = annotator.preprocess_boxes(value.get("boxes") or [])  # undoes the display scaling
    box = None
    if boxes:
        b = boxes[-1]
        box = (b["xmin"], b["ymin"], b["xmax"], b["ymax"])
    return image_path(value.get("image")), box


def number_box(x0, y0, x1, y1) -> tuple | None:
    """A box from four numbers; None when all are unset."""
    values = (x0, y0, x1, y1)
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise gr.Error("Give all four box corners x0, y0, x1, y1 (in the image's pixels), or none.")
    return values


def user_errors(fn):
    """Show a UserError to the person as a Gradio error message; the server carries on."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:  # FaceRefused included: its message says why and what to do
            raise gr.Error(str(e), print_exception=False) from None
    return wrapper


def gallery_of(results: SearchResults) -> list[tuple]:
    return [(item.picture, item.caption) for item in results.items]


def _int(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise gr.Error(f"The {what} must be a whole number (got {value!r}).") from None


# --- the app -------------------------------------------------------------------------------------

def build_ui(engine: Engine, settings: Settings) -> gr.Blocks:
    """The Blocks app with its queue set up; launch it with `launch_options(settings)`."""

    def reporter(progress: gr.Progress):
        return lambda fraction, what: progress(fraction, desc=what)

    # Handlers: each turns payloads into plain values, calls one engine method, formats the result.
    @user_errors
    def search_image(image, k, progress=gr.Progress()):
        results = engine.search_image(image_path(image), _int(k, "number of results"), reporter(progress))
        return gallery_of(results), results.to_json(), [item.id for item in results.items]

    @user_errors
    def search_from_result(ids, k, evt: gr.SelectData, progress=gr.Progress()):
        if not isinstance(evt.index, int) or not 0 <= evt.index < len(ids or []):
            raise gr.Error("That result is no longer shown; run the search again.")
        image_id = ids[evt.index]
        results = engine.search_similar(image_id, _int(k, "number of results"), reporter(progress))
        return engine.result_image(image_id), gallery_of(results), results.to_json(), [i.id for i in results.items]

    @user_errors
    def search_region(image, x0, y0, x1, y1, k, heat, progress=gr.Progress()):
        box = number_box(x0, y0, x1, y1)
        results = engine.search_region(image_path(image), box, _int(k, "number of results"), bool(heat), reporter(progress))
        return gallery_of(results), results.to_json()

    @user_errors
    def search_region_drawn(value, k, heat, progress=gr.Progress()):
        image, box = annotation_box(region_input, value)
        results = engine.search_region(image, box, _int(k, "number of results"), bool(heat), reporter(progress))
        return gallery_of(results), results.to_json()

    def show_match(result: MatchResult):
        return result.picture, result.summary, result.to_json()

    @user_errors
    def match_patches(image_a, image_b, x0, y0, x1, y1, n, progress=gr.Progress()):
        box = number_box(x0, y0, x1, y1)
        return show_match(engine.match(image_path(image_a), image_path(image_b), box, _int(n, "number of lines"), reporter(progress)))

    @user_errors
    def match_patches_drawn(value_a, image_b, n, progress=gr.Progress()):
        image_a, box = annotation_box(match_input_a, value_a)
        return show_match(engine.match(image_a, image_path(image_b), box, _int(n, "number of lines"), reporter(progress)))

    k_max = settings.max_k
    # Uploads and result pictures live in Gradio's temp folder and are deleted once older than
    # upload_lifetime (checked every quarter of it), and all of them when the server stops.
    lifetime = settings.upload_lifetime
    with gr.Blocks(title="DINO image search", delete_cache=(max(1, lifetime // 4), lifetime)) as demo:
        gr.Markdown(
            "## DINO image search\nFind similar images, regions and matching parts in "
            f"**{engine.index.count} indexed images** with self-supervised "
            f"`{Path(str(engine.embedder.model_id)).name}` features. Photos of people are refused.",
            elem_id="intro",
        )
        with gr.Tab("Image retrieval", id="image"):
            with gr.Row():
                with gr.Column(scale=2):
                    query = gr.Image(type="filepath", label="Query image: upload, paste or take a photo",
                                     sources=["upload", "clipboard", "webcam"], height=320, elem_id="query")
                    image_k = gr.Slider(1, k_max, value=settings.k, step=1, label="Number of results")
                    image_button = gr.Button("Search", variant="primary", elem_id="search-image")
                    gr.Examples([[str(ASSETS / f)] for f in EXAMPLE_QUERIES], inputs=[query], label="Examples")
                with gr.Column(scale=3):
                    image_gallery = gr.Gallery(label="Most similar images (click one to search with it)",
                                               columns=3, height=540, allow_preview=False, object_fit="contain",
                                               elem_id="image-results")
                    with gr.Accordion("JSON", open=False):
                        image_json = gr.JSON(label="Results", elem_id="image-json")
            image_ids = gr.State([])

        with gr.Tab("Region retrieval", id="region"):
            with gr.Row():
                with gr.Column(scale=2):
                    region_input = image_annotator(
                        label="Upload an image, then drag a box over the region to search",
                        single_box=True, image_type="filepath", disable_edit_boxes=True,
                        box_min_size=4, sources=["upload", "clipboard"], height=360,
                        show_remove_button=True, handles_cursor=True, use_default_label=False, elem_id="region-input",
                    )
                    region_k = gr.Slider(1, k_max, value=settings.k, step=1, label="Number of results")
                    region_heat = gr.Checkbox(False, label="Show where each result is similar (heat map)")
                    region_button = gr.Button("Search region", variant="primary", elem_id="search-region")
                    gr.Examples([[{"image": str(ASSETS / f), "boxes": [_box_dict(b)]}] for f, b in EXAMPLE_REGIONS],
                                inputs=[region_input], label="Examples (box already drawn)")
                with gr.Column(scale=3):
                    region_gallery = gr.Gallery(label="Images holding a similar region (boxed)", columns=3,
                                                height=540, object_fit="contain", elem_id="region-results")
                    with gr.Accordion("JSON", open=False):
                        region_json = gr.JSON(label="Results with boxes", elem_id="region-json")
            with gr.Row(visible=False):  # inputs of the API-only /search_region: an image and four numbers
                api_region_image = gr.Image(type="filepath", label="image")
                api_box = [gr.Number(None, label=name) for name in ("x0", "y0", "x1", "y1")]
                api_region_button = gr.Button("search_region")

        with gr.Tab("Patch matching", id="match"):
            with gr.Row():
                match_input_a = image_annotator(
                    label="Image A (optional: drag a box to match only that region)",
                    single_box=True, image_type="filepath", disable_edit_boxes=True, box_min_size=4,
                    sources=["upload", "clipboard"], height=320, show_remove_button=True, elem_id="match-a",
                    scale=1, min_width=300,
                )
                match_b = gr.Image(type="filepath", label="Image B", sources=["upload", "clipboard"], height=320,
                                   elem_id="match-b", scale=1, min_width=300)
            with gr.Row():
                match_n = gr.Slider(1, 200, value=40, step=1, label="Lines to draw (strongest first)", scale=3)
                match_button = gr.Button("Match patches", variant="primary", scale=1, elem_id="match-patches")
            gr.Examples([[{"image": str(ASSETS / a), "boxes": []}, str(ASSETS / b)] for a, b in EXAMPLE_PAIRS],
                        inputs=[match_input_a, match_b], label="Example pairs")
            match_picture = gr.Image(label="Matching patches (red: strongest, blue: weakest)", type="pil",
                                     interactive=False, format="jpeg", elem_id="match-picture")
            match_summary = gr.Textbox(label="Summary", interactive=False, elem_id="match-summary")
            with gr.Accordion("JSON", open=False):
                match_json = gr.JSON(label="Matched point pairs (x, y in each image's pixels)", elem_id="match-json")
            with gr.Row(visible=False):  # inputs of the API-only /match_patches
                api_match_a = gr.Image(type="filepath", label="image_a")
                api_match_b = gr.Image(type="filepath", label="image_b")
                api_match_box = [gr.Number(None, label=name) for name in ("x0", "y0", "x1", "y1")]
                api_match_button = gr.Button("match_patches")

        # Wiring: the three public endpoints, and the UI-only events kept out of the API. One
        # concurrency group for all: Gradio otherwise limits each event separately, so `concurrency`
        # would apply per endpoint and mixed requests would run several at once on the same cores.
        raw = {"preprocess": False, "concurrency_id": "engine"}
        image_button.click(search_image, [query, image_k], [image_gallery, image_json, image_ids],
                           api_name="search_image", **raw)
        image_gallery.select(search_from_result, [image_ids, image_k], [query, image_gallery, image_json, image_ids],
                             api_visibility="private", **raw)
        api_region_button.click(search_region, [api_region_image, *api_box, region_k, region_heat],
                                [region_gallery, region_json], api_name="search_region", **raw)
        region_button.click(search_region_drawn, [region_input, region_k, region_heat], [region_gallery, region_json],
                            api_visibility="private", **raw)
        api_match_button.click(match_patches, [api_match_a, api_match_b, *api_match_box, match_n],
                               [match_picture, match_summary, match_json], api_name="match_patches", **raw)
        match_button.click(match_patches_drawn, [match_input_a, match_b, match_n],
                           [match_picture, match_summary, match_json], api_visibility="private", **raw)

    return demo.queue(max_size=settings.queue_size, default_concurrency_limit=settings.concurrency)


def launch_options(settings: Settings) -> dict:
    """Keyword arguments for `demo.launch` that come from the settings (Gradio 6 takes theme and css here)."""
    return {
        "server_name": settings.host, "server_port": settings.port, "share": settings.share,
        "max_file_size": settings.max_upload_bytes, "css": CSS, "theme": gr.themes.Soft(),
    }


def _box_dict(box: tuple) -> dict:
    x0, y0, x1, y1 = box
    return {"xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1}
