"""Load a DINO / DINOv2 / DINOv3 backbone by hub id or local folder and turn images into features.

The image processor is never built: its settings (mean, std, size) are read from the checkpoint's
preprocessor_config.json, since only those are used, and DINOv3's processor class needs torchvision,
which does not import beside the pinned CPU torch.

Every image is resized (bicubic, aspect ratio not kept) to a square `input_size` x `input_size`
input, so each image gives the same patch grid (gh x gw) and a patch index means the same
thing for every image in an index; geometry.py maps patches back to the original pixels.
DINO features are robust to this stretch; cropping (the processors' default for DINOv2) would
drop content a user may box.
"""
from __future__ import annotations

import copy
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from .backbones import DEFAULT_MODEL, LARGE_PARAMETERS, family_of, prefix_tokens
from .config import DEFAULT_CACHE_DIR
from .errors import UserError, first_line
from .hub import require_hub
from .images import REDUCING_GAP, resize_picture
from .onnx_backend import BackendUnavailable, OnnxModel, backend_order, load_onnx_model

log = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ModelLoadError(UserError):
    """The model could not be loaded; the message says how to point at a local copy."""


@dataclass
class Features:
    """What the backbone says about a batch of images."""

    cls: np.ndarray  # (n, d) float32, L2-normalised: one vector per image
    patches: np.ndarray  # (n, gh*gw, d) float32, L2-normalised, row-major over the grid
    grid: tuple[int, int]  # (gh, gw)
    sizes: list[tuple[int, int]]  # original (width, height) of each image

    def one(self, i: int) -> "Features":
        """The features of image i alone, as a batch of one."""
        return Features(self.cls[i:i + 1], self.patches[i:i + 1], self.grid, [self.sizes[i]])

    @classmethod
    def joined(cls, parts: list["Features"]) -> "Features":
        """One batch of several, in order."""
        return cls(np.concatenate([p.cls for p in parts]), np.concatenate([p.patches for p in parts]),
                   parts[0].grid, [s for p in parts for s in p.sizes])


@dataclass
class Attended:
    """Features of a batch of images and where each one's CLS token looks (Embedder.attend)."""

    features: Features
    attention: np.ndarray  # (n, heads, gh, gw) float32: last layer's CLS attention to each patch (registers left out)

    @classmethod
    def joined(cls, parts: list["Attended"]) -> "Attended":
        """One batch of several, in order."""
        return cls(Features.joined([p.features for p in parts]), np.concatenate([p.attention for p in parts]))


def prepare_image(image: Image.Image, input_size: int) -> np.ndarray:
    """(S, S, 3) uint8 model input: the RGB image resized to the square input size.

    An image over 3 times the input size is first shrunk by a whole factor (images.REDUCING_GAP): a phone's
    photo takes 12 ms instead of 61, and its features keep a cosine of 0.9999 to those of the whole
    resampling (benchmarks/RESULTS.md, "Phone photos"). Kept free of torch so decoding workers can run it
    in parallel.
    """
    return np.array(image.resize((input_size, input_size), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP),
                    dtype=np.uint8)


def prepare_pictures(pictures: list[torch.Tensor], input_size: int) -> np.ndarray:
    """`prepare_image` of (3, H, W) uint8 tensors, resized where they lie (a GPU), then copied to memory in
    one go: (n, S, S, 3) uint8."""
    resized = torch.stack([resize_picture(p, (input_size, input_size)) for p in pictures])
    return resized.permute(0, 2, 3, 1).cpu().numpy()


def pick_device(device: str = "auto") -> str:
    """'cuda' when there is a GPU, else 'mps' on Apple silicon, else 'cpu'; or the one asked for."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _load_pretrained(model_id: str, revision: str | None):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the pooler's "newly initialised" report is noise here
    hf_logging.disable_progress_bar()
    local = Path(model_id).expanduser()
    if local.is_dir():
        source, kwargs = str(local), {}
    else:
        source, kwargs = model_id, {"revision": revision}
        try:  # a cached copy needs no network
            return _from_pretrained(source, dict(kwargs, local_files_only=True))
        except OSError:
            require_hub(
                f"model '{model_id}'",
                f"download it where there is internet (`hf download {model_id} --local-dir "
                f"models/{model_id.split('/')[-1]}`) and pass that folder as --model.",
            )
    try:
        return _from_pretrained(source, kwargs)
    except (OSError, ValueError) as e:
        if _gated(e):
            raise ModelLoadError(
                f"{model_id} is gated: accept its licence at https://huggingface.co/{model_id} while signed in, "
                "then set HF_TOKEN to a token of that account (read access) and run again."
            ) from None
        raise ModelLoadError(
            f"Could not load model '{model_id}': {first_line(e)} Pass a hub id such as "
            f"{DEFAULT_MODEL} or a folder holding config.json and the weights."
        ) from None


def _from_pretrained(source: str, kwargs: dict):
    """The model, its processor's settings (a dict: image_mean, image_std, size, ...) and its family."""
    from transformers import AutoConfig, AutoModel
    from transformers.image_processing_base import ImageProcessingMixin

    config = AutoConfig.from_pretrained(source, **kwargs)
    family = family_of(config.model_type, source)
    model = AutoModel.from_pretrained(source, attn_implementation="sdpa", **kwargs, **family.load)
    try:
        settings, _ = ImageProcessingMixin.get_image_processor_dict(source, **kwargs)
    except OSError:  # no preprocessor_config.json: ImageNet's statistics, as every DINO was trained with
        settings = {}
    return model, settings, family


def _gated(error: BaseException) -> bool:
    """Whether loading failed because the repo is gated (a licence to accept, a token to send)."""
    from huggingface_hub.errors import GatedRepoError

    while error is not None:
        if isinstance(error, GatedRepoError) or "gated" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


class Embedder:
    """Images in, L2-normalised CLS and patch features out, in batches, on cuda / mps / cpu.

    On a GPU the model runs in bfloat16 (features are returned as float32). On a CPU, `backend`
    "auto" runs it through ONNX Runtime with int8 weights (or float32 if int8 strays from the torch
    features), falling back to plain torch with a warning; "torch" never tries ONNX.
    """

    def __init__(
        self,
        model_id: str = DEFAULT_MODEL,
        device: str = "auto",
        input_size: int | None = None,
        batch_size: int = 32,
        revision: str | None = None,
        bf16: bool | None = None,
        backend: str = "torch",
        cache_dir: Path | None = None,
    ):
        self.model_id, self.revision = model_id, revision
        self.device = pick_device(device)
        model, processor, family = _load_pretrained(model_id, revision)
        config = model.config
        if (weights := sum(p.numel() for p in model.parameters())) > LARGE_PARAMETERS:
            log.warning("%s has %.1f billion weights: about %.0f GB of memory in float32 (%.0f GB in bfloat16 on a GPU).",
                        model_id, weights / 1e9, weights * 4 / 1e9, weights * 2 / 1e9)
        self.patch_size: int = int(config.patch_size)
        self.input_size: int = _check_input_size(int(input_size or _processor_size(processor) or config.image_size),
                                                 self.patch_size)
        self.dim: int = int(config.hidden_size)
        self.num_prefix_tokens = prefix_tokens(config)
        self.model_type = config.model_type
        self.batch_size = batch_size
        use_bf16 = self.device == "cuda" if bf16 is None else bf16
        self.dtype = torch.bfloat16 if use_bf16 else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        mean = torch.tensor(processor.get("image_mean", IMAGENET_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(processor.get("image_std", IMAGENET_STD), dtype=torch.float32).view(1, 3, 1, 1)
        self._mean, self._std = mean.to(self.device), std.to(self.device)
        self._mean_array, self._std_array = mean.numpy(), std.numpy()
        self._interpolate = dict(family.forward)  # e.g. DINO's interpolate_pos_encoding; rotary needs none
        self._lock = threading.Lock()  # one forward at a time; attend() switches the last layer's kernel
        self._last_layer = LastLayerKernel(self.model)
        self._backend_order = backend_order(backend, self.device) if self.dtype == torch.float32 else []
        self._onnx_dir = Path(cache_dir or DEFAULT_CACHE_DIR) / "onnx"
        self._onnx: OnnxModel | None = self._load_onnx(self._backend_order, self._onnx_dir)
        self._onnx_attention: OnnxModel | None = None  # made on the first attend(): most apps never need it
        self._attention_tried = False

    def _load_onnx(self, order: list[str], cache_dir: Path) -> OnnxModel | None:
        """The first ONNX backend of `order` that loads and passes its check; None: use torch."""
        for backend, fallback in zip(order, [*order[1:], "torch"]):
            try:
                return load_onnx_model(self.model, self.input_size, backend, cache_dir, self._interpolate)
            except BackendUnavailable as e:
                log.warning("%s; using %s instead.", e, fallback)
        return None

    @classmethod
    def for_index(cls, built: dict | None, model: str | None = None, input_size: int | None = None,
                  **options) -> "Embedder":
        """The backbone to search an index with: `model` if given, else the one the index was `built`
        with (its manifest's "model": id, revision, input size), else the default."""
        if model is not None or built is None:
            return cls(model or DEFAULT_MODEL, input_size=input_size, **options)
        try:
            return cls(built["id"], input_size=input_size or built["input_size"], revision=built.get("revision"),
                       **options)
        except UserError as e:
            raise type(e)(f"The index was built with {built['id']}, which cannot be loaded here ({e}) "
                          "Pass --model with a copy of it (a hub id or a local folder).") from None

    def at_input_size(self, input_size: int | None) -> "Embedder":
        """This backbone, its weights shared, fed `input_size` pixels a side (None or the same: itself). A larger
        input gives a finer patch grid: 448 has 4x the patches of 224. On a CPU the ONNX backend exports once
        more for the new size (and checks that export against torch, as at load)."""
        if input_size is None or int(input_size) == self.input_size:
            return self
        other = copy.copy(self)
        other.input_size = _check_input_size(int(input_size), self.patch_size)
        other._onnx = other._load_onnx(self._backend_order, self._onnx_dir)
        other._onnx_attention, other._attention_tried = None, False
        return other

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid: the input side over the patch side."""
        side = self.input_size // self.patch_size
        return side, side

    @property
    def backend(self) -> str:
        """What runs the network: the ONNX backend that loaded, else torch."""
        return self._onnx.backend if self._onnx else "torch"

    @property
    def patches_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    def describe(self) -> dict:
        """The facts an index records so it is only ever searched with a matching model."""
        return {
            "id": self.model_id, "revision": self.revision, "type": self.model_type,
            "input_size": self.input_size, "patch_size": self.patch_size,
            "dim": self.dim, "grid": list(self.grid),
        }

    def embed(self, images: list[Image.Image]) -> Features:
        """Features of RGB images of any size, computed `batch_size` at a time."""
        parts = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            arrays = np.stack([prepare_image(im, self.input_size) for im in chunk])
            parts.append(self.embed_prepared(arrays, [im.size for im in chunk]))
        if not parts:
            raise ValueError("embed() needs at least one image")
        return Features.joined(parts)

    @torch.inference_mode()
    def embed_prepared(self, pixels: np.ndarray, sizes: list[tuple[int, int]]) -> Features:
        """Features of a (n, S, S, 3) uint8 batch made by `prepare_image`; `sizes` are the originals."""
        with self._lock:
            if self._onnx is not None:
                hidden = self._onnx(self._to_array(pixels))
            else:
                hidden = self.model(pixel_values=self._to_input(pixels), **self._interpolate).last_hidden_state
        return self._features(hidden, sizes)

    def _features(self, hidden: torch.Tensor | np.ndarray, sizes: list[tuple[int, int]]) -> Features:
        """Features from (n, tokens, d) last hidden states: the CLS token, and the patches after the registers."""
        if isinstance(hidden, torch.Tensor):
            hidden = torch.nn.functional.normalize(hidden.float(), dim=-1).cpu().numpy()
        else:  # from ONNX Runtime: numpy throughout (see _to_array)
            hidden = hidden / np.maximum(np.linalg.norm(hidden, axis=-1, keepdims=True), 1e-12)
        return Features(cls=hidden[:, 0], patches=hidden[:, self.num_prefix_tokens:], grid=self.grid, sizes=list(sizes))

    def _to_input(self, pixels: np.ndarray) -> torch.Tensor:
        # Normalise on the device: workers ship compact uint8, the GPU does the float work.
        x = torch.from_numpy(np.require(pixels, np.uint8, ['C', 'W'])).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return ((x - self._mean) / self._std).to(self.dtype)

    def _to_array(self, pixels: np.ndarray) -> np.ndarray:
        """`_to_input` in numpy, for ONNX Runtime. The ONNX path never runs a torch op: torch's threads spin
        for a while after each op and took the cores ONNX Runtime needed (RESULTS.md, Query embedding)."""
        x = pixels.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 255.0)
        return np.ascontiguousarray((x - self._mean_array) / self._std_array)

    @torch.inference_mode()
    def attend(self, images: list[Image.Image]) -> Attended:
        """Features and the last layer's CLS attention of RGB images, from one forward pass per batch.

        The last layer runs eager attention (SDPA returns no weights; the other layers keep SDPA); on a CPU with
        an ONNX backend, through a second export of the same backend that also returns the attention row.
        """
        parts = [self._attend_batch(images[start : start + self.batch_size])
                 for start in range(0, len(images), self.batch_size)]
        if not parts:
            raise ValueError("attend() needs at least one image")
        return Attended.joined(parts)

    def _attend_batch(self, images: list[Image.Image]) -> Attended:
        pixels = np.stack([prepare_image(im, self.input_size) for im in images])
        with self._lock:
            onnx = self._attention_backend()
            if onnx is not None:
                hidden, rows = onnx.outputs(self._to_array(pixels))
            else:
                with self._last_layer.eager():
                    out = self.model(pixel_values=self._to_input(pixels), output_attentions=True, **self._interpolate)
                hidden, rows = out.last_hidden_state, out.attentions[-1][:, :, 0].float().cpu().numpy()  # (n, heads, tokens)
        features = self._features(hidden, [im.size for im in images])
        last = rows[:, :, self.num_prefix_tokens:].astype(np.float32)  # (n, heads, patches)
        return Attended(features, last.reshape(len(images), -1, *self.grid))

    def _attention_backend(self) -> OnnxModel | None:
        """The ONNX export that also returns attention, with the backend embed() uses, made once on first use;
        None on torch (or when it cannot be made: then torch, with one warning)."""
        if self._onnx is not None and not self._attention_tried:
            self._attention_tried = True
            try:
                with self._last_layer.eager():
                    self._onnx_attention = load_onnx_model(self.model, self.input_size, self._onnx.backend,
                                                           self._onnx_dir, self._interpolate, attention=True)
            except BackendUnavailable as e:
                log.warning("%s; attention maps use torch instead.", e)
        return self._onnx_attention

    def attention(self, image: Image.Image) -> np.ndarray:
        """(heads, gh, gw) float32: how much the last layer's CLS token attends to each patch."""
        return self.attend([image]).attention[0]


class LastLayerKernel:
    """Switches the attention kernel of the last transformer layer alone. Attention modules read the kernel from
    their `config`; the last layer's modules get a copy of it, so only they compute attention weights (eager)
    while the rest stay on SDPA. The same for every family (tests/test_backbones.py checks the maps)."""

    def __init__(self, model: torch.nn.Module):
        layers = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)
                  and len(m) == model.config.num_hidden_layers]
        if not layers:
            raise UserError(f"{type(model).__name__} has no list of {model.config.num_hidden_layers} layers to read "
                            "attention from; it is not a ViT this app knows.")
        self.config = copy.copy(model.config)
        for module in layers[0][-1].modules():
            if hasattr(module, "config"):
                module.config = self.config

    @contextmanager
    def eager(self) -> Iterator[None]:
        """The last layer on eager attention (which returns its weights) while inside."""
        self.config._attn_implementation = "eager"
        try:
            yield
        finally:
            self.config._attn_implementation = "sdpa"


def _check_input_size(input_size: int, patch_size: int) -> int:
    if input_size <= 0 or input_size % patch_size:
        raise UserError(f"Input size {input_size} is not a multiple of the patch size {patch_size}.")
    return input_size


def _processor_size(settings: dict) -> int | None:
    """The square side the processor would feed the model (its crop size when it crops)."""
    for name in ("crop_size", "size"):
        size = settings.get(name)
        if not size or (name == "crop_size" and not settings.get("do_center_crop", False)):
            continue
        side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
        if side:
            return int(side)
    return None
