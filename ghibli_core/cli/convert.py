"""``python -m ghibli_core convert IN.pth -o OUT_DIR``: import a reference CycleGAN checkpoint."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..convert import ARCHS, convert_state_dict, read_checkpoint, save_converted
from . import command


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="state dict in the reference CycleGAN/pix2pix layout (e.g. latest_net_G_A.pth, or .safetensors)",
    )
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="folder to write config.json, model.safetensors, README.md"
    )
    parser.add_argument("--arch", choices=ARCHS, default="auto", help="network layout (default: inferred from the keys)")
    parser.add_argument("--fp16", action="store_true", help="save half-precision weights (half the file size)")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in the output folder")


@command(
    "convert",
    help="Convert a reference CycleGAN/pix2pix checkpoint (.pth state dict) into a ghibli-studio model folder.",
    add_arguments=_add_arguments,
)
def run(args: argparse.Namespace) -> int:
    model, report = convert_state_dict(read_checkpoint(args.checkpoint), arch=args.arch)
    dtype = torch.float16 if args.fp16 else None
    out = save_converted(model, report, args.output, source=args.checkpoint, dtype=dtype, overwrite=args.overwrite)
    print(f"{args.checkpoint} -> {out}")
    print(f"architecture: {report['arch']} (model_type {report['model_type']})")
    for key, value in report["config"].items():
        print(f"  {key}: {value}")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"saved {'float16' if args.fp16 else 'float32'} weights; load with ghibli_core.load_model({str(out)!r})")
    return 0
