"""Runs a small float TFLite model in PyTorch, its weights read from the .tflite file at run time.

Enough of TFLite for MediaPipe's BlazeFace detectors (convolutions, pads, pools, adds, resizes, fp16
and sparse weights), so they can run batched on a GPU; an operator it does not know is refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

_ACTIVATIONS = {0: lambda x: x, 1: lambda x: x.relu_(), 3: lambda x: x.clamp_(0, 6)}  # in place: fresh outputs  # TFLite's NONE, RELU, RELU6
_SAME, _VALID = 0, 1


@dataclass(frozen=True)
class Step:
    """One operator: its name, the tensors it reads and writes, and its options as plain values."""
    op: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: dict


class TFLiteNet(torch.nn.Module):
    """The model's graph as torch operations; 4-d activations are kept channels-first (N, C, H, W)."""

    def __init__(self, path: str | Path):
        super().__init__()
        import tflite  # the flatbuffer schema; only a reader, it runs nothing

        model = tflite.Model.GetRootAsModel(Path(path).read_bytes(), 0)
        graph = model.Subgraphs(0)
        self.shapes = {i: tuple(graph.Tensors(i).ShapeAsNumpy()) for i in range(graph.TensorsLength())}
        self.input = int(graph.InputsAsNumpy()[0])
        self.outputs = tuple(int(i) for i in graph.OutputsAsNumpy())
        constants = {i: a for i in range(graph.TensorsLength()) if (a := _constant(model, graph, i)) is not None}
        self.steps: list[Step] = []
        for i in range(graph.OperatorsLength()):
            step = _step(model, graph.Operators(i))
            if step.op in ("DEQUANTIZE", "DENSIFY") and step.inputs[0] in constants:
                constants[step.outputs[0]] = constants[step.inputs[0]].astype(np.float32)  # weights: once, at load
            else:
                self.steps.append(step)
        self.ints = {i: a.tolist() for i, a in constants.items() if a.dtype.kind == "i"}  # paddings, sizes
        self.steps = _fold_pads(self.steps, self.ints)
        for i, array in constants.items():
            if i not in self.ints:
                weight = torch.from_numpy(_torch_layout(array, self._role(i)))
                if weight.dim() == 4:  # the input arrives channels-last (NHWC); kernels that match run faster
                    weight = weight.contiguous(memory_format=torch.channels_last)
                self.register_buffer(f"t{i}", weight, persistent=False)

    def _role(self, tensor: int) -> str:
        """How a constant is used: depthwise and plain kernels change layout for torch, the rest stay."""
        for step in self.steps:
            if len(step.inputs) > 1 and step.inputs[1] == tensor and step.op in ("CONV_2D", "DEPTHWISE_CONV_2D"):
                return step.op
        return "other"

    def const(self, tensor: int):
        return self.ints[tensor] if tensor in self.ints else getattr(self, f"t{tensor}")

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """(N, H, W, 3) float input, as the model's own input is laid out -> the model's outputs."""
        values = {self.input: pixels.permute(0, 3, 1, 2)}
        for step in self.steps:
            args = [values[i] if i in values else self.const(i) for i in step.inputs]
            values[step.outputs[0]] = _OPS[step.op](self, step, *args)
        return [values[i] for i in self.outputs]


def _fold_pads(steps: list[Step], ints: dict[int, list]) -> list[Step]:
    """A zero PAD of height and width read only by a VALID convolution becomes that convolution's own
    padding: one pass over the activations instead of a padded copy (a third of the CPU time)."""
    readers: dict[int, list[int]] = {}
    for k, step in enumerate(steps):
        for i in step.inputs:
            readers.setdefault(i, []).append(k)
    steps = list(steps)
    for k, step in enumerate(steps):
        pads = ints.get(step.inputs[1]) if step.op == "PAD" else None
        users = readers.get(step.outputs[0], [])
        if (pads and pads[0] == pads[3] == [0, 0] and pads[1][0] == pads[1][1] and pads[2][0] == pads[2][1]
                and len(users) == 1 and steps[users[0]].op in ("CONV_2D", "DEPTHWISE_CONV_2D")
                and steps[users[0]].options["Padding"] == _VALID):
            conv = steps[users[0]]
            steps[users[0]] = Step(conv.op, conv.inputs, conv.outputs, {**conv.options, "Pad": (pads[1][0], pads[2][0])})
            steps[k] = Step("IDENTITY", step.inputs[:1], step.outputs, {})
    return steps


def _step(model, operator) -> Step:
    import tflite

    code = model.OperatorCodes(operator.OpcodeIndex())
    number = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())  # old files keep small codes in the latter
    op = next(k for k, v in vars(tflite.BuiltinOperator).items() if v == number and not k.startswith("_"))
    if op not in _OPS and op not in ("DEQUANTIZE", "DENSIFY"):
        raise NotImplementedError(f"TFLite operator {op} is not supported by dino_demo.tflite_torch")
    options = _options(op, operator.BuiltinOptions())
    inputs = tuple(int(i) for i in operator.InputsAsNumpy() if i >= 0)
    return Step(op, inputs, tuple(int(i) for i in operator.OutputsAsNumpy()), options)


def _options(op: str, table) -> dict:
    """The few option fields these operators use, read from the operator's options table."""
    import tflite

    kinds = {"CONV_2D": tflite.Conv2DOptions, "DEPTHWISE_CONV_2D": tflite.DepthwiseConv2DOptions,
             "MAX_POOL_2D": tflite.Pool2DOptions, "ADD": tflite.AddOptions,
             "CONCATENATION": tflite.ConcatenationOptions, "RESIZE_BILINEAR": tflite.ResizeBilinearOptions,
             "DEPTH_TO_SPACE": tflite.DepthToSpaceOptions}
    if op not in kinds or table is None:
        return {}
    options = kinds[op]()
    options.Init(table.Bytes, table.Pos)
    names = ("Padding", "StrideH", "StrideW", "DilationHFactor", "DilationWFactor", "FusedActivationFunction",
             "FilterHeight", "FilterWidth", "Axis", "AlignCorners", "HalfPixelCenters", "BlockSize")
    return {n: getattr(options, n)() for n in names if hasattr(options, n)}


def _constant(model, graph, index: int) -> np.ndarray | None:
    """A tensor's stored value (weights, biases, paddings), densified if sparse; None for activations."""
    tensor = graph.Tensors(index)
    data = model.Buffers(tensor.Buffer()).DataAsNumpy()
    if isinstance(data, int) or len(data) == 0:
        return None
    dtypes = {0: np.float32, 1: np.float16, 2: np.int32, 4: np.int64}  # TensorType FLOAT32, FLOAT16, INT32, INT64
    if tensor.Type() not in dtypes:
        raise NotImplementedError(f"TFLite tensor type {tensor.Type()} is not supported (quantised models are not)")
    values = np.frombuffer(data.tobytes(), dtypes[tensor.Type()])
    shape = tuple(tensor.ShapeAsNumpy())
    if tensor.Sparsity() is not None:
        return _densify(values, shape, tensor.Sparsity())
    return values.reshape(shape).copy()


def _densify(values: np.ndarray, shape: tuple[int, ...], sparsity) -> np.ndarray:
    """TFLite's sparse layout (dense and CSR dimensions in traversal order) -> the dense array."""
    if sparsity.BlockMapLength():
        raise NotImplementedError("block-sparse TFLite tensors are not supported")
    order = sparsity.TraversalOrderAsNumpy()
    positions, coords = np.zeros(1, np.int64), np.zeros((1, 0), np.int64)  # one path per stored value, so far
    for level in range(sparsity.DimMetadataLength()):
        meta = sparsity.DimMetadata(level)
        if meta.Format() == 0:  # dense: every index of this dimension under each path
            size = meta.DenseSize()
            index = np.tile(np.arange(size), len(positions))
            positions = np.repeat(positions, size) * size + index
            coords = np.column_stack([np.repeat(coords, size, axis=0), index])
        else:  # CSR: path p continues at stored positions segments[p] .. segments[p+1]
            segments = _index_vector(meta.ArraySegmentsType(), meta.ArraySegments())
            indices = _index_vector(meta.ArrayIndicesType(), meta.ArrayIndices())
            counts = segments[positions + 1] - segments[positions]
            starts = np.repeat(segments[positions] - np.cumsum(counts) + counts, counts)
            positions = starts + np.arange(counts.sum())
            coords = np.column_stack([np.repeat(coords, counts, axis=0), indices[positions]])
    dense = np.zeros(shape, values.dtype)
    dense[tuple(coords[:, np.argsort(order)].T)] = values[:len(coords)]
    return dense


def _index_vector(kind: int, table) -> np.ndarray:
    import tflite

    vector = {1: tflite.Int32Vector, 2: tflite.Uint16Vector, 3: tflite.Uint8Vector}[kind]()
    vector.Init(table.Bytes, table.Pos)
    return vector.ValuesAsNumpy().astype(np.int64)


def _torch_layout(array: np.ndarray, role: str) -> np.ndarray:
    """TFLite kernels are (out, kh, kw, in) and depthwise (1, kh, kw, channels); torch wants (out, in, kh, kw)."""
    if role == "CONV_2D":
        return np.ascontiguousarray(array.transpose(0, 3, 1, 2))
    if role == "DEPTHWISE_CONV_2D":
        return np.ascontiguousarray(array.transpose(3, 0, 1, 2))
    return array


def _same_padding(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0):
    """TFLite's SAME: the output is ceil(in / stride) and any odd padding pixel goes at the bottom/right."""
    pads = []
    for size, k, s in zip((x.shape[3], x.shape[2]), (kernel[1], kernel[0]), (stride[1], stride[0])):
        total = max((-(-size // s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


def _conv(net, step, x, weight, bias=None, groups: int = 1):
    o = step.options
    if o["Padding"] == _SAME:
        x = _same_padding(x, weight.shape[2:], (o["StrideH"], o["StrideW"]))
    y = F.conv2d(x, weight, bias, (o["StrideH"], o["StrideW"]), o.get("Pad", 0),
                 (o["DilationHFactor"], o["DilationWFactor"]), groups)
    return _ACTIVATIONS[o["FusedActivationFunction"]](y)


def _depthwise(net, step, x, weight, bias=None):
    return _conv(net, step, x, weight, bias, groups=x.shape[1])


def _max_pool(net, step, x):
    o = step.options
    kernel, stride = (o["FilterHeight"], o["FilterWidth"]), (o["StrideH"], o["StrideW"])
    if o["Padding"] == _SAME:
        x = _same_padding(x, kernel, stride, value=float("-inf"))  # padding never wins a max
    return _ACTIVATIONS[o["FusedActivationFunction"]](F.max_pool2d(x, kernel, stride))


def _pad(net, step, x, paddings):
    p = paddings  # NHWC order, [[before, after], ...]
    if x.dim() != 4 or p[0] != [0, 0]:
        raise NotImplementedError("PAD is supported on (N, H, W, C) tensors, not across the batch")
    return F.pad(x, [*p[2], *p[1], *p[3]])


def _reshape(net, step, x, *shape):
    if x.dim() == 4:
        x = x.permute(0, 2, 3, 1)  # TFLite reshapes in its own (N, H, W, C) order
    out = net.shapes[step.outputs[0]]
    y = x.reshape(x.shape[0], *out[1:])
    return y.permute(0, 3, 1, 2) if y.dim() == 4 else y


def _concat(net, step, *xs):
    axis = step.options["Axis"] % xs[0].dim()
    if xs[0].dim() == 4:
        axis = (0, 2, 3, 1)[axis]
    return _ACTIVATIONS[step.options["FusedActivationFunction"]](torch.cat(xs, axis))


def _resize_bilinear(net, step, x, size):
    if step.options["AlignCorners"] or not step.options["HalfPixelCenters"]:
        raise NotImplementedError("RESIZE_BILINEAR is supported with half-pixel centres only")
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _depth_to_space(net, step, x):
    b = step.options["BlockSize"]  # TFLite's channel order is (row in block, column in block, channel)
    n, c, h, w = x.shape
    x = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(n, c // (b * b), h * b, w * b)


def _add(net, step, a, b):
    return _ACTIVATIONS[step.options["FusedActivationFunction"]](a + b)


_OPS = {"CONV_2D": _conv, "DEPTHWISE_CONV_2D": _depthwise, "MAX_POOL_2D": _max_pool, "PAD": _pad,
        "RESHAPE": _reshape, "CONCATENATION": _concat, "RESIZE_BILINEAR": _resize_bilinear,
        "DEPTH_TO_SPACE": _depth_to_space, "ADD": _add, "RELU": lambda net, step, x: F.relu(x), "IDENTITY": lambda net, step, x: x}
