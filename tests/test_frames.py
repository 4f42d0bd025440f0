"""Film frames and photo clean-up (ghibli_core.data.frames, ``prepare frames`` / ``prepare images``).

The films are made here: numpy pictures piped into the bundled ffmpeg (x264, with B-frames).
Timeline of :func:`make_film` at 24 fps, sampled at 2 fps (sample k at k/2 s; scene changes
fall half-way between samples, so which picture each sample shows is unambiguous):

    t (s)      0 .. 1.5    2 .. 3.5   4.0  4.5   5 .. 5.5  6 .. 7.5    8 .. 8.5  9 .. 9.5  10 .. 10.5
    picture    A warm      B cool     B fading   black     C warm pan  D cool    flat grey A again
    expected   keep 0.0    keep 2.0   dropped    dropped   keep all 4  keep 8.0  dropped   dropped
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ghibli_core.cli import main
from ghibli_core.data.frames import (
    Crop,
    FrameExtractor,
    HashIndex,
    ImageCleaner,
    VideoError,
    detect_bars,
    dhash,
    ffmpeg_exe,
    hamming,
    phash,
    probe_video,
)
from ghibli_core.data.manifest import Manifest

W, H, FPS, BAR = 320, 240, 24, 32
KEPT = [0.0, 2.0, 6.0, 6.5, 7.0, 7.5, 8.0]
WARM, COOL = {0.0, 6.0, 6.5, 7.0, 7.5}, {2.0, 8.0}


def texture(seed: int, w: int, h: int, warm: bool) -> np.ndarray:
    """Smooth random blobs, orange-red (warm) or blue (cool): uint8 (h, w, 3)."""
    rng = np.random.default_rng(seed)
    small = rng.random((6, max(2, w * 6 // h))).astype(np.float32)
    lum = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    lum = 0.2 + 0.7 * (lum - lum.min()) / (lum.max() - lum.min())
    hue = (20 + 25 * lum) if warm else (200 + 25 * lum)
    hls = np.stack([hue, lum, np.full_like(lum, 0.8)], -1).astype(np.float32)
    return (cv2.cvtColor(hls, cv2.COLOR_HLS2RGB) * 255).round().astype(np.uint8)


def make_film(path: Path, *, bars: str | None = "letterbox", seconds: float = 10.75) -> Path:
    pw, ph = (W, H - 2 * BAR) if bars == "letterbox" else (W - 2 * BAR, H) if bars == "pillarbox" else (W, H)
    A, B, D = texture(1, pw, ph, True), texture(2, pw, ph, False), texture(4, pw, ph, False)
    C = texture(3, pw + 4 * 90, ph, True)

    def picture(t: float) -> np.ndarray:
        slot = 2 * t
        if slot < 3.5:
            return A
        if slot < 7.5:
            return B
        if slot < 9.5:
            return (B * max(0.0, 1 - (t - 3.75))).astype(np.uint8)
        if slot < 11.5:
            return np.zeros_like(A)
        if slot < 15.5:
            k = int(round(slot)) - 12
            return C[:, k * 90 : k * 90 + pw]
        if slot < 17.5:
            return D
        if slot < 19.5:
            return np.full_like(A, 128)
        return A

    proc = subprocess.Popen(
        [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{W}x{H}",
         "-r", str(FPS), "-i", "pipe:0", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18",
         "-pix_fmt", "yuv420p", str(path)],
        stdin=subprocess.PIPE,
    )
    try:
        for i in range(int(round(seconds * FPS))):
            frame = np.zeros((H, W, 3), np.uint8)
            y0, x0 = (H - ph) // 2, (W - pw) // 2
            frame[y0 : y0 + ph, x0 : x0 + pw] = picture(i / FPS)
            proc.stdin.write(frame.tobytes())
    finally:
        proc.stdin.close()
        proc.wait()
    assert proc.returncode == 0
    return path


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("films")
    return {
        "letterbox": make_film(d / "letterbox.mp4", bars="letterbox"),
        "pillarbox": make_film(d / "pillar box.mp4", bars="pillarbox", seconds=4.0),
    }


def _ffmpeg_children() -> list[str]:
    me = str(os.getpid())
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split()
            if fields[3] == me and "ffmpeg" in (stat.parent / "cmdline").read_text():
                found.append(stat.parent.name)
        except OSError:
            continue
    return found


# -- probing and bars ---------------------------------------------------------------------------
def test_probe_video(films):
    info = probe_video(films["letterbox"])
    assert (info.width, info.height, info.fps, info.video_codec) == (W, H, 24, "h264")
    assert info.frame_count is None  # the header alone
    assert info.duration == pytest.approx(10.75, abs=0.05)


def test_probe_rejects_what_is_not_a_video(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 20)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    audio = tmp_path / "audio.m4a"
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "0.5",
                    "-c:a", "aac", str(audio)], check=True)
    for path, words in ((text, "could not be opened as a video"), (empty, "empty"), (audio, "no video stream"), (tmp_path / "gone.mp4", "no such")):
        with pytest.raises(VideoError, match=words) as err:
            probe_video(path)
        assert path.name in str(err.value)


@pytest.mark.parametrize("kind", ["letterbox", "pillarbox"])
def test_bars_found_and_cropped(films, kind):
    ex = FrameExtractor(size=None)
    info = probe_video(films[kind])
    crop = ex.find_bars(info)
    # the picture is the frame minus 32 px bars; the crop may shave up to 4 px of picture edge
    if kind == "letterbox":
        assert crop.x == 0 and crop.w == W
        assert BAR <= crop.y <= BAR + 4 and H - 2 * BAR - 8 <= crop.h <= H - 2 * BAR
    else:
        assert crop.y == 0 and crop.h == H
        assert BAR <= crop.x <= BAR + 4 and W - 2 * BAR - 8 <= crop.w <= W - 2 * BAR
    kept = [kf for s in ex.extract(info, crop=crop) for kf in s.kept]
    assert kept and all(kf.image.shape == (crop.h, crop.w, 3) for kf in kept)
    for kf in kept:  # no bar left: every edge line of every kept frame is picture, not black
        grey = kf.image.mean(axis=2)
        assert min(grey[0].mean(), grey[-1].mean(), grey[:, 0].mean(), grey[:, -1].mean()) > 30


def test_detect_bars_ignores_dark_scenes_and_subtitles():
    rng = np.random.default_rng(0)

    def frame(brightness=1.0):
        f = np.zeros((100, 200), np.uint8)
        f[20:80] = (rng.integers(60, 250, (60, 200)) * brightness).astype(np.uint8)
        return f

    samples = [frame() for _ in range(6)] + [frame(0.05)]  # a near-black scene is not evidence
    subtitled = frame()
    subtitled[85:92, 50:150] = 255  # subtitles in the bottom bar of one frame
    samples.append(subtitled)
    assert detect_bars(samples, margin=0) == Crop(0, 20, 200, 60)
    assert detect_bars(samples) == Crop(0, 22, 200, 56)  # 2 px margin off each bar edge
    # a film that is mostly dark is not "bars": the whole frame is kept
    tiny = np.zeros((100, 200), np.uint8)
    tiny[45:55, 90:110] = 200
    assert detect_bars([tiny] * 4) == Crop(0, 0, 200, 100)


# -- which frames are kept -----------------------------------------------------------------------
@pytest.mark.parametrize("exact", [False, True])
def test_exact_frames_kept(films, exact):
    ex = FrameExtractor(size=64, exact=exact)
    info = probe_video(films["letterbox"])
    settled = list(ex.extract(info))
    kept = [kf for s in settled for kf in s.kept]
    assert [kf.timestamp for kf in kept] == KEPT
    dropped = sum((s.dropped for s in settled), start=__import__("collections").Counter())
    # 22 samples: 7 kept; 2 black (5.0, 5.5) + the faded 4.5; 2 blank (9.0, 9.5); the rest of
    # the static shots (0.5-1.5, 2.5-3.5, 8.5), the dimmed 4.0 and the repeat of A (10.0, 10.5)
    assert sum(s.samples for s in settled) == 22
    assert dropped["blank"] == 2
    assert dropped["black"] + dropped["fade"] + dropped["duplicate"] == 13
    assert dropped["black"] >= 2 and dropped["duplicate"] >= 9
    for kf in kept:
        assert kf.image.shape == (64, 64, 3)
        r, _, b = kf.image.reshape(-1, 3).mean(0)
        assert (r > b + 60) if kf.timestamp in WARM else (b > r + 60), kf.timestamp


def test_workers_and_chunks_do_not_change_the_result(films):
    info = probe_video(films["letterbox"])
    one = FrameExtractor(size=48, workers=1)
    crop = one.find_bars(info)
    chunked = FrameExtractor(size=48, workers=2, spool_mb=0)  # 8-sample chunks: 3 ffmpeg runs
    a = [(kf.timestamp, kf.hash) for s in one.extract(info, crop=crop) for kf in s.kept]
    b = [(kf.timestamp, kf.hash) for s in chunked.extract(info, crop=crop) for kf in s.kept]
    assert [t for t, _ in a] == KEPT
    assert [t for t, _ in b] == KEPT
    assert all(hamming(x, y) <= 4 for (_, x), (_, y) in zip(a, b))
    # start/end: a window of the film, on the same sample grid
    win = [kf.timestamp for s in one.extract(info, crop=crop, start=5.9, end=7.1) for kf in s.kept]
    assert win == [6.0, 6.5, 7.0]
    assert not _ffmpeg_children()


def test_chunks_wait_on_disk_and_leave_nothing_behind(films, tmp_path, monkeypatch):
    """Chunks decoded ahead go to a temporary folder; stopping early kills ffmpeg and removes it."""
    import tempfile

    spool_root = tmp_path / "spool"
    spool_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_root))
    info = probe_video(films["letterbox"])
    ex = FrameExtractor(size=48, workers=2, spool_mb=0)
    crop = ex.find_bars(info)
    whole = [t for t, _ in ex.samples(info, crop)]
    assert whole == [k / 2 for k in range(22)]
    assert list(spool_root.iterdir()) == []
    seen = []
    gen = ex.samples(info, crop)
    for t, frame in gen:
        seen.append(t)
        if len(seen) == 3:
            # the first chunk is read while it grows; the next ones are spooled beside it
            spooled = [p for d in spool_root.iterdir() for p in d.iterdir() if p.suffix == ".rgb"]
            assert 2 <= len(spooled) <= 3
            break
    gen.close()
    assert seen == [0.0, 0.5, 1.0]
    assert list(spool_root.iterdir()) == []
    assert not _ffmpeg_children()


def test_dup_threshold_none_keeps_every_usable_sample(films):
    info = probe_video(films["letterbox"])
    kept = [kf.timestamp for s in FrameExtractor(size=32, dup_threshold=None).extract(info) for kf in s.kept]
    assert len(kept) == 22 - 2 - 2 - 1  # all but black (5.0, 5.5, faded 4.5) and blank (9.0, 9.5)


def _series(*frames):
    return [(i * 0.5, f) for i, f in enumerate(frames)]


def test_curate_keeps_the_clearest_sample_of_a_fade_in():
    pic = texture(7, 96, 96, True)
    dim = lambda k: (pic * k).astype(np.uint8)  # noqa: E731
    other = texture(8, 96, 96, False)
    ex = FrameExtractor()
    settled = list(ex.curate(_series(dim(0.02), dim(0.3), dim(0.6), pic, pic, other)))
    kept = [kf.timestamp for s in settled for kf in s.kept]
    assert kept == [1.5, 2.5]  # the full-brightness sample of the fade-in, then the next shot
    # the black sample is settled at once; the shot when the next one starts
    assert [(s.until, s.samples) for s in settled] == [(0.5, 1), (2.5, 4), (float("inf"), 1)]
    assert settled[0].dropped["black"] == 1 and settled[1].dropped["fade"] >= 1
    # a repeat of an earlier shot is dropped even after other shots
    index = HashIndex([phash(other)])
    again = [kf for s in ex.curate(_series(other, pic), index=index) for kf in s.kept]
    assert [kf.timestamp for kf in again] == [0.5]


def test_hashes_survive_fades_and_rescaling_not_other_pictures():
    a, b = texture(11, 200, 120, True), texture(12, 200, 120, True)
    for fn in (phash, dhash):
        assert hamming(fn(a), fn((a * 0.5).astype(np.uint8))) <= 3
        assert hamming(fn(a), fn(cv2.resize(a, (123, 77), interpolation=cv2.INTER_AREA))) <= 4
        assert hamming(fn(a), fn(b)) > 12
    idx = HashIndex()
    assert idx.distance(phash(a)) == 65
    for i in range(300):  # grows past its first block
        idx.add(phash(texture(100 + i, 64, 64, bool(i % 2))))
    idx.add(phash(a))
    assert idx.distance(phash(a)) == 0 and len(idx) == 301


# -- prepare frames (CLI) ------------------------------------------------------------------------
def _names(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))


def test_cli_frames_reports_bad_inputs_and_processes_the_rest(films, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(os.urandom(3000))
    empty_dir = tmp_path / "no_videos"
    empty_dir.mkdir()
    # a readable container whose frames are all gone: the stream is there, no frame decodes
    zeroed = tmp_path / "zeroed.mp4"
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=s=160x120:r=10", "-t", "2",
                    "-c:v", "libx264", "-movflags", "+faststart", str(zeroed)], check=True)
    data = bytearray(zeroed.read_bytes())
    mdat = data.find(b"mdat") + 4
    data[mdat:] = bytes(len(data) - mdat)
    zeroed.write_bytes(bytes(data))
    out = tmp_path / "out"
    rc = main(["prepare", "frames", str(films["letterbox"]), str(bad), str(zeroed), str(empty_dir), "--out", str(out),
               "--size", "64", "--tag", "studio=test", "--tag", "medium=2d"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.mp4" in err and "no_videos holds no videos" in err
    assert "zeroed.mp4: no frames could be decoded" in err
    assert _names(out) == [f"letterbox/letterbox_t{t:010.3f}.jpg" for t in KEPT]
    records = list(Manifest.load(out))
    assert [r["timestamp"] for r in records] == KEPT
    r = records[0]
    assert r["source"] == "letterbox.mp4" and r["tags"] == {"studio": "test", "medium": "2d"}
    assert (r["width"], r["height"]) == (64, 64) and len(r["phash"]) == 16
    assert not list(out.rglob("*.tmp"))
    card = (out / "README.md").read_text()
    assert "letterbox.mp4" in card and "broken.mp4" in card and "studio=test" in card
    assert not _ffmpeg_children()
    # a file name with spaces and brackets becomes a safe folder name
    assert main(["prepare", "frames", str(films["pillarbox"]), "--out", str(out), "--size", "64"]) == 0
    assert any(n.startswith("pillar_box/pillar_box_t000000.000") for n in _names(out))


def test_cli_frames_interrupt_and_resume(films, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    assert main(["prepare", "frames", str(films["letterbox"]), "--out", str(clean), "--size", "64"]) == 0

    original = FrameExtractor.curate

    def interrupted(self, samples, **kw):
        for i, settled in enumerate(original(self, samples, **kw)):
            if i == 3:
                raise KeyboardInterrupt
            yield settled

    out = tmp_path / "resumed"
    monkeypatch.setattr(FrameExtractor, "curate", interrupted)
    assert main(["prepare", "frames", str(films["letterbox"]), "--out", str(out), "--size", "64"]) == 130
    assert not _ffmpeg_children()
    import tempfile

    assert not list(Path(tempfile.gettempdir()).glob("ghibli-frames-*"))  # the chunks' spool folder is gone
    partial = _names(out)
    assert 0 < len(partial) < len(KEPT)
    state = json.loads((out / ".prepare.json").read_text())
    assert not state["sources"]["film:letterbox"]["complete"]
    # an append cut in half by a hard kill: the reader drops it, the rerun redoes the frame
    with open(out / "manifest.jsonl", "a") as fp:
        fp.write('{"file": "letterbox/letterbox_t000099')
    monkeypatch.setattr(FrameExtractor, "curate", original)
    assert main(["prepare", "frames", str(films["letterbox"]), "--out", str(out), "--size", "64"]) == 0
    assert _names(out) == _names(clean)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == len(set(json.loads(ln)["file"] for ln in lines)) == len(KEPT)
    a = [{k: v for k, v in r.items()} for r in Manifest.load(out)]
    b = [{k: v for k, v in r.items()} for r in Manifest.load(clean)]
    assert a == b
    counts = json.loads((out / ".prepare.json").read_text())["sources"]["film:letterbox"]["counts"]
    assert counts["samples"] == 22 and counts["kept"] == len(KEPT)

    # a finished film is not redone; other settings into the same folder are refused
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    assert main(["prepare", "frames", str(films["letterbox"]), "--out", str(out), "--size", "64"]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    assert main(["prepare", "frames", str(films["letterbox"]), "--out", str(out), "--size", "32"]) == 1


def test_cli_frames_full_size_png(films, tmp_path):
    out = tmp_path / "full"
    assert main(["prepare", "frames", str(films["letterbox"]), "--out", str(out), "--full-size", "--format", "png",
                 "--end", "2.2"]) == 0
    files = sorted(out.rglob("*.png"))
    assert [p.name for p in files] == ["letterbox_t000000.000.png", "letterbox_t000002.000.png"]
    with Image.open(files[0]) as im:
        assert im.width == W and BAR * 2 <= H - im.height <= BAR * 2 + 8


# -- prepare images ------------------------------------------------------------------------------
def test_image_cleaner_reasons():
    cleaner = ImageCleaner(size=64)
    index = HashIndex()
    pic = Image.fromarray(texture(21, 160, 120, True))
    out, reason, h = cleaner.clean(pic, index=index)
    assert reason is None and out.size == (64, 64) and len(index) == 1
    assert cleaner.clean(pic.resize((150, 112)), index=index)[1] == "duplicate"
    assert cleaner.clean(pic.resize((40, 30)), index=index)[1] == "too_small"
    assert cleaner.clean(Image.new("RGB", (100, 100), (5, 5, 5)), index=index)[1] == "black"
    assert cleaner.clean(Image.new("RGB", (100, 100), (200, 100, 50)), index=index)[1] == "blank"
    full = ImageCleaner(size=None, max_side=100).clean(pic)[0]
    assert full.size == (100, 75)
    with pytest.raises(ValueError, match="RGB"):
        cleaner.clean(pic.convert("L"))


def test_cli_images(tmp_path, capsys):
    src = tmp_path / "photos"
    (src / "trip").mkdir(parents=True)
    landscape = texture(31, 400, 300, True)
    # stored as a portrait with EXIF orientation 6 (turn 90 degrees clockwise to view): a landscape
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(landscape, 1))).save(src / "sideways.jpg", exif=exif.tobytes())
    rgba = np.dstack([texture(32, 300, 300, False), np.full((300, 300), 255, np.uint8)])
    Image.fromarray(rgba).save(src / "trip" / "alpha.png")
    Image.fromarray(texture(33, 320, 240, True)).convert("L").save(src / "trip" / "grey.jpg")
    Image.fromarray(texture(34, 500, 400, False)).save(src / "big.jpg")
    Image.fromarray(texture(34, 500, 400, False)).resize((300, 240)).save(src / "trip" / "big_copy.png")
    Image.fromarray(texture(35, 100, 80, True)).save(src / "tiny.jpg")
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    out = tmp_path / "out"
    rc = main(["prepare", "images", str(src), "--out", str(out), "--size", "128", "--tag", "domain=photo"])
    captured = capsys.readouterr()
    assert rc == 1 and "corrupt.jpg" in captured.err, captured.err
    assert _names(out) == ["big.jpg", "sideways.jpg", "trip/alpha.jpg", "trip/grey.jpg"]
    assert "duplicate 1" in captured.out and "too small 1" in captured.out and "unreadable 1" in captured.out
    from ghibli_core.imaging import center_crop_resize

    with Image.open(out / "sideways.jpg") as im:
        assert im.size == (128, 128) and im.mode == "RGB"
        got = np.asarray(im).astype(float)
    upright = np.asarray(center_crop_resize(Image.fromarray(landscape), 128)).astype(float)
    as_stored = np.asarray(center_crop_resize(Image.fromarray(np.ascontiguousarray(np.rot90(landscape, 1))), 128))
    assert np.abs(got - upright).mean() < 4 < np.abs(got - as_stored.astype(float)).mean()
    records = {r["file"]: r for r in Manifest.load(out)}
    assert records["trip/alpha.jpg"]["source"] == "trip/alpha.png"
    assert records["big.jpg"]["tags"] == {"domain": "photo"} and records["big.jpg"]["kind"] == "image"
    # a rerun skips what is done, keeps the manifest free of duplicates
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    assert main(["prepare", "images", str(src), "--out", str(out), "--size", "128", "--tag", "domain=photo"]) == 1
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 4
    # an empty folder is an error that names it
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["prepare", "images", str(empty), "--out", str(tmp_path / "o2")]) == 2
    assert "empty" in capsys.readouterr().err
