"""Safe image loading and the pixel <-> tensor conversions (ghibli_core.imaging)."""
from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ghibli_core.imaging import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    MIN_SIDE,
    ImageLoadError,
    center_crop_resize,
    list_images,
    load_image,
    resize_max_side,
    to_pil,
    to_tensor,
    to_uint8,
)


# -- helpers ----------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, followed by a few bytes of data
    that could never decode into that many pixels: loading it must fail on the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# -- refusals -----------------------------------------------------------------------------------
def test_zero_bytes_is_a_clear_error(tmp_path: Path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(empty)
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(io.BytesIO(b""))


def test_missing_file_and_folder(tmp_path: Path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="not a file"):
        load_image(tmp_path)


def test_truncated_jpeg_is_refused_not_half_loaded(tmp_path: Path):
    data = encode(noise_image(256, 192), "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg.*(truncated|corrupt)"):
        load_image(path)


def test_truncated_png_is_refused(tmp_path: Path):
    data = encode(noise_image(128, 128), "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(path)


@pytest.mark.parametrize(
    "name, payload",
    [
        ("random.png", np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        ("page.jpg", b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>"),
        (
            "vector.jpg",
            b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
            b'<rect width="10" height="10" fill="red"/></svg>',
        ),
        ("text.png", b"just some text pretending to be a PNG\n" * 10),
    ],
)
def test_non_images_are_refused_naming_the_file(tmp_path: Path, name: str, payload: bytes):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(ImageLoadError, match=name.replace(".", r"\.") + ".*not an image"):
        load_image(path)


def test_unsupported_real_format_is_refused(tmp_path: Path):
    # a real image, but in a format outside the allow-list (Pillow can decode it)
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(noise_image(8, 8), "PPM"))
    with pytest.raises(ImageLoadError, match="not an image in a supported format"):
        load_image(path)


def test_decompression_bomb_far_above_pillow_limit_is_refused_from_the_header():
    data = png_header_only(20000, 20000)  # 400 MP: Pillow itself would raise
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match="20000x20000|too large"):
        load_image(data)
    assert time.perf_counter() - start < 1.0  # nothing was decoded


def test_decompression_bomb_between_1x_and_2x_pillow_limit_is_refused_without_warning():
    side = int((1.5 * Image.MAX_IMAGE_PIXELS) ** 0.5)
    data = png_header_only(side, side)
    # Pillow alone only warns for this size and would go on to decode it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Image.open(io.BytesIO(data)).close()
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our loader neither warns nor decodes
        with pytest.raises(ImageLoadError, match=f"{side}x{side}.*more than the limit"):
            load_image(data)


def test_custom_pixel_limit(tmp_path: Path):
    path = tmp_path / "small.png"
    noise_image(100, 100).save(path)
    with pytest.raises(ImageLoadError, match="small.png is 100x100 = 10,000 pixels"):
        load_image(path, max_pixels=5000)
    assert load_image(path, max_pixels=10_000).size == (100, 100)
    assert DEFAULT_MAX_PIXELS <= Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("size", [(1, 1), (15, 400), (400, 15)])
def test_min_side_refuses_tiny_images_naming_the_size(tmp_path: Path, size: tuple[int, int]):
    path = tmp_path / "tiny.png"
    noise_image(*size).save(path)
    w, h = size
    with pytest.raises(ImageLoadError, match=rf"tiny.png is {w}x{h} pixels, too small: .* at least {MIN_SIDE} pixels"):
        load_image(path, min_side=MIN_SIDE)
    with pytest.raises(ImageLoadError, match=f"<PIL image> is {w}x{h} pixels"):
        load_image(noise_image(*size), min_side=MIN_SIDE)
    assert load_image(path).size == size  # the library's default checks no minimum


def test_min_side_is_checked_from_the_header_and_admits_the_minimum(tmp_path: Path):
    # a header that declares 1x1 followed by garbage: refused as too small, never decoded
    with pytest.raises(ImageLoadError, match="is 1x1 pixels, too small"):
        load_image(png_header_only(1, 1), min_side=MIN_SIDE)
    path = tmp_path / "edge.png"
    noise_image(MIN_SIDE, 300).save(path)
    assert load_image(path, min_side=MIN_SIDE).size == (MIN_SIDE, 300)
    with pytest.raises(ValueError, match="min_side"):
        load_image(path, min_side=0)


# -- conversions to upright RGB --------------------------------------------------------------------
@pytest.mark.parametrize("size", [(1, 1), (1, 10000), (10000, 1), (3, 5)])
def test_extreme_shapes_load_exactly(tmp_path: Path, size: tuple[int, int]):
    img = noise_image(*size, seed=3)
    path = tmp_path / "x.png"
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == size
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, quality=100)
    out = load_image(path)
    assert out.mode == "RGB"
    r, g, b = np.asarray(out).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path: Path):
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(1, 256).repeat(4, 0)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (4, 256, 3)
    # Pillow's own convert would clip everything above 255 to white
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and abs(int(out[0, 128, 0]) - 128) <= 1
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)


def test_32_bit_integer_image_from_memory():
    arr = np.array([[0, 32768, 65535]], dtype=np.int32)
    img = Image.fromarray(arr)
    assert img.mode == "I"
    out = np.asarray(load_image(img))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_rgba_is_composited_on_white(tmp_path: Path):
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue -> white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    path = tmp_path / "alpha.png"
    rgba.save(path)
    out = np.asarray(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert all(abs(int(v) - 127) <= 2 for v in out[0, 1])
    assert out[1, 3].tolist() == [255, 0, 0]


@pytest.mark.parametrize("mode", ["LA", "1", "L"])
def test_grey_modes_become_rgb(tmp_path: Path, mode: str):
    img = Image.new(mode, (6, 4), 255 if mode != "LA" else (200, 255))
    path = tmp_path / "g.png"
    img.save(path)
    out = np.asarray(load_image(path))
    assert out.shape == (4, 6, 3) and len(set(out.reshape(-1).tolist())) == 1


def test_palette_with_and_without_transparency(tmp_path: Path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    path = tmp_path / "pal.png"
    pal.save(path)
    assert np.asarray(load_image(path))[0, 0].tolist() == [0, 255, 0]
    pal.putpixel((0, 0), 0)
    pal.save(path, transparency=0)
    out = np.asarray(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [0, 255, 0]


def test_animated_gif_gives_the_first_frame(tmp_path: Path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as stored:
        assert stored.n_frames == 3
    out = np.asarray(load_image(path))
    assert out[4, 4, 0] > 200 and out[4, 4, 2] < 50


@pytest.mark.parametrize("fmt, suffix", [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp")])
def test_exif_orientation_is_applied(tmp_path: Path, fmt: str, suffix: str):
    # stored landscape: left half red, right half blue; orientation 6 = "rotate 90 degrees
    # clockwise to display", so upright it is portrait with red on top
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"rotated{suffix}"
    stored.save(path, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt != "PNG" else {}))
    out = load_image(path)
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[35, 10]
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    assert out.getexif().get(0x0112, 1) == 1  # no orientation left to apply twice


def test_sources_and_result_are_independent(tmp_path: Path):
    img = noise_image(12, 10, seed=5)
    data = encode(img, "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    results = [load_image(path), load_image(str(path)), load_image(data), load_image(io.BytesIO(data)), load_image(img)]
    for out in results:
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(img))
    assert results[-1] is not img  # a copy, never the caller's object
    path.unlink()  # the loaded image holds no open file
    assert results[0].load() is not None
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]


def test_max_side_downscales_keeping_aspect(tmp_path: Path):
    path = tmp_path / "big.jpg"
    noise_image(400, 200).save(path, quality=90)
    out = load_image(path, max_side=100)
    assert out.size == (100, 50) and out.mode == "RGB"
    assert load_image(path, max_side=1000).size == (400, 200)  # never upscales
    with pytest.raises(ValueError):
        load_image(path, max_side=0)


# -- fuzzing -------------------------------------------------------------------------------------
_SEEDS = {
    "png": encode(noise_image(16, 12, seed=7), "PNG"),
    "jpeg": encode(noise_image(16, 12, seed=8), "JPEG", quality=80),
    "gif": encode(noise_image(16, 12, seed=9).convert("P"), "GIF"),
    "webp": encode(noise_image(16, 12, seed=10), "WEBP"),
    "bmp": encode(noise_image(16, 12, seed=11), "BMP"),
    "tiff": encode(noise_image(16, 12, seed=12), "TIFF"),
}


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(_SEEDS[draw(st.sampled_from(sorted(_SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            data = data[:pos]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF it skips
@settings(
    max_examples=300,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(st.one_of(st.binary(max_size=512), mutated_images()))
def test_fuzz_only_image_load_error_escapes(data: bytes):
    try:
        out = load_image(data, max_pixels=1_000_000)
    except ImageLoadError:
        return
    assert out.mode == "RGB" and out.width * out.height <= 1_000_000


# -- geometry ------------------------------------------------------------------------------------
def test_resize_max_side_and_center_crop():
    img = noise_image(300, 200)
    assert resize_max_side(img, 300) is img
    assert resize_max_side(img, 150).size == (150, 100)
    assert resize_max_side(Image.new("RGB", (1, 1000)), 10).size == (1, 10)
    # wide image: red centre square, blue side bands -> the crop is all red
    wide = Image.new("RGB", (300, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (100, 0, 200, 100))
    crop = np.asarray(center_crop_resize(wide, 64))
    assert crop.shape == (64, 64, 3)
    assert crop[..., 0].min() > 200 and crop[..., 2].max() < 60
    assert center_crop_resize(Image.new("RGB", (10, 30)), 50).size == (50, 50)  # upscales too
    with pytest.raises(ValueError):
        center_crop_resize(img, 0)


def test_list_images_sorted_recursive_and_errors(tmp_path: Path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    for rel in ["b/2.PNG", "a/1.jpg", "a/3.webp", "top.jpeg", "a/.hidden.jpg", "notes.txt"]:
        (tmp_path / rel).write_bytes(b"x")
    found = list_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/1.jpg", "a/3.webp", "b/2.PNG", "top.jpeg"]
    assert list_images(tmp_path, recursive=False) == [tmp_path / "top.jpeg"]
    assert list_images([tmp_path / "a" / "1.jpg", tmp_path / "a"]) == [tmp_path / "a/1.jpg", tmp_path / "a/3.webp"]
    assert {".jpg", ".png", ".tiff", ".gif", ".bmp", ".webp", ".jpeg", ".tif"} == set(IMAGE_EXTENSIONS)
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="not an image file"):
        list_images(tmp_path / "notes.txt")


# -- tensors ------------------------------------------------------------------------------------
def test_tensor_round_trip_is_exact():
    img = noise_image(37, 23, seed=4)
    x = to_tensor(img)
    assert x.shape == (1, 3, 23, 37) and x.dtype == torch.float32 and x.is_contiguous()
    assert x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(np.asarray(img)[0, 0] / 127.5 - 1, dtype=torch.float32))
    assert np.array_equal(np.asarray(to_pil(x)), np.asarray(img))
    assert np.array_equal(np.asarray(to_pil(x[0])), np.asarray(img))
    batch = to_tensor([img, noise_image(37, 23, seed=5)])
    assert batch.shape == (2, 3, 23, 37)
    assert np.array_equal(to_uint8(batch)[0], np.asarray(img))
    arr = np.asarray(img)
    assert torch.equal(to_tensor(arr), x) and torch.equal(to_tensor(arr[None]), x)


def test_to_tensor_channels_last_is_the_same_tensor():
    arr = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x, y = to_tensor(arr), to_tensor(arr, channels_last=True)
    assert torch.equal(x, y) and x.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(to_uint8(y), arr)


def test_to_uint8_rounds_and_clamps():
    t = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 1 / 127.5 - 1, 0.5 / 127.5 - 1 + 1e-4]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = to_uint8(t)
    assert out.shape == (1, 1, 7, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 1, 1]


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "uint8"),
        (np.zeros((4, 4), dtype=np.uint8), r"\(4, 4\)"),
        (np.zeros((2, 4, 4, 4), dtype=np.uint8), r"\(2, 4, 4, 4\)"),
        (Image.new("L", (4, 4)), "RGB"),
        ([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))], "one size"),
        ([], "empty"),
    ],
)
def test_to_tensor_checks_its_input(bad, match):
    with pytest.raises(ValueError, match=match):
        to_tensor(bad)


def test_to_pil_and_to_uint8_check_their_input():
    with pytest.raises(ValueError, match=r"\(1, 4, 2, 2\)"):
        to_uint8(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="floating"):
        to_uint8(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.full((3, 2, 2), float("nan")))
    for bad in (float("inf"), float("-inf")):  # one bad value among finite ones
        t = torch.zeros(3, 2, 2)
        t[1, 0, 1] = bad
        with pytest.raises(ValueError, match="infinite"):
            to_uint8(t)
    # huge but finite values overflow the sum: still a valid (clamped) image, not an error
    assert to_uint8(torch.full((3, 2, 2), 3e38)).min() == 255
    with pytest.raises(ValueError, match="one image"):
        to_pil(torch.zeros(2, 3, 2, 2))
