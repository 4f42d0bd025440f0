"""Import the AnimeGANv3 generator from its TFLite release, without TensorFlow.

The release is one ``.tflite`` flatbuffer (a fixed 1x512x512x3 input, weights stored as fp16
constants that ``DEQUANTIZE`` operators turn into float32). :func:`read_tflite` parses it
with the ``tflite`` package (generated flatbuffer accessors, no runtime) into plain tensors
and operators. :func:`convert_animeganv3` checks that the graph is AnimeGANv3's (operator
kinds, the resize and padding modes, the LeakyReLU slope) and maps the weight of every
``CONV_2D``, by its position in the graph and its TensorFlow scope name, onto
:class:`~ghibli_core.models.animegan.AnimeGANv3Generator`, loading strictly.

TFLite convolution weights are ``(out, kh, kw, in)``; ours are ``(out, in, kh, kw)``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .models import CheckpointError
from .models.animegan import LEAKY_SLOPE, AnimeGANv3Generator

TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier, bytes 4..8 of every .tflite file

# numpy dtypes of the tflite TensorType values constants may have here
_NUMPY_DTYPES = {"FLOAT32": "<f4", "FLOAT16": "<f2", "INT32": "<i4", "INT64": "<i8", "INT8": "i1", "UINT8": "u1"}

# Every operator kind of AnimeGANv3's graph; anything else means another network.
_KNOWN_OPS = frozenset({
    "ADD", "CONV_2D", "DEQUANTIZE", "DIV", "LEAKY_RELU", "MEAN", "MIRROR_PAD", "MUL", "RESHAPE",
    "RESIZE_BILINEAR", "RSQRT", "SOFTMAX", "SQRT", "SQUARED_DIFFERENCE", "SUB", "SUM", "TANH", "TRANSPOSE",
})

# LADE's epsilon when the file's constant is 0 (see AnimeGANv3Generator's ``eps``).
FALLBACK_EPS = 1e-8


@dataclass(frozen=True)
class TFLiteTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # tflite TensorType name: "FLOAT32", "FLOAT16", "INT32", ...
    data: np.ndarray | None  # the constant's value (in ``shape``), None for activations


@dataclass(frozen=True)
class TFLiteOp:
    kind: str  # tflite BuiltinOperator name: "CONV_2D", "MIRROR_PAD", ...
    inputs: tuple[int, ...]  # tensor indices (-1: optional input left out)
    outputs: tuple[int, ...]
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TFLiteGraph:
    """The first subgraph of a TFLite model: tensors, operators in execution order, graph I/O."""

    tensors: list[TFLiteTensor]
    ops: list[TFLiteOp]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    def producer(self, tensor: int) -> TFLiteOp | None:
        return next((op for op in self.ops if tensor in op.outputs), None)

    def source_name(self, tensor: int) -> str:
        """The tensor's name, or that of the stored constant a ``DEQUANTIZE`` made it from."""
        op = self.producer(tensor)
        if op is not None and op.kind == "DEQUANTIZE":
            tensor = op.inputs[0]
        return self.tensors[tensor].name

    def constant(self, tensor: int) -> np.ndarray | None:
        """The float32 value of a constant tensor, looking through a ``DEQUANTIZE`` of an fp16
        constant; None when the tensor is computed from the input."""
        t = self.tensors[tensor]
        if t.data is not None:
            return t.data.astype(np.float32) if t.dtype in ("FLOAT32", "FLOAT16") else t.data
        op = self.producer(tensor)
        if op is not None and op.kind == "DEQUANTIZE":
            source = self.tensors[op.inputs[0]]
            if source.data is None or source.dtype != "FLOAT16":
                raise CheckpointError(
                    f"tensor {source.name!r} is dequantized from {source.dtype}: only fp16 weights are supported "
                    "(integer-quantized AnimeGANv3 files are not)"
                )
            return source.data.astype(np.float32)
        return None


def _enum_names(enum_class) -> dict[int, str]:
    return {v: k for k, v in vars(enum_class).items() if not k.startswith("_") and isinstance(v, int)}


def _options(tfl, op, kind: str) -> dict:
    """The builtin options of the operators AnimeGANv3 uses, as a plain dict."""
    table = op.BuiltinOptions()
    if table is None:
        return {}
    readers = {
        "CONV_2D": (tfl.Conv2DOptions, lambda o: {
            "stride": (o.StrideH(), o.StrideW()), "padding": _enum_names(tfl.Padding)[o.Padding()],
            "activation": _enum_names(tfl.ActivationFunctionType)[o.FusedActivationFunction()],
            "dilation": (o.DilationHFactor(), o.DilationWFactor())}),
        "RESIZE_BILINEAR": (tfl.ResizeBilinearOptions, lambda o: {
            "align_corners": bool(o.AlignCorners()), "half_pixel_centers": bool(o.HalfPixelCenters())}),
        "MIRROR_PAD": (tfl.MirrorPadOptions, lambda o: {"mode": _enum_names(tfl.MirrorPadMode)[o.Mode()]}),
        "LEAKY_RELU": (tfl.LeakyReluOptions, lambda o: {"alpha": o.Alpha()}),
        "SOFTMAX": (tfl.SoftmaxOptions, lambda o: {"beta": o.Beta()}),
        "MEAN": (tfl.ReducerOptions, lambda o: {"keep_dims": bool(o.KeepDims())}),
        "SUM": (tfl.ReducerOptions, lambda o: {"keep_dims": bool(o.KeepDims())}),
    }
    if kind not in readers:
        return {}
    cls, read = readers[kind]
    options = cls()
    options.Init(table.Bytes, table.Pos)
    return read(options)


def read_tflite(path: str | Path) -> TFLiteGraph:
    """Parse a ``.tflite`` file into a :class:`TFLiteGraph` (the ``tflite`` package; no TensorFlow)."""
    import tflite as tfl

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TFLite file {path} does not exist")
    raw = path.read_bytes()
    if len(raw) < 8 or raw[4:8] != TFLITE_IDENTIFIER:
        raise CheckpointError(
            f"{path} is not a TFLite model: it lacks the flatbuffer identifier {TFLITE_IDENTIFIER.decode()!r} "
            "at bytes 4-8"
        )
    op_names = _enum_names(tfl.BuiltinOperator)
    type_names = _enum_names(tfl.TensorType)
    try:
        model = tfl.Model.GetRootAsModel(raw, 0)
        if model.SubgraphsLength() != 1:
            raise CheckpointError(f"{path}: expected one subgraph (AnimeGANv3's), found {model.SubgraphsLength()}")
        graph = model.Subgraphs(0)
        tensors = []
        for i in range(graph.TensorsLength()):
            t = graph.Tensors(i)
            shape = tuple(int(s) for s in t.ShapeAsNumpy()) if t.ShapeLength() else ()
            dtype = type_names.get(t.Type(), str(t.Type()))
            buffer = model.Buffers(t.Buffer())
            data = None
            if buffer.DataLength():
                blob = buffer.DataAsNumpy().tobytes()
            elif buffer.Offset() > 1:  # models over 2 GB keep buffers after the flatbuffer
                blob = raw[buffer.Offset(): buffer.Offset() + buffer.Size()]
            else:
                blob = None
            if blob is not None:
                if dtype not in _NUMPY_DTYPES:
                    raise CheckpointError(f"{path}: constant {t.Name().decode()!r} has unsupported type {dtype}")
                data = np.frombuffer(blob, dtype=_NUMPY_DTYPES[dtype]).reshape(shape)
            tensors.append(TFLiteTensor(t.Name().decode(), shape, dtype, data))
        ops = []
        for k in range(graph.OperatorsLength()):
            op = graph.Operators(k)
            code = model.OperatorCodes(op.OpcodeIndex())
            # schema v3a: builtin codes above 127 live in BuiltinCode, older ones in the deprecated byte
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            kind = op_names.get(builtin, f"#{builtin}")
            if kind == "CUSTOM":
                kind = f"CUSTOM:{code.CustomCode().decode() if code.CustomCode() else '?'}"
            ops.append(TFLiteOp(
                kind,
                tuple(int(i) for i in op.InputsAsNumpy()) if op.InputsLength() else (),
                tuple(int(i) for i in op.OutputsAsNumpy()) if op.OutputsLength() else (),
                _options(tfl, op, kind),
            ))
        inputs = tuple(int(i) for i in graph.InputsAsNumpy()) if graph.InputsLength() else ()
        outputs = tuple(int(i) for i in graph.OutputsAsNumpy()) if graph.OutputsLength() else ()
    except CheckpointError:
        raise
    except Exception as exc:  # flatbuffers raise IndexError, struct.error, ... on damaged files
        raise CheckpointError(f"{path} is not a readable TFLite model: {type(exc).__name__}: {exc}") from exc
    return TFLiteGraph(tensors, ops, inputs, outputs)


# -- mapping ------------------------------------------------------------------------------------
def _scope(index: int) -> str:
    """TensorFlow's layer names: ``Conv``, ``Conv_1``, ``Conv_2``, ..."""
    return "Conv" if index == 0 else f"Conv_{index}"


MEMORY_T = "attention.memory.T"  # the value memory: the key memory transposed, not a tensor of ours


def layer_table() -> list[tuple[str, str]]:
    """``(our weight, TensorFlow scope of its convolution)`` for every ``CONV_2D``, in graph order.

    The encoder is ``generator/base``, attention and decoder ``generator/main``; each LADE's
    1x1 convolution is the layer right after the convolution it normalises.
    """
    table = [("stem.1.weight", "base/Conv"), ("stem.2.conv.weight", "base/Conv_1")]
    n = 2
    for stage in range(3):
        for j in range(2):
            block = f"down.{stage}.{j}"
            table += [(f"{block}.1.weight", f"base/{_scope(n)}"), (f"{block}.2.conv.weight", f"base/{_scope(n + 1)}")]
            n += 2
    ea = "main/External_attention"
    table += [
        ("attention.proj_in.weight", f"{ea}/Conv"), ("attention.memory", f"{ea}/conv1d"),
        (MEMORY_T, f"{ea}/conv1d_1"), ("attention.proj_out.weight", f"{ea}/Conv_1"),
    ]
    n = 0
    for stage in range(3):
        for block in (f"up.{stage}.1", f"merge.{stage}"):
            table += [(f"{block}.1.weight", f"main/{_scope(n)}"), (f"{block}.2.conv.weight", f"main/{_scope(n + 1)}")]
            n += 2
    table.append(("head.1.weight", f"main/{_scope(n)}"))
    return table


def _strip_generator(name: str) -> str:
    return re.sub(r"^generator(_\d+)?/", "", name)


def _check_graph(graph: TFLiteGraph) -> tuple[int, int]:
    """Structural checks that tell AnimeGANv3 from other graphs; returns the input's (H, W)."""
    unknown = sorted({op.kind for op in graph.ops} - _KNOWN_OPS)
    if unknown:
        raise CheckpointError(f"not an AnimeGANv3 generator: operators {', '.join(unknown)} do not occur in it")
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise CheckpointError(
            f"not an AnimeGANv3 generator: it has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs, "
            "expected 1 and 1"
        )
    shape = graph.tensors[graph.inputs[0]].shape
    if len(shape) != 4 or shape[3] != 3 or graph.tensors[graph.outputs[0]].shape != shape:
        raise CheckpointError(
            f"not an AnimeGANv3 generator: input shape {shape} and output shape "
            f"{graph.tensors[graph.outputs[0]].shape}, expected one (N, H, W, 3) shape for both"
        )
    if shape[1] % 8 or shape[2] % 8:
        raise CheckpointError(f"not an AnimeGANv3 generator: input size {shape[1]}x{shape[2]} is not a multiple of 8")
    if not graph.ops or graph.ops[-1].kind != "TANH" or graph.ops[-1].outputs != graph.outputs:
        raise CheckpointError("not an AnimeGANv3 generator: the output does not come from a final tanh")
    resizes = [op for op in graph.ops if op.kind == "RESIZE_BILINEAR"]
    if len(resizes) != 3:
        raise CheckpointError(f"not an AnimeGANv3 generator: {len(resizes)} bilinear resizes, expected 3")
    for op in resizes:
        if op.options.get("align_corners") or op.options.get("half_pixel_centers"):
            raise CheckpointError(
                f"bilinear resize {graph.tensors[op.outputs[0]].name!r} uses {op.options}: this module implements "
                "TF1's legacy sampling only (align_corners=False, half_pixel_centers=False)"
            )
    for op in graph.ops:
        if op.kind == "MIRROR_PAD" and op.options.get("mode") != "REFLECT":
            raise CheckpointError(
                f"mirror pad {graph.tensors[op.outputs[0]].name!r} is {op.options.get('mode')}, expected REFLECT"
            )
        if op.kind == "LEAKY_RELU" and abs(op.options.get("alpha", 0.0) - LEAKY_SLOPE) > 1e-6:
            raise CheckpointError(f"LeakyReLU slope {op.options.get('alpha')}, expected {LEAKY_SLOPE}")
    softmaxes = [op for op in graph.ops if op.kind == "SOFTMAX"]
    if len(softmaxes) != 1 or softmaxes[0].options.get("beta", 1.0) != 1.0:
        raise CheckpointError(f"not an AnimeGANv3 generator: expected one softmax (beta 1), found {len(softmaxes)}")
    return shape[1], shape[2]


def _lade_eps(graph: TFLiteGraph) -> float:
    """The scalar LADE adds to every variance (``ADD(MEAN(SQUARED_DIFFERENCE), eps)``)."""
    values = set()
    for op in graph.ops:
        if op.kind != "ADD" or len(op.inputs) != 2:
            continue
        for a, b in (op.inputs, op.inputs[::-1]):
            producer = graph.producer(a)
            value = graph.constant(b)
            if producer is not None and producer.kind == "MEAN" and value is not None and value.size == 1:
                source = graph.producer(producer.inputs[0])
                if source is not None and source.kind == "SQUARED_DIFFERENCE":
                    values.add(float(value.reshape(())))
    if len(values) != 1:
        raise CheckpointError(
            f"not an AnimeGANv3 generator: expected one epsilon added to the LADE variances, found {sorted(values)}"
        )
    return values.pop()


def _attention_eps(graph: TFLiteGraph) -> float | str:
    """The scalar the attention adds to its sum over memory slots (``ADD(SUM, eps)``)."""
    for op in graph.ops:
        if op.kind == "ADD" and len(op.inputs) == 2:
            for a, b in (op.inputs, op.inputs[::-1]):
                producer, value = graph.producer(a), graph.constant(b)
                if producer is not None and producer.kind == "SUM" and value is not None and value.size == 1:
                    return float(value.reshape(()))
    return "nothing"


def convert_animeganv3(graph: TFLiteGraph) -> tuple[AnimeGANv3Generator, dict]:
    """Build the :class:`AnimeGANv3Generator` holding ``graph``'s weights (strict: every convolution used)."""
    height, width_px = _check_graph(graph)
    convs = [op for op in graph.ops if op.kind == "CONV_2D"]
    table = layer_table()
    if len(convs) != len(table):
        raise CheckpointError(f"not an AnimeGANv3 generator: {len(convs)} convolutions, AnimeGANv3 has {len(table)}")

    # 1. read every convolution's weight, checking its scope name and attributes
    weights: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
    for (ours, scope), op in zip(table, convs):
        name = _strip_generator(graph.source_name(op.inputs[1]))
        if name != scope and not name.startswith(scope + "/"):
            raise CheckpointError(
                f"convolution {len(weights) + 1} of the graph has weight {name!r}, expected AnimeGANv3's {scope!r}"
            )
        w = graph.constant(op.inputs[1])
        if w is None or w.ndim != 4:
            raise CheckpointError(f"weight {name!r} is not a constant (out, kh, kw, in) tensor")
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            bias = graph.constant(op.inputs[2])
            if bias is None or np.any(bias != 0):
                raise CheckpointError(f"convolution {scope!r} has a non-zero bias: AnimeGANv3's convolutions have none")
        opts = op.options
        if opts.get("padding") != "VALID" or opts.get("activation") != "NONE" or opts.get("dilation") != (1, 1):
            raise CheckpointError(
                f"convolution {scope!r} has options {opts}: expected VALID padding, no activation, no dilation"
            )
        weights[ours] = (w, opts["stride"])

    # 2. the configuration, then every tensor in our layout, shapes checked
    width = int(weights["stem.1.weight"][0].shape[0])
    slots = int(weights["attention.memory"][0].shape[0])
    file_eps = _lade_eps(graph)
    eps = file_eps if file_eps > 0 else FALLBACK_EPS
    model = AnimeGANv3Generator(width=width, slots=slots, eps=eps)
    own = model.state_dict()
    modules = dict(model.named_modules())
    state: dict[str, Tensor] = {}
    for ours, (w, stride) in weights.items():
        if ours in ("attention.memory", MEMORY_T):
            if w.shape[1:3] != (1, 1) or tuple(stride) != (1, 1):
                raise CheckpointError(f"attention memory {ours!r} should be a 1x1 stride-1 convolution, got {w.shape}")
            continue
        value = torch.from_numpy(np.ascontiguousarray(w.transpose(0, 3, 1, 2)))
        if tuple(value.shape) != tuple(own[ours].shape):
            raise CheckpointError(
                f"{ours}: the file's tensor has shape {tuple(value.shape)} in our layout, the network expects "
                f"{tuple(own[ours].shape)}"
            )
        expected_stride = modules[ours.removesuffix(".weight")].stride
        if tuple(stride) != tuple(expected_stride):
            raise CheckpointError(
                f"{ours}: the file's convolution has stride {stride}, AnimeGANv3's has {expected_stride}"
            )
        state[ours] = value
    # the key memory conv1d is (slots, 1, 1, C); the value memory conv1d_1 must be its transpose
    key_memory = torch.from_numpy(np.ascontiguousarray(weights["attention.memory"][0][:, 0, 0, :]))
    value_memory = torch.from_numpy(np.ascontiguousarray(weights[MEMORY_T][0][:, 0, 0, :]))
    if key_memory.shape != own["attention.memory"].shape:
        raise CheckpointError(
            f"attention.memory: the file's key memory has shape {tuple(key_memory.shape)}, the network expects "
            f"{tuple(own['attention.memory'].shape)}"
        )
    if value_memory.shape != key_memory.t().shape or not torch.equal(value_memory, key_memory.t()):
        raise CheckpointError(
            "the attention's value memory (conv1d_1) is not the transpose of its key memory (conv1d): "
            "this module ties them"
        )
    state["attention.memory"] = key_memory
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(f"tensors of the network not found in the file: {', '.join(missing[:5])}")
    model.load_state_dict(state, strict=True)
    model.eval()
    fp16 = sum(graph.tensors[op.inputs[1]].data is None for op in convs)  # the others are float32 constants
    notes = [
        "weights stored as fp16 in the file (DEQUANTIZE), widened exactly to float32" if fp16 == len(convs)
        else f"{fp16} of {len(convs)} convolution weights stored as fp16 in the file, the others as float32",
        f"the file's fixed {height}x{width_px} input is not part of the network: any size with sides that are "
        "multiples of 8 runs",
        "the attention's key and value memories are one matrix in the file (conv1d_1 = conv1d transposed): stored once",
        "the attention's renormalisation over memory slots is computed as a softmax, which needs no epsilon "
        f"(the file adds {_attention_eps(graph)} to the sum it divides by)",
    ]
    if file_eps <= 0:
        notes.append(
            f"the file's LADE epsilon is {file_eps} (stored as fp16), with which a flat image gives NaN: "
            f"eps={FALLBACK_EPS:g} keeps it finite"
        )
    report = {
        "arch": "animeganv3",
        "model_type": model.model_type,
        "config": {"width": width, "slots": slots, "eps": eps},
        "notes": notes,
    }
    return model, report


ANIMEGANV3_CARD = """---
library_name: ghibli-studio
tags:
- ghibli-studio
- image-to-image
- animeganv3
- converted
---

# AnimeGANv3 Hayao generator (converted)

The generator of AnimeGANv3 (Liu et al., "A Novel Double-Tail Generative Adversarial Network
for Fast Photo Animation"), converted from its TFLite release with
`python -m ghibli_core convert` (read without TensorFlow, every convolution mapped by name and
position, loaded strictly).

- Source file: `{source}`
- Source sha256: `{digest}`
- Architecture: `animeganv3`, width {width}, {slots} attention memory slots, LADE eps {eps:g},
  {params:,} parameters
- Input and output: RGB `(N, 3, H, W)` in [-1, 1], H and W multiples of 8 (the file's fixed
  512x512 input is not part of the network)
- Saved weights: {saved} safetensors

## Conversion notes

{notes}
## Terms

The AnimeGANv3 authors' terms allow non-commercial use only (academic research, teaching,
publications). In this project the network is a side-by-side anchor (`evaluate`, benchmarks)
and a fixture of the converter's tests only: never a teacher of weights that ship, never part of
a product, never redistributed (this folder stays outside the repository and off the Hub).
"""


def save_animeganv3(
    source: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = False
) -> tuple[Path, dict]:
    """Convert the AnimeGANv3 ``.tflite`` file ``source`` into a model folder ``out_dir``; returns it and the report."""
    from .convert import check_output_folder, sha256_file

    out = check_output_folder(out_dir, overwrite=overwrite)
    model, report = convert_animeganv3(read_tflite(source))
    model.save_pretrained(out, dtype=dtype)
    card = ANIMEGANV3_CARD.format(
        source=Path(source).name, digest=sha256_file(source),
        params=sum(p.numel() for p in model.parameters()),
        saved=str(dtype).removeprefix("torch.") if dtype is not None else "float32",
        notes="".join(f"- {n}\n" for n in report["notes"]), **report["config"],
    )
    (out / "README.md").write_text(card)
    return out, report
