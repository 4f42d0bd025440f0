"""HSL K-means palettes, warmth, grouping and contact sheets (ghibli_core.data.palette, ``prepare palette``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ghibli_core.cli import main
from ghibli_core.data.datasets import select_images
from ghibli_core.data.manifest import Manifest
from ghibli_core.data.palette import (
    Palette,
    PaletteAnalyzer,
    analyse_files,
    contact_sheet,
    group_palettes,
    hsl_to_rgb,
    rgb_to_hsl,
    warmth_of,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ghibli_frames"


def hsl_image(h, s, l, size=(48, 32)) -> np.ndarray:
    return hsl_to_rgb(np.broadcast_to(np.array([h, s, l], np.float32), (size[1], size[0], 3)).copy())


def noisy(hue: float, seed: int, size=(64, 48)) -> Image.Image:
    """A textured image around one hue (+-15 degrees, varied lightness and saturation)."""
    rng = np.random.default_rng(seed)
    h = (hue + rng.uniform(-15, 15, (size[1], size[0]))) % 360
    s = rng.uniform(0.5, 0.9, h.shape)
    l = rng.uniform(0.3, 0.7, h.shape)
    return Image.fromarray(hsl_to_rgb(np.stack([h, s, l], -1)))


def test_hsl_round_trip_and_ranges():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (500, 3), dtype=np.uint8)
    hsl = rgb_to_hsl(rgb)
    assert hsl[:, 0].min() >= 0 and hsl[:, 0].max() < 360 and hsl[:, 1:].min() >= 0 and hsl[:, 1:].max() <= 1
    assert np.abs(hsl_to_rgb(hsl).astype(int) - rgb).max() <= 1
    np.testing.assert_allclose(rgb_to_hsl(np.array([[255, 0, 0], [0, 0, 255], [128, 128, 128]], np.uint8)),
                               [[0, 1, 1 / 2], [240, 1, 1 / 2], [0, 0, 128 / 255]], atol=1e-3)


def test_warmth_orange_red_yellow_warm_blue_cool_grey_neutral():
    def w(h, s=0.8, l=0.5):
        return warmth_of(rgb_to_hsl(hsl_image(h, s, l)))

    assert w(30) > 0.95 and w(0) > 0.85 and w(60) > 0.85
    assert w(210) < 0.05 and w(240) < 0.15
    assert abs(w(120) - 0.5) < 0.05
    assert abs(w(30, s=0.0) - 0.5) < 1e-6  # greys have no warmth either way
    assert abs(w(30, l=0.02) - 0.5) < 0.3 and w(30, l=0.02) < w(30)  # near-black counts little


def test_palette_colours_and_shares():
    img = np.zeros((40, 50, 3), np.uint8)
    img[:, :35] = (200, 80, 40)  # 70 % orange
    img[:, 35:] = (30, 60, 200)  # 30 % blue
    pal = PaletteAnalyzer(k=2)(img)
    np.testing.assert_array_equal(pal.colors, [[200, 80, 40], [30, 60, 200]])
    np.testing.assert_allclose(pal.shares, [0.7, 0.3], atol=0.02)
    assert 0.6 < pal.warmth < 0.8
    assert pal.brightness == pytest.approx(0.7 * rgb_to_hsl(np.uint8([[200, 80, 40]]))[0, 2]
                                           + 0.3 * rgb_to_hsl(np.uint8([[30, 60, 200]]))[0, 2], abs=0.02)
    # a flat image has a one-colour palette, not k copies
    flat = PaletteAnalyzer(k=5)(np.full((20, 20, 3), 90, np.uint8))
    assert len(flat.colors) == 1 and flat.shares[0] == 1.0 and flat.saturation == 0.0
    # records round-trip
    again = Palette.from_record(pal.to_record())
    np.testing.assert_array_equal(again.colors, pal.colors)
    assert again.warmth == pytest.approx(pal.warmth, abs=1e-4)


def test_palette_clusters_hue_as_an_angle():
    # reds on both sides of 0 degrees (355 and 5) are one colour; blue another. Clustering the
    # raw hue number would put 355 with blue (220) rather than with 5.
    img = np.concatenate([hsl_image(355, 0.8, 0.5, (30, 20)), hsl_image(5, 0.8, 0.5, (30, 20)),
                          hsl_image(220, 0.8, 0.5, (60, 20))], axis=1)
    pal = PaletteAnalyzer(k=2)(img)
    hues = rgb_to_hsl(pal.colors)[:, 0]
    assert sorted(np.round(pal.shares, 2)) == [0.5, 0.5]
    assert any(min(h, 360 - h) < 3 for h in hues) and any(abs(h - 220) < 3 for h in hues)


def test_analyzer_is_deterministic_and_accepts_pil(tmp_path):
    img = noisy(40, 1, (200, 150))
    a, b = PaletteAnalyzer(seed=3)(img), PaletteAnalyzer(seed=3)(np.asarray(img))
    assert a.warmth == pytest.approx(b.warmth, abs=0.02)
    c = PaletteAnalyzer(seed=3)(img)
    np.testing.assert_array_equal(a.colors, c.colors)
    with pytest.raises(ValueError, match="RGB"):
        PaletteAnalyzer()(img.convert("L"))
    with pytest.raises(ValueError, match="k must"):
        PaletteAnalyzer(k=0)


def test_grouping_separates_warm_from_cool_and_numbers_by_warmth():
    imgs = [noisy(h, i) for i, h in enumerate([20, 35, 10, 200, 215, 45, 230, 25, 190, 220])]
    pals = [PaletteAnalyzer()(im) for im in imgs]
    labels = group_palettes(pals, groups=2)
    warm = [p.warmth > 0.5 for p in pals]
    assert list(labels) == [1 if w else 0 for w in warm]  # group 0 coolest, group 1 warmest
    assert len(set(group_palettes(pals[:1], groups=4))) == 1
    with pytest.raises(ValueError):
        group_palettes(pals, groups=0)


def test_contact_sheet_layout_and_swatches():
    pal = Palette(np.uint8([[250, 0, 0], [0, 0, 250]]), np.array([0.75, 0.25]), 0.7, 0.5, 0.5)
    items = [(Image.new("RGB", (160, 90), (0, 200, 0)), pal)] * 3
    sheet = contact_sheet(items, thumb=80, columns=2, swatch=10, labels=["a", "b", "c"], title="t")
    a = np.asarray(sheet)
    # 2 columns x 2 rows of 80 px wide cells; a 16:9 thumbnail is 45 px high, swatches under it
    assert sheet.size == (6 + 2 * 86, 26 + 6 + 2 * (45 + 10 + 12 + 12))
    x0, y0 = 6, 26 + 6
    assert tuple(a[y0 + 20, x0 + 40]) == (0, 200, 0)
    assert tuple(a[y0 + 45 + 2 + 5, x0 + 10]) == (250, 0, 0)  # 75 % red swatch, then blue
    assert tuple(a[y0 + 45 + 2 + 5, x0 + 70]) == (0, 0, 250)
    with pytest.raises(ValueError):
        contact_sheet([])


def test_analyse_files_reports_unreadable(tmp_path):
    good = tmp_path / "a.jpg"
    noisy(30, 0).save(good)
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"junk")
    out = list(analyse_files([good, bad], PaletteAnalyzer()))
    assert isinstance(out[0][1], Palette) and isinstance(out[1][1], str) and "b.jpg" in out[1][1]


def test_cli_palette_on_a_folder(tmp_path, capsys):
    src = tmp_path / "frames"
    for i, hue in enumerate([20, 30, 210, 225, 15, 200]):
        (src / ("warm" if hue < 100 else "cool")).mkdir(parents=True, exist_ok=True)
        noisy(hue, i, (96, 64)).save(src / ("warm" if hue < 100 else "cool") / f"{i}.jpg")
    assert main(["prepare", "palette", str(src), "--groups", "2", "--tag", "studio=test", "--workers", "1"]) == 0
    m = Manifest.load(src)
    assert len(m) == 6
    for r in m:
        assert r["group"] == (1 if r["file"].startswith("warm/") else 0)
        assert len(r["palette"]) == 5 and r["tags"] == {"studio": "test"} and (r["width"], r["height"]) == (96, 64)
    for g in (0, 1):
        with Image.open(src / "contact_sheets" / f"group_{g:02d}.png") as im:
            assert im.width > 100
    card = (src / "README.md").read_text()
    assert "contact_sheets/group_01.png" in card and "studio=test" in card
    # the manifest drives training selection, and the contact sheets are not training images
    assert sorted(p.parent.name for p in select_images([src], where=["warmth>0.6"])) == ["warm"] * 3
    assert len(select_images([src])) == 6
    # a rerun reuses the palettes and only regroups
    before = {r["file"]: r["palette"] for r in m}
    assert main(["prepare", "palette", str(src), "--groups", "3"]) == 0
    out = capsys.readouterr().out
    assert "0 computed" in out
    after = Manifest.load(src)
    assert {r["file"]: r["palette"] for r in after} == before
    assert sorted({r["group"] for r in after}) == [0, 1, 2]
    assert not (src / "contact_sheets" / "group_03.png").exists()
    # a deleted image drops out of the manifest on the next run
    (src / "warm" / "0.jpg").unlink()
    assert main(["prepare", "palette", str(src), "--groups", "2"]) == 0
    assert "warm/0.jpg" not in Manifest.load(src)


def test_cli_palette_groups_warm_and_cool_film_frames(tmp_path):
    from test_frames import COOL, WARM, make_film

    film = make_film(tmp_path / "film.mp4")
    out = tmp_path / "frames"
    assert main(["prepare", "frames", str(film), "--out", str(out), "--size", "64"]) == 0
    # palettes written beside the frames, into the same manifest
    assert main(["prepare", "palette", str(out), "--groups", "2", "--workers", "1"]) == 0
    groups = {r["timestamp"]: r["group"] for r in Manifest.load(out)}
    assert {t for t, g in groups.items() if g == 1} == WARM
    assert {t for t, g in groups.items() if g == 0} == COOL
    state = json.loads((out / ".prepare.json").read_text())
    assert state["palette"]["groups"] == 2 and state["sources"]["film:film"]["complete"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/ghibli_frames is not there (real Ghibli frames)")
def test_palette_grouping_on_real_frames(tmp_path):
    frames = sorted(SHARED.rglob("*.jpg"))[::20]  # ~80 frames across all films
    results = list(analyse_files(frames, PaletteAnalyzer(), workers=1))
    pals = [p for _, p in results]
    assert all(isinstance(p, Palette) for p in pals)
    warmth = np.array([p.warmth for p in pals])
    assert warmth.max() - warmth.min() > 0.4  # films have both warm interiors and cool skies
    labels = group_palettes(pals, groups=4)
    assert sorted(set(labels)) == [0, 1, 2, 3]
    means = [warmth[labels == g].mean() for g in range(4)]
    assert means == sorted(means)
    g = int(labels[0])
    sheet = contact_sheet([(Image.open(f).convert("RGB"), p) for f, p, lab in zip(frames, pals, labels) if lab == g][:16])
    assert sheet.width > 0
