"""scripts/make_gallery.py, the README's pictures, run end to end on tiny models."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("skimage", reason="the gallery's sample photos come with scikit-image: pip install -r requirements-dev.txt")

from ghibli_core.models import ResnetGenerator, StyleNet  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_gallery.py"


def load_script():
    spec = importlib.util.spec_from_file_location("make_gallery", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gallery_command_writes_both_pictures(tmp_path):
    gallery = load_script()
    torch.manual_seed(0)
    ResnetGenerator(width=4, n_blocks=1).save_pretrained(tmp_path / "photo")
    (tmp_path / "photo" / "README.md").write_text("---\nkid_x1000: 106.85\n---\n# tiny\n")
    StyleNet(width=4, n_blocks=1).save_pretrained(tmp_path / "video")
    out = tmp_path / "docs"
    assert gallery.main(["--out", str(out), "--photo-model", str(tmp_path / "photo"),
                         "--video-model", str(tmp_path / "video"), "--height", "40"]) == 0

    sheet = Image.open(out / "gallery.png")
    assert sheet.format == "PNG" and sheet.mode == "P"  # 256 colours, to stay small
    # three rows (photos, photo model, video model) of 40 px pictures under 24 px titles
    assert sheet.height == 3 * (24 + 40) + 2 * 6
    strip = Image.open(out / "video_strip.png")
    assert strip.height == 2 * (24 + 34) + 6 and strip.width > 5 * 40
    # the photos are the ones the README credits, each with its terms
    assert set(gallery.PHOTOS) == {"astronaut", "coffee", "chelsea", "rocket"}
    assert all(("public domain" in terms or "CC0" in terms) for _, terms in gallery.PHOTOS.values())
