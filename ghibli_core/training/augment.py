"""Differentiable augmentation for GAN training on small data sets.

The discriminator sees only augmented images (real and generated alike), and the generator's
gradient flows back through the augmentation, so D cannot memorise the few real images while G
still learns the un-augmented distribution. Two policies:

- ``ada`` (Karras et al. 2020, "Training GANs with limited data"): each transform of the "bgc"
  pipeline is applied to each image with probability ``p``, which an :class:`AdaptiveAugment`
  controller raises while the discriminator overfits. The overfitting heuristic is
  ``r_t = E[sign(D(real))]``: 0 when D cannot tell the reals from the fakes, 1 when it is sure of
  every real. Every ``interval`` steps, ``p`` moves by ``sign(r_t - target) * images / (kimg * 1000)``
  (target 0.6), so ``p`` can go from 0 to 1 in ``kimg`` thousand images. Because every
  transform is applied with probability below 1 the generator cannot learn to produce augmented
  images ("non-leaking" for p below about 0.8).
  - blit: horizontal flip, rotation by a multiple of 90 degrees, integer translation (up to 1/8);
  - geometric: isotropic scaling (log-normal, std 0.2 log 2), arbitrary rotation (once, where
    the official pipeline splits it in two around the anisotropic scaling), anisotropic
    scaling, fractional translation (std 1/8); composed into one affine map per image and applied
    with bilinear ``grid_sample`` and reflection padding (the official pipeline resamples at 2x
    with a wide filter; this is cheaper and slightly blurrier);
  - colour: brightness (+N(0, 0.2)), contrast (x log-normal, std 0.5 log 2), luma flip, hue
    rotation (uniform), saturation (x log-normal, std log 2); composed into one 4x4 matrix per image.
- ``diffaugment`` (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN
  Training"), policy "color,translation,cutout" applied to every image: random brightness,
  saturation and contrast, a translation by up to 1/8 with zero padding, and a cutout of half the
  side; ``diffaugment-nocolour`` keeps the translation and cutout only, for a discriminator that
  must see colour (a projected one's ImageNet features are trained to ignore much of it already).

All randomness comes from a ``torch.Generator`` passed to each call (the trainer derives one per
step), so a run resumes exactly. Images are ``(N, 3, H, W)`` in [-1, 1] (any float dtype);
outputs have the same shape and dtype and are not clamped.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

POLICIES = ("ada", "fixed", "diffaugment", "diffaugment-nocolour", "none")

# The "bgc" transforms and their strengths (StyleGAN2-ADA's defaults).
ADA_TRANSFORMS = (
    "xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac",
    "brightness", "contrast", "lumaflip", "hue", "saturation",
)
_XINT_MAX = 0.125
_SCALE_STD = 0.2 * math.log(2)
_ROTATE_MAX = math.pi
_ANISO_STD = 0.2 * math.log(2)
_XFRAC_STD = 0.125
_BRIGHTNESS_STD = 0.2
_CONTRAST_STD = 0.5 * math.log(2)
_HUE_MAX = math.pi
_SATURATION_STD = math.log(2)


def _check_images(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"augmentation expects float images of shape (N, 3, H, W), got {tuple(x.shape)} {x.dtype}")


def _rand(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _randn(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n, generator=generator, dtype=torch.float64)


def _gate(p: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """1.0 where the transform applies (probability p), 0.0 elsewhere; ``(n,)`` float64."""
    return (_rand(n, generator) < p).double()


def _translate2(tx, ty):
    m = torch.eye(3, dtype=torch.float64).repeat(len(tx), 1, 1)
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def _scale2(sx, sy):
    m = torch.eye(3, dtype=torch.float64).repeat(len(sx), 1, 1)
    m[:, 0, 0], m[:, 1, 1] = sx, sy
    return m


def _rotate2(theta):
    m = torch.eye(3, dtype=torch.float64).repeat(len(theta), 1, 1)
    c, s = torch.cos(theta), torch.sin(theta)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = c, -s, s, c
    return m


def geometric_matrices(n: int, p: float, generator: torch.Generator, *, size: int) -> torch.Tensor:
    """Per-image 3x3 matrices mapping output to input coordinates in [-1, 1] (``(n, 3, 3)`` float64).

    Every transform is drawn for every image (so the random stream does not depend on ``p``) and
    applied where its own coin lands below ``p``.
    """
    m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    # blit: x-flip, quarter turns, integer translation (rounded to whole pixels)
    g = _gate(p, n, generator)
    flip = torch.floor(_rand(n, generator) * 2)
    m = m @ _scale2(1 - 2 * flip * g, torch.ones(n, dtype=torch.float64))
    g = _gate(p, n, generator)
    quarter = torch.floor(_rand(n, generator) * 4)
    m = m @ _rotate2(quarter * (math.pi / 2) * g)
    g = _gate(p, n, generator)
    t = (_rand(2 * n, generator).reshape(2, n) * 2 - 1) * _XINT_MAX
    t = torch.round(t * size) * (2 / size)  # whole pixels; [-1, 1] spans `size` pixels
    m = m @ _translate2(t[0] * g, t[1] * g)
    # geometric: isotropic scale, rotation, anisotropic scale, fractional translation
    g = _gate(p, n, generator)
    s = torch.exp2(_randn(n, generator) * (_SCALE_STD / math.log(2)) * g)
    m = m @ _scale2(s, s)
    g = _gate(p, n, generator)
    theta = (_rand(n, generator) * 2 - 1) * _ROTATE_MAX * g
    m = m @ _rotate2(theta)
    g = _gate(p, n, generator)
    s = torch.exp2(_randn(n, generator) * (_ANISO_STD / math.log(2)) * g)
    m = m @ _scale2(s, 1 / s)
    g = _gate(p, n, generator)
    t = _randn(2 * n, generator).reshape(2, n) * _XFRAC_STD * 2  # std 1/8 of the side = 1/4 in [-1, 1]
    m = m @ _translate2(t[0] * g, t[1] * g)
    return m


_LUMA = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(3)


def colour_matrices(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image 4x4 matrices acting on homogeneous RGB ``[r, g, b, 1]`` (``(n, 4, 4)`` float64)."""
    eye = torch.eye(4, dtype=torch.float64)
    c = eye.repeat(n, 1, 1)
    v = _LUMA
    vv = torch.outer(v, v)
    # brightness: add
    g = _gate(p, n, generator)
    b = _randn(n, generator) * _BRIGHTNESS_STD * g
    t = eye.repeat(n, 1, 1)
    t[:, :3, 3] = b[:, None]
    c = t @ c
    # contrast: scale around 0 (mid-grey in [-1, 1])
    g = _gate(p, n, generator)
    k = torch.exp2(_randn(n, generator) * (_CONTRAST_STD / math.log(2)) * g)
    s = eye.repeat(n, 1, 1)
    s[:, 0, 0] = s[:, 1, 1] = s[:, 2, 2] = k
    c = s @ c
    # luma flip: mirror along the grey axis
    g = _gate(p, n, generator)
    i = torch.floor(_rand(n, generator) * 2) * g
    c = (eye - 2 * vv * i[:, None, None]) @ c
    # hue: rotate around the grey axis
    g = _gate(p, n, generator)
    theta = (_rand(n, generator) * 2 - 1) * _HUE_MAX * g
    c = _rotate_about(v[:3], theta) @ c
    # saturation: scale the distance from the grey axis
    g = _gate(p, n, generator)
    k = torch.exp2(_randn(n, generator) * (_SATURATION_STD / math.log(2)) * g)
    c = (vv + (eye - vv) * k[:, None, None]) @ c
    return c


def _rotate_about(axis: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    # Rodrigues' formula for a unit axis, as 4x4 homogeneous matrices (n, 4, 4)
    x, y, z = axis.tolist()
    k = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=torch.float64)
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    r = torch.eye(3, dtype=torch.float64) + s * k + (1 - c) * (k @ k)
    m = torch.eye(4, dtype=torch.float64).repeat(len(theta), 1, 1)
    m[:, :3, :3] = r
    return m


def ada_augment(x: torch.Tensor, p: float, *, generator: torch.Generator) -> torch.Tensor:
    """Apply the "bgc" transforms, each with probability ``p``, differentiably.

    ``generator`` is a CPU ``torch.Generator`` (the parameters are drawn on the CPU, so the
    same seed gives the same augmentation on any device). ``p = 0`` returns ``x`` itself.
    """
    _check_images(x)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augmentation probability must be in [0, 1], got {p}")
    if p == 0.0:
        return x
    n, _, h, w = x.shape
    if h != w:
        raise ValueError(f"augmentation expects square images, got {h}x{w}")
    eye3, eye4 = torch.eye(3, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    geom = geometric_matrices(n, p, generator, size=h)
    colour = colour_matrices(n, p, generator)
    # 1. Geometry, only for the images that drew a non-identity map (the others stay bit-exact).
    moved = (geom != eye3).flatten(1).any(1)
    if bool(moved.any()):
        theta = geom[:, :2, :].to(device=x.device, dtype=torch.float32)
        grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
        warped = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        x = torch.where(moved.to(x.device).reshape(n, 1, 1, 1), warped.to(x.dtype), x)
    # 2. Colour, likewise.
    changed = (colour != eye4).flatten(1).any(1)
    if bool(changed.any()):
        cm = colour.to(device=x.device, dtype=torch.float32)
        flat = x.float().reshape(n, 3, h * w)
        recoloured = (cm[:, :3, :3] @ flat + cm[:, :3, 3:]).reshape(n, 3, h, w)
        x = torch.where(changed.to(x.device).reshape(n, 1, 1, 1), recoloured.to(x.dtype), x)
    return x


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur ``(N, C, H, W)`` images with a Gaussian of ``sigma`` pixels (separable, reflection padding).

    The kernel reaches ``ceil(3 * sigma)`` pixels each side (clipped to ``side - 1``, what reflection
    padding allows) and is normalised to sum to one, so flat images stay flat. ``sigma <= 0`` returns
    ``x`` itself. Differentiable; used to show a discriminator only the coarse content of the images
    early in training (StyleGAN3 / StyleGAN-XL's ``blur_init_sigma``).
    """
    if sigma <= 0:
        return x
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"gaussian_blur expects float images of shape (N, C, H, W), got {tuple(x.shape)} {x.dtype}")
    radius = min(math.ceil(3 * sigma), x.shape[2] - 1, x.shape[3] - 1)
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(device=x.device, dtype=x.dtype)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def diff_augment(x: torch.Tensor, *, generator: torch.Generator, colour: bool = True) -> torch.Tensor:
    """DiffAugment "color,translation,cutout" on every image (see the module docstring).

    The ranges are those of the authors' StyleGAN2 code, which also works on [-1, 1] images:
    brightness + U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5); translation by up
    to 1/8 of the side with zero padding; one zeroed square of half the side. ``colour=False``
    skips the colour step (for discriminators that must judge colour: it is part of a style).
    """
    _check_images(x)
    n, _, h, w = x.shape
    dev = x.device

    def r(*shape):
        return torch.rand(shape, generator=generator, dtype=torch.float32).to(dev)

    y = x.float()
    # 1. colour
    if colour:
        y = y + (r(n, 1, 1, 1) - 0.5)
        mean = y.mean(dim=1, keepdim=True)
        y = (y - mean) * (r(n, 1, 1, 1) * 2) + mean
        mean = y.mean(dim=(1, 2, 3), keepdim=True)
        y = (y - mean) * (r(n, 1, 1, 1) + 0.5) + mean
    # 2. translation: gather from a zero-padded copy
    sy, sx = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
    ty = (r(n) * (2 * sy + 1)).long().clamp(max=2 * sy) - sy
    tx = (r(n) * (2 * sx + 1)).long().clamp(max=2 * sx) - sx
    padded = F.pad(y, (sx, sx, sy, sy))
    rows = torch.arange(h, device=dev)[None, :] + sy - ty[:, None]  # (n, h)
    cols = torch.arange(w, device=dev)[None, :] + sx - tx[:, None]  # (n, w)
    batch = torch.arange(n, device=dev)[:, None, None]
    y = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    # 3. cutout: a square of half the side centred anywhere in the image
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    y0 = (r(n) * (h + 1 - ch % 2)).long() - ch // 2
    x0 = (r(n) * (w + 1 - cw % 2)).long() - cw // 2
    yy = torch.arange(h, device=dev)[None, :, None] - y0[:, None, None]
    xx = torch.arange(w, device=dev)[None, None, :] - x0[:, None, None]
    inside = (yy >= 0) & (yy < ch) & (xx >= 0) & (xx < cw)
    y = y * (~inside).unsqueeze(1).to(y.dtype)
    return y.to(x.dtype)


class AdaptiveAugment:
    """The augmentation policy and, for ``ada``, its adaptive probability (checkpointed state).

    Args:
        policy: ``"ada"`` (adaptive ``p``), ``"fixed"`` (the ADA transforms at a constant ``p``),
            ``"diffaugment"``, ``"diffaugment-nocolour"`` (translation and cutout) or ``"none"``.
        p: the initial (``ada``) or constant (``fixed``) probability.
        target: the ``r_t`` the controller aims for (0.6 in the paper).
        interval: steps between adjustments (4 in the paper).
        kimg: thousands of images over which ``p`` can move by 1 (500 in the paper, which
            suits long GPU runs; short CPU runs need a faster controller).

    Call :meth:`__call__` on every image the discriminator sees, :meth:`accumulate` with the
    discriminator's logits on augmented reals (already summed over processes), and
    :meth:`step` once per training step.
    """

    def __init__(self, policy: str = "ada", *, p: float = 0.0, target: float = 0.6, interval: int = 4,
                 kimg: float = 100.0):
        if policy not in POLICIES:
            raise ValueError(f"augmentation policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augmentation probability must be in [0, 1], got {p}")
        if interval < 1 or kimg <= 0 or not 0.0 < target < 1.0:
            raise ValueError(f"need interval >= 1, kimg > 0 and 0 < target < 1, got {interval}, {kimg}, {target}")
        self.policy, self.p, self.target, self.interval, self.kimg = policy, float(p), target, interval, kimg
        self.sign_sum = 0.0  # sum of sign(D(real)) since the last adjustment (all processes)
        self.count = 0  # how many logits that sum holds
        self.last_rt: float | None = None

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """Augment ``(N, 3, H, W)`` images in [-1, 1]; ``generator`` is a CPU ``torch.Generator``."""
        if self.policy in ("ada", "fixed"):
            return ada_augment(x, self.p, generator=generator)
        if self.policy in ("diffaugment", "diffaugment-nocolour"):
            return diff_augment(x, generator=generator, colour=self.policy == "diffaugment")
        return x

    @property
    def adaptive(self) -> bool:
        return self.policy == "ada"

    def accumulate(self, sign_sum: float, count: int) -> None:
        """Add ``sum(sign(D(real)))`` over ``count`` reals (the sums over every process)."""
        self.sign_sum += float(sign_sum)
        self.count += int(count)

    def step(self, step: int, *, batch_images: int) -> None:
        """After training step ``step`` (1-based): every ``interval`` steps adjust ``p``.

        ``batch_images``: real images shown per step over all processes.
        """
        if not self.adaptive or step % self.interval or self.count == 0:
            return
        self.last_rt = self.sign_sum / self.count
        sign = (self.last_rt > self.target) - (self.last_rt < self.target)
        adjust = sign * batch_images * self.interval / (self.kimg * 1000)
        self.p = min(1.0, max(0.0, self.p + adjust))
        self.sign_sum, self.count = 0.0, 0

    def state_dict(self) -> dict:
        return {"policy": self.policy, "p": self.p, "target": self.target, "interval": self.interval,
                "kimg": self.kimg, "sign_sum": self.sign_sum, "count": self.count,
                "last_rt": self.last_rt}

    def load_state_dict(self, state: dict) -> None:
        self.policy = str(state["policy"])
        self.p = float(state["p"])
        self.target, self.interval, self.kimg = float(state["target"]), int(state["interval"]), float(state["kimg"])
        self.sign_sum, self.count = float(state["sign_sum"]), int(state["count"])
        self.last_rt = None if state.get("last_rt") is None else float(state["last_rt"])
