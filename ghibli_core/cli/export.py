"""``export``: write a trained checkpoint as a small release folder (fp16 safetensors + config + card)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from . import command


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder (config.json + model.safetensors), e.g. RUN/generator")
    p.add_argument("-o", "--out", required=True, help="release folder to write, e.g. weights/my_model")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="stored precision (default fp16)")
    p.add_argument("--card", help="a Markdown model card to ship as README.md")
    p.add_argument("--overwrite", action="store_true", help="replace an existing release folder")


@command("export", "write a checkpoint as a small release folder (fp16 safetensors + config.json + card)", _add)
def run(args: argparse.Namespace) -> int:
    from ..models import load_model

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists: pass --overwrite to replace it")
    model = load_model(args.checkpoint)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[args.dtype]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, dtype=dtype)
    if args.card:
        shutil.copyfile(args.card, tmp / "README.md")
    # the copy must load strictly before it replaces anything
    load_model(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB, {args.dtype})")
    return 0
