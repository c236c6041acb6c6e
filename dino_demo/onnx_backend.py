"""Faster query embedding on a CPU: the backbone exported to ONNX Runtime, optionally with int8 weights.

Why: on a CPU box (a free Space) eager PyTorch spends most of one query's time in the Linear layers,
and ONNX Runtime with dynamically quantised int8 MatMuls is markedly faster (measured in
benchmarks/RESULTS.md, "Query embedding"). The export is cached on disk, keyed by the weights, the input
size and the library versions, so it is made once. Each export is checked against the torch float32
features when it is made and refused below `MIN_COSINE`: int8 error depends on the trained weights'
activation ranges, which a test's random weights do not have, so the check runs on the real model.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import atomic
from .config import BACKENDS
from .errors import UserError, first_line
from .quiet import silenced_output

MIN_COSINE = 0.99  # features must stay this close to torch float32, per token, or the export is refused
_FORMAT = 1  # bump when the exported graph changes, so old cache entries are not reused
_OPSET = 18  # the first with an antialiased Resize


class BackendUnavailable(Exception):
    """An ONNX backend cannot be used here; the message says why (the Embedder then falls back)."""


@dataclass
class OnnxModel:
    """An ONNX Runtime session that maps normalised pixels to the backbone's last hidden state."""

    session: object  # onnxruntime.InferenceSession
    backend: str  # "onnx" or "onnx-int8"
    path: Path
    cosine: float  # worst per-token cosine to torch float32 on the check inputs

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 normalised pixels -> (n, tokens, d) float32 hidden states."""
        return self.outputs(pixel_values)[0]

    def outputs(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        """Every output: the hidden states and, for an export made with attention, (n, heads, tokens) float32,
        the last layer's attention of the CLS token."""
        return self.session.run(None, {"pixel_values": np.ascontiguousarray(pixel_values, np.float32)})


def backend_order(backend: str, device: str) -> list[str]:
    """The ONNX backends to try, best first; torch is always the fallback after them."""
    if backend not in BACKENDS:
        raise UserError(f"Unknown backend '{backend}': use one of {', '.join(BACKENDS)}.")
    if backend == "torch" or (backend == "auto" and device != "cpu"):
        return []  # on a GPU the torch path (bf16) is the fast one
    if device != "cpu":
        raise UserError(f"The {backend} backend runs on the CPU: pass --device cpu, or --backend auto.")
    return ["onnx"] if backend == "onnx" else ["onnx-int8", "onnx"]


def load_onnx_model(model: torch.nn.Module, input_size: int, backend: str, cache_dir: Path,
                    extra_kwargs: dict, threads: int | None = None, min_cosine: float = MIN_COSINE,
                    attention: bool = False) -> OnnxModel:
    """The cached export of `model` for `backend`, made (and checked) first if it is not there yet; with
    `attention`, one that also returns the last layer's CLS attention (the model's last layer must then
    compute attention weights: eager).

    Raises BackendUnavailable when onnxruntime is missing, the export fails or the check refuses it.
    """
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed (pip install -r requirements.txt)") from None
    checks = _check_inputs(input_size)
    key = _cache_key(model, input_size, onnxruntime.__version__)
    path = Path(cache_dir).expanduser() / f"{key}.{backend}{'.attention' if attention else ''}.onnx"
    verdict_path = path.with_suffix(".json")
    try:
        if not (path.exists() and verdict_path.exists()):
            _export(model, input_size, backend, path, extra_kwargs, attention)
            session = _session(onnxruntime, path, threads)
            cosine = _worst_cosine(model, session, checks, extra_kwargs, attention)
            atomic.write_bytes(verdict_path, json.dumps({"backend": backend, "cosine": cosine}).encode())
        else:
            session = _session(onnxruntime, path, threads)
            cosine = json.loads(verdict_path.read_text())["cosine"]
    except Exception as e:  # a failed export must cost speed, never the app
        raise BackendUnavailable(f"{backend} export failed ({type(e).__name__}: {first_line(e, 200)})") from None
    if cosine < min_cosine:
        raise BackendUnavailable(f"{backend} features are too far from float32 (cosine {cosine:.4f} < {min_cosine})")
    return OnnxModel(session, backend, path, cosine)


class _HiddenStates(torch.nn.Module):
    """The backbone with one tensor in and one out, which is what the exporter traces."""

    def __init__(self, model: torch.nn.Module, extra_kwargs: dict, attention: bool = False):
        super().__init__()
        self.model, self.extra_kwargs, self.attention = model, extra_kwargs, attention

    def forward(self, pixel_values: torch.Tensor):
        if not self.attention:
            return self.model(pixel_values=pixel_values, **self.extra_kwargs).last_hidden_state
        out = self.model(pixel_values=pixel_values, output_attentions=True, **self.extra_kwargs)
        return out.last_hidden_state, out.attentions[-1][:, :, 0]


def _resize_bicubic_antialiased(g, x, output_size, align_corners, scales_h=None, scales_w=None):
    """ONNX (opset 18) for torch's antialiased bicubic resize, which DINOv2-with-registers uses on its
    position embeddings and the TorchScript exporter lacks; a=-0.5 with excluded outside pixels is
    exactly torch's kernel (checked to 1e-5 up and down)."""
    from torch.onnx import symbolic_helper

    size = symbolic_helper._maybe_get_const(output_size, "is")
    if not symbolic_helper._is_value(size):
        size = g.op("Constant", value_t=torch.tensor(size))
    batch_and_channels = g.op("Slice", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([0])),
                              g.op("Constant", value_t=torch.tensor([2])))
    sizes = g.op("Concat", batch_and_channels, g.op("Cast", size, to_i=7), axis_i=0)  # 7: int64
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    corners = symbolic_helper._maybe_get_const(align_corners, "b")
    return g.op("Resize", x, empty, empty, sizes, mode_s="cubic", cubic_coeff_a_f=-0.5, antialias_i=1,
                exclude_outside_i=1, coordinate_transformation_mode_s="align_corners" if corners else "half_pixel")


def _export(model: torch.nn.Module, input_size: int, backend: str, path: Path, extra_kwargs: dict,
            attention: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.register_custom_op_symbolic("aten::_upsample_bicubic2d_aa", _resize_bicubic_antialiased, _OPSET)
    example = torch.zeros(1, 3, input_size, input_size)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        # On a failed export torch's C++ logger prints the whole traced graph to fd 2 (and leaves its log
        # switched on), which would bury the one-line warning we give.
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), silenced_output():
                warnings.simplefilter("ignore")  # tracer warnings about Python branches on fixed shapes
                # The TorchScript exporter needs no extra packages and traces HF ViT / DINOv2 as they are.
                outputs = ["hidden", "attention"] if attention else ["hidden"]
                torch.onnx.export(_HiddenStates(model, extra_kwargs, attention).eval(), (example,), str(fp32),
                                  dynamo=False, input_names=["pixel_values"], output_names=outputs,
                                  opset_version=_OPSET,
                                  dynamic_axes={name: {0: "n"} for name in ["pixel_values", *outputs]})
        finally:
            torch._C._jit_set_onnx_log_enabled(False)
        made = fp32
        if backend == "onnx-int8":
            made = Path(tmp) / "int8.onnx"
            _quantize(fp32, made)
        atomic.write_with(path, lambda tmp: os.replace(made, tmp))


def _quantize(src: Path, dst: Path) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Weights int8 per tensor (per channel measured slower and no closer here), activations quantised
    # at run time; only MatMuls with constant weights, so attention's softmax products stay float32.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # it logs a "pre-process first" hint that does not apply
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False,
                         op_types_to_quantize=["MatMul"])
    finally:
        root.setLevel(level)


def _session(onnxruntime, path: Path, threads: int | None):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()  # as many as torch uses: one per core
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Idle threads sleep instead of spinning: a spinning thread holds a core the face gate, Gradio, an
    # upload being prepared or a client on the same machine needs (benchmarks/RESULTS.md, "Uploads
    # prepared early"); a query's own run is ~4 ms slower for it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_inputs(input_size: int) -> np.ndarray:
    """(2, 3, S, S) float32: smooth, photo-like random pixels, normalised roughly as a processor would."""
    rng = np.random.default_rng(0)
    small = torch.from_numpy(rng.random((2, 3, 8, 8), dtype=np.float32))
    pixels = torch.nn.functional.interpolate(small, size=(input_size, input_size), mode="bicubic")
    return ((pixels - 0.45) / 0.225).numpy()


def _worst_cosine(model: torch.nn.Module, session, pixels: np.ndarray, extra_kwargs: dict,
                  attention: bool = False) -> float:
    """The lowest cosine to torch float32 over every token's features (and every head's CLS attention row)."""
    with torch.inference_mode():
        out = model(pixel_values=torch.from_numpy(pixels), output_attentions=attention, **extra_kwargs)
    expected = [out.last_hidden_state.float().numpy()]
    if attention:
        expected.append(out.attentions[-1][:, :, 0].float().numpy())
    got = session.run(None, {"pixel_values": pixels})
    return min(_cosines(e, g) for e, g in zip(expected, got))


def _cosines(expected: np.ndarray, got: np.ndarray) -> float:
    dot = np.sum(expected * got, axis=-1)
    return float(np.min(dot / (np.linalg.norm(expected, axis=-1) * np.linalg.norm(got, axis=-1) + 1e-12)))


def _cache_key(model: torch.nn.Module, input_size: int, ort_version: str) -> str:
    """A digest of the weights and everything else the exported file depends on."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{_FORMAT}|{type(model).__name__}|{input_size}|{torch.__version__}|{ort_version}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return f"{type(model).__name__.lower()}-{input_size}-{digest.hexdigest()}"
