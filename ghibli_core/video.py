"""Video in and out through the bundled ffmpeg, and the streaming stylization pipeline.

There is no system ffmpeg here (nor on a Hugging Face Space by default): everything goes through
the binary that ``imageio-ffmpeg`` ships, as a subprocess with raw ``rgb24`` frames on its pipes.

* :func:`probe` reads a file's streams, size, rotation, frame rate (constant or variable), frame
  count, duration and audio without decoding a frame: ffmpeg's header report plus one pass over
  the video packets (``-c copy -f framecrc``, no decoding). Inputs are untrusted: only known
  container formats are opened (no playlists or concat lists that could name other files).
* :func:`check_limits` refuses a clip over the caps (duration, pixels, frames) before any work.
* :class:`FrameReader` streams decoded frames, upright (rotation applied), at the processing
  size (even width and height, square pixels), as uint8 ``(H, W, 3)`` RGB arrays.
  Variable-frame-rate input is resampled to a constant rate at its average frame rate (frames
  repeated or dropped where the spacing differs), so that the output keeps the duration and
  the audio stays aligned.
* :class:`VideoWriter` encodes frames to H.264 (yuv420p, BT.709 tags, ``+faststart``) and muxes
  the source's audio (copied when it is AAC and untouched, else encoded to AAC), into a
  temporary file renamed to the target only when complete.
* :func:`stylize_video`: probe -> decode -> stylize in batches -> stabilize -> encode, with
  bounded queues (memory flat in clip length) and every process and temporary file cleaned up
  also when it fails or is cancelled (a ``progress`` callback that raises cancels the job).

Frames cross the module boundary as uint8 ``(H, W, 3)`` RGB numpy arrays; models see
``(N, 3, H, W)`` float32 in ``[-1, 1]`` (converted by :mod:`ghibli_core.imaging`).
"""
from __future__ import annotations

import collections
import math
import os
import queue
import re
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Union

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "RESOLUTIONS",
    "FrameReader",
    "VideoError",
    "VideoInfo",
    "VideoLimits",
    "VideoResult",
    "VideoWriter",
    "as_frame_model",
    "check_limits",
    "expected_frames",
    "ffmpeg_exe",
    "output_size",
    "probe",
    "reuse_freed_memory",
    "stylize_video",
]

PathLike = Union[str, os.PathLike]

# Processing resolutions offered by the app and the CLI: the shorter side in pixels (so a
# portrait phone clip at "480p" is 480 wide, like a landscape one is 480 high); None = original.
RESOLUTIONS: dict[str, int | None] = {"360p": 360, "480p": 480, "720p": 720, "original": None}

# Demuxers ffmpeg may use on an input. Formats that open other files or URLs (hls, concat, dash,
# image sequences, ...) are excluded: an uploaded playlist must not make ffmpeg read the server's
# files. Audio-only formats are allowed so that such a file gets a clear "no video stream" error.
_DEMUXERS = (
    "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,flv,gif,ogg,asf,m4v,h264,hevc,"
    "mxf,nut,ivf,dv,yuv4mpegpipe,wav,mp3,aac,flac"
)
_OUTPUT_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov"}
_PROBE_TIMEOUT_S = 300.0


class VideoError(ValueError):
    """A video that cannot be processed (missing, unreadable, no video stream, over a cap); the
    message names the file."""


def ffmpeg_exe() -> str:
    """Path of the bundled ffmpeg binary."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


# -- probing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` found in a video file.

    Attributes:
        path: the file.
        container: ffmpeg's name of the container format (``"mov,mp4,m4a,3gp,3g2,mj2"``, ...).
        video_codec: codec of the video stream used (the first that is not cover art).
        video_index: that stream's index in the file.
        coded_size: ``(width, height)`` as stored.
        width, height: the upright display size in square pixels (rotation and sample aspect
            ratio applied); frames are decoded this way up.
        rotation: the display rotation in degrees (0, 90, 180 or 270, counter-clockwise as
            ffmpeg's display matrix states it); decoding applies it.
        sample_aspect: the stored pixel aspect ratio (1 for square pixels).
        fps: the frame rate; the average rate when ``variable_frame_rate``.
        variable_frame_rate: the frame spacing is irregular (decoding resamples to ``fps``).
        frame_count: decodable video frames in the stream.
        duration: seconds of video (``frame_count / fps`` for a constant rate).
        video_start: seconds from the file's start to the first video frame.
        audio_codec: codec of the first audio stream, or None when there is none.
        audio_index: that stream's index in the file.
        audio_start: seconds from the file's start to the first audio sample.

    From ``probe(path, count_frames=False)`` (the header alone): ``frame_count`` is None,
    ``fps`` and ``duration`` are what the header states (None when it does not),
    ``variable_frame_rate`` is False and the start times are 0; enough to size and sample a
    film, not for the video pipeline.
    """

    path: Path
    container: str
    video_codec: str
    video_index: int
    coded_size: tuple[int, int]
    width: int
    height: int
    rotation: int
    sample_aspect: Fraction
    fps: Fraction | None
    variable_frame_rate: bool
    frame_count: int | None
    duration: float | None
    video_start: float = 0.0
    audio_codec: str | None = None
    audio_index: int | None = None
    audio_start: float | None = None

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` upright."""
        return self.width, self.height

    def describe(self) -> str:
        """One line for logs and the app: size, rate, duration, audio."""
        rate = "unknown frame rate" if self.fps is None else f"{float(self.fps):.3g} fps"
        rate += " (variable)" if self.variable_frame_rate else ""
        rot = f", rotated {self.rotation}°" if self.rotation else ""
        audio = f", {self.audio_codec} audio" if self.has_audio else ", no audio"
        count = "" if self.frame_count is None else f", {self.frame_count} frames"
        length = "unknown duration" if self.duration is None else f"{self.duration:.2f} s"
        return f"{self.width}x{self.height}{rot}, {rate}{count}, {length}{audio}"


_STREAM_RE = re.compile(
    r"^\s*Stream #0:(\d+)(?:\[[^\]]*\])?(?:\([^)]*\))?: (Video|Audio|Subtitle|Data|Attachment): (\S+)(.*)$"
)
_INPUT_RE = re.compile(r"^Input #0, (.+), from ")
_DURATION_RE = re.compile(r"^\s*Duration: (N/A|(\d+):(\d+):(\d+(?:\.\d+)?))(?:, start: (-?\d+(?:\.\d+)?))?")
_SIZE_RE = re.compile(r", (\d+)x(\d+)\b")
_SAR_RE = re.compile(r"SAR (\d+):(\d+)")
_FPS_RE = re.compile(r", (\d+(?:\.\d+)?)(k?) (fps|tbr)\b")
_MATRIX_RE = re.compile(r"Display Matrix: rotation of (-?\d+(?:\.\d+)?) degrees")
_ROTATE_TAG_RE = re.compile(r"^\s*rotate\s*:\s*(-?\d+)")


@dataclass
class _Stream:
    index: int
    kind: str
    codec: str
    rest: str
    extra: list[str] = field(default_factory=list)


def _header(path: Path) -> tuple[str, float | None, float, list[_Stream]]:
    """``(container, duration or None, start, streams)`` from ``ffmpeg -i``'s report."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-format_whitelist", _DEMUXERS, "-i", str(path)]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise VideoError(f"{path.name}: reading the file's header took over a minute; is it a video?") from None
    text = proc.stderr.decode("utf-8", "replace")
    container = None
    duration: float | None = None
    start = 0.0
    streams: list[_Stream] = []
    for line in text.splitlines():
        if container is None and (m := _INPUT_RE.match(line)):
            container = m.group(1)
        elif (m := _DURATION_RE.match(line)) and container is not None:
            if m.group(2) is not None:
                duration = int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))
            if m.group(5) is not None:
                start = float(m.group(5))
        elif m := _STREAM_RE.match(line):
            streams.append(_Stream(int(m.group(1)), m.group(2), m.group(3).rstrip(","), m.group(4)))
        elif streams and line.startswith("    "):
            streams[-1].extra.append(line)
    if container is None:
        reason = _last_error(text) or "not a video file"
        raise VideoError(
            f"{path.name} could not be opened as a video ({reason}); supported containers include "
            f"MP4/MOV, MKV/WebM, AVI, MPEG-TS, FLV, GIF and OGG"
        )
    return container, duration, start, streams


def _last_error(text: str) -> str:
    """The most telling line of an ffmpeg error report, without the file path."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    skip = ("At least one output file", "Error opening input file", "Error opening input files")
    useful = [ln for ln in lines if not ln.startswith(skip)]
    line = useful[-1] if useful else (lines[-1] if lines else "")
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)
    return line.replace("Error opening input: ", "")


def _packets(path: Path, video: int, audio: int | None) -> tuple[Fraction, list[int], list[int], Fraction | None]:
    """``(video time base, sorted video pts, their packet durations, seconds of the first audio
    packet or None)`` by remuxing packets to ffmpeg's ``framecrc`` listing (no decoding)."""
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-format_whitelist", _DEMUXERS,
        "-i", str(path), "-map", f"0:{video}",
    ]
    if audio is not None:
        cmd += ["-map", f"0:{audio}"]
    cmd += ["-c", "copy", "-f", "framecrc", "-"]
    tbs: dict[int, Fraction] = {}
    pts: list[int] = []
    durations: list[int] = []
    audio_first: int | None = None
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    errors = _Drain(proc.stderr)
    timer = threading.Timer(_PROBE_TIMEOUT_S, proc.kill)
    timer.start()
    try:
        for raw in proc.stdout:
            line = raw.decode("ascii", "replace")
            if line.startswith("#tb "):
                key, value = line[4:].split(":", 1)
                num, den = value.strip().split("/")
                tbs[int(key)] = Fraction(int(num), int(den))
                continue
            if line.startswith("#"):
                continue
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 6:
                continue
            stream, dts, p, dur = int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3])
            flags = next((int(x[2:], 16) for x in parts[6:] if x.startswith("F=")), 1)
            if p == -(2**63):  # no pts: fall back to the decode timestamp
                p = dts
            if stream == 0:
                if flags & 0x4:  # AV_PKT_FLAG_DISCARD: decoded for reference only, never shown
                    continue
                pts.append(p)
                durations.append(dur)
            elif stream == 1 and (audio_first is None or p < audio_first):
                audio_first = p
        proc.wait()
    finally:
        timer.cancel()
        _finish_process(proc)
        errors.join()
    if proc.returncode != 0 and not pts:
        reason = errors.last() or f"ffmpeg exited with code {proc.returncode}"
        raise VideoError(f"{path.name} could not be read: {reason}")
    tb = tbs.get(0, Fraction(1, 90000))
    order = sorted(range(len(pts)), key=pts.__getitem__)
    pts = [pts[i] for i in order]
    durations = [durations[i] for i in order]
    audio_seconds = audio_first * tbs[1] if audio_first is not None and 1 in tbs else None
    return tb, pts, durations, audio_seconds


def _snap_rate(rate: Fraction, tolerance: float = 1e-4) -> Fraction:
    """A measured frame rate snapped to the nearest usual exact value (an integer, or NTSC's
    k * 1000/1001 such as 30000/1001) when within ``tolerance`` (relative), else a fraction
    with a denominator of at most 1001."""
    if rate <= 0:
        return rate
    candidates = [Fraction(round(rate)), Fraction(round(rate * Fraction(1001, 1000)) * 1000, 1001)]
    best = min((c for c in candidates if c > 0), key=lambda c: abs(rate - c), default=None)
    if best is not None and abs(rate - best) <= tolerance * best:
        return best
    # below 1/1001 fps (a frame every 17 minutes) the nearest such fraction is 0: keep the rate
    return rate.limit_denominator(1001) or rate


def _header_rate(rest: str) -> Fraction | None:
    rates = {}
    for value, kilo, kind in _FPS_RE.findall(rest):
        rates[kind] = Fraction(value) * (1000 if kilo else 1)
    rate = rates.get("fps") or rates.get("tbr")
    return _snap_rate(rate) if rate else None


def probe(path: PathLike, *, count_frames: bool = True) -> VideoInfo:
    """Inspect a video file without decoding it.

    ``count_frames=False`` reads the header alone (see :class:`VideoInfo`): instant however
    long the film, where the default also reads every packet's timestamp (exact frame count,
    frame rate and start times; a second or two for a feature film).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        VideoError: not a file, empty, not a readable video, no video stream, or no frames.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise VideoError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path.name} is empty (0 bytes)")
    # 1. the header: container, streams, size, rotation
    container, header_duration, file_start, streams = _header(path)
    videos = [s for s in streams if s.kind == "Video" and "(attached pic)" not in s.rest]
    audios = [s for s in streams if s.kind == "Audio"]
    if not videos:
        what = "only audio" if audios else "no video stream"
        raise VideoError(f"{path.name} has no video stream ({what}); upload a video clip")
    v = videos[0]
    size = _SIZE_RE.search(v.rest)
    if not size or int(size.group(1)) < 1 or int(size.group(2)) < 1:
        raise VideoError(f"{path.name}: the video stream has no frame size ({v.codec}); the file may be corrupt")
    coded = (int(size.group(1)), int(size.group(2)))
    sar_match = _SAR_RE.search(v.rest)
    sar = Fraction(1)
    if sar_match and int(sar_match.group(1)) > 0 and int(sar_match.group(2)) > 0:
        sar = Fraction(int(sar_match.group(1)), int(sar_match.group(2)))
    rotation = 0
    for line in v.extra:
        if (m := _MATRIX_RE.search(line)) or (m := _ROTATE_TAG_RE.match(line)):
            rotation = round(float(m.group(1))) % 360
            rotation = 90 * round(rotation / 90) % 360
    # display size: stretch by the sample aspect ratio, then turn
    w, h = coded
    if sar != 1:
        w = max(1, round(w * sar))
    if rotation in (90, 270):
        w, h = h, w
    audio = audios[0] if audios else None
    if not count_frames:
        return VideoInfo(
            path=path, container=container, video_codec=v.codec, video_index=v.index, coded_size=coded,
            width=w, height=h, rotation=rotation, sample_aspect=sar, fps=_header_rate(v.rest),
            variable_frame_rate=False, frame_count=None, duration=header_duration,
            audio_codec=audio.codec if audio else None, audio_index=audio.index if audio else None,
            audio_start=0.0 if audio else None,
        )

    # 2. the packets: frame count, exact or average frame rate, start times
    tb, pts, durations, audio_first = _packets(path, v.index, audio.index if audio else None)
    n = len(pts)
    if n == 0:
        raise VideoError(f"{path.name} has a video stream with no frames")
    header_rate = _header_rate(v.rest)
    deltas = np.diff(np.asarray(pts, dtype=np.int64))
    variable = False
    if n >= 3:
        median = float(np.median(deltas))
        tolerance = max(1.0, 0.02 * median)
        variable = bool(median <= 0 or np.any(np.abs(deltas - median) > tolerance))
    if n >= 2 and pts[-1] > pts[0]:
        # the span is known to a tick at each end (containers like Matroska count milliseconds)
        span = pts[-1] - pts[0]
        fps = _snap_rate(Fraction(n - 1) / (span * tb), tolerance=max(1e-4, 1.5 / span))
    elif durations and durations[0] > 0:
        fps = _snap_rate(1 / (durations[0] * tb))
    else:
        fps = header_rate or Fraction(25)
    if not variable:
        duration = float(n / fps)
    else:
        last = durations[-1] if durations[-1] > 0 else float(np.mean(deltas))
        duration = float((pts[-1] - pts[0] + last) * tb)
    if header_duration is not None and duration > header_duration + 1.0:
        duration = header_duration  # packet timestamps from a broken muxer; the header is saner
    video_start = float(pts[0] * tb) - file_start
    audio_start = float(audio_first) - file_start if audio_first is not None else (0.0 if audio else None)
    return VideoInfo(
        path=path,
        container=container,
        video_codec=v.codec,
        video_index=v.index,
        coded_size=coded,
        width=w,
        height=h,
        rotation=rotation,
        sample_aspect=sar,
        fps=fps,
        variable_frame_rate=variable,
        frame_count=n,
        duration=duration,
        video_start=max(0.0, video_start),
        audio_codec=audio.codec if audio else None,
        audio_index=audio.index if audio else None,
        audio_start=None if audio_start is None else max(0.0, audio_start),
    )


# -- caps and sizes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoLimits:
    """Caps checked before any decoding (see :func:`check_limits`).

    Args:
        max_seconds: longest segment to process (after trimming), in seconds.
        max_pixels: largest input frame (width x height, as decoded); bounds decoding cost.
        max_frames: most output frames (guards against very high frame rates).
    """

    max_seconds: float = 600.0
    max_pixels: int = 7680 * 4320
    max_frames: int = 60 * 600

    def __post_init__(self) -> None:
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be positive, got {self.max_frames}")


def _segment(info: VideoInfo, start: float, end: float | None) -> tuple[float, float]:
    """Validated ``(start, end)`` seconds of the part to process."""
    name = info.path.name
    if info.frame_count is None:
        raise ValueError(f"{name}: this information comes from the header alone (probe(..., count_frames=False)); "
                         f"processing a video needs probe(path)")
    if not (math.isfinite(start) and start >= 0):
        raise ValueError(f"start must be a time in seconds >= 0, got {start}")
    if start >= info.duration:
        raise ValueError(f"start {start:g} s is past the end of {name} ({info.duration:.2f} s long)")
    if end is None:
        return start, info.duration
    if not math.isfinite(end):
        raise ValueError(f"end must be a time in seconds, got {end}")
    if end <= start:
        raise ValueError(f"end ({end:g} s) must be after start ({start:g} s)")
    if end > info.duration + 0.5 / float(info.fps):
        raise ValueError(f"end {end:g} s is past the end of {name} ({info.duration:.2f} s long)")
    return start, min(end, info.duration)


def expected_frames(info: VideoInfo, start: float = 0.0, end: float | None = None) -> int:
    """About how many frames decoding ``[start, end)`` gives (exact for an untrimmed constant-rate clip)."""
    start, end = _segment(info, start, end)
    if start == 0 and end == info.duration and not info.variable_frame_rate:
        return info.frame_count
    return max(1, round((end - start) * info.fps))


def check_limits(info: VideoInfo, limits: VideoLimits, *, start: float = 0.0, end: float | None = None) -> None:
    """Refuse a clip, or the trimmed part of it, that is over ``limits`` (raises :class:`VideoError`)."""
    name = info.path.name
    pixels = info.coded_size[0] * info.coded_size[1]
    if pixels > limits.max_pixels:
        w, h = info.coded_size
        raise VideoError(
            f"{name} is {w}x{h} = {pixels:,} pixels per frame, more than the limit of {limits.max_pixels:,}; "
            f"downscale it first"
        )
    start, end = _segment(info, start, end)
    seconds = end - start
    if seconds > limits.max_seconds + 1e-6:
        raise VideoError(
            f"{name}: {seconds:.1f} s to process, more than the limit of {limits.max_seconds:g} s; "
            f"trim it (start/end) to at most {limits.max_seconds:g} s"
        )
    frames = expected_frames(info, start, end)
    if frames > limits.max_frames:
        raise VideoError(
            f"{name}: about {frames} frames to process ({float(info.fps):.3g} fps), more than the limit of "
            f"{limits.max_frames}; trim it"
        )


def output_size(info: VideoInfo, height: int | None) -> tuple[int, int]:
    """``(width, height)`` to process ``info`` at: the shorter side ``height`` (never upscaled;
    None keeps the original), the aspect ratio kept, both even (H.264 in yuv420p needs it)."""
    w, h = info.width, info.height
    if height is not None:
        if height < 2:
            raise ValueError(f"height must be at least 2 pixels, got {height}")
        short = min(w, h)
        if height < short:
            scale = height / short
            w, h = w * scale, h * scale
    w, h = max(2, int(round(w)) // 2 * 2), max(2, int(round(h)) // 2 * 2)
    return w, h


# -- processes --------------------------------------------------------------------------------
class _Drain(threading.Thread):
    """Reads a process's stderr to the end (a full pipe would block ffmpeg), keeping the last lines."""

    def __init__(self, stream, keep: int = 40):
        super().__init__(daemon=True)
        self._stream = stream
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.start()

    def run(self) -> None:
        try:
            for raw in self._stream:
                line = raw.decode("utf-8", "replace").strip()
                if line:
                    self.lines.append(line)
        except (OSError, ValueError):
            pass

    def last(self) -> str:
        return _last_error("\n".join(self.lines))


def _finish_process(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if it still runs, reap it, close its pipes (always safe to call)."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - a killed process that does not die
        pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


class FrameReader:
    """Decoded frames of a video as uint8 ``(H, W, 3)`` RGB arrays, streamed from ffmpeg.

    Frames come upright (the rotation is applied), with square pixels, at ``size`` (default: the
    display size rounded down to even numbers), at ``info.fps``; a variable-frame-rate stream is
    resampled to that constant rate. Use it as a context manager or call :meth:`close`: the
    ffmpeg process is killed and reaped when done or abandoned.

    Args:
        info: the probed video.
        size: ``(width, height)`` to decode at (see :func:`output_size`).
        start, end: the part to decode, in seconds from the first video frame.
    """

    def __init__(
        self, info: VideoInfo, *, size: tuple[int, int] | None = None, start: float = 0.0, end: float | None = None
    ):
        self.info = info
        self.size = size or output_size(info, None)
        w, h = self.size
        if w < 1 or h < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        self.start, self.end = _segment(info, start, end)
        self.frames_read = 0
        self._proc: subprocess.Popen | None = None
        self._errors: _Drain | None = None

    def command(self) -> list[str]:
        info = self.info
        w, h = self.size
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-format_whitelist", _DEMUXERS]
        seek = info.video_start + self.start
        if seek > 0:
            cmd += ["-ss", f"{seek:.6f}"]
        cmd += ["-i", str(info.path)]
        if self.end < info.duration:
            cmd += ["-t", f"{self.end - self.start:.6f}"]
        filters = []
        if info.variable_frame_rate:
            filters.append(f"fps=fps={info.fps.numerator}/{info.fps.denominator}:round=near")
        if info.sample_aspect != 1:
            filters.append("scale=trunc(iw*sar/2)*2:ih,setsar=1")
        # crop the odd last row/column instead of resampling when the size is only rounded down
        filters.append("crop=trunc(iw/2)*2:trunc(ih/2)*2:0:0")
        filters.append(f"scale={w}:{h}:flags=area")
        filters.append("format=rgb24")
        cmd += [
            "-map", f"0:{info.video_index}", "-an", "-sn", "-dn",
            "-vf", ",".join(filters), "-fps_mode", "passthrough",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1",
        ]
        return cmd

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._proc is not None:
            raise RuntimeError("a FrameReader can be iterated once")
        w, h = self.size
        frame_bytes = w * h * 3
        self._proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
        )
        self._errors = _Drain(self._proc.stderr)
        try:
            while True:
                buf = bytearray(frame_bytes)
                view = memoryview(buf)
                got = 0
                while got < frame_bytes:
                    n = self._proc.stdout.readinto(view[got:])
                    if not n:
                        break
                    got += n
                if got < frame_bytes:
                    break
                self.frames_read += 1
                yield np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3)
            self._proc.wait()
            self._errors.join(timeout=5)
            if self._proc.returncode != 0:
                raise VideoError(
                    f"ffmpeg failed decoding {self.info.path.name} after {self.frames_read} frame(s): "
                    f"{self._errors.last() or f'exit code {self._proc.returncode}'}"
                )
            if self.frames_read == 0:
                raise VideoError(f"{self.info.path.name}: no frame could be decoded (the video data may be corrupt)")
        finally:
            self.close()

    def close(self) -> None:
        if self._proc is not None:
            _finish_process(self._proc)
        if self._errors is not None:
            self._errors.join(timeout=5)

    def __enter__(self) -> "FrameReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _audio_plan(info: VideoInfo, start: float, end: float) -> tuple[list[str], list[str]] | None:
    """``(input args, output args)`` that mux ``info``'s audio for the video segment
    ``[start, end)`` (seconds from its first frame), or None when it has no audio."""
    if not info.has_audio:
        return None
    # output time 0 is the first video frame of the segment; -ss on an input counts from the
    # file's start, where the video may begin later than the audio
    offset = info.video_start + start
    inputs = ["-format_whitelist", _DEMUXERS]
    if offset > 0:
        inputs += ["-ss", f"{offset:.6f}"]
    inputs += ["-t", f"{end - start:.6f}", "-i", str(info.path)]
    audio_begins_late = (info.audio_start or 0.0) > info.video_start + 1e-3
    if info.audio_codec == "aac" and offset == 0 and not audio_begins_late:
        codec = ["-c:a", "copy"]
    else:
        # re-encoding cuts at the exact sample and pads a late-starting track with silence
        codec = ["-c:a", "aac", "-b:a", "160k", "-af", "aresample=async=1:first_pts=0"]
    return inputs, ["-map", f"1:{info.audio_index}", *codec]


class VideoWriter:
    """Encode uint8 ``(H, W, 3)`` RGB frames to an H.264 MP4, with optional audio from a source.

    Written to a temporary file beside ``path`` and renamed to it by :meth:`close` once ffmpeg has
    finished; :meth:`abort` (or leaving the ``with`` block with an exception) kills ffmpeg and
    removes the temporary file, so ``path`` is never a partial video.

    Args:
        path: the output (``.mp4``, ``.m4v`` or ``.mov``).
        size: ``(width, height)``, both even.
        fps: frame rate (a ``Fraction`` keeps NTSC rates exact).
        audio_from: a probed video whose audio to mux, or None for a silent output.
        audio_start, audio_end: the part of ``audio_from`` (seconds from its first video frame)
            matching the frames written; default the whole video.
        crf: x264 constant rate factor (lower = better, bigger; 18 is visually lossless).
        preset: x264 speed preset.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        size: tuple[int, int],
        fps: Fraction | float,
        audio_from: VideoInfo | None = None,
        audio_start: float = 0.0,
        audio_end: float | None = None,
        crf: int = 20,
        preset: str = "veryfast",
    ):
        self.path = Path(path)
        fmt = _OUTPUT_FORMATS.get(self.path.suffix.lower())
        if fmt is None:
            raise ValueError(f"cannot write {self.path}: the output must end in {', '.join(_OUTPUT_FORMATS)}")
        w, h = size
        if w < 2 or h < 2 or w % 2 or h % 2:
            raise ValueError(f"the frame size must be even and at least 2x2 for H.264 yuv420p, got {w}x{h}")
        fps = Fraction(fps).limit_denominator(1_000_000)
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be between 0 and 51, got {crf}")
        self.size, self.fps = (w, h), fps
        self.frames_written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{self.path.suffix}")
        cmd = [
            ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", f"{fps.numerator}/{fps.denominator}",
            "-i", "pipe:0",
        ]
        audio = None
        if audio_from is not None:
            start, end = _segment(audio_from, audio_start, audio_end)
            audio = _audio_plan(audio_from, start, end)
        if audio is not None:
            cmd += audio[0]
        cmd += [
            "-map", "0:v",
            "-vf", "scale=out_color_matrix=bt709:out_range=tv:flags=bicubic+accurate_rnd+full_chroma_int,"
                   "format=yuv420p",
            "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
            "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709", "-color_range", "tv",
        ]
        if audio is not None:
            cmd += audio[1]
        cmd += ["-movflags", "+faststart", "-f", fmt, str(self.tmp)]
        self.has_audio = audio is not None
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._errors = _Drain(self._proc.stderr)
        self._done = False

    def write(self, frame: np.ndarray) -> None:
        """Append one uint8 ``(H, W, 3)`` RGB frame of the writer's size."""
        w, h = self.size
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape != (h, w, 3):
            got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"expected a uint8 frame of shape {(h, w, 3)}, got {got}")
        if self._done:
            raise RuntimeError("the writer is closed")
        try:
            self._proc.stdin.write(memoryview(np.ascontiguousarray(frame)).cast("B"))
        except (BrokenPipeError, OSError):
            self._proc.wait()
            self._errors.join(timeout=5)
            reason = self._errors.last() or "broken pipe"
            raise RuntimeError(f"ffmpeg stopped encoding {self.path.name}: {reason}") from None
        self.frames_written += 1

    def close(self) -> Path:
        """Finish the file and move it to ``path``; returns ``path``."""
        if self._done:
            return self.path
        try:
            if self.frames_written == 0:
                raise VideoError(f"no frames were written to {self.path.name}")
            try:
                self._proc.stdin.close()
            except OSError:
                pass
            rc = self._proc.wait()
            self._errors.join(timeout=5)
            if rc != 0:
                reason = self._errors.last() or f"exit code {rc}"
                raise RuntimeError(f"ffmpeg failed writing {self.path.name}: {reason}")
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and delete the partial file (safe to call more than once)."""
        self._done = True
        _finish_process(self._proc)
        self._errors.join(timeout=5)
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# -- the pipeline -----------------------------------------------------------------------------
FrameModel = Callable[["torch.Tensor"], "torch.Tensor"]  # (N, 3, H, W) in [-1, 1] -> the same


@dataclass
class VideoResult:
    """What :func:`stylize_video` did.

    ``timings`` holds seconds per stage: ``model`` (the network), ``convert`` (uint8 frames to
    tensors and back), ``flow`` (optical flow of the input frames), ``stabilize`` (warp and
    blend), ``encode`` (handing frames to ffmpeg, and finishing the file), ``wait`` (waiting for
    decoded frames), all in the calling thread; ``decode`` (the reader thread, overlapping the
    rest); ``total`` (wall time of the whole job).
    """

    path: Path
    info: VideoInfo
    frames: int
    size: tuple[int, int]
    fps: Fraction
    has_audio: bool
    scene_cuts: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return float(self.frames / self.fps)

    @property
    def overhead_share(self) -> float:
        """Share of the wall time not spent in the model (decode, flow, conversions, stabilize,
        encode, waits)."""
        total = self.timings.get("total", 0.0)
        return 1.0 - self.timings.get("model", 0.0) / total if total > 0 else float("nan")


def as_frame_model(
    model, size: tuple[int, int], *, device: str = "cpu", precision: str = "auto", batch_size: int = 4
) -> FrameModel:
    """A batch function ``(N, 3, H, W) -> (N, 3, H, W)`` in [-1, 1] for frames of ``size``.

    ``model`` is a :class:`~ghibli_core.stylize.Stylizer` (used as it is), an image-to-image
    ``nn.Module`` (wrapped in a Stylizer whose single tile covers the whole frame), or any
    callable on such tensors (run under ``torch.inference_mode``).
    """
    import torch
    from torch import nn

    from .stylize import Stylizer

    if isinstance(model, Stylizer):
        return model.stylize_tensor
    if isinstance(model, nn.Module):
        stride = int(getattr(model, "stride", 1))
        # one tile covering the whole frame: tiling exists for huge photos, frames are not
        tile = max(16, -(-max(size) // stride) * stride)
        return Stylizer(
            model, device=device, precision=precision, tile_size=tile, tile_overlap=0, batch_size=batch_size
        ).stylize_tensor
    if callable(model):
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(x)

        return run
    raise TypeError(
        f"model must be a Stylizer, an nn.Module or a callable on (N, 3, H, W) tensors, got {type(model).__name__}"
    )


class _Prefetch(threading.Thread):
    """Decodes frames ahead of the model, into a bounded queue.

    Only the decoding overlaps the model (ffmpeg does the work in its own process). The optical
    flow used to run here too, but on 2 cores a thread computing flow beside the network's 2
    threads slows every call of the network more than the flow costs when it runs between the
    calls (benchmarks/bench_video.py: 17.2 s against 16.6 s for 250 frames at 480p).
    """

    _END = object()

    def __init__(self, reader: FrameReader, depth: int):
        super().__init__(daemon=True)
        self.reader = reader
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.decode_s = 0.0
        self.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            frames = iter(self.reader)
            while not self.stop.is_set():
                t0 = time.perf_counter()
                frame = next(frames, None)
                self.decode_s += time.perf_counter() - t0
                if frame is None:
                    break
                if not self._put(frame):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc
        finally:
            self.reader.close()
            self._put(self._END)

    def get(self):
        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                if not self.is_alive() and self.queue.empty():
                    raise RuntimeError("the decoder thread stopped unexpectedly") from self.error
                continue
            if item is self._END:
                if self.error is not None:
                    raise self.error
                return None
            return item

    def shutdown(self) -> None:
        self.stop.set()
        self.reader.close()  # unblocks a read in progress
        self.join(timeout=30)


def frames_to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` frames of one size -> ``(N, 3, H, W)`` float32 in ``[-1, 1]`` in
    channels-last memory: :func:`~ghibli_core.imaging.to_tensor` on their stack, written
    straight from each frame in one OpenCV pass (a third of the time of stacking and torch's
    passes at 480p)."""
    import cv2
    import torch

    h, w = frames[0].shape[:2]
    out = np.empty((len(frames), h, w * 3), np.float32)
    for i, frame in enumerate(frames):
        if frame.shape != (h, w, 3) or frame.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames of shape {(h, w, 3)}, got {frame.dtype} {frame.shape}")
        # x / 127.5 - 1
        cv2.addWeighted(frame.reshape(h, w * 3), 1 / 127.5, frame.reshape(h, w * 3), 0.0, -1.0, dst=out[i],
                        dtype=cv2.CV_32F)
    return torch.from_numpy(out.reshape(len(frames), h, w, 3)).permute(0, 3, 1, 2)


def tensor_to_frames(y: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` in ``[-1, 1]`` -> uint8 ``(N, H, W, 3)`` as
    :func:`~ghibli_core.imaging.to_uint8` (rounded half to even, clamped; NaN or infinite
    values refused), in one OpenCV pass when the tensor is a float32 CPU tensor in
    channels-last memory (the video networks' output)."""
    import cv2
    import torch

    from .imaging import to_uint8

    if not (isinstance(y, torch.Tensor) and y.ndim == 4 and y.shape[1] == 3 and y.dtype == torch.float32
            and y.device.type == "cpu"):
        return to_uint8(y)
    n, _, h, w = y.shape
    sn, sh, sw, sc = y.permute(0, 2, 3, 1).stride()
    # rows of pixels in channels-last memory, evenly spaced (a crop of a padded batch is too)
    if not (sc == 1 and sw == 3 and sn == h * sh) or n * h * w == 0:
        return to_uint8(y)
    y = y.detach()
    # a finite sum proves every value finite (as in to_uint8)
    if not bool(torch.isfinite(y.sum())) and not bool(torch.isfinite(y).all()):
        raise ValueError("the image tensor contains NaN or infinite values")
    rows = np.lib.stride_tricks.as_strided(y.permute(0, 2, 3, 1).numpy(), (n * h, w * 3), (sh * 4, 4))
    # saturate_cast: (y + 1) * 127.5 rounded half to even, clamped to 0..255
    return cv2.addWeighted(rows, 127.5, rows, 0.0, 127.5, dtype=cv2.CV_8U).reshape(n, h, w, 3)


def reuse_freed_memory(*, mmap_mb: int = 64, trim_mb: int = 256) -> bool:
    """Have glibc keep freed memory for the next frame instead of handing it back to the OS.

    A video job allocates and frees the same few dozen multi-MB arrays every frame (tensors,
    flows, masks). With glibc's defaults, the optical flow's arrays between the network's calls
    make it trim the heap and map big blocks afresh over and over: every new 4 KB page then costs
    a page fault and zeroing, 660k-1.35M faults (about a second) on a 6 s 480p clip, and the
    network's own calls run up to a quarter slower. Fixed thresholds (blocks under ``mmap_mb``
    from the heap, the heap trimmed only past ``trim_mb`` free) bring that to a few faults and
    the clip from 8.4-8.7 s to 7.6-7.9 s, for the same peak memory (freed memory is kept, up to
    the peak, until the process ends). Both must be set: either alone turns off glibc's
    adaptive thresholds and is worse than the defaults. Process-wide, for the rest of the
    process; the CLI's ``video`` command, the app and benchmarks/bench_video.py call it. True
    when in place; a no-op off glibc.
    """
    # -1 is M_TRIM_THRESHOLD, -3 is M_MMAP_THRESHOLD
    return mallopt(-1, trim_mb << 20) and mallopt(-3, mmap_mb << 20)


def mallopt(option: int, value: int) -> bool:
    """glibc's ``mallopt(option, value)`` for this process; True when it took, False off glibc
    or when refused."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(option, value))
    except (OSError, AttributeError):
        return False


# Frames per model call when the caller leaves it to us: about this many pixels per batch.
# Measured on the 2-core CPU with the fast video network at 854x480: 2 frames per call ran
# at 26.5 fps, 4 at 15.8 and 8 at 10.7 (bigger batches' activations no longer fit the caches).
BATCH_PIXELS = 1_000_000


def auto_batch_size(size: tuple[int, int]) -> int:
    """Frames per model call for frames of ``size`` ``(width, height)``: 1 to 8, ~1 MP a batch."""
    return max(1, min(8, BATCH_PIXELS // max(1, size[0] * size[1])))


def stylize_video(
    source: PathLike | VideoInfo,
    target: PathLike,
    model,
    *,
    height: int | None = 480,
    stability: float = 0.5,
    start: float = 0.0,
    end: float | None = None,
    side_by_side: bool = False,
    batch_size: int | None = None,
    device: str = "cpu",
    precision: str = "auto",
    limits: VideoLimits | None = None,
    stabilizer=None,
    crf: int = 20,
    preset: str = "veryfast",
    on_frame: Callable[[int, np.ndarray], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VideoResult:
    """Stylize a video clip into an H.264 MP4 with the source's audio, frame rate and duration.

    Args:
        source: the input file, or what :func:`probe` returned for it.
        target: the output ``.mp4`` (written under a temporary name, renamed when complete).
        model: a :class:`~ghibli_core.stylize.Stylizer`, an image-to-image ``nn.Module`` (run
            through a Stylizer with ``device``/``precision``), or any callable mapping
            ``(N, 3, H, W)`` float32 in ``[-1, 1]`` to the same shape and range.
        height: processing resolution as the shorter side in pixels (never upscaled), or None
            for the original size; the output has this size.
        stability: temporal stabilization strength in ``[0, 1]``: 0 = frames stylized
            independently, 1 = the motion-compensated previous output wherever the optical flow
            is reliable (see :class:`~ghibli_core.temporal.TemporalStabilizer`).
        start, end: the part to process, in seconds (end None = to the end).
        side_by_side: output ``original | stylized`` frames, twice as wide.
        batch_size: frames per model call; None picks :func:`auto_batch_size` (2 at 480p).
        limits: caps checked before decoding (default :class:`VideoLimits`).
        stabilizer: a configured :class:`~ghibli_core.temporal.TemporalStabilizer` (its
            strength wins over ``stability``); default one built from ``stability``.
        crf, preset: x264 quality and speed.
        on_frame: called as ``on_frame(index, frame)`` with every output frame (uint8 HWC), e.g.
            to also keep the frames as images.
        progress: called as ``progress(frames_done, frames_expected)`` after each batch; an
            exception raised in it cancels the job (after cleaning up) and propagates.

    Raises:
        FileNotFoundError, VideoError: bad input, or over ``limits`` (before any decoding).
        ValueError: bad arguments.
    """
    import torch

    from .temporal import TemporalStabilizer

    t_start = time.perf_counter()
    # 1. look before decoding: probe, check the caps and the arguments
    info = source if isinstance(source, VideoInfo) else probe(source)
    target = Path(target)
    if target.suffix.lower() not in _OUTPUT_FORMATS:
        raise ValueError(f"cannot write {target}: the output must end in {', '.join(_OUTPUT_FORMATS)}")
    if target.resolve() == info.path.resolve():
        raise ValueError(f"the output {target} would overwrite the input; choose another name")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if stabilizer is None:
        if not 0.0 <= stability <= 1.0:
            raise ValueError(f"stability must be between 0 and 1, got {stability}")
        stabilizer = TemporalStabilizer(strength=stability)
    check_limits(info, limits or VideoLimits(), start=start, end=end)
    start, end = _segment(info, start, end)
    size = output_size(info, height)
    batch_size = batch_size or auto_batch_size(size)
    total = expected_frames(info, start, end)
    run_model = as_frame_model(model, size, device=device, precision=precision, batch_size=batch_size)
    stabilize = stabilizer.strength > 0
    out_size = (2 * size[0], size[1]) if side_by_side else size

    timings: collections.Counter = collections.Counter()
    writer = VideoWriter(
        target, size=out_size, fps=info.fps, audio_from=info, audio_start=start, audio_end=end, crf=crf, preset=preset
    )
    prefetch: _Prefetch | None = None
    done = 0
    try:
        prefetch = _Prefetch(FrameReader(info, size=size, start=start, end=end), depth=2 * batch_size)
        # 2. batches of decoded frames -> model -> flow, stabilize -> encoder
        finished = False
        if stabilize:
            stabilizer.flow.restart()
        while not finished:
            t0 = time.perf_counter()
            batch = []
            while len(batch) < batch_size:
                item = prefetch.get()
                if item is None:
                    finished = True
                    break
                batch.append(item)
            timings["wait"] += time.perf_counter() - t0
            if not batch:
                break
            t0 = time.perf_counter()
            x = frames_to_tensor(batch)  # (N, 3, H, W) in [-1, 1], NHWC memory
            t1 = time.perf_counter()
            y = run_model(x)
            t2 = time.perf_counter()
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape):
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"the model returned {got} for a batch of shape {tuple(x.shape)}")
            styled = tensor_to_frames(y)  # (N, H, W, 3) uint8
            timings["model"] += t2 - t1
            timings["convert"] += (t1 - t0) + (time.perf_counter() - t2)
            for frame, out in zip(batch, styled):
                t0 = time.perf_counter()
                if stabilize:
                    motion = stabilizer.follow(frame)
                    timings["flow"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    out = stabilizer(out, motion)
                if side_by_side:
                    out = np.concatenate([frame, out], axis=1)
                t1 = time.perf_counter()
                writer.write(out)
                t2 = time.perf_counter()
                if on_frame is not None:
                    on_frame(done, out)
                timings["stabilize"] += t1 - t0
                timings["encode"] += t2 - t1
                done += 1
            if progress is not None:
                progress(done, max(total, done))
        # 3. finish the file (ffmpeg writes the index, moves it to the front) and rename it
        t0 = time.perf_counter()
        prefetch.join(timeout=30)
        writer.close()
        timings["encode"] += time.perf_counter() - t0
    except BaseException:
        if prefetch is not None:
            prefetch.shutdown()
        writer.abort()
        raise
    finally:
        if prefetch is not None:
            prefetch.shutdown()
    timings["decode"] = prefetch.decode_s
    timings["total"] = time.perf_counter() - t_start
    return VideoResult(
        path=target,
        info=info,
        frames=done,
        size=out_size,
        fps=info.fps,
        has_audio=writer.has_audio,
        scene_cuts=getattr(stabilizer, "cuts", 0),
        timings=dict(timings),
    )
