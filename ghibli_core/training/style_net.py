"""Fast neural style training (Johnson et al. 2016): a feed-forward network for one look.

Loss on VGG features of a loss network that is passed in (never downloaded here):

- content: mean squared difference of the output's and the input photo's features at
  ``content_layer``, times ``content_weight``;
- style: mean squared difference of the output's Gram matrices (normalised by C*H*W) and those
  of the style image(s) at ``style_layers``, times ``style_weight``; with several style images
  the target is their mean Gram matrix;
- total variation of the output, times ``tv_weight``;
- optionally distillation from a teacher image model (e.g. the CycleGAN default): L1 to the
  teacher's output times ``teacher_weight``, and the content term measured against the
  teacher's output instead of the photo. This turns a slow, good translator into a fast one.

The seeds use content 1e5 and style 1e10 on torchvision's VGG16 and had to try several, so
trying is cheap here: ``preview_every`` writes input | output grids of fixed test images.
The loss weights depend on the loss network's feature scale; the defaults suit
``../shared/weights/vgg19_normalised_relu3_1.safetensors``.

Run folder layout::

    OUT/train_config.json     the config (checked on --resume)
    OUT/log.jsonl             losses per logged step
    OUT/previews/step-N.png   input | output for fixed test images
    OUT/checkpoints/step-N/   accelerate save_state (resume from here)
    OUT/generator/            the trained StyleNet (safetensors + config.json)
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..data.datasets import ImageSet, SquareCrops, StepBatches, resize_short_side, select_images
from ..imaging import center_crop_resize, load_image, to_tensor
from ..models.perceptual import VGGFeatures, gram_matrix
from ..models.style_net import StyleNet, init_style_net
from .common import (
    LossMeans,
    JsonlLog,
    TrainState,
    average_gradients,
    load_latest_checkpoint,
    set_learning_rates,
    make_accelerator,
    open_run_folder,
    export_network,
    parameters_in_sync,
    save_checkpoint,
    save_grid,
)

ARCH_FIELDS = ("width", "n_blocks", "kernel", "shuffle")


@dataclass
class StyleNetConfig:
    """Everything a style-network run needs; JSON-able and saved with the run.

    ``photos`` are folders of content images (``include``/``exclude`` globs as for CycleGAN);
    ``style`` are style image files (may be empty when a ``teacher`` is given); ``vgg`` is the
    loss network's weights (a file or Hub repo, see :func:`ghibli_core.models.load_vgg`),
    recorded for the card; ``teacher`` a model spec (see :mod:`ghibli_core.hub`) or ``None``.
    """

    photos: list[str]
    style: list[str]
    vgg: str
    out: str
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    teacher: str | None = None
    # network
    width: int = 32
    n_blocks: int = 5
    kernel: int = 9
    shuffle: bool = False
    # data
    image_size: int = 256  # training crops
    # short side the photos are resized to before cropping (None: image_size, i.e. crops see
    # nearly the whole photo). Larger values train at the scale of bigger inputs (video frames).
    load_size: int | None = None
    style_size: int = 512  # style images: short side resized to this (texture scale)
    batch_size: int = 4
    preload: bool = True
    # loss
    content_layer: str = "relu2_2"
    style_layers: list[str] = field(default_factory=lambda: ["relu1_2", "relu2_2", "relu3_1"])
    content_weight: float = 1.0
    style_weight: float = 1e4
    tv_weight: float = 0.0
    teacher_weight: float = 10.0
    # optimisation
    steps: int = 4000
    lr: float = 1e-3
    mixed_precision: str = "auto"
    seed: int = 0
    # bookkeeping
    log_every: int = 50
    preview_every: int = 250
    save_every: int = 500
    keep_checkpoints: int = 3
    num_previews: int = 4

    def __post_init__(self) -> None:
        if not self.style and not self.teacher:
            raise ValueError("give at least one style image, or a teacher model to distil")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps} and {self.batch_size}")
        if self.image_size < 16 or self.image_size % StyleNet.stride:
            raise ValueError(f"image_size must be a multiple of {StyleNet.stride} and at least 16, got {self.image_size}")
        if self.load_size is not None and self.load_size < self.image_size:
            raise ValueError(f"load_size ({self.load_size}) must be at least image_size ({self.image_size})")
        for name in ("content_weight", "style_weight", "tv_weight", "teacher_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.style and self.style_weight > 0 and not self.style_layers:
            raise ValueError("style_layers is empty but style images were given")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def style_targets(vgg: VGGFeatures, styles: list[torch.Tensor], layers: list[str]) -> dict[str, torch.Tensor]:
    """Mean Gram matrix per layer over the style images (each ``(1, 3, H, W)`` in [-1, 1])."""
    grams: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    with torch.no_grad():
        for s in styles:
            feats = vgg(s, layers)
            for name in layers:
                grams[name].append(gram_matrix(feats[name]))
    return {name: torch.cat(g).mean(0, keepdim=True) for name, g in grams.items()}  # (1, C, C)


def total_variation(y: torch.Tensor) -> torch.Tensor:
    return (y[..., 1:, :] - y[..., :-1, :]).abs().mean() + (y[..., :, 1:] - y[..., :, :-1]).abs().mean()


def train_style_net(
    cfg: StyleNetConfig,
    vgg: VGGFeatures,
    *,
    teacher: torch.nn.Module | None = None,
    preview_images: list | None = None,
    resume: bool = False,
    cpu: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train (or resume) a style network; returns the folder of the exported network.

    ``vgg`` is the loss network (:func:`ghibli_core.models.load_vgg`); ``teacher`` an image
    model mapping ``(N, 3, H, W)`` in [-1, 1] to the same (required when ``cfg.teacher`` is
    set); ``preview_images`` PIL images for the preview grids (default: the first photos).
    """
    if (teacher is None) != (cfg.teacher is None):
        raise ValueError("pass the teacher model exactly when cfg.teacher names one")
    # VGG runs only as deep as the losses in use need (pure distillation needs no VGG at all)
    use_style = bool(cfg.style) and cfg.style_weight > 0
    wanted = ([cfg.content_layer] if cfg.content_weight > 0 else []) + (list(cfg.style_layers) if use_style else [])
    layers = list(dict.fromkeys(wanted))
    unknown = [l for l in layers if l not in vgg.available]
    if unknown:
        raise ValueError(f"loss layers {unknown} are not in this VGG (it has {vgg.available[-1]} as its deepest layer)")
    out = Path(cfg.out)
    accelerator = make_accelerator(cfg.mixed_precision, cpu=cpu)
    main = accelerator.is_main_process
    ckpt_dir = out / "checkpoints"
    open_run_folder(cfg, ARCH_FIELDS, accelerator, resume=resume)

    # 1. Build after set_seed, identically on every process.
    set_seed(cfg.seed)
    device = accelerator.device
    net = StyleNet(width=cfg.width, n_blocks=cfg.n_blocks, kernel=cfg.kernel, shuffle=cfg.shuffle)
    init_style_net(net)
    net.to(device).train()
    vgg = vgg.to(device).eval()
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    state = TrainState()
    opt = accelerator.prepare(opt)
    for obj in (net, state):
        accelerator.register_for_checkpointing(obj)
    if resume:
        latest = load_latest_checkpoint(accelerator, ckpt_dir)
        changed = set_learning_rates([("", opt, cfg.lr)])
        if main:
            print(f"resumed from {latest} at step {state.step}"
                  + (f"; learning rate {changed[0]}" if changed else ""))

    # 2. Data and fixed targets.
    paths = select_images(cfg.photos, include=cfg.include, exclude=cfg.exclude)
    images = ImageSet(paths, load_size=cfg.load_size or cfg.image_size, preload=cfg.preload, progress=progress and main)
    dataset = SquareCrops(images, size=cfg.image_size, seed=cfg.seed)
    stop = cfg.steps if stop_after is None else min(cfg.steps, state.step + stop_after)
    sampler = StepBatches(start=state.step, stop=stop, batch_size=cfg.batch_size,
                          rank=accelerator.process_index, world=accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    targets: dict[str, torch.Tensor] = {}
    if use_style:
        styles = [to_tensor(resize_short_side(load_image(p), cfg.style_size)).to(device) for p in cfg.style]
        targets = style_targets(vgg, styles, list(cfg.style_layers))
    if preview_images is None:
        preview_images = [load_image(p) for p in paths[: cfg.num_previews]]
    previews = to_tensor([center_crop_resize(img, cfg.image_size) for img in preview_images]).to(device)

    log = JsonlLog(out / "log.jsonl", enabled=main)
    if main:
        what = f"{len(cfg.style)} style image(s)" + (f", teacher {cfg.teacher}" if cfg.teacher else "")
        print(f"training StyleNet on {len(images)} photos with {what}, steps {state.step} -> {stop} of {cfg.steps}, "
              f"{accelerator.num_processes} process(es) on {device}")
    bar = tqdm(total=stop, initial=state.step, desc="style-net", disable=not (progress and main), dynamic_ncols=True)
    running = LossMeans(digits=6)
    t_start, wall_at_start = time.time(), state.wall_time

    for x in loader:
        x = x.to(device)  # (B, 3, S, S) in [-1, 1]
        # 3. Forward, losses, step.
        with accelerator.autocast():
            y = net(x)
            losses: dict[str, torch.Tensor] = {}
            reference = x
            if teacher is not None:
                with torch.no_grad():
                    reference = teacher(x).clamp(-1, 1)
                losses["teacher"] = F.l1_loss(y.float(), reference.float()) * cfg.teacher_weight
            feats_y = vgg(y, layers) if layers else {}
            if cfg.content_weight > 0:
                with torch.no_grad():
                    feats_ref = vgg(reference, [cfg.content_layer])
                losses["content"] = F.mse_loss(feats_y[cfg.content_layer].float(), feats_ref[cfg.content_layer].float()) * cfg.content_weight
            if targets:
                losses["style"] = sum(
                    F.mse_loss(gram_matrix(feats_y[l]), targets[l].expand(y.shape[0], -1, -1)) for l in cfg.style_layers
                ) * cfg.style_weight
            if cfg.tv_weight > 0:
                losses["tv"] = total_variation(y.float()) * cfg.tv_weight
            loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        average_gradients(list(net.parameters()), accelerator)
        opt.step()
        state.step += 1
        state.wall_time = wall_at_start + (time.time() - t_start)
        running.add(losses)
        bar.update(1)

        # 4. Bookkeeping (checkpoints need every process; files on the main one).
        step = state.step
        if step % cfg.log_every == 0 or step == stop:
            means = running.pop(step)
            bar.set_postfix(means)
            log.write(step=step, wall_time=round(state.wall_time, 1), **means)
        if main and (step % cfg.preview_every == 0 or step == stop):
            with torch.no_grad():
                net.eval()
                save_grid([previews, net(previews)], out / "previews" / f"step-{step:07d}.png")
                net.train()
        if step % cfg.save_every == 0 or step == stop:
            if not parameters_in_sync([net], accelerator):
                raise RuntimeError(f"processes diverged at step {step}: their parameters differ")
            save_checkpoint(accelerator, ckpt_dir, step, keep=cfg.keep_checkpoints)
            if main:
                export_network(net, out / "generator")

    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / "generator"
