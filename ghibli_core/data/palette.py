"""Colour palettes of images: K-means in HSL, warmth, grouping, contact sheets.

Per image (:class:`PaletteAnalyzer`): the image is reduced to a small thumbnail and its pixels
are clustered with scikit-learn's ``KMeans`` in HSL. Hue is an angle, so pixels are clustered
in the HSL *bicone* (``x, y = C cos H, C sin H``, ``z = L``, with chroma
``C = S (1 - |2L - 1|)``): reds at 5 and 355 degrees are neighbours, and the hue of a near-grey
or near-black pixel, which means nothing, barely counts. Each cluster becomes a palette colour
(the mean RGB of its pixels) with its share of the pixels.

Scores, all in [0, 1]:

- ``warmth``: the share of warm hues, each pixel weighted by its saturation and lightness,
  ``S (1 - |2L - 1|)^2``: vivid mid-tones count fully, greys and near-blacks or near-whites
  (whose hue is noise) hardly at all. A hue's warmth is ``(1 + cos(H - 30 deg)) / 2``: 1 for
  orange, ~0.93 for red and yellow, 0.5 for green and magenta, 0 for azure (210 deg). A small
  neutral prior (a weight of 0.02 per pixel at 0.5) keeps near-grey images near 0.5 instead of
  at the whim of a tint.
- ``brightness``: mean HSL lightness.
- ``saturation``: mean chroma ``C`` (colourfulness; HSL's own S is high for near-black
  pixels with any tint, so it is not used raw).

Grouping (:func:`group_palettes`): each palette becomes a fixed-length "bag of colours" (its
shares spread over 28 anchor colours of the bicone with a Gaussian kernel: 4 greys and 12
hues at two lightness levels), and KMeans clusters those vectors into ``groups``. Groups are
numbered by mean warmth, coolest first, so ``group=0`` is the coolest and the highest group
the warmest.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "Palette",
    "PaletteAnalyzer",
    "analyse_files",
    "contact_sheet",
    "group_palettes",
    "hsl_to_rgb",
    "palette_features",
    "rgb_to_hsl",
    "warmth_of",
]

_PRIOR = 0.02  # neutral chroma weight per pixel (see the module notes)


# -- colour spaces ------------------------------------------------------------------------------
def rgb_to_hsl(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(..., 3)`` -> float32 HSL ``(..., 3)``: H in degrees [0, 360), S and L in [0, 1]."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB pixels (..., 3), got {rgb.dtype} {rgb.shape}")
    flat = rgb.reshape(-1, 1, 3).astype(np.float32) / 255.0
    hls = cv2.cvtColor(flat, cv2.COLOR_RGB2HLS).reshape(rgb.shape)  # OpenCV order: H, L, S
    hsl = hls[..., [0, 2, 1]]
    hsl[..., 0] %= 360.0
    return hsl


def hsl_to_rgb(hsl: np.ndarray) -> np.ndarray:
    """float HSL ``(..., 3)`` (H degrees, S and L in [0, 1]) -> uint8 RGB ``(..., 3)``."""
    hsl = np.asarray(hsl, np.float32)
    hls = np.stack([hsl[..., 0] % 360.0, np.clip(hsl[..., 2], 0, 1), np.clip(hsl[..., 1], 0, 1)], axis=-1)
    rgb = cv2.cvtColor(hls.reshape(-1, 1, 3), cv2.COLOR_HLS2RGB).reshape(hsl.shape)
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def _bicone(hsl: np.ndarray) -> np.ndarray:
    """HSL ``(N, 3)`` -> ``(N, 3)`` points ``(C cos H, C sin H, L)``."""
    h = np.deg2rad(hsl[:, 0])
    c = hsl[:, 1] * (1.0 - np.abs(2.0 * hsl[:, 2] - 1.0))
    return np.stack([c * np.cos(h), c * np.sin(h), hsl[:, 2]], axis=1).astype(np.float32)


def _hue_warmth(h_deg: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.cos(np.deg2rad(h_deg - 30.0)))


def warmth_of(hsl: np.ndarray) -> float:
    """Chroma-weighted share of warm hues of HSL pixels ``(N, 3)`` (see the module notes)."""
    hsl = np.asarray(hsl, np.float32).reshape(-1, 3)
    w = hsl[:, 1] * (1.0 - np.abs(2.0 * hsl[:, 2] - 1.0)) ** 2
    prior = _PRIOR * len(hsl)
    return float((np.sum(w * _hue_warmth(hsl[:, 0])) + 0.5 * prior) / (np.sum(w) + prior))


# -- one image ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Palette:
    """An image's dominant colours and scores.

    ``colors``: uint8 ``(k, 3)`` RGB, most common first; ``shares``: ``(k,)`` fractions of the
    pixels, summing to 1; ``warmth``, ``brightness``, ``saturation`` in [0, 1].
    """

    colors: np.ndarray
    shares: np.ndarray
    warmth: float
    brightness: float
    saturation: float

    @property
    def hsl(self) -> np.ndarray:
        return rgb_to_hsl(self.colors)

    def to_record(self) -> dict:
        """The manifest fields: ``palette`` (``[["#rrggbb", share], ...]``), the three scores."""
        return {
            "palette": [["#%02x%02x%02x" % tuple(int(v) for v in c), round(float(s), 4)]
                        for c, s in zip(self.colors, self.shares)],
            "warmth": round(self.warmth, 4),
            "brightness": round(self.brightness, 4),
            "saturation": round(self.saturation, 4),
        }

    @classmethod
    def from_record(cls, record: dict) -> "Palette":
        try:
            colors = np.array([[int(h[i : i + 2], 16) for i in (1, 3, 5)] for h, _ in record["palette"]], np.uint8)
            shares = np.array([s for _, s in record["palette"]], np.float64)
            scores = (float(record["warmth"]), float(record["brightness"]), float(record["saturation"]))
            return cls(colors, shares, *scores)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"record {record.get('file')!r} has no valid palette: {exc}") from None


@dataclass
class PaletteAnalyzer:
    """K-means palette of one image.

    Args:
        k: palette size (clusters).
        pixels: pixels sampled from the thumbnail for clustering (a fixed, seeded subset).
        thumb: the image's long side is reduced to this before sampling (colours, not
            detail, matter here; small thumbnails make a thousand images take seconds).
        seed: seeds the pixel subset and KMeans, so results are reproducible.
    """

    k: int = 5
    pixels: int = 2000
    thumb: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 32:
            raise ValueError(f"k must be between 1 and 32, got {self.k}")
        if self.pixels < self.k or self.thumb < 4:
            raise ValueError(f"pixels ({self.pixels}) must be at least k and thumb ({self.thumb}) at least 4")

    def settings(self) -> dict:
        return {"k": self.k, "pixels": self.pixels, "thumb": self.thumb, "seed": self.seed}

    def __call__(self, image: Image.Image | np.ndarray) -> Palette:
        """Palette of an RGB ``PIL.Image`` or uint8 ``(H, W, 3)`` array."""
        from sklearn.cluster import KMeans

        if isinstance(image, Image.Image):
            if image.mode != "RGB":
                raise ValueError(f"expected an RGB image (load it with load_image), got mode {image.mode!r}")
            if max(image.size) > self.thumb:
                image = image.copy()
                image.thumbnail((self.thumb, self.thumb), Image.Resampling.BILINEAR, reducing_gap=2.0)
            rgb = np.asarray(image)
        else:
            rgb = np.asarray(image)
            if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
                raise ValueError(f"expected uint8 RGB pixels of shape (H, W, 3), got {rgb.dtype} {rgb.shape}")
            h, w = rgb.shape[:2]
            if max(h, w) > self.thumb:
                s = self.thumb / max(h, w)
                rgb = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        px = rgb.reshape(-1, 3)
        if len(px) > self.pixels:
            rng = np.random.default_rng(self.seed)
            px = px[np.sort(rng.choice(len(px), self.pixels, replace=False))]
        hsl = rgb_to_hsl(px)
        k = min(self.k, len(np.unique(px, axis=0)))
        if k == 1:
            labels = np.zeros(len(px), np.int64)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "fewer distinct clusters than k" on near-flat images
                labels = KMeans(n_clusters=k, n_init=3, max_iter=100, random_state=self.seed).fit_predict(_bicone(hsl))
        counts = np.bincount(labels, minlength=k)
        order = [j for j in np.argsort(-counts, kind="stable") if counts[j] > 0]
        colors = np.stack([px[labels == j].mean(axis=0) for j in order]).round().astype(np.uint8)
        shares = counts[order] / counts.sum()
        chroma = hsl[:, 1] * (1.0 - np.abs(2.0 * hsl[:, 2] - 1.0))
        return Palette(
            colors=colors,
            shares=shares,
            warmth=warmth_of(hsl),
            brightness=float(hsl[:, 2].mean()),
            saturation=float(chroma.mean()),
        )


# -- many images --------------------------------------------------------------------------------
def _anchors() -> np.ndarray:
    greys = [(0.0, 0.0, L) for L in (0.1, 0.35, 0.65, 0.9)]
    hues = [
        (0.3 * math.cos(math.radians(h)), 0.3 * math.sin(math.radians(h)), L)
        for L in (0.35, 0.65) for h in range(0, 360, 30)
    ]
    return np.array(greys + hues, np.float32)


_ANCHORS = _anchors()
_SIGMA = 0.15


def palette_features(palettes: Sequence[Palette]) -> np.ndarray:
    """``(N, 28)`` bag-of-colours vectors (rows sum to 1) for :func:`group_palettes`."""
    feats = np.zeros((len(palettes), len(_ANCHORS)), np.float64)
    for i, p in enumerate(palettes):
        pts = _bicone(rgb_to_hsl(p.colors).reshape(-1, 3))
        d2 = ((pts[:, None, :] - _ANCHORS[None, :, :]) ** 2).sum(-1)
        w = np.exp(-d2 / (2 * _SIGMA**2))
        w /= w.sum(axis=1, keepdims=True) + 1e-12
        feats[i] = (p.shares[:, None] * w).sum(0)
    return feats


def group_palettes(palettes: Sequence[Palette], *, groups: int, seed: int = 0) -> np.ndarray:
    """Cluster palettes into ``groups`` (KMeans on :func:`palette_features`).

    Returns ``(N,)`` int labels; group 0 has the lowest mean warmth, the last the highest.
    Fewer groups come out when there are fewer distinct palettes.
    """
    from sklearn.cluster import KMeans

    if groups < 1:
        raise ValueError(f"groups must be at least 1, got {groups}")
    n = len(palettes)
    if n == 0:
        return np.zeros(0, np.int64)
    feats = palette_features(palettes)
    # sqrt: the Hellinger embedding of a distribution, so small shares still count
    x = np.sqrt(feats)
    g = min(groups, len(np.unique(x.round(6), axis=0)))
    if g <= 1:
        return np.zeros(n, np.int64)
    labels = KMeans(n_clusters=g, n_init=10, random_state=seed).fit_predict(x)
    warmth = np.array([p.warmth for p in palettes])
    order = sorted(range(g), key=lambda j: (warmth[labels == j].mean(), j))
    rank = {j: r for r, j in enumerate(order)}
    return np.array([rank[j] for j in labels], np.int64)


def _analyse_one(args: tuple[str, PaletteAnalyzer]) -> Palette | str:
    from ..imaging import ImageLoadError, load_image

    path, analyzer = args
    try:
        # max_side: JPEGs decode straight at 1/2..1/8 scale (draft mode), the slow part skipped
        return analyzer(load_image(path, max_side=analyzer.thumb))
    except ImageLoadError as exc:
        return str(exc)


def analyse_files(
    paths: Sequence[str | os.PathLike], analyzer: PaletteAnalyzer, *, workers: int = 1
) -> Iterator[tuple[int, Palette | str]]:
    """``(i, palette)`` for each image path, in order; ``(i, message)`` for unreadable ones.

    ``workers > 1`` spreads the images over processes (forked, one BLAS/OpenMP thread each).
    """
    jobs = [(str(p), analyzer) for p in paths]
    if workers <= 1 or len(jobs) < 64:
        for i, job in enumerate(jobs):
            yield i, _analyse_one(job)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_single_thread) as pool:
        yield from enumerate(pool.imap(_analyse_one, jobs, chunksize=16))


def _single_thread() -> None:
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - a scikit-learn dependency, always there
        pass
    os.environ["OMP_NUM_THREADS"] = "1"


# -- contact sheets -----------------------------------------------------------------------------
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def contact_sheet(
    items: Sequence[tuple[Image.Image, Palette]],
    *,
    title: str = "",
    thumb: int = 128,
    columns: int = 8,
    swatch: int = 14,
    labels: Sequence[str] | None = None,
) -> Image.Image:
    """A grid of thumbnails, each with its palette as a strip of swatches underneath.

    Swatch widths are the colours' shares. ``labels`` (optional) are printed under each strip
    (e.g. the warmth); ``title`` heads the sheet. Returns an RGB image.
    """
    if not items:
        raise ValueError("a contact sheet needs at least one image")
    if labels is not None and len(labels) != len(items):
        raise ValueError(f"got {len(labels)} labels for {len(items)} images")
    thumbs = []
    for img, _ in items:
        t = img.convert("RGB").copy()
        t.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
        thumbs.append(t)
    pad, text_h = 6, (12 if labels is not None else 0)
    title_h = 26 if title else 0
    cols = max(1, min(columns, len(items)))
    rows = math.ceil(len(items) / cols)
    area_h = max(t.height for t in thumbs)  # wide frames get short cells, not letterboxed squares
    cell_w, cell_h = thumb + pad, area_h + swatch + text_h + 2 * pad
    sheet = Image.new("RGB", (pad + cols * cell_w, title_h + pad + rows * cell_h), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 5), title, fill=(235, 235, 235), font=_font(16))
    small = _font(10)
    for i, (t, (_, pal)) in enumerate(zip(thumbs, items)):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * cell_w, title_h + pad + r * cell_h
        sheet.paste(t, (x0 + (thumb - t.width) // 2, y0 + (area_h - t.height) // 2))
        sy = y0 + area_h + 2
        edges = np.concatenate([[0.0], np.cumsum(pal.shares)])
        edges = np.round(edges / edges[-1] * thumb).astype(int)
        for j, color in enumerate(pal.colors):
            if edges[j + 1] > edges[j]:
                draw.rectangle([x0 + edges[j], sy, x0 + edges[j + 1] - 1, sy + swatch - 1],
                               fill=tuple(int(v) for v in color))
        if labels is not None:
            draw.text((x0, sy + swatch + 1), labels[i], fill=(200, 200, 200), font=small)
    return sheet


def sheet_path(folder: str | os.PathLike, group: int) -> Path:
    return Path(folder) / "contact_sheets" / f"group_{group:02d}.png"
