"""The README's pictures: sample photos and a short clip through the embedded default models.

    python scripts/make_gallery.py        # writes docs/gallery.png and docs/video_strip.png

Rerun it whenever a default model changes (``weights/photo2ghibli``, ``weights/ghibli-video-fast``,
or ``hub.DEFAULT_MODEL`` / ``hub.DEFAULT_VIDEO_MODEL``), and commit the two PNGs with the new
weights (and the new figures in the README's status note). It takes about 30 s of CPU time.

- ``docs/gallery.png``: each photo of :data:`PHOTOS` (top row) stylized by the photo default
  and by the video default (the rows below), each row titled with the model's held-out KID from
  its card (``hub.card_metrics``).
- ``docs/video_strip.png``: a 2 s clip made here from one sample photo (a camera panning and
  zooming slowly over it, 24 frames/s) through the video pipeline exactly as the app runs it
  (``video.stylize_video`` with the video default at the default stability, 0.5): five frames
  of the input over the same five frames of the output.

The photos come with scikit-image (``pip install scikit-image``, in requirements-dev.txt; no
download: they are inside its wheel). Their terms, as scikit-image's ``skimage.data`` states
them for each, allow this: public domain or CC0 (:data:`PHOTOS`).

The networks run in float32 (``precision="fp32"``), so the pictures do not depend on whether the
machine has fast bfloat16 (``"auto"`` would pick it on some CPUs). The PNGs are reduced to 256 colours (dithered) to stay small.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name in skimage.data -> (what it shows, its terms as skimage.data's docstring gives them)
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("Eileen Collins, NASA astronaut", "public domain (NASA Great Images database)"),
    "coffee": ("a cup of coffee", "CC0, photographer Rachel Michetti (courtesy of Pikolo Espresso Bar)"),
    "chelsea": ("Chelsea the cat", "CC0, photographer Stefan van der Walt"),
    "rocket": ("the DSCOVR launch on a Falcon 9", "public domain (SpaceX)"),
}
CLIP_PHOTO = "coffee"  # the photo the clip pans over (600x400: wide enough to pan without upscaling)
STRIP_FRAMES = 5


def sample_photo(name: str) -> Image.Image:
    """A bundled scikit-image photo as an RGB image (it ships inside the wheel: no download)."""
    try:
        from skimage import data
    except ImportError:
        sys.exit("scikit-image is needed for its sample photos: pip install scikit-image (or -r requirements-dev.txt)")
    return Image.fromarray(getattr(data, name)()).convert("RGB")


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def titled_row(cells: list[Image.Image], title: str, *, height: int, gap: int, band: int) -> Image.Image:
    """``cells`` scaled to ``height`` side by side under a band holding ``title``."""
    scaled = [c.resize((round(c.width * height / c.height), height), Image.Resampling.LANCZOS) for c in cells]
    width = sum(c.width for c in scaled) + gap * (len(scaled) - 1)
    row = Image.new("RGB", (width, band + height), "white")
    ImageDraw.Draw(row).text((2, band // 2), title, fill=(30, 30, 30), font=font(band - 8), anchor="lm")
    x = 0
    for cell in scaled:
        row.paste(cell, (x, band))
        x += cell.width + gap
    return row


def stack(rows: list[Image.Image], *, gap: int) -> Image.Image:
    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows) + gap * (len(rows) - 1)), "white")
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height + gap
    return sheet


def save_small_png(image: Image.Image, path: Path) -> int:
    """``image`` as a 256-colour PNG (median cut, Floyd-Steinberg); returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    small = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    small.save(path, format="PNG", optimize=True)
    return path.stat().st_size


def model_title(name: str, role: str) -> str:
    from ghibli_core import hub

    figures = hub.card_metrics(hub.resolve(name))
    # "x", not "×": Pillow's default font has no "×"
    kid = f" · KID x1000 {figures['kid_x1000']:.2f} on held-out films" if "kid_x1000" in figures else ""
    return f"{name} ({role}){kid}"


def make_gallery(out: Path, *, photo_model: str, video_model: str, height: int) -> Path:
    """Photos in the top row, each model's results below; returns the PNG's path."""
    from ghibli_core import hub
    from ghibli_core.stylize import Stylizer

    photos = [sample_photo(name) for name in PHOTOS]
    rows = [titled_row(photos, "photos (scikit-image samples: public domain and CC0)", height=height, gap=4, band=24)]
    for name, role in ((photo_model, "photo default"), (video_model, "video default")):
        stylizer = Stylizer(hub.load(name), device="cpu", precision="fp32")
        results = [stylizer(photo) for photo in photos]
        rows.append(titled_row(results, model_title(name, role), height=height, gap=4, band=24))
        print(f"{name}: {len(results)} photos stylized")
    path = out / "gallery.png"
    print(f"wrote {path} ({save_small_png(stack(rows, gap=6), path) / 1024:.0f} KB)")
    return path


def pan_clip(photo: Image.Image, *, frames: int, size: tuple[int, int]) -> list[np.ndarray]:
    """A camera panning left to right over ``photo`` while zooming in slowly: uint8 HWC frames."""
    w, h = size
    frames_out = []
    for i in range(frames):
        t = i / max(1, frames - 1)
        zoom = 1.0 + 0.15 * t  # the window shrinks by 15% over the clip
        win_h = photo.height / 1.3 / zoom
        win_w = win_h * w / h
        cx = win_w / 2 + (photo.width - win_w) * (0.05 + 0.9 * t)
        cy = photo.height / 2
        box = (cx - win_w / 2, cy - win_h / 2, cx + win_w / 2, cy + win_h / 2)
        frames_out.append(np.asarray(photo.resize((w, h), Image.Resampling.BICUBIC, box=box)))
    return frames_out


def make_video_strip(out: Path, *, video_model: str, height: int) -> Path:
    """Five frames of a synthesized pan over a sample photo, over the same frames stylized."""
    from ghibli_core import hub
    from ghibli_core.video import VideoWriter, stylize_video

    fps, count, size = 24, 48, (384, 256)
    clip = pan_clip(sample_photo(CLIP_PHOTO), frames=count, size=size)
    styled: dict[int, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "pan.mp4", Path(tmp) / "pan_ghibli.mp4"
        with VideoWriter(source, size=size, fps=fps) as writer:
            for frame in clip:
                writer.write(frame)
        stylize_video(source, target, hub.load(video_model), height=None, stability=0.5, precision="fp32",
                      on_frame=lambda i, frame: styled.__setitem__(i, frame.copy()))
    if len(styled) != count:
        raise RuntimeError(f"the pipeline gave {len(styled)} frames for a {count}-frame clip")
    picks = [round(k * (count - 1) / (STRIP_FRAMES - 1)) for k in range(STRIP_FRAMES)]
    seconds = ", ".join(f"{i / fps:.1f}" for i in picks)
    rows = [
        titled_row([Image.fromarray(clip[i]) for i in picks], f"a clip panning over '{CLIP_PHOTO}' (frames at {seconds} s)",
                   height=height, gap=4, band=24),
        titled_row([Image.fromarray(styled[i]) for i in picks],
                   model_title(video_model, "video default") + ", stability 0.5", height=height, gap=4, band=24),
    ]
    path = out / "video_strip.png"
    print(f"wrote {path} ({save_small_png(stack(rows, gap=6), path) / 1024:.0f} KB)")
    return path


def main(argv: list[str] | None = None) -> int:
    from ghibli_core import hub

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder of the PNGs (default docs/)")
    parser.add_argument("--photo-model", default=hub.DEFAULT_MODEL, help=f"photo model (default {hub.DEFAULT_MODEL})")
    parser.add_argument("--video-model", default=hub.default_video_model(),
                        help=f"video model (default {hub.DEFAULT_VIDEO_MODEL})")
    parser.add_argument("--height", type=int, default=150, help="height of each picture in the gallery, px (default 150)")
    args = parser.parse_args(argv)
    if args.height < 32:
        parser.error(f"--height must be at least 32, got {args.height}")
    make_gallery(args.out, photo_model=args.photo_model, video_model=args.video_model, height=args.height)
    make_video_strip(args.out, video_model=args.video_model, height=math.ceil(args.height * 0.85))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
