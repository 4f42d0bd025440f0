"""Pieces every trainer shares: accelerator set-up, checkpoints, EMA, image pool, sample grids.

The training pattern (DESIGN.md): build after ``set_seed``; ``accelerator.backward``; I/O on
the main process only; ``save_state``/``load_state`` to resume exactly (step, optimisers,
schedulers, EMA, pools and RNG states); ``save_pretrained`` for what ships.

Multi-process training averages gradients explicitly (:func:`average_gradients`) instead of
wrapping models in DDP: GAN steps run the discriminators inside the generator step with their
gradients unused, which DDP's reducer does not allow without extra machinery.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from PIL import Image
from torch import nn

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


def make_accelerator(mixed_precision: str = "auto", *, cpu: bool = False) -> Accelerator:
    """An Accelerator; ``mixed_precision="auto"`` picks bf16 (or fp16) on CUDA and fp32 on CPU.

    On CPU autocast to bf16 measured slower than fp32 for these convolutional networks, so
    "auto" keeps fp32 there; ask for ``bf16`` explicitly to try it.
    """
    if mixed_precision not in ("auto", "no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be auto, no, fp16 or bf16, got {mixed_precision!r}")
    if mixed_precision == "auto":
        if torch.cuda.is_available() and not cpu:
            mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mixed_precision = "no"
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def average_gradients(params: Iterable[nn.Parameter], accelerator: Accelerator) -> None:
    """All-reduce (mean) the gradients of ``params`` over processes, in one flat buffer."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


@torch.no_grad()
def parameters_in_sync(modules: Iterable[nn.Module], accelerator: Accelerator) -> bool:
    """True when every process holds the same parameters (compares a fingerprint of them)."""
    if accelerator.num_processes == 1:
        return True
    parts = []
    for m in modules:
        for p in m.parameters():
            flat = p.detach().double().reshape(-1)
            weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
            parts.append(torch.stack([flat.sum(), (flat * flat).sum(), (flat * weights).sum()]))
    fingerprint = torch.stack(parts).reshape(1, -1)
    everyone = accelerator.gather(fingerprint)
    return bool((everyone == everyone[0:1]).all())


def set_requires_grad(modules: Iterable[nn.Module], flag: bool) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(flag)


class TrainState:
    """Counters that ``save_state`` must restore alongside models and optimisers."""

    def __init__(self) -> None:
        self.step = 0
        self.wall_time = 0.0  # seconds of training, summed over resumed runs

    def state_dict(self) -> dict:
        return {"step": self.step, "wall_time": self.wall_time}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.wall_time = float(state.get("wall_time", 0.0))


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied).

    ``decay`` 0.999 averages over about the last thousand steps; the averaged generator usually
    gives cleaner images than the raw one.
    """

    def __init__(self, model: nn.Module, *, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int | None) -> float:
        """The decay used at ``step``: warmed up as ``(1 + step) / (10 + step)`` until it reaches ``decay``.

        Without the warm-up a 0.999 average still holds 37% of the random initial weights after
        1000 steps, so early samples and FID/KID measure the initialisation, not the training.
        """
        return self.decay if step is None else min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, *, step: int | None = None) -> None:
        decay = self.decay_at(step)
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.model.load_state_dict(state["model"])


class ImagePool:
    """History of generated images for the discriminator (Shrivastava et al. 2017).

    Until ``size`` images are stored, each new image is stored and returned; afterwards, with
    probability 1/2 a stored image is returned in its place and replaced by the new one. The pool
    draws from its own seeded generator, saved with it, so resuming is exact.
    """

    def __init__(self, size: int, *, seed: int):
        self.size = size
        self.images: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (N, C, H, W), same device and dtype
        if self.size == 0:
            return images
        out = []
        for img in images:
            img = img.detach().unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(img.cpu().clone())
                out.append(img)
            elif float(torch.rand((), generator=self.generator)) < 0.5:
                i = int(torch.randint(0, self.size, (1,), generator=self.generator))
                old = self.images[i].to(img.device, img.dtype)
                self.images[i] = img.cpu().clone()
                out.append(old)
            else:
                out.append(img)
        return torch.cat(out, dim=0)

    def state_dict(self) -> dict:
        return {
            "size": self.size,
            "images": torch.cat(self.images) if self.images else torch.empty(0),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.size = int(state["size"])
        images = state["images"]
        self.images = [images[i : i + 1].clone() for i in range(images.shape[0])] if images.numel() else []
        self.generator.set_state(state["generator"])


class LossMeans:
    """Running sums of logged losses between log lines; :meth:`pop` returns their means.

    Counts what was added (not the step interval), so a line after a resume in the middle of an
    interval is still a true mean. A non-finite mean raises: the run has diverged.
    """

    def __init__(self, *, digits: int = 5):
        self.digits = digits
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, values: dict[str, float | torch.Tensor]) -> None:
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().item()
            self._sums[name] = self._sums.get(name, 0.0) + float(value)
            self._counts[name] = self._counts.get(name, 0) + 1

    def pop(self, step: int) -> dict[str, float]:
        means = {k: round(v / self._counts[k], self.digits) for k, v in self._sums.items()}
        self._sums.clear()
        self._counts.clear()
        if not all(np.isfinite(v) for v in means.values()):
            raise RuntimeError(f"training diverged at step {step}: losses {means}")
        return means


def linear_decay(*, steps: int, decay_steps: int):
    """LR multiplier: 1 for ``steps - decay_steps`` steps, then linearly down to 0 at ``steps``."""
    if not 0 <= decay_steps <= steps:
        raise ValueError(f"decay_steps must be in [0, steps={steps}], got {decay_steps}")
    constant = steps - decay_steps

    def factor(step: int) -> float:
        if step < constant or decay_steps == 0:
            return 1.0
        return max(0.0, 1.0 - (step - constant) / decay_steps)

    return factor


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-N`` checkpoint folder, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / "COMPLETE").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(accelerator: Accelerator, folder: Path, step: int, *, keep: int) -> Path:
    """``save_state`` into ``folder/step-N`` (written to a temp name, then renamed), keep the newest ``keep``."""
    target = folder / f"step-{step:07d}"
    tmp = folder / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "COMPLETE").write_text(str(step))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        for _, old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """Save a grid: each tensor is one column group ``(N, 3, H, W)`` in [-1, 1]; row i shows image i of each."""
    cols = [((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu() for t in rows]
    n = cols[0].shape[0]
    lines = [torch.cat([c[i] for c in cols], dim=2) for i in range(n)]  # (3, H, W * len(cols))
    grid = torch.cat(lines, dim=1).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(np.ascontiguousarray(grid)).save(tmp)
    tmp.replace(path)


class JsonlLog:
    """Append-only JSON-lines log (main process only)."""

    def __init__(self, path: Path, *, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record.setdefault("time", time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def open_run_folder(cfg, arch_fields: Sequence[str], accelerator: Accelerator, *, resume: bool,
                    absent: dict | None = None) -> None:
    """Create ``cfg.out`` and write ``train_config.json`` (``cfg.to_json()``), on the main process.

    On ``resume`` the saved config's network settings (``arch_fields``) must match ``cfg``'s (a
    field the saved config lacks, written before the field existed, counts as its ``absent``
    value); without it, a folder that already holds checkpoints is refused rather than overwritten.
    """
    absent = absent or {}
    out = Path(cfg.out)
    config_path = out / "train_config.json"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if resume and config_path.exists():
            old = json.loads(config_path.read_text())
            changed = [k for k in arch_fields if old.get(k, absent.get(k)) != getattr(cfg, k)]
            if changed:
                raise ValueError(
                    f"--resume with different network settings than {config_path}: "
                    + ", ".join(f"{k} {old.get(k, absent.get(k))!r} -> {getattr(cfg, k)!r}" for k in changed)
                )
        elif not resume and list_checkpoints(out / "checkpoints"):
            raise ValueError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
        config_path.write_text(cfg.to_json())
    accelerator.wait_for_everyone()


def export_network(net: nn.Module, folder: Path, *, extra: Callable[[Path], None] | None = None) -> None:
    """``save_pretrained`` (fp32) via a temp folder, so a crash never leaves half a checkpoint;
    ``extra(tmp_folder)`` may add files (sample grids) before the folder takes its name."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(tmp)
    if extra is not None:
        extra(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def set_learning_rates(rates: Iterable[tuple[str, torch.optim.Optimizer, float]]) -> list[str]:
    """After a resume, give each ``(name, optimiser, lr)`` its configured rate: the loaded optimiser
    state carries the rate it ran with, which would otherwise override a new one silently (the Adam
    moments are kept). Returns the changes as ``"name old -> new"`` (``"old -> new"`` for an empty
    name), for the resume message."""
    changed = []
    for name, opt, lr in rates:
        for group in opt.param_groups:
            if group["lr"] != lr:
                changed.append(f"{name} {group['lr']:g} -> {lr:g}".lstrip())
            group["lr"] = lr
    return list(dict.fromkeys(changed))


def set_scheduled_learning_rates(rates: Iterable[tuple[str, object, float]]) -> list[str]:
    """As :func:`set_learning_rates`, for ``(name, scheduler, lr)`` with a ``LambdaLR``-style
    scheduler (plain or accelerate-wrapped): its saved base rates become the configured ones and
    the optimiser's current rate keeps the schedule's factor at the resumed step."""
    changed = []
    for name, sched, lr in rates:
        inner = getattr(sched, "scheduler", sched)
        for i, group in enumerate(inner.optimizer.param_groups):
            old = inner.base_lrs[i]
            if old != lr:
                changed.append(f"{name} {old:g} -> {lr:g}")
                group["lr"] = group["lr"] / old * lr
                group["initial_lr"] = inner.base_lrs[i] = lr
    return list(dict.fromkeys(changed))


def load_latest_checkpoint(accelerator: Accelerator, folder: Path) -> Path:
    """``load_state`` from the newest complete checkpoint in ``folder``; returns its path."""
    found = list_checkpoints(folder)
    if not found:
        raise ValueError(f"--resume: no complete checkpoint in {folder}")
    accelerator.load_state(str(found[-1][1]))
    return found[-1][1]
