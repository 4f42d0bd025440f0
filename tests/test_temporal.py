"""Optical flow, temporal stabilization and the warping error (ghibli_core.temporal), and the
`evaluate video` command, on synthetic frames and clips made here."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ghibli_core.temporal import (
    FlowEstimator,
    Motion,
    TemporalStabilizer,
    WarpingError,
    evaluate_stability,
    warp,
    warping_error,
)
from ghibli_core.video import FrameReader, probe, stylize_video

from test_video import ffmpeg, make_clip  # noqa: E402 - the clip helpers


def texture(h=96, w=128, seed=0) -> np.ndarray:
    """A smooth random RGB texture (flow needs structure at several scales)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return cv2.GaussianBlur(img, (0, 0), 2.0)


def shifted(img: np.ndarray, dx: int, dy: int = 0) -> np.ndarray:
    """``img`` moved right by dx and down by dy (what a panning camera sees), edges replicated."""
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), borderMode=cv2.BORDER_REPLICATE)


def panning(n=12, step=2, h=96, w=128) -> list[np.ndarray]:
    base = texture(h, w + n * step)
    return [np.ascontiguousarray(base[:, (n - i) * step:(n - i) * step + w]) for i in range(n)]


def moving_square() -> tuple[np.ndarray, np.ndarray]:
    """Two 96x128 frames: a textured 40x40 square moves 6 px right over a still background."""
    bg = texture(96, 128, seed=1)
    square = texture(40, 40, seed=2)
    a, b = bg.copy(), bg.copy()
    a[30:70, 30:70] = square
    b[30:70, 36:76] = square
    return a, b


def flickery(seed=0):
    """A "stylizer" whose output flickers: a random gain, colour offset and noise per frame."""
    g = torch.Generator().manual_seed(seed)

    def model(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        gain = 1 + 0.15 * torch.randn(n, 1, 1, 1, generator=g)
        offset = 0.1 * torch.randn(n, 3, 1, 1, generator=g)
        return (x * gain + offset + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)

    return model


# -- flow ---------------------------------------------------------------------------------------
def test_warp_moves_pixels_by_the_flow():
    img = texture()
    flow = np.zeros(img.shape[:2] + (2,), np.float32)
    flow[..., 0] = -3  # every pixel comes from 3 px to its left
    out = warp(img, flow)
    np.testing.assert_array_equal(out[:, 3:], img[:, :-3])


def test_flow_finds_a_translation_and_flags_pixels_entering_the_frame():
    a = texture()
    b = shifted(a, 4)  # content moves right by 4: pixel x of b was at x - 4 in a
    motion = FlowEstimator()(a, b)
    assert not motion.cut
    inner = motion.flow[10:-10, 10:-10]
    assert np.median(inner[..., 0]) == pytest.approx(-4, abs=0.3)
    assert np.median(inner[..., 1]) == pytest.approx(0, abs=0.3)
    assert motion.reliable[:, 20:-20].mean() > 0.9
    # the strip that entered on the left has no source in the previous frame
    assert motion.reliable[:, :2].mean() < 0.5


@pytest.mark.parametrize("preset", ["medium", "farneback"])
def test_other_flow_methods_find_the_translation(preset):
    a = texture()
    b = shifted(a, 4, 1)
    motion = FlowEstimator(preset=preset)(a, b)
    inner = motion.flow[15:-15, 15:-15]
    assert np.median(inner[..., 0]) == pytest.approx(-4, abs=0.3)
    assert np.median(inner[..., 1]) == pytest.approx(-1, abs=0.3)
    assert motion.reliable[15:-15, 20:-20].mean() > 0.9
    with pytest.raises(ValueError, match="preset must be one of"):
        FlowEstimator(preset="raft")


def test_a_finer_dis_level_on_a_smaller_frame_finds_the_motion():
    a = texture(240, 320)
    b = shifted(a, 6, 2)
    motion = FlowEstimator(max_side=160, finest_scale=1)(a, b)
    assert motion.flow.shape == (240, 320, 2)
    inner = motion.flow[40:-40, 40:-40]
    assert np.median(inner[..., 0]) == pytest.approx(-6, abs=0.6)
    assert np.median(inner[..., 1]) == pytest.approx(-2, abs=0.6)
    with pytest.raises(ValueError, match="finest_scale applies to the DIS presets"):
        FlowEstimator(preset="farneback", finest_scale=1)
    with pytest.raises(ValueError, match="finest_scale must be between 0 and 4"):
        FlowEstimator(finest_scale=5)


def test_following_a_stream_gives_the_motion_of_each_pair():
    frames = [shifted(texture(), 2 * i, i) for i in range(4)]
    pairwise, stream = FlowEstimator(), FlowEstimator()
    assert stream.follow(frames[0]) is None  # nothing before the first frame
    for prev, cur in zip(frames, frames[1:]):
        a, b = pairwise(prev, cur), stream.follow(cur)
        np.testing.assert_array_equal(a.flow, b.flow)
        np.testing.assert_array_equal(a.reliable, b.reliable)
        np.testing.assert_array_equal(a.residual, b.residual)
    stream.restart()
    assert stream.follow(frames[1]) is None
    assert stream.follow(texture(64, 80)) is None  # another size: a new stream
    with pytest.raises(ValueError, match="frame: expected a uint8"):
        stream.follow(frames[0].astype(np.float32))


def test_flow_is_computed_downscaled_for_big_frames():
    a = texture(240, 320)
    b = shifted(a, 6, 2)
    motion = FlowEstimator(max_side=160)(a, b)
    assert motion.flow.shape == (240, 320, 2) and motion.reliable.shape == (240, 320)
    inner = motion.flow[40:-40, 40:-40]
    assert np.median(inner[..., 0]) == pytest.approx(-6, abs=0.6)
    assert np.median(inner[..., 1]) == pytest.approx(-2, abs=0.6)


def test_occlusion_behind_a_moving_object_is_unreliable():
    a, b = moving_square()
    motion = FlowEstimator()(a, b)
    assert not motion.cut
    assert np.median(motion.flow[35:65, 40:65, 0]) < -3  # the square is tracked
    # where the background reappears (x 30..36) nothing in a matches
    assert motion.reliable[32:68, 30:36].mean() < 0.3
    assert motion.reliable[35:65, 40:65].mean() > 0.8 and motion.reliable[:, 100:].mean() > 0.9


def test_the_forward_backward_check_flags_part_of_the_revealed_background_on_its_own():
    """Motion boundaries and the check each flag part of the background a moving object
    uncovers; with neither (``forward_backward=False``, ``motion_boundaries=False``) nothing
    does, and only the stabilizer's residual gate is left there."""
    a, b = moving_square()
    revealed = (slice(32, 68), slice(30, 36))
    share = {
        (fb, mb): FlowEstimator(forward_backward=fb, motion_boundaries=mb)(a, b).reliable[revealed].mean()
        for fb in (True, False) for mb in (True, False)
    }
    assert share[False, False] == 1.0  # nothing catches it
    assert share[True, False] < 0.85 and share[False, True] < 0.5  # each catches part
    assert share[True, True] < min(share[True, False], share[False, True])  # together more
    without = FlowEstimator(forward_backward=False)(a, b)
    assert np.median(without.flow[35:65, 40:65, 0]) < -3 and without.reliable[:, 100:].mean() > 0.9


def test_motion_boundary_pixels_are_blended_only_where_the_input_is_still_along_the_flow():
    a, b = moving_square()
    motion = FlowEstimator()(a, b)
    edge = motion.boundary
    assert edge.dtype == bool and edge.shape == motion.reliable.shape
    assert edge.sum() > 20 and not (edge & motion.reliable).any()  # only the boundary test failed there
    near = np.zeros_like(edge)
    near[25:75, 25:82] = True
    assert edge[near].mean() > 3 * edge[~near].mean()  # mostly around the moving square
    still, moved = edge & (motion.residual < 12), edge & (motion.residual >= 24)
    assert still.any() and moved.any()
    plain = dict(strength=1.0, feather=0, still_gain=1.0)
    off = TemporalStabilizer(boundary_residual=0, **plain).weights(motion)
    on = TemporalStabilizer(boundary_residual=24, **plain).weights(motion)
    assert (off[edge] == 0).all()
    assert (on[still] > 0).all() and (on[moved] == 0).all()
    np.testing.assert_array_equal(on[~edge], off[~edge])  # elsewhere nothing changes
    assert FlowEstimator(motion_boundaries=False)(a, b).boundary is None
    with pytest.raises(ValueError, match="boundary_residual"):
        TemporalStabilizer(boundary_residual=-1)


def test_residual_stops_blending_where_the_input_changed():
    a = texture()
    b = a.copy()
    b[20:50, 20:60] = np.clip(b[20:50, 20:60].astype(int) + 100, 0, 255)  # a patch lights up in place
    stab = TemporalStabilizer(strength=1.0, feather=0)
    motion = stab.analyze(a, b)
    weights = stab.weights(motion)
    assert motion.residual[25:45, 25:55].mean() > 60
    assert weights[25:45, 25:55].mean() < 0.2 and weights[70:, 80:].mean() > 0.9


def test_scene_cuts_are_detected():
    estimator = FlowEstimator()
    a = texture(seed=0)
    dark = (texture(seed=5) * 0.3).astype(np.uint8)
    assert estimator(a, dark).cut  # different histograms
    rng = np.random.default_rng(3)
    other = rng.permutation(a.reshape(-1, 3)).reshape(a.shape)  # same histogram, no correspondence
    assert estimator(a, other).cut
    assert not estimator(a, shifted(a, 2)).cut


def test_bad_frames_are_refused():
    estimator = FlowEstimator()
    with pytest.raises(ValueError, match="uint8"):
        estimator(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="differ in size"):
        estimator(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 20, 3), np.uint8))
    with pytest.raises(ValueError, match="preset"):
        FlowEstimator(preset="instant")
    with pytest.raises(ValueError, match="strength"):
        TemporalStabilizer(strength=1.5)


# -- stabilizer ---------------------------------------------------------------------------------
def test_stabilizer_blends_the_warped_previous_output():
    frames = panning(2)
    stab = TemporalStabilizer(strength=0.5, still_gain=1.0)  # the same weight everywhere
    first = np.full_like(frames[0], 100)
    assert stab(first, None) is first  # the first frame passes through
    motion = stab.analyze(frames[0], frames[1])
    out = stab(np.full_like(frames[1], 200), motion)
    inner = out[10:-10, 20:-20]
    assert np.abs(inner.astype(int) - 150).max() <= 2  # half of each where the flow is reliable
    assert (out[:, :1] == 200).all()  # the new strip on the left comes from the new frame only


def test_still_input_well_inside_the_reliable_region_is_blended_harder():
    frames = panning(2)
    b = frames[1].copy()
    b[40:56, 60:100] = np.clip(b[40:56, 60:100].astype(int) + 20, 0, 255)  # a patch brightens a little
    stab = TemporalStabilizer(strength=0.5)  # still_gain 1.8: 0.9 where the input is still
    assert stab.still_strength == pytest.approx(0.9)
    stab(np.full_like(frames[0], 100), None)
    motion = stab.analyze(frames[0], b)
    out = stab(np.full_like(b, 200), motion).astype(int)
    assert np.abs(out[20:34, 40:110] - 110).max() <= 3  # still and far from anything unreliable: 0.9
    assert np.abs(out[45:51, 72:88] - 150).max() <= 3  # the input changed there: strength 0.5
    assert out[20:-20, 4:8].mean() > 125  # next to the strip that entered: no boost within the margin
    assert (out[:, :1] == 200).all()
    with pytest.raises(ValueError, match="still_gain"):
        TemporalStabilizer(still_gain=0.5)


def test_stabilizer_works_at_the_flow_resolution_like_at_the_frames():
    """The weights are computed on the flow's downscaled fields and upscaled once: about the same
    output as with the fields upscaled first (the old way), and the same to the bit at scale 1."""
    a = texture(240, 320)
    b = shifted(a, 6, 2)
    b[100:140, 150:200] = 0  # a patch the flow cannot explain
    coarse = FlowEstimator(max_side=160)(a, b)
    assert coarse.upscaled and coarse.coarse[0].shape == (120, 160, 2) and coarse.size == (240, 320)
    assert coarse.reliable_share == pytest.approx(coarse.reliable.mean(), abs=0.02)
    fine = Motion(coarse.flow, coarse.reliable, residual=coarse.residual)  # the same fields, full size
    assert not fine.upscaled and fine.flow is coarse.flow
    styled = [np.full_like(a, 60), np.full_like(b, 200)]
    outs = []
    for motion in (coarse, fine):
        stab = TemporalStabilizer(strength=0.5)
        stab(styled[0], None)
        outs.append(stab(styled[1], motion).astype(int))
    assert np.abs(outs[0] - outs[1]).mean() < 1.5
    assert outs[0][110:130, 165:185].min() > 190  # the patch keeps the new frame in both
    assert np.abs(outs[0][26:40, 40:140] - 74).max() <= 4  # still and far from the patch: weight 0.9
    full = FlowEstimator(max_side=320)(a, b)
    assert not full.upscaled and full.coarse[0] is full.flow
    # where each pixel was: grid + flow, upscaled in one pass from the coarse positions
    ys, xs = np.mgrid[0:240, 0:320].astype(np.float32)
    expected = np.dstack([xs, ys]) + coarse.flow
    assert np.abs(coarse.positions() - expected)[1:-1, 1:-1].max() < 1e-3
    assert np.abs(coarse.positions() - expected).max() <= 0.5 + 1e-3  # (scale - 1) / 2 at the edges
    np.testing.assert_array_equal(full.positions(), np.dstack([xs, ys]) + full.flow)
    with pytest.raises(ValueError, match="cut"):
        Motion(None, None, cut=True).positions()


def test_strength_zero_and_cuts_pass_frames_through():
    frames = panning(3)
    off = TemporalStabilizer(strength=0.0)
    styled = [np.full_like(f, v) for f, v in zip(frames, (10, 120, 240))]
    assert off(styled[0], None) is styled[0]
    assert off(styled[1], off.analyze(frames[0], frames[1])) is styled[1]
    on = TemporalStabilizer(strength=0.9)
    on(styled[0], None)
    out = on(styled[1], Motion(None, None, cut=True))
    assert out is styled[1] and on.cuts == 1
    on.reset()
    assert on(styled[2], on.analyze(frames[1], frames[2])) is styled[2]  # nothing to blend after a reset


def test_stabilization_lowers_the_warping_error_of_a_flickery_stylizer():
    frames = panning(16)
    result = evaluate_stability(frames, flickery(), strength=0.6)
    assert result["frames"] == 16 and result["pairs"] == 15 and result["cuts"] == 0
    assert result["input"] < 0.002  # a clean pan: the flow explains the input
    assert result["stylized"] > 10 * result["input"]  # the flicker
    assert result["stabilized"] < 0.6 * result["stylized"]  # at least 40% less
    assert result["reduction"] == pytest.approx(1 - result["stabilized"] / result["stylized"])


def test_an_independent_metric_flow_still_sees_the_flicker_removed():
    """The measure can follow another flow than the stabilizer's (no reduction by construction)."""
    frames = panning(16)
    same = evaluate_stability(frames, flickery(), strength=0.6)
    other = evaluate_stability(frames, flickery(), strength=0.6, metric_flow=FlowEstimator(preset="farneback"))
    assert other["stylized"] != same["stylized"]  # measured along another flow
    assert other["input"] < 0.002 and other["stylized"] > 10 * other["input"]
    assert other["stabilized"] < 0.6 * other["stylized"]


def test_stronger_stabilization_removes_more_flicker():
    frames = panning(12)
    seen = []
    result = evaluate_stability(
        frames, flickery(seed=1), strength=(0.0, 0.3, 0.6, 0.9), on_output=lambda i, s, d: seen.append(sorted(d))
    )
    errors = [r["stabilized"] for r in result["sweep"]]
    assert errors == sorted(errors, reverse=True)
    assert errors[0] == pytest.approx(result["stylized"])  # strength 0 changes nothing
    assert result["stabilized"] == errors[0] and len(seen) == 12 and seen[0] == [0.0, 0.3, 0.6, 0.9]
    # one pass over several strengths gives what separate passes give (same model outputs)
    alone = evaluate_stability(frames, flickery(seed=1), strength=0.0)
    assert alone["stylized"] == pytest.approx(result["stylized"])


# -- the metric ---------------------------------------------------------------------------------
def test_warping_error_is_zero_for_perfect_motion_and_sees_flicker():
    frames = panning(6)
    assert warping_error(frames, frames) < 1e-3
    brighter = [np.clip(f.astype(int) + (40 if i % 2 else 0), 0, 255).astype(np.uint8) for i, f in enumerate(frames)]
    err = warping_error(frames, brighter)
    assert err == pytest.approx(3 * (40 / 255) ** 2, rel=0.2)  # (40/255)^2 per channel, 3 channels
    with pytest.raises(ValueError, match="at least 2 frames"):
        warping_error(frames[:1], frames[:1])


def test_warping_error_skips_cuts():
    meter = WarpingError()
    f = texture()
    meter.update(f, f, Motion(None, None, cut=True))
    assert meter.pairs == 0 and meter.skipped == 1 and np.isnan(meter.value)


# -- in the video pipeline ----------------------------------------------------------------------
def test_pipeline_stabilization_lowers_the_output_warping_error(tmp_path):
    src = make_clip(tmp_path / "pan.mp4", size=(128, 96), rate=25, seconds=1.2)
    errors = {}
    for strength in (0.0, 0.6):
        out = stylize_video(src, tmp_path / f"s{strength}.mp4", flickery(seed=2), height=None, stability=strength).path
        inputs, outputs = FrameReader(probe(src)), FrameReader(probe(out))
        errors[strength] = warping_error(list(inputs), list(outputs))
    assert errors[0.6] < 0.6 * errors[0.0], errors


def test_pipeline_resets_at_a_scene_cut(tmp_path):
    a = make_clip(tmp_path / "a.mp4", size=(96, 64), rate=10, seconds=1)
    b = make_clip(tmp_path / "b.mp4", size=(96, 64), rate=10, seconds=1, pattern="smptebars")
    (tmp_path / "list.txt").write_text(f"file '{a}'\nfile '{b}'\n")
    ffmpeg("-f", "concat", "-safe", "0", "-i", str(tmp_path / "list.txt"), "-c", "copy", str(tmp_path / "cut.mp4"))
    result = stylize_video(tmp_path / "cut.mp4", tmp_path / "out.mp4", lambda x: x, height=None, stability=0.8)
    assert result.frames == 20 and result.scene_cuts == 1


# -- evaluate video ------------------------------------------------------------------------------
def test_evaluate_video_command(tmp_path, capsys):
    from ghibli_core.cli import build_parser, main
    from ghibli_core.models import ResnetGenerator

    torch.manual_seed(0)
    ResnetGenerator(width=4, n_blocks=1).save_pretrained(tmp_path / "model")
    clip = make_clip(tmp_path / "clip.mp4", size=(96, 64), rate=10, seconds=1)
    out = tmp_path / "eval" / "video.json"
    code = main(["evaluate", "video", str(clip), "--model", str(tmp_path / "model"), "--height", "original",
                 "--stability", "0.3,0.8", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "warping error" in printed and "stabilized (0.3)" in printed and "stabilized (0.8)" in printed
    record = json.loads(out.read_text())
    assert record["frames"] == 10 and record["pairs"] + record["cuts"] == 9
    assert record["strength"] == 0.3 and [r["strength"] for r in record["sweep"]] == [0.3, 0.8]
    assert record["sweep"][1]["stabilized"] < record["sweep"][0]["stabilized"] < record["stylized"]
    assert record["input"] >= 0
    assert record["metric_flow"] == "farneback" and "independent flow (farneback)" in printed
    assert main(["evaluate", "video", str(clip), "--model", str(tmp_path / "model"), "--height", "original",
                 "--metric-flow", "same", "--json", str(out)]) == 0
    assert "the stabilizer's own flow" in capsys.readouterr().out
    assert json.loads(out.read_text())["metric_flow"] == "same"
    # the photo form still parses as before
    args = build_parser().parse_args(["evaluate", "--model", "m", "--photos", "p", "--frames", "f"])
    assert args.task is None and args.photos == Path("p")
    assert main(["evaluate", "--photos", "p"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["evaluate", "video"]) == 2
