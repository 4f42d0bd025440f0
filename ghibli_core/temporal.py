"""Temporal stability of stylized video: optical flow, flicker reduction, and its measure.

An image model stylizes every frame on its own, so small changes between input frames (noise,
compression, motion) become large, flickering changes in the output. The cure used here is the
post-processing of Ruder et al. (2016) / Lai et al. (2018) kept cheap enough for a CPU:

1. :class:`FlowEstimator`: dense optical flow between consecutive *input* frames (OpenCV's DIS,
   Kroeger et al. 2016, a few ms per 480p frame), in both directions. A pixel's flow is
   *reliable* when the forward and backward flows agree (Sundaram et al. 2010:
   ``|b + f(x + b)|^2 <= a (|b|^2 + |f(x + b)|^2) + c``), it is not on a motion boundary, and it
   lands inside the frame; occluded and disoccluded pixels fail the check. A scene cut (very
   different histograms, or too few reliable pixels) means no correspondence at all.
2. :class:`TemporalStabilizer`: warps the previous *output* frame to the current one with that
   flow and blends it into the new stylized frame where the flow is reliable, with a strength
   in ``[0, 1]`` (raised where the input is still: any change of the output there is flicker);
   after a cut it starts afresh.
3. :class:`WarpingError` / :func:`warping_error`: the warping error of Lai et al. (2018),
   "Learning Blind Video Temporal Consistency": for each pair of consecutive output frames, the
   mean over non-occluded pixels of the squared RGB distance (values in ``[0, 1]``) between the
   frame and the previous one warped by the input's flow; averaged over pairs.

Frames are uint8 ``(H, W, 3)`` RGB arrays; flows are float32 ``(H, W, 2)`` in pixels, giving
for each pixel of the current frame its offset ``(dx, dy)`` to where it was in the previous one.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np

__all__ = [
    "FlowEstimator",
    "Motion",
    "TemporalStabilizer",
    "WarpingError",
    "evaluate_stability",
    "warp",
    "warping_error",
]

_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
# a second, unrelated method (Farneback 2003, polynomial expansion), so that a measurement can
# use another flow than the stabilizer it measures
_METHODS = (*_PRESETS, "farneback")


class Motion:
    """How the current frame relates to the previous one.

    The flow is computed on downscaled frames (``FlowEstimator.max_side``); its fields are kept
    at that resolution (:attr:`coarse`) and brought to the frame's size only when read, so that
    the stabilizer can do its per-pixel work at the flow's resolution.

    Attributes:
        flow: float32 ``(H, W, 2)``: for each pixel of the current frame, the offset ``(dx, dy)``
            to its position in the previous frame; None at a cut.
        reliable: bool ``(H, W)``: pixels whose flow passed the checks (not occluded); None at
            a cut.
        cut: the frames belong to different shots; nothing should be carried over.
        residual: float32 ``(H, W)``: grey-level difference (0..255) between the current input
            frame and the previous one warped by ``flow``; large where the flow is wrong or
            the light changed. None at a cut.
        boundary: bool, at the flow's resolution (not upscaled): pixels that passed every check
            but the motion-boundary test, None when it did not run (or at a cut).
        size: ``(H, W)`` of the frames; the arrays given may be smaller (the flow's resolution,
            same aspect ratio), in which case the attributes above are upscaled on first read
            (flow values scaled with the size, the mask by nearest neighbour).
        positions: ``grid + flow`` at the flow's resolution when the caller has it (saves
            computing it again for :meth:`positions`).
    """

    def __init__(
        self,
        flow: np.ndarray | None,
        reliable: np.ndarray | None,
        cut: bool = False,
        residual: np.ndarray | None = None,
        *,
        size: tuple[int, int] | None = None,
        boundary: np.ndarray | None = None,
        positions: np.ndarray | None = None,
    ):
        self.cut = bool(cut)
        self.boundary = boundary
        self._positions = positions  # grid + flow at the flow's resolution, when already computed
        self._coarse = (flow, reliable, residual)
        self.size = tuple(size) if size is not None else (None if flow is None else flow.shape[:2])
        self._fine: dict[str, np.ndarray | None] = {}

    @property
    def coarse(self) -> tuple:
        """``(flow, reliable, residual)`` at the flow's resolution (what was given)."""
        return self._coarse

    @property
    def upscaled(self) -> bool:
        """Whether the arrays were computed smaller than the frames."""
        return self._coarse[0] is not None and self._coarse[0].shape[:2] != self.size

    def _get(self, name: str, index: int, upscale: Callable) -> np.ndarray | None:
        if name not in self._fine:
            value = self._coarse[index]
            self._fine[name] = upscale(value, self.size) if value is not None and self.upscaled else value
        return self._fine[name]

    @property
    def flow(self) -> np.ndarray | None:
        return self._get("flow", 0, _upscale_flow)

    @property
    def reliable(self) -> np.ndarray | None:
        return self._get("reliable", 1, _upscale_mask)

    @property
    def residual(self) -> np.ndarray | None:
        return self._get("residual", 2, _upscale_map)

    def positions(self) -> np.ndarray:
        """float32 ``(H, W, 2)`` at the frames' size: each pixel's ``(x, y)`` in the previous
        frame (the map :func:`cv2.remap` takes; cached). From downscaled fields, the coarse
        positions are upscaled and brought to frame coordinates in one affine pass (pixel
        centres aligned) instead of upscaling the flow, scaling it and adding the grid: the
        same within 1e-3 px but on the outermost pixels, where the position rather than the
        flow is held constant beyond the last coarse pixel centre (up to ``(scale - 1) / 2`` px
        off: 0.17 px for 480p frames with the default ``max_side``)."""
        if "positions" not in self._fine:
            flow = self._coarse[0]
            if flow is None:
                raise ValueError("no motion at a cut")
            fh, fw = flow.shape[:2]
            where = self._positions if self._positions is not None else cv2.add(_grid(fh, fw), flow)
            if self.upscaled:
                h, w = self.size
                sx, sy = w / fw, h / fh
                to_frame = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5]], np.float32)
                where = cv2.transform(cv2.resize(where, (w, h), interpolation=cv2.INTER_LINEAR), to_frame)
            self._fine["positions"] = where
        return self._fine["positions"]

    @property
    def reliable_share(self) -> float:
        reliable = self._coarse[1]
        return 0.0 if reliable is None else float(reliable.mean())


def _upscale_flow(flow: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A flow at another resolution: resized (bilinear) and its vectors scaled with it."""
    h, w = size
    fh, fw = flow.shape[:2]
    return cv2.multiply(cv2.resize(flow, (w, h), interpolation=cv2.INTER_LINEAR), (w / fw, h / fh, 0.0, 0.0))


def _upscale_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(mask.view(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST).view(bool)


def _upscale_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(values, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def _check_frame(frame: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"{name}: expected a uint8 (H, W, 3) RGB frame, got {got}")
    return frame


_GRIDS: dict[tuple[int, int], np.ndarray] = {}
_GRIDS_LOCK = threading.Lock()


def _grid(h: int, w: int) -> np.ndarray:
    """Pixel coordinates, float32 ``(h, w, 2)`` with ``(x, y)`` per pixel (cached per size,
    read-only): adding a flow gives the map :func:`cv2.remap` takes in one array."""
    with _GRIDS_LOCK:
        grid = _GRIDS.get((h, w))
        if grid is None:
            if len(_GRIDS) > 16:
                _GRIDS.clear()
            xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
            grid = np.dstack([xs, ys])
            grid.setflags(write=False)
            _GRIDS[(h, w)] = grid
    return grid


def _sqnorm(v: np.ndarray) -> np.ndarray:
    """``|v|^2`` per pixel of an ``(H, W, 2)`` field (squaring the whole array first is 2x
    faster than squaring the strided channels; einsum is 10x slower)."""
    sq = v * v
    return sq[..., 0] + sq[..., 1]


def _ramp(residual: np.ndarray, limit: float) -> np.ndarray:
    """1 where ``residual`` is up to ``limit / 2``, falling linearly to 0 at ``limit``."""
    return np.clip(2.0 - residual * (2.0 / limit), 0.0, 1.0)


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Sample ``image`` (``(H, W)`` or ``(H, W, C)``, uint8 or float32) at ``x + flow(x)``
    (bilinear, borders replicated): the previous frame brought onto the current one."""
    h, w = flow.shape[:2]
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and flow {flow.shape[:2]} sizes differ")
    return _sample(image, cv2.add(_grid(h, w), flow))


def _sample(image: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``image`` read at ``positions`` (float32 ``(H, W, 2)``, ``(x, y)`` per pixel): bilinear,
    borders replicated."""
    return cv2.remap(image, positions, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


class FlowEstimator:
    """Optical flow between consecutive frames with a reliability mask and scene-cut detection.

    Args:
        preset: DIS preset, ``"ultrafast"``, ``"fast"`` or ``"medium"`` (slower, finer); or
            ``"farneback"``, OpenCV's Farneback flow (a different method, slower: the warping
            error's default, so it does not measure a stabilizer with that stabilizer's own flow).
        max_side: the flow is computed on frames downscaled so the longer side is at most this
            (and upscaled after); flow does not need full resolution and costs with the area.
        finest_scale: DIS's finest pyramid level (0 = the frame given to DIS, 1 = half of it,
            2 = a quarter); None keeps the preset's (2 for ``fast``). DIS's flow is computed
            on a grid at this level and interpolated above it, so a frame downscaled by half with
            level 1 gets about the grid of the full frame with level 2, for less work after.
        forward_backward: run the forward-backward check (a second flow, forward, per pair);
            without it only motion boundaries, the frame's edges and the stabilizer's residual
            gate catch occlusions (cheaper, more ghosting: see benchmarks/bench_stability.py).
        consistency: ``a`` of the forward-backward check (relative tolerance).
        consistency_offset: ``c`` of the check, squared pixels (absolute tolerance).
        motion_boundaries: also reject pixels where the flow changes sharply (edges of moving
            objects, where one side is about to be occluded): ``|grad b|^2 > 0.01 |b|^2 +
            boundary_offset`` (Ruder et al. 2016).
        boundary_offset: the absolute term of that test.
        cut_threshold: a cut when the grey-level histograms differ by more than this (total
            variation distance, 0..1).
        min_reliable: also a cut when fewer than this share of pixels have reliable flow.

    Not safe to call from two threads at once (the DIS object keeps buffers); a lock serialises calls.
    """

    def __init__(
        self,
        *,
        preset: str = "fast",
        max_side: int = 640,
        finest_scale: int | None = None,
        forward_backward: bool = True,
        consistency: float = 0.01,
        consistency_offset: float = 0.5,
        motion_boundaries: bool = True,
        boundary_offset: float = 0.002,
        cut_threshold: float = 0.4,
        min_reliable: float = 0.2,
    ):
        if preset not in _METHODS:
            raise ValueError(f"preset must be one of {', '.join(_METHODS)}, got {preset!r}")
        if max_side < 16:
            raise ValueError(f"max_side must be at least 16, got {max_side}")
        if not 0 < cut_threshold <= 1:
            raise ValueError(f"cut_threshold must be in (0, 1], got {cut_threshold}")
        if not 0 <= min_reliable < 1:
            raise ValueError(f"min_reliable must be in [0, 1), got {min_reliable}")
        self.preset = preset
        self.max_side = max_side
        self.forward_backward = forward_backward
        self.consistency = consistency
        self.consistency_offset = consistency_offset
        self.motion_boundaries = motion_boundaries
        self.boundary_offset = boundary_offset
        self.cut_threshold = cut_threshold
        self.min_reliable = min_reliable
        self._dis = cv2.DISOpticalFlow_create(_PRESETS[preset]) if preset in _PRESETS else None
        if finest_scale is not None:
            if self._dis is None:
                raise ValueError("finest_scale applies to the DIS presets, not to farneback")
            if not 0 <= finest_scale <= 4:
                raise ValueError(f"finest_scale must be between 0 and 4, got {finest_scale}")
            self._dis.setFinestScale(int(finest_scale))
        self.finest_scale = finest_scale
        self._lock = threading.Lock()
        self._previous: tuple | None = None  # what follow() keeps of the last frame

    def _grey(self, frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if (grey.shape[1], grey.shape[0]) != size:
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        return grey

    @staticmethod
    def _histogram(grey: np.ndarray) -> np.ndarray:
        hist = cv2.calcHist([grey], [0], None, [32], [0, 256]).ravel()
        return hist / hist.sum()

    @staticmethod
    def _distance(hist_a: np.ndarray, hist_b: np.ndarray) -> float:
        """Total variation distance (0..1) between two normalised histograms."""
        return 0.5 * float(np.abs(hist_a - hist_b).sum())

    @staticmethod
    def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
        """Total variation distance (0..1) between the 32-bin histograms of two grey images."""
        return FlowEstimator._distance(FlowEstimator._histogram(a), FlowEstimator._histogram(b))

    def _calc(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Flow ``f`` with ``a(x) ~ b(x + f(x))``."""
        if self._dis is not None:
            return self._dis.calc(a, b, None)
        # 5 pyramid levels (large motions), 15 px windows, 3 iterations per level
        return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 5, 15, 3, 5, 1.2, 0)

    def _prepare(self, frame: np.ndarray) -> tuple:
        """What the flow needs of one frame: its shape, the scale, the grey image at that scale
        and its histogram (computed once per frame by :meth:`follow`)."""
        h, w = frame.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        grey = self._grey(frame, (max(8, round(w * scale)), max(8, round(h * scale))))
        return frame.shape, scale, grey, self._histogram(grey)

    def __call__(self, prev: np.ndarray, cur: np.ndarray) -> Motion:
        """The motion from ``prev`` to ``cur`` (uint8 ``(H, W, 3)`` frames of one size)."""
        _check_frame(prev, "prev")
        _check_frame(cur, "cur")
        if prev.shape != cur.shape:
            raise ValueError(f"frames differ in size: {prev.shape} and {cur.shape}")
        return self._motion(self._prepare(prev), self._prepare(cur))

    def follow(self, frame: np.ndarray) -> Motion | None:
        """Streaming: the motion from the frame given to the previous call to this one (None for
        the first frame, after :meth:`restart`, or when the size changes). The same as
        ``self(previous, frame)``, with each frame's grey image and histogram computed once."""
        _check_frame(frame, "frame")
        cur = self._prepare(frame)
        prev, self._previous = self._previous, cur
        if prev is None or prev[0] != cur[0]:
            return None
        return self._motion(prev, cur)

    def restart(self) -> None:
        """Forget the frame :meth:`follow` last saw."""
        self._previous = None

    def _motion(self, prev: tuple, cur: tuple) -> Motion:
        (h, w, _), scale, g_prev, hist_prev = prev
        _, _, g_cur, hist_cur = cur
        fh, fw = g_cur.shape
        # 1. a cheap cut test before any flow
        if self._distance(hist_prev, hist_cur) > self.cut_threshold:
            return Motion(None, None, cut=True)
        # 2. flow at the reduced size: backward, and forward for the check
        with self._lock:
            back = self._calc(g_cur, g_prev)  # cur(x) ~ prev(x + back(x))
            fwd = self._calc(g_prev, g_cur) if self.forward_backward else None  # prev(y) ~ cur(y + fwd(y))
        where = cv2.add(_grid(fh, fw), back)  # each pixel's position in the previous frame
        reliable = cv2.inRange(where, (0.0, 0.0), (fw - 1.0, fh - 1.0)) != 0  # lands inside the frame
        back_sq = _sqnorm(back)
        # the tolerances are in full-resolution pixels; flows here are `scale` times smaller
        s2 = scale * scale
        if fwd is not None:
            # 3. forward-backward consistency: following back then fwd returns to the start
            fwd_at = _sample(fwd, where)
            err = _sqnorm(cv2.add(back, fwd_at))
            mag = back_sq + _sqnorm(fwd_at)
            reliable &= err <= self.consistency * mag + self.consistency_offset * s2
        boundary = None
        if self.motion_boundaries:
            # central differences (one-sided halves at the border)
            gx = cv2.Sobel(back, cv2.CV_32F, 1, 0, ksize=1, scale=0.5, borderType=cv2.BORDER_REPLICATE)
            gy = cv2.Sobel(back, cv2.CV_32F, 0, 1, ksize=1, scale=0.5, borderType=cv2.BORDER_REPLICATE)
            smooth = _sqnorm(gx) + _sqnorm(gy) <= 0.01 * back_sq / s2 + self.boundary_offset
            boundary = reliable & ~smooth  # passed the other checks, on a motion boundary
            reliable &= smooth
        if reliable.mean() < self.min_reliable:
            return Motion(None, None, cut=True)
        # 4. how well the flow explains the input: the previous frame warped onto this one
        warped = _sample(g_prev, where)
        residual = cv2.absdiff(g_cur, warped).astype(np.float32)
        return Motion(back, reliable, residual=residual, size=(h, w), boundary=boundary, positions=where)


class TemporalStabilizer:
    """Reduce flicker: blend each stylized frame with the previous output, motion-compensated.

    ``out_t = s_t + strength * m * (warp(out_{t-1}) - s_t)`` where ``s_t`` is the stylized frame
    and ``m`` the reliability mask, lowered where the warped previous *input* does not match the
    current input (a wrong flow, a change of light), and feathered inwards so that blended and
    unblended regions meet smoothly; ``strength`` is raised (``still_gain``) where the input is
    still along the flow, and pixels that failed only the motion-boundary test are blended after
    all where the input is still along the flow (``boundary_residual``). Being recursive, it
    averages along motion trajectories over several frames.

    Args:
        strength: in ``[0, 1]``; 0 = off, 1 = the warped previous output wherever the flow is
            reliable (only occlusions and new content are taken from the new frame).
        flow: the :class:`FlowEstimator` (default settings when None).
        feather: Gaussian sigma in pixels of the mask's inner ramp.
        max_residual: grey-level difference (0..255) between the current input and the warped
            previous input at which a pixel gets no blending: full weight up to half of it,
            falling linearly to 0 at it. Small residuals are noise and flow imprecision (the
            flicker to remove); large ones mean the flow does not explain the input there.
        still_gain: where the input is still along the flow (residual under ``still_residual``)
            and at least ``still_margin`` pixels inside the reliable region, the weight is
            ``min(max(strength, 0.9), still_gain * strength)`` instead of ``strength``: there the
            content did not change, so any change of the output is flicker, and blending harder
            carries nothing across an occlusion. 1 turns it off. The default 1.8 gives 0.9 at
            strength 0.5 (benchmarks/bench_stability.py at 0.5: slow pan -88.9% instead of
            -74.6%, object crossing -65.0% instead of -54.7%; ghosting 5.0% / 15.9% instead of
            3.1% / 13.6%). Capped at 0.9 below strength 1 so that the output still follows a
            slow change of light.
        still_residual: grey levels: full boost up to half of it, none from it.
        still_margin: pixels between the boosted region and any unreliable pixel (occlusions,
            motion boundaries), where ghosts would come from.
        boundary_residual: pixels that failed only the flow's motion-boundary test (``Motion.
            boundary``: where the flow changes sharply, the edges of moving things, but also
            people's limbs and cloth) are blended after all where the input is still along the
            flow: full weight up to half of this residual, none from it (a stricter gate than
            ``max_residual``). 0 rejects them all, as before 2026-11-30. The default 24
            (benchmarks/bench_stability.py at 0.5): crowd -34.1% instead of -27.2%, non-rigid
            -66.6% instead of -59.9%, ghosting 239% / 17.2% (crowd / object) instead of 188% /
            15.9%.

    Use: ``motion = stabilizer.follow(input)`` (or ``stabilizer.analyze(prev_input, input)``),
    then ``out = stabilizer(stylized, motion)`` for frames in order (motion None for the first).
    """

    def __init__(
        self,
        *,
        strength: float = 0.5,
        flow: FlowEstimator | None = None,
        feather: float = 2.0,
        max_residual: float = 60.0,
        still_gain: float = 1.8,
        still_residual: float = 12.0,
        still_margin: int = 8,
        boundary_residual: float = 24.0,
    ):
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {strength}")
        if feather < 0:
            raise ValueError(f"feather must be >= 0, got {feather}")
        if not max_residual > 0:
            raise ValueError(f"max_residual must be positive, got {max_residual}")
        if still_gain < 1:
            raise ValueError(f"still_gain must be >= 1 (1 = off), got {still_gain}")
        if not still_residual > 0:
            raise ValueError(f"still_residual must be positive, got {still_residual}")
        if still_margin < 0:
            raise ValueError(f"still_margin must be >= 0, got {still_margin}")
        if boundary_residual < 0:
            raise ValueError(f"boundary_residual must be >= 0 (0 = off), got {boundary_residual}")
        self.strength = float(strength)
        self.flow = flow or FlowEstimator()
        self.feather = feather
        self.max_residual = float(max_residual)
        self.still_gain = float(still_gain)
        self.still_residual = float(still_residual)
        self.still_margin = int(still_margin)
        self.boundary_residual = float(boundary_residual)
        self.cuts = 0
        self._prev: np.ndarray | None = None  # uint8 (H, W, 3): the last output

    def analyze(self, prev: np.ndarray, cur: np.ndarray) -> Motion:
        """The motion between two consecutive *input* frames."""
        return self.flow(prev, cur)

    def follow(self, frame: np.ndarray) -> Motion | None:
        """The motion from the previous *input* frame given here to ``frame`` (None for the
        first): :meth:`FlowEstimator.follow`, for frames fed in order."""
        return self.flow.follow(frame)

    def reset(self) -> None:
        """Forget the previous output (the next frame starts afresh)."""
        self._prev = None

    @property
    def still_strength(self) -> float:
        """The weight where the input is still (see ``still_gain``)."""
        return min(max(self.strength, 0.9), self.still_gain * self.strength)  # >= strength: still_gain >= 1

    def weights(self, motion: Motion) -> np.ndarray:
        """float32 ``(H, W)`` blending weights of the warped previous output, in
        ``[0, still_strength]`` (``strength`` outside still regions), at the frames' size.

        Computed at the flow's resolution (``motion.coarse``; ``feather`` and ``still_margin``
        are frame pixels, scaled to it) and upscaled once, bilinearly."""
        m = self._coarse_weights(motion)
        return _upscale_map(m, motion.size) if motion.upscaled else m

    def _coarse_weights(self, motion: Motion) -> np.ndarray:
        _, reliable, residual = motion.coarse
        r = reliable.shape[1] / motion.size[1]  # flow pixels per frame pixel (1 when not downscaled)
        m = reliable.astype(np.float32)
        if residual is not None:
            m *= _ramp(residual, self.max_residual)
            if self.boundary_residual > 0 and motion.boundary is not None:
                m += motion.boundary * _ramp(residual, self.boundary_residual)
        if self.feather > 0:
            m *= cv2.GaussianBlur(m, (0, 0), self.feather * r)  # zero where unreliable, ramps up inside
        still = self.still_strength
        if still > self.strength and residual is not None:
            # only well inside the reliable region
            boost = _ramp(residual, self.still_residual)
            margin = self.still_margin * r
            if round(margin) > 0:
                k = 2 * round(margin) + 1
                inside = cv2.erode(reliable.view(np.uint8), np.ones((k, k), np.uint8))
                boost *= cv2.GaussianBlur(inside.astype(np.float32), (0, 0), margin / 2)
            m *= self.strength + (still - self.strength) * boost
        else:
            m *= self.strength
        return m

    def __call__(self, stylized: np.ndarray, motion: Motion | None) -> np.ndarray:
        """The stabilized uint8 ``(H, W, 3)`` frame for ``stylized`` (the model's output for the
        frame ``motion`` leads to)."""
        _check_frame(stylized, "stylized")
        if motion is not None and motion.cut:
            self.cuts += 1
        usable = (
            motion is not None and not motion.cut and self._prev is not None
            and self._prev.shape == stylized.shape and motion.size == stylized.shape[:2]
        )
        if not usable or self.strength == 0:
            self._prev = stylized
            return stylized
        w = self.weights(motion)
        # one pass: (1 - w) * stylized + w * warped, rounded to uint8
        out = cv2.blendLinear(stylized, _sample(self._prev, motion.positions()), 1.0 - w, w)
        self._prev = out
        return out


class WarpingError:
    """Running warping error (Lai et al. 2018) of one frame sequence, given the input's motion.

    Per pair: ``sum_i M_i ||O_t(i) - warp(O_{t-1})(i)||^2 / sum_i M_i`` with RGB values in
    ``[0, 1]`` and ``M`` the non-occlusion mask; :attr:`value` is the mean over pairs. Pairs at
    scene cuts are skipped (counted in :attr:`skipped`).
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.pairs = 0
        self.skipped = 0

    def update(self, prev: np.ndarray, cur: np.ndarray, motion: Motion) -> None:
        if motion.cut or motion.reliable is None or not motion.reliable.any():
            self.skipped += 1
            return
        warped = warp(prev.astype(np.float32), motion.flow)
        diff = (cur.astype(np.float32) - warped) / 255.0
        sq = np.einsum("hwc,hwc->hw", diff, diff)
        self.total += float(sq[motion.reliable].mean())
        self.pairs += 1

    @property
    def value(self) -> float:
        """Mean over the pairs measured (NaN before any)."""
        return self.total / self.pairs if self.pairs else float("nan")


def warping_error(
    inputs: Iterable[np.ndarray], outputs: Iterable[np.ndarray], *, flow: FlowEstimator | None = None
) -> float:
    """Warping error of ``outputs`` with the motion of ``inputs`` (same length, uint8 HWC frames);
    pass the same sequence twice to measure the input itself."""
    flow = flow or FlowEstimator()
    meter = WarpingError()
    prev_in = prev_out = None
    count = 0
    for frame, out in zip(inputs, outputs, strict=True):
        _check_frame(out, "output")
        if prev_in is not None:
            meter.update(prev_out, out, flow(prev_in, frame))
        prev_in, prev_out = frame, out
        count += 1
    if count < 2:
        raise ValueError(f"the warping error needs at least 2 frames, got {count}")
    return meter.value


def evaluate_stability(
    frames: Iterable[np.ndarray],
    run_model: Callable,
    *,
    strength: float | Sequence[float] = 0.5,
    flow: FlowEstimator | None = None,
    metric_flow: FlowEstimator | None = None,
    batch_size: int = 4,
    on_output: Callable[[int, np.ndarray, dict[float, np.ndarray]], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Warping errors of a clip: the input, its stylization frame by frame, and stabilized.

    Args:
        frames: uint8 ``(H, W, 3)`` input frames in order (e.g. a :class:`~ghibli_core.video.FrameReader`).
        run_model: ``(N, 3, H, W)`` float32 in ``[-1, 1]`` -> the same shape (the stylizer).
        strength: the stabilizer's strength, or several to compare in one pass (the model and
            the flow run once; each strength gets its own stabilizer).
        flow: the stabilizers' estimator.
        metric_flow: the estimator of the measurement; None uses ``flow`` (then the metric
            follows the very motion the stabilizers followed, and part of the reduction is
            by construction: pass another method, e.g. ``FlowEstimator(preset="farneback")``,
            for an independent measure).
        batch_size: frames per model call.
        on_output: called as ``on_output(index, stylized, {strength: stabilized})`` for every
            frame (e.g. to keep samples for KID).
        progress: called with the number of frames done after each batch.

    Returns:
        ``{"frames", "pairs", "cuts", "input", "stylized", "strength", "stabilized",
        "reduction", "sweep"}``: warping errors of the input and of the frames stylized one by
        one; ``stabilized`` and ``reduction`` (``1 - stabilized / stylized``, the share of
        warping error removed) for the first strength; ``sweep`` lists ``{"strength",
        "stabilized", "reduction"}`` for every strength.
    """
    from .video import frames_to_tensor, tensor_to_frames

    strengths = [float(strength)] if isinstance(strength, (int, float)) else [float(s) for s in strength]
    if not strengths:
        raise ValueError("give at least one strength")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    flow = flow or FlowEstimator()
    stabilizers = {s: TemporalStabilizer(strength=s, flow=flow) for s in strengths}
    metric_flow = metric_flow or flow
    meters = {key: WarpingError() for key in ["input", "stylized", *strengths]}
    prev: dict | None = None
    n = 0
    it = iter(frames)
    while True:
        batch = [f for _, f in zip(range(batch_size), it)]
        if not batch:
            break
        styled = tensor_to_frames(run_model(frames_to_tensor(batch)))
        for frame, out in zip(batch, styled):
            motion = None if prev is None else flow(prev["input"], frame)
            stabilized = {s: stab(out, motion) for s, stab in stabilizers.items()}
            cur = {"input": frame, "stylized": out, **stabilized}
            if motion is not None:
                measured = motion if metric_flow is flow else metric_flow(prev["input"], frame)
                for key, meter in meters.items():
                    meter.update(prev[key], cur[key], measured)
            if on_output is not None:
                on_output(n, out, stabilized)
            prev = cur
            n += 1
        if progress is not None:
            progress(n)
    if n < 2:
        raise ValueError(f"the warping error needs at least 2 frames, got {n}")
    base = meters["stylized"].value
    sweep = [
        {"strength": s, "stabilized": meters[s].value, "reduction": 1.0 - meters[s].value / base if base > 0 else 0.0}
        for s in strengths
    ]
    return {
        "frames": n,
        "pairs": meters["input"].pairs,
        "cuts": meters["input"].skipped,
        "input": meters["input"].value,
        "stylized": base,
        **sweep[0],
        "sweep": sweep,
    }
