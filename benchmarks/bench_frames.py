"""Frame extraction speed: ``prepare frames`` vs the naive OpenCV loop, in one run.

    python benchmarks/bench_frames.py [--minutes 10] [--fps 2]

Makes (once, cached in the temp folder) a synthetic 720p H.264 film: a slideshow of the
frames in ../shared/data/ghibli_frames (or ffmpeg test patterns when that is missing), 4 s
shots with a slow pan, film grain and letterbox bars, x264 ``veryfast`` CRF 23 at 25 fps (B
frames and 250-frame keyframe intervals, as x264 makes by default). Then, each in a fresh
process so peak memory is its own:

- ours: :class:`ghibli_core.data.frames.FrameExtractor` at ``--fps`` (bars found, black/blank/
  duplicate frames dropped, 256 px squares), kept frames written as JPEG, as the CLI does;
- the same with one worker, and with ``exact=True`` (every frame decoded);
- ours on the first 4 minutes only (memory must not grow with film length);
- naive: ``cv2.VideoCapture.read()`` on every frame, every (25 / fps)-th frame kept, centre-cropped,
  resized to 256 px and written as JPEG.

Prints seconds, real-time factor (film seconds per second of work), the ratio to naive and
peak RSS (the Python process, and the ffmpeg children together). Bars: >= 10x real time and
>= 5x naive for the default. The machine is shared: load averages are printed with the results,
and so is CPU time, which load disturbs less than wall time. What bounds the ratio: to sample a
frame, every reference (I/P) frame since the last keyframe must be decoded; only B-frames can be
skipped, so ours costs about the I/P decode (~70 % of the CPU of a full decode is saved on this
film), while naive also pays every B-frame and a BGR conversion of each frame. On the 2-core
machine of 2026-11-30 the two halves of the film, decoded by two one-thread ffmpeg processes at
once with our flags straight to /dev/null, take 3.64-3.72 s of wall time (2.6-2.8 s each when run
alone: the two cores slow each other), and finding the bars takes 0.38 s before that (8 keyframes,
~60 ms of ffmpeg start-up and file parsing each), so ~4.05 s is the floor of ours against naive's
19-21 s: about 5x at best, with nothing left for choosing and writing the frames.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "ghibli_frames"


def make_film(minutes: float) -> Path:
    sys.path.insert(0, str(ROOT))
    from ghibli_core.data.frames import ffmpeg_exe

    cache = Path(tempfile.gettempdir()) / "ghibli_bench"
    cache.mkdir(exist_ok=True)
    seconds = int(minutes * 60)
    kind = "ghibli" if SHARED.is_dir() else "lavfi"
    film = cache / f"film_{seconds}s_720p_{kind}.mp4"
    if film.exists():
        return film
    tmp = film.with_suffix(".part.mp4")
    shot = 4.0
    picture = "scale=1280:536:force_original_aspect_ratio=increase,crop=1280:536,"
    grain_pan_bars = "fps=25,scroll=h=0.0008,noise=alls=6:allf=t,pad=1280:720:0:92:black,format=yuv420p"
    if kind == "ghibli":
        frames = sorted(SHARED.rglob("*.jpg"))
        n = int(seconds / shot) + 1
        step = max(1, len(frames) // n)
        listing = cache / f"slides_{seconds}.txt"
        lines = []
        for i in range(n):
            lines += [f"file '{frames[(i * step) % len(frames)]}'", f"duration {shot}"]
        lines.append(f"file '{frames[((n - 1) * step) % len(frames)]}'")
        listing.write_text("\n".join(lines) + "\n")
        inputs = ["-f", "concat", "-safe", "0", "-i", str(listing)]
        vf = picture + grain_pan_bars
    else:
        inputs = ["-f", "lavfi", "-i", f"testsrc2=size=1280x536:rate=25:duration={seconds}"]
        vf = grain_pan_bars
    print(f"making a {seconds} s 720p test film from {kind} frames (cached at {film}) ...", flush=True)
    t = time.perf_counter()
    subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *inputs, "-vf", vf, "-t", str(seconds),
         "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-an", str(tmp)],
        check=True,
    )
    tmp.rename(film)
    print(f"  made in {time.perf_counter() - t:.0f} s ({film.stat().st_size / 1e6:.0f} MB)", flush=True)
    return film


# -- the measured jobs (run in child processes) ---------------------------------------------------
def _cpu_seconds() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class _ChildMemory:
    """Peak total RSS of this process's ffmpeg children, polled from /proc (getrusage's
    children figure counts the parent's pages at fork, so it cannot tell)."""

    def __init__(self):
        import threading

        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        me = str(os.getpid())
        while not self._stop.wait(0.5):
            total = 0
            for status in Path("/proc").glob("[0-9]*/status"):
                try:
                    text = status.read_text()
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
                if fields.get("PPid", "").strip() == me and "ffmpeg" in fields.get("Name", ""):
                    total += int(fields.get("VmRSS", "0 kB").split()[0])
            self.peak_kb = max(self.peak_kb, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


def job_ours(film: str, out: str, fps: float, workers: int, exact: bool, end: float | None) -> dict:
    import resource

    from ghibli_core.data.frames import FrameExtractor, probe_video
    from PIL import Image

    memory = _ChildMemory()
    cpu0 = _cpu_seconds()
    t = time.perf_counter()
    info = probe_video(film)
    ex = FrameExtractor(fps=fps, size=256, workers=workers, exact=exact)
    crop = ex.find_bars(info)
    kept = samples = 0
    for settled in ex.extract(info, crop=crop, end=end):
        samples += settled.samples
        for kf in settled.kept:
            Image.fromarray(kf.image).save(Path(out) / f"f_{kf.timestamp:010.3f}.jpg", quality=95)
            kept += 1
    seconds = time.perf_counter() - t
    return {
        "seconds": seconds, "cpu": _cpu_seconds() - cpu0, "samples": samples, "kept": kept, "crop": crop.as_list(),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "child_rss_mb": memory.stop(),
    }


def job_naive(film: str, out: str, fps: float, grab: bool = False) -> dict:
    import resource

    import cv2

    cpu0 = _cpu_seconds()
    t = time.perf_counter()
    cap = cv2.VideoCapture(film)
    every = round(cap.get(cv2.CAP_PROP_FPS) / fps)
    n = kept = 0
    while True:
        if grab and n % every:
            # grab(): decoded but not converted to BGR nor handed to Python
            if not cap.grab():
                break
            n += 1
            continue
        ok, frame = cap.read()  # decodes every frame, converts it and hands it to Python
        if not ok:
            break
        if n % every == 0:
            h, w = frame.shape[:2]
            side = min(h, w)
            y, x = (h - side) // 2, (w - side) // 2
            small = cv2.resize(frame[y : y + side, x : x + side], (256, 256), interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(Path(out) / f"n_{n:07d}.jpg"), small, [cv2.IMWRITE_JPEG_QUALITY, 95])
            kept += 1
        n += 1
    cap.release()
    return {
        "seconds": time.perf_counter() - t, "cpu": _cpu_seconds() - cpu0, "frames": n, "kept": kept,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_child(job: str, **kw) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                f"import bench_frames as b; print(json.dumps(b.{job}(out={out!r}, **{kw!r})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{job} failed:\n{proc.stderr}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--skip-variants", action="store_true", help="only ours (default) and naive")
    args = ap.parse_args()
    film = make_film(args.minutes)
    duration = args.minutes * 60
    print(f"film: {film}, {duration:.0f} s; {os.cpu_count()} CPUs; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    results = {}
    # ours and naive twice, alternating, so a burst of load on the shared machine hits both
    plan = [("ours (2 workers)", "job_ours", dict(film=str(film), fps=args.fps, workers=2, exact=False, end=None)),
            ("naive OpenCV", "job_naive", dict(film=str(film), fps=args.fps)),
            ("ours (2 workers), again", "job_ours", dict(film=str(film), fps=args.fps, workers=2, exact=False, end=None)),
            ("naive OpenCV, again", "job_naive", dict(film=str(film), fps=args.fps))]
    if not args.skip_variants:
        plan += [
            ("naive, grab() between kept frames", "job_naive", dict(film=str(film), fps=args.fps, grab=True)),
            ("ours (1 worker)", "job_ours", dict(film=str(film), fps=args.fps, workers=1, exact=False, end=None)),
            ("ours exact (all frames decoded)", "job_ours", dict(film=str(film), fps=args.fps, workers=2, exact=True, end=None)),
            ("ours, first 4 minutes", "job_ours", dict(film=str(film), fps=args.fps, workers=2, exact=False, end=240.0)),
        ]
    for name, job, kw in plan:
        r = run_child(job, **kw)
        r["load"] = os.getloadavg()[0]
        results[name] = r
        length = kw.get("end") or duration
        print(f"{name:34s} {r['seconds']:7.2f} s (CPU {r['cpu']:6.2f} s)  {length / r['seconds']:6.1f}x real time  "
              f"kept {r['kept']:5d}  peak RSS {r['rss_mb']:6.0f} MB"
              + (f" (+ ffmpeg {r['child_rss_mb']:.0f} MB)" if "child_rss_mb" in r else "")
              + f"  load {r['load']:.2f}", flush=True)

    ours, naive = results["ours (2 workers)"], results["naive OpenCV"]
    ours2, naive2 = results["ours (2 workers), again"], results["naive OpenCV, again"]
    print()
    print(f"wall ratio to naive: run 1 {naive['seconds'] / ours['seconds']:.2f}x, run 2 {naive2['seconds'] / ours2['seconds']:.2f}x; "
          f"CPU ratio: {naive['cpu'] / ours['cpu']:.2f}x, {naive2['cpu'] / ours2['cpu']:.2f}x")
    ours = {k: (ours[k] + ours2[k]) / 2 for k in ("seconds", "cpu", "rss_mb", "child_rss_mb")}
    naive = {k: (naive[k] + naive2[k]) / 2 for k in ("seconds", "cpu")}
    rtf = duration / ours["seconds"]
    ratio = naive["seconds"] / ours["seconds"]
    print(f"ours (mean of 2 runs): {rtf:.1f}x real time (bar >= 10x: {'met' if rtf >= 10 else 'NOT met'}); "
          f"{ratio:.2f}x faster than naive (bar >= 5x: {'met' if ratio >= 5 else 'NOT met'}); "
          f"CPU time {naive['cpu'] / ours['cpu']:.2f}x less than naive")
    if "naive, grab() between kept frames" in results:
        g = results["naive, grab() between kept frames"]
        print(f"vs naive with grab(): {g['seconds'] / ours['seconds']:.2f}x wall, {g['cpu'] / ours['cpu']:.2f}x CPU")
    if "ours (1 worker)" in results:
        print(f"one worker: {naive['seconds'] / results['ours (1 worker)']['seconds']:.2f}x naive; "
              f"exact: {naive['seconds'] / results['ours exact (all frames decoded)']['seconds']:.2f}x naive")
        short = results["ours, first 4 minutes"]
        print(f"peak RSS, 4 min vs {duration / 60:.0f} min of film: {short['rss_mb']:.0f} vs {ours['rss_mb']:.0f} MB "
              f"(ffmpeg {short['child_rss_mb']:.0f} vs {ours['child_rss_mb']:.0f} MB)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
