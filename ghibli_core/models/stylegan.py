"""StyleGAN2 (Karras et al. 2020): a style-based generator and a residual discriminator.

Generator ``G = synthesis(mapping(z))``:

- ``mapping``: ``z`` ``(N, z_dim)`` is normalised to unit second moment and passed through an
  MLP of equalized-learning-rate layers whose learning rate is scaled by 0.01 (so ``w`` moves
  slowly); the result is broadcast to ``(N, num_ws, w_dim)``, one ``w`` per synthesis layer.
  A running mean of ``w`` (buffer ``mapping.w_avg``) is kept during training; truncation pulls
  ``w`` towards it.
- ``synthesis``: a learnt constant 4x4 input, then per resolution two 3x3 convolutions whose
  weights are modulated by a per-sample style (an affine map of ``w``) and demodulated (each
  output feature map rescaled to unit expected variance), per-pixel noise with a learnt
  strength per layer, and a "tRGB" 1x1 modulated convolution at every resolution whose outputs
  are upsampled and summed (the skip architecture). Output ``(N, 3, R, R)``, roughly in [-1, 1]
  (not clamped, as in the paper).

Discriminator: residual blocks (two 3x3 convolutions beside a 1x1 skip, summed and scaled by
``sqrt(0.5)``), a minibatch standard-deviation feature at 4x4, and a linear head giving one logit
per image. Every layer uses the equalized learning rate (weights drawn from N(0, 1) and scaled by
``1/sqrt(fan_in)`` at run time).

Choices made for CPU speed (documented differences from the official code):

- Modulation is applied to the activations ("non-fused": scale the input channels by the style,
  run one ordinary batched convolution with the shared weight, scale the output channels by the
  demodulation coefficients). It is exactly the same function as convolving each sample with
  its own modulated weight, without a grouped convolution, and the demodulation coefficients come
  from an ``(N, in) @ (in, out)`` product instead of an ``(N, out, in, k, k)`` tensor.
- Upsampling in the synthesis convolutions is StyleGAN2's own (not a difference): a stride-2
  transposed convolution followed by the ``[1, 3, 3, 1]`` binomial filter, so the 3x3
  convolution runs at the low resolution. On one CPU thread a generator training pass (16
  images, 64 px) measured 1.5x faster than bilinear upsampling followed by the convolution (the
  same family of functions). The tRGB skip path is upsampled bilinearly: the same filter, with
  clamped instead of zero edges.
- The leaky ReLU's ``sqrt(2)`` gain and the residual ``sqrt(1/2)`` are folded into weights,
  biases and demodulation coefficients, and demodulation, bias and noise are fused into two
  in-place ops: elementwise passes over big activations cost as much as the convolutions on a CPU.
- Downsampling in the discriminator is a 2x2 average pool followed by the convolution at the low
  resolution (a box instead of the binomial filter; the cost of a strided convolution).
- No activation clamping (the official code clamps for fp16); mixed precision here means bf16.

Layouts: ``z`` ``(N, z_dim)``, ``ws`` ``(N, num_ws, w_dim)``, images ``(N, 3, R, R)`` in [-1, 1].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import HubModel, register_model

NOISE_MODES = ("const", "random", "none")
_LRELU_GAIN = math.sqrt(2.0)


def _check_resolution(resolution: int, what: str) -> int:
    if not isinstance(resolution, int) or resolution < 8 or resolution > 1024 or resolution & (resolution - 1):
        raise ValueError(f"{what}: resolution must be a power of two from 8 to 1024, got {resolution!r}")
    return resolution


def channels_at(resolution: int, *, channel_base: int, channel_max: int) -> int:
    """Feature maps at one resolution: ``min(channel_base // resolution, channel_max)``, at least 1."""
    return max(1, min(channel_base // resolution, channel_max))


class EqualLinear(nn.Module):
    """Fully connected layer with the equalized learning rate and a learning-rate multiplier.

    The stored weight is ``N(0, 1) / lr_mul`` and is scaled by ``lr_mul / sqrt(in_features)`` in
    the forward pass, so Adam's step size on the effective weight is ``lr * lr_mul``. With
    ``activation`` the output goes through the leaky ReLU (slope 0.2) times ``sqrt(2)``.
    """

    def __init__(self, in_features: int, out_features: int, *, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul))
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The leaky ReLU is positively homogeneous, so its gain is folded into weight and bias.
        gain = _LRELU_GAIN if self.activation else 1.0
        x = F.linear(x, self.weight * (self.weight_gain * gain), self.bias * (self.lr_mul * gain))
        return F.leaky_relu(x, 0.2) if self.activation else x


class EqualConv2d(nn.Module):
    """Convolution with the equalized learning rate; ``down`` averages 2x2 pixels first.

    ``gain`` scales the output (folded into weight and bias, like the activation's gain).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, bias: bool = True,
                 activation: bool = True, down: bool = False, gain: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel * kernel)
        self.gain = gain * (_LRELU_GAIN if activation else 1.0)
        self.activation, self.down, self.padding = activation, down, kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = F.avg_pool2d(x, 2)
        bias = None if self.bias is None else self.bias * self.gain
        x = F.conv2d(x, self.weight * (self.weight_gain * self.gain), bias, padding=self.padding)
        return F.leaky_relu(x, 0.2, inplace=True) if self.activation else x


def binomial_filter() -> torch.Tensor:
    """The ``[1, 3, 3, 1]`` outer-product filter, normalised to sum 1: ``(1, 1, 4, 4)``."""
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    f = torch.outer(f, f)
    return (f / f.sum()).reshape(1, 1, 4, 4)


def modulated_conv2d(
    x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool = True,
    up_filter: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Convolve each sample with ``weight`` modulated by its style, without forming per-sample weights.

    x ``(N, I, H, W)``, weight ``(O, I, k, k)`` (raw; the equalized-lr scale is applied here),
    styles ``(N, I)``. With ``up_filter`` (:func:`binomial_filter`) the convolution is a stride-2
    transposed one followed by that filter (gain 4), giving ``(N, O, 2H, 2W)`` as in StyleGAN2;
    else ``(N, O, H, W)``. Returns the result and, with ``demodulate``, the coefficients ``(N, O)``
    the caller multiplies it by (left to the caller so it can fuse that product with the bias);
    without, ``None``.
    """
    n = x.shape[0]
    out_ch, in_ch, k, _ = weight.shape
    w = weight * (1.0 / math.sqrt(in_ch * k * k))
    x = x * styles.reshape(n, in_ch, 1, 1).to(x.dtype)
    if up_filter is not None:
        # an HxW map gives 2H+1 (k = 3); the 4-tap filter with one pixel of zero padding on each
        # side brings it to 2H (StyleGAN2's upfirdn padding for k = 3, up = 2)
        x = F.conv_transpose2d(x, w.transpose(0, 1).to(x.dtype), stride=2)
        blur = (up_filter * 4.0).to(x.dtype).expand(out_ch, 1, 4, 4)
        x = F.conv2d(F.pad(x, (1, 1, 1, 1)), blur, groups=out_ch)
    else:
        x = F.conv2d(x, w.to(x.dtype), padding=k // 2)
    if not demodulate:
        return x, None
    # sum_{i,kh,kw} (w[o,i] * s[i])^2 = (s^2) @ (sum_k w^2)^T: an (N, I) x (I, O) product
    d = (styles.float().square() @ w.float().square().sum((2, 3)).t() + 1e-8).rsqrt()
    return x, d


class SynthesisLayer(nn.Module):
    """Modulated, demodulated 3x3 convolution (+ optional 2x upsampling), noise, bias, leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, w_dim: int, resolution: int, up: bool = False,
                 use_noise: bool = True):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.use_noise = use_noise
        if use_noise:
            self.noise_strength = nn.Parameter(torch.zeros(()))
            # Fixed per-layer noise for noise_mode="const" (a projector may optimise it in place).
            self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.up, self.resolution = up, resolution
        if up:
            self.register_buffer("up_filter", binomial_filter(), persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor, *, noise_mode: str, generator: torch.Generator | None) -> torch.Tensor:
        n = x.shape[0]
        x, d = modulated_conv2d(x, self.weight, self.affine(w), up_filter=self.up_filter if self.up else None)
        # y = lrelu(d * conv + noise * strength + bias) * sqrt(2); the gain is folded into
        # d, strength and bias (lrelu is positively homogeneous), and the demodulation and the
        # bias are one fused op, so the big activations are touched three times, not seven.
        g = _LRELU_GAIN
        x = torch.addcmul((self.bias * g).to(x.dtype).reshape(1, -1, 1, 1), x, (d * g).to(x.dtype).reshape(n, -1, 1, 1))
        if not self.use_noise:
            noise = None
        elif noise_mode == "random":
            noise = torch.randn((n, 1, self.resolution, self.resolution), generator=generator,
                                device=x.device, dtype=torch.float32).to(x.dtype)
        elif noise_mode == "const":
            noise = self.noise_const.to(x.dtype).reshape(1, 1, self.resolution, self.resolution)
        else:
            noise = None
        if noise is not None:
            x = x.addcmul_(noise, (self.noise_strength * g).to(x.dtype))
        return F.leaky_relu(x, 0.2, inplace=True)


class ToRGB(nn.Module):
    """Modulated 1x1 convolution to RGB, without demodulation (the skip outputs)."""

    def __init__(self, in_channels: int, *, w_dim: int):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(3, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x, _ = modulated_conv2d(x, self.weight, self.affine(w), demodulate=False)
        return x + self.bias.to(x.dtype).reshape(1, 3, 1, 1)


INPUT_MODES = ("const", "mapped")


class SynthesisBlock(nn.Module):
    """One resolution: (upsampling conv,) conv, tRGB added to the upsampled image so far."""

    def __init__(self, in_channels: int, out_channels: int, *, w_dim: int, resolution: int, use_noise: bool = True,
                 input_mode: str = "const"):
        super().__init__()
        self.resolution = resolution
        self.first = resolution == 4
        self.mapped = self.first and input_mode == "mapped"
        if self.mapped:  # the 4x4 input is a linear function of the block's w
            self.input = EqualLinear(w_dim, out_channels * 16)
        elif self.first:
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=True,
                                        use_noise=use_noise)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution, use_noise=use_noise)
        self.torgb = ToRGB(out_channels, w_dim=w_dim)
        self.num_conv = 1 if self.first else 2

    def forward(self, x, img, ws: torch.Tensor, *, noise_mode: str, generator):
        # ws: (N, num_conv + 1, w_dim); the tRGB shares its w with the next block's first conv
        if self.first:
            x = (self.input(ws[:, 0]).reshape(ws.shape[0], -1, 4, 4) if self.mapped
                 else self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1))
            x = self.conv1(x, ws[:, 0], noise_mode=noise_mode, generator=generator)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode=noise_mode, generator=generator)
            x = self.conv1(x, ws[:, 1], noise_mode=noise_mode, generator=generator)
        y = self.torgb(x, ws[:, self.num_conv])
        if img is not None:
            img = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False)
            y = img + y.to(img.dtype)
        return x, y


class MappingNetwork(nn.Module):
    """``z`` ``(N, z_dim)`` -> ``ws`` ``(N, num_ws, w_dim)``, with truncation around ``w_avg``."""

    def __init__(self, *, z_dim: int, w_dim: int, num_ws: int, layers: int, lr_mul: float, w_avg_beta: float):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws, self.w_avg_beta = z_dim, w_dim, num_ws, w_avg_beta
        dims = [z_dim] + [w_dim] * layers
        self.layers = nn.ModuleList(
            EqualLinear(dims[i], dims[i + 1], lr_mul=lr_mul, activation=True) for i in range(layers)
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, *, truncation_psi: float = 1.0, truncation_cutoff: int | None = None) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"mapping expects z of shape (N, {self.z_dim}), got {tuple(z.shape)}")
        x = z * (z.square().mean(1, keepdim=True) + 1e-8).rsqrt()
        for layer in self.layers:
            x = layer(x)
        ws = x.unsqueeze(1).repeat(1, self.num_ws, 1)  # a real tensor: callers may edit layers in place
        if truncation_psi != 1.0:
            cutoff = self.num_ws if truncation_cutoff is None else int(truncation_cutoff)
            if not 0 <= cutoff <= self.num_ws:
                raise ValueError(f"truncation_cutoff must be in [0, {self.num_ws}], got {truncation_cutoff}")
            avg = self.w_avg.to(ws.dtype)
            ws = torch.cat([avg.lerp(ws[:, :cutoff], truncation_psi), ws[:, cutoff:]], dim=1)
        return ws

    @torch.no_grad()
    def update_w_avg(self, w_mean: torch.Tensor) -> None:
        """Move ``w_avg`` towards a batch mean ``(w_dim,)`` (decay ``w_avg_beta`` per call)."""
        self.w_avg.lerp_(w_mean.detach().to(self.w_avg.dtype), 1.0 - self.w_avg_beta)


class SynthesisNetwork(nn.Module):
    """``ws`` ``(N, num_ws, w_dim)`` -> images ``(N, 3, R, R)``."""

    def __init__(self, *, w_dim: int, resolution: int, channel_base: int, channel_max: int, noise_min_res: int = 0,
                 input_mode: str = "const"):
        super().__init__()
        self.w_dim, self.resolution = w_dim, resolution
        log2 = int(math.log2(resolution))
        self.block_resolutions = [2**i for i in range(2, log2 + 1)]
        ch = {r: channels_at(r, channel_base=channel_base, channel_max=channel_max) for r in self.block_resolutions}
        self.blocks = nn.ModuleList(
            SynthesisBlock(ch[r // 2] if r > 4 else 0, ch[r], w_dim=w_dim, resolution=r, use_noise=r >= noise_min_res,
                           input_mode=input_mode)
            for r in self.block_resolutions
        )
        self.num_ws = sum(b.num_conv for b in self.blocks) + 1

    def forward(self, ws: torch.Tensor, *, noise_mode: str = "const", generator: torch.Generator | None = None) -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"synthesis expects ws of shape (N, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {', '.join(NOISE_MODES)}, got {noise_mode!r}")
        x = img = None
        i = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, i : i + block.num_conv + 1], noise_mode=noise_mode, generator=generator)
            i += block.num_conv
        return img


@register_model("stylegan2")
class StyleGAN2Generator(
    HubModel,
    tags=["stylegan2", "unconditional-image-generation"],
    pipeline_tag="unconditional-image-generation",
    paper_url="https://arxiv.org/abs/1912.04958",
):
    """StyleGAN2 generator with the skip (tRGB) architecture.

    Args:
        z_dim: size of the input latent ``z``.
        w_dim: size of the intermediate latent ``w`` (and of the styles' input).
        resolution: output side, a power of two from 8 to 1024 (the issue's range is 64..1024;
            8..32 are for tests and quick experiments).
        channel_base, channel_max: feature maps at resolution ``r`` are
            ``min(channel_base // r, channel_max)``. The default is StyleGAN2-ADA's 256 px
            configuration (512 maps up to 32 px, 64 at 256 px); the official 1024 px models use
            ``channel_base=32768``.
        mapping_layers: depth of the mapping MLP (8 in the paper, 2 in StyleGAN2-ADA's small-data
            configurations).
        mapping_lr_mul: learning-rate multiplier of the mapping layers.
        w_avg_beta: decay of the tracked average ``w`` per training step.
        noise_min_res: layers below this resolution get no per-pixel noise input (0: every layer,
            as in the paper). Against a discriminator that judges local patches (the projected
            one), noise at the coarse layers is the easy way to make varied blobs, and the
            generator learned to draw its whole layout from it, leaving ``w`` only the colours:
            useless for projection and walks. Without coarse noise the layout has to come from ``w``.
        input_mode: ``"const"`` (the paper: the 4x4 input is one learned tensor, and the layout
            must be made from it by style-modulated convolutions) or ``"mapped"`` (the 4x4 input is
            a linear function of the first ``w``, as in GANs before StyleGAN and in FastGAN, so ``w``
            places the coarse layout directly). Measured worse than ``"const"`` in a 64 px projected
            run (the ghibli-stylegan2 card); kept for experiments.
    """

    def __init__(
        self,
        *,
        z_dim: int = 512,
        w_dim: int = 512,
        resolution: int = 256,
        channel_base: int = 16384,
        channel_max: int = 512,
        mapping_layers: int = 8,
        mapping_lr_mul: float = 0.01,
        w_avg_beta: float = 0.995,
        noise_min_res: int = 0,
        input_mode: str = "const",
    ):
        super().__init__()
        _check_resolution(resolution, "StyleGAN2Generator")
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {', '.join(INPUT_MODES)}, got {input_mode!r}")
        if min(z_dim, w_dim, channel_base, channel_max, mapping_layers) < 1:
            raise ValueError(
                "z_dim, w_dim, channel_base, channel_max and mapping_layers must be positive, got "
                f"{z_dim}, {w_dim}, {channel_base}, {channel_max}, {mapping_layers}"
            )
        if not 0.0 <= w_avg_beta < 1.0 or mapping_lr_mul <= 0:
            raise ValueError(f"need 0 <= w_avg_beta < 1 and mapping_lr_mul > 0, got {w_avg_beta}, {mapping_lr_mul}")
        if not isinstance(noise_min_res, int) or noise_min_res < 0:
            raise ValueError(f"noise_min_res must be a resolution >= 0, got {noise_min_res!r}")
        self.z_dim, self.w_dim, self.resolution = z_dim, w_dim, resolution
        self.synthesis = SynthesisNetwork(w_dim=w_dim, resolution=resolution, channel_base=channel_base,
                                          channel_max=channel_max, noise_min_res=noise_min_res, input_mode=input_mode)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, w_dim=w_dim, num_ws=self.num_ws, layers=mapping_layers,
                                      lr_mul=mapping_lr_mul, w_avg_beta=w_avg_beta)

    def forward(
        self,
        z: torch.Tensor,
        *,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        noise_mode: str = "const",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``z`` ``(N, z_dim)`` -> images ``(N, 3, R, R)`` roughly in [-1, 1].

        ``generator`` draws the per-pixel noise when ``noise_mode="random"``.
        """
        ws = self.mapping(z, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, generator=generator)


class DiscriminatorBlock(nn.Module):
    """Residual block: conv, downsampling conv, plus a downsampled 1x1 skip; halves the side."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        # the residual sum is scaled by sqrt(1/2) (folded into both branches' weights)
        self.conv0 = EqualConv2d(in_channels, in_channels, 3)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, down=True, gain=math.sqrt(0.5))
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, activation=False, down=True,
                                gain=math.sqrt(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x).add_(self.conv1(self.conv0(x)))


def minibatch_stddev(x: torch.Tensor, group_size: int, channels: int = 1) -> torch.Tensor:
    """Append the standard deviation over groups of samples as extra feature maps.

    Groups are ``group_size`` samples (the largest divisor of N not above it), taken with a
    stride of ``N / group_size`` as in StyleGAN2; ``channels`` splits the features into that
    many parts, each averaged to one map. ``(N, C, H, W)`` -> ``(N, C + channels, H, W)``.
    """
    n, c, h, w = x.shape
    g = min(group_size, n)
    while n % g:
        g -= 1
    y = x.float().reshape(g, n // g, channels, c // channels, h, w)
    y = (y - y.mean(0)).square().mean(0)
    y = (y + 1e-8).sqrt().mean((2, 3, 4))  # (N/g, channels)
    y = y.reshape(n // g, channels, 1, 1).repeat(g, 1, h, w).to(x.dtype)
    return torch.cat([x, y], dim=1)


@register_model("stylegan2-discriminator")
class StyleGAN2Discriminator(HubModel):
    """StyleGAN2 residual discriminator: images ``(N, 3, R, R)`` in [-1, 1] -> logits ``(N, 1)``.

    Args:
        resolution: input side (a power of two from 8 to 1024).
        channel_base, channel_max: feature maps at resolution ``r`` are
            ``min(channel_base // r, channel_max)`` (as for the generator).
        mbstd_group: samples per minibatch-stddev group (4 in the paper).
        mbstd_channels: feature groups of the minibatch-stddev layer (1 in the paper).
    """

    def __init__(
        self,
        *,
        resolution: int = 256,
        channel_base: int = 16384,
        channel_max: int = 512,
        mbstd_group: int = 4,
        mbstd_channels: int = 1,
    ):
        super().__init__()
        _check_resolution(resolution, "StyleGAN2Discriminator")
        if min(channel_base, channel_max, mbstd_group, mbstd_channels) < 1:
            raise ValueError("channel_base, channel_max, mbstd_group and mbstd_channels must be positive")
        ch = lambda r: channels_at(r, channel_base=channel_base, channel_max=channel_max)  # noqa: E731
        if ch(4) % mbstd_channels:
            raise ValueError(f"mbstd_channels ({mbstd_channels}) must divide the 4x4 feature maps ({ch(4)})")
        self.resolution, self.mbstd_group, self.mbstd_channels = resolution, mbstd_group, mbstd_channels
        self.from_rgb = EqualConv2d(3, ch(resolution), 1)
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(ch(r), ch(r // 2)) for r in (2**i for i in range(int(math.log2(resolution)), 2, -1))
        )
        self.conv = EqualConv2d(ch(4) + mbstd_channels, ch(4), 3)
        self.fc = EqualLinear(ch(4) * 16, ch(4), activation=True)
        self.out = EqualLinear(ch(4), 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.ndim != 4 or img.shape[1:] != (3, self.resolution, self.resolution):
            raise ValueError(
                f"discriminator expects images of shape (N, 3, {self.resolution}, {self.resolution}), got {tuple(img.shape)}"
            )
        x = self.from_rgb(img)
        for block in self.blocks:
            x = block(x)
        x = self.conv(minibatch_stddev(x, self.mbstd_group, self.mbstd_channels))
        return self.out(self.fc(x.flatten(1)))
