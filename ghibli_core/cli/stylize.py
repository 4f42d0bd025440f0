"""``python -m ghibli_core stylize``: photos or whole folders -> Ghibli-style images.

Examples::

    python -m ghibli_core stylize photo.jpg -o photo_ghibli.png
    python -m ghibli_core stylize holiday/ more/ -o out/ --model owner/name --revision v1 --max-side 1024

One input file: ``-o`` is the output file when it has an image extension (its extension picks the
format) and is not an existing folder; otherwise (``-o out/``, ``-o out.d``, ``-o results``) it is a
folder, made when missing. Several inputs, or a folder: ``-o`` is a folder; images found in an
input folder keep their path relative to it, and outputs are PNG unless ``--format`` says otherwise.
A file that cannot be read as an image, or is under ``imaging.MIN_SIDE`` (16) pixels on a side, is
reported by name and skipped; the exit code is 1 when any input failed. Every output is written
under a temporary name and renamed when complete, so an interrupted run never leaves a
half-written image behind.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import command, stylize_diffusion

# Output formats by file extension, with the Pillow options used to write them.
_FORMATS: dict[str, tuple[str, dict]] = {
    ".png": ("PNG", {"optimize": False}),
    ".jpg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".jpeg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".webp": ("WEBP", {"quality": 95}),
    ".bmp": ("BMP", {}),
    ".tif": ("TIFF", {"compression": "tiff_deflate"}),
    ".tiff": ("TIFF", {"compression": "tiff_deflate"}),
}


@dataclass(frozen=True)
class Job:
    """One image to stylize: where it comes from and where its result goes."""

    source: Path
    target: Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, metavar="PHOTO_OR_DIR", help="image files and/or folders (searched recursively)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output file (one input file, with an image extension) or folder")
    p.add_argument("--model", default=None, help="model spec: a weights/ name, a local folder or a Hub repo owner/name, or diffusion:REPO[@REV] for a Stable Diffusion model (default: the embedded default model)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) for a Hub model")
    p.add_argument("--max-side", type=_positive_int, default=None, metavar="N", help="downscale inputs so the longer side is at most N pixels (outputs have that size); default: full size")
    p.add_argument("--strength", type=_unit_float, default=1.0, help="blend with the original: 0 = the photo, 1 = fully stylized (default 1)")
    p.add_argument("--format", choices=sorted({ext.lstrip(".") for ext in _FORMATS} - {"jpeg", "tiff"}), default="png", help="output format when OUT is a folder (default png)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="compute precision (default auto: the fastest one the device runs accurately)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist (default: skip them)")
    stylize_diffusion.add_arguments(p)


# -- planning ---------------------------------------------------------------------------------
def plan_jobs(inputs: list[Path], out: Path, *, fmt: str = "png") -> list[Job]:
    """Map every input image to its output path (no file is read or written).

    Args:
        inputs: image files and folders; folders are searched recursively.
        out: the output file (only for one input file, and only when it has an image
            extension and is not an existing folder) or else the output folder.
        fmt: extension of outputs written into a folder.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: an input file is not an image, a folder holds none, ``out`` is an existing
            file where a folder is needed, or two inputs would write the same output.
    """
    from ..imaging import list_images

    if f".{fmt}" not in _FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {sorted(_FORMATS)}")
    single_file = len(inputs) == 1 and inputs[0].is_file()
    if single_file and out.suffix.lower() in _FORMATS and not out.is_dir():
        list_images(inputs)  # same "is this an image file" check as for folders
        return [Job(inputs[0], out)]
    if out.exists() and not out.is_dir():
        hint = f"; an output file needs an image extension ({', '.join(sorted(_FORMATS))})" if single_file else ""
        raise ValueError(f"-o {out} is an existing file, not a folder{hint}")

    # a run whose output folder sits inside an input folder must not stylize its own outputs
    out_resolved = out.resolve()
    jobs: list[Job] = []
    for root in inputs:
        images = list_images(root)
        for image in images:
            if root.is_dir() and image.resolve().is_relative_to(out_resolved):
                continue
            rel = Path(image.name) if root.is_file() else image.relative_to(root)
            jobs.append(Job(image, out / rel.with_suffix(f".{fmt}")))

    by_target: dict[Path, Path] = {}
    for job in jobs:
        other = by_target.setdefault(job.target, job.source)
        if other != job.source:
            raise ValueError(
                f"{other} and {job.source} would both be written to {job.target}; "
                f"stylize them in separate runs or rename one"
            )
    return jobs


# -- writing ----------------------------------------------------------------------------------
def save_atomic(image, target: Path) -> None:
    """Write ``image`` to ``target`` through a temporary file in the same folder and a rename.

    The rename is atomic on one file system, so ``target`` is either the old file, absent, or
    the complete new image, even if the process is killed while encoding.
    """
    fmt, options = _FORMATS[target.suffix.lower()]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format=fmt, **options)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@command("stylize", "turn photos (files or folders) into Ghibli-style images", _add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..diffusion import is_diffusion_spec
    from ..hub import DEFAULT_MODEL, load
    from ..imaging import MIN_SIDE, ImageLoadError, load_image
    from ..stylize import Stylizer

    device = torch.device(args.device)  # raises RuntimeError on a malformed name
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")

    # 1. decide every output before loading the model, so a wrong path fails in a second
    jobs = plan_jobs(args.inputs, args.out, fmt=args.format)
    if not jobs:
        raise ValueError(f"no images to stylize: every image found is inside the output folder {args.out}")
    todo = [job for job in jobs if args.overwrite or not job.target.exists()]
    skipped = len(jobs) - len(todo)
    if skipped:
        print(f"skipping {skipped} image(s) whose output exists (pass --overwrite to replace them)", file=sys.stderr)
    if not todo:
        print(f"nothing to do: all {len(jobs)} output(s) exist in {args.out}")
        return 0

    # 2. one model, one engine for the whole batch
    if is_diffusion_spec(args.model):
        stylizer = stylize_diffusion.make_stylizer(args, device)
    else:
        stylize_diffusion.check_unused(args)
        model = load(args.model or DEFAULT_MODEL, revision=args.revision, map_location="cpu")
        stylizer = Stylizer(model, device=str(device), precision=args.precision)

    # 3. images one at a time: sizes differ, and the engine tiles and batches inside an image
    failed: list[str] = []

    def fail(message: str) -> None:
        failed.append(message)
        tqdm.write(f"skipped {message}", file=sys.stderr)

    done = 0
    with tqdm(todo, desc="stylize", unit="img", file=sys.stderr) as bar:
        for job in bar:
            bar.set_postfix_str(job.source.name, refresh=False)
            try:
                photo = load_image(job.source, max_side=args.max_side, min_side=MIN_SIDE)
            except ImageLoadError as exc:
                # the loader's messages name the file already
                fail(str(exc) if str(job.source) in str(exc) else f"{job.source}: {exc}")
                continue
            result = stylizer(photo, strength=args.strength)
            try:
                save_atomic(result, job.target)
            except OSError as exc:
                fail(f"{job.source}: cannot write {job.target}: {exc}")
                continue
            done += 1

    # name where the results went only when something was written there
    where = "" if not done else f" -> {todo[0].target if len(jobs) == 1 else args.out}"
    print(f"stylized {done} image(s){where}" + (f"; {len(failed)} failed" if failed else ""))
    if failed:
        print(f"{len(failed)} failed:", file=sys.stderr)
        for message in failed:
            print(f"  {message}", file=sys.stderr)
        return 1
    return 0
