"""AnimeGANv3 import (ghibli_core.convert_animegan, ghibli_core.models.animegan).

Always on: the module's pieces against the formulas of the TFLite graph, synthetic TFLite files
written here with the flatbuffer builder (an AnimeGANv3-shaped graph of a tiny random network,
run by a small interpreter of its operators, and broken variants of it), the stylizer's
rewrites and tiling, a save -> load round trip. With ../shared: the real release against the
TFLite runtime's output.
"""
from __future__ import annotations

import math
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
import tflite
import torch
import torch.nn.functional as F
from PIL import Image

import ghibli_core.hub
from ghibli_core.cli import main
from ghibli_core.convert_animegan import TFLiteGraph, convert_animeganv3, read_tflite, save_animeganv3
from ghibli_core.imaging import to_tensor
from ghibli_core.models import AnimeGANv3Generator, CheckpointError, load_model, shared_statistics
from ghibli_core.models.animegan import LADE, ExternalAttention, LegacyUpsample2x
from ghibli_core.stylize import Stylizer, _pad_reflect

ANIMEGAN = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "animeganv3_hayao"
RELEASE = ANIMEGAN / "AnimeGANv3_Hayao_36_QUANTIZED_fp16.tflite"


def seeded_generator(seed: int = 0, **kwargs) -> AnimeGANv3Generator:
    """A random generator whose weights are exactly representable in fp16 (like the release's)."""
    torch.manual_seed(seed)
    model = AnimeGANv3Generator(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, h, w) in [-1, 1]: low-frequency waves plus some noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    ph = torch.rand(3, 2, generator=g) * 2 * math.pi
    img = torch.stack([0.7 * torch.sin(7 * xx + ph[c, 0]) * torch.cos(5 * yy + ph[c, 1]) for c in range(3)])
    return (img[None] + 0.1 * torch.randn(1, 3, h, w, generator=g)).clamp(-1, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(4.0 / torch.mean((a.float() - b.float()) ** 2).item())


# -- the pieces against the graph's formulas ------------------------------------------------------
def tf1_resize_bilinear(x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False, half_pixel_centers=False)`` of NHWC ``x``."""
    _, h, w, _ = x.shape
    ys = torch.arange(oh, dtype=torch.float64) * (h / oh)
    xs = torch.arange(ow, dtype=torch.float64) * (w / ow)
    y0, x0 = ys.floor().long(), xs.floor().long()
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    ly, lx = (ys - y0).float()[None, :, None, None], (xs - x0).float()[None, None, :, None]
    top = x[:, y0][:, :, x0] * (1 - lx) + x[:, y0][:, :, x1] * lx
    bottom = x[:, y1][:, :, x0] * (1 - lx) + x[:, y1][:, :, x1] * lx
    return top * (1 - ly) + bottom * ly


def test_legacy_upsample_is_tf1_bilinear_not_torch_bilinear():
    x = torch.randn(2, 3, 5, 7)
    ours = LegacyUpsample2x()(x)
    tf1 = tf1_resize_bilinear(x.permute(0, 2, 3, 1), 10, 14).permute(0, 3, 1, 2)
    torch.testing.assert_close(ours, tf1, rtol=0, atol=1e-6)
    assert torch.equal(ours[:, :, ::2, ::2], x)  # even outputs copy the input pixels
    torch_half_pixel = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert (torch_half_pixel - tf1).abs().max() > 0.1


def test_lade_is_instance_norm_with_the_moments_of_a_1x1_convolution():
    torch.manual_seed(0)
    lade = LADE(6, eps=1e-5)
    x = torch.randn(2, 6, 9, 11) * 3 + 1
    t = torch.einsum("oc,nchw->nohw", lade.conv.weight[:, :, 0, 0], x)
    mean_x, var_x = x.mean((2, 3), keepdim=True), x.var((2, 3), keepdim=True, unbiased=False)
    mean_t, var_t = t.mean((2, 3), keepdim=True), t.var((2, 3), keepdim=True, unbiased=False)
    expected = (x - mean_x) / torch.sqrt(var_x + 1e-5) * torch.sqrt(var_t + 1e-5) + mean_t
    torch.testing.assert_close(lade(x), expected, rtol=1e-5, atol=1e-5)


def test_external_attention_is_softmax_over_positions_renormalised_over_slots():
    torch.manual_seed(0)
    ea = ExternalAttention(8, slots=5)
    x = torch.randn(2, 8, 4, 6)
    n, c, h, w = x.shape
    t = ea.proj_in(x).flatten(2).transpose(1, 2)  # (N, HW, C)
    a = t @ ea.memory.t()  # (N, HW, S)
    attn = torch.softmax(a, dim=1)  # over positions, per slot
    attn = attn / attn.sum(dim=2, keepdim=True)  # over slots, per position
    y = (attn @ ea.memory).transpose(1, 2).reshape(n, c, h, w)
    expected = F.leaky_relu(ea.proj_out(y) + x, 0.2)
    torch.testing.assert_close(ea(x), expected, rtol=1e-5, atol=1e-5)


def test_generator_checks_its_input_and_config():
    model = AnimeGANv3Generator(width=4, slots=8)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.zeros(1, 3, 20, 24))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="width"):
        AnimeGANv3Generator(width=0)


def test_a_flat_image_stays_finite():
    # zero variance everywhere: with the file's epsilon of 0, LADE would divide 0 by 0
    with torch.no_grad():
        assert torch.isfinite(seeded_generator(width=4, slots=8)(torch.full((1, 3, 16, 16), 0.3))).all()


# -- synthetic TFLite files ---------------------------------------------------------------------
class GraphWriter:
    """Builds a TFLite flatbuffer: constants, operators in order, one input and one output."""

    _TYPES = {np.dtype("float32"): "FLOAT32", np.dtype("float16"): "FLOAT16", np.dtype("int32"): "INT32"}

    def __init__(self):
        self.tensors: list[tuple[str, tuple[int, ...], str, bytes | None]] = []
        self.ops: list[tuple[str, list[int], list[int], dict]] = []
        self.graph_io: tuple[list[int], list[int]] = ([], [])  # the graph's input and output tensors

    def tensor(self, name: str, shape, dtype: str = "FLOAT32", data: bytes | None = None) -> int:
        self.tensors.append((name, tuple(int(s) for s in shape), dtype, data))
        return len(self.tensors) - 1

    def const(self, name: str, value) -> int:
        value = np.asarray(value)
        return self.tensor(name, value.shape, self._TYPES[value.dtype], value.tobytes())

    def weight(self, name: str, value) -> int:
        """An fp16 constant and the DEQUANTIZE that widens it, as in the release."""
        value = np.asarray(value, dtype=np.float16)
        return self.op("DEQUANTIZE", [self.const(name, value)], name + "_dequantize", value.shape)

    def op(self, kind: str, inputs: list[int], out_name: str, out_shape, **options) -> int:
        out = self.tensor(out_name, out_shape)
        self.ops.append((kind, inputs, [out], options))
        return out

    def shape(self, index: int) -> tuple[int, ...]:
        return self.tensors[index][1]

    def write(self, path: Path, inputs: list[int], outputs: list[int]) -> Path:
        b = flatbuffers.Builder(1024)

        def vector(start, offsets):
            start(b, len(offsets))
            for off in reversed(offsets):
                b.PrependUOffsetTRelative(off)
            return b.EndVector()

        buffers = []
        for data in [None] + [t[3] for t in self.tensors]:  # buffer 0: the empty sentinel
            vec = b.CreateNumpyVector(np.frombuffer(data, np.uint8)) if data else None
            tflite.BufferStart(b)
            if vec is not None:
                tflite.BufferAddData(b, vec)
            buffers.append(tflite.BufferEnd(b))
        tensors = []
        for i, (name, shape, dtype, _) in enumerate(self.tensors):
            name_off, shape_off = b.CreateString(name), b.CreateNumpyVector(np.array(shape, np.int32))
            tflite.TensorStart(b)
            tflite.TensorAddShape(b, shape_off)
            tflite.TensorAddType(b, getattr(tflite.TensorType, dtype))
            tflite.TensorAddBuffer(b, i + 1)
            tflite.TensorAddName(b, name_off)
            tensors.append(tflite.TensorEnd(b))
        kinds = sorted({op[0] for op in self.ops})
        codes = []
        for kind in kinds:
            code = getattr(tflite.BuiltinOperator, kind)
            tflite.OperatorCodeStart(b)
            tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
            tflite.OperatorCodeAddBuiltinCode(b, code)
            tflite.OperatorCodeAddVersion(b, 1)
            codes.append(tflite.OperatorCodeEnd(b))
        ops = []
        for kind, ins, outs, options in self.ops:
            opt_type, opt = self._options(b, kind, options)
            ins_off = b.CreateNumpyVector(np.array(ins, np.int32))
            outs_off = b.CreateNumpyVector(np.array(outs, np.int32))
            tflite.OperatorStart(b)
            tflite.OperatorAddOpcodeIndex(b, kinds.index(kind))
            tflite.OperatorAddInputs(b, ins_off)
            tflite.OperatorAddOutputs(b, outs_off)
            if opt is not None:
                tflite.OperatorAddBuiltinOptionsType(b, opt_type)
                tflite.OperatorAddBuiltinOptions(b, opt)
            ops.append(tflite.OperatorEnd(b))
        tensors_off = vector(tflite.SubGraphStartTensorsVector, tensors)
        ops_off = vector(tflite.SubGraphStartOperatorsVector, ops)
        in_off = b.CreateNumpyVector(np.array(inputs, np.int32))
        out_off = b.CreateNumpyVector(np.array(outputs, np.int32))
        tflite.SubGraphStart(b)
        tflite.SubGraphAddTensors(b, tensors_off)
        tflite.SubGraphAddInputs(b, in_off)
        tflite.SubGraphAddOutputs(b, out_off)
        tflite.SubGraphAddOperators(b, ops_off)
        subgraph = tflite.SubGraphEnd(b)
        subgraphs_off = vector(tflite.ModelStartSubgraphsVector, [subgraph])
        codes_off = vector(tflite.ModelStartOperatorCodesVector, codes)
        buffers_off = vector(tflite.ModelStartBuffersVector, buffers)
        tflite.ModelStart(b)
        tflite.ModelAddVersion(b, 3)
        tflite.ModelAddOperatorCodes(b, codes_off)
        tflite.ModelAddSubgraphs(b, subgraphs_off)
        tflite.ModelAddBuffers(b, buffers_off)
        b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
        path.write_bytes(bytes(b.Output()))
        return path

    @staticmethod
    def _options(b, kind: str, o: dict):
        T = tflite.BuiltinOptions
        if kind == "CONV_2D":
            tflite.Conv2DOptionsStart(b)
            tflite.Conv2DOptionsAddPadding(b, tflite.Padding.VALID)
            tflite.Conv2DOptionsAddStrideH(b, o["stride"])
            tflite.Conv2DOptionsAddStrideW(b, o["stride"])
            tflite.Conv2DOptionsAddDilationHFactor(b, 1)
            tflite.Conv2DOptionsAddDilationWFactor(b, 1)
            return T.Conv2DOptions, tflite.Conv2DOptionsEnd(b)
        if kind == "RESIZE_BILINEAR":
            tflite.ResizeBilinearOptionsStart(b)
            tflite.ResizeBilinearOptionsAddAlignCorners(b, o.get("align_corners", False))
            tflite.ResizeBilinearOptionsAddHalfPixelCenters(b, o.get("half_pixel_centers", False))
            return T.ResizeBilinearOptions, tflite.ResizeBilinearOptionsEnd(b)
        if kind == "MIRROR_PAD":
            tflite.MirrorPadOptionsStart(b)
            tflite.MirrorPadOptionsAddMode(b, getattr(tflite.MirrorPadMode, o.get("mode", "REFLECT")))
            return T.MirrorPadOptions, tflite.MirrorPadOptionsEnd(b)
        if kind == "LEAKY_RELU":
            tflite.LeakyReluOptionsStart(b)
            tflite.LeakyReluOptionsAddAlpha(b, o.get("alpha", 0.2))
            return T.LeakyReluOptions, tflite.LeakyReluOptionsEnd(b)
        if kind == "SOFTMAX":
            tflite.SoftmaxOptionsStart(b)
            tflite.SoftmaxOptionsAddBeta(b, 1.0)
            return T.SoftmaxOptions, tflite.SoftmaxOptionsEnd(b)
        if kind in ("MEAN", "SUM"):
            tflite.ReducerOptionsStart(b)
            tflite.ReducerOptionsAddKeepDims(b, True)
            return T.ReducerOptions, tflite.ReducerOptionsEnd(b)
        return 0, None


def nhwc(w: torch.Tensor) -> np.ndarray:
    """Our (out, in, kh, kw) weight in TFLite's (out, kh, kw, in) layout."""
    return w.detach().permute(0, 2, 3, 1).numpy()


def animegan_graph(model: AnimeGANv3Generator, h: int, w: int, *, eps: float = 0.0, bias: float = 0.0,
                   resize: dict | None = None, untie: bool = False) -> GraphWriter:
    """AnimeGANv3's operator graph (as in the release, names included) holding ``model``'s weights.

    The keyword arguments break it in the ways the converter must refuse (or carry over).
    """
    g = GraphWriter()
    names = {"base": 0, "main": 0}

    def next_scope(part: str) -> str:
        n = names[part]
        names[part] += 1
        return f"generator_1/{part}/{'Conv' if n == 0 else f'Conv_{n}'}"

    def conv(x: int, scope: str, weight: torch.Tensor, *, stride: int = 1, pads=(0, 0, 0, 0)) -> int:
        n, hh, ww, c = g.shape(x)
        top, bottom, left, right = pads
        paddings = np.array([[0, 0], [top, bottom], [left, right], [0, 0]], np.int32)
        paddings = g.const(f"{scope}/MirrorPad/paddings", paddings)
        padded = g.op("MIRROR_PAD", [x, paddings], f"{scope}/MirrorPad", (n, hh + top + bottom, ww + left + right, c))
        k = weight.shape[2]
        out_h, out_w = (hh + top + bottom - k) // stride + 1, (ww + left + right - k) // stride + 1
        b = g.weight(f"{scope}/bias", np.full(weight.shape[0], bias, np.float32))
        wt = g.weight(f"{scope}/Conv2D", nhwc(weight))
        return g.op("CONV_2D", [padded, wt, b], f"{scope}/Conv2D1", (n, out_h, out_w, weight.shape[0]), stride=stride)

    eps_t = g.weight("generator_1/base/add/y", np.array(eps, np.float32))
    axes = g.const("generator_1/base/moments/mean/reduction_indices", np.array([1, 2], np.int32))

    def moments(x: int, name: str) -> tuple[int, int]:
        stat = (g.shape(x)[0], 1, 1, g.shape(x)[3])
        mean = g.op("MEAN", [x, axes], f"{name}/mean", stat)
        sq = g.op("SQUARED_DIFFERENCE", [x, mean], f"{name}/SquaredDifference", g.shape(x))
        var = g.op("MEAN", [sq, axes], f"{name}/variance", stat)
        return mean, g.op("ADD", [var, eps_t], f"{name}/add", stat)

    def conv_lade(x: int, part: str, seq: torch.nn.Sequential) -> int:
        pad, conv2d, lade = seq[0].padding, seq[1], seq[2]
        y = conv(x, next_scope(part), conv2d.weight, stride=conv2d.stride[0], pads=(pad[2], pad[3], pad[0], pad[1]))
        t = conv(y, next_scope(part), lade.conv.weight)
        mean_t, var_t = moments(t, f"{part}/moments_t{len(g.ops)}")
        std_t = g.op("SQRT", [var_t], f"{part}/Sqrt{len(g.ops)}", g.shape(var_t))
        mean_y, var_y = moments(y, f"{part}/moments_y{len(g.ops)}")
        centred = g.op("SUB", [y, mean_y], f"{part}/sub{len(g.ops)}", g.shape(y))
        rstd = g.op("RSQRT", [var_y], f"{part}/rsqrt{len(g.ops)}", g.shape(var_y))
        z = g.op("MUL", [centred, rstd], f"{part}/truediv{len(g.ops)}", g.shape(y))
        z = g.op("MUL", [z, std_t], f"{part}/mul{len(g.ops)}", g.shape(y))
        z = g.op("ADD", [z, mean_t], f"{part}/add{len(g.ops)}", g.shape(y))
        return g.op("LEAKY_RELU", [z], f"{part}/LeakyRelu{len(g.ops)}", g.shape(y), alpha=0.2)

    def attention(x: int, ea: ExternalAttention) -> int:
        n, hh, ww, c = g.shape(x)
        s, p = ea.memory.shape[0], hh * ww
        scope = "generator_1/main/External_attention"

        def reshape(t: int, shape: tuple[int, ...]) -> int:
            return g.op("RESHAPE", [t, g.const(f"{scope}/shape{len(g.ops)}", np.array(shape, np.int32))],
                        f"{scope}/Reshape{len(g.ops)}", shape)

        def conv1d(t: int, name: str, weight: torch.Tensor) -> int:  # weight (out, in)
            w = g.weight(f"{scope}/{name}", weight.detach()[:, None, None, :].numpy())
            b = g.weight(f"{scope}/{name}/bias", np.zeros(weight.shape[0], np.float32))
            return g.op("CONV_2D", [t, w, b], f"{scope}/{name}1", (n, 1, p, weight.shape[0]), stride=1)

        t = reshape(conv(x, f"{scope}/Conv", ea.proj_in.weight), (n, 1, p, c))
        a = reshape(conv1d(t, "conv1d", ea.memory), (n, p, s))
        perm = g.const(f"{scope}/perm", np.array([0, 2, 1], np.int32))
        a = g.op("TRANSPOSE", [a, perm], f"{scope}/transpose", (n, s, p))
        a = g.op("SOFTMAX", [a], f"{scope}/Softmax", (n, s, p))
        a = g.op("TRANSPOSE", [a, perm], f"{scope}/transpose_1", (n, p, s))
        total = g.op("SUM", [a, g.const(f"{scope}/axis", np.array([2], np.int32))], f"{scope}/Sum", (n, p, 1))
        zero = g.weight(f"{scope}/add/x", np.array(0.0, np.float32))
        total = g.op("ADD", [total, zero], f"{scope}/add", (n, p, 1))
        a = g.op("DIV", [a, total], f"{scope}/truediv", (n, p, s))
        value = ea.memory.detach().t().clone()
        if untie:
            value[0] += 0.5
        v = reshape(conv1d(reshape(a, (n, 1, p, s)), "conv1d_1", value), (n, hh, ww, c))
        y = conv(v, f"{scope}/Conv_1", ea.proj_out.weight)
        y = g.op("ADD", [y, x], f"{scope}/add_1", (n, hh, ww, c))
        return g.op("LEAKY_RELU", [y], f"{scope}/LeakyRelu", (n, hh, ww, c), alpha=0.2)

    x = g.tensor("AnimeGANv3_input", (1, h, w, 3))
    skips = [conv_lade(x, "base", model.stem)]
    for stage in model.down:
        skips.append(conv_lade(conv_lade(skips[-1], "base", stage[0]), "base", stage[1]))
    y = attention(skips.pop(), model.attention)
    for i, (up, merge, skip) in enumerate(zip(model.up, model.merge, reversed(skips))):
        n, hh, ww, c = g.shape(y)
        size = g.const(f"size{i}", np.array([2 * hh, 2 * ww], np.int32))
        y = g.op("RESIZE_BILINEAR", [y, size], f"generator_1/main/resize_{i}", (n, 2 * hh, 2 * ww, c), **(resize or {}))
        y = conv_lade(y, "main", up[1])
        y = g.op("ADD", [y, skip], f"generator_1/main/add_skip{i}", g.shape(y))
        y = conv_lade(y, "main", merge)
    y = conv(y, next_scope("main"), model.head[1].weight, pads=(3, 3, 3, 3))
    out = g.op("TANH", [y], "generator_1/main/out_layer", g.shape(y))
    g.graph_io = ([x], [out])
    return g


def write_graph(g: GraphWriter, path: Path) -> Path:
    return g.write(path, *g.graph_io)


def run_graph(graph: TFLiteGraph, x: torch.Tensor) -> torch.Tensor:
    """A direct interpreter of the operators AnimeGANv3 uses: NHWC float32 in, NHWC out."""
    values: dict[int, torch.Tensor] = {graph.inputs[0]: x}

    def get(i: int) -> torch.Tensor:
        if i not in values:
            values[i] = torch.from_numpy(np.array(graph.tensors[i].data))
        return values[i]

    for op in graph.ops:
        ins = [get(i) for i in op.inputs if i >= 0]
        k, o = op.kind, op.options
        if k == "DEQUANTIZE":
            y = ins[0].float()
        elif k == "MIRROR_PAD":
            p = ins[1].tolist()
            y = F.pad(ins[0].permute(0, 3, 1, 2), (*p[2], *p[1]), mode="reflect").permute(0, 2, 3, 1)
        elif k == "CONV_2D":
            y = F.conv2d(ins[0].permute(0, 3, 1, 2), ins[1].permute(0, 3, 1, 2), ins[2], stride=o["stride"])
            y = y.permute(0, 2, 3, 1)
        elif k in ("MEAN", "SUM"):
            reduce = torch.mean if k == "MEAN" else torch.sum
            y = reduce(ins[0], dim=ins[1].tolist(), keepdim=o["keep_dims"])
        elif k == "SQUARED_DIFFERENCE":
            y = (ins[0] - ins[1]) ** 2
        elif k in ("ADD", "SUB", "MUL", "DIV"):
            y = {"ADD": torch.add, "SUB": torch.sub, "MUL": torch.mul, "DIV": torch.div}[k](ins[0], ins[1])
        elif k in ("SQRT", "RSQRT", "TANH"):
            y = {"SQRT": torch.sqrt, "RSQRT": torch.rsqrt, "TANH": torch.tanh}[k](ins[0])
        elif k == "LEAKY_RELU":
            y = F.leaky_relu(ins[0], o["alpha"])
        elif k == "RESHAPE":
            y = ins[0].reshape(ins[1].tolist())
        elif k == "TRANSPOSE":
            y = ins[0].permute(ins[1].tolist())
        elif k == "SOFTMAX":
            y = torch.softmax(o["beta"] * ins[0], dim=-1)
        elif k == "RESIZE_BILINEAR":
            y = tf1_resize_bilinear(ins[0], *ins[1].tolist())
        else:
            raise AssertionError(f"no interpreter for {k}")
        values[op.outputs[0]] = y
    return values[graph.outputs[0]]


def test_generator_computes_the_tflite_graph(tmp_path):
    model = seeded_generator(width=4, slots=8)
    path = write_graph(animegan_graph(model, 32, 48), tmp_path / "tiny.tflite")
    graph = read_tflite(path)
    x = image(32, 48)
    with torch.no_grad():
        theirs = run_graph(graph, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        ours = model(x)
    assert (ours - theirs).abs().max() < 1e-4


def test_conversion_maps_every_weight_exactly(tmp_path):
    model = seeded_generator(width=4, slots=8)
    path = write_graph(animegan_graph(model, 32, 48), tmp_path / "tiny.tflite")
    converted, report = convert_animeganv3(read_tflite(path))
    assert report["arch"] == report["model_type"] == "animeganv3"
    assert report["config"] == {"width": 4, "slots": 8, "eps": 1e-8}
    assert any("epsilon is 0.0" in note for note in report["notes"])
    theirs = converted.state_dict()
    assert theirs.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(theirs[key], value), key


def test_a_nonzero_epsilon_is_carried_over(tmp_path):
    model = seeded_generator(width=4, slots=8)
    path = write_graph(animegan_graph(model, 16, 16, eps=1e-3), tmp_path / "eps.tflite")
    _, report = convert_animeganv3(read_tflite(path))
    assert report["config"]["eps"] == pytest.approx(1e-3, rel=1e-3)  # fp16 rounding
    assert not any("epsilon is 0" in note for note in report["notes"])


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ({"resize": {"half_pixel_centers": True}}, "legacy sampling"),
        ({"resize": {"align_corners": True}}, "legacy sampling"),
        ({"bias": 0.1}, "non-zero bias"),
        ({"untie": True}, "not the transpose"),
    ],
)
def test_variants_this_module_cannot_hold_are_refused(tmp_path, breakage, message):
    model = seeded_generator(width=4, slots=8)
    path = write_graph(animegan_graph(model, 16, 16, **breakage), tmp_path / "variant.tflite")
    with pytest.raises(CheckpointError, match=message):
        convert_animeganv3(read_tflite(path))


def test_other_tflite_graphs_are_refused(tmp_path):
    # a one-layer network: a valid TFLite file that is not AnimeGANv3
    g = GraphWriter()
    x = g.tensor("input", (1, 8, 8, 3))
    w, b = g.weight("w", np.ones((3, 1, 1, 3), np.float32)), g.weight("b", np.zeros(3, np.float32))
    y = g.op("CONV_2D", [x, w, b], "y", (1, 8, 8, 3), stride=1)
    y = g.op("TANH", [y], "out", (1, 8, 8, 3))
    graph = read_tflite(g.write(tmp_path / "one.tflite", [x], [y]))
    with pytest.raises(CheckpointError, match="not an AnimeGANv3 generator"):
        convert_animeganv3(graph)
    # an operator AnimeGANv3 does not have
    g = GraphWriter()
    x = g.tensor("input", (1, 8, 8, 3))
    y = g.op("LOGISTIC", [x], "out", (1, 8, 8, 3))
    with pytest.raises(CheckpointError, match="LOGISTIC do not occur"):
        convert_animeganv3(read_tflite(g.write(tmp_path / "logistic.tflite", [x], [y])))


def test_files_that_are_not_tflite_are_refused(tmp_path):
    png = tmp_path / "photo.tflite"
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with pytest.raises(CheckpointError, match="not a TFLite model"):
        read_tflite(png)
    model = seeded_generator(width=4, slots=8)
    good = write_graph(animegan_graph(model, 16, 16), tmp_path / "good.tflite").read_bytes()
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(good[:200])
    with pytest.raises(CheckpointError, match="not a readable TFLite model"):
        read_tflite(truncated)
    with pytest.raises(FileNotFoundError):
        read_tflite(tmp_path / "missing.tflite")


# -- saving, loading, the CLI -----------------------------------------------------------------------
def test_save_load_round_trip_and_card(tmp_path):
    model = seeded_generator(width=4, slots=8)
    source = write_graph(animegan_graph(model, 16, 24), tmp_path / "AnimeGANv3_tiny.tflite")
    out, report = save_animeganv3(source, tmp_path / "out")
    x = image(24, 32)
    with torch.no_grad():
        expected = model(x)
        for loaded in (load_model(out), ghibli_core.hub.load(str(out))):
            assert isinstance(loaded, AnimeGANv3Generator)
            assert torch.equal(loaded(x), expected)
    card = (out / "README.md").read_text()
    assert "AnimeGANv3_tiny.tflite" in card and "non-commercial" in card and "never redistributed" in card
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in card
    with pytest.raises(ValueError, match="already holds"):
        save_animeganv3(source, out)
    half, _ = save_animeganv3(source, tmp_path / "half", dtype=torch.float16)
    with torch.no_grad():
        assert torch.equal(load_model(half)(x), expected)  # the weights are fp16 values already


def test_cli_converts_a_tflite_file(tmp_path, capsys):
    model = seeded_generator(width=4, slots=8)
    source = write_graph(animegan_graph(model, 16, 16), tmp_path / "tiny.tflite")
    assert main(["convert", str(source), "-o", str(tmp_path / "cli")]) == 0
    assert "animeganv3" in capsys.readouterr().out
    assert isinstance(load_model(tmp_path / "cli"), AnimeGANv3Generator)


# -- the stylizer ---------------------------------------------------------------------------------
def test_stylizer_rewrites_match_the_eager_model():
    # width 32 gives the 128-channel 3x3 convolutions that the stylizer runs by Winograd
    model = seeded_generator(width=32, slots=16)
    stylizer = Stylizer(model, precision="fp32")
    kinds = {type(m).__name__ for m in stylizer.network.modules()}
    assert {"_WinogradConv3x3", "_FusedInstanceNorm", "_ColumnConv"} <= kinds
    x = image(60, 85)  # not multiples of 8: padded to 64x88 and cropped back
    with torch.no_grad():
        eager = model(_pad_reflect(x, 4, 3))[:, :, :60, :85]
    assert (stylizer.stylize_tensor(x) - eager).abs().max() < 1e-3


def test_a_tile_with_shared_statistics_matches_the_whole_image():
    # LADE's moments and the attention's softmax normalisers are whole-image statistics
    model = seeded_generator(width=4, slots=8)
    x = image(48, 192)
    x[:, :, :, 128:] = 0.2 * x[:, :, :, 128:] + 0.7  # the part outside the tile looks different
    with torch.no_grad():
        whole = model(x)
        naive = model(x[:, :, :, :128])
        with shared_statistics(model, x):
            tile = model(x[:, :, :, :128])
    # away from the tile's right edge (the network sees about 45 px around each pixel)
    assert (tile - whole[:, :, :, :128])[..., :64].abs().max() < 1e-4
    assert (naive - whole[:, :, :, :128])[..., :64].abs().max() > 1e-2


def test_stylizer_tiles_agree_with_the_untiled_network():
    model = seeded_generator(width=4, slots=8)
    x = image(100, 150)
    untiled = Stylizer(model, precision="fp32", tile_size=512).stylize_tensor(x)
    tiled = Stylizer(model, precision="fp32", tile_size=96, tile_overlap=32, stats_size=512).stylize_tensor(x)
    naive = Stylizer(model, precision="fp32", tile_size=96, tile_overlap=32, share_statistics=False).stylize_tensor(x)
    assert psnr(tiled, untiled) > 35
    assert psnr(naive, untiled) < psnr(tiled, untiled) - 10


# -- the release ----------------------------------------------------------------------------------
@pytest.mark.skipif(
    not RELEASE.is_file(), reason=f"AnimeGANv3 Hayao release not found at {RELEASE} (../shared beside the repository)"
)
@pytest.mark.slow
def test_release_reproduces_the_tflite_runtime():
    model, report = convert_animeganv3(read_tflite(RELEASE))
    assert report["config"] == {"width": 32, "slots": 128, "eps": 1e-8}
    assert sum(p.numel() for p in model.parameters()) == 1_027_264
    x = to_tensor(Image.open(ANIMEGAN / "reference" / "input_512.png").convert("RGB"))  # RGB in [-1, 1]
    reference = torch.from_numpy(np.load(ANIMEGAN / "reference" / "output_512_fp16.npy")).permute(0, 3, 1, 2)
    with torch.no_grad():
        ours = model(x)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() <= 5e-3
    stylized = Stylizer(model, precision="fp32").stylize_tensor(x)
    assert (stylized - ours).abs().max() <= 1e-3
