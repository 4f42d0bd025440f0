"""Feed-forward style transfer network (Johnson, Alahi and Fei-Fei 2016), with a slim CPU variant.

One forward pass stylizes a frame, so it suits video. The layout is the widely used
"transformer net": a 9x9 stem, two stride-2 3x3 downsamplings, residual blocks at 1/4
resolution, two nearest-neighbour upsamplings each followed by a 3x3 convolution (no
checkerboard artefacts), and a 9x9 head; reflection padding and affine instance norm
throughout. The output goes through ``tanh`` so it lands in ``[-1, 1]`` like every image
network here.

It is built from the same layers as the CycleGAN ResNet generator, so
:class:`ghibli_core.stylize.Stylizer` runs it with the same fast paths and seamless tiling.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import HubModel, register_model
from .cyclegan import InstanceNorm, _check_input

# Named sizes: Johnson et al.'s network, and a slimmer one that runs several times faster on a CPU.
PRESETS = {
    "johnson": {"width": 32, "n_blocks": 5},
    "slim": {"width": 16, "n_blocks": 3},
    # For video on a CPU: no convolution at full resolution (pixel unshuffle in, pixel shuffle
    # out), 3x3 stem and head. About 2-3x the speed of "slim" at 480p.
    "fast": {"width": 12, "n_blocks": 3, "kernel": 3, "shuffle": True},
}


class _Residual(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), InstanceNorm(dim, affine=True), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), InstanceNorm(dim, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


@register_model("style-net")
class StyleNet(HubModel):
    """Johnson et al.'s image transformation network.

    Args:
        width: filters of the stem (32 in the paper; the bottleneck has 4x as many).
        n_blocks: residual blocks at 1/4 resolution (5 in the paper).
        kernel: size of the stem and head convolutions (9 in the paper).
        shuffle: the stem starts with a 2x2 pixel unshuffle and the head ends with a pixel
            shuffle, so stem and head run at half resolution with ``2 * width`` filters and
            there is one stride-2 downsampling instead of two. Full-resolution convolutions
            dominate the paper's layout on a CPU (they are memory-bound); this removes them.
    """

    stride = 4

    def __init__(self, *, width: int = 32, n_blocks: int = 5, kernel: int = 9, shuffle: bool = False):
        super().__init__()
        if width < 1 or n_blocks < 0 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"need width >= 1, n_blocks >= 0 and an odd kernel, got {width}, {n_blocks}, {kernel}")
        w, pad = width, kernel // 2
        # with shuffle, the stem outputs 2w channels at 1/2 resolution, where the paper's first
        # downsampling would have put them
        first = 1 if shuffle else 0
        stem_in, stem_out = (12, 2 * w) if shuffle else (3, w)
        self.stem = nn.Sequential(
            *([nn.PixelUnshuffle(2)] if shuffle else []),
            nn.ReflectionPad2d(pad), nn.Conv2d(stem_in, stem_out, kernel), InstanceNorm(stem_out, affine=True), nn.ReLU(True),
        )
        self.down = nn.Sequential(
            *[
                nn.Sequential(
                    nn.ReflectionPad2d(1),
                    nn.Conv2d(w * 2**i, w * 2 ** (i + 1), 3, stride=2),
                    InstanceNorm(w * 2 ** (i + 1), affine=True),
                    nn.ReLU(True),
                )
                for i in range(first, 2)
            ]
        )
        self.blocks = nn.Sequential(*[_Residual(w * 4) for _ in range(n_blocks)])
        self.up = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.ReflectionPad2d(1),
                    nn.Conv2d(w * 2**i, w * 2 ** (i - 1), 3),
                    InstanceNorm(w * 2 ** (i - 1), affine=True),
                    nn.ReLU(True),
                )
                for i in ((2,) if shuffle else (2, 1))
            ]
        )
        if shuffle:
            self.head = nn.Sequential(
                nn.ReflectionPad2d(pad), nn.Conv2d(2 * w, 12, kernel), nn.PixelShuffle(2), nn.Tanh()
            )
        else:
            self.head = nn.Sequential(nn.ReflectionPad2d(pad), nn.Conv2d(w, 3, kernel), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, 3, H, W) in [-1, 1] -> (N, 3, H, W) in [-1, 1]
        _check_input(x, self.stride)
        return self.head(self.up(self.blocks(self.down(self.stem(x)))))


def init_style_net(net: StyleNet) -> None:
    """Start close to the identity colours: default conv init, unit norm scales, a small head."""
    for m in net.modules():
        if isinstance(m, nn.InstanceNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    head = net.head[1]
    nn.init.normal_(head.weight, 0.0, 0.01)
    nn.init.zeros_(head.bias)
