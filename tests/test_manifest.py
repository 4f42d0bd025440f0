"""manifest.jsonl: records, atomic writes, --where filters, selection for training."""
from __future__ import annotations

import json
import os
import stat

import pytest
from PIL import Image

from ghibli_core.cli import build_parser
from ghibli_core.data.datasets import select_images
from ghibli_core.data.manifest import (
    Manifest,
    atomic_write_text,
    find_manifest,
    parse_tags,
    parse_where,
    select_paths,
)

RECORDS = [
    {"file": "ponyo/ponyo_t000001.000.jpg", "source": "ponyo.mp4", "timestamp": 1.0, "warmth": 0.72, "group": 3,
     "tags": {"studio": "ghibli", "year": "2008"}},
    {"file": "ponyo/ponyo_t000002.000.jpg", "source": "ponyo.mp4", "timestamp": 2.0, "warmth": 0.31, "group": 0,
     "tags": {"studio": "ghibli", "year": "2008"}},
    {"file": "totoro/totoro_t000005.500.jpg", "source": "totoro.mkv", "timestamp": 5.5, "warmth": 0.6, "group": 3,
     "tags": {"studio": "ghibli", "year": "1988"}},
    {"file": "photos/lake.jpg", "source": "lake.jpg", "warmth": 0.2, "tags": {"medium": "photo"}},
]


def sel(where):
    m = Manifest("x/manifest.jsonl", RECORDS)
    return [r["file"].split("/")[-1] for r in m.select(where)]


def test_where_operators():
    assert sel(["warmth>0.6"]) == ["ponyo_t000001.000.jpg"]
    assert sel(["warmth>=0.6"]) == ["ponyo_t000001.000.jpg", "totoro_t000005.500.jpg"]
    assert sel(["warmth<0.31"]) == ["lake.jpg"]
    assert sel(["warmth <= 0.31"]) == ["lake.jpg", "ponyo_t000002.000.jpg"]
    assert sel(["group=3"]) == sel(["group==3"]) == ["ponyo_t000001.000.jpg", "totoro_t000005.500.jpg"]
    assert sel(["group=3.0"]) == sel(["group=3"])
    # tags by name or tags.name; missing keys fail everything but !=
    assert sel(["studio=ghibli"]) == sel(["tags.studio=ghibli"]) and len(sel(["studio=ghibli"])) == 3
    assert sel(["studio!=ghibli"]) == ["lake.jpg"]
    assert sel(["group!=3"]) == ["lake.jpg", "ponyo_t000002.000.jpg"]
    # numeric tags compare as numbers; globs with = and !=; quotes are stripped
    assert sel(["year>2000"]) == ["ponyo_t000001.000.jpg", "ponyo_t000002.000.jpg"]
    assert sel(["source=ponyo*"]) == sel(["file=ponyo/*"]) == sel(["source='ponyo.mp4'"])
    assert sel(["file!=ponyo/*", "file!=photos/*"]) == ["totoro_t000005.500.jpg"]
    # several expressions: all must hold
    assert sel(["studio=ghibli", "warmth<0.5"]) == ["ponyo_t000002.000.jpg"]
    assert sel([]) == sel(["timestamp!=-1"])[:0] + sel([])


@pytest.mark.parametrize("bad", ["warmth", "warmth>", ">0.5", "warm th>1", "warmth~0.5", "file>ponyo*"])
def test_where_malformed(bad):
    with pytest.raises(ValueError, match="where"):
        parse_where(bad)


def test_where_type_errors_are_clear():
    with pytest.raises(ValueError, match="not a number"):
        sel(["warmth>warm"])
    with pytest.raises(ValueError, match="cannot be compared"):
        Manifest("m.jsonl", [{"file": "a", "palette": [["#000000", 1.0]]}]).select(["palette=x"])


def test_parse_tags():
    assert parse_tags(["studio=ghibli", "medium = 2d"]) == {"studio": "ghibli", "medium": "2d"}
    for bad in ("studio", "=x", "studio=", "has space=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_tags([bad])
    with pytest.raises(ValueError, match="shadow"):
        parse_tags(["warmth=1"])


def test_manifest_save_load_append(tmp_path):
    m = Manifest(tmp_path / "manifest.jsonl", RECORDS[::-1])
    m.save()
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(ln)["file"] for ln in lines] == sorted(r["file"] for r in RECORDS)  # sorted, one per line
    assert stat.S_IMODE(os.stat(tmp_path / "manifest.jsonl").st_mode) & 0o044  # readable by others, like any file
    assert not list(tmp_path.glob(".*tmp"))
    # append: later lines win; a record can be removed; a truncated last line is dropped
    m.append({**RECORDS[0], "group": 9})
    with open(m.path, "a") as fp:
        fp.write(json.dumps({"file": RECORDS[1]["file"], "_removed": True}) + "\n")
        fp.write('{"file": "half-writ')
    again = Manifest.load(tmp_path)
    assert again.get(RECORDS[0]["file"])["group"] == 9 and RECORDS[1]["file"] not in again and len(again) == 3
    again.append({"file": "new.jpg"})  # after a truncated line: starts on a line of its own
    assert "new.jpg" in Manifest.load(tmp_path)
    # a broken line in the middle is an error naming the file and line
    m.path.write_text(json.dumps(RECORDS[0]) + "\nnot json\n" + json.dumps(RECORDS[1]) + "\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl:2"):
        Manifest.load(m.path)
    m.path.write_text('{"no_file": 1}\n')
    with pytest.raises(ValueError, match="'file'"):
        Manifest.load(m.path)
    assert len(Manifest.load(tmp_path / "missing")) == 0


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "card.md"
    atomic_write_text(target, "old")

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["card.md"]


def _dataset(tmp_path):
    root = tmp_path / "data"
    for r in RECORDS:
        (root / r["file"]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / r["file"])
    (root / "contact_sheets").mkdir()
    Image.new("RGB", (8, 8)).save(root / "contact_sheets" / "group_00.png")
    Manifest(root / "manifest.jsonl", RECORDS).save()
    return root


def test_select_paths_and_select_images(tmp_path):
    root = _dataset(tmp_path)
    assert find_manifest(root) == root / "manifest.jsonl" == find_manifest(root / "manifest.jsonl")
    assert find_manifest(tmp_path) is None
    warm = select_paths(root, where=["warmth>0.5"])
    assert [p.name for p in warm] == ["ponyo_t000001.000.jpg", "totoro_t000005.500.jpg"]
    # globs match a record's file or its source
    held_out = select_images([root / "manifest.jsonl"], exclude=["ponyo*"], where=["studio=ghibli"])
    assert [p.name for p in held_out] == ["totoro_t000005.500.jpg"]
    # a folder with a manifest means its records: the contact sheet is no training image
    assert len(select_images([root])) == 4
    with pytest.raises(ValueError, match="no images left"):
        select_images([root], where=["warmth>2"])
    # --where on a plain folder needs a manifest
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.new("RGB", (8, 8)).save(plain / "a.jpg")
    assert len(select_images([plain])) == 1
    with pytest.raises(ValueError, match="need a manifest"):
        select_images([plain], where=["warmth>0.5"])
    # records whose image is gone are an error naming them
    (root / RECORDS[0]["file"]).unlink()
    with pytest.raises(FileNotFoundError, match="ponyo_t000001.000.jpg"):
        select_images([root])


def test_manifest_paths_relative_to_another_folder(tmp_path):
    images = tmp_path / "elsewhere" / "film"
    images.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(images / "1.jpg")
    m = Manifest(tmp_path / "data" / "manifest.jsonl")
    file = m.relative(images / "1.jpg")
    assert file == "../elsewhere/film/1.jpg"
    m.add({"file": file, "source": "film/1.jpg"})
    m.save()
    assert select_paths(tmp_path / "data", include=["film/*"])[0].resolve() == (images / "1.jpg").resolve()
    # globs match a tail of the file path too (the source may say something else entirely)
    m.add({"file": file, "source": "film.mp4"})
    m.save()
    assert len(select_paths(tmp_path / "data", include=["film/*"])) == 1
    assert len(select_paths(tmp_path / "data", include=["elsewhere/film/*"])) == 1
    assert select_paths(tmp_path / "data", exclude=["film/*"]) == []


def test_train_cyclegan_accepts_where_filters_and_old_configs():
    from ghibli_core.training.cyclegan import CycleGANConfig

    args = build_parser().parse_args(["train", "cyclegan", "--domain-a", "photos", "--domain-b", "data/manifest.jsonl",
                                      "--out", "runs/x", "--where-b", "warmth>0.6", "studio=ghibli"])
    assert args.where_b == ["warmth>0.6", "studio=ghibli"] and args.where_a == []
    # a run folder's train_config.json from before these fields still loads
    old = json.loads(CycleGANConfig(domain_a=["a"], domain_b=["b"], out="o").to_json())
    for k in ("where_a", "where_b"):
        old.pop(k)
    assert CycleGANConfig(**old).where_b == []


def test_train_cyclegan_on_a_manifest_with_where(tmp_path, capsys):
    """prepare images -> prepare palette -> train cyclegan --domain-b MANIFEST --where-b ..."""
    import numpy as np

    from ghibli_core.cli import main

    rng = np.random.default_rng(0)
    photos, frames = tmp_path / "photos", tmp_path / "frames"
    for folder, n, colours in ((photos, 3, [(60, 120, 200)]), (frames, 6, [(210, 120, 50), (50, 110, 210)])):
        folder.mkdir()
        for i in range(n):
            base = np.array(colours[i % len(colours)], float)
            img = base + 50 * np.sin(np.arange(48)[None, :, None] / (2 + i) + rng.uniform(0, 6)) + rng.normal(0, 6, (40, 48, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    data = tmp_path / "data"
    assert main(["prepare", "images", str(frames), "--out", str(data), "--size", "36", "--tag", "studio=test"]) == 0
    assert main(["prepare", "palette", str(data), "--groups", "2", "--workers", "1"]) == 0
    warm = select_paths(data, where=["warmth>0.6", "studio=test"])
    assert len(warm) == 3
    capsys.readouterr()
    rc = main(["train", "cyclegan", "--domain-a", str(photos), "--domain-b", str(data / "manifest.jsonl"),
               "--where-b", "warmth>0.6", "studio=test", "--out", str(tmp_path / "run"), "--cpu",
               "--width", "4", "--n-blocks", "1", "--disc-width", "4", "--disc-layers", "2", "--load-size", "36",
               "--crop-size", "32", "--steps", "2", "--decay-steps", "1", "--pool-size", "2", "--ema-decay", "0",
               "--log-every", "1", "--sample-every", "2", "--save-every", "2"])
    assert rc == 0
    assert "on 3 A images and 3 B images" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["where_b"] == ["warmth>0.6", "studio=test"]
