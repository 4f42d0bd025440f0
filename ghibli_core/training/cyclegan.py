"""Unpaired photo -> Ghibli training (CycleGAN, Zhu et al. 2017).

Losses as in the paper: least-squares GAN loss, cycle consistency (lambda 10), identity
(0.5 x lambda), Adam 2e-4 with betas (0.5, 0.999), constant then linear decay, a 50-image
history pool per discriminator, random crop + flip. Domain A are photos, domain B film frames;
``G_A`` (A -> B) is the generator that ships.

Run folder layout::

    OUT/train_config.json     the config (checked on --resume)
    OUT/log.jsonl             losses (and FID/KID) per logged step
    OUT/samples/step-N.png    input | translated | reconstructed, for fixed photos
    OUT/checkpoints/step-N/   accelerate save_state (resume from here)
    OUT/generator/            the EMA photo->Ghibli generator (safetensors + config.json)
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..imaging import to_tensor
from ..data.datasets import ImageSet, StepBatches, UnpairedCrops, select_images
from ..models.cyclegan import PatchDiscriminator, ResnetGenerator, UnetGenerator, init_weights
from .common import (
    LossMeans,
    EMA,
    ImagePool,
    JsonlLog,
    TrainState,
    average_gradients,
    linear_decay,
    load_latest_checkpoint,
    set_scheduled_learning_rates,
    make_accelerator,
    open_run_folder,
    export_network,
    parameters_in_sync,
    save_checkpoint,
    save_grid,
    set_requires_grad,
)

# Config fields that define the networks: a resumed run must not change them.
ARCH_FIELDS = ("generator", "width", "n_blocks", "n_downs", "upsample", "disc_width", "disc_layers", "crop_size")


@dataclass
class CycleGANConfig:
    """Everything a CycleGAN run needs; JSON-able and saved with the run.

    Data: ``domain_a``/``domain_b`` are folders of images (photos, frames) or manifests made by
    ``prepare``; ``include_*``/``exclude_*`` are glob patterns on paths relative to each folder
    (hold out whole films with ``exclude_b=["ponyo/*"]``); ``where_*`` filter manifest records
    (``["warmth>0.6"]``). Images are resized so the short side is ``load_size`` and randomly
    cropped to ``crop_size``.
    """

    domain_a: list[str]
    domain_b: list[str]
    out: str
    include_a: list[str] = field(default_factory=list)
    exclude_a: list[str] = field(default_factory=list)
    include_b: list[str] = field(default_factory=list)
    exclude_b: list[str] = field(default_factory=list)
    where_a: list[str] = field(default_factory=list)
    where_b: list[str] = field(default_factory=list)
    # networks
    generator: str = "resnet"  # "resnet" | "unet"
    width: int = 64
    n_blocks: int = 9
    n_downs: int = 8
    upsample: str = "transpose"
    disc_width: int = 64
    disc_layers: int = 3
    # Start G_A (photo -> Ghibli) from a trained generator (a model spec: embedded name, folder
    # or Hub repo) instead of random weights, e.g. to continue the shipped default in a new run.
    # G_B and the discriminators start fresh. Ignored on resume (the checkpoint wins).
    init_a: str | None = None
    # data
    load_size: int = 286
    crop_size: int = 256
    batch_size: int = 1
    preload: bool = True
    # optimisation
    steps: int = 200_000
    decay_steps: int = 100_000
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5
    pool_size: int = 50
    ema_decay: float = 0.999
    mixed_precision: str = "auto"
    seed: int = 0
    # bookkeeping
    log_every: int = 50
    sample_every: int = 500
    save_every: int = 1000
    keep_checkpoints: int = 3
    num_samples: int = 4
    eval_every: int = 0  # 0: only at the end (when an evaluator is given)

    def __post_init__(self) -> None:
        if self.generator not in ("resnet", "unet"):
            raise ValueError(f"generator must be 'resnet' or 'unet', got {self.generator!r}")
        if self.crop_size > self.load_size:
            raise ValueError(f"crop_size ({self.crop_size}) must not exceed load_size ({self.load_size})")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps} and {self.batch_size}")
        if not 0 <= self.decay_steps <= self.steps:
            raise ValueError(f"decay_steps must be between 0 and steps ({self.steps}), got {self.decay_steps}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def build_generator(cfg: CycleGANConfig):
    if cfg.generator == "resnet":
        return ResnetGenerator(width=cfg.width, n_blocks=cfg.n_blocks, upsample=cfg.upsample)
    return UnetGenerator(width=cfg.width, n_downs=cfg.n_downs)


def train_cyclegan(
    cfg: CycleGANConfig,
    *,
    resume: bool = False,
    cpu: bool = False,
    evaluator: Callable[[torch.nn.Module], dict] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train (or resume) a CycleGAN run; returns the folder of the exported generator.

    ``evaluator(G_A) -> dict`` (e.g. FID/KID on held-out films) runs at every ``eval_every``
    steps and at the end, on the main process. ``stop_after`` ends this invocation after that
    many steps without changing the schedule (the run can be resumed), for tests and for
    splitting long runs over sessions.
    """
    out = Path(cfg.out)
    accelerator = make_accelerator(cfg.mixed_precision, cpu=cpu)
    main = accelerator.is_main_process
    ckpt_dir = out / "checkpoints"

    # 1. Build everything after set_seed, identically on every process.
    set_seed(cfg.seed)
    device = accelerator.device
    G_A, G_B = build_generator(cfg), build_generator(cfg)  # A->B (ships), B->A
    D_A = PatchDiscriminator(width=cfg.disc_width, n_layers=cfg.disc_layers)  # judges domain B
    D_B = PatchDiscriminator(width=cfg.disc_width, n_layers=cfg.disc_layers)  # judges domain A
    for net in (G_A, G_B, D_A, D_B):
        init_weights(net)
    if cfg.init_a and not resume:
        _load_init(G_A, cfg)  # before the run folder exists, so a bad --init-a leaves nothing
    open_run_folder(cfg, ARCH_FIELDS, accelerator, resume=resume)
    for net in (G_A, G_B, D_A, D_B):
        net.to(device).train()
    ema = EMA(G_A, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    gen_params = list(G_A.parameters()) + list(G_B.parameters())
    disc_params = list(D_A.parameters()) + list(D_B.parameters())
    opt_G = torch.optim.Adam(gen_params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_D = torch.optim.Adam(disc_params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    factor = linear_decay(steps=cfg.steps, decay_steps=cfg.decay_steps)
    sched_G = torch.optim.lr_scheduler.LambdaLR(opt_G, factor)
    sched_D = torch.optim.lr_scheduler.LambdaLR(opt_D, factor)
    pool_A = ImagePool(cfg.pool_size, seed=cfg.seed * 1000 + 2 * accelerator.process_index + 1)
    pool_B = ImagePool(cfg.pool_size, seed=cfg.seed * 1000 + 2 * accelerator.process_index + 2)
    state = TrainState()
    opt_G, opt_D = accelerator.prepare(opt_G, opt_D)
    # The schedulers are stepped by hand once per step: accelerate's wrapper would step them
    # once per process.
    for obj in (G_A, G_B, D_A, D_B, sched_G, sched_D, pool_A, pool_B, state):
        accelerator.register_for_checkpointing(obj)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    if resume:
        latest = load_latest_checkpoint(accelerator, ckpt_dir)
        changed = set_scheduled_learning_rates([("G", sched_G, cfg.lr), ("D", sched_D, cfg.lr)])
        if main:
            print(f"resumed from {latest} at step {state.step}"
                  + (f"; learning rates {', '.join(changed)}" if changed else ""))

    # 2. Data: every sample index maps to fixed crops, so resuming continues the same stream.
    paths_a = select_images(cfg.domain_a, include=cfg.include_a, exclude=cfg.exclude_a, where=cfg.where_a)
    paths_b = select_images(cfg.domain_b, include=cfg.include_b, exclude=cfg.exclude_b, where=cfg.where_b)
    set_a = ImageSet(paths_a, load_size=cfg.load_size, preload=cfg.preload, progress=progress and main)
    set_b = ImageSet(paths_b, load_size=cfg.load_size, preload=cfg.preload, progress=progress and main)
    dataset = UnpairedCrops(set_a, set_b, crop_size=cfg.crop_size, seed=cfg.seed)
    stop = cfg.steps if stop_after is None else min(cfg.steps, state.step + stop_after)
    sampler = StepBatches(
        start=state.step, stop=stop, batch_size=cfg.batch_size,
        rank=accelerator.process_index, world=accelerator.num_processes,
    )
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    # Fixed photos for sample grids: the first few of domain A, centre-cropped.
    fixed = torch.stack([_center(set_a[i], cfg.crop_size) for i in range(min(cfg.num_samples, len(set_a)))]).to(device)

    log = JsonlLog(out / "log.jsonl", enabled=main)
    if main:
        print(f"training CycleGAN on {len(set_a)} A images and {len(set_b)} B images, "
              f"steps {state.step} -> {stop} of {cfg.steps}, {accelerator.num_processes} process(es) on {device}")
    bar = tqdm(total=stop, initial=state.step, desc="cyclegan", disable=not (progress and main), dynamic_ncols=True)
    running = LossMeans(digits=5)
    t_start = time.time()
    wall_at_start = state.wall_time

    for real_A, real_B in loader:
        real_A, real_B = real_A.to(device), real_B.to(device)

        # 3. Generators: adversarial + cycle + identity, discriminators frozen.
        set_requires_grad((D_A, D_B), False)
        with accelerator.autocast():
            fake_B = G_A(real_A)
            fake_A = G_B(real_B)
            rec_A = G_B(fake_B)
            rec_B = G_A(fake_A)
            loss_gan = _lsgan(D_A(fake_B), True) + _lsgan(D_B(fake_A), True)
            loss_cycle = (F.l1_loss(rec_A, real_A) + F.l1_loss(rec_B, real_B)) * cfg.lambda_cycle
            if cfg.lambda_identity > 0:
                loss_idt = (F.l1_loss(G_A(real_B), real_B) + F.l1_loss(G_B(real_A), real_A)) * (
                    cfg.lambda_cycle * cfg.lambda_identity
                )
            else:
                loss_idt = torch.zeros((), device=device)
            loss_G = loss_gan + loss_cycle + loss_idt
        opt_G.zero_grad(set_to_none=True)
        accelerator.backward(loss_G)
        average_gradients(gen_params, accelerator)
        opt_G.step()

        # 4. Discriminators: real vs pooled fakes, one forward each on the concatenated batch.
        set_requires_grad((D_A, D_B), True)
        fake_B_pool = pool_B.query(fake_B.detach())
        fake_A_pool = pool_A.query(fake_A.detach())
        with accelerator.autocast():
            loss_D_A = _disc_loss(D_A, real_B, fake_B_pool)
            loss_D_B = _disc_loss(D_B, real_A, fake_A_pool)
            loss_D = loss_D_A + loss_D_B
        opt_D.zero_grad(set_to_none=True)
        accelerator.backward(loss_D)
        average_gradients(disc_params, accelerator)
        opt_D.step()
        sched_G.step()
        sched_D.step()
        if ema is not None:
            ema.update(G_A, step=state.step)
        state.step += 1
        state.wall_time = wall_at_start + (time.time() - t_start)

        running.add({"G_gan": loss_gan, "cycle": loss_cycle, "idt": loss_idt, "D_A": loss_D_A, "D_B": loss_D_B})
        bar.update(1)

        # 5. Bookkeeping, on the main process only (checkpoints need every process).
        step = state.step
        if step % cfg.log_every == 0 or step == stop:
            means = running.pop(step)
            bar.set_postfix(means)
            log.write(step=step, lr=sched_G.get_last_lr()[0], wall_time=round(state.wall_time, 1), **means)
        if main and (step % cfg.sample_every == 0 or step == stop):
            _write_samples(ema.model if ema else G_A, G_B, fixed, out / "samples" / f"step-{step:07d}.png")
        if step % cfg.save_every == 0 or step == stop:
            if not parameters_in_sync((G_A, G_B, D_A, D_B), accelerator):
                raise RuntimeError(f"processes diverged at step {step}: their parameters differ")
            log.write(step=step, in_sync=True, processes=accelerator.num_processes)
            save_checkpoint(accelerator, ckpt_dir, step, keep=cfg.keep_checkpoints)
            if main:
                export_network(ema.model if ema else G_A, out / "generator")
        if evaluator is not None and main and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            scores = evaluator(_eval_copy(ema.model if ema else G_A))
            log.write(step=step, **scores)
            # GAN scores wander from one checkpoint to the next: keep the best one seen so far
            # (lowest KID) beside the latest, with its scores, so it can be exported later.
            best_file = out / "generator-best" / "scores.json"
            kid = scores.get("kid_x1000")
            if kid is not None and (not best_file.exists() or kid < json.loads(best_file.read_text())["kid_x1000"]):
                export_network(ema.model if ema else G_A, out / "generator-best")
                best_file.write_text(json.dumps({"step": step, **scores}, indent=2))
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()))

    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / "generator"


def _load_init(G: torch.nn.Module, cfg: CycleGANConfig) -> None:
    """Copy the weights of the generator ``cfg.init_a`` names into ``G`` (same architecture)."""
    from ..hub import load

    src = load(cfg.init_a)
    theirs, ours = dict(src._hub_mixin_config or {}), dict(G._hub_mixin_config or {})
    problem = None
    if type(src) is not type(G) or {k: theirs.get(k) for k in ours} != ours:
        problem = f"it is {type(src).__name__} {theirs}, this run builds {type(G).__name__} {ours}"
    else:
        try:
            G.load_state_dict({k: v.float() for k, v in src.state_dict().items()}, strict=True)
        except RuntimeError as exc:
            problem = str(exc).splitlines()[0]
    if problem:
        raise ValueError(
            f"--init-a {cfg.init_a} does not fit this run's generator ({problem}); "
            "set --generator/--width/--n-blocks/--upsample to match it"
        )


def _center(img, size: int) -> torch.Tensor:
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return to_tensor(np.ascontiguousarray(img[top : top + size, left : left + size]))[0]  # (3, size, size) in [-1, 1]


def _lsgan(pred: torch.Tensor, real: bool) -> torch.Tensor:
    return F.mse_loss(pred.float(), torch.full_like(pred, 1.0 if real else 0.0, dtype=torch.float32))


def _disc_loss(D, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    pred = D(torch.cat([real, fake], dim=0))
    n = real.shape[0]
    return 0.5 * (_lsgan(pred[:n], True) + _lsgan(pred[n:], False))


@torch.no_grad()
def _write_samples(G_A, G_B, fixed: torch.Tensor, path: Path) -> None:
    was = G_A.training, G_B.training
    G_A.eval(), G_B.eval()
    fake = G_A(fixed)
    rec = G_B(fake)
    G_A.train(was[0]), G_B.train(was[1])
    save_grid([fixed, fake, rec], path)


def _eval_copy(G):
    return copy.deepcopy(G).float().eval()
