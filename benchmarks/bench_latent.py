"""Painting projection on the CPU: a whole projection with the default generator, ours vs textbook.

Runs ``ghibli_core.latent.project`` (the same call the app and the CLI make) twice on the same
target with the same seed: once with our generator, once with the textbook eager fp32
formulation of the same synthesis network (``benchmarks/bench_stylegan.py``: per-sample
modulated weights in a grouped convolution; same weights, same function). Prints the per-step
time of each, the ratio, the wall time of the whole projection (the issue's bar: 300 steps in
under a minute) and how often the app's preview can refresh (it yields a preview at least once
a second).

Run::

    OMP_NUM_THREADS=2 python benchmarks/bench_latent.py [--model ghibli-stylegan2 [--model runs/x/generator]] \\
        [--steps 300] [--vgg ../shared/weights/vgg19_normalised_relu3_1.safetensors]

Several ``--model`` values run one after another in the same process, so an old and a new
generator are measured on the same machine in the same state. The machine may be shared:
compare the ratio; say what else was running.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_stylegan import reference_synthesis  # noqa: E402

from ghibli_core import hub  # noqa: E402
from ghibli_core.latent import project, render, seed_ws  # noqa: E402

SHARED_FRAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ghibli_frames"
SHARED_VGG = Path(__file__).resolve().parents[2] / "shared" / "weights" / "vgg19_normalised_relu3_1.safetensors"


class _TextbookSynthesis(nn.Module):
    """The same synthesis network (shares its parameters and noise buffers), run the textbook way."""

    def __init__(self, G):
        super().__init__()
        self.inner = G.synthesis  # registered, so named_buffers() finds the noise_const buffers
        self._G = [G]

    def forward(self, ws, noise_mode="const"):
        return reference_synthesis(self._G[0], ws, noise_mode=noise_mode)


class _Textbook(nn.Module):
    def __init__(self, G):
        super().__init__()
        self.mapping = G.mapping
        self.synthesis = _TextbookSynthesis(G)
        self.z_dim, self.w_dim, self.num_ws, self.resolution = G.z_dim, G.w_dim, G.num_ws, G.resolution


def timed_projection(G, target, *, steps, perceptual) -> tuple[float, float, float]:
    """(seconds per step after the first 5, whole wall seconds, final loss)."""
    marks = []
    start = time.perf_counter()
    result = project(G, target, steps=steps, perceptual=perceptual, stats_samples=2000,
                     generator=torch.Generator().manual_seed(0),
                     callback=lambda step, img, loss: marks.append(time.perf_counter()))
    wall = time.perf_counter() - start
    per_step = (marks[-1] - marks[4]) / (len(marks) - 5)
    return per_step, wall, result.losses[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None,
                   help=f"a generator spec; repeat to measure several in one run (default: {hub.DEFAULT_GAN})")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--vgg", default=str(SHARED_VGG) if SHARED_VGG.exists() else None)
    p.add_argument("--frames", default=str(SHARED_FRAMES) if SHARED_FRAMES.exists() else None,
                   help="Ghibli frames folder for the quality check (held-out films)")
    p.add_argument("--films", default="howls_moving_castle,kikis_delivery_service,ponyo")
    p.add_argument("--n-frames", type=int, default=6)
    args = p.parse_args()
    perceptual = None
    if args.vgg:
        from ghibli_core.models import load_vgg

        perceptual = load_vgg(args.vgg)
    for i, spec in enumerate(args.model or [hub.DEFAULT_GAN]):
        if i:
            print()
        bench_model(spec, perceptual, args)


def bench_model(spec: str, perceptual, args) -> None:
    G = hub.load(spec).float().eval()
    # a target the generator can nearly reach but does not start at: another seed's image
    target = render(G, seed_ws(G, [123]))
    with torch.no_grad():
        same = (G.synthesis(seed_ws(G, [5])) - _Textbook(G).synthesis(seed_ws(G, [5]))).abs().max().item()
    print(f"model {spec}: {G.resolution} px, {G.num_ws} ws; {torch.get_num_threads()} threads; "
          f"perceptual {'VGG ' + Path(args.vgg).name if args.vgg else 'none (pixels only)'}; "
          f"ours vs textbook max |diff| {same:.2e}")
    ours = timed_projection(G, target, steps=args.steps, perceptual=perceptual)
    base = timed_projection(_Textbook(G), target, steps=args.steps, perceptual=perceptual)
    print(f"{'':10}{'s/step':>10}{'total s':>10}{'final loss':>12}")
    for name, (per, wall, loss) in (("ours", ours), ("textbook", base)):
        print(f"{name:10}{per:10.4f}{wall:10.1f}{loss:12.4f}")
    print(f"ratio (textbook / ours, per step): {base[0] / ours[0]:.2f}x")
    print(f"{args.steps}-step projection: {ours[1]:.1f} s (bar: under 60 s); "
          f"{1 / ours[0]:.0f} steps per second, so the app's preview (every >= 1 s) never waits for a step")

    # 2. A gallery of 16 neighbours, and a 150-frame walk rendered and encoded (as the app does).
    import tempfile

    from ghibli_core.latent import latent_stats, neighbours, save_animation, walk
    from ghibli_core.imaging import to_uint8

    _, spread = latent_stats(G, samples=2000, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    render(G, neighbours(seed_ws(G, [1]), n=16, sigma=0.5, scale=spread, generator=torch.Generator().manual_seed(0)))
    gallery_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        frames = (to_uint8(render(G, w))[0] for w in walk(seed_ws(G, [1, 2]), frames_per_transition=149))
        save_animation(frames, Path(tmp) / "walk.mp4", fps=30, size=(G.resolution, G.resolution))
        walk_s = time.perf_counter() - start
    print(f"gallery of 16 neighbours: {gallery_s:.2f} s (bar: under 2 s); "
          f"150-frame walk rendered and encoded: {walk_s:.1f} s (bar: under 30 s)")

    # 3. Quality on held-out Ghibli frames: the projection against the average-w image and the
    #    best of 100 random samples (by the same VGG distance), PSNR and VGG distance each.
    if args.frames:
        quality(G, perceptual, args)


def _distance(perceptual, a, b) -> float:
    if perceptual is None:
        return float((a - b).square().mean())
    layers = ["relu1_2", "relu2_2", "relu3_1"]
    fa, fb = perceptual(a, layers), perceptual(b, layers)
    return float(sum((fa[k] - fb[k]).square().mean() / (fb[k].square().mean() + 1e-8) for k in layers))


def _psnr(a, b) -> float:
    mse = float(((a - b) / 2).square().mean())  # images in [-1, 1] -> [0, 1] scale
    return 10 * math.log10(1 / max(mse, 1e-12))


@torch.no_grad()
def quality(G, perceptual, args) -> None:
    from ghibli_core.data.datasets import select_images
    from ghibli_core.imaging import center_crop_resize, load_image, to_tensor

    paths = select_images([args.frames], include=[f"{f}/*" for f in args.films.split(",")])
    paths = paths[:: max(1, len(paths) // args.n_frames)][: args.n_frames]
    avg = render(G, G.mapping.w_avg.float().repeat(1, G.num_ws, 1))
    randoms = render(G, seed_ws(G, list(range(1000, 1100))))
    rows = []
    for path in paths:
        target = to_tensor(center_crop_resize(load_image(path), G.resolution))
        with torch.enable_grad():
            proj = project(G, target, steps=args.steps, perceptual=perceptual, stats_samples=2000,
                           generator=torch.Generator().manual_seed(0)).image
        best = min(range(100), key=lambda i: _distance(perceptual, randoms[i : i + 1], target))
        rows.append([(_distance(perceptual, x, target), _psnr(x, target)) for x in (proj, avg, randoms[best : best + 1])])
    print(f"quality on {len(rows)} held-out frames ({args.films}), mean over frames:")
    print(f"{'':22}{'VGG distance':>14}{'PSNR dB':>10}")
    for j, name in enumerate(("projection", "average w", "best of 100 random")):
        d = sum(r[j][0] for r in rows) / len(rows)
        q = sum(r[j][1] for r in rows) / len(rows)
        print(f"{name:22}{d:14.4f}{q:10.2f}")
    wins = sum(r[0][0] < min(r[1][0], r[2][0]) and r[0][1] > max(r[1][1], r[2][1]) for r in rows)
    print(f"projection better on both measures than both baselines for {wins}/{len(rows)} frames")


if __name__ == "__main__":
    main()
