"""Training data: image folders resized once, and deterministic random crops.

Randomness here never touches global RNGs: every sample's crop, flip and pairing derive from
``(seed, sample index)``, so a resumed run draws exactly the samples it would have drawn, on any
number of processes.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..imaging import list_images, load_image, to_tensor


def select_images(
    roots: Sequence[str | Path],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    where: Sequence[str] = (),
) -> list[Path]:
    """Images under ``roots`` whose path relative to its root matches the filters.

    A root is a folder of images, or a manifest made by ``prepare`` (a ``.jsonl`` file, or a
    folder holding ``manifest.jsonl``, whose records then are the images). ``include``/
    ``exclude`` are glob patterns (``howls_moving_castle/*``); a path is kept when it matches
    any include pattern (or there are none) and no exclude pattern; with a manifest they match
    a record's ``file`` or ``source``. ``where`` holds manifest filters (``warmth>0.6``,
    ``studio=ghibli``, see :func:`ghibli_core.data.manifest.parse_where`), all of which must hold.
    """
    from .manifest import find_manifest, select_paths

    kept: list[Path] = []
    for root in roots:
        root = Path(root)
        manifest = find_manifest(root)
        if manifest is not None:
            kept.extend(select_paths(manifest, where=where, include=include, exclude=exclude))
            continue
        if where:
            raise ValueError(
                f"{root}: --where filters need a manifest.jsonl, and there is none here; make one with "
                f"`python -m ghibli_core prepare palette {root} --out DIR` and train on DIR"
            )
        for path in list_images([root]):
            rel = path.relative_to(root).as_posix() if root.is_dir() else path.name
            if include and not any(fnmatch.fnmatch(rel, p) for p in include):
                continue
            if any(fnmatch.fnmatch(rel, p) for p in exclude):
                continue
            kept.append(path)
    if not kept:
        raise ValueError(
            f"no images left in {', '.join(map(str, roots))} after filters include={list(include)} "
            f"exclude={list(exclude)}" + (f" where={list(where)}" if where else "")
        )
    return kept


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    return img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)


class ImageSet:
    """Images resized so their short side is ``load_size``, held as uint8 ``(H, W, 3)`` arrays.

    Args:
        paths: image files.
        load_size: short side after resizing (the crop is taken from this).
        preload: decode everything once up front (fast training on small sets); otherwise
            decode on every access.
        progress: show a progress bar while preloading.
    """

    def __init__(self, paths: Sequence[Path], *, load_size: int, preload: bool = True, progress: bool = True):
        if not paths:
            raise ValueError("ImageSet needs at least one image")
        self.paths = list(paths)
        self.load_size = load_size
        self._cache: list[np.ndarray] | None = None
        if preload:
            self._cache = [self._load(p) for p in tqdm(self.paths, desc="loading images", disable=not progress, leave=False)]

    def _load(self, path: Path) -> np.ndarray:
        return np.asarray(resize_short_side(load_image(path), self.load_size))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self._cache[i] if self._cache is not None else self._load(self.paths[i])


def random_crop(img: np.ndarray, size: int, generator: torch.Generator, *, flip: bool = True) -> torch.Tensor:
    """A random ``size`` crop (and horizontal flip) of a uint8 HWC image.

    Returns ``(3, size, size)`` float32 in ``[-1, 1]``.
    """
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image of {w}x{h} is smaller than the crop size {size}")
    top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
    patch = img[top : top + size, left : left + size]
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        patch = patch[:, ::-1]
    return to_tensor(np.ascontiguousarray(patch))[0]


class UnpairedCrops(torch.utils.data.Dataset):
    """Sample ``k`` -> (crop of an A image, crop of an unrelated B image).

    Domain A is walked in a fresh seeded permutation each epoch; domain B is drawn from its own
    permutation stream, so pairs change from epoch to epoch (unpaired training).
    """

    def __init__(self, set_a: ImageSet, set_b: ImageSet, *, crop_size: int, seed: int, flip: bool = True):
        self.a, self.b = set_a, set_b
        self.crop_size, self.seed, self.flip = crop_size, seed, flip
        self._perms: dict[tuple[str, int], torch.Tensor] = {}

    def __len__(self) -> int:  # the index space is unbounded; this is one epoch of A
        return len(self.a)

    def _perm(self, domain: str, n: int, epoch: int) -> torch.Tensor:
        key = (domain, epoch)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            # arithmetic, not hash(): str hashes change from process to process
            stream = 2 * epoch + (domain == "b")
            g = torch.Generator().manual_seed((self.seed * 7_919_001 + stream * 104_729 + 17) & 0x7FFF_FFFF_FFFF)
            self._perms[key] = torch.randperm(n, generator=g)
        return self._perms[key]

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        ia = int(self._perm("a", len(self.a), k // len(self.a))[k % len(self.a)])
        # B walks its own permutation with a stride that is coprime-ish with len(A), so
        # the same A image meets different B images in different epochs.
        kb = k * 7919
        ib = int(self._perm("b", len(self.b), kb // len(self.b))[kb % len(self.b)])
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + k) & 0x7FFF_FFFF_FFFF)
        return (
            random_crop(self.a[ia], self.crop_size, g, flip=self.flip),
            random_crop(self.b[ib], self.crop_size, g, flip=self.flip),
        )


class StepBatches(torch.utils.data.Sampler):
    """Batches of sample indices for steps ``start .. stop-1`` of one process.

    Process ``rank`` of ``world`` takes ``batch_size`` consecutive indices of each step's
    ``world * batch_size`` block, so processes never see the same sample in a step.
    """

    def __init__(self, *, start: int, stop: int, batch_size: int, rank: int = 0, world: int = 1):
        self.start, self.stop, self.batch_size, self.rank, self.world = start, stop, batch_size, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            base = (step * self.world + self.rank) * self.batch_size
            yield list(range(base, base + self.batch_size))


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixing integers (no Python ``hash``: it differs between processes)."""
    state = np.random.SeedSequence([int(p) & 0xFFFF_FFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


class SquareCrops(torch.utils.data.Dataset):
    """Sample ``k`` -> a square crop (random or central, maybe flipped), fixed by ``(seed, k)``.

    Walks the images in a fresh seeded permutation each epoch. Returns ``(3, size, size)``
    float32 in [-1, 1].
    """

    def __init__(self, images: ImageSet, *, size: int, seed: int, mirror: bool = True, center: bool = False):
        self.images, self.size, self.seed, self.mirror, self.center = images, size, seed, mirror, center
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> torch.Tensor:
        n = len(self.images)
        epoch = k // n
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 101))
            self._perm = (epoch, torch.randperm(n, generator=g))
        img = self.images[int(self._perm[1][k % n])]
        g = torch.Generator().manual_seed(mix_seed(self.seed, k, 102))
        if not self.center:
            return random_crop(img, self.size, g, flip=self.mirror)
        h, w = img.shape[:2]
        top, left = (h - self.size) // 2, (w - self.size) // 2
        patch = img[top : top + self.size, left : left + self.size]
        if self.mirror and bool(torch.rand((), generator=g) < 0.5):
            patch = patch[:, ::-1]
        return to_tensor(np.ascontiguousarray(patch))[0]
