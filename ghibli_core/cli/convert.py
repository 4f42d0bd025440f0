"""``python -m ghibli_core convert SOURCE -o OUT_DIR``: import a checkpoint into a ghibli-studio model folder.

Sources, recognised from what they are (or named with ``--arch``):

- a reference CycleGAN/pix2pix state dict (``latest_net_G_A.pth`` or ``.safetensors``);
- a CartoonGAN generator folder of ``.npy`` tensors (``../shared/weights/cartoongan_hayao``);
- an AnimeGANv3 ``.tflite`` file (read without TensorFlow).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..convert import ARCHS, convert_state_dict, read_checkpoint, save_converted
from . import command

ANCHOR_ARCHS = ("cartoongan", "animeganv3")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="a reference CycleGAN/pix2pix state dict (.pth or .safetensors), a CartoonGAN folder of .npy "
        "tensors, or an AnimeGANv3 .tflite file",
    )
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="folder to write config.json, model.safetensors, README.md"
    )
    parser.add_argument(
        "--arch", choices=ARCHS + ANCHOR_ARCHS, default="auto", help="network layout (default: inferred from the source)"
    )
    parser.add_argument("--fp16", action="store_true", help="save half-precision weights (half the file size)")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in the output folder")


def _infer_arch(source: Path, arch: str) -> str:
    from ..convert_cartoongan import is_cartoongan_folder

    if arch != "auto":
        return arch
    if is_cartoongan_folder(source):
        return "cartoongan"
    if source.suffix.lower() == ".tflite":
        return "animeganv3"
    if source.is_dir():
        raise ValueError(
            f"{source} is a folder but not a CartoonGAN one (no conv01_1.weight.npy); "
            "give a checkpoint file, or --arch"
        )
    return "auto"


@command(
    "convert",
    help="Convert a CycleGAN/pix2pix state dict, a CartoonGAN .npy folder or an AnimeGANv3 .tflite file "
    "into a ghibli-studio model folder.",
    add_arguments=_add_arguments,
)
def run(args: argparse.Namespace) -> int:
    if not args.checkpoint.exists():
        raise FileNotFoundError(f"{args.checkpoint} does not exist")
    dtype = torch.float16 if args.fp16 else None
    arch = _infer_arch(args.checkpoint, args.arch)
    if arch == "cartoongan":
        from ..convert_cartoongan import save_cartoongan

        out, report = save_cartoongan(args.checkpoint, args.output, dtype=dtype, overwrite=args.overwrite)
    elif arch == "animeganv3":
        from ..convert_animegan import save_animeganv3

        out, report = save_animeganv3(args.checkpoint, args.output, dtype=dtype, overwrite=args.overwrite)
    else:
        model, report = convert_state_dict(read_checkpoint(args.checkpoint), arch=arch)
        out = save_converted(model, report, args.output, source=args.checkpoint, dtype=dtype, overwrite=args.overwrite)
    print(f"{args.checkpoint} -> {out}")
    print(f"architecture: {report['arch']} (model_type {report['model_type']})")
    for key, value in report["config"].items():
        print(f"  {key}: {value}")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"saved {'float16' if args.fp16 else 'float32'} weights; load with ghibli_core.load_model({str(out)!r})")
    return 0
