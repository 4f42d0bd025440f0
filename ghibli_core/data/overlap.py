"""Shots shared between a training set and a held-out set of frames.

Film frames collected from trailers and compilations repeat shots across folders: a compilation
holds shots of the very films kept out of training for evaluation. In ``../shared``, 11 of the
110 frames of the three held-out films correlate above 0.85 (the default threshold) with a
training frame, all 11 the same shot by eye; between 0.78 and 0.85 are two more of the same shot
under a subtitle, two of the same scene a moment apart, and one unrelated frame (0.81). A metric
measured on such frames rewards memorising training frames, so before trusting a "held-out"
figure, find the shared shots and drop them from one side (lower ``threshold`` to catch more at
the cost of some unrelated frames).

The signature of a frame is its grey thumbnail (``side`` x ``side * 9 // 16``, box-filtered:
bars, captions and small re-encodes barely move it), made zero-mean and unit-variance; two
frames' similarity is the Pearson correlation of their signatures. Perceptual hashes (the
clean-up's duplicate test) spread too widely on these pairs to serve (2 to 14 of 64 bits for
eye-checked same shots, a caption or a letterbox on one side).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..imaging import load_image


@dataclass(frozen=True)
class SharedShot:
    """A held-out frame and its most similar training frame."""

    held_out: Path
    training: Path
    correlation: float


def signature(image: Image.Image, side: int = 32) -> np.ndarray:
    """A frame's grey thumbnail, zero-mean and unit-variance, flattened (a flat frame gives zeros)."""
    if side < 4:
        raise ValueError(f"signature side must be at least 4, got {side}")
    grey = image.convert("L").resize((side, max(1, side * 9 // 16)), Image.Resampling.BOX)
    a = np.asarray(grey, np.float32).ravel()
    a = a - a.mean()
    std = a.std()
    return a / std if std > 1e-3 else np.zeros_like(a)


def signatures(paths: Sequence[Path], *, side: int = 32, progress: bool = False) -> np.ndarray:
    """``(len(paths), D)`` signatures of image files (``load_image`` names a file it cannot read)."""
    from tqdm.auto import tqdm

    rows = [signature(load_image(p), side) for p in tqdm(paths, desc="signatures", unit="img", disable=not progress)]
    return np.stack(rows) if rows else np.zeros((0, side * max(1, side * 9 // 16)), np.float32)


def shared_shots(
    training: Sequence[Path],
    held_out: Sequence[Path],
    *,
    threshold: float = 0.85,
    side: int = 32,
    progress: bool = False,
) -> list[SharedShot]:
    """Held-out frames whose nearest training frame correlates above ``threshold``, most similar first."""
    if not -1 <= threshold <= 1:
        raise ValueError(f"threshold is a correlation, in [-1, 1]; got {threshold}")
    if not training or not held_out:
        return []
    t = signatures(training, side=side, progress=progress)
    h = signatures(held_out, side=side, progress=progress)
    corr = h @ t.T / t.shape[1]  # (held-out, training)
    best, idx = corr.max(1), corr.argmax(1)
    found = [SharedShot(Path(held_out[i]), Path(training[idx[i]]), float(best[i]))
             for i in range(len(held_out)) if best[i] > threshold]
    return sorted(found, key=lambda s: -s.correlation)


def pairs_sheet(shots: Sequence[SharedShot], out: Path, *, width: int = 256) -> Path:
    """A PNG with one row per shared shot: held-out frame | training frame."""
    if not shots:
        raise ValueError("no shared shots to draw")
    height = width * 9 // 16
    sheet = Image.new("RGB", (2 * width, len(shots) * height))
    for row, shot in enumerate(shots):
        for col, path in enumerate((shot.held_out, shot.training)):
            sheet.paste(load_image(path).convert("RGB").resize((width, height), Image.Resampling.LANCZOS),
                        (col * width, row * height))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
