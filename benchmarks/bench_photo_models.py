"""Photo models side by side: the embedded default against the anchors, through the same stylizer.

    python benchmarks/bench_photo_models.py --anchor cartoongan=/work/anchors/cartoongan \\
        --anchor animeganv3=/work/anchors/animeganv3 --repeats 5

Every model runs through :class:`ghibli_core.stylize.Stylizer` (``precision="auto"``, the app's
and CLI's setting) on the same photo at three sizes, in alternation so that load from other
processes hits all of them alike:

- 512x512 and 768x512 (centre crops of a real photo from ../shared/data/photos when present);
- a 4032x3024 phone-sized photo through the app's own path at its default max side (1024):
  downscaled, stylized, scaled back (``app.stylize_at_photo_size``).

Prints per-model medians, the ratio 768x512 / 512x512 (bar: <= 1.7), the phone photo's time
(bar: <= 1 s) and each anchor's time over the default's at 512x512 (bar: > 1, the default is
the fastest). Anchors are converted model folders (``python -m ghibli_core convert``); they are
not part of the repository.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ghibli_core.imaging import center_crop_resize, list_images, load_image  # noqa: E402
from ghibli_core.models import load_model  # noqa: E402
from ghibli_core.stylize import Stylizer  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "photos"
DEFAULT = ROOT / "weights" / "photo2ghibli"
PHONE = (4032, 3024)
APP_MAX_SIDE = 1024


def photo(size: tuple[int, int]) -> Image.Image:
    """A real photo cropped and resized to ``size`` (w, h), or a synthetic gradient without ../shared."""
    if PHOTOS.is_dir():
        img = load_image(list_images(PHOTOS)[0])
        side = max(size)
        square = center_crop_resize(img, side)
        left, top = (side - size[0]) // 2, (side - size[1]) // 2
        return square.crop((left, top, left + size[0], top + size[1]))
    w, h = size
    return Image.linear_gradient("L").resize((w, h)).convert("RGB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT, help="the default under test (a model folder)")
    p.add_argument("--anchor", action="append", default=[], metavar="NAME=FOLDER", help="a converted anchor (repeatable)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from app import stylize_at_photo_size  # the app's own downscale-stylize-upscale path

    models = {"default": load_model(args.model)}
    for item in args.anchor:
        name, sep, folder = item.partition("=")
        if not sep:
            raise SystemExit(f"--anchor: expected NAME=FOLDER, got {item!r}")
        models[name] = load_model(folder)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores; source photo: {'shared' if PHOTOS.is_dir() else 'synthetic'}")
    inputs = {"512x512": photo((512, 512)), "768x512": photo((768, 512))}
    phone = photo((PHONE[0] // 4, PHONE[1] // 4)).resize(PHONE, Image.BICUBIC)
    stylizers = {}
    for name, model in models.items():
        start = time.perf_counter()
        stylizers[name] = Stylizer(model, precision="auto")
        stylizers[name](inputs["512x512"])  # warm-up (oneDNN picks its kernels)
        print(f"{name}: {sum(q.numel() for q in model.parameters()) / 1e6:.2f} M parameters, "
              f"{stylizers[name].dtype}, ready in {time.perf_counter() - start:.1f} s")
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for name, stylizer in stylizers.items():
            for label, img in inputs.items():
                start = time.perf_counter()
                stylizer(img)
                times.setdefault((name, label), []).append(time.perf_counter() - start)
            start = time.perf_counter()
            stylize_at_photo_size(stylizer, phone, strength=1.0, max_side=APP_MAX_SIDE)
            times.setdefault((name, "phone"), []).append(time.perf_counter() - start)
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"\n{'model':<14}{'512x512':>10}{'768x512':>10}{'ratio':>8}{'4032x3024 @1024':>18}")
    for name in stylizers:
        a, b, c = med[(name, "512x512")], med[(name, "768x512")], med[(name, "phone")]
        print(f"{name:<14}{a * 1000:>8.0f}ms{b * 1000:>8.0f}ms{b / a:>8.2f}{c * 1000:>16.0f}ms")
    base = med[("default", "512x512")]
    for name in stylizers:
        if name != "default":
            print(f"{name} / default at 512x512: {med[(name, '512x512')] / base:.2f}x")
    print(f"bars: default 512x512 <= 200 ms: {'met' if base <= 0.2 else 'NOT met'}; "
          f"768x512 / 512x512 <= 1.7: {'met' if med[('default', '768x512')] / base <= 1.7 else 'NOT met'}; "
          f"phone photo <= 1 s: {'met' if med[('default', 'phone')] <= 1.0 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
