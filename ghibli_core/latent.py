"""Exploring a StyleGAN2 generator's latent space: projection, neighbours, evolution, walks.

Works with any generator ``G`` of this interface (:class:`ghibli_core.models.StyleGAN2Generator`):
``G.z_dim``, ``G.w_dim``, ``G.num_ws``; ``G.mapping(z, truncation_psi=...) -> (N, num_ws, w_dim)``
with a ``G.mapping.w_avg`` buffer; ``G.synthesis(ws, noise_mode=...) -> (N, 3, R, R)`` in [-1, 1];
per-layer constant noise in buffers whose names contain ``noise_const``.

Latents are always ``ws`` tensors ``(N, num_ws, w_dim)`` ("w+"); a plain w latent is the same
vector repeated over the layers. Nothing here reads or writes files, downloads anything or seeds
a global RNG: randomness comes from the ``torch.Generator`` passed in.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

EASINGS = ("linear", "ease-in-out")
SPACES = ("w", "w+")


# -- sampling ----------------------------------------------------------------------------------
def seed_z(G: nn.Module, seeds: Sequence[int]) -> torch.Tensor:
    """``(len(seeds), z_dim)`` latents, one per seed, independent of each other and of any global RNG."""
    zs = []
    for seed in seeds:
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seeds must be non-negative integers, got {seed!r}")
        zs.append(torch.randn(G.z_dim, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(zs) if zs else torch.empty(0, G.z_dim)


def _device(G: nn.Module) -> torch.device:
    for t in list(G.parameters()) + list(G.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def seed_ws(G: nn.Module, seeds: Sequence[int], *, truncation_psi: float = 1.0) -> torch.Tensor:
    """``(len(seeds), num_ws, w_dim)``: the w+ latents of ``seeds`` (reproducible image per seed)."""
    return G.mapping(seed_z(G, seeds).to(_device(G)), truncation_psi=truncation_psi)


@torch.no_grad()
def latent_stats(G: nn.Module, *, samples: int = 10_000, generator: torch.Generator | None = None,
                 batch: int = 1000) -> tuple[torch.Tensor, float]:
    """Mean w ``(w_dim,)`` and the scalar spread of w around it (root mean squared distance per dim)."""
    if samples < 2:
        raise ValueError(f"samples must be at least 2, got {samples}")
    device = _device(G)
    ws = []
    for start in range(0, samples, batch):
        z = torch.randn(min(batch, samples - start), G.z_dim, generator=generator).to(device)
        ws.append(G.mapping(z)[:, 0].float())
    w = torch.cat(ws)
    mean = w.mean(0)
    std = float(((w - mean).square().sum() / samples / G.w_dim) ** 0.5)
    return mean, std


@torch.no_grad()
def render(G: nn.Module, ws: torch.Tensor, *, noise_mode: str = "const", batch_size: int = 8,
           noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``(N, num_ws, w_dim)`` latents -> ``(N, 3, R, R)`` images in [-1, 1], in batches.

    ``noise`` (from :class:`Projection`) replaces the generator's constant noise buffers for
    this call, so a projected latent renders exactly as it was fitted.
    """
    _check_ws(G, ws)
    with _noise_buffers(G, noise):
        out = [G.synthesis(ws[i : i + batch_size].to(_device(G)), noise_mode=noise_mode).float().clamp(-1, 1)
               for i in range(0, ws.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0, 3, G.resolution, G.resolution)


def _check_ws(G: nn.Module, ws: torch.Tensor) -> None:
    if ws.ndim != 3 or ws.shape[1:] != (G.num_ws, G.w_dim):
        raise ValueError(f"latents must be (N, {G.num_ws}, {G.w_dim}) for this generator, got {tuple(ws.shape)}")


class _noise_buffers:
    """Temporarily load noise tensors into ``G``'s ``noise_const`` buffers."""

    def __init__(self, G: nn.Module, noise: dict[str, torch.Tensor] | None):
        self.G, self.noise, self.saved = G, noise, {}

    def __enter__(self):
        if self.noise:
            bufs = dict(noise_buffers(self.G))
            unknown = set(self.noise) - set(bufs)
            if unknown:
                raise ValueError(f"noise tensors {sorted(unknown)} do not belong to this generator")
            for name, value in self.noise.items():
                self.saved[name] = bufs[name].detach().clone()
                bufs[name].copy_(value)
        return self

    def __exit__(self, *exc):
        bufs = dict(noise_buffers(self.G))
        for name, value in self.saved.items():
            bufs[name].copy_(value)


def noise_buffers(G: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The generator's per-layer constant noise tensors, by buffer name."""
    return [(n, b) for n, b in G.synthesis.named_buffers() if "noise_const" in n]


# -- projection --------------------------------------------------------------------------------
@dataclass
class Projection:
    """The result of :func:`project`.

    ``ws``: ``(1, num_ws, w_dim)`` the fitted latent; ``noise``: the fitted noise tensors (by
    buffer name; pass to :func:`render` to reproduce ``image``); ``image``: ``(1, 3, R, R)``;
    ``frames``: ``(step, image)`` recorded during the run; ``losses``: per step.
    """

    ws: torch.Tensor
    noise: dict[str, torch.Tensor]
    image: torch.Tensor
    frames: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def _noise_regularisation(noises: list[torch.Tensor]) -> torch.Tensor:
    """Penalise spatial autocorrelation of the noise at every scale (keeps it noise, not content)."""
    reg = noises[0].new_zeros(()) if noises else torch.zeros(())
    for v in noises:
        n = v[None, None] if v.ndim == 2 else v.reshape(1, 1, *v.shape[-2:])
        while True:
            reg = reg + (n * torch.roll(n, 1, dims=3)).mean() ** 2 + (n * torch.roll(n, 1, dims=2)).mean() ** 2
            if n.shape[2] <= 8:
                break
            n = F.avg_pool2d(n, 2)
    return reg


def project(
    G: nn.Module,
    target: torch.Tensor,
    *,
    steps: int = 300,
    space: str = "w",
    perceptual: nn.Module | None = None,
    perceptual_layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_1"),
    pixel_weight: float = 1.0,
    perceptual_size: int = 256,
    lr: float = 0.1,
    lr_rampup: float = 0.05,
    lr_rampdown: float = 0.25,
    initial_noise_factor: float = 0.05,
    noise_ramp: float = 0.75,
    noise_reg_weight: float = 1e5,
    optimise_noise: bool = True,
    stats_samples: int = 10_000,
    record_every: int = 10,
    generator: torch.Generator | None = None,
    callback: Callable[[int, torch.Tensor, float], bool | None] | None = None,
) -> Projection:
    """Find the latent whose image reproduces ``target`` (Karras et al. 2020's projector).

    The latent starts at the average w and is optimised with Adam under a learning-rate
    ramp-up and cosine ramp-down; Gaussian noise on the latent, decaying to zero over the
    first ``noise_ramp`` of the run, helps it escape poor starts. With ``optimise_noise`` the
    per-layer noise inputs are fitted too, regularised so they stay noise.

    Args:
        G: the generator (not modified: a copy is optimised).
        target: ``(1, 3, H, W)`` or ``(3, H, W)`` in [-1, 1]; its centre square is resized to
            the generator's resolution.
        space: ``"w"`` (one vector for every layer) or ``"w+"`` (one per layer: closer fits,
            latents less typical of the generator).
        perceptual: loss network called as ``perceptual(x, layers) -> {layer: features}``
            (:class:`ghibli_core.models.VGGFeatures`); ``None`` uses the pixel term only.
        pixel_weight: weight of the mean squared pixel error next to the feature distance.
        perceptual_size: images are resized to at most this side for the loss network.
        record_every: keep the image every this many steps (and the last) in ``frames``.
        generator: RNG for the latent statistics and the latent noise.
        callback: ``callback(step, image, loss)`` after every step; returning ``True`` stops early.
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if target.ndim == 3:
        target = target[None]
    if target.ndim != 4 or target.shape[:2] != (1, 3):
        raise ValueError(f"target must be (1, 3, H, W) in [-1, 1], got shape {tuple(target.shape)}")
    if float(target.min()) < -1.001 or float(target.max()) > 1.001:
        raise ValueError("target values must be in [-1, 1]")
    device = _device(G)
    G = copy.deepcopy(G).eval().requires_grad_(False).float()
    R = G.resolution
    h, w = target.shape[-2:]
    if h != w:  # centre square, so the painting is not squashed
        s = min(h, w)
        target = target[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    target = F.interpolate(target.float().to(device), size=(R, R), mode="area" if target.shape[-1] > R else "bilinear",
                           align_corners=None if target.shape[-1] > R else False)

    # 1. Start: the average w, and the spread of w for the latent noise.
    w_avg, w_std = latent_stats(G, samples=stats_samples, generator=generator)
    n_w = 1 if space == "w" else G.num_ws
    w_opt = w_avg.to(device).repeat(1, n_w, 1).clone().requires_grad_(True)  # (1, n_w, w_dim)
    noises = [b for _, b in noise_buffers(G)]
    if optimise_noise:
        for b in noises:
            b.copy_(torch.randn(b.shape, generator=generator).to(b))
            b.requires_grad_(True)
    params = [w_opt] + (noises if optimise_noise else [])
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))

    def features(img: torch.Tensor) -> dict[str, torch.Tensor]:
        if img.shape[-1] > perceptual_size:
            img = F.interpolate(img, size=(perceptual_size, perceptual_size), mode="area")
        return perceptual(img, list(perceptual_layers))

    target_feats = {k: v.detach() for k, v in features(target).items()} if perceptual is not None else {}

    # 2. Optimise.
    result = Projection(ws=torch.empty(0), noise={}, image=torch.empty(0))
    for step in range(steps):
        t = step / steps
        noise_strength = w_std * initial_noise_factor * max(0.0, 1.0 - t / noise_ramp) ** 2
        ramp = min(1.0, (1.0 - t) / lr_rampdown)
        ramp = (0.5 - 0.5 * math.cos(ramp * math.pi)) * min(1.0, t / lr_rampup) if lr_rampup > 0 else ramp
        for group in opt.param_groups:
            group["lr"] = lr * ramp
        w_noise = torch.randn(w_opt.shape, generator=generator).to(device) * noise_strength
        ws = (w_opt + w_noise).expand(1, G.num_ws, G.w_dim) if space == "w" else w_opt + w_noise
        img = G.synthesis(ws, noise_mode="const")
        loss = pixel_weight * F.mse_loss(img, target)
        if perceptual is not None:
            feats = features(img)
            # each layer's squared feature distance, normalised by the target's feature energy
            for k, f in feats.items():
                loss = loss + (f - target_feats[k]).square().mean() / (target_feats[k].square().mean() + 1e-8)
        if optimise_noise and noise_reg_weight > 0:
            loss = loss + noise_reg_weight * _noise_regularisation(noises)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if optimise_noise:
            with torch.no_grad():  # keep each noise map zero-mean, unit-variance
                for b in noises:
                    b.sub_(b.mean()).div_(b.square().mean().sqrt() + 1e-8)
        value = float(loss.detach())
        result.losses.append(value)
        last = step == steps - 1
        stop = bool(callback(step + 1, img.detach(), value)) if callback is not None else False
        if (step + 1) % record_every == 0 or last or stop:
            result.frames.append((step + 1, img.detach().clamp(-1, 1).cpu()))
        if stop:
            break

    # 3. The final latent (without the exploration noise) and its image.
    with torch.no_grad():
        final = w_opt.detach().expand(1, G.num_ws, G.w_dim) if space == "w" else w_opt.detach()
        result.ws = final.clone().cpu()
        result.noise = {n: b.detach().clone().cpu() for n, b in noise_buffers(G)} if optimise_noise else {}
        result.image = G.synthesis(final, noise_mode="const").clamp(-1, 1).cpu()
    return result


# -- neighbours and evolution ------------------------------------------------------------------
def neighbours(
    ws: torch.Tensor,
    *,
    n: int = 100,
    sigma: float = 0.5,
    scale: float = 1.0,
    per_layer: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` latents at Gaussian distance around ``ws`` ``(1, num_ws, w_dim)`` -> ``(n, num_ws, w_dim)``.

    Each neighbour is ``ws + sigma * scale * eps`` with ``eps ~ N(0, I)``; ``scale`` is the
    spread of w (from :func:`latent_stats`) so ``sigma`` reads in units of typical variation.
    The same ``eps`` moves every layer unless ``per_layer``. ``sigma = 0`` gives ``ws`` itself.
    """
    if ws.ndim != 3 or ws.shape[0] != 1:
        raise ValueError(f"ws must be one latent (1, num_ws, w_dim), got {tuple(ws.shape)}")
    if n < 1 or sigma < 0:
        raise ValueError(f"need n >= 1 and sigma >= 0, got n={n}, sigma={sigma}")
    shape = (n, ws.shape[1], ws.shape[2]) if per_layer else (n, 1, ws.shape[2])
    eps = torch.randn(shape, generator=generator).to(ws)
    return ws + sigma * scale * eps


class Evolution:
    """Interactive evolution: pick favourites, breed the next generation, step back.

    Args:
        population: latents per generation.
        sigma, scale: the mutation, as in :func:`neighbours`.
        mode: ``"mean"`` (children around the favourites' mean) or ``"crossover"`` (each
            child takes each layer's style from a random favourite, then mutates).
        generator: RNG for mutations and crossover (reproducible sessions).
    """

    def __init__(self, first: torch.Tensor, *, population: int = 16, sigma: float = 0.5, scale: float = 1.0,
                 mode: str = "mean", generator: torch.Generator | None = None):
        if first.ndim != 3 or first.shape[0] < 1:
            raise ValueError(f"the first generation must be (N, num_ws, w_dim), got {tuple(first.shape)}")
        if mode not in ("mean", "crossover"):
            raise ValueError(f"mode must be 'mean' or 'crossover', got {mode!r}")
        if population < 1:
            raise ValueError(f"population must be at least 1, got {population}")
        self.population, self.sigma, self.scale, self.mode = population, sigma, scale, mode
        self.generator = generator
        self.history: list[torch.Tensor] = [first.detach().clone()]

    @property
    def current(self) -> torch.Tensor:
        return self.history[-1]

    @property
    def generation(self) -> int:
        return len(self.history) - 1

    def evolve(self, favourites: Sequence[int], *, sigma: float | None = None, mode: str | None = None) -> torch.Tensor:
        """The next generation from the chosen indices of the current one."""
        cur = self.current
        picks = sorted(set(int(i) for i in favourites))
        if not picks:
            raise ValueError("choose at least one favourite")
        bad = [i for i in picks if not 0 <= i < cur.shape[0]]
        if bad:
            raise ValueError(f"favourites {bad} are not in this generation of {cur.shape[0]}")
        sigma = self.sigma if sigma is None else sigma
        mode = self.mode if mode is None else mode
        parents = cur[picks]  # (P, num_ws, w_dim)
        if mode == "mean" or len(picks) == 1:
            base = parents.mean(0, keepdim=True).expand(self.population, -1, -1)
        elif mode == "crossover":
            which = torch.randint(0, len(picks), (self.population, cur.shape[1]), generator=self.generator)
            base = parents[which, torch.arange(cur.shape[1])[None, :]]  # (population, num_ws, w_dim)
        else:
            raise ValueError(f"mode must be 'mean' or 'crossover', got {mode!r}")
        eps = torch.randn((self.population, 1, cur.shape[2]), generator=self.generator).to(cur)
        nxt = base + sigma * self.scale * eps
        nxt[0] = base[0]  # the first child is the parents' blend itself, unmutated
        self.history.append(nxt.detach().clone())
        return nxt

    def back(self) -> torch.Tensor:
        """Undo the last :meth:`evolve` (the first generation stays)."""
        if len(self.history) > 1:
            self.history.pop()
        return self.current


# -- walks -------------------------------------------------------------------------------------
def ease(t: torch.Tensor, easing: str) -> torch.Tensor:
    if easing == "linear":
        return t
    if easing == "ease-in-out":
        return 0.5 - 0.5 * torch.cos(math.pi * t)
    raise ValueError(f"easing must be one of {EASINGS}, got {easing!r}")


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation along the last dimension (for Gaussian z), ``t`` broadcast."""
    an, bn = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.acos((an * bn).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    linear = torch.lerp(a, b, t)
    curved = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / so.clamp_min(1e-7)
    return torch.where(so < 1e-6, linear, curved)


def walk(
    keyframes: torch.Tensor,
    *,
    frames_per_transition: int = 150,
    space: str = "w",
    easing: str = "linear",
    loop: bool = False,
) -> Iterator[torch.Tensor]:
    """Latents along a path through ``keyframes``, one ``(1, ...)`` tensor per video frame.

    ``space="w"``: keyframes are w+ latents ``(K, num_ws, w_dim)``, interpolated linearly.
    ``space="z"``: keyframes are z ``(K, z_dim)``, interpolated spherically (map each frame
    with ``G.mapping``). Each transition has ``frames_per_transition`` frames starting at its
    first keyframe; the path ends on the last keyframe, or with ``loop`` returns towards the
    first without repeating it, so the video loops seamlessly.
    """
    if space not in ("w", "z"):
        raise ValueError(f"space must be 'w' or 'z', got {space!r}")
    if keyframes.shape[0] < 2:
        raise ValueError(f"a walk needs at least 2 keyframes, got {keyframes.shape[0]}")
    if frames_per_transition < 1:
        raise ValueError(f"frames_per_transition must be at least 1, got {frames_per_transition}")
    ease(torch.zeros(1), easing)  # validate the name before yielding anything
    k = keyframes.shape[0]
    pairs = [(i, i + 1) for i in range(k - 1)] + ([(k - 1, 0)] if loop else [])
    for a, b in pairs:
        for f in range(frames_per_transition):
            t = ease(torch.tensor(f / frames_per_transition, dtype=keyframes.dtype), easing)
            if space == "w":
                yield torch.lerp(keyframes[a], keyframes[b], t)[None]
            else:
                yield slerp(keyframes[a], keyframes[b], t)[None]
    if not loop:
        yield keyframes[-1][None]


def walk_length(n_keyframes: int, *, frames_per_transition: int = 150, loop: bool = False) -> int:
    """How many frames :func:`walk` yields."""
    return (n_keyframes - (0 if loop else 1)) * frames_per_transition + (0 if loop else 1)


def noise_loop(
    ws: torch.Tensor,
    *,
    stops: int = 7,
    frames_between: int = 30,
    sigma: float = 0.5,
    scale: float = 1.0,
    easing: str = "ease-in-out",
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """A closed loop through ``stops`` random points around ``ws`` ``(1, num_ws, w_dim)``.

    The stops are Gaussian neighbours (as :func:`neighbours`); the path visits them in order
    and comes back to the first, ``frames_between`` frames per leg, ``stops * frames_between``
    frames in all, never repeating the first frame at the end (seamless looping video).
    """
    if stops < 2:
        raise ValueError(f"a noise loop needs at least 2 stops, got {stops}")
    points = neighbours(ws, n=stops, sigma=sigma, scale=scale, generator=generator)
    for latent in walk(points, frames_per_transition=frames_between, space="w", easing=easing, loop=True):
        yield latent


# -- latent files ------------------------------------------------------------------------------
def save_latent(path, ws: torch.Tensor, *, noise: dict[str, torch.Tensor] | None = None, **metadata: str) -> None:
    """Write latents (and fitted noise) as safetensors: ``ws`` plus ``noise.<buffer name>`` tensors.

    Written to a temporary name and renamed, so an interrupted write leaves no partial file.
    """
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    if ws.ndim != 3:
        raise ValueError(f"ws must be (N, num_ws, w_dim), got {tuple(ws.shape)}")
    tensors = {"ws": ws.detach().float().cpu().contiguous()}
    for name, value in (noise or {}).items():
        tensors[f"noise.{name}"] = value.detach().float().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_latent(path) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, str]]:
    """``(ws, noise, metadata)`` from a file written by :func:`save_latent` (safetensors only)."""
    from pathlib import Path

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if "ws" not in keys:
                raise ValueError(f"{path} holds no 'ws' tensor (keys: {keys[:5]})")
            ws = f.get_tensor("ws")
            noise = {k[len("noise."):]: f.get_tensor(k) for k in keys if k.startswith("noise.")}
            meta = dict(f.metadata() or {})
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a latent file (safetensors): {exc}") from None
    if ws.ndim != 3:
        raise ValueError(f"{path}: ws must be (N, num_ws, w_dim), got {tuple(ws.shape)}")
    return ws, noise, meta


def save_animation(frames, path, *, fps: float, size: tuple[int, int]):
    """uint8 ``(H, W, 3)`` frames -> an H.264 MP4 (``.mp4``/``.m4v``/``.mov``) or a looping GIF.

    ``size`` is ``(width, height)`` of the frames; MP4 frames are cropped to even sizes (H.264
    yuv420p). Written under a temporary name and renamed when complete. Returns the path.
    """
    import os
    from pathlib import Path

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".m4v", ".mov", ".gif"):
        raise ValueError(f"the output must end in .mp4, .m4v, .mov or .gif, got {path.name}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]
        if not images:
            raise ValueError("no frames to write")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.gif")
        try:
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
    from .video import VideoWriter

    w, h = size
    with VideoWriter(path, size=(w - w % 2, h - h % 2), fps=fps) as writer:
        for frame in frames:
            writer.write(frame[: h - h % 2, : w - w % 2])
    return path
