"""StyleGAN2 on the CPU: our generator against a textbook eager fp32 formulation, and training-step cost.

1. Generator (same weights, same function, checked): ours (modulation on activations, one
   batched convolution, demodulation fused with the bias, gains folded, in-place noise and
   activation) against the textbook formulation of StyleGAN2 (per-sample modulated and
   demodulated weights in a grouped convolution, then separate noise, bias, activation and gain
   ops), both eager fp32. Timed: a 16-image gallery forward, and a projection step (one image,
   forward + backward to ``ws`` and the noise buffers), and a generator training pass (16 images,
   forward + backward to the weights). A last column times the textbook layers with the other
   upsampling (bilinear, then the 3x3 convolution at the high resolution; not the same function,
   cost only), the choice StyleGAN2's stride-2 transposed convolution + blur was measured against.
2. ``--train-steps N``: N training steps of ``train_stylegan`` at the given config on synthetic
   data; prints wall seconds and CPU seconds (all threads) per step.

Run::

    OMP_NUM_THREADS=2 python benchmarks/bench_stylegan.py                      # the CPU default config
    OMP_NUM_THREADS=2 python benchmarks/bench_stylegan.py --model stylegan64   # an embedded/trained generator
    OMP_NUM_THREADS=2 python benchmarks/bench_stylegan.py --train-steps 20 --batch-size 16

The machine may be shared: compare the ratios, not the absolute times.
"""
from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghibli_core.models.stylegan import StyleGAN2Generator, SynthesisLayer, ToRGB  # noqa: E402

CPU_DEFAULT = dict(resolution=64, z_dim=256, w_dim=256, mapping_layers=2, channel_base=4096, channel_max=256)


# -- the textbook formulation ------------------------------------------------------------------
def _ref_layer(layer: SynthesisLayer, x, w, noise_mode: str, up_mode: str):
    n = x.shape[0]
    styles = layer.affine(w)
    out_ch, in_ch, k, _ = layer.weight.shape
    weight = layer.weight / math.sqrt(in_ch * k * k)
    wm = weight.unsqueeze(0) * styles.reshape(n, 1, in_ch, 1, 1)  # (N, O, I, k, k)
    wm = wm * (wm.square().sum((2, 3, 4), keepdim=True) + 1e-8).rsqrt()
    if layer.up and up_mode == "transpose":
        xt = x.reshape(1, n * in_ch, *x.shape[2:])
        wt = wm.transpose(1, 2).reshape(n * in_ch, out_ch, k, k)
        x = F.conv_transpose2d(xt, wt, stride=2, groups=n).reshape(n, out_ch, 2 * x.shape[2] + 1, -1)
        f = torch.tensor([1.0, 3.0, 3.0, 1.0])
        f = (torch.outer(f, f) / 16).reshape(1, 1, 4, 4).expand(out_ch, 1, 4, 4)
        x = F.conv2d(F.pad(x, (1, 1, 1, 1)), f, groups=out_ch)
    else:
        if layer.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        h, wd = x.shape[2:]
        x = F.conv2d(x.reshape(1, n * in_ch, h, wd), wm.reshape(n * out_ch, in_ch, k, k), padding=k // 2, groups=n)
        x = x.reshape(n, out_ch, h, wd)
    if noise_mode == "const" and layer.use_noise:  # layers below the generator's noise_min_res have none
        x = x + layer.noise_const * layer.noise_strength
    x = x + layer.bias.reshape(1, -1, 1, 1)
    return F.leaky_relu(x, 0.2) * math.sqrt(2)


def _ref_torgb(torgb: ToRGB, x, w):
    n, in_ch = x.shape[:2]
    styles = torgb.affine(w) / math.sqrt(in_ch)
    wm = (torgb.weight.unsqueeze(0) * styles.reshape(n, 1, in_ch, 1, 1)).reshape(n * 3, in_ch, 1, 1)
    y = F.conv2d(x.reshape(1, n * in_ch, *x.shape[2:]), wm, groups=n).reshape(n, 3, *x.shape[2:])
    return y + torgb.bias.reshape(1, 3, 1, 1)


def reference_synthesis(G: StyleGAN2Generator, ws: torch.Tensor, *, noise_mode: str = "const", up_mode: str = "transpose"):
    x = img = None
    i = 0
    for block in G.synthesis.blocks:
        wb = ws[:, i : i + block.num_conv + 1]
        if block.first:
            x = (block.input(wb[:, 0]).reshape(ws.shape[0], -1, 4, 4) if block.mapped
                 else block.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1))
            x = _ref_layer(block.conv1, x, wb[:, 0], noise_mode, up_mode)
        else:
            x = _ref_layer(block.conv0, x, wb[:, 0], noise_mode, up_mode)
            x = _ref_layer(block.conv1, x, wb[:, 1], noise_mode, up_mode)
        y = _ref_torgb(block.torgb, x, wb[:, block.num_conv])
        img = y if img is None else F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False) + y
        i += block.num_conv
    return img


# -- timing ------------------------------------------------------------------------------------
def _time_interleaved(fns, reps: int) -> list[float]:
    """Median seconds of each function, run in turns (so drifting load hits all alike)."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def bench_generator(G: StyleGAN2Generator, *, reps: int) -> None:
    G = G.eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength") and float(p) == 0.0:
                p.fill_(0.1)  # untrained: make the noise path do real work
    z = torch.randn(16, G.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ws = G.mapping(z)
        ours, ref = G.synthesis(ws), reference_synthesis(G, ws)
    err = float((ours - ref).abs().max())
    print(f"generator {G.resolution}px, {sum(p.numel() for p in G.parameters()) / 1e6:.2f} M parameters; "
          f"max |ours - textbook| = {err:.2e}")
    if err > 1e-3 * max(1.0, float(ref.abs().max())):
        raise SystemExit("the two formulations disagree: the benchmark would compare different functions")

    def gallery(synth):
        def run():
            with torch.inference_mode():
                synth(ws)
        return run

    w1 = ws[:1].clone()
    noise = [b for n, b in G.synthesis.named_buffers() if "noise_const" in n]

    def projection(synth):
        def run():
            w = w1.clone().requires_grad_(True)
            for b in noise:
                b.requires_grad_(True)
            img = synth(w)
            img.square().mean().backward()
            for b in noise:
                b.grad = None
                b.requires_grad_(False)
        return run

    def training(synth):
        def run():
            G.requires_grad_(True)
            synth(G.mapping(z)).square().mean().backward()
            G.zero_grad(set_to_none=True)
            G.requires_grad_(False)
        return run

    rows = [
        ("gallery: 16 images, forward", gallery(G.synthesis), gallery(lambda w: reference_synthesis(G, w)),
         gallery(lambda w: reference_synthesis(G, w, up_mode="bilinear"))),
        ("projection step: 1 image, fwd + bwd", projection(G.synthesis),
         projection(lambda w: reference_synthesis(G, w)),
         projection(lambda w: reference_synthesis(G, w, up_mode="bilinear"))),
        ("training pass: 16 images, fwd + bwd", training(G.synthesis), training(lambda w: reference_synthesis(G, w)),
         training(lambda w: reference_synthesis(G, w, up_mode="bilinear"))),
    ]
    print(f"{'':38s} {'ours':>9s} {'textbook':>9s} {'ratio':>6s} {'bilinear up':>12s}")
    for name, *fns in rows:
        ours_t, ref_t, official_t = _time_interleaved(fns, reps)
        print(f"{name:38s} {ours_t * 1000:7.1f}ms {ref_t * 1000:7.1f}ms {ref_t / ours_t:5.2f}x {official_t * 1000:10.1f}ms")


def bench_training(args) -> None:
    from PIL import Image

    from ghibli_core.training.stylegan import StyleGANConfig, train_stylegan

    tmp = Path(tempfile.mkdtemp(prefix="bench_stylegan_"))
    try:
        rng = np.random.default_rng(0)
        (tmp / "data").mkdir()
        for i in range(32):
            img = rng.integers(0, 255, (args.resolution + 8, args.resolution + 24, 3), dtype=np.uint8)
            Image.fromarray(img).save(tmp / "data" / f"{i}.png")
        cfg = StyleGANConfig(
            data=[str(tmp / "data")], out=str(tmp / "run"), resolution=args.resolution, z_dim=args.z_dim,
            w_dim=args.w_dim, mapping_layers=args.mapping_layers, channel_base=args.channel_base,
            channel_max=args.channel_max, d_channel_base=args.channel_base, d_channel_max=args.channel_max,
            batch_size=args.batch_size, steps=args.train_steps + 1, pl_weight=args.pl_weight,
            log_every=10**6, sample_every=10**6, save_every=10**6, num_samples=4,
        )
        # one step first (allocations, R1 at step 0), then the timed steps (R1 once every 16)
        train_stylegan(cfg, progress=False, cpu=True, stop_after=1)
        wall, cpu = time.perf_counter(), time.process_time()
        train_stylegan(cfg, progress=False, cpu=True, resume=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        n = args.train_steps
        print(f"training {args.resolution}px, batch {args.batch_size}, widths base {args.channel_base} max "
              f"{args.channel_max}: {wall / n:.2f} s/step wall, {cpu / n:.2f} CPU-s/step "
              f"(incl. checkpoint + export once), {torch.get_num_threads()} threads")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a trained generator spec (default: untrained at the CPU default config)")
    for key, value in CPU_DEFAULT.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=0, help="also time N training steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pl-weight", type=float, default=0.0)
    args = p.parse_args()
    if args.model:
        from ghibli_core.hub import load

        G = load(args.model)
    else:
        torch.manual_seed(0)
        G = StyleGAN2Generator(**{k: getattr(args, k) for k in CPU_DEFAULT})
    bench_generator(G, reps=args.reps)
    if args.train_steps:
        bench_training(args)


if __name__ == "__main__":
    main()
