"""Images in and out: safe loading, and the one conversion between pixels and tensors.

Every network in this project sees ``(N, 3, H, W)`` float32 in ``[-1, 1]``; everything a person
gives or gets is an RGB ``PIL.Image`` (or uint8 ``(H, W, 3)``). This module is the only place
that converts between the two, so the value range and channel order are decided once.

:func:`load_image` treats every input as untrusted: only real raster formats are decoded, the
pixel count is checked from the header before any pixel is decoded, truncated files are errors,
and the result is always an upright, fully loaded RGB image.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "MIN_SIDE",
    "center_crop_resize",
    "list_images",
    "load_image",
    "resize_max_side",
    "to_pil",
    "to_tensor",
    "to_uint8",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Pillow plugins allowed to decode. MPO is the multi-picture JPEG many cameras write.
_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# 64 megapixels: above any phone photo we expect, below Pillow's own bomb limit (~89.5 MP), and
# small enough that the decoded RGB image (192 MB) and its float tensor fit comfortably in memory.
DEFAULT_MAX_PIXELS = 64_000_000

# The smallest side the app and the CLI stylize (``load_image(..., min_side=MIN_SIDE)``): below an
# icon's 16 px a result is too small to see (a 1x1 upload "succeeded" with an invisible 1x1
# picture), and the networks' 4x downsampling would leave under 4 pixels across.
MIN_SIDE = 16

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]


class ImageLoadError(ValueError):
    """An input that is not a decodable, safe-to-decode image."""


# -- loading ------------------------------------------------------------------------------
def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    min_side: int | None = None,
) -> Image.Image:
    """Decode ``source`` into an upright RGB image, refusing anything unsafe or broken.

    Args:
        source: a path, the file's bytes, a binary file object, or a ``PIL.Image``.
        max_pixels: refuse images whose header declares more pixels than this (checked before
            decoding, so decompression bombs cost nothing).
        max_side: if given, downscale (Lanczos, aspect kept) so the longer side is at most this.
        min_side: if given, refuse images whose width or height (from the header, before
            decoding) is below this; :data:`MIN_SIDE` is the app's and the CLI's.

    Returns:
        A fully loaded ``RGB`` image (no open file behind it): EXIF orientation applied,
        transparency composited on white, CMYK/16-bit/palette/grey/1-bit converted, the first
        frame of an animation.

    Raises:
        ImageLoadError: empty input, missing file, not an image (SVG, HTML, random bytes),
            an unsupported format, too many pixels, a side below ``min_side``, a truncated or
            corrupt file.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    if min_side is not None and min_side < 1:
        raise ValueError(f"min_side must be positive, got {min_side}")
    limits = {"max_pixels": max_pixels, "max_side": max_side, "min_side": min_side}
    if isinstance(source, Image.Image):
        return _finish(source, "<PIL image>", **limits)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageLoadError("the image data is empty (0 bytes)")
        return _decode(io.BytesIO(data), "<bytes>", **limits)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageLoadError(f"{path}: no such file")
        if not path.is_file():
            raise ImageLoadError(f"{path} is not a file")
        if path.stat().st_size == 0:
            raise ImageLoadError(f"{path} is empty (0 bytes)")
        with open(path, "rb") as fp:
            return _decode(fp, str(path), **limits)
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "<file object>"))
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise ImageLoadError(f"{name}: expected a binary file object, read {type(data).__name__}")
        if not data:
            raise ImageLoadError(f"{name} is empty (0 bytes)")
        return _decode(io.BytesIO(data), name, **limits)
    raise TypeError(f"cannot load an image from {type(source).__name__}; pass a path, bytes, a file or a PIL image")


def _decode(fp: BinaryIO, name: str, *, max_pixels: int, max_side: int | None, min_side: int | None) -> Image.Image:
    # Pillow warns between 1x and 2x its MAX_IMAGE_PIXELS and only errors above; our own limit
    # is checked from the header right below, so its warning would only be noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            # Image.open(formats=...) only accepts registered openers; MPO files open through
            # the JPEG opener (Pillow registers no opener named "MPO").
            Image.init()
            img = Image.open(fp, formats=[f for f in _FORMATS if f in Image.OPEN])
        except UnidentifiedImageError:
            raise ImageLoadError(
                f"{name} is not an image in a supported format ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            ) from None
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(f"{name} is too large to decode safely: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes means "not an image"
            raise ImageLoadError(f"{name} could not be read as an image: {exc}") from exc
        with img:
            _check_pixels(img.size, name, max_pixels, min_side)
            try:
                if max_side is not None and img.format in ("JPEG", "MPO"):
                    # JPEG can decode at 1/2, 1/4, 1/8 scale for free; draft never goes below the
                    # requested size, the exact Lanczos resize happens in _finish.
                    w, h = img.size
                    scale = min(1.0, max_side / max(w, h))
                    img.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
                # img.load() raises on truncated data unless someone set the global
                # ImageFile.LOAD_TRUNCATED_IMAGES; we never do.
                img.load()
                return _finish(img, name, max_pixels=max_pixels, max_side=max_side, min_side=min_side)
            except ImageLoadError:
                raise
            except Exception as exc:  # noqa: BLE001 - decoder errors on untrusted data
                raise ImageLoadError(f"{name} is truncated or corrupt: {exc}") from exc


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int, min_side: int | None = None) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageLoadError(f"{name} has an empty size {w}x{h}")
    if min_side is not None and min(w, h) < min_side:
        raise ImageLoadError(
            f"{name} is {w}x{h} pixels, too small: images need at least {min_side} pixels on each side"
        )
    if w * h > max_pixels:
        raise ImageLoadError(
            f"{name} is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,}; "
            f"downscale it first or raise max_pixels"
        )


def _finish(img: Image.Image, name: str, *, max_pixels: int, max_side: int | None, min_side: int | None) -> Image.Image:
    """Loaded image of any mode -> upright RGB copy, optionally downscaled."""
    _check_pixels(img.size, name, max_pixels, min_side)
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 - malformed EXIF in untrusted files
        raise ImageLoadError(f"{name} has unreadable EXIF metadata: {exc}") from exc
    rgb = _to_rgb(upright if upright is not None else img, name)
    if rgb is img:
        rgb = img.copy()  # never hand back the caller's object or an image tied to an open file
    if max_side is not None:
        rgb = resize_max_side(rgb, max_side)
    return rgb


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(img), mode)).convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - exotic modes Pillow cannot convert
        raise ImageLoadError(f"{name}: cannot convert colour mode {mode!r} to RGB: {exc}") from exc


def _high_depth_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    # Pillow's own convert() clips 16-bit values at 255, which turns most photos white.
    a = arr.astype(np.float64)
    if mode == "F":
        scale = 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else 1.0
    else:
        # "I" images usually hold 16-bit samples; only rescale when values exceed 8 bits.
        scale = 1.0 / 257.0 if (mode.startswith("I;16") or np.max(a, initial=0) > 255) else 1.0
    return np.clip(np.nan_to_num(a * scale), 0, 255).round().astype(np.uint8)


# -- geometry -------------------------------------------------------------------------------
def resize_max_side(img: Image.Image, max_side: int) -> Image.Image:
    """Downscale (Lanczos, aspect kept) so the longer side is at most ``max_side``.

    Returns ``img`` itself when it is already small enough; never upscales.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # reducing_gap first shrinks by an integer factor with a box filter: much faster on big
    # photos and visually identical to a pure Lanczos at a gap of 3.
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` and crop the centre square (``size`` x ``size``).

    The fixed preprocessing of training crops and FID/KID evaluation. Done in one Lanczos
    resample over the centre square, so no detail is lost to a second interpolation.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return img.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))


def list_images(paths: str | os.PathLike | Iterable[str | os.PathLike], *, recursive: bool = True) -> list[Path]:
    """Image files named by ``paths`` (files, or folders searched for image extensions).

    Returns a sorted, de-duplicated list, so runs over the same folders see the same order.
    Hidden files (``.name``, e.g. macOS ``._photo.jpg``) inside folders are skipped.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a named file has no image extension, or a folder holds no images.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        if path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(
                    f"{path} is not an image file (expected one of {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            found.add(path)
            continue
        pattern = path.rglob("*") if recursive else path.glob("*")
        images = [
            p for p in pattern
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
        ]
        if not images:
            raise ValueError(
                f"{path} holds no images (looked {'recursively ' if recursive else ''}for "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        found.update(images)
    return sorted(found)


# -- pixels <-> tensors ---------------------------------------------------------------------
def to_tensor(images: Image.Image | Sequence[Image.Image] | np.ndarray, *, channels_last: bool = False) -> torch.Tensor:
    """RGB pixels -> ``(N, 3, H, W)`` float32 in ``[-1, 1]``.

    Accepts an RGB ``PIL.Image``, a list of same-size RGB images, or uint8 numpy of shape
    ``(H, W, 3)`` or ``(N, H, W, 3)``. ``channels_last=True`` returns the tensor in
    ``torch.channels_last`` memory format, which is how the pixels already lie: one copy fewer
    for a network that runs channels-last anyway (the video pipeline).
    """
    if isinstance(images, Image.Image):
        arr = _pil_array(images)[None]
    elif isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels, got dtype {images.dtype}")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 pixels of shape (H, W, 3) or (N, H, W, 3), got {images.shape}")
        arr = images
    elif isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("expected at least one image, got an empty list")
        sizes = {im.size for im in images if isinstance(im, Image.Image)}
        if len(sizes) != 1 or not all(isinstance(im, Image.Image) for im in images):
            raise ValueError(f"expected PIL images of one size, got sizes {sorted(sizes)}")
        arr = np.stack([_pil_array(im) for im in images])
    else:
        raise TypeError(f"expected a PIL image, a list of them or a uint8 array, got {type(images).__name__}")
    if arr.shape[1] < 1 or arr.shape[2] < 1:
        raise ValueError(f"expected a non-empty image, got shape {arr.shape}")
    if not arr.flags.writeable:
        arr = arr.copy()
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)  # NHWC memory, NCHW view
    x = x.to(torch.float32).div_(127.5).sub_(1.0)  # keeps the NHWC strides
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _pil_array(img: Image.Image) -> np.ndarray:
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode!r} (load it with load_image)")
    return np.array(img)  # a writable copy: torch refuses to wrap read-only memory silently


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` or ``(3, H, W)`` in ``[-1, 1]`` -> uint8 ``(N, H, W, 3)`` (rounded, clamped)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"expected a (N, 3, H, W) or (3, H, W) tensor in [-1, 1], got shape {tuple(t.shape)}")
    t = t.detach().to("cpu", torch.float32)
    # A finite sum proves every value finite, and costs a fifth of isfinite(t).all() (no bool
    # tensor); only when it is not (NaN, inf, or an overflowing sum) is each value checked.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError("the image tensor contains NaN or infinite values")
    u8 = (t.clamp(-1.0, 1.0) + 1.0).mul_(127.5).round_().to(torch.uint8)
    return np.ascontiguousarray(u8.permute(0, 2, 3, 1).numpy())


def to_pil(t: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` or ``(1, 3, H, W)`` in ``[-1, 1]`` -> RGB ``PIL.Image``."""
    if isinstance(t, torch.Tensor) and t.ndim == 4 and t.shape[0] != 1:
        raise ValueError(f"to_pil takes one image, got a batch of shape {tuple(t.shape)}")
    return Image.fromarray(to_uint8(t)[0])
