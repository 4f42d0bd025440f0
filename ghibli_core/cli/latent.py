"""``project`` and ``walk``: a painting into the generator's latent space, and videos through it.

Examples::

    python -m ghibli_core project painting.png -o out/ --vgg ../shared/weights/vgg19_normalised_relu3_1.safetensors
    python -m ghibli_core walk --seeds 1,2,3 -o walk.mp4
    python -m ghibli_core walk --latents out/latent.safetensors other.safetensors -o walk.gif --frames 60
    python -m ghibli_core walk --seeds 5 --noise-loop --stops 7 --frames-between 30 -o loop.mp4
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import command



def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are comma-separated integers like 1,2,3, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds are non-negative integers like 1,2,3, got {text!r}")
    return seeds


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="StyleGAN2 model spec: a weights/ name, a folder or owner/name (default: the embedded generator)")
    p.add_argument("--revision", default=None, help="Hub revision for a Hub model")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _load_generator(args):
    import torch

    from ..hub import DEFAULT_GAN, load

    G = load(args.model or DEFAULT_GAN, revision=args.revision, map_location=torch.device(args.device))
    missing = [a for a in ("mapping", "synthesis", "num_ws", "w_dim", "z_dim") if not hasattr(G, a)]
    if missing:
        raise ValueError(f"{args.model or DEFAULT_GAN} is a {type(G).__name__}, not a StyleGAN2 generator (it lacks {', '.join(missing)})")
    return G


def write_video(frames, path: Path, *, fps: float, size: tuple[int, int], total: int | None = None, desc: str = "frames") -> Path:
    """:func:`ghibli_core.latent.save_animation` with a progress bar."""
    from tqdm.auto import tqdm

    from ..latent import save_animation

    with tqdm(total=total, desc=desc, unit="frame") as bar:

        def counted():
            for frame in frames:
                yield frame
                bar.update(1)

        return save_animation(counted(), path, fps=fps, size=size)


def _frames_of(G, latents, *, size: int | None, noise=None, batch_size: int = 4, mapping_from_z: bool = False, psi: float = 1.0):
    """Render an iterator of ``(1, ...)`` latents in small batches -> uint8 frames."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ..latent import render
    from ..imaging import to_uint8

    def flush(batch):
        ws = torch.cat(batch)
        if mapping_from_z:
            with torch.no_grad():
                ws = G.mapping(ws.to(next(G.parameters()).device), truncation_psi=psi)
        imgs = render(G, ws, noise=noise)
        if size and size != imgs.shape[-1]:
            imgs = F.interpolate(imgs, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
        for img in imgs:
            yield np.ascontiguousarray(to_uint8(img[None])[0])

    batch = []
    for latent in latents:
        batch.append(latent)
        if len(batch) == batch_size:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)


# -- project -----------------------------------------------------------------------------------
def _add_project(p: argparse.ArgumentParser) -> None:
    p.add_argument("painting", type=Path, help="the image to project (its centre square is used)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    _model_args(p)
    p.add_argument("--steps", type=_positive, default=300, help="optimisation steps (default 300)")
    p.add_argument("--space", choices=["w", "w+"], default="w", help="one latent for all layers (w) or one per layer (w+)")
    p.add_argument("--vgg", default=os.environ.get("GHIBLI_VGG"), metavar="FILE_OR_REPO",
                   help="VGG weights for the perceptual distance (default $GHIBLI_VGG; without it, pixels only)")
    p.add_argument("--no-noise", action="store_true", help="keep the generator's noise inputs fixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record-every", type=_positive, default=5, help="progress video: one frame every N steps")
    p.add_argument("--fps", type=float, default=30.0, help="progress video frame rate")


@command("project", "project a painting into the StyleGAN2 latent space", _add_project)
def run_project(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from ..imaging import center_crop_resize, load_image, to_tensor, to_uint8
    from ..latent import project, save_latent

    painting = load_image(args.painting)  # clear errors for non-images, bombs, etc.
    G = _load_generator(args)
    perceptual = None
    if args.vgg:
        from ..models.perceptual import load_vgg

        perceptual = load_vgg(args.vgg, device=args.device)
    else:
        print("note: no --vgg (or $GHIBLI_VGG) given: projecting with the pixel distance only")
    R = G.resolution
    target = to_tensor(center_crop_resize(painting, R)).to(args.device)  # (1, 3, R, R) in [-1, 1]
    bar = tqdm(total=args.steps, desc="project", unit="step")

    def progress(step, image, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    try:
        result = project(G, target, steps=args.steps, space=args.space, perceptual=perceptual,
                         optimise_noise=not args.no_noise, record_every=args.record_every,
                         generator=torch.Generator().manual_seed(args.seed), callback=progress)
    finally:
        bar.close()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    def save_png(arr, name):
        tmp = out / f".{name}.tmp.png"
        Image.fromarray(arr).save(tmp)
        os.replace(tmp, out / name)

    target_u8 = to_uint8(target.cpu())[0]
    save_png(target_u8, "target.png")
    save_png(to_uint8(result.image)[0], "projected.png")
    save_latent(out / "latent.safetensors", result.ws, noise=result.noise, model=str(args.model or "default"),
                space=args.space, steps=str(args.steps), loss=f"{result.losses[-1]:.6f}")
    frames = (np.concatenate([target_u8, to_uint8(img)[0]], axis=1) for _, img in result.frames)
    write_video(frames, out / "progress.mp4", fps=args.fps, size=(2 * R, R), total=len(result.frames), desc="progress video")
    print(f"projected: {out / 'projected.png'} (loss {result.losses[-1]:.4f}); latent: {out / 'latent.safetensors'}")
    return 0


# -- walk --------------------------------------------------------------------------------------
def _add_walk(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--seeds", type=_seeds, help="keyframes from random seeds, e.g. 1,2,3")
    src.add_argument("--latents", nargs="+", type=Path, metavar="FILE", help="keyframes from latent files (from project or the app)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output .mp4 (H.264) or .gif")
    _model_args(p)
    p.add_argument("--frames", type=_positive, default=150, help="frames per transition (default 150)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate (default 30)")
    p.add_argument("--space", choices=["w", "z"], default="w", help="interpolate linearly in w, or spherically in z (seeds only)")
    p.add_argument("--easing", choices=["linear", "ease-in-out"], default="linear")
    p.add_argument("--loop", action="store_true", help="return to the first keyframe (seamless loop)")
    p.add_argument("--truncation", type=float, default=1.0, help="truncation psi for seeds (1 = none)")
    p.add_argument("--noise-loop", action="store_true", help="a loop of random stops around the (single) keyframe instead")
    p.add_argument("--stops", type=_positive, default=7, help="noise-loop stops (default 7)")
    p.add_argument("--frames-between", type=_positive, default=30, help="noise-loop frames between stops (default 30)")
    p.add_argument("--sigma", type=float, default=0.5, help="noise-loop distance, in units of typical w variation")
    p.add_argument("--seed", type=int, default=0, help="RNG seed for the noise loop")
    p.add_argument("--size", type=_positive, default=None, help="output frame size (default: the generator's)")


@command("walk", "render a latent walk or noise loop to MP4/GIF", _add_walk)
def run_walk(args: argparse.Namespace) -> int:
    import torch

    from ..latent import latent_stats, load_latent, noise_loop, seed_ws, seed_z, walk, walk_length

    if args.out.suffix.lower() not in (".mp4", ".m4v", ".mov", ".gif"):
        raise ValueError(f"the output must end in .mp4, .mov or .gif, got {args.out}")
    if args.fps <= 0:
        raise ValueError(f"--fps must be positive, got {args.fps}")
    G = _load_generator(args)
    from_z = False
    if args.latents:
        if args.space == "z":
            raise ValueError("--space z needs --seeds (latent files hold w latents)")
        rows = []
        for path in args.latents:
            ws, _, _ = load_latent(path)
            if ws.shape[1:] != (G.num_ws, G.w_dim):
                raise ValueError(f"{path} holds latents of shape {tuple(ws.shape[1:])}, this generator needs ({G.num_ws}, {G.w_dim})")
            rows.append(ws[:1])
        keys = torch.cat(rows)
    elif args.space == "z":
        keys, from_z = seed_z(G, args.seeds), True
    else:
        keys = seed_ws(G, args.seeds, truncation_psi=args.truncation).cpu()
    if args.noise_loop:
        if keys.shape[0] != 1 or from_z:
            raise ValueError("--noise-loop goes around one keyframe in w: give one seed or one latent file")
        _, spread = latent_stats(G, samples=2000, generator=torch.Generator().manual_seed(args.seed))
        latents = noise_loop(keys, stops=args.stops, frames_between=args.frames_between, sigma=args.sigma,
                             scale=spread, generator=torch.Generator().manual_seed(args.seed))
        total = args.stops * args.frames_between
    else:
        if keys.shape[0] < 2:
            raise ValueError("a walk needs at least 2 keyframes (or one with --noise-loop)")
        latents = walk(keys, frames_per_transition=args.frames, space="z" if from_z else "w", easing=args.easing, loop=args.loop)
        total = walk_length(keys.shape[0], frames_per_transition=args.frames, loop=args.loop)
    size = args.size or G.resolution
    frames = _frames_of(G, latents, size=size, mapping_from_z=from_z, psi=args.truncation)
    write_video(frames, args.out, fps=args.fps, size=(size, size), total=total, desc="walk")
    print(f"walk: {args.out} ({total} frames at {args.fps:g} fps)")
    return 0
