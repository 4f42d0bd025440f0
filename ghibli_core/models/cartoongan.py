"""The CartoonGAN generator (Chen, Lai and Liu, CVPR 2018), as an RGB image network.

The published generator (and its PyTorch port) takes BGR in ``[-1, 1]``. Here the channel
order is folded into the first and last convolutions when a checkpoint is converted
(:func:`ghibli_core.convert.convert_cartoongan`), so this module maps RGB ``(N, 3, H, W)`` in
``[-1, 1]`` to RGB like every other image network of the project and runs through the same
stylizer (tiling with shared instance-norm statistics, the exact CPU rewrites).

Layout: reflection-padded 7x7 stem; two down stages (3x3 stride-2 convolution then a 3x3
convolution, both zero-padded, then instance norm and ReLU); eight residual blocks of
reflection-padded 3x3 convolutions; two up stages (3x3 transposed convolution, stride 2,
``output_padding`` 1, then a zero-padded 3x3 convolution, norm, ReLU); a reflection-padded 7x7
head and ``tanh``. Instance norm has affine scale and shift and an epsilon of 1e-9, as in the
original.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import HubModel, register_model
from .cyclegan import InstanceNorm, ResnetBlock, _check_input

CARTOONGAN_EPS = 1e-9


def _norm(channels: int) -> InstanceNorm:
    norm = InstanceNorm(channels, affine=True)
    norm.eps = CARTOONGAN_EPS
    return norm


@register_model("cartoongan")
class CartoonGANGenerator(HubModel):
    """CartoonGAN's generator.

    Args:
        width: filters of the stem (64 in the paper); the residual blocks have 4x as many.
        n_blocks: residual blocks at 1/4 resolution (8 in the paper).
    """

    stride = 4

    def __init__(self, *, width: int = 64, n_blocks: int = 8):
        super().__init__()
        if width < 1 or n_blocks < 0:
            raise ValueError(f"need width >= 1 and n_blocks >= 0, got {width} and {n_blocks}")
        w = width
        self.stem = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, w, 7), _norm(w), nn.ReLU(True))
        self.down = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(w * 2**i, w * 2 ** (i + 1), 3, stride=2, padding=1),
                    nn.Conv2d(w * 2 ** (i + 1), w * 2 ** (i + 1), 3, padding=1),
                    _norm(w * 2 ** (i + 1)),
                    nn.ReLU(True),
                )
                for i in range(2)
            ]
        )
        blocks = []
        for _ in range(n_blocks):
            block = ResnetBlock(w * 4, affine=True, dropout=0.0)
            for m in block.modules():
                if isinstance(m, InstanceNorm):
                    m.eps = CARTOONGAN_EPS
            blocks.append(block)
        self.blocks = nn.Sequential(*blocks)
        self.up = nn.Sequential(
            *[
                nn.Sequential(
                    nn.ConvTranspose2d(w * 2**i, w * 2 ** (i - 1), 3, stride=2, padding=1, output_padding=1),
                    nn.Conv2d(w * 2 ** (i - 1), w * 2 ** (i - 1), 3, padding=1),
                    _norm(w * 2 ** (i - 1)),
                    nn.ReLU(True),
                )
                for i in (2, 1)
            ]
        )
        self.head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(w, 3, 7), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, 3, H, W) RGB in [-1, 1] -> (N, 3, H, W) RGB in [-1, 1]
        _check_input(x, self.stride)
        return self.head(self.up(self.blocks(self.down(self.stem(x)))))
