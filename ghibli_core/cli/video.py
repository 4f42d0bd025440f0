"""``python -m ghibli_core video``: a clip -> a Ghibli-style clip with the original sound.

Examples::

    python -m ghibli_core video clip.mp4 -o clip_ghibli.mp4
    python -m ghibli_core video clip.mp4 -o out.mp4 --model owner/name --height 720 --stability 0.7 \\
        --start 0:05 --end 0:15 --side-by-side --frames-dir frames/

The output is an H.264 MP4 (plays in browsers) at the processing resolution (``--height``: the
shorter side, never upscaled), with the input's frame rate, duration and audio. It is written
under a temporary name and renamed when complete; ``--frames-dir`` also keeps every output
frame as a PNG (the old extract-and-reassemble workflow, for editing frames by hand).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import command


def parse_time(text: str) -> float:
    """Seconds from ``"12.5"``, ``"1:02.5"`` or ``"1:00:02"``."""
    try:
        parts = [float(p) for p in text.strip().split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or [h:]m:s, got {text!r}") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or any(p >= 60 for p in parts[1:]):
        raise argparse.ArgumentTypeError(f"expected seconds or [h:]m:s, got {text!r}")
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + p
    return seconds


def parse_height(text: str) -> int | None:
    """``480``, ``480p`` or ``original`` (None)."""
    value = text.strip().lower()
    if value in ("original", "orig", "0"):
        return None
    try:
        height = int(value.removesuffix("p"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a height in pixels (360, 480, 720) or 'original', got {text!r}"
        ) from None
    if height < 16:
        raise argparse.ArgumentTypeError(f"the height must be at least 16 pixels, got {height}")
    return height


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from ..video import VideoLimits

    limits = VideoLimits()
    add = p.add_argument
    add("input", type=Path, metavar="IN", help="the video clip (MP4, MOV, MKV, WebM, AVI, ...)")
    add("-o", "--out", required=True, type=Path, metavar="OUT.mp4", help="the output video (.mp4, .m4v or .mov)")
    add("--model", default=None,
        help="model spec: a weights/ name, a local folder or a Hub repo owner/name (default: the embedded video "
             "model ghibli-video-fast, or photo2ghibli where it is missing)")
    add("--revision", default=None, help="Hub revision (branch, tag or commit) for a Hub model")
    add("--height", type=parse_height, default=480, metavar="PX",
        help="processing resolution: the shorter side in pixels (360, 480, 720; never upscaled) or 'original' "
             "(default 480)")
    add("--stability", type=_unit_float, default=0.5,
        help="temporal stabilization strength: 0 = off, 1 = strongest (default 0.5)")
    add("--start", type=parse_time, default=0.0, metavar="T", help="start at T (seconds or [h:]m:s; default 0)")
    add("--end", type=parse_time, default=None, metavar="T", help="stop at T (default: the end of the clip)")
    add("--side-by-side", action="store_true", help="output original | stylized, side by side")
    add("--frames-dir", type=Path, default=None, metavar="DIR",
        help="also save every output frame as DIR/frame_000001.png, ...")
    add("--batch-size", type=_positive_int, default=None,
        help="frames per model call (default: about a megapixel per call, 2 at 480p)")
    add("--device", default="cpu", help="torch device: cpu, cuda or cuda:N (default cpu)")
    add("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="compute precision (default auto)")
    add("--crf", type=int, default=20, help="H.264 quality, 0-51, lower is better (default 20)")
    add("--preset", default="veryfast", choices=["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"],
        help="H.264 encoder speed (default veryfast)")
    add("--max-seconds", type=float, default=limits.max_seconds,
        help=f"refuse to process more than this many seconds (default {limits.max_seconds:g})")
    add("--max-pixels", type=int, default=limits.max_pixels,
        help=f"refuse input frames above this many pixels (default {limits.max_pixels:,})")
    add("--overwrite", action="store_true", help="replace OUT if it exists")


@command("video", "stylize a video clip (temporally stable, original sound)", _add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..hub import default_video_model, load
    from ..video import (
        VideoLimits, check_limits, expected_frames, output_size, probe, reuse_freed_memory, stylize_video,
    )
    from .stylize import save_atomic

    device = torch.device(args.device)  # raises RuntimeError on a malformed name
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} exists; pass --overwrite to replace it")
    if args.frames_dir is not None and args.frames_dir.exists() and not args.frames_dir.is_dir():
        raise ValueError(f"--frames-dir {args.frames_dir} exists and is not a folder")

    # 1. everything about the input is checked before the model loads
    limits = VideoLimits(max_seconds=args.max_seconds, max_pixels=args.max_pixels)
    info = probe(args.input)
    check_limits(info, limits, start=args.start, end=args.end)
    size = output_size(info, args.height)
    print(f"{args.input.name}: {info.describe()}; processing at {size[0]}x{size[1]}", file=sys.stderr)

    # 2. the model, then the streaming job
    reuse_freed_memory()  # a one-job process: keep freed blocks for the next frame
    model = load(args.model or default_video_model(), revision=args.revision, map_location="cpu")
    on_frame = None
    if args.frames_dir is not None:
        from PIL import Image

        args.frames_dir.mkdir(parents=True, exist_ok=True)

        def on_frame(index, frame):
            save_atomic(Image.fromarray(frame), args.frames_dir / f"frame_{index + 1:06d}.png")

    total = expected_frames(info, args.start, args.end)
    start_time = time.perf_counter()
    with tqdm(total=total, desc="video", unit="frame", file=sys.stderr) as bar:

        def progress(done: int, expected: int) -> None:
            if expected != bar.total:
                bar.total = expected
            bar.update(done - bar.n)

        result = stylize_video(
            info,
            args.out,
            model,
            height=args.height,
            stability=args.stability,
            start=args.start,
            end=args.end,
            side_by_side=args.side_by_side,
            batch_size=args.batch_size,
            device=str(device),
            precision=args.precision,
            limits=limits,
            crf=args.crf,
            preset=args.preset,
            on_frame=on_frame,
            progress=progress,
        )
    elapsed = time.perf_counter() - start_time
    w, h = result.size
    audio = "with audio" if result.has_audio else "no audio"
    print(
        f"wrote {result.path}: {result.frames} frames, {w}x{h}, {float(result.fps):.3g} fps, "
        f"{result.duration:.2f} s, {audio}; {elapsed:.0f} s ({result.frames / max(elapsed, 1e-9):.2f} frames/s)"
    )
    if args.frames_dir is not None:
        print(f"frames in {args.frames_dir}")
    return 0
