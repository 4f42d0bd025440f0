"""Painting projection on the CPU: a whole projection with the default generator, ours vs textbook.

Runs ``ghibli_core.latent.project`` (the same call the app and the CLI make) twice on the same
target with the same seed: once with our generator, once with the textbook eager fp32
formulation of the same synthesis network (``benchmarks/bench_stylegan.py``: per-sample
modulated weights in a grouped convolution; same weights, same function). Prints the per-step
time of each, the ratio, the wall time of the whole projection (the issue's bar: 300 steps in
under a minute) and how often the app's preview can refresh (it yields a preview at least once
a second).

Run::

    OMP_NUM_THREADS=2 python benchmarks/bench_latent.py [--model ghibli-stylegan2] [--steps 300] \\
        [--vgg ../shared/weights/vgg19_normalised_relu3_1.safetensors]

The machine may be shared: compare the ratio; say what else was running.
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--model", default=hub.DEFAULT_GAN)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--vgg", default=str(SHARED_VGG) if SHARED_VGG.exists() else None)
    args = p.parse_args()
    G = hub.load(args.model).float().eval()
    perceptual = None
    if args.vgg:
        from ghibli_core.models import load_vgg

        perceptual = load_vgg(args.vgg)
    # a target the generator can nearly reach but does not start at: another seed's image
    target = render(G, seed_ws(G, [123]))
    with torch.no_grad():
        same = (G.synthesis(seed_ws(G, [5])) - _Textbook(G).synthesis(seed_ws(G, [5]))).abs().max().item()
    print(f"model {args.model}: {G.resolution} px, {G.num_ws} ws; {torch.get_num_threads()} threads; "
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


if __name__ == "__main__":
    main()
