"""Video in and out (ghibli_core.video) and the `video` command, on tiny clips made here with the
bundled ffmpeg: moving patterns, a sine-wave track, rotation metadata, odd sizes, variable
frame rate, and broken files; plus a short run over ../shared/data/video when it is present."""
from __future__ import annotations

import re
import subprocess
import sys
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from ghibli_core import video as V
from ghibli_core.video import FrameReader, VideoError, VideoLimits, probe, stylize_video

FFMPEG = V.ffmpeg_exe()
SHARED_VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "video"


# -- helpers ------------------------------------------------------------------------------------
def ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-hide_banner", "-nostdin", "-v", "error", "-y", *args], check=True, capture_output=True)


def make_clip(
    path: Path, *, size=(64, 48), rate=10, seconds=2.0, audio=False, pattern="testsrc2", extra_video: str = "",
    pix_fmt: str = "yuv420p",
) -> Path:
    """A moving test pattern (H.264), optionally with a 440 Hz sine track (AAC); odd sizes need
    ``pix_fmt="yuv444p"`` (libx264 would crop them to even for yuv420p)."""
    w, h = size
    args = ["-f", "lavfi", "-i", f"{pattern}=size={w}x{h}:rate={rate}:duration={seconds}{extra_video}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=16000:duration={seconds}"]
    args += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", pix_fmt]
    if audio:
        args += ["-c:a", "aac"]
    ffmpeg(*args, str(path))
    return path


def decode(path: Path, *, autorotate: bool = True) -> np.ndarray:
    """All frames of ``path`` as uint8 (N, H, W, 3), decoded by ffmpeg directly (not our reader)."""
    info = subprocess.run([FFMPEG, "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    w, h = map(int, re.search(r"Video: .*?, (\d+)x(\d+)", info).groups())
    rot = re.search(r"rotation of (-?\d+)", info)
    if autorotate and rot and int(float(rot.group(1))) % 180:
        w, h = h, w
    args = [FFMPEG, "-v", "error", "-nostdin"] + ([] if autorotate else ["-noautorotate"])
    raw = subprocess.run(args + ["-i", str(path), "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def decode_audio(path: Path, rate: int = 8000) -> np.ndarray:
    raw = subprocess.run(
        [FFMPEG, "-v", "error", "-nostdin", "-i", str(path), "-vn", "-ac", "1", "-ar", str(rate), "-f", "s16le", "-"],
        capture_output=True, check=True,
    ).stdout
    return np.frombuffer(raw, np.int16).astype(np.float32) / 32768


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / max(mse, 1e-12))


def ffmpeg_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name()]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Clips shared by the tests of this module (made once)."""
    root = tmp_path_factory.mktemp("clips")
    c = {}
    c["audio"] = make_clip(root / "audio.mp4", audio=True)
    c["silent"] = make_clip(root / "silent.mp4", size=(80, 60), rate=12, seconds=1.5)
    c["odd"] = make_clip(
        root / "odd.mp4", size=(66, 50), seconds=1, pix_fmt="yuv444p", extra_video=",format=yuv444p,scale=65:49,setsar=1"
    )
    # rotation metadata only (the pixels stay landscape), like a phone held upright
    ffmpeg("-display_rotation:v:0", "90", "-i", str(c["silent"]), "-c", "copy", str(root / "rotated.mp4"))
    c["rotated"] = root / "rotated.mp4"
    # variable frame rate: an irregular subset of a 30 fps pattern, timestamps kept
    ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=30:duration=2,select='not(mod(n\\,3))+eq(mod(n\\,7)\\,1)'",
        "-fps_mode", "vfr", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(root / "vfr.mp4"),
    )
    c["vfr"] = root / "vfr.mp4"
    # a flash on screen and a tone that both start at t = 1 s, to check audio alignment
    ffmpeg(
        "-f", "lavfi", "-i", "color=c=black:size=64x48:rate=10:duration=3,drawbox=x=0:y=0:w=64:h=48:color=white:t=fill:enable='gte(t,1)'",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000:duration=3,volume=volume=0:enable='lt(t,1)'",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", str(root / "flash.mp4"),
    )
    c["flash"] = root / "flash.mp4"
    return c


# -- probe --------------------------------------------------------------------------------------
def test_probe_reads_streams_rate_count_and_audio(clips):
    info = probe(clips["audio"])
    assert (info.width, info.height, info.rotation) == (64, 48, 0)
    assert info.fps == 10 and not info.variable_frame_rate
    assert info.frame_count == 20 and info.duration == pytest.approx(2.0)
    assert info.has_audio and info.audio_codec == "aac" and info.video_codec == "h264"
    silent = probe(clips["silent"])
    assert not silent.has_audio and silent.fps == 12 and silent.frame_count == 18


def test_probe_applies_rotation_metadata(clips):
    info = probe(clips["rotated"])
    assert info.rotation in (90, 270)
    assert (info.width, info.height) == (60, 80) and info.coded_size == (80, 60)


def test_probe_of_the_header_alone(clips):
    """count_frames=False: sizes, rotation, rate and duration from the header, no frame count."""
    for name in ("audio", "rotated"):
        full, head = probe(clips[name]), probe(clips[name], count_frames=False)
        assert (head.width, head.height, head.rotation, head.coded_size) == (full.width, full.height, full.rotation,
                                                                               full.coded_size)
        assert head.fps == full.fps and head.duration == pytest.approx(full.duration, abs=0.1)
        assert head.frame_count is None and head.has_audio == full.has_audio
        assert "frames" not in head.describe()
        # the pipeline needs the packets' figures: a header-only info is refused, not guessed from
        with pytest.raises(ValueError, match="header alone"):
            FrameReader(head)


def test_probe_detects_variable_frame_rate(clips):
    info = probe(clips["vfr"])
    assert info.variable_frame_rate
    frames = decode(clips["vfr"], autorotate=True).shape[0]
    assert info.frame_count == frames
    # the average rate over the clip: frames / (span of timestamps + one interval)
    assert float(info.fps) == pytest.approx(info.frame_count / info.duration, rel=0.05)
    assert 10 < float(info.fps) < 20


def test_ntsc_rates_stay_exact_also_in_millisecond_containers(tmp_path):
    # Matroska stores times in ms: 29.97 fps frames are 33 or 34 ms apart, which is not "variable"
    for name in ("ntsc.mp4", "ntsc.mkv"):
        src = make_clip(tmp_path / name, rate="30000/1001", seconds=1)
        info = probe(src)
        assert info.fps == Fraction(30000, 1001) and not info.variable_frame_rate, name
        assert info.frame_count == 30
    out = stylize_video(info, tmp_path / "ntsc_out.mp4", identity, height=None)
    assert probe(out.path).fps == Fraction(30000, 1001) and out.frames == 30


def test_probe_rejects_what_is_not_a_video(tmp_path):
    with pytest.raises(FileNotFoundError):
        probe(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty.mp4 is empty"):
        probe(tmp_path / "empty.mp4")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="noise.mp4 could not be opened as a video"):
        probe(tmp_path / "noise.mp4")
    ffmpeg("-f", "lavfi", "-i", "sine=duration=1", str(tmp_path / "song.m4a"))
    with pytest.raises(VideoError, match="song.m4a has no video stream"):
        probe(tmp_path / "song.m4a")
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "still.png")
    with pytest.raises(VideoError, match="still.png could not be opened"):
        probe(tmp_path / "still.png")


def test_playlists_cannot_make_ffmpeg_read_other_files(clips, tmp_path):
    # an uploaded HLS playlist or concat list naming a file on the server is refused at the door
    (tmp_path / "list.m3u8").write_text(f"#EXTM3U\n#EXTINF:2,\n{clips['audio']}\n#EXT-X-ENDLIST\n")
    (tmp_path / "list.txt").write_text(f"ffconcat version 1.0\nfile '{clips['audio']}'\n")
    for name in ("list.m3u8", "list.txt"):
        with pytest.raises(VideoError, match="could not be opened"):
            probe(tmp_path / name)


def test_truncated_and_undecodable_files(clips, tmp_path):
    data = clips["audio"].read_bytes()
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])  # moov atom at the end: lost
    with pytest.raises(VideoError, match="half.mp4"):
        probe(tmp_path / "half.mp4")
    # streams declared, every video packet zeroed: nothing decodes
    blob = bytearray(make_clip(tmp_path / "ok.mp4", seconds=1).read_bytes())
    i = blob.find(b"mdat")
    n = int.from_bytes(blob[i - 4:i], "big")
    blob[i + 4:i - 4 + n] = bytes(n - 8)
    (tmp_path / "zeroed.mp4").write_bytes(blob)
    out = tmp_path / "out" / "zeroed_ghibli.mp4"
    with pytest.raises(VideoError, match="zeroed.mp4"):
        stylize_video(tmp_path / "zeroed.mp4", out, identity, height=None)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    assert ffmpeg_children() == []


# -- sizes and caps -----------------------------------------------------------------------------
def test_output_size_is_even_short_side_never_upscaled(clips):
    info = probe(clips["odd"])
    assert (info.width, info.height) == (65, 49)
    assert V.output_size(info, None) == (64, 48)
    assert V.output_size(info, 480) == (64, 48)
    assert V.output_size(info, 24) == (32, 24)
    portrait = probe(clips["rotated"])  # 60x80 upright
    assert V.output_size(portrait, 30) == (30, 40)


def test_caps_refuse_before_any_decoding(clips, monkeypatch, tmp_path):
    def no_decoding(self):
        raise AssertionError("decoding started")

    monkeypatch.setattr(V.FrameReader, "__iter__", no_decoding)
    out = tmp_path / "o.mp4"
    with pytest.raises(VideoError, match="more than the limit of 1 s"):
        stylize_video(clips["audio"], out, identity, limits=VideoLimits(max_seconds=1))
    with pytest.raises(VideoError, match="pixels per frame"):
        stylize_video(clips["audio"], out, identity, limits=VideoLimits(max_pixels=1000))
    with pytest.raises(VideoError, match="frames"):
        stylize_video(clips["audio"], out, identity, limits=VideoLimits(max_frames=5))
    # trimming below the cap is allowed: the cap is on what gets processed
    V.check_limits(probe(clips["audio"]), VideoLimits(max_seconds=1), start=0.5, end=1.5)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_arguments_are_clear_errors(clips, tmp_path):
    src = clips["audio"]
    with pytest.raises(ValueError, match="stability"):
        stylize_video(src, tmp_path / "o.mp4", identity, stability=1.5)
    with pytest.raises(ValueError, match="must end in"):
        stylize_video(src, tmp_path / "o.avi", identity)
    with pytest.raises(ValueError, match="overwrite the input"):
        stylize_video(src, src, identity)
    with pytest.raises(ValueError, match="past the end"):
        stylize_video(src, tmp_path / "o.mp4", identity, start=5)
    with pytest.raises(ValueError, match="must be after start"):
        stylize_video(src, tmp_path / "o.mp4", identity, start=1, end=0.5)
    with pytest.raises(ValueError, match="past the end"):
        stylize_video(src, tmp_path / "o.mp4", identity, end=9)
    assert list(tmp_path.iterdir()) == []


# -- the pipeline -------------------------------------------------------------------------------
def test_identity_keeps_frames_rate_duration_and_audio(clips, tmp_path):
    out = tmp_path / "out.mp4"
    result = stylize_video(clips["audio"], out, identity, height=None, stability=0.0)
    info = probe(out)
    assert result.frames == info.frame_count == 20
    assert info.fps == 10 and info.duration == pytest.approx(2.0, abs=0.1)
    assert info.has_audio and result.has_audio
    assert (info.width, info.height) == (64, 48) and info.video_codec == "h264"
    assert psnr(decode(out), decode(clips["audio"])) > 30  # the identity model changes nothing visible
    assert len(decode_audio(out)) / 8000 == pytest.approx(2.0, abs=0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temporary file left
    assert ffmpeg_children() == []


def test_output_is_browser_ready(clips, tmp_path):
    out = tmp_path / "out.mp4"
    stylize_video(clips["audio"], out, identity, height=None)
    report = subprocess.run([FFMPEG, "-hide_banner", "-i", str(out)], capture_output=True, text=True).stderr
    assert "h264" in report and "yuv420p" in report and "aac" in report
    data = out.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")  # +faststart: playable while downloading


def test_no_audio_gives_a_silent_video(clips, tmp_path):
    out = tmp_path / "silent_out.mp4"
    result = stylize_video(clips["silent"], out, identity, height=None)
    info = probe(out)
    assert not result.has_audio and not info.has_audio
    assert info.frame_count == 18 and info.fps == 12


def test_rotated_clip_comes_out_upright(clips, tmp_path):
    out = tmp_path / "rot_out.mp4"
    stylize_video(clips["rotated"], out, identity, height=None, stability=0.0)
    info = probe(out)
    assert info.rotation == 0 and (info.width, info.height) == (60, 80)
    stored = decode(clips["rotated"], autorotate=False)  # (N, 60, 80, 3): the pixels as stored
    turned = np.rot90(stored, k=1, axes=(1, 2))  # 90° counter-clockwise, as the metadata says
    assert psnr(decode(out), turned) > 30
    assert psnr(decode(out), np.rot90(stored, k=-1, axes=(1, 2))) < 20  # and not the other way round


def test_odd_size_is_made_even(clips, tmp_path):
    out = tmp_path / "odd_out.mp4"
    result = stylize_video(clips["odd"], out, identity, height=None)
    assert result.size == (64, 48) and probe(out).coded_size == (64, 48)
    # cropped by one row and column, not resampled (luma compared: yuv420p halves the chroma)
    grey = lambda a: a.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])  # noqa: E731
    assert psnr(grey(decode(out)), grey(decode(clips["odd"])[:, :48, :64])) > 30


def test_non_square_pixels_are_made_square(tmp_path):
    src = make_clip(tmp_path / "anamorphic.mp4", size=(40, 48), extra_video=",setsar=2/1", seconds=1)
    info = probe(src)
    assert info.sample_aspect == 2 and (info.width, info.height) == (80, 48)
    result = stylize_video(info, tmp_path / "square.mp4", identity, height=None)
    out = probe(result.path)
    assert out.coded_size == (80, 48) and out.sample_aspect == 1


def test_variable_frame_rate_becomes_constant_with_the_same_duration(clips, tmp_path):
    src = probe(clips["vfr"])
    out = tmp_path / "vfr_out.mp4"
    result = stylize_video(src, out, identity, height=None)
    info = probe(out)
    assert not info.variable_frame_rate and info.fps == src.fps
    assert abs(info.duration - src.duration) <= 1 / float(src.fps) + 1e-6
    assert result.frames == info.frame_count


def test_trim_keeps_audio_aligned(clips, tmp_path):
    # the screen turns white and the tone starts at t = 1 s in the source
    for start, end, onset in ((0.0, None, 1.0), (0.5, 2.5, 0.5)):
        out = tmp_path / f"flash_{start}.mp4"
        result = stylize_video(clips["flash"], out, identity, height=None, start=start, end=end, stability=0.0)
        frames = decode(out)
        expected = 3.0 - start if end is None else end - start
        assert result.frames == round(expected * 10) == frames.shape[0]
        flash_t = int(np.argmax(frames.mean(axis=(1, 2, 3)) > 128)) / 10
        sound = np.abs(decode_audio(out))
        sound_t = int(np.argmax(sound > 0.5 * sound.max())) / 8000
        assert flash_t == pytest.approx(onset, abs=0.05)
        assert sound_t == pytest.approx(onset, abs=0.1)  # within one frame of the picture
        assert len(sound) / 8000 == pytest.approx(expected, abs=0.1)


def test_side_by_side_puts_the_original_left(clips, tmp_path):
    out = tmp_path / "sbs.mp4"

    def invert(x):
        return -x

    result = stylize_video(clips["silent"], out, invert, height=None, side_by_side=True, stability=0.0)
    assert result.size == (160, 60)
    frames, src = decode(out), decode(clips["silent"])
    assert psnr(frames[:, :, :80], src) > 30
    assert psnr(frames[:, :, 80:], 255 - src) > 25


def test_nn_module_and_on_frame_and_progress(clips, tmp_path):
    from ghibli_core.models import ResnetGenerator

    torch.manual_seed(0)
    net = ResnetGenerator(width=4, n_blocks=1)
    seen, reports = [], []
    result = stylize_video(
        clips["silent"], tmp_path / "net.mp4", net, height=None, batch_size=5,
        on_frame=lambda i, f: seen.append((i, f.shape)), progress=lambda d, t: reports.append((d, t)),
    )
    assert result.frames == 18
    assert [i for i, _ in seen] == list(range(18)) and all(s == (60, 80, 3) for _, s in seen)
    assert reports[-1] == (18, 18) and [d for d, _ in reports] == [5, 10, 15, 18]


@pytest.mark.parametrize("where", ["model", "progress", "interrupt"])
def test_failure_or_cancel_leaves_nothing_behind(clips, tmp_path, where):
    calls = {"n": 0}

    def model(x):
        calls["n"] += 1
        if where == "model" and calls["n"] == 2:
            raise RuntimeError("model exploded")
        return x

    def progress(done, total):
        if where == "progress" and done >= 4:
            raise RuntimeError("cancelled by the user")
        if where == "interrupt" and done >= 4:
            raise KeyboardInterrupt

    out = tmp_path / "never.mp4"
    error = KeyboardInterrupt if where == "interrupt" else RuntimeError
    with pytest.raises(error):
        stylize_video(clips["audio"], out, model, height=None, batch_size=2, progress=progress)
    assert list(tmp_path.iterdir()) == []
    assert ffmpeg_children() == []


def test_a_model_returning_the_wrong_shape_is_an_error(clips, tmp_path):
    with pytest.raises(ValueError, match="the model returned"):
        stylize_video(clips["silent"], tmp_path / "o.mp4", lambda x: x[:, :, ::2], height=None)
    assert list(tmp_path.iterdir()) == []


def test_memory_is_flat_in_clip_length(tmp_path):
    warm = make_clip(tmp_path / "warm.mp4", size=(160, 120), rate=25, seconds=1)
    short = make_clip(tmp_path / "short.mp4", size=(160, 120), rate=25, seconds=2)
    long = make_clip(tmp_path / "long.mp4", size=(160, 120), rate=25, seconds=12)
    stylize_video(warm, tmp_path / "warm_out.mp4", identity, height=None, batch_size=4)  # one-time allocations
    peaks = {}
    for src in (short, long, short):  # the short clip twice: its peak alone varies by ~2.5 MB
        out = tmp_path / f"{src.stem}_out.mp4"
        tracemalloc.start()
        try:
            result = stylize_video(src, out, identity, height=None, batch_size=4)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        peaks[src.stem] = max(peaks.get(src.stem, 0), peak)
        out.unlink()
        assert result.frames in (50, 300)
    frame = 160 * 120 * 3
    # 6x the frames (250 more), about the same peak: only the queues' few frames are alive at
    # once. Peaks jitter with thread timing (measured 3.3-5.8 MB for either clip, i.e. up to
    # ~45 frames apart), so the margin is 100 frames (5.8 MB); keeping even one frame per frame
    # would add 250 frames (14.4 MB) and fail.
    assert peaks["long"] < peaks["short"] + 100 * frame, peaks


# -- the command --------------------------------------------------------------------------------
def test_video_command_end_to_end(clips, tmp_path, capsys):
    from ghibli_core.cli import main
    from ghibli_core.models import ResnetGenerator

    torch.manual_seed(0)
    ResnetGenerator(width=4, n_blocks=1).save_pretrained(tmp_path / "model")
    out, frames_dir = tmp_path / "clip_ghibli.mp4", tmp_path / "frames"
    args = ["video", str(clips["audio"]), "-o", str(out), "--model", str(tmp_path / "model"), "--height", "original",
            "--stability", "0.3", "--start", "0.5", "--end", "0:01.5", "--frames-dir", str(frames_dir)]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    info = probe(out)
    assert info.frame_count == 10 and info.has_audio
    assert sorted(p.name for p in frames_dir.iterdir()) == [f"frame_{i:06d}.png" for i in range(1, 11)]
    assert main(args) == 2  # exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--max-seconds", "0.5"]) == 2
    assert "limit" in capsys.readouterr().err


def test_video_command_parses_times_and_heights():
    from ghibli_core.cli import build_parser

    args = build_parser().parse_args(["video", "in.mp4", "-o", "o.mp4", "--height", "720p", "--start", "1:02.5"])
    assert args.height == 720 and args.start == 62.5 and args.stability == 0.5 and args.end is None
    assert build_parser().parse_args(["video", "in.mp4", "-o", "o.mp4", "--height", "original"]).height is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["video", "in.mp4", "-o", "o.mp4", "--stability", "2"])


# -- real clips ---------------------------------------------------------------------------------
@pytest.mark.skipif(not SHARED_VIDEO.is_dir(), reason="../shared/data/video is not present")
@pytest.mark.parametrize(
    "name, audio, vfr, rotation",
    [("chaplin.mp4", True, False, 0), ("example.mp4", False, False, 0), ("fire2.mp4", True, True, 180)],
)
def test_shared_clips(tmp_path, name, audio, vfr, rotation):
    src = SHARED_VIDEO / name
    if not src.is_file():
        pytest.skip(f"{src} is missing")
    info = probe(src)
    assert info.has_audio == audio and info.variable_frame_rate == vfr and info.rotation == rotation
    out = tmp_path / "out.mp4"
    end = min(info.duration, 1.0)
    result = stylize_video(info, out, identity, height=180, end=end)
    got = probe(out)
    assert got.has_audio == audio and got.fps == info.fps and got.rotation == 0
    assert abs(got.duration - end) <= 1 / float(info.fps) + 1e-6
    assert result.size == V.output_size(info, 180) == got.coded_size and min(result.size) == 180
    if rotation:
        # upright as ffmpeg shows it: the stored pixels turned by the display matrix
        from PIL import Image

        def small(a):
            return np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((320, 180), Image.Resampling.BOX))

        first = decode(out)[0]
        stored = decode(src, autorotate=False)[0]
        assert psnr(first, small(np.rot90(stored, 2))) > psnr(first, small(stored)) + 3


def test_auto_batch_size_keeps_about_a_megapixel_per_call():
    from ghibli_core.video import auto_batch_size

    assert auto_batch_size((854, 480)) == 2
    assert auto_batch_size((640, 360)) == 4
    assert auto_batch_size((1280, 720)) == 1 and auto_batch_size((3840, 2160)) == 1
    assert auto_batch_size((64, 48)) == 8  # capped


def test_frames_go_to_tensors_and_back_as_imaging_does():
    from ghibli_core.imaging import to_tensor, to_uint8

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (30, 44, 3), dtype=np.uint8) for _ in range(3)]
    x = V.frames_to_tensor(frames)
    assert x.shape == (3, 3, 30, 44) and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, to_tensor(np.stack(frames)), rtol=0, atol=2e-7)
    with pytest.raises(ValueError, match="expected uint8 frames of shape"):
        V.frames_to_tensor([frames[0], frames[1][:, :40]])
    # values every half level apart (rounding ties), beyond [-1, 1] (clamping), in the layouts a
    # network returns: channels-last, a crop of a padded channels-last batch, contiguous
    y = torch.linspace(-1.2, 1.2, 2 * 3 * 32 * 48).reshape(2, 3, 32, 48)
    y = y[torch.randperm(2)].contiguous(memory_format=torch.channels_last)
    for t in (y, y[:, :, :30, :45], y[:, :, 1:, 3:], y.contiguous()):
        np.testing.assert_array_equal(V.tensor_to_frames(t), to_uint8(t))
    y[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        V.tensor_to_frames(y)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_instead_of_faulted_in_afresh():
    """40 MB blocks are above glibc's largest adaptive mmap threshold (32 MB): by default each
    one is mapped afresh and faults its pages in again (2661 faults over 5 rounds here, huge pages
    helping); after reuse_freed_memory() they come from the heap and the later rounds fault
    hardly at all (1 here)."""
    code = (
        "import resource, sys, numpy as np\n"
        "from ghibli_core.video import reuse_freed_memory\n"
        "if sys.argv[1] == 'on': assert reuse_freed_memory()\n"
        "np.ones(10 << 20, np.float32)\n"  # the first round may fault either way
        "f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5): np.ones(10 << 20, np.float32).sum()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n"
    )
    faults = {
        mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True,
                                 cwd=Path(__file__).resolve().parents[1]).stdout.split()[-1])
        for mode in ("off", "on")
    }
    # (how many faults a fresh mapping costs depends on huge pages; the reuse shows either way)
    assert faults["off"] > 50
    assert faults["on"] < 50 and 20 * faults["on"] < faults["off"]
