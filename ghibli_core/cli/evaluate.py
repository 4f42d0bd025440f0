"""``python -m ghibli_core evaluate``: FID, KID and a content distance of photo -> Ghibli models and
baselines side by side on the same held-out frames; ``evaluate video``: the temporal warping error
of a stylized clip, with and without stabilization.

Several systems in one run, scored against the same frames (their Inception features are
computed once) with the same KID subsets (same ``--seed``), with a contact sheet of the outputs
that were scored::

    python -m ghibli_core evaluate --model identity --model opencv --model /work/anchors/cartoongan \
        --model photo2ghibli --photos ../shared/data/photos --frames ../shared/data/ghibli_frames \
        --films howls_moving_castle,kikis_delivery_service,ponyo \
        --vgg ../shared/weights/vgg19_normalised_relu3_1.safetensors --sheet sheet.png --json eval.json

``--model`` is repeatable (one system each, in that order; no comma lists, since folder names may
hold commas). A value is a model spec (an embedded name, a checkpoint folder, a Hub repo
``owner/name[@revision]``) or a built-in baseline of :data:`ghibli_core.metrics.BASELINES`:
``identity`` (the photos untouched) or ``opencv`` (``cv2.stylization`` with OpenCV's default
arguments). The names of the baselines win over same-named embedded models or folders: write
``./identity`` for a folder of that name. The photos themselves (``identity``) are always scored:
when not listed, they are added as the last row (not on the sheet, whose first column shows them).

Each row: KID x1000 (mean ± std over the subsets), FID, and with ``--vgg`` the *content*
distance, ``1 - cosine`` between the VGG relu3_1 features of each output and of its own photo,
averaged over the photos (:func:`ghibli_core.metrics.content_distance`): 0 for the photos
themselves, higher the more of the photo's structure is gone, so a KID won by blurring or
repainting the photo shows. A single ``--model`` runs as before (the model, then the identity
baseline), and its JSON keeps the old ``model``/``identity`` keys.

and a clip (the warping error of the input, of the frames stylized one by one, and stabilized,
measured along Farneback's optical flow, another method than the stabilizer's, unless
``--metric-flow same``; with ``--frames``, also the KID of both outputs against real Ghibli
frames)::

    python -m ghibli_core evaluate video clip.mp4 --model photo2ghibli --height 360 --stability 0.5 \
        --frames ../shared/data/ghibli_frames --films ponyo --json runs/video_eval.json
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import command

SHEET_HEADER = 20  # pixels of the contact sheet's header row (the column names)

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
    p.add_argument(
        "task", nargs="?", choices=["video"], default=None,
        help="'video' to measure a clip's temporal stability; omit for FID/KID of photos",
    )
    p.add_argument("clip", nargs="?", type=Path, default=None, metavar="CLIP", help="the video clip (with 'video')")
    p.add_argument(
        "--model", action="append", default=None, metavar="SPEC",
        help="a system to score (repeatable, one per --model, in table and sheet order): a model spec "
        "(weights/ folder name, local folder, Hub repo owner/name[@rev]) or a baseline: "
        "identity (the photos untouched), opencv (cv2.stylization). Required for photos; "
        "'video' takes one model, the embedded video model when omitted",
    )
    p.add_argument(
        "--revision", default=None,
        help="Hub revision (branch, tag or commit) for a Hub model; with several models write owner/name@rev",
    )
    p.add_argument(
        "--photos", type=Path, default=None,
        help="folder of photos to translate (searched recursively; required for photos)",
    )
    p.add_argument(
        "--frames", type=Path, default=None,
        help="folder of real Ghibli frames (searched recursively; required for photos, optional for 'video': adds KID)",
    )
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
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default 16; for video about a megapixel, 2 frames at 480p)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at the smaller set)")
    p.add_argument("--seed", type=int, default=0, help="seed of the KID subsets (default 0)")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="also write the numbers to this JSON file")
    p.add_argument(
        "--vgg", default=None, metavar="FILE_OR_REPO",
        help="VGG weights (torchvision layout: .safetensors file or Hub repo) for the content column, e.g. "
        "../shared/weights/vgg19_normalised_relu3_1.safetensors; without it the column is omitted",
    )
    p.add_argument(
        "--sheet", type=Path, default=None, metavar="OUT.png",
        help="write a contact sheet: one row per photo, columns input | each --model, from the scored outputs",
    )
    p.add_argument("--sheet-photos", type=int, default=12, metavar="N", help="photos on the sheet, evenly spaced (12)")
    p.add_argument("--sheet-size", type=int, default=None, metavar="PX", help="sheet cell side, at most --size (default --size)")
    from .video import parse_height, parse_time

    video = p.add_argument_group("video (with 'evaluate video CLIP')")
    video.add_argument(
        "--height", type=parse_height, default=480, metavar="PX",
        help="processing resolution, the shorter side (default 480; 'original')",
    )
    video.add_argument(
        "--stability", type=_strengths, default=[0.5], metavar="S[,S...]",
        help="stabilization strength in [0, 1], or several to compare in one pass, e.g. 0.3,0.5,0.8 (default 0.5)",
    )
    video.add_argument(
        "--metric-flow", choices=["farneback", "same", "fast", "medium"], default="farneback",
        help="optical flow of the warping error: farneback (default: another method than the stabilizer's DIS, "
             "an independent measure), same (the stabilizer's own flow, as before: part of the reduction is then "
             "by construction), or a DIS preset at full resolution",
    )
    video.add_argument("--start", type=parse_time, default=0.0, metavar="T", help="start at T seconds (default 0)")
    video.add_argument("--end", type=parse_time, default=None, metavar="T", help="stop at T seconds (default: the end)")


def _load_cropped(paths: list[Path], size: int, desc: str):
    """Load each image safely and crop it at once, so whole folders of large images fit in memory."""
    from tqdm.auto import tqdm

    from ..imaging import center_crop_resize, load_image

    return [center_crop_resize(load_image(path), size) for path in tqdm(paths, desc=desc, unit="img")]


def format_table(result: dict) -> str:
    """:func:`ghibli_core.metrics.evaluate_translation`'s two rows (model, identity) as a small text table."""
    lines = [f"{'':<10}{'FID':>10}   {'KID x1000 (mean ± std)':>24}"]
    for row in ("model", "identity"):
        r = result[row]
        lines.append(f"{row:<10}{r['fid']:>10.2f}   {r['kid_x1000']:>15.2f} ± {r['kid_std_x1000']:<6.2f}")
    lines.append(
        f"{result['photos']} photos vs {result['frames']} frames at {result['size']}x{result['size']}; "
        f"KID over {result['kid_subsets']} subsets of {result['kid_subset_size']}"
    )
    return "\n".join(lines)


CONTENT_MEASURE = "1 - cosine of VGG {layer} features, each output vs its own photo, mean over the photos"


def format_systems(rows: list[dict], settings: dict) -> str:
    """One aligned row per system: name | KID x1000 (mean ± std) | FID | content (when measured).

    ``rows`` are the JSON rows of :func:`run` (``name``, ``kid_x1000``, ``kid_std_x1000``,
    ``fid``, and ``content`` None or a float); ``settings`` the counts and KID settings.
    """
    with_content = any(r.get("content") is not None for r in rows)
    table = [["system", "KID x1000 (mean ± std)", "FID"] + (["content"] if with_content else [])]
    for r in rows:
        cells = [r["name"], f"{r['kid_x1000']:.2f} ± {r['kid_std_x1000']:.2f}", f"{r['fid']:.2f}"]
        if with_content:
            cells.append("-" if r.get("content") is None else f"{r['content']:.4f}")
        table.append(cells)
    # widths from the cells themselves (FIDs of small test sets run to many digits)
    widths = [max(len(line[c]) for line in table) for c in range(len(table[0]))]
    lines = [
        "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(line, widths)))
        for line in table
    ]
    size = settings["size"]
    lines.append(
        f"{settings['photos']} photos vs {settings['frames']} frames at {size}x{size}; KID over "
        f"{settings['kid_subsets']} subsets of {settings['kid_subset_size']} (seed {settings['seed']}), "
        "the same for every system"
    )
    if with_content:
        layer = settings.get("content_layer", "relu3_1")
        lines.append("content: " + CONTENT_MEASURE.format(layer=layer) + " (0 = the photo itself)")
    else:
        lines.append("content: not measured (give --vgg FILE_OR_REPO to add the column)")
    return "\n".join(lines)


@dataclass(frozen=True)
class System:
    """One ``--model`` value: a built-in baseline or a model spec (checked, not loaded yet).

    ``name`` is the value as given; ``kind`` ``"baseline"``, ``"embedded"``, ``"local"`` or
    ``"hub"``; ``spec`` the parsed spec (None for a baseline); ``listed`` False for the identity
    row added when ``--model`` does not name it.
    """

    name: str
    kind: str
    spec: object = None
    listed: bool = True

    def label(self, parts: int = 1) -> str:
        """A short name for the contact sheet's header and the progress bars: the last ``parts``
        parts of the folder path, or the repo name (with its ``@revision``)."""
        if self.kind in ("local", "embedded"):
            return "/".join(Path(str(self.spec)).parts[-parts:])
        if self.kind == "hub":
            return str(self.spec) if parts > 1 else str(self.spec).split("/", 1)[-1]
        return self.name


def short_labels(systems: Sequence[System]) -> list[str]:
    """Each system's :meth:`System.label`, one path part longer where two would read the same
    (``runs/a/generator`` and ``runs/b/generator`` become ``a/generator`` and ``b/generator``)."""
    labels = [s.label() for s in systems]
    for parts in range(2, 8):
        twice = {x for x in labels if labels.count(x) > 1}
        if not twice:
            break
        labels = [s.label(parts) if x in twice else x for s, x in zip(systems, labels)]
    return labels


def parse_systems(values: Sequence[str], *, revision: str | None = None) -> list[System]:
    """Check every ``--model`` value before anything slow: baselines by name, specs parsed, and
    embedded and local checkpoint folders checked (a Hub repo is only fetched when it runs).

    Raises ValueError naming the bad value, with the baselines and the spec forms it could be.
    """
    from ..hub import parse_spec, resolve
    from ..metrics import BASELINES

    baselines = ", ".join(BASELINES)
    names = [v.strip() for v in values]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"--model {name!r} is given twice")
    models = [n for n in names if n not in BASELINES]
    if revision and len(models) != 1:
        raise ValueError(
            f"--revision applies to a single model, got {len(models)} models: write owner/name@revision for each Hub repo"
        )
    systems = []
    for name in names:
        if name in BASELINES:
            systems.append(System(name, "baseline"))
            continue
        try:
            spec = parse_spec(name, revision)
            if spec.kind != "hub":
                resolve(spec)  # a folder check: config.json with a known model_type, model.safetensors
        except ValueError as exc:
            raise ValueError(f"--model {name!r}: {exc} (or a built-in baseline: {baselines})") from None
        systems.append(System(name, spec.kind, spec))
    if "identity" not in names:
        systems.append(System("identity", "baseline", listed=False))
    return systems


def sheet_indices(n: int, count: int) -> list[int]:
    """``count`` evenly spaced indices of ``n`` items (all of them when ``count >= n``), like ``--max-images``."""
    if count >= n:
        return list(range(n))
    return [int(i * n / count) for i in range(count)]


def contact_sheet(columns: Sequence[tuple[str, Sequence]], *, cell: int, header: int = SHEET_HEADER):
    """A grid: one column per ``(name, images)`` pair, one row per image, under a header row of the names.

    Every image is shown as a ``cell`` x ``cell`` square (resized with Lanczos when it is
    another size); the result is ``(cell * columns, header + cell * rows)`` pixels, RGB.
    Names too wide for a cell are cut short, ending in '..'.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not columns:
        raise ValueError("contact_sheet: no columns")
    if cell < 1 or header < 0:
        raise ValueError(f"contact_sheet: cell must be >= 1 and header >= 0, got {cell} and {header}")
    rows = len(columns[0][1])
    if any(len(images) != rows for _, images in columns):
        raise ValueError(f"contact_sheet: columns differ in length: {[len(images) for _, images in columns]}")
    sheet = Image.new("RGB", (cell * len(columns), header + cell * rows), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for c, (name, images) in enumerate(columns):
        text = name
        while text and draw.textlength(text, font=font) > cell - 4:
            text = text[:-4] + ".." if len(text) > 2 else ""
        if header:
            draw.text((c * cell + 2, 2), text, fill="black", font=font)
        for r, img in enumerate(images):
            if img.size != (cell, cell):
                img = img.resize((cell, cell), Image.Resampling.LANCZOS)
            sheet.paste(img.convert("RGB"), (c * cell, header + r * cell))
    return sheet


def _check_photo_args(args: argparse.Namespace) -> None:
    """Every check that needs no file: before the slow model and image loading."""
    from PIL import Image

    if args.size < 1:
        raise ValueError(f"--size must be >= 1, got {args.size}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.sheet is not None:
        if args.sheet.suffix.lower() not in Image.registered_extensions():
            raise ValueError(f"--sheet {args.sheet}: unknown image extension (use .png or .jpg)")
        if args.sheet_photos < 1:
            raise ValueError(f"--sheet-photos must be >= 1, got {args.sheet_photos}")
        if args.sheet_size is None:
            args.sheet_size = args.size
        if not 1 <= args.sheet_size <= args.size:
            raise ValueError(f"--sheet-size must be between 1 and --size ({args.size}), got {args.sheet_size}")


def _translator(system: System, args: argparse.Namespace):
    """``list[PIL] -> list[PIL]`` for one system (loads a model now)."""
    from ..hub import load
    from ..metrics import BASELINES
    from ..stylize import Stylizer

    if system.kind == "baseline":
        return BASELINES[system.name]
    model = load(system.spec, map_location="cpu")
    return Stylizer(model, device=args.device, precision=args.precision).stylize_images


@command(
    "evaluate",
    "FID, KID and content distance of photo->Ghibli models and baselines side by side vs real frames; "
    "'evaluate video CLIP': temporal warping error with and without stabilization",
    _add_arguments,
)
def run(args: argparse.Namespace) -> int:
    if args.task == "video":
        return run_video(args)
    required = (("--model", args.model), ("--photos", args.photos), ("--frames", args.frames))
    missing = [flag for flag, value in required if not value]
    if missing:
        raise ValueError(f"the following arguments are required: {', '.join(missing)} (or use 'evaluate video CLIP')")
    if args.clip is not None:
        raise ValueError(f"unexpected argument {args.clip}; to evaluate a clip use 'evaluate video CLIP'")
    if args.batch_size is None:
        args.batch_size = 16
    from ..metrics import CONTENT_LAYER, InceptionFeatures, TranslationEvaluator, content_distance

    # 1. everything checked before the slow model and image loading
    _check_photo_args(args)
    systems = parse_systems(args.model, revision=args.revision)
    photo_paths = find_images(args.photos, max_images=args.max_images)
    frame_paths = find_images(
        args.frames, films=args.films, include=args.include, exclude=args.exclude, max_images=args.max_images
    )
    vgg = None
    if args.vgg is not None:
        from ..models.perceptual import load_vgg

        vgg = load_vgg(args.vgg, device=args.device)

    # 2. the images, once; the frames' features on the first score
    photos = _load_cropped(photo_paths, args.size, "load photos")
    frames = _load_cropped(frame_paths, args.size, "load frames")
    evaluator = TranslationEvaluator(
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
    on_sheet = sheet_indices(len(photos), args.sheet_photos) if args.sheet is not None else []
    sheet_columns = [("input", [evaluator.photos[i] for i in on_sheet])]

    # 3. each system: translate, score, content; only the sheet's outputs are kept
    start = time.perf_counter()
    rows = []
    for system, label in zip(systems, short_labels(systems)):
        began = time.perf_counter()
        translate = _translator(system, args)
        outputs = evaluator.translate_photos(translate, desc=f"{label}: translate")
        del translate  # a model's memory goes before the next one loads
        scores = evaluator.score(outputs, desc=f"{label}: inception")
        distances = None
        if vgg is not None:
            distances = content_distance(
                vgg, outputs, evaluator.photos, batch_size=max(1, args.batch_size // 2), progress=True,
                desc=f"{label}: content",
            )
        if system.listed:
            sheet_columns.append((label, [outputs[i] for i in on_sheet]))
        rows.append({
            "name": system.name,
            "kind": system.kind,
            "spec": None if system.spec is None else str(system.spec),
            "listed": system.listed,
            **scores,
            "content": None if distances is None else float(distances.mean()),
            "content_std": None if distances is None else float(distances.std()),
            "seconds": round(time.perf_counter() - began, 1),
        })
    elapsed = time.perf_counter() - start
    settings = {**evaluator.settings(), "content_layer": CONTENT_LAYER}
    print(format_systems(rows, settings))
    print(f"{len(rows)} systems; {elapsed:.0f} s on {args.device}")

    if args.sheet is not None:
        sheet = contact_sheet(sheet_columns, cell=args.sheet_size)
        args.sheet.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.sheet.with_name(f".{args.sheet.stem}.tmp{args.sheet.suffix}")
        sheet.save(tmp)
        tmp.replace(args.sheet)
        print(f"wrote {args.sheet} ({len(on_sheet)} photos x {len(sheet_columns)} columns)")

    if args.json is not None:
        record = {
            "systems": rows,
            **evaluator.settings(),
            "content": None if vgg is None else {
                "vgg": str(args.vgg), "layer": CONTENT_LAYER, "measure": CONTENT_MEASURE.format(layer=CONTENT_LAYER),
            },
            "sheet": None if args.sheet is None else {
                "path": str(args.sheet),
                "cell": args.sheet_size,
                "columns": [name for name, _ in sheet_columns],
                "photos": [photo_paths[i].relative_to(args.photos).as_posix() for i in on_sheet],
            },
            "precision": args.precision,
            "device": args.device,
            "photos_dir": str(args.photos),
            "frames_dir": str(args.frames),
            "films": args.films,
            "include": args.include,
            "exclude": args.exclude,
            "max_images": args.max_images,
            "revision": args.revision,
            "seconds": round(elapsed, 1),
        }
        scores_of = lambda row: {k: row[k] for k in ("fid", "kid", "kid_std", "kid_x1000", "kid_std_x1000")}  # noqa: E731
        record["identity"] = scores_of(next(r for r in rows if r["name"] == "identity"))
        if len(args.model) == 1:  # the single-model record, as before
            record["model"] = scores_of(rows[0])
            record["model_spec"] = args.model[0]
        _write_json(args.json, record)
    return 0


def _write_json(path: Path, record: dict) -> None:
    """Write ``record`` to ``path`` whole or not at all (temp name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


# -- evaluate video ---------------------------------------------------------------------------
def _strengths(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected strengths like 0.5 or 0.3,0.5,0.8, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"strengths must be between 0 and 1, got {text!r}")
    return values


def format_video_table(result: dict) -> str:
    """The warping errors (and KIDs when measured) as a small text table."""
    kid = result.get("kid")
    lines = ["warping error (Lai et al. 2018: RGB in [0, 1], non-occluded pixels; lower is steadier)"]
    lines.append(f"  {'input':<22}{result['input']:>10.5f}")
    row = f"  {'stylized':<22}{result['stylized']:>10.5f}"
    if kid:
        row += f"{'':<22}KID x1000 {kid['stylized_x1000']:.2f} ± {kid['stylized_std_x1000']:.2f}"
    lines.append(row)
    for item in result["sweep"]:
        s = item["strength"]
        row = f"  {f'stabilized ({s:g})':<22}{item['stabilized']:>10.5f}   ({-100 * item['reduction']:+.1f}% vs stylized)"
        if kid:
            k = kid["stabilized"][str(s)]
            row += f"   KID x1000 {k['x1000']:.2f} ± {k['std_x1000']:.2f} ({100 * k['change']:+.1f}%)"
        lines.append(row)
    lines.append(
        f"{result['frames']} frames ({result['pairs']} pairs, {result['cuts']} at scene cuts skipped) at "
        f"{result['width']}x{result['height']}; warping measured with "
        + ("the stabilizer's own flow" if result.get("metric_flow", "same") == "same"
           else f"an independent flow ({result['metric_flow']})")
    )
    if kid:
        lines.append(f"KID against {kid['frames']} Ghibli frames, {kid['samples']} output frames each")
    return "\n".join(lines)


def run_video(args: argparse.Namespace) -> int:
    """``evaluate video CLIP``: warping errors of the input, the stylized and the stabilized frames."""
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from ..hub import default_video_model, load
    from ..imaging import center_crop_resize
    from ..temporal import FlowEstimator, evaluate_stability
    from ..video import FrameReader, as_frame_model, auto_batch_size, expected_frames, output_size, probe

    if args.clip is None:
        raise ValueError("evaluate video needs the clip: evaluate video CLIP [--model SPEC]")
    if args.photos is not None:
        raise ValueError("--photos is for the photo evaluation; 'evaluate video' measures a clip")
    if args.model and len(args.model) > 1:
        raise ValueError(f"evaluate video takes one --model, got {len(args.model)}: {args.model}")
    if args.vgg is not None or args.sheet is not None:
        raise ValueError("--vgg and --sheet are for the photo evaluation, not 'evaluate video'")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    # 1. the clip and the reference frames are checked before the model loads
    info = probe(args.clip)
    total = expected_frames(info, args.start, args.end)
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    frame_paths = None
    if args.frames is not None:
        frame_paths = find_images(
            args.frames, films=args.films, include=args.include, exclude=args.exclude, max_images=args.max_images
        )
    size = output_size(info, args.height)
    batch_size = args.batch_size or auto_batch_size(size)
    args.model = args.model[0] if args.model else default_video_model()
    model = load(args.model, revision=args.revision, map_location="cpu")
    run_model = as_frame_model(model, size, device=args.device, precision=args.precision, batch_size=batch_size)

    # 2. one pass: flow on the input, stylize, stabilize, measure; keep crops for KID
    every = max(1, -(-total // 300))  # at most ~300 samples of each output for KID
    samples: dict[str, list] = {"stylized": [], **{str(s): [] for s in args.stability}}

    def keep(index: int, stylized, stabilized: dict) -> None:
        if frame_paths is not None and index % every == 0:
            samples["stylized"].append(center_crop_resize(Image.fromarray(stylized), args.size))
            for s, frame in stabilized.items():
                samples[str(s)].append(center_crop_resize(Image.fromarray(frame), args.size))

    start = time.perf_counter()
    with FrameReader(info, size=size, start=args.start, end=args.end) as reader, \
            tqdm(total=total, desc="evaluate video", unit="frame") as bar:
        metric_flow = None if args.metric_flow == "same" else FlowEstimator(preset=args.metric_flow, max_side=1 << 16)
        result = evaluate_stability(
            reader, run_model, strength=args.stability, metric_flow=metric_flow, batch_size=batch_size, on_output=keep,
            progress=lambda n: bar.update(n - bar.n),
        )
    result.update(width=size[0], height=size[1], metric_flow=args.metric_flow)

    # 3. optional: KID of both outputs against real Ghibli frames (does stabilizing cost style?)
    if frame_paths is not None:
        from ..metrics import InceptionFeatures, kid

        features = InceptionFeatures(device=args.device, batch_size=16)
        real = features(_load_cropped(frame_paths, args.size, "load frames"), progress=True, desc="frames")
        kid_result: dict = {"frames": len(frame_paths), "samples": len(samples["stylized"]), "stabilized": {}}
        for key, images in samples.items():
            feats = features(images, progress=True, desc="stylized" if key == "stylized" else f"stabilized {key}")
            mean, std = kid(
                feats, real, subsets=args.kid_subsets, subset_size=args.kid_subset_size,
                generator=np.random.default_rng(args.seed),
            )
            if key == "stylized":
                kid_result["stylized_x1000"], kid_result["stylized_std_x1000"] = 1000 * mean, 1000 * std
            else:
                kid_result["stabilized"][key] = {"x1000": 1000 * mean, "std_x1000": 1000 * std}
        base = kid_result["stylized_x1000"]
        for entry in kid_result["stabilized"].values():
            entry["change"] = (entry["x1000"] - base) / abs(base) if base else 0.0
        result["kid"] = kid_result
    elapsed = time.perf_counter() - start
    print(format_video_table(result))
    spec = f"{args.model}" + (f"@{args.revision}" if args.revision else "")
    print(f"{args.clip.name}: {info.describe()}; model {spec}; {elapsed:.0f} s on {args.device}")
    if args.json is not None:
        record = {
            **result,
            "clip": str(args.clip),
            "model_spec": args.model,
            "revision": args.revision,
            "start": args.start,
            "end": args.end,
            "seconds": round(elapsed, 1),
        }
        _write_json(args.json, record)
    return 0
