"""The app in public: bad images and videos, oversized uploads, file paths and cleanup, all
through a launched app (gradio_client and raw HTTP on loopback, tiny models)."""
from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import re
import secrets
import struct
import time
import zlib
from pathlib import Path
from urllib.parse import quote

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
import httpx  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import app  # noqa: E402
from ghibli_core import video as V  # noqa: E402
from ghibli_core.models import ResnetGenerator, StyleGAN2Generator  # noqa: E402
from ghibli_core.video import VideoLimits, probe  # noqa: E402

from test_app import free_port  # noqa: E402
from test_video import decode, ffmpeg, make_clip, psnr  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")

GAN = dict(z_dim=16, w_dim=16, resolution=16, channel_base=256, channel_max=16, mapping_layers=2)
MAX_UPLOAD = 300_000  # bytes; lowered for these tests through app.launch


def launch(demo, **kwargs) -> None:
    """app.launch on a free loopback port, tried again when Gradio's one 3 s start-up check misses."""
    for attempt in range(3):
        try:
            app.launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True, **kwargs)
            return
        except ValueError as exc:
            if "localhost is not accessible" not in str(exc) or attempt == 2:
                raise
            demo.close()


def make_weights(root: Path) -> Path:
    torch.manual_seed(0)
    ResnetGenerator(width=4, n_blocks=1).save_pretrained(root / "weights" / "tiny")
    StyleGAN2Generator(**GAN).save_pretrained(root / "weights" / "gan")
    return root / "weights"


class Served:
    def __init__(self, demo, root: Path, temp: Path):
        self.demo, self.root, self.temp = demo, root, temp
        self.url = demo.local_url.rstrip("/")

    def client(self, **kwargs) -> Client:
        kwargs.setdefault("download_files", str(self.root / "downloads"))
        return Client(self.url, verbose=False, analytics_enabled=False, httpx_kwargs={"timeout": 300}, **kwargs)

    @property
    def ctx(self) -> app.AppContext:
        return self.demo.ghibli_context


@contextlib.contextmanager
def gradio_temp_dir(path: Path):
    """Gradio's cache folder (GRADIO_TEMP_DIR) set to ``path`` inside the block, then restored."""
    saved = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(path)
    try:
        yield path
    finally:
        if saved is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = saved


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app with the default pixel limit, small video caps and a 300 kB upload limit, with its
    own Gradio cache folder (GRADIO_TEMP_DIR) so files can be counted."""
    root = tmp_path_factory.mktemp("abuse")
    temp = root / "gradio-cache"
    demo = None
    with gradio_temp_dir(temp):
        try:
            demo = app.build_app(
                weights_dir=make_weights(root), default_model="tiny", default_gan="gan", device="cpu",
                video_limits=VideoLimits(max_seconds=3.0, max_pixels=100_000, max_frames=60),
            )
            launch(demo, max_file_size=MAX_UPLOAD)
            yield Served(demo, root, temp)
        finally:
            if demo is not None:
                demo.close()


@pytest.fixture(scope="module")
def client(served):
    return served.client()


def stylize(client, path, strength=1.0, max_side=1024):
    return client.predict(handle_file(str(path)), "tiny", "", "", strength, max_side, api_name="/stylize")


def project(client, path):
    return client.predict(handle_file(str(path)), None, "gan", "", "", 10, "w", api_name="/project")


def still_serving(client, root: Path) -> None:
    """A normal request right after a bad one is answered normally."""
    ok = root / "ok.png"
    if not ok.exists():
        Image.new("RGB", (24, 16), (30, 140, 90)).save(ok)
    result, *_ = stylize(client, ok)
    assert Image.open(result).size == (24, 16)


# -- image files -----------------------------------------------------------------------------
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels: a few kB that decode to gigabytes."""
    row = b"\x00" + bytes(math.ceil(width / 8))
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def halves(size, left, right, mode="RGB") -> Image.Image:
    w, h = size
    img = Image.new(mode, size, left)
    img.paste(Image.new(mode, (w - w // 2, h), right), (w // 2, 0))
    return img


def jpeg_photo() -> bytes:
    rng = np.random.default_rng(0)
    return encoded(Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)), "JPEG", quality=90)


def _between_pillow_limits() -> bytes:
    side = math.isqrt(int(Image.MAX_IMAGE_PIXELS * 1.5))  # Pillow only warns here; our cap refuses
    return bomb_png(side, side)


# name -> (bytes, the message the error must contain)
BAD_IMAGES = {
    "empty.png": (lambda: b"", "empty"),
    "truncated.jpg": (lambda: jpeg_photo()[: len(jpeg_photo()) // 2], "truncated or corrupt"),
    "noise.png": (lambda: np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not an image"),
    "page.jpg": (lambda: b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>", "not an image"),
    "drawing.jpg": (
        lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
                b'<rect width="10" height="10" fill="red"/></svg>',
        "not an image",
    ),
    "bomb.png": (lambda: bomb_png(20000, 20000), "too large to decode safely"),
    "just_over.png": (_between_pillow_limits, "more than the limit"),
    # decodable, but a result this small would be invisible: refused naming the size
    "dot.png": (lambda: encoded(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), "is 1x1 pixels, too small"),
    "line.png": (lambda: encoded(Image.new("RGB", (1, 10000), (90, 90, 200)), "PNG"), "is 1x10000 pixels, too small"),
    "thumb.png": (lambda: encoded(Image.new("RGB", (15, 40), (90, 90, 200)), "PNG"), "at least 16 pixels on each side"),
}


def expected_rgba_on_white() -> np.ndarray:
    out = np.zeros((16, 24, 3), np.uint8)
    out[:, :12] = 255  # transparent red over white is white
    out[:, 12:] = (0, 0, 255)
    return out


def exif_rotated() -> bytes:
    # stored 48x16, left half red; orientation 6 means "turn 90 degrees clockwise to show".
    # The edge between the colours is on a JPEG block edge, without chroma subsampling, so the
    # colours come back within a few grey levels.
    img = halves((48, 16), (255, 0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(img, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())


def expected_upright() -> np.ndarray:
    out = np.zeros((48, 16, 3), np.uint8)
    out[:24] = (255, 0, 0)  # the stored left edge is the top once upright
    out[24:] = (0, 0, 255)
    return out


def sixteen_bit() -> bytes:
    values = (np.arange(24 * 16).reshape(16, 24) * 170).astype(np.uint16)  # up to 65,110 of 65,535
    return encoded(Image.fromarray(values), "PNG")  # mode I;16


def palette() -> bytes:
    img = halves((24, 16), 0, 1, mode="P")
    img.putpalette([250, 200, 20, 10, 60, 200] + [0] * 762)
    return encoded(img, "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (24, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def full(size, colour) -> np.ndarray:
    w, h = size
    return np.broadcast_to(np.asarray(colour, np.uint8), (h, w, 3)).copy()


# name -> (bytes, expected upright RGB at strength 0 (H, W, 3) uint8, tolerance in grey levels);
# each at least 16 pixels a side (imaging.MIN_SIDE)
GOOD_IMAGES = {
    "edge.png": (lambda: encoded(Image.new("RGB", (16, 300), (10, 200, 30)), "PNG"), lambda: full((16, 300), (10, 200, 30)), 0),
    "cmyk.jpg": (
        lambda: encoded(Image.new("RGB", (24, 16), (200, 100, 50)).convert("CMYK"), "JPEG", quality=95),
        lambda: full((24, 16), (200, 100, 50)), 4,
    ),
    "depth16.png": (
        sixteen_bit,
        lambda: np.repeat((np.arange(384).reshape(16, 24) * 170 / 257).round().astype(np.uint8)[..., None], 3, -1), 0,
    ),
    "rgba.png": (
        lambda: encoded(halves((24, 16), (255, 0, 0, 0), (0, 0, 255, 255), mode="RGBA"), "PNG"), expected_rgba_on_white, 0
    ),
    "palette.png": (
        palette,
        lambda: np.concatenate([full((12, 16), (250, 200, 20)), full((12, 16), (10, 60, 200))], axis=1), 0,
    ),
    "animated.gif": (animated_gif, lambda: full((24, 16), (255, 0, 0)), 0),
    "exif_rotated.jpg": (exif_rotated, expected_upright, 6),
}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for name, (make, *_) in {**BAD_IMAGES, **GOOD_IMAGES}.items():
        (folder / name).write_bytes(make())
    return folder


def test_bad_image_files_are_small_enough_to_upload(image_files):
    # otherwise the upload limit, not the image checks, would refuse them
    assert max((image_files / n).stat().st_size for n in BAD_IMAGES) < MAX_UPLOAD


def assert_clean_error(info, name: str, message: str, served: Served) -> None:
    text = str(info.value)
    assert name in text and message in text, text
    assert "Traceback" not in text and str(served.temp) not in text and str(served.root) not in text


@pytest.mark.parametrize("tab", ["photo", "projection"])
@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image_is_a_clean_error(served, client, image_files, name, tab):
    run = {"photo": stylize, "projection": project}[tab]
    with pytest.raises(AppError) as info:
        run(client, image_files / name)
    assert_clean_error(info, name, BAD_IMAGES[name][1], served)
    still_serving(client, served.root)


@pytest.mark.parametrize("name", list(GOOD_IMAGES))
def test_odd_image_gives_the_upright_rgb_result(client, image_files, name):
    _, expected, tolerance = GOOD_IMAGES[name]
    want = expected()
    # strength 0 returns the decoded photo itself: the exact check of what the app read
    result, download, _, _ = stylize(client, image_files / name, strength=0.0)
    got = np.asarray(Image.open(result).convert("RGB"))
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want).max() <= tolerance
    # the network runs on every such shape and the result keeps the photo's upright size
    result, *_ = stylize(client, image_files / name, strength=1.0)
    assert Image.open(result).size == (want.shape[1], want.shape[0])


@pytest.mark.parametrize("name", ["edge.png", "cmyk.jpg", "depth16.png", "animated.gif", "exif_rotated.jpg"])
def test_odd_image_is_projected(client, image_files, name):
    preview, status, latent, target = project(client, image_files / name)
    assert Image.open(preview).size == (16, 16) and "projected in 10 steps" in status
    assert Image.open(target).size == (16, 16)  # the centre square the projection fitted
    assert latent.endswith("_latent.safetensors")


# -- videos ------------------------------------------------------------------------------------
def stylize_video(client, path, *, side_by_side=False, resolution="original"):
    return client.predict(
        handle_file(str(path)), "tiny", "", "", resolution, 0.0, 0, None, side_by_side, api_name="/video_stylize"
    )


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    v = {"ok": make_clip(folder / "ok.mp4", size=(32, 24), seconds=1)}
    # a video stream is declared but holds no frame
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=1", "-frames:v", "0", "-c:v", "mpeg4",
           str(folder / "zero_frames.avi"))
    # an audio track only
    ffmpeg("-f", "lavfi", "-i", "sine=duration=1", str(folder / "podcast.mp4"))
    # header and index intact, the last two thirds of the video data random: probing works,
    # decoding fails a frame or two in (while the reader and writer processes run)
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=2", "-c:v", "libx264", "-preset", "ultrafast",
           "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(folder / "src.mp4"))
    blob = bytearray((folder / "src.mp4").read_bytes())
    i = blob.find(b"mdat")
    end = i - 4 + int.from_bytes(blob[i - 4:i], "big")
    cut = i + 4 + (end - i) // 3
    blob[cut:end] = np.random.default_rng(0).integers(0, 256, end - cut, dtype=np.uint8).tobytes()
    (folder / "corrupt.mp4").write_bytes(blob)
    # two frames an hour apart: a tiny file that declares two hours
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=32x32:rate=1/3600:duration=7200", "-c:v", "libx264",
           "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(folder / "two_hours.mp4"))
    # rotation metadata only, like a phone held upright
    landscape = make_clip(folder / "landscape.mp4", size=(64, 48), seconds=1, pattern="testsrc")
    ffmpeg("-display_rotation:v:0", "90", "-i", str(landscape), "-c", "copy", str(folder / "portrait.mp4"))
    v["portrait"] = folder / "portrait.mp4"
    v["odd"] = make_clip(
        folder / "odd.mp4", size=(66, 50), seconds=1, pix_fmt="yuv444p", extra_video=",format=yuv444p,scale=65:49,setsar=1"
    )
    for name in ("zero_frames.avi", "podcast.mp4", "corrupt.mp4", "two_hours.mp4"):
        v[name] = folder / name
    return v


@pytest.mark.parametrize("name, message", [
    ("zero_frames.avi", "zero_frames.avi has a video stream with no frames"),
    ("podcast.mp4", "podcast.mp4 has no video stream"),
    ("corrupt.mp4", "ffmpeg failed decoding corrupt.mp4 after"),
    ("two_hours.mp4", "7200.0 s to process, more than the limit of 3 s"),
])
def test_bad_video_is_a_clean_error(served, client, videos, name, message, monkeypatch):
    if name != "corrupt.mp4":
        # refused from the header and packet index: nothing may be decoded (the server runs in this process)
        def no_decoding(self):
            raise AssertionError("decoding started")

        monkeypatch.setattr(V.FrameReader, "__iter__", no_decoding)
    with pytest.raises(AppError) as info:
        stylize_video(client, videos[name])
    assert_clean_error(info, name, message, served)
    monkeypatch.undo()
    _, download, _, _ = stylize_video(client, videos["ok"])  # and the tab keeps working
    assert probe(download).frame_count == 10


def test_rotated_video_comes_out_upright(client, videos):
    # side by side puts the original on the left: it must match ffmpeg's own upright decoding
    result, download, _, _ = stylize_video(client, videos["portrait"], side_by_side=True)
    info = probe(download)
    assert (info.width, info.height) == (96, 64) and info.rotation == 0 and info.frame_count == 10
    left = decode(Path(download))[:, :, :48]
    upright = decode(videos["portrait"], autorotate=True)
    assert left.shape == upright.shape and psnr(left, upright) > 25


def test_odd_sized_video_is_made_even(client, videos):
    _, download, _, details = stylize_video(client, videos["odd"])
    info = probe(download)
    assert (info.width, info.height) == (64, 48) and info.frame_count == 10 and "64x48" in details


def ffmpeg_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name()]


def files_under(folder: Path | None) -> set[str]:
    if folder is None or not folder.exists():
        return set()
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_failed_video_job_leaves_no_file_or_process(served, client, videos):
    still_serving(client, served.root)  # the result folder exists from here on
    outputs = served.ctx.outputs.root
    before_out, before_cache = files_under(outputs), files_under(served.temp)
    with pytest.raises(AppError, match="failed decoding corrupt.mp4"):  # the job had started
        stylize_video(client, videos["corrupt.mp4"])
    assert files_under(outputs) == before_out  # no half-written video, no empty result folder
    # in Gradio's cache only the upload itself is new (Gradio deletes it on its cache schedule)
    new = files_under(served.temp) - before_cache
    assert all(Path(p).name == "corrupt.mp4" or not (served.temp / p).is_file() for p in new), new
    deadline = time.monotonic() + 10
    while ffmpeg_children() and time.monotonic() < deadline:  # killed processes may take a moment to be reaped
        time.sleep(0.1)
    assert ffmpeg_children() == []


# -- uploads over the limit ---------------------------------------------------------------------
def test_upload_over_the_limit_is_refused_by_the_server(served, client, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(np.random.default_rng(2).integers(0, 256, MAX_UPLOAD + 1000, dtype=np.uint8).tobytes())
    before = files_under(served.temp)
    with big.open("rb") as fp:
        response = httpx.post(f"{served.url}/gradio_api/upload", files={"files": ("big.png", fp, "image/png")})
    assert response.status_code == 413, response.text
    assert f"maximum allowed size of {MAX_UPLOAD} bytes" in response.text
    assert not any(Path(p).name == "big.png" for p in files_under(served.temp) - before)  # nothing kept
    # gradio_client reads the limit from the app's config and refuses before sending
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {MAX_UPLOAD} bytes"):
        stylize(client, big)
    small = tmp_path / "small.png"
    small.write_bytes(np.zeros(MAX_UPLOAD - 1000, np.uint8).tobytes())
    with small.open("rb") as fp:  # under the limit the same route takes it
        response = httpx.post(f"{served.url}/gradio_api/upload", files={"files": ("small.png", fp, "image/png")})
    assert response.status_code == 200 and response.json()[0].endswith("small.png")
    still_serving(client, served.root)


# -- files: results, uploads and the server's own files ------------------------------------------
def served_path(result: dict) -> str:
    """The server-side path inside a file URL the app returned."""
    url = result["url"]
    assert "/gradio_api/file=" in url
    return url.split("/gradio_api/file=", 1)[1]


@pytest.fixture(scope="module")
def result_file(served):
    """(url, server path) of one stylize result, fetched as a browser would."""
    raw = served.client(download_files=False)
    src = served.root / "mine.png"
    Image.new("RGB", (20, 20), (200, 30, 30)).save(src)
    result, download, _, _ = raw.predict(handle_file(str(src)), "tiny", "", "", 1.0, 1024, api_name="/stylize")
    return result["url"], served_path(result)


def get(served, route: str, **kwargs) -> httpx.Response:
    return httpx.get(f"{served.url}{route}", follow_redirects=False, **kwargs)


def test_results_are_served_from_unguessable_folders(served, result_file):
    url, path = result_file
    ok = httpx.get(url)
    assert ok.status_code == 200 and Image.open(io.BytesIO(ok.content)).size == (20, 20)
    folder = Path(path).parent
    assert Path(path).is_relative_to(served.temp) and len(folder.name) == 64  # sha256 with a secret seed
    # the app's own output folder is never served; results are copied into Gradio's cache
    outputs = served.ctx.outputs.root
    assert outputs is not None and not outputs.is_relative_to(served.temp)
    mine = next(outputs.rglob("mine_ghibli.png"))
    guesses = [
        f"{folder}/other_ghibli.png",  # another user's photo name, same folder
        f"{served.temp}/{secrets.token_hex(32)}/mine_ghibli.png",  # another folder
        f"{served.temp}/{folder.name[:-1]}{'1' if folder.name.endswith('0') else '0'}/mine_ghibli.png",  # one digit off
        str(folder),  # a folder listing
        str(served.temp),
        str(mine),  # the app's own copy
        str(outputs),
    ]
    for guess in guesses:
        response = get(served, f"/gradio_api/file={guess}")
        assert response.status_code in (403, 404), (guess, response.status_code)


@pytest.mark.parametrize("route", ["/gradio_api/file=", "/file=", "/gradio_api/file/", "/file/"])
def test_paths_outside_the_app_are_refused(served, route):
    root = app.ROOT
    examples = served.ctx.examples_dir
    weights = served.ctx.models.weights_dir
    targets = [
        "/etc/passwd",
        str(root / "app.py"),
        str(weights / "tiny" / "model.safetensors"),
        f"{served.temp}/../../etc/passwd",
        f"{served.temp}/..%2F..%2Fetc%2Fpasswd",
        f"{examples}/../app.py",
        f"{examples}/%2e%2e/app.py",
        "../../../../../../etc/passwd",
        "app.py",
        quote(str(root / "app.py"), safe=""),
        "~/.bashrc",
    ]
    for target in targets:
        response = get(served, f"{route}{target}")
        assert response.status_code in (403, 404), (target, response.status_code)
        assert b"root:" not in response.content and b"import gradio" not in response.content


def test_file_route_neither_redirects_nor_fetches_internal_urls(served):
    # Gradio before the fix of gradio-app/gradio#13593 answered 302 to any URL (open redirect,
    # and SSRF through gradio_client, which follows redirects); the pinned Gradio refuses it
    for target in ("http://169.254.169.254/latest/meta-data/", f"{served.url}/gradio_api/info", "https://127.0.0.1:1/"):
        response = get(served, f"/gradio_api/file={target}")
        assert response.status_code == 403 and "location" not in response.headers, (target, response.status_code)


def test_examples_are_served_on_purpose(served):
    examples = sorted(p for p in served.ctx.examples_dir.iterdir() if p.is_file())
    if not examples:
        pytest.skip("no example images in this checkout")
    response = get(served, f"/gradio_api/file={examples[0]}")
    assert response.status_code == 200 and response.content == examples[0].read_bytes()


def test_blocked_paths_cover_the_code_weights_and_hub_cache(served):
    blocked = app.blocked_paths(served.ctx)
    for path in (app.ROOT / "app.py", app.ROOT / "ghibli_core", served.ctx.models.weights_dir):
        assert str(path.resolve()) in blocked
    assert not any(served.ctx.examples_dir.resolve().is_relative_to(b) for b in blocked)


# -- cache cleanup -------------------------------------------------------------------------------
def test_output_folder_removes_old_results(tmp_path):
    outputs = app.OutputFolder(keep_s=0.5)
    first = outputs.path_for("a.png")
    first.write_bytes(b"x")
    time.sleep(0.7)
    second = outputs.path_for("b.png")
    assert not first.parent.exists() and second.parent.is_dir()
    # a fresh one is kept
    third = outputs.path_for("c.png")
    assert second.parent.is_dir() and third.parent.is_dir()


def test_gradio_cache_deletes_old_uploads_and_results(tmp_path):
    temp = tmp_path / "cache"
    demo = None
    with gradio_temp_dir(temp):
        try:
            with pytest.raises(ValueError, match="cache_s"):
                app.build_app(weights_dir=make_weights(tmp_path), cache_s=0)
            demo = app.build_app(weights_dir=tmp_path / "weights", default_model="tiny", device="cpu", cache_s=1)
            launch(demo)
            served = Served(demo, tmp_path, temp)
            src = tmp_path / "photo.png"
            Image.new("RGB", (16, 16), (20, 90, 160)).save(src)
            result, _, _, _ = served.client(download_files=False).predict(
                handle_file(str(src)), "tiny", "", "", 1.0, 1024, api_name="/stylize"
            )
            cached = Path(served_path(result))
            assert cached.is_file() and httpx.get(result["url"]).status_code == 200
            uploaded = [p for p in temp.rglob("photo.png")]
            assert uploaded
            deadline = time.monotonic() + 30
            while (cached.exists() or any(p.exists() for p in uploaded)) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not cached.exists() and not any(p.exists() for p in uploaded)
            assert httpx.get(result["url"]).status_code in (403, 404)
        finally:
            if demo is not None:
                demo.close()


# -- the README's "Launch options and limits" matches the code -------------------------------------
def readme_section() -> str:
    text = (app.ROOT / "README.md").read_text()
    start = text.index("## Launch options and limits")
    return text[start : text.index("\n## ", start + 1)]


def test_readme_lists_every_flag_and_only_real_ones():
    section = readme_section()
    parser = app.argument_parser()
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    documented = set(re.findall(r"`(--[a-z-]+)`", section))
    assert documented == flags
    defaults = {a.option_strings[0]: a.default for a in parser._actions if a.option_strings}
    assert f"| `--queue-size` | | `{defaults['--queue-size']}` |" in section
    assert f"| `--concurrency` | | `{defaults['--concurrency']}` |" in section
    assert f"| `--precision` | | `{defaults['--precision']}` |" in section
    # the app reads its variables itself, the diffusion section's in its handler module (ENV_FLAG)
    from ghibli_core import app_diffusion

    source = (app.ROOT / "app.py").read_text()
    for var in re.findall(r"`((?:GHIBLI|GRADIO_SERVER)_[A-Z_]+)`", section):
        assert f'get("{var}")' in source or var == app_diffusion.ENV_FLAG, var
    assert app.resolve_binding(None, None, env={}) == ("127.0.0.1", 7860)


def test_readme_limits_are_the_codes():
    from gradio.utils import FileSize, _parse_file_size

    from ghibli_core.imaging import DEFAULT_MAX_PIXELS

    section = readme_section()
    limits = app.VIDEO_LIMITS
    assert f"{_parse_file_size(app.MAX_FILE_SIZE) // FileSize.MB} MB per file" in section
    assert f"at most {DEFAULT_MAX_PIXELS:,} pixels" in section
    assert f"{app.MAX_SIDE_RANGE[0]} to {app.MAX_SIDE_RANGE[1]} px" in section
    assert f"{limits.max_seconds:g} s and {limits.max_frames} frames per run" in section
    assert f"({limits.max_pixels:,} pixels)" in section and "3840x2160" in section and limits.max_pixels == 3840 * 2160
    assert f"projection {app.PROJECTION_STEPS_RANGE[0]} to {app.PROJECTION_STEPS_RANGE[1]} steps" in section
    assert f"galleries of {app.NEIGHBOURS_RANGE[0]} to {app.NEIGHBOURS_RANGE[1]} images" in section
    assert f"at most {app.MAX_WALK_FRAMES} frames per render" in section
    assert app.CACHE_S == 3600 and f"build_app(cache_s={app.CACHE_S})" in section
    assert app.OutputFolder().keep_s == 600 and "after 10 minutes" in section
    demo = app.build_app(weights_dir=app.ROOT / "weights")
    assert demo._queue.max_size == 16 and demo._queue.default_concurrency_limit == 4
    assert "up to 4 at once" in section and "up to 16 requests wait" in section


def test_readme_python_example_runs_and_lists_every_endpoint(served, tmp_path):
    section = readme_section()
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    Image.new("RGB", (20, 18), (120, 160, 200)).save(tmp_path / "photo.jpg")
    code = code.replace('"http://127.0.0.1:7860/"', repr(served.url)).replace('"photo2ghibli"', '"tiny"')
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README's example
    finally:
        os.chdir(cwd)
    assert Image.open(namespace["image"]).size == (20, 18)
    endpoints = set(served.client().view_api(print_info=False, return_format="dict")["named_endpoints"])
    documented = set(re.findall(r"`(/[a-z_]+)`", section))
    # the diffusion section's event exists only where that model is offered (CUDA or --diffusion)
    conditional = {"/stylize_diffusion"}
    assert conditional <= documented
    assert documented - conditional == endpoints - conditional


# -- usability: examples and model cards on every tab -----------------------------------------------
def test_every_tab_offers_examples_and_a_model_card(served, client):
    config = served.demo.get_config_file()
    datasets = [c for c in config["components"] if c["type"] == "dataset"]
    labels = {c["props"].get("label") for c in datasets}
    assert {"Examples (synthetic scenes)", "Examples (synthetic)", "Examples"} <= labels  # photo, video, projection
    clips = [p for p in app.EXAMPLES_DIR.iterdir() if p.suffix == ".mp4"]
    assert clips
    for clip in clips:  # the example clips run within the app's own caps
        V.check_limits(probe(clip), app.VIDEO_LIMITS)
    cards = [c for c in config["components"] if c["type"] == "markdown" and c["props"].get("label") == "Model card"]
    assert len(cards) == 3  # photo, video, generator
    for name, endpoint in (("tiny", "/video_model_card"), ("gan", "/gan_model_card")):
        text = client.predict(name, api_name=endpoint)
        assert text.strip() and not text.startswith("*No model"), text
    for name, endpoint in (("nope", "/video_model_card"), ("tiny", "/gan_model_card")):  # not offered there
        with pytest.raises(AppError, match="not in the list of choices"):
            client.predict(name, api_name=endpoint)


def test_photo_job_reports_progress(served, client, tmp_path, monkeypatch):
    real = app.stylize_at_photo_size

    def slow(*args, **kwargs):  # a real photo takes seconds on a CPU; Gradio sends progress every 0.1 s
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(app, "stylize_at_photo_size", slow)  # the server runs in this process
    src = tmp_path / "p.png"
    Image.new("RGB", (32, 24), (10, 20, 30)).save(src)
    job = client.submit(handle_file(str(src)), "tiny", "", "", 1.0, 1024, api_name="/stylize")

    async def updates():
        return [u async for u in job]

    seen = asyncio.run(updates())  # every status update, progress included
    job.result()
    descriptions = {p.desc for u in seen for p in (getattr(u, "progress_data", None) or [])}
    assert "stylizing 32x24" in descriptions, descriptions


def test_building_the_app_loads_no_model_and_needs_no_network(monkeypatch):
    from ghibli_core import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("build_app opened a network connection")

    monkeypatch.setattr("socket.create_connection", no_network)
    hub.clear_model_cache()  # models load lazily: other tests' servers just load theirs again
    demo = app.build_app(weights_dir=app.ROOT / "weights", device="cpu")
    assert not hub._model_cache  # the embedded models are listed and their cards read, none loaded
    assert demo.ghibli_context.models.embedded("image")
