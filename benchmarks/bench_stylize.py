"""Stylization speed: the fast path against the same network in eager float32, in one process.

    python benchmarks/bench_stylize.py                      # weights/photo2ghibli, else two random ResNets
    python benchmarks/bench_stylize.py --arch width=32,n_blocks=9,upsample=resize --repeats 7
    python benchmarks/bench_stylize.py --compare            # also bf16 and unfused channels-last

Both paths run on the same 512x512 input (a real photo from ../shared/data/photos when present,
else a synthetic one), alternating baseline and fast runs so that load from other processes hits
both alike. Prints per-image times (median and best), their ratios, the PSNR of the fast output
against float32 eager, and the process's peak RSS. The product bar: ratio >= 2, PSNR >= 35 dB.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ghibli_core.imaging import center_crop_resize, list_images, load_image, to_tensor  # noqa: E402
from ghibli_core.models import ResnetGenerator, load_model  # noqa: E402
from ghibli_core.stylize import Stylizer  # noqa: E402

DEFAULT_CHECKPOINT = ROOT / "weights" / "photo2ghibli"
PHOTOS = ROOT.parent / "shared" / "data" / "photos"
DEFAULT_ARCHS = ["width=32,n_blocks=9,upsample=resize", "width=64,n_blocks=9,upsample=resize"]


def parse_arch(text: str) -> dict:
    """``width=32,n_blocks=9,upsample=resize`` -> ResnetGenerator keyword arguments."""
    kwargs: dict = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--arch: expected key=value items, got {item!r}")
        kwargs[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return kwargs


def make_input(size: int) -> tuple[torch.Tensor, str]:
    """``(1, 3, size, size)`` in [-1, 1]: the first shared photo, centre-cropped, else synthetic."""
    if PHOTOS.is_dir():
        path = list_images(PHOTOS)[0]
        return to_tensor(center_crop_resize(load_image(path), size)), f"photo {path.name}"
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = torch.stack([torch.sin(3 * xx + 1), torch.cos(2 * yy - xx), xx * yy])
    noise = torch.randn(3, size, size, generator=g) * 0.1
    return (0.8 * base + noise).clamp(-1, 1)[None], "synthetic (no ../shared/data/photos)"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (peak-to-peak 2)."""
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_model(name: str, model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace) -> None:
    model = model.eval().float()
    print(f"\n== {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    variants: list[tuple[str, dict]] = [(f"fast ({args.precision})", dict(precision=args.precision))]
    if args.compare:
        variants += [
            ("bf16 + channels-last, unfused", dict(precision="bf16", fuse=False)),
            ("fp32 + channels-last, unfused", dict(precision="fp32", fuse=False)),
        ]
    with torch.inference_mode():
        start = time.perf_counter()
        reference = model(x)  # warm-up and the float32 reference output
        print(f"eager fp32 first call {time.perf_counter() - start:.2f} s, peak RSS {peak_rss_mb():.0f} MB")
        for label, kwargs in variants:
            try:
                start = time.perf_counter()
                stylizer = Stylizer(model, device=args.device, tile_size=max(x.shape[2:]), **kwargs)
                prepared = time.perf_counter() - start
            except ValueError as exc:
                print(f"{label}: unavailable here ({exc})")
                continue
            start = time.perf_counter()
            out = stylizer.stylize_tensor(x)  # warm-up
            first = time.perf_counter() - start
            base_t, fast_t = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                model(x)
                base_t.append(time.perf_counter() - start)
                start = time.perf_counter()
                out = stylizer.stylize_tensor(x)
                fast_t.append(time.perf_counter() - start)
            pair_ratios = [b / f for b, f in zip(base_t, fast_t)]
            print(
                f"{label} [{stylizer.dtype}, prepare {prepared:.2f} s, first call {first:.2f} s]\n"
                f"  eager fp32: median {statistics.median(base_t):.3f} s, best {min(base_t):.3f} s per image\n"
                f"  fast path : median {statistics.median(fast_t):.3f} s, best {min(fast_t):.3f} s per image\n"
                f"  speed-up  : {statistics.median(base_t) / statistics.median(fast_t):.2f}x (medians), "
                f"{min(base_t) / min(fast_t):.2f}x (best), {statistics.median(pair_ratios):.2f}x (median of pairs)\n"
                f"  PSNR vs fp32 eager: {psnr(out, reference):.1f} dB; peak RSS so far {peak_rss_mb():.0f} MB"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help=f"checkpoint folder (default {DEFAULT_CHECKPOINT.relative_to(ROOT)} if present)")
    p.add_argument("--arch", action="append", help="random-init ResnetGenerator kwargs, e.g. width=32,n_blocks=9,upsample=resize (repeatable)")
    p.add_argument("--size", type=int, default=512, help="input side in pixels (default 512)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each path (default 5)")
    p.add_argument("--precision", default="auto", help="fast path precision (default auto)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--compare", action="store_true", help="also time bf16 and fp32 channels-last without the rewrites")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    caps = torch.cpu.get_capabilities()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {caps.get('cpu_name', '?')} "
        f"(avx512_bf16={caps.get('avx512_bf16', False)}, amx_bf16={caps.get('amx_bf16', False)}), "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    x, source = make_input(args.size)
    print(f"input: {source}, {args.size}x{args.size}")

    models: list[tuple[str, torch.nn.Module]] = []
    checkpoint = args.model or (DEFAULT_CHECKPOINT if (DEFAULT_CHECKPOINT / "config.json").is_file() and not args.arch else None)
    if checkpoint is not None:
        models.append((f"checkpoint {checkpoint}", load_model(checkpoint)))
    for arch in args.arch or ([] if checkpoint is not None else DEFAULT_ARCHS):
        kwargs = parse_arch(arch)
        torch.manual_seed(0)
        models.append((f"ResnetGenerator({arch}), random init", ResnetGenerator(**kwargs)))
    for name, model in models:
        bench_model(name, model, x.to(args.device), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
