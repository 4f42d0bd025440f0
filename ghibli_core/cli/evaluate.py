"""``python -m ghibli_core evaluate``: FID and KID of a photo -> Ghibli model, next to the raw photos.

Example, scoring on held-out films only::

    python -m ghibli_core evaluate --model weights/cyclegan_default \\
        --photos ../shared/data/photos --frames ../shared/data/ghibli_frames \\
        --films howls_moving_castle,kikis_delivery_service,ponyo --json runs/eval.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import command

def find_images(
    root: Path,
    *,
    films: list[str] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    max_images: int | None = None,
) -> list[Path]:
    """Image files under ``root`` (recursively, sorted), filtered and capped.

    Args:
        films: keep only these direct sub-folders of ``root`` (each must exist).
        include, exclude: globs on the path relative to ``root``, with the same meaning as
            ``train``'s ``--include-b``/``--exclude-b`` (:func:`ghibli_core.data.datasets.select_images`;
            ``*`` also crosses folders, so ``ponyo*`` is a whole film).
        max_images: keep at most this many, evenly spaced over the sorted list so that every
            sub-folder stays represented (deterministic).
    """
    from ..data.datasets import select_images

    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {max_images}")
    paths = sorted(select_images([root], include=include or (), exclude=exclude or ()))
    if films:
        missing = [name for name in films if not (root / name).is_dir()]
        if missing:
            available = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise ValueError(f"--films: no sub-folder {missing} under {root}; available: {available}")
        paths = [p for p in paths if p.relative_to(root).parts[0] in films]
        if not paths:
            raise ValueError(f"--films {films}: no images left under {root} after the filters")
    if max_images is not None and len(paths) > max_images:
        step = len(paths) / max_images
        paths = [paths[int(i * step)] for i in range(max_images)]
    return paths


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec: a weights/ folder, a local folder or a Hub repo")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) for a Hub model")
    p.add_argument("--photos", type=Path, required=True, help="folder of photos to translate (searched recursively)")
    p.add_argument("--frames", type=Path, required=True, help="folder of real Ghibli frames (searched recursively)")
    p.add_argument(
        "--films",
        type=lambda s: [name for name in s.split(",") if name],
        default=None,
        metavar="A,B,...",
        help="comma-separated sub-folders of --frames to use (e.g. held-out films); default all",
    )
    p.add_argument(
        "--include", action="append", default=None, metavar="GLOB",
        help="keep only frames whose path relative to --frames matches (repeatable; * crosses folders)",
    )
    p.add_argument(
        "--exclude", action="append", default=None, metavar="GLOB",
        help="drop frames whose path relative to --frames matches (repeatable; applied after --include)",
    )
    p.add_argument("--size", type=int, default=256, help="centre-crop and resize both sets to SIZE x SIZE (256)")
    p.add_argument("--max-images", type=int, metavar="N", help="use at most N photos and N frames, evenly spaced")
    p.add_argument("--device", default="cpu", help="torch device for the model and the Inception network (default cpu)")
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
        help="the model's precision (default auto: what the app and the stylize command use)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at the smaller set)")
    p.add_argument("--seed", type=int, default=0, help="seed of the KID subsets (default 0)")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="also write the numbers to this JSON file")


def _load_cropped(paths: list[Path], size: int, desc: str):
    """Load each image safely and crop it at once, so whole folders of large images fit in memory."""
    from tqdm.auto import tqdm

    from ..imaging import center_crop_resize, load_image

    return [center_crop_resize(load_image(path), size) for path in tqdm(paths, desc=desc, unit="img")]


def format_table(result: dict) -> str:
    """The two rows (model, identity baseline) as a small aligned text table."""
    lines = [f"{'':<10}{'FID':>10}   {'KID x1000 (mean ± std)':>24}"]
    for row in ("model", "identity"):
        r = result[row]
        lines.append(f"{row:<10}{r['fid']:>10.2f}   {r['kid_x1000']:>15.2f} ± {r['kid_std_x1000']:<6.2f}")
    lines.append(
        f"{result['photos']} photos vs {result['frames']} frames at {result['size']}x{result['size']}; "
        f"KID over {result['kid_subsets']} subsets of {result['kid_subset_size']}"
    )
    return "\n".join(lines)


@command("evaluate", "FID and KID of a photo->Ghibli model vs real frames, raw photos as baseline", _add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..hub import load
    from ..metrics import InceptionFeatures, evaluate_translation
    from ..stylize import Stylizer

    # checked before the slow model and image loading
    if args.size < 1:
        raise ValueError(f"--size must be >= 1, got {args.size}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    photo_paths = find_images(args.photos, max_images=args.max_images)
    frame_paths = find_images(
        args.frames, films=args.films, include=args.include, exclude=args.exclude, max_images=args.max_images
    )

    model = load(args.model, revision=args.revision, map_location="cpu")
    stylizer = Stylizer(model, device=args.device, precision=args.precision)
    photos = _load_cropped(photo_paths, args.size, "load photos")
    frames = _load_cropped(frame_paths, args.size, "load frames")

    start = time.perf_counter()
    result = evaluate_translation(
        stylizer.stylize_images,
        photos,
        frames,
        size=args.size,
        features=InceptionFeatures(device=args.device, batch_size=args.batch_size),
        batch_size=args.batch_size,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        seed=args.seed,
        progress=True,
    )
    elapsed = time.perf_counter() - start
    print(format_table(result))
    spec = f"{args.model}@{args.revision}" if args.revision else args.model
    print(f"model {spec}; {elapsed:.0f} s on {args.device}")

    if args.json is not None:
        record = {
            **result,
            "model_spec": args.model,
            "revision": args.revision,
            "precision": args.precision,
            "photos_dir": str(args.photos),
            "frames_dir": str(args.frames),
            "films": args.films,
            "include": args.include,
            "exclude": args.exclude,
            "seconds": round(elapsed, 1),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
