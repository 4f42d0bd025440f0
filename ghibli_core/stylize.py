"""Stylization engine: run an image-to-image generator on photos of any size, fast.

A generator maps ``(N, 3, H, W)`` in ``[-1, 1]`` to the same shape and range, with ``H`` and
``W`` multiples of its ``stride``. :class:`Stylizer` wraps one and takes care of:

* any size: inputs are reflect-padded to the stride and the output cropped back;
* large images: overlapping tiles blended with raised-cosine weights. Instance norm would give
  every tile its own statistics (visible seams), so the statistics are recorded once on the
  whole image, downscaled, and shared by all tiles (:func:`~ghibli_core.models.shared_statistics`);
* speed: an inference copy of the network in the fastest precision and memory layout for the
  device, with exact algebraic rewrites of its slow parts (see :func:`prepare_network`).

What is fast where (measured on a 2-core Xeon with avx512_bf16 but no AMX, torch 2.13, see
``benchmarks/bench_stylize.py``): bfloat16 and float16 convolutions run *slower* than float32
there (with or without autocast, channels-last or not), ``torch.jit.freeze`` is slower than
eager, and ``torch.compile`` spends about a minute compiling each new input shape. What pays
is removing work, exactly: channels-last float32; instance norm (+ ReLU) as one group-norm
kernel (no layout copies); nearest-upsample + 3x3 convolution as one 2x2 convolution on the
low-resolution input (16 instead of 36 multiply-adds per 2x2 outputs); the residual blocks' 3x3
convolutions by Winograd F(4x4, 3x3) (4x fewer multiplications); the 7x7 RGB head as a 7x1
convolution and shifted sums; convolution biases that instance norm cancels dropped; scratch
memory reused instead of page-faulted in on every call. Together about 2x over eager float32
on one core (PSNR > 100 dB against it). ``precision="auto"`` picks bfloat16 on CPUs with AMX
(where oneDNN's bf16 kernels are several times faster), float16 on CUDA, and on CPUs with
avx512_bf16 but no AMX it measures: bf16 convolutions were slower than the float32 rewrites
on one such CPU (an Intel Xeon) and 2.9x faster on another (an AMD EPYC, PSNR 66 dB). On a machine whose cores are busy with other processes, every
multi-threaded operation waits for a descheduled thread; fewer threads
(``torch.set_num_threads``) are then faster for both paths.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import threading
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .imaging import resize_max_side, to_pil, to_tensor
from .models.cyclegan import InstanceNorm, ResnetBlock, shared_statistics

__all__ = ["PRECISIONS", "Stylizer", "calibrate_cpu_dtype", "prepare_network", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- precision ------------------------------------------------------------------------------
def resolve_precision(precision: str, device: str | torch.device) -> torch.dtype:
    """The compute dtype for ``precision`` on ``device``.

    ``"auto"``: float16 on CUDA; bfloat16 on CPUs with AMX; float32 otherwise. (A
    :class:`Stylizer` with ``"auto"`` on a CPU with avx512_bf16 but no AMX then times both
    for its network, see :func:`calibrate_cpu_dtype`.)
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        if device.type == "cpu" and _cpu_has_amx_bf16():
            return torch.bfloat16
        return torch.float32
    dtype = _DTYPES[precision]
    if dtype == torch.bfloat16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError("precision 'bf16' needs a CPU with bfloat16 support (avx512_bf16 or AMX); use 'fp32'")
    return dtype


def _cpu_has_amx_bf16() -> bool:
    return bool(torch.cpu.get_capabilities().get("amx_bf16", False))


def _cpu_bf16_without_amx() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and not _cpu_has_amx_bf16()


_CALIBRATED: dict[tuple, torch.dtype] = {}
_CALIBRATED_LOCK = threading.Lock()
MIN_AUTO_PSNR = 40.0  # dB against float32; the product bar is 35


def _best_of(net: nn.Module, x: torch.Tensor, runs: int = 3) -> tuple[float, torch.Tensor]:
    import time

    with torch.inference_mode():
        y = net(x)  # warm-up: oneDNN picks and caches its kernels on the first call
        best = math.inf
        for _ in range(runs):
            t = time.perf_counter()
            net(x)
            best = min(best, time.perf_counter() - t)
    return best, y.float()


def calibrate_cpu_dtype(
    model: nn.Module,
    *,
    channels_last: bool = True,
    fuse: bool = True,
    size: int = 256,
    min_seconds: float = 0.02,
    timer: Callable[[nn.Module, torch.Tensor], tuple[float, torch.Tensor]] = _best_of,
) -> torch.dtype:
    """bfloat16 or float32 for ``model`` on this CPU: whichever runs faster, measured.

    Both prepared networks stylize a ``size`` x ``size`` test pattern; bfloat16 wins when it is
    at least 1.25x faster and its output stays within :data:`MIN_AUTO_PSNR` dB of float32's.
    A network that takes under ``min_seconds`` in float32 keeps float32 (exact, and the
    choice hardly matters for it). The answer is kept per network shape and thread count (a few hundred ms, once).
    """
    key = (
        type(model).__name__,
        tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()),
        torch.get_num_threads(), channels_last, fuse, size,
    )
    with _CALIBRATED_LOCK:
        if key in _CALIBRATED:
            return _CALIBRATED[key]
        stride = int(getattr(model, "stride", 1))
        side = -(-size // stride) * stride
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
        x = torch.stack([xx, yy, torch.sin(6 * xx) * torch.cos(4 * yy)])[None].clamp(-1, 1)  # smooth + detail
        times, outputs = {}, {}
        for dtype in (torch.float32, torch.bfloat16):
            net = prepare_network(model, dtype=dtype, channels_last=channels_last, fuse=fuse)
            xin = x.to(dtype=dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            times[dtype], outputs[dtype] = timer(net, xin)
        mse = ((outputs[torch.bfloat16] - outputs[torch.float32]) / 2).pow(2).mean().item()
        psnr = math.inf if mse == 0 else 10 * math.log10(1 / mse)
        faster = times[torch.bfloat16] * 1.25 <= times[torch.float32] and times[torch.float32] >= min_seconds
        choice = torch.bfloat16 if faster and psnr >= MIN_AUTO_PSNR else torch.float32
        _CALIBRATED[key] = choice
        return choice


# -- exact rewrites of slow layers ------------------------------------------------------------
class _FusedInstanceNorm(InstanceNorm):
    """Instance norm (+ the ReLU after it) as one ``group_norm`` call with a group per channel.

    ``F.instance_norm`` copies channels-last inputs to a contiguous layout and back, which cost
    more than the convolutions around it; ``group_norm`` has a channels-last kernel. The
    shared-statistics modes (tiling) keep the parent's implementation.
    """

    def __init__(self, src: InstanceNorm, *, relu: bool):
        super().__init__(src.num_features, affine=src.affine)
        self.eps = src.eps
        if src.affine:
            self.weight, self.bias = src.weight, src.bias
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode == "normal":
            y = F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)
        else:
            y = super().forward(x)
        return F.relu_(y) if self.relu else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")


class _SubpixelConv(nn.Module):
    """``Upsample(x2, nearest) -> ReflectionPad2d(1) -> Conv2d(3x3)`` as one 2x2 convolution.

    Each output phase ``(a, b)`` of a 3x3 convolution over a nearest-upsampled image only sees
    2x2 distinct input pixels, so it is a 2x2 convolution on the low-resolution input with
    summed taps: 16 instead of 36 multiply-adds per output, and no 4x larger intermediate.
    The four phases run as one convolution with ``4 Co`` outputs over the input padded by 1
    (reflect padding of the upsampled image equals replicate padding of the input); phase
    ``(a, b)`` is its output shifted by ``(a, b)``, interleaved into the result.
    """

    _PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        w = conv.weight.detach().float()  # (Co, Ci, 3, 3)
        # phase 0 reads input rows (i-1, i) with taps (w0, w1 + w2); phase 1 rows (i, i+1) with (w0 + w1, w2)
        rows = [torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2), torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2)]
        phases = []
        for a in (0, 1):
            r = rows[a]  # (Co, Ci, 2, 3)
            phases += [torch.stack([r[..., 0], r[..., 1] + r[..., 2]], 3), torch.stack([r[..., 0] + r[..., 1], r[..., 2]], 3)]
        self.register_buffer("weight", torch.cat(phases).to(conv.weight.dtype))  # (4 Co, Ci, 2, 2)
        bias = None if conv.bias is None else conv.bias.detach().repeat(4)
        self.register_buffer("bias", bias)
        self.out_channels = w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        co = self.out_channels
        z = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.weight, self.bias)  # (n, 4 co, h + 1, w + 1)
        out = torch.empty((n, co, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
        for k, (a, b) in enumerate(self._PHASES):
            out[:, :, a::2, b::2] = z[:, k * co:(k + 1) * co, a:a + h, b:b + w]
        return out


# Winograd F(4x4, 3x3) (Lavin & Gray 2016): B^T, G, A^T for the points 0, +-1, +-2, inf.
_BT = torch.tensor(
    [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
     [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
_G = torch.tensor(
    [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
     [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
_AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=torch.float64)


class _Workspace:
    """Scratch buffers reused across calls and shared by the layers of one network.

    Fresh multi-MB tensors cost a page fault per 4 KB on every call (glibc hands big blocks
    back to the OS), a third of a Winograd layer's time. Not thread-safe: a network using one
    must not run concurrently (the Stylizer holds a lock).
    """

    max_indices = 64  # cached gather indices (one per feature-map size and band)

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._indices: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A contiguous tensor of ``shape`` on ``like``'s device and dtype; content undefined."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.device != like.device or buf.dtype != like.dtype or buf.numel() < numel:
            # a normal tensor even when first needed under inference_mode, so that later calls
            # outside it (e.g. under no_grad) may still write into it
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)

    def tile_index(self, mode: str, h: int, w: int, r0: int, r: int, tw: int, device: torch.device) -> torch.Tensor:
        """Flat pixel indices ``(6 * 6 * r * tw,)`` of the 6x6 input tiles of tile rows
        ``r0 .. r0 + r`` (stride 4) in an ``h x w`` source, in ``(ky, kx, row, col)`` order.

        ``"reflect"``: the source is unpadded and borders mirror; ``"zeros"``: the source is
        already padded by 1. Positions past the far edge (tiles that overhang the image only
        feed outputs that are cropped) are clamped to the edge.
        """
        key = (mode, h, w, r0, r, tw, device)
        index = self._indices.get(key)
        if index is None:
            k = torch.arange(6)
            ys = 4 * torch.arange(r0, r0 + r)[None, :] + k[:, None]  # (6, r), padded coords
            xs = 4 * torch.arange(tw)[None, :] + k[:, None]  # (6, tw)
            if mode == "reflect":
                ys, xs = _mirror(ys - 1, h), _mirror(xs - 1, w)
            else:
                ys, xs = ys.clamp(max=h - 1), xs.clamp(max=w - 1)
            index = (ys.view(6, 1, r, 1) * w + xs.view(1, 6, 1, tw)).reshape(-1).to(device)
            if len(self._indices) >= self.max_indices:
                self._indices.clear()
            self._indices[key] = index
        return index

    def __deepcopy__(self, memo: dict) -> "_Workspace":
        return _Workspace()


def _mirror(i: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect-padding index map (edge not repeated) for one step out of ``[0, n)``; positions
    past ``n`` beyond the reflection are clamped (they only feed cropped outputs)."""
    i = i.abs()
    i = torch.where(i >= n, 2 * (n - 1) - i, i)
    return i.clamp(0, n - 1)


class _WinogradConv3x3(nn.Module):
    """A padded 3x3 stride-1 convolution by Winograd F(4x4, 3x3), for float32 on CPU.

    Every 4x4 output tile costs 36 channel-mixing products instead of 144, done as one batched
    matmul ``(36, tiles, Ci) @ (36, Ci, Co)`` per band of tile rows, between two small
    matmuls that transform the tiles. Works in NHWC (channels-last); any H and W (the last
    tiles overhang and are cropped). Error against the direct convolution: ~1e-5 relative.
    """

    # Bytes of Winograd-domain data per band of tile rows and thread: large enough for efficient
    # matmuls and few operations (each ends in a thread barrier, which costs a scheduler tick
    # when another process holds a core), small enough to stay in cache.
    chunk_bytes = 12 << 20

    def __init__(self, conv: nn.Conv2d, *, pad_mode: str, workspace: _Workspace | None = None):
        super().__init__()
        if pad_mode not in ("reflect", "zeros"):
            raise ValueError(f"pad_mode must be 'reflect' or 'zeros', got {pad_mode!r}")
        w = conv.weight.detach().to(torch.float64)  # (Co, Ci, 3, 3)
        u = torch.einsum("rk,ockl,sl->rsco", _G, w, _G).reshape(36, w.shape[1], w.shape[0])
        self.register_buffer("u", u.float().contiguous())  # (36, Ci, Co)
        self.register_buffer("bt", torch.kron(_BT, _BT).float())  # (36, 36): input tile transform
        self.register_buffer("at", torch.kron(_AT, _AT).float())  # (16, 36): output tile transform
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone())
        self.pad_mode = pad_mode
        self.workspace = workspace if workspace is not None else _Workspace()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        co = self.u.shape[2]
        th, tw = -(-h // 4), -(-w // 4)
        ws = self.workspace
        # 1. a (pixels, c) source the tiles are gathered from: x itself for reflect padding
        #    (the gather indices mirror), a zero-padded copy for zero padding
        if self.pad_mode == "reflect":
            src = x.permute(0, 2, 3, 1).contiguous().view(n, h * w, c)
            sh, sw = h, w
        else:
            src = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).contiguous()
            sh, sw = h + 2, w + 2
            src = src.view(n, sh * sw, c)
        out = torch.empty((n, 4 * th, 4 * tw, co), dtype=x.dtype, device=x.device)
        # bands of equal height; more threads get bigger bands (fewer barriers, more work each)
        budget = self.chunk_bytes * max(1, torch.get_num_threads())
        bands = -(-th // max(1, budget // (36 * tw * max(c, co) * x.element_size())))
        rows = -(-th // bands)
        for b in range(n):
            for r0 in range(0, th, rows):
                r = min(rows, th - r0)
                t = r * tw
                # 2. the band's overlapping 6x6 input tiles, gathered in one indexed copy as
                #    (36, t, c), then taken to the Winograd domain: B^T d B for every tile
                index = ws.tile_index(self.pad_mode, sh, sw, r0, r, tw, x.device)
                tiles = torch.index_select(src[b], 0, index, out=ws.get("tiles", x, (36 * t, c)))
                v = torch.mm(self.bt, tiles.view(36, t * c), out=ws.get("v", x, (36, t * c)))
                # 3. channel mixing, one matmul per Winograd point: (36, t, c) @ (36, c, co)
                m = torch.bmm(v.view(36, t, c), self.u, out=ws.get("m", x, (36, t, co)))
                # 4. back to 4x4 output tiles (A^T m A), interleaved into the NHWC output (+ bias)
                y = torch.mm(self.at, m.view(36, t * co), out=ws.get("y", x, (16, t * co)))
                y = y.view(4, 4, r, tw, co).permute(2, 0, 3, 1, 4)
                dst = out[b, 4 * r0: 4 * (r0 + r)].view(r, 4, tw, 4, co)
                if self.bias is not None:
                    torch.add(y, self.bias, out=dst)
                else:
                    dst.copy_(y)
        out = out.permute(0, 3, 1, 2)  # (n, co, H, W) channels-last view
        if (4 * th, 4 * tw) != (h, w):
            out = out[:, :, :h, :w].contiguous(memory_format=torch.channels_last)
        return out


class _ColumnConv(nn.Module):
    """``ReflectionPad2d(p) -> Conv2d(k x k)`` with very few output channels (the RGB head).

    oneDNN runs a convolution with 3 output channels at a small fraction of its peak; as a
    ``k x 1`` convolution with ``3 k`` outputs followed by ``k`` shifted sums it does the same
    arithmetic about twice as fast.
    """

    def __init__(self, conv: nn.Conv2d, *, pad: int):
        super().__init__()
        co, ci, k, _ = conv.weight.shape
        wk = conv.weight.detach().permute(0, 3, 1, 2).reshape(co * k, ci, k, 1)  # [o*k + dx, c, dy, 0]
        self.register_buffer("weight", wk.contiguous())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.k, self.pad, self.out_channels = k, pad, co

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.pad
        # reflect padding as one gather of NHWC pixels (F.pad on channels-last is a slow
        # gather too, and a copy per border strip would be 4p operations)
        index = _reflect_index(h, w, p, x.device)
        xp = torch.index_select(x.permute(0, 2, 3, 1).reshape(n, h * w, c), 1, index)
        xp = xp.view(n, h + 2 * p, w + 2 * p, c).permute(0, 3, 1, 2)
        z = F.conv2d(xp, self.weight).unflatten(1, (self.out_channels, self.k))  # (n, co, k, H, W + 2p)
        y = z[:, :, 0, :, 0:w].clone() if self.bias is None else z[:, :, 0, :, 0:w] + self.bias.view(1, -1, 1, 1)
        for dx in range(1, self.k):
            y.add_(z[:, :, dx, :, dx:dx + w])
        return y


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


@functools.lru_cache(maxsize=16)
def _reflect_index(h: int, w: int, p: int, device: torch.device) -> torch.Tensor:
    """Flat NHWC pixel indices of an ``h x w`` image reflect-padded by ``p`` (row-major)."""
    if h <= p or w <= p:
        raise ValueError(f"reflect padding by {p} needs an image larger than {p}, got {h}x{w}")
    ys = _mirror(torch.arange(-p, h + p), h)
    xs = _mirror(torch.arange(-p, w + p), w)
    return (ys[:, None] * w + xs[None, :]).reshape(-1).to(device)


# Below ~100 channels the tile transforms cost as much as the multiplications they save.
_WINOGRAD_MIN_CHANNELS = 128


def _is_plain_3x3(conv: nn.Module, padding: int) -> bool:
    return (
        type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
        and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding == (padding, padding)
        and min(conv.in_channels, conv.out_channels) >= _WINOGRAD_MIN_CHANNELS
    )


def _is_simple_conv(conv: nn.Module | None, kernel: int | None) -> bool:
    """A square stride-1 unpadded undilated dense Conv2d (of size ``kernel`` if given)."""
    return (
        type(conv) is nn.Conv2d and conv.kernel_size[0] == conv.kernel_size[1]
        and (kernel is None or conv.kernel_size[0] == kernel) and conv.stride == (1, 1)
        and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
    )


def _is_upsample2(m: nn.Module) -> bool:
    return (
        type(m) is nn.Upsample and m.mode == "nearest" and m.size is None
        and m.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0))
    )


def _reflect_pad(m: nn.Module) -> int | None:
    if type(m) is nn.ReflectionPad2d and len(set(m.padding)) == 1:
        return m.padding[0]
    return None


class _ResidualBlock(nn.Module):
    """``x + conv_block(x)`` added in place into the block's fresh output (one allocation less)."""

    def __init__(self, conv_block: nn.Module):
        super().__init__()
        self.conv_block = conv_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(x).add_(x)


def _fuse(module: nn.Module, *, cpu_fp32: bool) -> None:
    """Replace known slow layer patterns among ``module``'s descendants, in place."""
    for name, child in list(module.named_children()):
        new = _rewrite(child, cpu_fp32=cpu_fp32)
        if new is not child:
            setattr(module, name, new)


def _rewrite(m: nn.Module, *, cpu_fp32: bool) -> nn.Module:
    """``m`` rewritten (its own descendants too), or ``m`` itself with rewritten descendants."""
    if type(m) is ResnetBlock and isinstance(m.conv_block[-1], InstanceNorm):
        # the block ends in a norm, whose output is a fresh tensor we may add into
        _fuse_sequential(m.conv_block, cpu_fp32=cpu_fp32)
        return _ResidualBlock(m.conv_block)
    if isinstance(m, nn.Sequential):
        _fuse_sequential(m, cpu_fp32=cpu_fp32)
        return m
    if cpu_fp32 and _is_plain_3x3(m, 1) and m.padding_mode in ("zeros", "reflect"):
        return _WinogradConv3x3(m, pad_mode=m.padding_mode)
    if type(m) is InstanceNorm:
        return _FusedInstanceNorm(m, relu=False)
    _fuse(m, cpu_fp32=cpu_fp32)
    return m


def _fuse_sequential(seq: nn.Sequential, *, cpu_fp32: bool) -> None:
    layers = list(seq)
    # A per-channel bias right before instance norm is removed by its mean subtraction (also
    # with shared statistics, which are recorded without it too): drop it, exactly.
    for layer, nxt in zip(layers, layers[1:]):
        if type(layer) in (nn.Conv2d, nn.ConvTranspose2d) and isinstance(nxt, InstanceNorm):
            layer.bias = None
    out: list[nn.Module] = []
    i = 0
    while i < len(layers):
        cur = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        nxt2 = layers[i + 2] if i + 2 < len(layers) else None
        pad = _reflect_pad(cur)
        if _is_upsample2(cur) and nxt is not None and _reflect_pad(nxt) == 1 and _is_simple_conv(nxt2, 3):
            out.append(_SubpixelConv(nxt2))
            i += 3
        elif cpu_fp32 and pad == 1 and nxt is not None and _is_plain_3x3(nxt, 0):
            out.append(_WinogradConv3x3(nxt, pad_mode="reflect"))
            i += 2
        elif cpu_fp32 and pad and _is_simple_conv(nxt, None) and nxt.out_channels <= 4 and nxt.kernel_size[0] > 1:
            out.append(_ColumnConv(nxt, pad=pad))
            i += 2
        elif type(cur) is InstanceNorm:
            relu = type(nxt) is nn.ReLU
            out.append(_FusedInstanceNorm(cur, relu=relu))
            i += 2 if relu else 1
        else:
            out.append(_rewrite(cur, cpu_fp32=cpu_fp32))
            i += 1
    for key in list(seq._modules):
        del seq._modules[key]
    for j, layer in enumerate(out):
        seq.add_module(str(j), layer)


def prepare_network(
    model: nn.Module,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
    fuse: bool = True,
) -> nn.Module:
    """An inference-only copy of ``model``: on ``device``, in ``dtype``, optionally rewritten.

    ``fuse`` replaces known layer patterns by exact equivalents (instance norm + ReLU as one
    kernel, nearest-upsample + conv as sub-pixel convolutions; on CPU in float32 also Winograd
    3x3 convolutions and a split RGB head). The model passed in is never modified.
    """
    device = torch.device(device)
    net = copy.deepcopy(model).eval().requires_grad_(False)
    if fuse:
        _fuse(net, cpu_fp32=device.type == "cpu" and dtype == torch.float32)
        workspace = _Workspace()  # layers run one after another, so they can share scratch memory
        for m in net.modules():
            if isinstance(m, _WinogradConv3x3):
                m.workspace = workspace
    net = net.to(device=device, dtype=dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


# -- the engine -------------------------------------------------------------------------------
class Stylizer:
    """Stylize images of any size with an image-to-image generator.

    Args:
        model: generator mapping ``(N, 3, H, W)`` in ``[-1, 1]`` to the same shape; ``H, W``
            must be multiples of ``getattr(model, "stride", 1)``. It is copied, not modified.
        device: where the network runs.
        precision: ``"auto"`` (the fastest path here that keeps PSNR >= 35 dB against
            float32, see :func:`resolve_precision` and :func:`calibrate_cpu_dtype`), ``"fp32"``,
            ``"bf16"`` or ``"fp16"``.
        channels_last: run convolutions in NHWC memory layout (faster with oneDNN and cuDNN).
        fuse: apply the exact layer rewrites of :func:`prepare_network`.
        tile_size: images with a side above this go through overlapping tiles of this size
            (rounded down to the stride); bounds memory for big photos. 1024 runs the app's
            default photo size (max side 1024) in one pass: a tiled image pays for the
            overlaps and a statistics pass on top of its pixels.
        tile_overlap: pixels shared by neighbouring tiles, blended with raised-cosine weights.
        share_statistics: tiles normalise with instance-norm statistics recorded once on the
            whole image, so they agree with each other (no seams); ``False`` gives naive
            tiling, where each tile uses its own statistics (visible seams; for tests).
        stats_size: longest side of the downscaled whole image those statistics come from
            (default ``tile_size``; memory grows with its square). Features of a downscaled
            image have somewhat other statistics than at full size, so a tiled result is
            seamless but matches the untiled one exactly only up to this size.
        batch_size: images (or tiles) per forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        channels_last: bool = True,
        fuse: bool = True,
        tile_size: int = 1024,
        tile_overlap: int = 64,
        share_statistics: bool = True,
        stats_size: int | None = None,
        batch_size: int = 4,
    ):
        self.stride = int(getattr(model, "stride", 1))
        if self.stride < 1:
            raise ValueError(f"model.stride must be a positive integer, got {self.stride}")
        self.tile_size = (tile_size // self.stride) * self.stride
        if self.tile_size < max(self.stride, 16):
            raise ValueError(f"tile_size must be at least {max(self.stride, 16)} for this model, got {tile_size}")
        if not 0 <= tile_overlap <= self.tile_size // 2:
            raise ValueError(f"tile_overlap must be between 0 and tile_size / 2 = {self.tile_size // 2}, got {tile_overlap}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.tile_overlap = tile_overlap
        self.share_statistics = share_statistics
        self.stats_size = self.tile_size if stats_size is None else stats_size
        if self.stats_size < 1:
            raise ValueError(f"stats_size must be positive, got {stats_size}")
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = resolve_precision(precision, self.device)
        if precision == "auto" and self.device.type == "cpu" and self.dtype == torch.float32 and _cpu_bf16_without_amx():
            self.dtype = calibrate_cpu_dtype(model, channels_last=channels_last, fuse=fuse)
        self.channels_last = channels_last
        self.network = prepare_network(model, device=self.device, dtype=self.dtype, channels_last=channels_last, fuse=fuse)
        # Networks are not re-entrant while tiles share statistics; the app may call from threads.
        self._lock = threading.Lock()

    # -- public API ---------------------------------------------------------------------------
    def __call__(self, img: Image.Image, *, strength: float = 1.0, max_side: int | None = None) -> Image.Image:
        """Stylize one RGB image; the result has the image's size (after the optional ``max_side`` cap).

        ``strength`` blends with the original: 0 returns the input, 1 the full style.
        """
        return self.stylize_images([img], strength=strength, max_side=max_side)[0]

    def stylize_images(
        self,
        images: Sequence[Image.Image],
        *,
        strength: float = 1.0,
        max_side: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Image.Image]:
        """Stylize RGB images, batching those of the same size; results in input order.

        ``progress``, if given, is called with the number of images finished after each batch.
        """
        _check_strength(strength)
        images = [resize_max_side(_check_image(im), max_side) if max_side else _check_image(im) for im in images]
        if strength == 0:
            return [im.copy() for im in images]
        results: list[Image.Image | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.size, []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                x = to_tensor([images[i] for i in chunk])
                y = self.stylize_tensor(x)
                if strength != 1:
                    y = torch.lerp(x, y, strength)
                for i, yi in zip(chunk, y):
                    results[i] = to_pil(yi)
                if progress is not None:
                    progress(len(chunk))
        return results  # type: ignore[return-value]

    def stylize_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in ``[-1, 1]`` -> stylized ``(N, 3, H, W)`` float32 in ``[-1, 1]``, any H, W.

        The result is on ``x``'s device.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"expected a float (N, 3, H, W) tensor in [-1, 1], got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                f"{' of dtype ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}"
            )
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"expected a non-empty batch of images, got shape {tuple(x.shape)}")
        lo, hi = torch.aminmax(x.detach())
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"expected values in [-1, 1], got [{lo.item():.3g}, {hi.item():.3g}] (use imaging.to_tensor)")
        h, w = x.shape[2:]
        with self._lock, torch.inference_mode():
            if h <= self.tile_size and w <= self.tile_size:
                y = torch.cat([self._run_padded(x[i:i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)])
            else:
                y = torch.cat([self._run_tiled(x[i:i + 1]) for i in range(x.shape[0])])
        return y.to(x.device)

    # -- internals ------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Network on an already stride-aligned ``(n, 3, h, w)`` batch -> float32 on the device."""
        x = x.to(device=self.device, dtype=self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = self.network(x)
        if y.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(y.shape)} for an input of shape {tuple(x.shape)}")
        return y.float()

    def _pad_to_stride(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        # at least 16 pixels, so the network's internal reflection pads have room
        min_side = -(-16 // self.stride) * self.stride
        th = max(min_side, -(-h // self.stride) * self.stride)
        tw = max(min_side, -(-w // self.stride) * self.stride)
        return _pad_reflect(x, th - h, tw - w)

    def _run_padded(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        return self._forward(self._pad_to_stride(x))[:, :, :h, :w]

    def _run_tiled(self, x: torch.Tensor) -> torch.Tensor:
        """One image larger than a tile: overlapping tiles sharing whole-image statistics."""
        h, w = x.shape[2:]
        # 1. tile grid on the stride-padded image; every tile has the same shape
        xp = self._pad_to_stride(x).to(self.device)
        hp, wp = xp.shape[2:]
        th, tw = min(self.tile_size, hp), min(self.tile_size, wp)
        ys = _tile_starts(hp, th, self.tile_overlap, self.stride)
        xs = _tile_starts(wp, tw, self.tile_overlap, self.stride)
        grid = [(y0, x0) for y0 in ys for x0 in xs]
        batches = [grid[i:i + self.batch_size] for i in range(0, len(grid), self.batch_size)]

        def tiles_of(batch: list[tuple[int, int]]) -> torch.Tensor:
            return torch.cat([xp[:, :, y0:y0 + th, x0:x0 + tw] for y0, x0 in batch])

        with contextlib.ExitStack() as stack:
            if self.share_statistics:
                # 2. every instance norm records its statistics on the whole image, downscaled
                #    to at most stats_size, and all tiles reuse them
                stack.enter_context(shared_statistics(self.network, self._reference(x)))
            # 3. every tile with the same statistics, accumulated with blending weights
            wy = {y0: _blend_weights(hp, th, y0, self.tile_overlap, xp.device) for y0 in ys}
            wx = {x0: _blend_weights(wp, tw, x0, self.tile_overlap, xp.device) for x0 in xs}
            total = torch.stack(list(wy.values())).sum(0)[:, None] * torch.stack(list(wx.values())).sum(0)[None, :]
            out = torch.zeros((1, 3, hp, wp), dtype=torch.float32, device=xp.device)
            for batch in batches:
                y = self._forward(tiles_of(batch))
                for (y0, x0), yt in zip(batch, y):
                    weight = wy[y0][y0:y0 + th, None] * wx[x0][None, x0:x0 + tw]
                    out[0, :, y0:y0 + th, x0:x0 + tw] += yt * weight
        return (out / total)[:, :, :h, :w]

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (1, 3, H, W) downscaled to fit ``stats_size``, stride-padded, ready for the network."""
        h, w = x.shape[2:]
        scale = min(1.0, self.stats_size / max(h, w))
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        ref = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        ref = self._pad_to_stride(ref.clamp(-1, 1)).to(device=self.device, dtype=self.dtype)
        return ref.contiguous(memory_format=torch.channels_last) if self.channels_last else ref


# -- helpers --------------------------------------------------------------------------------------
def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be between 0 and 1, got {strength}")


def _check_image(img: Image.Image) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__} (load it with imaging.load_image)")
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode!r} (load it with imaging.load_image)")
    return img


def _pad_reflect(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Pad bottom/right by mirroring; falls back to edge replication where the image is too
    small to mirror (reflection needs pad < size)."""
    if not ph and not pw:
        return x
    h, w = x.shape[2:]
    while ph or pw:
        # reflection pads at most size - 1 per step; repeat for tiny images
        sh, sw = min(ph, h - 1), min(pw, w - 1)
        if sh == 0 and sw == 0:
            return F.pad(x, (0, pw, 0, ph), mode="replicate")
        x = F.pad(x, (0, sw, 0, sh), mode="reflect")
        ph, pw, h, w = ph - sh, pw - sw, h + sh, w + sw
    return x


def _tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Evenly spread starts (multiples of ``align``) of ``tile``-long windows covering
    ``length`` with at least ``overlap`` pixels shared by neighbours. ``length`` and ``tile``
    are multiples of ``align``, so every tile sees the same pixel-to-feature grid."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    while True:
        step = (length - tile) / (n - 1)
        starts = [round(k * step / align) * align for k in range(n)]
        if all(b - a <= tile - overlap for a, b in zip(starts, starts[1:])):
            return starts
        n += 1  # alignment rounding made a gap too wide: one tile more


def _blend_weights(length: int, tile: int, start: int, overlap: int, device: torch.device) -> torch.Tensor:
    """Weights along one axis for the tile at ``start``: a raised-cosine ramp over ``overlap``
    pixels at each edge shared with a neighbour, 1 elsewhere, 0 outside the tile."""
    wt = torch.ones(tile, dtype=torch.float32, device=device)
    if overlap:
        ramp = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(overlap, dtype=torch.float32, device=device) + 0.5) / overlap)
        if start > 0:
            wt[:overlap] = ramp
        if start + tile < length:
            wt[-overlap:] = ramp.flip(0)
    full = torch.zeros(length, dtype=torch.float32, device=device)
    full[start:start + tile] = wt
    return full
