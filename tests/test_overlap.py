"""Shots shared between training and held-out frames (ghibli_core.data.overlap, ``prepare overlap``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ghibli_core.cli import main
from ghibli_core.data.overlap import pairs_sheet, shared_shots, signature

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ghibli_frames"


def scene(seed: int, size=(160, 90)) -> Image.Image:
    """A random 'shot': smooth blobs of colour (structure at the thumbnail's scale)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (6, 10, 3)).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def recut(im: Image.Image) -> Image.Image:
    """The same shot as a compilation shows it: brighter, lower contrast, a caption, re-encoded."""
    a = np.asarray(im, np.float32) * 0.8 + 30
    out = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    ImageDraw.Draw(out).rectangle((65, 78, 95, 82), fill=(255, 255, 255))
    return out


def test_signature_ignores_brightness_and_contrast():
    im = scene(0)
    a, b = signature(im), signature(Image.fromarray((np.asarray(im) * 0.5 + 60).astype(np.uint8)))
    assert a.shape == (32 * 18,) and abs(a.mean()) < 1e-4 and abs(a.std() - 1) < 1e-3
    assert a @ b / a.size > 0.99
    assert not signature(Image.new("RGB", (64, 36), (40, 80, 120))).any()  # a flat frame matches nothing


def test_shared_shots_finds_the_recut_shot_and_nothing_else(tmp_path):
    train = []
    for i in range(8):
        p = tmp_path / f"train{i}.png"
        scene(i).save(p)
        train.append(p)
    held = []
    for name, im in [("same", recut(scene(3))), ("other", scene(100)), ("another", scene(101))]:
        p = tmp_path / f"{name}.png"
        im.save(p)
        held.append(p)
    shots = shared_shots(train, held)
    assert [(s.held_out.name, s.training.name) for s in shots] == [("same.png", "train3.png")]
    assert shots[0].correlation > 0.9
    # a threshold below the unrelated shots' correlations finds them too, most similar first
    every = shared_shots(train, held, threshold=-1)
    assert len(every) == 3 and every[0].held_out.name == "same.png"
    assert [s.correlation for s in every] == sorted((s.correlation for s in every), reverse=True)
    sheet = pairs_sheet(shots, tmp_path / "pairs.png", width=64)
    assert Image.open(sheet).size == (128, 36)
    with pytest.raises(ValueError, match="correlation"):
        shared_shots(train, held, threshold=1.5)


def _films(root: Path) -> None:
    for film, seeds in [("film_a", [0, 1, 2]), ("compilation", [10, 11])]:
        (root / film).mkdir(parents=True)
        for s in seeds:
            scene(s).save(root / film / f"{s}.jpg", quality=90)
    recut(scene(1)).save(root / "compilation" / "1x.jpg", quality=90)  # film_a's shot 1, recut


def test_cli_overlap_prints_the_shared_shots_and_the_exclude_arguments(tmp_path, capsys):
    _films(tmp_path / "frames")
    assert main(["prepare", "overlap", str(tmp_path / "frames"), "--held-out", "film_a",
                 "--json", str(tmp_path / "o.json"), "--sheet", str(tmp_path / "o.png")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 of 3 held-out frames share a shot with one of the 3 training frames")
    assert "film_a/1.jpg  compilation/1x.jpg" in out
    assert "evaluate ... --exclude film_a/1.jpg\n" in out and "train ... --exclude compilation/1x.jpg" in out
    data = json.loads((tmp_path / "o.json").read_text())
    assert data["shared"][0]["held_out"] == "film_a/1.jpg" and data["training_frames"] == 3
    assert Image.open(tmp_path / "o.png").size == (512, 144)
    assert main(["prepare", "overlap", str(tmp_path / "frames"), "--held-out", "film_a,nope"]) == 2
    assert "nope: no such sub-folder" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/ghibli_frames is not there")
@pytest.mark.slow  # reads 1636 frames: about 40 s
def test_the_shared_compilations_repeat_shots_of_the_held_out_films(capsys):
    assert main(["prepare", "overlap", str(SHARED), "--held-out",
                 "howls_moving_castle,kikis_delivery_service,ponyo"]) == 0
    out = capsys.readouterr().out
    count = int(out.split(" of ")[0])
    assert count >= 7 and "howls_moving_castle/1789.jpg  compilation_5/40830.jpg" in out
