"""``prepare``: films and photo folders -> curated training sets.

``prepare frames VIDEO_OR_DIR... --out DIR``  frames at N fps: bars cropped, black/blank/fade
                                              frames and near-duplicates dropped, 256 px squares
``prepare images DIR... --out DIR``           the same clean-up for photos (EXIF, RGB, size)
``prepare palette DIR [--out DIR]``           HSL K-means palettes, warmth, groups, contact sheets
``prepare overlap DIR --held-out A,B``        held-out frames that share a shot with training frames

Each writes or updates ``DIR/manifest.jsonl`` (one line per image), a dataset card
(``DIR/README.md``) and its job record ``DIR/.prepare.json`` (sources, settings, progress), so an
interrupted run resumes where it stopped and a finished one is not redone. Image files are
written under a temporary name and renamed, so none is ever half-written.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import math
import re
import sys
import time
from pathlib import Path

from . import command

STATE_NAME = ".prepare.json"


# -- arguments ----------------------------------------------------------------------------------
def _add_cleanup(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("clean-up")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--size", type=int, default=256, help="square output side: resize and centre-crop (default 256)")
    size.add_argument("--full-size", action="store_true", help="keep the full picture (bars still cropped for films)")
    g.add_argument("--black-level", type=float, default=0.1,
                   help="drop images whose brightest 2%% are darker than this (luma 0..1, default 0.1)")
    g.add_argument("--blank-std", type=float, default=0.02,
                   help="drop images whose luma standard deviation is below this: flat colours (default 0.02)")
    g.add_argument("--dup-threshold", type=int, default=8,
                   help="near-duplicate when perceptual hashes differ by at most this many of 64 bits (default 8)")
    g.add_argument("--keep-duplicates", action="store_true", help="do not drop near-duplicates")
    g.add_argument("--hash", choices=["phash", "dhash"], default="phash", help="perceptual hash (default phash)")
    g = p.add_argument_group("output")
    g.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created; reruns update it)")
    g.add_argument("--format", choices=["jpg", "png"], default="jpg", help="image format (default jpg)")
    g.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    g.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="tag every image of these inputs (repeatable: --tag studio=ghibli --tag medium=2d)")


def _add(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="step", metavar="STEP", required=True)

    f = sub.add_parser("frames", help="frames from films at N fps", description=(
        "Extract frames from films at N frames per second (ffmpeg decodes, drops and scales), crop letterbox/"
        "pillarbox bars, drop near-black, blank and fade frames and near-duplicates (static shots, repeats). "
        "Files are named <film>/<film>_t<seconds>.jpg. Rerunning resumes an interrupted film."))
    f.add_argument("inputs", nargs="+", metavar="VIDEO_OR_DIR", help="video files, or folders searched for videos")
    f.add_argument("--fps", type=float, default=2.0, help="frames per second of film (default 2)")
    f.add_argument("--start", type=float, default=0.0,
                   help="skip the first seconds of each film (e.g. opening credits)")
    f.add_argument("--end", type=float, default=None, help="stop at this time in each film (seconds)")
    f.add_argument("--no-crop-bars", action="store_true", help="keep letterbox/pillarbox bars")
    f.add_argument("--exact", action="store_true",
                   help="decode every frame for frame-accurate samples (slower; by default B-frames are skipped "
                        "and each sample is the nearest reference frame)")
    f.add_argument("--workers", type=int, default=2, help="ffmpeg processes decoding at once (default 2)")
    _add_cleanup(f)

    i = sub.add_parser("images", help="clean up photo folders", description=(
        "Clean up folders of photos: upright (EXIF) RGB, resized and centre-cropped (or full size), too small, "
        "black, blank and near-duplicate images dropped, unreadable files reported. Relative paths are kept."))
    i.add_argument("inputs", nargs="+", metavar="DIR", help="folders (searched recursively) or image files")
    i.add_argument("--min-side", type=int, default=None,
                   help="drop images whose short side is smaller (default: --size, or 0 with --full-size)")
    i.add_argument("--max-side", type=int, default=None, help="with --full-size, downscale the long side to this")
    _add_cleanup(i)

    pl = sub.add_parser("palette", help="HSL K-means palettes, warmth, groups and contact sheets", description=(
        "Per image, K-means on its pixels in HSL: a palette, warmth, brightness and saturation; then groups of "
        "images with similar palettes (KMeans on palette features, numbered from the coolest to the warmest) and "
        "a contact sheet PNG per group. Reads DIR/manifest.jsonl if there is one, else the images in DIR."))
    pl.add_argument("dir", metavar="DIR", help="a folder of images, or a folder/manifest made by prepare")
    pl.add_argument("--out", "-o", metavar="DIR", help="where the manifest, card and contact sheets go (default DIR)")
    pl.add_argument("--k", type=int, default=5, help="colours per palette (default 5)")
    pl.add_argument("--groups", type=int, default=6, help="number of palette groups (default 6)")
    pl.add_argument("--pixels", type=int, default=2000, help="pixels sampled per image (default 2000)")
    pl.add_argument("--thumb", type=int, default=64, help="images are reduced to this long side first (default 64)")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--workers", type=int, default=2, help="processes analysing images (default 2)")
    pl.add_argument("--redo", action="store_true", help="recompute palettes already in the manifest")
    pl.add_argument("--sheet-max", type=int, default=120,
                    help="thumbnails per contact sheet (evenly spread; default 120)")
    pl.add_argument("--sheet-thumb", type=int, default=128, help="contact sheet thumbnail size (default 128)")
    pl.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="tag every image (repeatable)")

    o = sub.add_parser("overlap", help="held-out frames that share a shot with training frames", description=(
        "Compare the frames of held-out sub-folders of DIR with the rest (the training frames): a held-out "
        "frame whose grey thumbnail correlates above --threshold with a training frame is the same shot (a "
        "compilation or trailer repeating a held-out film). Prints them, most similar first, and the --exclude "
        "arguments that drop them from `evaluate` (or their nearest training frames from `train`)."))
    o.add_argument("dir", metavar="DIR", help="a folder of frames with one sub-folder per film")
    o.add_argument("--held-out", required=True, metavar="A,B,...", help="comma-separated sub-folders held out")
    o.add_argument("--threshold", type=float, default=0.85,
                   help="thumbnail correlation above which two frames are one shot (default 0.85)")
    o.add_argument("--sheet", metavar="OUT.png", help="also draw the pairs: held-out frame | training frame")
    o.add_argument("--json", metavar="OUT.json", help="also write the pairs as JSON")


@command("prepare", "films and photo folders -> curated training sets (frames, images, palette, overlap)", _add)
def run(args: argparse.Namespace) -> int:
    if args.step == "frames":
        return _run_frames(args)
    if args.step == "images":
        return _run_images(args)
    if args.step == "palette":
        return _run_palette(args)
    if args.step == "overlap":
        return _run_overlap(args)
    raise ValueError(f"unknown prepare step {args.step!r}")


# -- shared helpers -----------------------------------------------------------------------------
def _load_state(out: Path) -> dict:
    path = out / STATE_NAME
    if not path.exists():
        return {"version": 1, "sources": {}, "settings": {}}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is corrupt ({exc}); delete it to start this folder's record afresh") from None
    state.setdefault("sources", {})
    state.setdefault("settings", {})
    return state


def _save_state(out: Path, state: dict) -> None:
    from ..data.manifest import atomic_write_text

    atomic_write_text(out / STATE_NAME, json.dumps(state, indent=1, sort_keys=True, allow_nan=False))


def _finish(out: Path, manifest, state: dict, failures: list[str]) -> None:
    """Compact the manifest, record failures, rewrite the dataset card."""
    from ..data.card import dataset_card
    from ..data.manifest import atomic_write_text

    state["failures"] = failures
    manifest.save()
    _save_state(out, state)
    atomic_write_text(out / "README.md", dataset_card(manifest, state))


def _encode(image, fmt: str, quality: int) -> bytes:
    """uint8 (H, W, 3) RGB array or PIL image -> JPEG/PNG bytes."""
    from PIL import Image

    img = Image.fromarray(image) if not isinstance(image, Image.Image) else image
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return name or "video"


def _report(failures: list[str], message: str) -> None:
    failures.append(message)
    print(f"error: {message}", file=sys.stderr)


def _check_common(args: argparse.Namespace) -> None:
    if not 1 <= args.quality <= 100:
        raise ValueError(f"--quality must be between 1 and 100, got {args.quality}")


# -- frames -------------------------------------------------------------------------------------
def _run_frames(args: argparse.Namespace) -> int:
    from ..data.frames import FrameExtractor, VideoError, list_videos, probe_video
    from ..data.manifest import MANIFEST_NAME, Manifest, parse_tags

    _check_common(args)
    tags = parse_tags(args.tag)
    extractor = FrameExtractor(
        fps=args.fps, size=None if args.full_size else args.size, crop_bars=not args.no_crop_bars,
        black_level=args.black_level, blank_std=args.blank_std,
        dup_threshold=None if args.keep_duplicates else args.dup_threshold, hash=args.hash,
        exact=args.exact, workers=args.workers,
    )
    if args.end is not None and args.end <= args.start:
        raise ValueError(f"--end ({args.end}) must be after --start ({args.start})")
    out = Path(args.out)
    failures: list[str] = []
    videos, problems = list_videos(args.inputs)
    for _, message in problems:
        _report(failures, message)
    names: dict[str, Path] = {}
    for video in videos:
        name = _safe_name(video.stem)
        if name in names:
            _report(failures, f"{video}: another input has the same name ({names[name]}); frames are named after the "
                              f"file, so rename one of them")
            continue
        names[name] = video
    if not names:
        failed = f" ({len(failures)} input(s) failed)" if failures else ""
        raise ValueError(f"no videos to extract frames from{failed}")

    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(out / MANIFEST_NAME)
    state = _load_state(out)
    settings = {**extractor.settings(), "format": args.format, "quality": args.quality,
                "start": args.start, "end": args.end}
    state["settings"]["frames"] = {k: settings[k] for k in ("fps", "size", "crop_bars", "black_level", "blank_std",
                                                          "dup_threshold", "hash", "exact", "format")}
    ext = "jpg" if args.format == "jpg" else "png"
    summaries = []
    try:
        for name, video in names.items():
            key = f"film:{name}"
            entry = state["sources"].get(key)
            try:
                info = probe_video(video)
                size_bytes = video.stat().st_size
                if entry is not None and entry.get("bytes") != size_bytes:
                    raise ValueError(f"{video}: {out} already holds frames of another film named {name!r} "
                                     f"({entry.get('path')}); rename the file or use another --out")
                if entry is not None and entry.get("settings") != settings:
                    changed = sorted(k for k in settings if entry.get("settings", {}).get(k) != settings[k])
                    raise ValueError(f"{video}: its frames in {out} were made with other settings "
                                     f"({', '.join(changed)}); use another --out to make a second version")
                _retag(manifest, name, tags)
                if entry is not None and entry.get("complete"):
                    summaries.append(f"{video.name}: already done ({entry['counts'].get('kept', 0)} frames kept)")
                    continue
                if entry is None:
                    entry = state["sources"][key] = {
                        "kind": "film", "source": video.name, "path": str(video.resolve()), "bytes": size_bytes,
                        "settings": settings, "until": args.start, "complete": False, "counts": {},
                        "frame_size": [info.width, info.height], "duration": info.duration,
                    }
                    crop = extractor.find_bars(info)
                    entry["crop"] = crop.as_list()
                _save_state(out, state)
                summaries.append(
                    _extract_one(extractor, info, video, name, entry, manifest, out, tags, ext, args, state))
            except (VideoError, ValueError, OSError) as exc:
                _report(failures, str(exc) if str(video) in str(exc) else f"{video}: {exc}")
    finally:
        _finish(out, manifest, state, failures)
    for line in summaries:
        print(line)
    kept = sum(1 for r in manifest if r.get("timestamp") is not None)
    print(f"{out}: {kept} frames in the manifest; card: {out / 'README.md'}")
    if failures:
        print(f"{len(failures)} input(s) failed (see the errors above); the others were processed", file=sys.stderr)
        return 1
    return 0


def _retag(manifest, name: str, tags: dict) -> None:
    if not tags:
        return
    for r in manifest:
        if r.get("film") == name:
            r["tags"] = {**(r.get("tags") or {}), **tags}


def _extract_one(extractor, info, video, name, entry, manifest, out, tags, ext, args, state) -> str:
    """One film, from ``entry['until']`` on: frames written, manifest appended, progress saved."""
    from tqdm.auto import tqdm

    from ..data.frames import Crop, HashIndex
    from ..data.manifest import atomic_write_bytes

    start = float(entry["until"])
    counts = collections.Counter(entry.get("counts", {}))
    # Anything written after the last saved point is redone: drop it first, so a resumed run
    # never holds a frame twice.
    for r in list(manifest):
        if r.get("film") == name and r.get("timestamp") is not None and r["timestamp"] >= start - 1e-6:
            (out / r["file"]).unlink(missing_ok=True)
            manifest.remove(r["file"])
    manifest.save()
    for stray in (out / name).glob(".*.tmp") if (out / name).is_dir() else ():
        stray.unlink(missing_ok=True)
    index = HashIndex(int(r["phash"], 16) for r in manifest if isinstance(r.get("phash"), str))
    crop = Crop(*entry["crop"])
    end = args.end if args.end is not None else info.duration
    total = math.ceil(end * extractor.fps) if end else None
    bar = tqdm(total=total, initial=counts.get("samples", 0), desc=video.name, unit="sample", dynamic_ncols=True,
               leave=False)
    last_save = time.monotonic()
    try:
        for settled in extractor.extract(info, crop=crop, index=index, start=start, end=args.end):
            for kf in settled.kept:
                file = f"{name}/{name}_t{kf.timestamp:010.3f}.{ext}"
                atomic_write_bytes(out / file, _encode(kf.image, args.format, args.quality), durable=False)
                manifest.append({
                    "file": file, "source": video.name, "film": name, "timestamp": round(kf.timestamp, 3),
                    "width": int(kf.image.shape[1]), "height": int(kf.image.shape[0]), "crop": crop.as_list(),
                    "phash": f"{kf.hash:016x}", "tags": dict(tags),
                })
                counts["kept"] += 1
            counts.update(settled.dropped)
            counts["samples"] += settled.samples
            bar.update(settled.samples)
            entry["counts"] = dict(counts)
            if math.isfinite(settled.until):
                entry["until"] = settled.until
                # the record of progress is small but synced to disk: every few seconds is enough
                if time.monotonic() - last_save > 2.0:
                    _save_state(out, state)
                    last_save = time.monotonic()
        entry["complete"] = True
        entry["until"] = end if end else entry["until"]
    finally:
        bar.close()
        _save_state(out, state)
    dropped = ", ".join(f"{r} {counts[r]}" for r in ("black", "blank", "fade", "duplicate") if counts.get(r))
    crop_note = "" if crop.as_list() == [0, 0, info.width, info.height] else (
        f"; bars cropped to {crop.w}x{crop.h} at ({crop.x}, {crop.y})")
    return (f"{video.name}: {counts['samples']} samples -> {counts['kept']} kept "
            f"({dropped or 'none dropped'}){crop_note}")


# -- images -------------------------------------------------------------------------------------
def _run_images(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..data.frames import HashIndex, ImageCleaner
    from ..data.manifest import MANIFEST_NAME, Manifest, atomic_write_bytes, parse_tags
    from ..imaging import ImageLoadError, list_images, load_image

    _check_common(args)
    tags = parse_tags(args.tag)
    cleaner = ImageCleaner(
        size=None if args.full_size else args.size,
        min_side=args.min_side if args.min_side is not None else (0 if args.full_size else args.size),
        max_side=args.max_side, black_level=args.black_level, blank_std=args.blank_std,
        dup_threshold=None if args.keep_duplicates else args.dup_threshold, hash=args.hash,
    )
    out = Path(args.out)
    failures: list[str] = []
    jobs: list[tuple[str, Path, str]] = []  # (input name, image path, source: its path inside the input)
    roots = [Path(r) for r in args.inputs]
    for root in roots:
        if root.is_dir() and (root.resolve() == out.resolve() or root.resolve() in out.resolve().parents):
            raise ValueError(f"--out {out} is inside the input folder {root}; choose an output folder outside it")
        try:
            paths = list_images([root])
        except (ValueError, FileNotFoundError) as exc:
            _report(failures, str(exc))
            continue
        display = root.resolve().name
        for p in paths:
            rel = p.relative_to(root).as_posix() if root.is_dir() else p.name
            # one input folder: keep its layout as is; several: one subfolder per input
            source = f"{display}/{rel}" if len(roots) > 1 and root.is_dir() else rel
            jobs.append((display, p, source))
    if not jobs:
        raise ValueError("no images to prepare" + (f" ({len(failures)} input(s) failed)" if failures else ""))

    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(out / MANIFEST_NAME)
    state = _load_state(out)
    settings = {**cleaner.settings(), "format": args.format, "quality": args.quality}
    if any(r.get("kind") == "image" for r in manifest) and state["settings"].get("images") not in (None, settings):
        changed = sorted(k for k in settings if state["settings"]["images"].get(k) != settings[k])
        raise ValueError(f"the images in {out} were made with other settings ({', '.join(changed)}); "
                         "use another --out to make a second version")
    state["settings"]["images"] = settings
    done_sources = {r.get("source"): r for r in manifest if r.get("kind") == "image"}
    index = HashIndex(int(r["phash"], 16) for r in manifest if isinstance(r.get("phash"), str))
    ext = "jpg" if args.format == "jpg" else "png"
    taken = {r["file"]: r.get("source") for r in manifest}
    counts_by_key: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    try:
        for display, path, source in tqdm(jobs, desc="images", unit="image", dynamic_ncols=True, leave=False):
            counts = counts_by_key[display]
            counts["files"] += 1
            done = done_sources.get(source)
            if done is not None and (out / done["file"]).is_file():
                if tags:
                    done["tags"] = {**(done.get("tags") or {}), **tags}
                counts["kept"] += 1
                continue
            try:
                img = load_image(path)
            except ImageLoadError as exc:
                counts["unreadable"] += 1
                _report(failures, str(exc))
                continue
            cleaned, reason, h = cleaner.clean(img, index=index)
            if cleaned is None:
                counts[reason] += 1
                continue
            file = Path(source).with_suffix(f".{ext}").as_posix()
            if taken.get(file, source) != source:  # photo.png and photo.jpg in one folder
                file = Path(source).with_name(f"{Path(source).stem}_{Path(source).suffix.lstrip('.')}.{ext}").as_posix()
            taken[file] = source
            atomic_write_bytes(out / file, _encode(cleaned, args.format, args.quality), durable=False)
            manifest.append({
                "file": file, "source": source, "kind": "image", "width": cleaned.width, "height": cleaned.height,
                "phash": f"{h:016x}", "tags": dict(tags),
            })
            counts["kept"] += 1
    finally:
        for display, counts in counts_by_key.items():
            entry = state["sources"].setdefault(f"images:{display}", {"kind": "images", "source": display})
            entry["counts"] = dict(counts)
            entry["complete"] = True
            entry["settings"] = settings
        _finish(out, manifest, state, failures)
    for display, counts in counts_by_key.items():
        dropped = ", ".join(f"{r.replace('_', ' ')} {counts[r]}" for r in ("too_small", "black", "blank", "duplicate",
                                                                           "unreadable") if counts.get(r))
        print(f"{display}: {counts['files']} files -> {counts['kept']} kept ({dropped or 'none dropped'})")
    print(f"{out}: {len(manifest)} images in the manifest; card: {out / 'README.md'}")
    if failures:
        print(f"{len(failures)} input(s) failed (see the errors above); the others were processed", file=sys.stderr)
        return 1
    return 0


# -- palette ------------------------------------------------------------------------------------
def _run_palette(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from ..data.manifest import MANIFEST_NAME, Manifest, atomic_write_bytes, find_manifest, parse_tags
    from ..data.palette import Palette, PaletteAnalyzer, analyse_files, contact_sheet, group_palettes, sheet_path
    from ..imaging import IMAGE_EXTENSIONS, ImageLoadError, load_image

    tags = parse_tags(args.tag)
    analyzer = PaletteAnalyzer(k=args.k, pixels=args.pixels, thumb=args.thumb, seed=args.seed)
    if args.groups < 1:
        raise ValueError(f"--groups must be at least 1, got {args.groups}")
    src = Path(args.dir)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    out = Path(args.out) if args.out else (src.parent if src.is_file() else src)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(out / MANIFEST_NAME)
    failures: list[str] = []

    # 1. The images: the source manifest's records (rebased onto --out), or the folder's images.
    src_manifest = find_manifest(src)
    if src_manifest is not None:
        theirs = Manifest.load(src_manifest)
        if theirs.path.resolve() != manifest.path.resolve():
            for r in theirs:
                file = manifest.relative(theirs.resolve(r))
                manifest.add({**(manifest.get(file) or {}), **r, "file": file})
    else:
        if not src.is_dir():
            raise ValueError(f"{src} is neither a folder nor a manifest (.jsonl)")
        sheets = (out / "contact_sheets").resolve()
        paths = [p for p in sorted(src.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                 and not p.name.startswith(".") and sheets not in p.resolve().parents]
        if not paths:
            raise ValueError(f"{src} holds no images (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        for p in paths:
            file = manifest.relative(p)
            if file not in manifest:
                manifest.add({"file": file, "source": p.relative_to(src).as_posix()})
    stale = [r["file"] for r in manifest if not manifest.resolve(r).is_file()]
    for file in stale:
        manifest.remove(file)
    if stale:
        print(f"dropped {len(stale)} record(s) whose image no longer exists (e.g. {stale[0]})")
    records = list(manifest)
    if not records:
        raise ValueError(f"{src}: no images to analyse")
    for r in records:
        if tags:
            r["tags"] = {**(r.get("tags") or {}), **tags}

    # 2. Palettes (reused when the settings have not changed), then groups.
    state = _load_state(out)
    same = (state.get("palette") or {}).get("settings") == analyzer.settings()
    todo = [r for r in records if args.redo or not same or "palette" not in r]
    started = time.perf_counter()
    bar = tqdm(total=len(todo), desc="palettes", unit="image", dynamic_ncols=True, leave=False)
    try:
        for i, result in analyse_files([manifest.resolve(r) for r in todo], analyzer, workers=args.workers):
            r = todo[i]
            if isinstance(result, str):
                for k in ("palette", "warmth", "brightness", "saturation", "group"):
                    r.pop(k, None)
                _report(failures, result)
            else:
                r.update(result.to_record())
            bar.update(1)
    finally:
        bar.close()
    analysed = [r for r in records if "palette" in r]
    if not analysed:
        _finish(out, manifest, state, failures)
        raise ValueError(f"{src}: none of the {len(records)} images could be analysed")
    palettes = [Palette.from_record(r) for r in analysed]
    labels = group_palettes(palettes, groups=args.groups, seed=args.seed)
    for r, g in zip(analysed, labels):
        r["group"] = int(g)
    for r in records:
        if "palette" not in r:
            r.pop("group", None)
        if "width" not in r:
            try:
                with Image.open(manifest.resolve(r)) as im:
                    r["width"], r["height"] = im.size
            except OSError:
                pass
    elapsed = time.perf_counter() - started

    # 3. Contact sheets: evenly spread members of each group, palettes under the thumbnails.
    n_groups = int(labels.max()) + 1
    for old in (out / "contact_sheets").glob("group_*.png") if (out / "contact_sheets").is_dir() else ():
        if re.fullmatch(r"group_\d{2,}\.png", old.name) and int(old.stem.split("_")[1]) >= n_groups:
            old.unlink()
    rows = []
    for g in range(n_groups):
        members = [(r, p) for r, p, lab in zip(analysed, palettes, labels) if lab == g]
        step = max(1, len(members) / args.sheet_max) if len(members) > args.sheet_max else 1
        shown = [members[int(i * step)] for i in range(min(len(members), args.sheet_max))]
        items, labels_txt = [], []
        for r, p in shown:
            try:
                items.append((load_image(manifest.resolve(r), max_side=args.sheet_thumb), p))
                labels_txt.append(f"w {p.warmth:.2f}  b {p.brightness:.2f}")
            except ImageLoadError:
                continue
        warm = float(np.mean([p.warmth for _, p in members]))
        bright = float(np.mean([p.brightness for _, p in members]))
        path = sheet_path(out, g)
        if items:
            title = (f"group {g}: {len(members)} images (showing {len(items)}), "
                     f"warmth {warm:.2f}, brightness {bright:.2f}")
            sheet = contact_sheet(items, title=title, thumb=args.sheet_thumb, labels=labels_txt)
            buf = io.BytesIO()
            sheet.save(buf, "PNG", optimize=False)
            atomic_write_bytes(path, buf.getvalue())
        rows.append((g, len(members), warm, bright, path))
    state["palette"] = {"settings": analyzer.settings(), "groups": n_groups, "requested_groups": args.groups}
    state["settings"]["palette"] = {**analyzer.settings(), "groups": args.groups}
    if src_manifest is None:
        key = f"folder:{src.resolve().name}"
        state["sources"].setdefault(key, {"kind": "folder", "source": str(src)})
        state["sources"][key]["counts"] = {"files": len(records), "kept": len(records)}
        state["sources"][key]["complete"] = True
    _finish(out, manifest, state, failures)
    print(f"{len(analysed)} palettes ({len(todo)} computed in {elapsed:.1f} s), {n_groups} groups:")
    print("group  images  warmth  brightness  contact sheet")
    for g, n, warm, bright, path in rows:
        print(f"{g:5d}  {n:6d}  {warm:6.2f}  {bright:10.2f}  {path}")
    print(f"manifest: {manifest.path}; card: {out / 'README.md'}")
    if failures:
        print(f"{len(failures)} image(s) could not be read (see the errors above); the others were analysed",
              file=sys.stderr)
        return 1
    return 0


def _run_overlap(args: argparse.Namespace) -> int:
    import shlex

    from ..data.overlap import pairs_sheet, shared_shots
    from ..imaging import list_images

    root = Path(args.dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    held = [f.strip().strip("/") for f in args.held_out.split(",") if f.strip()]
    if not held:
        raise ValueError("--held-out names no sub-folder")
    missing = [f for f in held if not (root / f).is_dir()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)}: no such sub-folder of {root}")
    images = list_images(root)
    rel = {p: p.relative_to(root).as_posix() for p in images}
    held_out = [p for p in images if rel[p].split("/")[0] in held]
    training = [p for p in images if rel[p].split("/")[0] not in held]
    if not held_out or not training:
        raise ValueError(f"{root}: need frames both in {', '.join(held)} and outside them")
    shots = shared_shots(training, held_out, threshold=args.threshold, progress=sys.stderr.isatty())
    print(f"{len(shots)} of {len(held_out)} held-out frames share a shot with one of the {len(training)} training "
          f"frames (thumbnail correlation > {args.threshold:g})" + (":" if shots else ""))
    for s in shots:
        print(f"  {s.correlation:.3f}  {rel[s.held_out]}  {rel[s.training]}")
    if shots:
        print("drop them from the evaluation:  evaluate ... " + " ".join(
            f"--exclude {shlex.quote(rel[s.held_out])}" for s in shots))
        print("or their nearest training frames from training:  train ... --exclude " + " ".join(
            shlex.quote(t) for t in sorted({rel[s.training] for s in shots})))
        if args.sheet:
            print(f"pairs drawn in {pairs_sheet(shots, Path(args.sheet))}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"threshold": args.threshold, "held_out": held, "held_out_frames": len(held_out),
             "training_frames": len(training),
             "shared": [{"held_out": rel[s.held_out], "training": rel[s.training],
                         "correlation": round(s.correlation, 4)} for s in shots]}, indent=2) + "\n")
    return 0
