"""CycleGAN networks: ResNet and U-Net generators, the 70x70 PatchGAN discriminator.

Layouts follow the reference CycleGAN/pix2pix design (Zhu et al. 2017, Isola et al. 2017) so
that checkpoints of the reference PyTorch implementation can be converted key by key
(:mod:`ghibli_core.convert`). Every generator maps ``(N, 3, H, W)`` in ``[-1, 1]`` to the same
shape and range; ``H`` and ``W`` must be multiples of the generator's ``stride``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .base import HubModel, register_model


class InstanceNorm(nn.InstanceNorm2d):
    """Instance norm whose statistics can be recorded once and reused.

    Instance norm normalises each image by its own mean and variance, so stylizing a large
    image tile by tile gives every tile different statistics and visible seams. The stylizer
    records the statistics on a whole (downscaled) image with :func:`shared_statistics` and
    then runs every tile with those same statistics. The state dict is that of
    ``nn.InstanceNorm2d`` (``weight``/``bias`` when affine), so checkpoints stay compatible.
    """

    def __init__(self, num_features: int, *, affine: bool = False):
        super().__init__(num_features, affine=affine, track_running_stats=False)
        self._mode = "normal"  # "normal" | "record" | "frozen"
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode == "normal":
            return super().forward(x)
        if self._mode == "record":
            var, mean = torch.var_mean(x.float(), dim=(2, 3), keepdim=True, correction=0)
            self._stats = (mean, var)
        if self._stats is None:
            raise RuntimeError("InstanceNorm is frozen but has no recorded statistics")
        mean, var = self._stats
        if mean.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"recorded statistics are for {mean.shape[0]} images, the batch has {x.shape[0]}"
            )
        y = (x - mean.to(x.dtype)) * torch.rsqrt(var + self.eps).to(x.dtype)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1).to(x.dtype) + self.bias.view(1, -1, 1, 1).to(x.dtype)
        return y


@contextlib.contextmanager
def shared_statistics(model: nn.Module, reference: torch.Tensor) -> Iterator[None]:
    """Run ``model`` on ``reference`` to record every instance-norm statistic, then freeze them.

    Inside the block, every call of ``model`` normalises with the recorded statistics, so
    tiles of one image are treated exactly alike. ``reference`` is ``(N, 3, h, w)`` in
    ``[-1, 1]``, typically the whole image downscaled, with the same ``N`` as the tiles (or 1).
    """
    norms = [m for m in model.modules() if isinstance(m, InstanceNorm)]
    try:
        for m in norms:
            m._mode = "record"
        with torch.no_grad():
            model(reference)
        for m in norms:
            m._mode = "frozen"
        yield
    finally:
        for m in norms:
            m._mode = "normal"
            m._stats = None


def _check_input(x: torch.Tensor, stride: int) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (N, 3, H, W) tensor in [-1, 1], got shape {tuple(x.shape)}")
    if x.shape[2] % stride or x.shape[3] % stride:
        raise ValueError(
            f"height and width must be multiples of {stride} for this generator, got "
            f"{x.shape[2]}x{x.shape[3]} (pad first: ghibli_core.stylize does it for you)"
        )


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, *, affine: bool, dropout: float):
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3),
            InstanceNorm(dim, affine=affine),
            nn.ReLU(True),
        ]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), InstanceNorm(dim, affine=affine)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


@register_model("cyclegan-resnet")
class ResnetGenerator(HubModel):
    """ResNet generator: 7x7 stem, two stride-2 downsamplings, residual blocks, two upsamplings.

    Args:
        in_channels: channels of the input image.
        out_channels: channels of the output image.
        width: filters of the first convolution (``ngf``); 64 in the paper, 32 is a fast variant.
        n_blocks: residual blocks at 1/4 resolution: 9 for 256 px training, 6 for 128 px.
        norm_affine: instance norm with learnt scale and shift (some third-party checkpoints).
        dropout: dropout inside the residual blocks (0 in the paper's CycleGAN).
        upsample: ``"transpose"`` (the paper's transposed convolutions) or ``"resize"``
            (nearest-neighbour upsampling then a 3x3 convolution: no checkerboard artefacts).
    """

    stride = 4

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        width: int = 64,
        n_blocks: int = 9,
        norm_affine: bool = False,
        dropout: float = 0.0,
        upsample: str = "transpose",
    ):
        super().__init__()
        if upsample not in ("transpose", "resize"):
            raise ValueError(f"upsample must be 'transpose' or 'resize', got {upsample!r}")
        if n_blocks < 0 or width < 1:
            raise ValueError(f"need width >= 1 and n_blocks >= 0, got {width} and {n_blocks}")
        w = width
        self.stem = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(in_channels, w, 7), InstanceNorm(w, affine=norm_affine), nn.ReLU(True)
        )
        self.down = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(w * 2**i, w * 2 ** (i + 1), 3, stride=2, padding=1),
                    InstanceNorm(w * 2 ** (i + 1), affine=norm_affine),
                    nn.ReLU(True),
                )
                for i in range(2)
            ]
        )
        self.blocks = nn.Sequential(
            *[ResnetBlock(w * 4, affine=norm_affine, dropout=dropout) for _ in range(n_blocks)]
        )
        ups = []
        for i in (2, 1):
            cin, cout = w * 2**i, w * 2 ** (i - 1)
            if upsample == "transpose":
                conv: list[nn.Module] = [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)]
            else:
                conv = [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3)]
            ups.append(nn.Sequential(*conv, InstanceNorm(cout, affine=norm_affine), nn.ReLU(True)))
        self.up = nn.Sequential(*ups)
        self.head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(w, out_channels, 7), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, 3, H, W) in [-1, 1] -> (N, 3, H, W) in [-1, 1]
        _check_input(x, self.stride)
        return self.head(self.up(self.blocks(self.down(self.stem(x)))))


@register_model("cyclegan-unet")
class UnetGenerator(HubModel):
    """U-Net generator of the 256 px design: 4x4 stride-2 convolutions down to 1x1 and back.

    Encoder: LeakyReLU(0.2) + conv + instance norm (no norm on the first and innermost
    layers); decoder: ReLU + transposed conv + instance norm, dropout 0.5 in the first
    ``n_downs - 5`` decoder blocks after the innermost; skip connections concatenate encoder
    features. ``n_downs`` = 8 for 256 px inputs (7 for 128 px).

    Args:
        in_channels, out_channels: image channels.
        width: filters of the first layer (``ngf``); capped at 8x in the deeper layers.
        n_downs: number of stride-2 downsamplings; inputs must be multiples of ``2**n_downs``.
        norm_affine: instance norm with learnt scale and shift.
        dropout: dropout rate in the inner decoder blocks (0.5 in the paper).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        width: int = 64,
        n_downs: int = 8,
        norm_affine: bool = False,
        dropout: float = 0.5,
    ):
        super().__init__()
        if n_downs < 5:
            raise ValueError(f"n_downs must be at least 5, got {n_downs}")
        self.stride = 2**n_downs
        chans = [min(width * 2**i, width * 8) for i in range(n_downs)]  # output of each encoder level
        enc: list[nn.Module] = [nn.Conv2d(in_channels, chans[0], 4, stride=2, padding=1)]
        for i in range(1, n_downs):
            layers: list[nn.Module] = [nn.LeakyReLU(0.2, True), nn.Conv2d(chans[i - 1], chans[i], 4, stride=2, padding=1)]
            if i < n_downs - 1:
                layers.append(InstanceNorm(chans[i], affine=norm_affine))
            enc.append(nn.Sequential(*layers))
        self.encoder = nn.ModuleList(enc)
        dec: list[nn.Module] = []
        for i in range(n_downs - 1, 0, -1):
            # decoder level i maps to the resolution of encoder level i-1
            cin = chans[i] if i == n_downs - 1 else chans[i] * 2
            layers = [nn.ReLU(True), nn.ConvTranspose2d(cin, chans[i - 1], 4, stride=2, padding=1), InstanceNorm(chans[i - 1], affine=norm_affine)]
            if dropout and n_downs - 1 > i >= 4:
                layers.append(nn.Dropout(dropout))
            dec.append(nn.Sequential(*layers))
        dec.append(nn.Sequential(nn.ReLU(True), nn.ConvTranspose2d(chans[0] * 2, out_channels, 4, stride=2, padding=1), nn.Tanh()))
        self.decoder = nn.ModuleList(dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, 3, H, W) in [-1, 1] -> (N, 3, H, W) in [-1, 1]
        _check_input(x, self.stride)
        skips = []
        for layer in self.encoder:
            x = layer(x)
            skips.append(x)
        x = self.decoder[0](skips.pop())
        for layer in self.decoder[1:]:
            x = layer(torch.cat([skips.pop(), x], dim=1))
        return x


@register_model("patchgan")
class PatchDiscriminator(HubModel):
    """PatchGAN discriminator; with ``n_layers=3`` each output sees a 70x70 input patch.

    Args:
        in_channels: image channels.
        width: filters of the first layer (``ndf``).
        n_layers: stride-2 layers after the first (3 gives 70x70 receptive fields).
        norm_affine: instance norm with learnt scale and shift.
    """

    def __init__(self, *, in_channels: int = 3, width: int = 64, n_layers: int = 3, norm_affine: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(width * prev, width * mult, 4, stride=stride, padding=1),
                InstanceNorm(width * mult, affine=norm_affine),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(width * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) in [-1, 1] -> (N, 1, h, w) real/fake logits per patch
        return self.model(x)


def init_weights(module: nn.Module, *, gain: float = 0.02) -> None:
    """The reference initialisation: N(0, 0.02) convolutions, N(1, 0.02) norm scales, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.InstanceNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
