"""Teacher-student training: a fast generator learns from teacher outputs and from real Ghibli frames.

Unpaired CycleGAN from scratch learns too slowly on a CPU. Here a pretrained teacher (any
image model: a converted anchor such as CartoonGAN, the diffusion backend on a GPU, a better
future default) turns every training photo into a pseudo-target once, and a small student
generator learns from:

- the teacher: L1 to its output (``l1_weight``) and an L1 distance of VGG features
  (``vgg_weight``, at ``vgg_layer``), on the same random crops of photo and target;
- real Ghibli frames, through an adversarial term (``adv_weight``): the teacher has flaws a
  person sees (colour shifts, artefacts at frame edges) and copying it caps the student near
  it; the discriminator sees only real frames as "real". Two discriminators are offered:
  ``"vgg"`` (light heads on the frozen VGG's relu1_1 / relu2_1 / relu3_1 features, in the spirit
  of projected / vision-aided GANs, which learn from few images fast; it reads the features
  of the student's perceptual-loss pass, unaugmented) and ``"patch"`` (the 70x70 PatchGAN on
  pixels, through DiffAugment translation + cutout on both sides). Hinge loss;
- optionally CartoonGAN's edge-smoothed negatives (``edge_weight``): real frames whose edges
  are blurred are shown to the discriminator as fakes, so crisp outlines count as the style;
- optionally a low-frequency colour term to the *photo* (``photo_colour_weight``): chroma of
  8x-downscaled output against the input's, against colour casts the teacher or the
  adversarial term bring in;
- optionally a low-frequency brightness term to the *teacher* (``teacher_luma_weight``): luma of
  the 8x-downscaled output against the target's. It leaves outlines and texture to the
  adversarial term and holds where light and dark lie, against the dark blobs an adversarial
  term can grow in shadows (a black cat, a dark rock turning into a flat black patch).

The teacher runs once per photo and scale (``teacher_sizes``, short sides), not every step:
its outputs are cached as ``.npy`` files (uint8, no pickles) keyed by the photo file, the
scale and the teacher's identity, so they outlive a run folder and can be made on a GPU and
reused on a CPU (``teacher_cache``).

Run folder layout::

    OUT/train_config.json       the config (checked on --resume)
    OUT/log.jsonl               losses per logged step, in-run KID
    OUT/previews/step-N.png     photo | teacher | student for fixed photos
    OUT/checkpoints/step-N/     accelerate save_state (exact resume)
    OUT/generator/              the EMA student (safetensors + config.json)
    OUT/generator-best/         the EMA student with the lowest in-run KID, scores.json
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from PIL import Image
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from tqdm.auto import tqdm

from ..data.datasets import ImageSet, StepBatches, mix_seed, resize_short_side, select_images
from ..imaging import center_crop_resize, load_image, to_tensor
from ..models.cyclegan import PatchDiscriminator, ResnetGenerator, init_weights
from ..models.perceptual import VGGFeatures
from ..models.style_net import StyleNet, init_style_net
from .augment import diff_augment
from .common import (
    EMA,
    JsonlLog,
    LossMeans,
    TrainState,
    average_gradients,
    export_network,
    linear_decay,
    load_latest_checkpoint,
    set_scheduled_learning_rates,
    make_accelerator,
    open_run_folder,
    parameters_in_sync,
    save_checkpoint,
    save_grid,
    set_requires_grad,
)

ARCH_FIELDS = ("student", "width", "n_blocks", "upsample", "kernel", "shuffle", "discriminator", "disc_width")
STUDENTS = ("resnet", "style-net")
DISCRIMINATORS = ("vgg", "patch")
FEATURE_LAYERS = ("relu1_1", "relu2_1", "relu3_1")

Teacher = Callable[[list[Image.Image]], list[Image.Image]]


@dataclass
class DistillConfig:
    """Everything a distillation run needs; JSON-able and saved with the run.

    ``photos`` and ``frames`` are folders (``*_include``/``*_exclude`` globs as for ``train
    cyclegan``: exclude held-out films from ``frames``); ``teacher`` a model spec or another
    description of the teacher (recorded, and part of the cache key); ``vgg`` the loss
    network's weights (recorded for the card).
    """

    photos: list[str]
    frames: list[str]
    teacher: str
    vgg: str
    out: str
    photos_include: list[str] = field(default_factory=list)
    photos_exclude: list[str] = field(default_factory=list)
    frames_include: list[str] = field(default_factory=list)
    frames_exclude: list[str] = field(default_factory=list)
    teacher_cache: str | None = None  # default OUT/teacher_cache
    init: str | None = None  # start the student from this model spec (same architecture)
    init_blocks: list[int] | None = None  # of a deeper ResNet --init, the residual blocks kept, in order
    # student: "resnet" (the CycleGAN ResNet generator: width, n_blocks, upsample) or "style-net"
    # (the fast video network: width, n_blocks, kernel, shuffle)
    student: str = "resnet"
    width: int = 32
    n_blocks: int = 6
    upsample: str = "resize"
    kernel: int = 9
    shuffle: bool = False
    # discriminator
    discriminator: str = "vgg"
    disc_width: int = 64
    # data
    teacher_sizes: list[int] = field(default_factory=lambda: [256, 384])  # photo short sides
    frames_size: int = 256  # frames' short side before cropping
    crop_size: int = 128
    border: int = 8  # crops keep this far from the photo's edges, where teachers often fail
    batch_size: int = 4
    # losses
    l1_weight: float = 1.0
    vgg_weight: float = 1.0
    vgg_layer: str = "relu3_1"
    adv_weight: float = 0.1
    adv_start: int = 0  # steps of pure distillation before the adversarial term starts
    edge_weight: float = 0.0
    photo_colour_weight: float = 0.0
    teacher_luma_weight: float = 0.0
    teacher_recolour: float = 0.0  # share of the teacher's low-frequency chroma replaced by the photo's
    # optimisation
    steps: int = 3000
    decay_steps: int = 1000
    lr: float = 2e-4
    lr_d: float = 2e-4
    ema_decay: float = 0.999
    mixed_precision: str = "auto"
    seed: int = 0
    # bookkeeping
    log_every: int = 50
    preview_every: int = 250
    save_every: int = 250
    keep_checkpoints: int = 2
    eval_every: int = 500
    num_previews: int = 4

    def __post_init__(self) -> None:
        if self.student not in STUDENTS:
            raise ValueError(f"student must be one of {STUDENTS}, got {self.student!r}")
        if self.discriminator not in DISCRIMINATORS:
            raise ValueError(f"discriminator must be one of {DISCRIMINATORS}, got {self.discriminator!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps} and {self.batch_size}")
        if not 0 <= self.decay_steps <= self.steps:
            raise ValueError(f"decay_steps must be in [0, steps={self.steps}], got {self.decay_steps}")
        if self.crop_size < 16 or self.crop_size % ResnetGenerator.stride:
            raise ValueError(f"crop_size must be a multiple of {ResnetGenerator.stride} and at least 16, got {self.crop_size}")
        if not self.teacher_sizes or min(self.teacher_sizes) < self.crop_size + 2 * self.border:
            raise ValueError(
                f"teacher_sizes {self.teacher_sizes} must be at least crop_size + 2 * border = "
                f"{self.crop_size + 2 * self.border}"
            )
        if self.frames_size < self.crop_size:
            raise ValueError(f"frames_size ({self.frames_size}) must be at least crop_size ({self.crop_size})")
        for name in ("l1_weight", "vgg_weight", "adv_weight", "edge_weight", "photo_colour_weight",
                     "teacher_luma_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.init_blocks is not None:
            if self.student != "resnet" or self.init is None:
                raise ValueError("init_blocks picks residual blocks of a deeper ResNet --init: use it with --student resnet and --init")
            if len(self.init_blocks) != self.n_blocks:
                raise ValueError(f"init_blocks names {len(self.init_blocks)} blocks for a {self.n_blocks}-block student")
        if not 0 <= self.teacher_recolour <= 1:
            raise ValueError(f"teacher_recolour must be in [0, 1], got {self.teacher_recolour}")
        if self.edge_weight > 0 and self.adv_weight == 0:
            raise ValueError("edge_weight needs the adversarial term (adv_weight > 0)")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


# -- teacher outputs, once --------------------------------------------------------------------
def _cache_key(path: Path, size: int, teacher_id: str) -> str:
    st = path.stat()
    text = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{size}|{teacher_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def teacher_pairs(
    paths: Sequence[Path],
    teacher: Teacher,
    *,
    sizes: Sequence[int],
    cache_dir: Path,
    teacher_id: str,
    progress: bool = True,
) -> list[np.ndarray]:
    """``(H, W, 6)`` uint8 arrays: each photo at each short side in ``sizes``, beside the teacher's output.

    Outputs are cached in ``cache_dir`` (one ``.npy`` per photo and size, read without pickles);
    ``teacher_id`` names the teacher in the cache key, so another teacher never reuses them.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    todo = [(p, s) for p in paths for s in sizes]
    for path, size in tqdm(todo, desc="teacher outputs", unit="img", disable=not progress):
        file = cache_dir / f"{_cache_key(Path(path), size, teacher_id)}.npy"
        if file.is_file():
            pair = np.load(file, allow_pickle=False)
        else:
            photo = resize_short_side(load_image(path), size)
            (target,) = teacher([photo])
            if target.size != photo.size:
                raise ValueError(f"the teacher returned {target.size} for a {photo.size} photo ({path})")
            pair = np.concatenate([np.asarray(photo), np.asarray(target.convert("RGB"))], axis=2)
            tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, pair, allow_pickle=False)
            tmp.replace(file)
        pairs.append(pair)
    return pairs


def recolour_target(pair: np.ndarray, strength: float) -> np.ndarray:
    """A ``(H, W, 6)`` pair whose teacher half takes ``strength`` of the photo's low-frequency chroma.

    In YCrCb, the teacher's luma and fine chroma stay; its chroma blurred at a scale of 1/32 of
    the short side (the colour of regions: a sky, a floor) moves ``strength`` of the way to the
    photo's, blurred the same way. A teacher that turns a blue sky red or a floor purple then
    teaches its drawing without its colour casts, and the student gets one consistent target
    instead of two losses pulling its colours apart.
    """
    if strength <= 0:
        return pair
    photo, target = pair[..., :3], pair[..., 3:]
    sigma = min(pair.shape[:2]) / 32
    yp = cv2.cvtColor(np.ascontiguousarray(photo), cv2.COLOR_RGB2YCrCb).astype(np.float32)
    yt = cv2.cvtColor(np.ascontiguousarray(target), cv2.COLOR_RGB2YCrCb).astype(np.float32)
    low = lambda a: cv2.GaussianBlur(a, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)  # noqa: E731
    yt[..., 1:] += strength * (low(yp[..., 1:]) - low(yt[..., 1:]))
    out = cv2.cvtColor(np.clip(yt, 0, 255).round().astype(np.uint8), cv2.COLOR_YCrCb2RGB)
    return np.concatenate([photo, out], axis=2)


def edge_smoothed(img: np.ndarray) -> np.ndarray:
    """CartoonGAN's negative: a uint8 HWC image with the pixels around its edges blurred."""
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    edges = cv2.dilate(cv2.Canny(gray, 100, 200), np.ones((5, 5), np.uint8)) > 0
    blurred = cv2.GaussianBlur(img, (5, 5), 0)
    out = img.copy()
    out[edges] = blurred[edges]
    return out


class DistillCrops(torch.utils.data.Dataset):
    """Sample ``k`` -> (photo crop, teacher crop, frame crop, edge-smoothed frame crop), fixed by ``(seed, k)``.

    Photo and teacher crops come from the same place of one ``(H, W, 6)`` pair, at least
    ``border`` pixels inside its edges, flipped together; pairs are walked in a fresh seeded
    permutation each epoch. Each tensor is ``(3, crop, crop)`` float32 in [-1, 1].
    """

    def __init__(self, pairs: list[np.ndarray], frames: ImageSet, *, crop: int, border: int, seed: int):
        self.pairs, self.frames, self.crop, self.border, self.seed = pairs, frames, crop, border, seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def _crop(self, img: np.ndarray, g: torch.Generator, border: int) -> np.ndarray:
        h, w = img.shape[:2]
        c = self.crop
        top = border + int(torch.randint(0, h - c - 2 * border + 1, (1,), generator=g))
        left = border + int(torch.randint(0, w - c - 2 * border + 1, (1,), generator=g))
        patch = img[top : top + c, left : left + c]
        return patch[:, ::-1] if bool(torch.rand((), generator=g) < 0.5) else patch

    def __getitem__(self, k: int) -> tuple[torch.Tensor, ...]:
        n = len(self.pairs)
        epoch = k // n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch, 201))))
        g = torch.Generator().manual_seed(mix_seed(self.seed, k, 202))
        pair = self._crop(self.pairs[int(self._perm[1][k % n])], g, self.border)
        frame = self._crop(self.frames[int(torch.randint(0, len(self.frames), (1,), generator=g))], g, 0)
        frame = np.ascontiguousarray(frame)
        t = lambda a: to_tensor(np.ascontiguousarray(a))[0]  # noqa: E731
        return t(pair[..., :3]), t(pair[..., 3:]), t(frame), t(edge_smoothed(frame))


# -- discriminators ---------------------------------------------------------------------------
class VGGFeatureDiscriminator(nn.Module):
    """Light heads on frozen VGG features (relu1_1, relu2_1, relu3_1), one patch-logit map each.

    The feature network is passed in at call time (the student's perceptual loss already runs
    it), so only the heads are trained and saved. Spectral norm keeps the heads smooth.
    """

    CHANNELS = {"relu1_1": 64, "relu2_1": 128, "relu3_1": 256}

    def __init__(self, *, width: int = 64):
        super().__init__()
        sn = spectral_norm
        self.heads = nn.ModuleDict()
        for name, c in self.CHANNELS.items():
            # the finer the features, the more striding, so every head sees patches of similar size
            strides = {"relu1_1": 3, "relu2_1": 2, "relu3_1": 1}[name]
            layers: list[nn.Module] = []
            cin = c
            for _ in range(strides):
                layers += [sn(nn.Conv2d(cin, width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2, True)]
                cin = width
            layers += [sn(nn.Conv2d(cin, width, 3, padding=1)), nn.LeakyReLU(0.2, True), sn(nn.Conv2d(width, 1, 1))]
            self.heads[name] = nn.Sequential(*layers)

    def forward(self, feats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [head(feats[name]) for name, head in self.heads.items()]


class _Critic:
    """Scores images with the configured discriminator: a list of logit maps.

    The ``"vgg"`` discriminator reads VGG features that the caller passes in (the student's
    come from its perceptual loss's pass, so the VGG runs once per image and step) and sees
    them unaugmented; the ``"patch"`` one reads pixels through DiffAugment's translation and
    cutout.
    """

    def __init__(self, kind: str, disc: nn.Module, vgg: VGGFeatures, generator: torch.Generator):
        self.kind, self.disc, self.vgg, self.generator = kind, disc, vgg, generator

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """What the discriminator reads of fixed images (real frames): no gradient."""
        if self.kind == "patch":
            return None
        with torch.no_grad():
            return self.vgg(x, FEATURE_LAYERS)

    def __call__(self, x: torch.Tensor, feats: dict[str, torch.Tensor] | None) -> list[torch.Tensor]:
        if self.kind == "patch":
            return [self.disc(_augment(x, self.generator))]
        return self.disc({name: feats[name] for name in FEATURE_LAYERS})


def _hinge_d(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake)) / len(real)


def _mean_logit(maps: list[torch.Tensor]) -> torch.Tensor:
    return sum(m.mean() for m in maps) / len(maps)


def _y(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> (N, H, W) luma (BT.601 weights)."""
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [-1, 1] -> (N, 1, H/8, W/8) Y of the 8x-downscaled image."""
    return _y(F.avg_pool2d(x, 8))[:, None]


def _chroma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [-1, 1] -> (N, 2, H/8, W/8) U, V of the 8x-downscaled image."""
    x = F.avg_pool2d(x, 8)
    y = _y(x)
    return torch.stack([0.492 * (x[:, 2] - y), 0.877 * (x[:, 0] - y)], 1)


class _AugState:
    """The augmentation generator, saved with the checkpoints so resuming is exact."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(mix_seed(seed, 303))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DiffAugment translation + cutout (no colour jitter: colour is part of the style here)."""
    return diff_augment(x, generator=generator, colour=False)


def keep_resnet_blocks(state: dict[str, torch.Tensor], keep: Sequence[int]) -> dict[str, torch.Tensor]:
    """A ResNet generator's state dict with only the residual blocks ``keep`` (renumbered in order).

    Starts a shallower, faster student from a trained deeper one: the stem, downsampling,
    upsampling and head are kept whole.
    """
    have = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    bad = [i for i in keep if i not in have]
    if bad or len(set(keep)) != len(keep):
        raise ValueError(f"blocks to keep must be distinct blocks of the network (it has {have}), got {list(keep)}")
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for k, v in state.items():
        if not k.startswith("blocks."):
            out[k] = v
            continue
        _, i, rest = k.split(".", 2)
        if int(i) in new_index:
            out[f"blocks.{new_index[int(i)]}.{rest}"] = v
    return out


def build_student(cfg: DistillConfig) -> nn.Module:
    """The freshly initialised student network ``cfg`` describes."""
    if cfg.student == "style-net":
        net = StyleNet(width=cfg.width, n_blocks=cfg.n_blocks, kernel=cfg.kernel, shuffle=cfg.shuffle)
        init_style_net(net)
        return net
    net = ResnetGenerator(width=cfg.width, n_blocks=cfg.n_blocks, upsample=cfg.upsample)
    init_weights(net)
    return net


# -- the trainer --------------------------------------------------------------------------------
def train_distill(
    cfg: DistillConfig,
    vgg: VGGFeatures,
    teacher: Teacher,
    *,
    teacher_id: str,
    init: nn.Module | None = None,
    evaluator: Callable[[nn.Module], dict] | None = None,
    resume: bool = False,
    cpu: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train (or resume) a student generator; returns the folder of the exported EMA student.

    ``teacher`` maps a list of PIL RGB photos to same-sized PIL results (run once per photo and
    scale, cached); ``teacher_id`` identifies it in the cache key. ``vgg`` is the loss network
    (:func:`ghibli_core.models.load_vgg`, at least up to ``relu3_1``); ``init`` a trained
    generator of the same architecture to start from; ``evaluator(G) -> dict`` with
    ``kid_x1000`` scores the EMA student at every ``eval_every`` steps and the best is exported.
    """
    need = sorted(set(FEATURE_LAYERS) | {cfg.vgg_layer})
    missing = [l for l in need if l not in vgg.available]
    if missing:
        raise ValueError(f"the VGG must reach {missing} (it stops at {vgg.available[-1]})")
    out = Path(cfg.out)
    accelerator = make_accelerator(cfg.mixed_precision, cpu=cpu)
    main = accelerator.is_main_process
    ckpt_dir = out / "checkpoints"
    open_run_folder(cfg, ARCH_FIELDS, accelerator, resume=resume)

    # 1. Build after set_seed, identically on every process.
    set_seed(cfg.seed)
    device = accelerator.device
    G = build_student(cfg)
    if init is not None:
        state_init = init.state_dict()
        if cfg.init_blocks is not None:
            state_init = keep_resnet_blocks(state_init, cfg.init_blocks)
        G.load_state_dict(state_init)
    D: nn.Module = VGGFeatureDiscriminator(width=cfg.disc_width) if cfg.discriminator == "vgg" else PatchDiscriminator(width=cfg.disc_width)
    if cfg.discriminator == "patch":
        init_weights(D)
    G.to(device).train()
    D.to(device).train()
    vgg = vgg.to(device).eval()
    ema = EMA(G, decay=cfg.ema_decay)
    ema.model.to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(0.5, 0.999))
    factor = linear_decay(steps=cfg.steps, decay_steps=cfg.decay_steps)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, factor)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, factor)
    state, aug = TrainState(), _AugState(cfg.seed)
    opt_g, opt_d, sched_g, sched_d = accelerator.prepare(opt_g, opt_d, sched_g, sched_d)
    for obj in (G, D, ema, state, aug):
        accelerator.register_for_checkpointing(obj)
    if resume:
        latest = load_latest_checkpoint(accelerator, ckpt_dir)
        changed = set_scheduled_learning_rates([("G", sched_g, cfg.lr), ("D", sched_d, cfg.lr_d)])
        if main:
            print(f"resumed from {latest} at step {state.step}"
                  + (f"; learning rates {', '.join(changed)}" if changed else ""))
    critic = _Critic(cfg.discriminator, D, vgg, aug.generator)
    fake_layers = list(dict.fromkeys(([cfg.vgg_layer] if cfg.vgg_weight > 0 else []) + list(FEATURE_LAYERS)))

    # 2. Data: teacher outputs once (cached), frames preloaded.
    photo_paths = select_images(cfg.photos, include=cfg.photos_include, exclude=cfg.photos_exclude)
    frame_paths = select_images(cfg.frames, include=cfg.frames_include, exclude=cfg.frames_exclude)
    cache = Path(cfg.teacher_cache) if cfg.teacher_cache else out / "teacher_cache"
    pairs = teacher_pairs(photo_paths, teacher, sizes=cfg.teacher_sizes, cache_dir=cache, teacher_id=teacher_id,
                          progress=progress and main)
    pairs = [recolour_target(p, cfg.teacher_recolour) for p in pairs]
    frames = ImageSet(frame_paths, load_size=cfg.frames_size, progress=progress and main)
    dataset = DistillCrops(pairs, frames, crop=cfg.crop_size, border=cfg.border, seed=cfg.seed)
    stop = cfg.steps if stop_after is None else min(cfg.steps, state.step + stop_after)
    sampler = StepBatches(start=state.step, stop=stop, batch_size=cfg.batch_size,
                          rank=accelerator.process_index, world=accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    preview_idx = [i * len(cfg.teacher_sizes) for i in range(min(cfg.num_previews, len(photo_paths)))]
    size = min(cfg.teacher_sizes)
    previews = torch.stack([
        torch.cat([to_tensor(center_crop_resize(Image.fromarray(np.ascontiguousarray(pairs[i][..., c:c + 3])), size))[0]
                   for c in (0, 3)])
        for i in preview_idx
    ]).to(device)  # (P, 6, S, S): photo, teacher

    log = JsonlLog(out / "log.jsonl", enabled=main)
    if main:
        print(f"distilling {cfg.teacher} into a {sum(p.numel() for p in G.parameters()):,}-parameter student: "
              f"{len(photo_paths)} photos x {len(cfg.teacher_sizes)} scales, {len(frame_paths)} frames, "
              f"steps {state.step} -> {stop} of {cfg.steps}, {accelerator.num_processes} process(es) on {device}")
    bar = tqdm(total=stop, initial=state.step, desc="distill", disable=not (progress and main), dynamic_ncols=True)
    running = LossMeans(digits=5)
    t_start, wall_at_start = time.time(), state.wall_time

    for photo, target, real, smooth in loader:
        photo, target, real, smooth = (t.to(device) for t in (photo, target, real, smooth))  # (B, 3, C, C) in [-1, 1]
        adversarial = cfg.adv_weight > 0 and state.step >= cfg.adv_start
        with accelerator.autocast():
            fake = G(photo)
            # one VGG pass over the student's output serves the perceptual loss and the discriminator
            need_feats = cfg.vgg_weight > 0 or (adversarial and cfg.discriminator == "vgg")
            f_fake = vgg(fake, fake_layers) if need_feats else {}
        losses: dict[str, torch.Tensor] = {}
        # 3. Discriminator: real frames against the student's (and edge-smoothed frames).
        if adversarial:
            set_requires_grad([D], True)
            with accelerator.autocast():
                d_real = critic(real, critic.features(real))
                d_fake = critic(fake.detach(), {k: v.detach() for k, v in f_fake.items()})
                loss_d = _hinge_d(d_real, d_fake)
                if cfg.edge_weight > 0:
                    d_smooth = critic(smooth, critic.features(smooth))
                    loss_d = loss_d + cfg.edge_weight * sum(F.relu(1 + m).mean() for m in d_smooth) / len(d_smooth)
            opt_d.zero_grad(set_to_none=True)
            accelerator.backward(loss_d)
            average_gradients(list(D.parameters()), accelerator)
            opt_d.step()
            losses["d"] = loss_d.detach()
            losses["d_real"] = _mean_logit(d_real).detach()
            losses["d_fake"] = _mean_logit(d_fake).detach()
        # 4. Student: teacher targets, adversarial, colour.
        set_requires_grad([D], False)
        with accelerator.autocast():
            if cfg.l1_weight > 0:
                losses["l1"] = F.l1_loss(fake.float(), target.float()) * cfg.l1_weight
            if cfg.vgg_weight > 0:
                with torch.no_grad():
                    f_target = vgg(target, [cfg.vgg_layer])[cfg.vgg_layer]
                losses["vgg"] = F.l1_loss(f_fake[cfg.vgg_layer].float(), f_target.float()) * cfg.vgg_weight
            if adversarial:
                losses["adv"] = -_mean_logit(critic(fake, f_fake)) * cfg.adv_weight
            if cfg.photo_colour_weight > 0:
                losses["colour"] = F.l1_loss(_chroma(fake.float()), _chroma(photo.float())) * cfg.photo_colour_weight
            if cfg.teacher_luma_weight > 0:
                losses["luma"] = F.l1_loss(_luma(fake.float()), _luma(target.float())) * cfg.teacher_luma_weight
            loss_g = sum(v for k, v in losses.items() if k not in ("d", "d_real", "d_fake"))
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(loss_g)
        average_gradients(list(G.parameters()), accelerator)
        opt_g.step()
        sched_g.step()
        sched_d.step()
        state.step += 1
        ema.update(G, step=state.step)
        state.wall_time = wall_at_start + (time.time() - t_start)
        running.add(losses)
        bar.update(1)

        # 5. Bookkeeping (checkpoints need every process; files on the main one).
        step = state.step
        if step % cfg.log_every == 0 or step == stop:
            means = running.pop(step)
            bar.set_postfix({k: v for k, v in means.items() if k in ("l1", "vgg", "adv", "d")})
            log.write(step=step, wall_time=round(state.wall_time, 1), lr=sched_g.get_last_lr()[0], **means)
        if main and (step % cfg.preview_every == 0 or step == stop):
            with torch.no_grad():
                save_grid([previews[:, :3], previews[:, 3:], ema.model(previews[:, :3])],
                          out / "previews" / f"step-{step:07d}.png")
        if step % cfg.save_every == 0 or step == stop:
            if not parameters_in_sync([G, D], accelerator):
                raise RuntimeError(f"processes diverged at step {step}: their parameters differ")
            save_checkpoint(accelerator, ckpt_dir, step, keep=cfg.keep_checkpoints)
            if main:
                export_network(ema.model, out / "generator")
        if evaluator is not None and main and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            scores = evaluator(ema.model)
            log.write(step=step, wall_time=round(state.wall_time, 1), **scores)
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
            best_file = out / "generator-best" / "scores.json"
            kid = scores.get("kid_x1000")
            if kid is not None and (not best_file.exists() or kid < json.loads(best_file.read_text())["kid_x1000"]):
                export_network(ema.model, out / "generator-best")
                best_file.write_text(json.dumps({"step": step, **scores}, indent=2))
        accelerator.wait_for_everyone()

    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / "generator"
