"""Palette analysis speed on the real frames: ``prepare palette`` on ../shared/data/ghibli_frames.

    python benchmarks/bench_palette.py [--workers 2] [--groups 6]

Times, in one run: the per-image K-means palettes of all 1636 frames (load at 64 px, 2000
pixels, k=5, in ``--workers`` processes, and in one process as the baseline), the grouping, and
the contact sheets; then the whole ``python -m ghibli_core prepare palette`` command end to end
(imports, manifest, card and sheets included) into a temporary folder. Bar: under 60 s for the
command. The machine is shared: load averages are printed with the results.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "ghibli_frames"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--groups", type=int, default=6)
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is missing: this benchmark needs the real frames")
    sys.path.insert(0, str(ROOT))
    from ghibli_core.data.palette import PaletteAnalyzer, analyse_files, contact_sheet, group_palettes
    from ghibli_core.imaging import load_image

    paths = sorted(SHARED.rglob("*.jpg"))
    print(f"{len(paths)} frames in {SHARED}; {os.cpu_count()} CPUs; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    analyzer = PaletteAnalyzer()

    timings = {}
    for workers in sorted({1, args.workers}):
        t = time.perf_counter()
        palettes = [p for _, p in analyse_files(paths, analyzer, workers=workers)]
        timings[workers] = time.perf_counter() - t
        print(f"palettes, {workers} process(es): {timings[workers]:6.2f} s "
              f"({len(paths) / timings[workers]:.0f} images/s; load {os.getloadavg()[0]:.2f})", flush=True)
    assert all(not isinstance(p, str) for p in palettes)
    t = time.perf_counter()
    labels = group_palettes(palettes, groups=args.groups)
    print(f"grouping into {args.groups}: {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    for g in range(int(labels.max()) + 1):
        members = [i for i, lab in enumerate(labels) if lab == g][:120]
        contact_sheet([(load_image(paths[i], max_side=128), palettes[i]) for i in members], title=f"group {g}")
    print(f"contact sheets (120 thumbnails each): {time.perf_counter() - t:.2f} s")
    if args.workers > 1:
        print(f"{args.workers} processes vs 1: {timings[1] / timings[args.workers]:.2f}x")

    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ghibli_core", "prepare", "palette", str(SHARED), "--out", out,
                        "--groups", str(args.groups), "--workers", str(args.workers)],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        total = time.perf_counter() - t
    print(f"`prepare palette` end to end: {total:.1f} s (bar < 60 s: {'met' if total < 60 else 'NOT met'}); "
          f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
