"""Temporal stability measured against the true motion: camera moves over real photos.

    python benchmarks/bench_stability.py [--photos 6] [--frames 48] [--strengths 0.3,0.5,0.7,0.9]

On a real clip the warping error (Lai et al. 2018) needs an estimated optical flow, and on CPU
flows the estimate's own mistakes are a large part of what it measures: measured with the
stabilizer's own flow, part of the reduction is by construction; measured with another flow
(``evaluate video --metric-flow farneback``), the two flows' disagreements set a floor no
stabilizer can remove. Here the motion is known exactly, so neither problem arises.

For each of ``--photos`` photos of ../shared/data/photos (a synthetic texture when missing) and
each motion, a clip of ``--frames`` frames at 25 fps and 480x360: the photo seen through a moving
camera (bicubic, never shrunk), with new sensor noise in every frame (Gaussian, sigma 2 grey
levels), encoded with x264 (CRF 23) and decoded again, as an uploaded clip would be. Motions:

- ``slow``: a 1.5 px/frame pan with a slow zoom, as in a film;
- ``fast``: an 8 px/frame pan with zoom and rotation, a phone swung around;
- ``object``: a slow pan with a piece of another photo crossing the frame at 10 px/frame (two
  motions, occlusions and disocclusions at its edges);
- ``film``: old film: a still camera with gate weave (random 0.7 px shakes), exposure flicker
  (+-4 %), heavy grain (sigma 6) in black and white;
- ``wobble``: non-rigid motion: a still camera on a picture that bends like cloth or water
  (travelling waves of 6 px amplitude, 160 px wavelength; ~2 px/frame of local motion);
- ``crowd``: people-like motion: six narrow upright pieces of other photos walking every way
  at 2-6 px/frame, each turning slowly, crossing and hiding one another and the background.

Every pixel's position in the previous frame follows from the camera path and the pieces':
that is the true flow; pixels whose source lies outside the previous frame, showed another
surface there (hidden by or behind a piece), or lies on a piece's (blended) edge are the
occluded ones.

Each clip is stylized frame by frame with the model (``--model``, default: the default video
model), stabilized by :class:`ghibli_core.temporal.TemporalStabilizer` at each strength (its
own DIS flow on the decoded frames, as in the app), and the warping error of the output is
measured three ways: along the true motion (the honest figure), along an independent flow
(Farneback), and along the stabilizer's flow. Prints, per motion, the reduction against
frame-by-frame stylization at each strength (errors summed over the photos), and the ghosting:
the mean squared difference between the stabilized and the frame-by-frame output on the
occluded pixels, where nothing should have been carried over, as a share of the frame-by-frame
warping error along the true motion (0 = nothing carried). Bar (issue 4): at least 40% less
warping error at the default strength, 0.5. ``--set KEY=VALUE`` tries other stabilizer or flow
settings.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHOTOS = ROOT.parent / "shared" / "data" / "photos"
W, H, FPS = 480, 360, 25

MOTIONS = {
    # per frame: pan (px, in frame pixels), zoom factor, rotation (degrees)
    "slow": dict(pan=(1.5, 0.4), zoom=1.002, turn=0.0),
    "fast": dict(pan=(8.0, 2.0), zoom=1.004, turn=0.25),
    # a slow pan with an object (a 160x120 piece of another photo) crossing at 10 px/frame:
    # occlusions and disocclusions at its edges, two motions in one frame
    "object": dict(pan=(1.5, 0.4), zoom=1.0, turn=0.0,
                   sprites=[dict(size=(160, 120), centre=(W / 2, H / 2), velocity=(10.0, 3.0), spin=0.0)]),
    # old film: a still camera with gate weave (random 0.7 px shakes), exposure flicker (4 %),
    # heavy grain, black and white
    "film": dict(pan=(0.0, 0.0), zoom=1.0, turn=0.0, weave=0.7, flicker=0.04, grain=6.0, grey=True),
    # non-rigid: a still camera on a picture that bends like cloth or water (waves of 6 px
    # amplitude and 160 px wavelength travelling through it, ~2 px/frame of local motion)
    "wobble": dict(pan=(0.0, 0.0), zoom=1.0, turn=0.0, wobble=(6.0, 160.0, 0.05)),
    # people-like: six narrow upright pieces walking every way at 2-6 px/frame, each turning a
    # little, crossing and hiding one another in front of a still background
    "crowd": dict(pan=(0.0, 0.0), zoom=1.0, turn=0.0, sprites=[
        dict(size=(40, 100), centre=(cx, cy), velocity=(vx, vy), spin=spin)
        for cx, cy, vx, vy, spin in [
            (120, 180, 4.0, 0.5, 0.8), (360, 170, -5.0, 0.3, -1.0), (240, 220, 2.0, -1.0, 1.2),
            (200, 140, -3.0, 0.8, -0.6), (300, 250, 6.0, -0.5, 0.5), (150, 260, -2.5, -0.7, -1.4),
        ]
    ]),
}


def sources(n: int, frames: int) -> list[np.ndarray]:
    """``n`` RGB photos, resized so the camera never shrinks them and the fastest pan stays inside."""
    from ghibli_core.imaging import list_images, load_image

    images = []
    if PHOTOS.is_dir():
        paths = list_images(PHOTOS)
        for p in paths[:: max(1, len(paths) // n)][:n]:
            images.append(np.asarray(load_image(p)))
    while len(images) < n:  # no shared data: a smooth random texture
        rng = np.random.default_rng(len(images))
        images.append(cv2.GaussianBlur(rng.integers(0, 256, (800, 1200, 3), dtype=np.uint8), (0, 0), 3))
    out = []
    for img in images:
        fast = MOTIONS["fast"]["pan"]
        k = max(2 * H / min(img.shape[:2]), (W + fast[0] * frames + 64) / img.shape[1],
                (H + fast[1] * frames + 64) / img.shape[0])
        out.append(cv2.resize(img, (round(img.shape[1] * k), round(img.shape[0] * k)), interpolation=cv2.INTER_AREA))
    return out


def similarity(degrees: float, scale: float, source, target) -> np.ndarray:
    """3x3 matrix turning by ``degrees`` and scaling by ``scale`` about ``source``, which it moves to ``target``."""
    a = math.radians(degrees)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) * scale
    m = np.eye(3)
    m[:2, :2] = rot
    m[:2, 2] = np.asarray(target, np.float64) - rot @ np.asarray(source, np.float64)
    return m


def apply(m: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points ``(x, y)`` moved by the 3x3 affine matrix ``m``."""
    return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]


def camera(src_shape, t: float, motion: dict) -> np.ndarray:
    """3x3 matrix taking source pixels to the pixels of frame ``t`` (0 = the middle of the clip)."""
    sh, sw = src_shape[:2]
    # the frame centre looks at a point moving across the source, through its centre mid-clip
    cx = sw / 2 + motion["pan"][0] * t
    cy = sh / 2 + motion["pan"][1] * t
    if motion.get("weave"):
        dx, dy = np.random.default_rng(round(t) + 1000).normal(0, motion["weave"], 2)
        cx, cy = cx + dx, cy + dy
    return similarity(motion["turn"] * t, motion["zoom"] ** t, (cx, cy), (W / 2, H / 2))


def sprite_at(t: float, sprite: dict) -> np.ndarray:
    """3x3 matrix taking a moving piece's own pixels to frame ``t``'s (0 = mid-clip)."""
    w, h = sprite["size"]
    centre = np.array(sprite["centre"]) + np.array(sprite["velocity"]) * t
    return similarity(sprite["spin"] * t, 1.0, (w / 2, h / 2), centre)


def alpha_at(t: float, sprite: dict) -> np.ndarray:
    """float32 (H, W) coverage of a moving piece in frame ``t`` (soft at its edges)."""
    w, h = sprite["size"]
    return cv2.warpAffine(np.ones((h, w), np.float32), sprite_at(t, sprite)[:2], (W, H), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def layers_at(t: float, motion: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(top, edge)`` for frame ``t``: the index of the piece fully covering each pixel (-1: the
    background), and where a piece's blended edge is the visible surface."""
    top = np.full((H, W), -1, np.int32)
    edge = np.zeros((H, W), bool)
    for k, sprite in enumerate(motion.get("sprites", [])):
        a = alpha_at(t, sprite)
        full, part = a >= 0.999, (a > 0.001) & (a < 0.999)
        top[full] = k
        edge[full] = False
        edge[part] = True
    return top, edge


def bend(x: np.ndarray, y: np.ndarray, t: float, motion: dict) -> tuple[np.ndarray, np.ndarray]:
    """The wobble's displacement ``d_t`` at frame pixels ``(x, y)``: frame ``t`` shows at x what the
    still picture shows at ``x + d_t(x)``."""
    amp, wavelength, speed = motion["wobble"]
    phase = 2 * math.pi * speed * t
    k = 2 * math.pi / wavelength
    return amp * np.sin(k * y + phase), amp * np.sin(k * x + 1.3 * phase)


def render(src: np.ndarray, pieces: list[np.ndarray], t: float, motion: dict) -> np.ndarray:
    if "wobble" in motion:
        xs, ys = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
        dx, dy = bend(xs, ys, t, motion)
        inv = np.linalg.inv(camera(src.shape, t, motion))
        qx, qy = xs + dx, ys + dy
        sx, sy = apply(inv, qx, qy)
        return cv2.remap(src, sx.astype(np.float32), sy.astype(np.float32), cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    frame = cv2.warpAffine(src, camera(src.shape, t, motion)[:2], (W, H), flags=cv2.INTER_CUBIC,
                           borderMode=cv2.BORDER_REFLECT)
    frame = frame.astype(np.float32)
    for piece, sprite in zip(pieces, motion.get("sprites", [])):
        layer = cv2.warpAffine(piece, sprite_at(t, sprite)[:2], (W, H), flags=cv2.INTER_CUBIC,
                               borderMode=cv2.BORDER_REFLECT)
        a = alpha_at(t, sprite)[..., None]
        frame = a * layer + (1 - a) * frame
    return frame


def make_clip(src: np.ndarray, pieces: list[np.ndarray], motion: dict, frames: int, path: Path,
              seed: int) -> list[np.ndarray]:
    """Render, add noise, encode with x264 and decode; returns the decoded frames and writes ``path``."""
    from ghibli_core.video import FrameReader, VideoWriter, probe

    rng = np.random.default_rng(seed)
    with VideoWriter(path, size=(W, H), fps=FPS, crf=23) as writer:
        for t in range(frames):
            frame = render(src, pieces, t - frames / 2, motion)
            frame = frame.astype(np.float32)
            if motion.get("grey"):
                frame = np.repeat(frame @ np.float32([[0.299], [0.587], [0.114]]), 3, axis=2)
            if motion.get("flicker"):
                frame = frame * (1 + rng.uniform(-1, 1) * motion["flicker"])
            shape = frame.shape[:2] + (1,) if motion.get("grey") else frame.shape  # grain: one value per pixel
            noisy = frame + rng.normal(0, motion.get("grain", 2.0), shape)
            writer.write(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
    with FrameReader(probe(path)) as reader:
        return list(reader)


def true_motion(src_shape, t: int, frames: int, motion: dict):
    """The exact :class:`Motion` from frame ``t - 1`` to frame ``t`` of a ``frames``-frame clip."""
    from ghibli_core.temporal import Motion

    mid = frames / 2
    to_prev = camera(src_shape, t - 1 - mid, motion) @ np.linalg.inv(camera(src_shape, t - mid, motion))
    xs, ys = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    qx, qy = xs, ys
    if "wobble" in motion:
        dx, dy = bend(xs, ys, t - mid, motion)
        qx, qy = xs + dx, ys + dy  # where the picture point shown at x sits without the wobble
    px, py = apply(to_prev, qx, qy)
    if "wobble" in motion:
        # the previous frame shows that point at y with y + d_{t-1}(y) = p: a fixed point
        # (the bend is a contraction: amplitude x wavenumber < 1)
        zx, zy = px, py
        for _ in range(30):
            dx, dy = bend(px, py, t - 1 - mid, motion)
            px, py = zx - dx, zy - dy
    flow = np.stack([px - xs, py - ys], -1).astype(np.float32)
    inside = (px >= 0) & (px <= W - 1) & (py >= 0) & (py <= H - 1)
    if "sprites" not in motion:
        return Motion(flow, inside)
    # each piece's pixels follow its own motion; a pixel counts when the same surface (the same
    # piece, or the background) is what the previous frame shows at its source; blended edges
    # belong to neither
    top, edge = layers_at(t - mid, motion)
    top_prev, edge_prev = layers_at(t - 1 - mid, motion)
    for k, sprite in enumerate(motion["sprites"]):
        on = top == k
        back = sprite_at(t - 1 - mid, sprite) @ np.linalg.inv(sprite_at(t - mid, sprite))
        bx, by = apply(back, xs[on], ys[on])
        flow[on, 0], flow[on, 1] = bx - xs[on], by - ys[on]
    src_x, src_y = xs.astype(np.float32) + flow[..., 0], ys.astype(np.float32) + flow[..., 1]
    inside = (src_x >= 0) & (src_x <= W - 1) & (src_y >= 0) & (src_y <= H - 1)
    there = cv2.remap(top_prev.astype(np.float32), src_x, src_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                      borderValue=-2)
    edge_there = cv2.remap(edge_prev.astype(np.uint8), src_x, src_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=1).astype(bool)
    return Motion(flow, inside & ~edge & ~edge_there & (there == top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=6)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--strengths", default="0.3,0.5,0.7,0.9")
    ap.add_argument("--model", default=None, help="model spec (default: the default video model)")
    ap.add_argument("--motions", default=",".join(MOTIONS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a stabilizer or flow setting to try instead of the default, e.g. --set max_residual=100 "
                         "--set motion_boundaries=0 (TemporalStabilizer and FlowEstimator arguments)")
    args = ap.parse_args()

    import torch

    from ghibli_core.hub import default_video_model, load
    from ghibli_core.imaging import to_tensor, to_uint8
    from ghibli_core.temporal import FlowEstimator, TemporalStabilizer, WarpingError
    from ghibli_core.video import as_frame_model

    torch.set_num_threads(2)
    stab_kw, flow_kw = {}, {}
    for item in args.set:
        key, _, value = item.partition("=")
        target = stab_kw if key in ("feather", "max_residual", "still_gain", "still_residual", "still_margin", "boundary_residual") else flow_kw
        target[key] = (value if key == "preset" else bool(int(value)) if key in ("motion_boundaries", "forward_backward")
                       else int(value) if key in ("finest_scale", "max_side", "still_margin") else float(value))
    FlowEstimator(**flow_kw)  # a bad setting fails here, before any work
    strengths = [float(s) for s in args.strengths.split(",")]
    spec = args.model or default_video_model()
    run = as_frame_model(load(spec, map_location="cpu"), (W, H), precision="fp32", batch_size=4)
    photos = sources(args.photos, args.frames)
    independent = FlowEstimator(preset="farneback")
    print(f"model {spec}; {len(photos)} photos x {args.frames} frames at {W}x{H}, x264 CRF 23; "
          f"stabilizer {stab_kw or 'defaults'}, flow {flow_kw or 'defaults'}")
    start = time.perf_counter()
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.motions.split(","):
            motion = MOTIONS[name]
            # errors summed over clips: {measure: {key: total}}, keys "stylized" and strengths
            totals = {m: {} for m in ("true", "independent", "own")}
            # what the stabilizer carried into occluded pixels (where nothing should be carried):
            # mean squared difference from the frame-by-frame output there, summed over clips
            ghosts = {s: 0.0 for s in strengths}
            for i, src in enumerate(photos):
                pieces = []  # the moving pieces: crops of the other photos
                for k, sprite in enumerate(motion.get("sprites", [])):
                    other = photos[(i + 1 + k) % len(photos)]
                    w, h = sprite["size"]
                    y0, x0 = (other.shape[0] - h) // 2, (other.shape[1] - w) // 2 + 37 * k
                    pieces.append(np.ascontiguousarray(other[y0:y0 + h, x0:x0 + w]))
                frames = make_clip(src, pieces, motion, args.frames, Path(tmp) / f"{name}{i}.mp4", seed=i)
                styled = []
                for k in range(0, len(frames), 4):
                    styled += list(to_uint8(run(to_tensor(np.stack(frames[k:k + 4])))))
                flow = FlowEstimator(**flow_kw)
                stabs = {s: TemporalStabilizer(strength=s, flow=flow, **stab_kw) for s in strengths}
                ghost = {s: [] for s in strengths}
                meters = {m: {key: WarpingError() for key in ["stylized", *strengths]} for m in totals}
                prev = None
                for t, (frame, out) in enumerate(zip(frames, styled)):
                    own = None if t == 0 else stabs[strengths[0]].analyze(frames[t - 1], frame)
                    cur = {"stylized": out, **{s: st(out, own) for s, st in stabs.items()}}
                    if t:
                        motions = {"true": true_motion(src.shape, t, len(frames), motion), "own": own,
                                   "independent": independent(frames[t - 1], frame)}
                        for m, by_key in meters.items():
                            for key, meter in by_key.items():
                                meter.update(prev[key], cur[key], motions[m])
                        hidden = ~motions["true"].reliable
                        if hidden.any():
                            for s_ in strengths:
                                d = (cur[s_][hidden].astype(np.float32) - out[hidden]) / 255.0
                                ghost[s_].append(float((d * d).sum(-1).mean()))
                    prev = cur
                for m, by_key in meters.items():
                    for key, meter in by_key.items():
                        totals[m][key] = totals[m].get(key, 0.0) + meter.value
                for s_ in strengths:
                    ghosts[s_] += float(np.mean(ghost[s_])) if ghost[s_] else 0.0
                print(f"  {name} motion, photo {i + 1}/{len(photos)}: stylized {meters['true']['stylized'].value:.5f}"
                      f" -> {meters['true'][0.5 if 0.5 in strengths else strengths[0]].value:.5f} (true motion)",
                      flush=True)
            summary[name] = {**totals, "ghost": ghosts}
    print(f"\nwarping error reduction against frame-by-frame stylization ({time.perf_counter() - start:.0f} s)")
    print(f"{'motion':<8}{'measured along':<26}" + "".join(f"{f'strength {s:g}':>14}" for s in strengths))
    for name, totals in summary.items():
        for m, label in (("true", "the true motion"), ("independent", "Farneback flow"), ("own", "the stabilizer's flow")):
            base = totals[m]["stylized"]
            cells = "".join(f"{-100 * (1 - totals[m][s] / base):>13.1f}%" for s in strengths)
            print(f"{name:<8}{label:<26}{cells}")
        # against the per-frame flicker along the true motion: the size of what was removed
        cells = "".join(f"{100 * totals['ghost'][s] / totals['true']['stylized']:>13.1f}%" for s in strengths)
        print(f"{name:<8}{'ghosting (occluded px)':<26}{cells}")
    if 0.5 in strengths:
        for name, totals in summary.items():
            r = 1 - totals["true"][0.5] / totals["true"]["stylized"]
            print(f"{name}: {100 * r:.1f}% less warping error at 0.5 along the true motion "
                  f"(bar >= 40%: {'met' if r >= 0.4 else 'NOT met'})")


if __name__ == "__main__":
    main()
