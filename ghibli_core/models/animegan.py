"""The AnimeGANv3 generator (Liu et al., "A Novel Double-Tail Generative Adversarial Network for
Fast Photo Animation"), written from the operator graph of its TFLite release.

It maps RGB ``(N, 3, H, W)`` in ``[-1, 1]`` to RGB in ``[-1, 1]``; ``H`` and ``W`` must be
multiples of 8. :mod:`ghibli_core.convert_animegan` imports the published weights.

Layout (``w`` = ``width``, 32 in the release; no convolution has a bias):

* every convolution is followed by LADE normalisation and LeakyReLU(0.2); 3x3 stride-1
  convolutions pad by reflection, 3x3 stride-2 ones reflect-pad only the top row and left
  column (TensorFlow's ``SAME`` for even sizes, but mirrored instead of zero);
* encoder: reflection-padded 7x7 stem (``w``), then three stages of a stride-2 3x3 and a
  stride-1 3x3 convolution (``w -> 2w``, ``2w -> 4w``, ``4w -> 4w``), down to 1/8;
* external attention at 1/8 (below), added to its input, LeakyReLU;
* decoder: three stages of x2 bilinear upsampling (TF1's legacy sampling grid), a 3x3
  convolution, the encoder feature of that resolution added (U-Net), a second 3x3 convolution;
* a reflection-padded 7x7 convolution to RGB and ``tanh``.

LADE (linearly adaptive denormalisation): instance-normalise ``x``, then give each channel the
mean and standard deviation that a 1x1 convolution of ``x`` has. External attention: logits
``a = M t`` of a 1x1-projected input ``t`` against ``slots`` memory rows ``M``; a softmax over
all positions for each slot, renormalised over the slots at each position; ``M^T`` of that
(the key and value memories are one matrix), a 1x1 projection.

Both need statistics of the whole image (the per-channel moments of LADE, each slot's
normaliser over positions), so the pieces holding them subclass
:class:`~ghibli_core.models.cyclegan.InstanceNorm`: the stylizer's
:func:`~ghibli_core.models.shared_statistics` records them on the whole image and lets every
tile reuse them, like the instance norms of the other generators.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import HubModel, register_model
from .cyclegan import InstanceNorm, _check_input

LEAKY_SLOPE = 0.2


class InstanceMoments(InstanceNorm):
    """Per image and channel: ``mean`` and ``sqrt(var + eps)`` over H and W, each ``(N, C, 1, 1)``.

    An :class:`InstanceNorm` only so that :func:`shared_statistics` records and freezes it;
    it returns the statistics instead of normalising with them.
    """

    def __init__(self, num_features: int, *, eps: float):
        super().__init__(num_features)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if self._mode == "frozen":
            if self._stats is None:
                raise RuntimeError("InstanceMoments is frozen but has no recorded statistics")
            mean, var = self._stats
        else:
            var, mean = torch.var_mean(x.float(), dim=(2, 3), keepdim=True, correction=0)
            if self._mode == "record":
                self._stats = (mean, var)
        return mean.to(x.dtype), torch.sqrt(var + self.eps).to(x.dtype)


class LADE(nn.Module):
    """``instance_norm(x) * std(conv1x1(x)) + mean(conv1x1(x))``, statistics per image and channel."""

    def __init__(self, channels: int, *, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = InstanceNorm(channels)
        self.norm.eps = eps
        self.moments = InstanceMoments(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.moments(self.conv(x))
        return torch.addcmul(mean, self.norm(x), std)


class PositionSoftmax(InstanceNorm):
    """Attention logits ``(N, S, H, W)`` -> softmax over the H*W positions for each slot, then
    renormalised over the S slots at each position.

    The original divides ``exp(a - lse_s)`` by its sum over slots (plus an epsilon that its
    fp16 export stores as 0); that is ``softmax`` over slots of ``a - lse_s``, with ``lse_s``
    the log-sum-exp of slot ``s`` over positions. This form needs no epsilon, and a shift of
    every ``lse_s`` by the same amount cancels: shared statistics from a downscaled image
    (fewer positions, so ``log(H*W)`` smaller) give the same result as from the full one.
    """

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self._mode == "frozen":
            if self._stats is None:
                raise RuntimeError("PositionSoftmax is frozen but has no recorded statistics")
            lse = self._stats[0]
        else:
            lse = torch.logsumexp(a.float().flatten(2), dim=2)[:, :, None, None]
            if self._mode == "record":
                self._stats = (lse, lse)
        return torch.softmax(a.float() - lse, dim=1).to(a.dtype)


class ExternalAttention(nn.Module):
    """External attention with one memory of ``slots`` rows used as both key and value."""

    def __init__(self, channels: int, *, slots: int):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, 1, bias=False)
        self.memory = nn.Parameter(torch.empty(slots, channels))
        nn.init.normal_(self.memory, std=channels**-0.5)
        self.softmax = PositionSoftmax(slots)
        self.proj_out = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.memory.to(x.dtype)
        a = F.conv2d(self.proj_in(x), m[:, :, None, None])  # (N, S, H, W): logits of every slot
        y = F.conv2d(self.softmax(a), m.t()[:, :, None, None])  # (N, C, H, W)
        return F.leaky_relu(self.proj_out(y) + x, LEAKY_SLOPE)


class LegacyUpsample2x(nn.Module):
    """x2 bilinear upsampling on TF1's legacy grid (``align_corners=False``, no half-pixel centres).

    Output pixel ``i`` samples input position ``i / 2``: even outputs copy a pixel, odd ones
    average it with the next, and the last row and column repeat the edge. That is bilinear
    interpolation with ``align_corners=True`` from ``n + 1`` (edge-replicated) to ``2n + 1``
    samples, cropped to ``2n``. PyTorch's ``align_corners=False`` samples ``i / 2 - 1/4``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        x = F.pad(x, (0, 1, 0, 1), mode="replicate")
        y = F.interpolate(x, size=(2 * h + 1, 2 * w + 1), mode="bilinear", align_corners=True)
        return y[:, :, : 2 * h, : 2 * w]


def conv_lade(cin: int, cout: int, *, kernel: int = 3, stride: int = 1, eps: float) -> nn.Sequential:
    """Reflection-padded convolution (no bias), LADE, LeakyReLU(0.2)."""
    if stride == 2:
        if kernel != 3:
            raise ValueError(f"stride-2 convolutions are 3x3 in AnimeGANv3, got kernel {kernel}")
        pad = nn.ReflectionPad2d((1, 0, 1, 0))  # left, right, top, bottom
    elif stride == 1:
        pad = nn.ReflectionPad2d(kernel // 2)
    else:
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    return nn.Sequential(
        pad,
        nn.Conv2d(cin, cout, kernel, stride=stride, bias=False),
        LADE(cout, eps=eps),
        nn.LeakyReLU(LEAKY_SLOPE, True),
    )


@register_model("animeganv3")
class AnimeGANv3Generator(HubModel):
    """AnimeGANv3's generator.

    Args:
        width: channels at full resolution (32 in the release); 2x at 1/2, 4x at 1/4 and 1/8.
        slots: rows of the external-attention memory (128 in the release).
        eps: added to every variance in LADE. The release's file stores 0 (as fp16), with which
            a flat image (zero variance) gives NaN; a tiny positive value keeps it finite.
    """

    stride = 8

    def __init__(self, *, width: int = 32, slots: int = 128, eps: float = 1e-8):
        super().__init__()
        if width < 1 or slots < 1:
            raise ValueError(f"need width >= 1 and slots >= 1, got {width} and {slots}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        w = width
        self.stem = conv_lade(3, w, kernel=7, eps=eps)
        self.down = nn.ModuleList(
            nn.Sequential(conv_lade(cin, cin, stride=2, eps=eps), conv_lade(cin, cout, eps=eps))
            for cin, cout in ((w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w))
        )
        self.attention = ExternalAttention(4 * w, slots=slots)
        self.up = nn.ModuleList(
            nn.Sequential(LegacyUpsample2x(), conv_lade(cin, cout, eps=eps))
            for cin, cout in ((4 * w, 4 * w), (4 * w, 2 * w), (2 * w, w))
        )
        self.merge = nn.ModuleList(conv_lade(c, c, eps=eps) for c in (4 * w, 2 * w, w))
        self.head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(w, 3, 7, bias=False), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, 3, H, W) RGB in [-1, 1] -> (N, 3, H, W) RGB in [-1, 1]
        _check_input(x, self.stride)
        skips = [self.stem(x)]
        for stage in self.down:
            skips.append(stage(skips[-1]))
        y = self.attention(skips.pop())
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            y = merge(up(y) + skip)
        return self.head(y)
