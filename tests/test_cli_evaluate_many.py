"""``evaluate`` with several ``--model`` values side by side: built-in baselines, the content
distance through a VGG, the JSON record and the contact sheet. Tiny random networks and images
made here; a 4x4-thumbnail stand-in replaces Inception (the real network is tested in
test_metrics.py), so each test takes seconds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.torch import save_file

from ghibli_core.cli import main
from ghibli_core.cli.evaluate import (
    SHEET_HEADER,
    contact_sheet,
    format_systems,
    parse_systems,
    sheet_indices,
    short_labels,
)
from ghibli_core.imaging import center_crop_resize, load_image
from ghibli_core.metrics import (
    BASELINES,
    METRICS,
    TranslationEvaluator,
    content,
    content_distance,
    evaluate_translation,
    register_baseline,
)
from ghibli_core.models import ResnetGenerator, VGGFeatures, load_vgg

SIZE = 32


def scene(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A smooth synthetic photo: gradients, soft blobs and a few hard edges (for the VGG)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([xx, yy, 1 - xx * yy], axis=-1) * 160 + 40
    for _ in range(3):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(-80, 80, size=3)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[y0 : y0 + h // 3, x0 : x0 + w // 4] = rng.uniform(0, 255, size=3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def pixel_features(images, *, progress=False, desc=""):
    """A cheap stand-in for Inception: 4x4 colour thumbnails as 48-d features."""
    return np.stack([np.asarray(img.resize((4, 4), Image.BOX), dtype=np.float64).ravel() for img in images])


class PixelFeatures:
    def __init__(self, *, device="cpu", batch_size=32):
        self.device = device

    def __call__(self, images, *, progress=False, desc=""):
        return pixel_features(images)


def tiny_vgg_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random torchvision-layout VGG19 weights up to conv3_1 (like the shared offline file)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, m in enumerate(VGGFeatures(arch="vgg19", depth=11).features):
        if isinstance(m, torch.nn.Conv2d):
            state[f"features.{i}.weight"] = torch.randn(m.weight.shape, generator=g) * 0.1
            state[f"features.{i}.bias"] = torch.randn(m.bias.shape, generator=g) * 0.01
    return state


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate_many")
    for i in range(7):
        (root / "photos").mkdir(exist_ok=True)
        scene(i, (48, 40) if i % 2 else (40, 56)).save(root / "photos" / f"p{i}.png")
    for film, seeds in (("ponyo", range(100, 104)), ("howl", range(200, 203))):
        (root / "frames" / film).mkdir(parents=True)
        for s in seeds:
            scene(s, (64, 36)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "frames" / film / f"{s}.png")
    torch.manual_seed(0)
    ResnetGenerator(width=4, n_blocks=1).save_pretrained(root / "tiny")
    save_file(tiny_vgg_state(), str(root / "vgg.safetensors"))
    return {
        "root": root, "photos": root / "photos", "frames": root / "frames", "tiny": root / "tiny",
        "vgg": root / "vgg.safetensors",
    }


@pytest.fixture
def fake_inception(monkeypatch):
    monkeypatch.setattr("ghibli_core.metrics.InceptionFeatures", PixelFeatures)


def evaluate(data, *extra: str | Path) -> int:
    return main([
        "evaluate", "--photos", str(data["photos"]), "--frames", str(data["frames"]), "--size", str(SIZE),
        "--kid-subsets", "4", *map(str, extra),
    ])


def loaded_photos(data) -> list[Image.Image]:
    return [center_crop_resize(load_image(p), SIZE) for p in sorted(data["photos"].glob("*.png"))]


def loaded_frames(data) -> list[Image.Image]:
    return [center_crop_resize(load_image(p), SIZE) for p in sorted(data["frames"].rglob("*.png"))]


# --------------------------------------------------------------------------- the command


def test_side_by_side_rows_content_json_and_sheet(data, fake_inception, monkeypatch, tmp_path, capsys):
    scored: dict[str, list[Image.Image]] = {}
    real_score = TranslationEvaluator.score

    def spy(self, translated, *, desc="translated"):
        scored[desc.split(":")[0]] = list(translated)
        return real_score(self, translated, desc=desc)

    monkeypatch.setattr(TranslationEvaluator, "score", spy)
    out, sheet = tmp_path / "eval" / "eval.json", tmp_path / "eval" / "sheet.png"
    code = evaluate(
        data, "--model", "identity", "--model", "opencv", "--model", data["tiny"], "--vgg", data["vgg"],
        "--sheet", sheet, "--sheet-photos", "3", "--json", out,
    )
    assert code == 0
    record = json.loads(out.read_text())
    rows = record["systems"]

    # one row per system, in --model order; identity is listed, so nothing is added
    assert [r["name"] for r in rows] == ["identity", "opencv", str(data["tiny"])]
    assert [r["kind"] for r in rows] == ["baseline", "baseline", "local"] and all(r["listed"] for r in rows)
    assert {"photos": 7, "frames": 7, "size": SIZE, "seed": 0, "kid_subsets": 4, "kid_subset_size": 7}.items() <= record.items()
    assert record["content"]["layer"] == "relu3_1" and record["content"]["vgg"] == str(data["vgg"])
    assert "model" not in record  # the single-model key only comes with a single --model

    # identity's row is the library's identity baseline, with the same KID subsets
    old = evaluate_translation(
        lambda b: list(b), loaded_photos(data), loaded_frames(data), size=SIZE, features=pixel_features, kid_subsets=4,
    )
    identity, opencv, tiny = rows
    for key in ("fid", "kid", "kid_std", "kid_x1000", "kid_std_x1000"):
        assert identity[key] == old["identity"][key] == record["identity"][key]
    assert opencv["fid"] != identity["fid"] and tiny["fid"] != identity["fid"]

    # content: 0 for the photos themselves, larger for what changes them
    assert identity["content"] == pytest.approx(0.0, abs=1e-6)
    assert opencv["content"] > 1e-3 and tiny["content"] > 1e-3

    # the aligned table: a header and one line per system, in order
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("system"))
    assert "KID x1000 (mean ± std)" in lines[head] and lines[head].rstrip().endswith("content")
    assert [lines[head + 1 + i].split()[0] for i in range(3)] == ["identity", "opencv", str(data["tiny"])]
    assert len({len(lines[head + i].rstrip()) for i in range(4)}) == 1  # columns line up
    assert lines[head + 2].split()[1:5] == [f"{opencv['kid_x1000']:.2f}", "±", f"{opencv['kid_std_x1000']:.2f}",
                                            f"{opencv['fid']:.2f}"]
    assert "7 photos vs 7 frames at 32x32" in lines[head + 4]

    # the sheet: 3 evenly spaced photos x (input + 3 systems), from the outputs that were scored
    picked = sheet_indices(7, 3)
    assert picked == [0, 2, 4]
    assert record["sheet"]["photos"] == [f"p{i}.png" for i in picked]
    assert record["sheet"]["columns"] == ["input", "identity", "opencv", "tiny"]
    with Image.open(sheet) as im:
        assert im.size == (SIZE * 4, SHEET_HEADER + SIZE * 3)
        pixels = np.asarray(im.convert("RGB"))
    photos = loaded_photos(data)
    columns = [[photos[i] for i in picked]] + [[scored[name][i] for i in picked] for name in ("identity", "opencv", "tiny")]
    for c, images in enumerate(columns):
        for r, img in enumerate(images):
            cell = pixels[SHEET_HEADER + r * SIZE : SHEET_HEADER + (r + 1) * SIZE, c * SIZE : (c + 1) * SIZE]
            assert np.array_equal(cell, np.asarray(img)), (c, r)
    assert not np.array_equal(columns[2][0], columns[0][0])  # opencv did change the photo


def test_single_model_keeps_the_old_record_and_adds_identity(data, fake_inception, tmp_path, capsys):
    out, sheet = tmp_path / "eval.json", tmp_path / "sheet.png"
    assert evaluate(data, "--model", data["tiny"], "--json", out, "--sheet", sheet, "--sheet-size", "16") == 0
    printed = capsys.readouterr().out
    assert "content: not measured (give --vgg" in printed
    record = json.loads(out.read_text())
    assert [(r["name"], r["listed"]) for r in record["systems"]] == [(str(data["tiny"]), True), ("identity", False)]
    assert all(r["content"] is None for r in record["systems"]) and record["content"] is None
    # the keys older scripts read
    assert record["model_spec"] == str(data["tiny"])
    assert record["model"]["fid"] == record["systems"][0]["fid"] != record["identity"]["fid"]
    # the added identity row is not a sheet column: the input column shows the photos
    assert record["sheet"]["columns"] == ["input", "tiny"]
    with Image.open(sheet) as im:
        assert im.size == (16 * 2, SHEET_HEADER + 16 * 7)  # 12 asked, all 7 photos


def test_bad_systems_fail_before_anything_loads(data, fake_inception, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("images were loaded before the --model values were checked")

    monkeypatch.setattr("ghibli_core.cli.evaluate._load_cropped", no_loading)
    for values, message in [
        (["identity", "opencvv"], "'opencvv'"),
        (["opencv", str(data["root"] / "missing")], "missing"),
        (["opencv", str(data["photos"])], "not a ghibli-studio checkpoint"),
        (["opencv", "opencv"], "given twice"),
    ]:
        argv = [a for v in values for a in ("--model", v)]
        assert evaluate(data, *argv) == 2, values
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        if message != "given twice":
            assert "identity, opencv" in err  # names the baselines it could have meant
    assert evaluate(data, "--model", "identity", "--model", "a/b", "--model", "c/d", "--revision", "main") == 2
    assert "--revision" in capsys.readouterr().err
    assert evaluate(data, "--model", "opencv", "--sheet", data["root"] / "sheet.txt") == 2
    assert "--sheet" in capsys.readouterr().err
    assert evaluate(data, "--model", "opencv", "--sheet", data["root"] / "s.png", "--sheet-size", "64") == 2
    assert "--sheet-size" in capsys.readouterr().err
    assert main(["evaluate", "video", "clip.mp4", "--model", "a", "--model", "b"]) == 2
    assert "one --model" in capsys.readouterr().err


# --------------------------------------------------------------------------- the library parts


def test_content_distance_is_zero_for_the_photo_and_grows_with_change():
    vgg = VGGFeatures(arch="vgg19", depth=12)
    vgg.load_state_dict(tiny_vgg_state())
    photos = [scene(i, (40, 40)) for i in range(3)] + [scene(9, (24, 32))]  # pairs may differ in size
    same = content_distance(vgg, [p.copy() for p in photos], photos, batch_size=2)
    assert same.shape == (4,) and np.allclose(same, 0.0, atol=1e-6)
    soft = content_distance(vgg, [p.filter(ImageFilter.GaussianBlur(1)) for p in photos], photos)
    blurred = content_distance(vgg, [p.filter(ImageFilter.GaussianBlur(6)) for p in photos], photos)
    assert (soft > 1e-4).all() and (blurred > soft).all()
    # tensors in [-1, 1] give the same figures as the PIL images they come from
    x = torch.from_numpy(np.stack([np.asarray(p) for p in photos[:3]])).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.flip(x, dims=[3])
    from_tensors = content_distance(vgg, y, x)
    from_pil = content_distance(vgg, [p.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in photos[:3]], photos[:3])
    assert np.allclose(from_tensors, from_pil, atol=1e-6)
    with pytest.raises(ValueError, match="3 outputs for 4 inputs"):
        content_distance(vgg, photos[:3], photos)
    with pytest.raises(ValueError, match="pair 0 differs in size"):
        content_distance(vgg, [photos[3]], [photos[0]])


def test_content_metric_is_registered_and_paired():
    assert METRICS["content"] is content
    rng = np.random.default_rng(0)
    a = rng.uniform(size=(5, 16))
    assert content(a, a) == pytest.approx((0.0, 0.0), abs=1e-12)
    b = a.copy()
    b[0] = 0.0
    mean, std = content(b, a)  # a zero row against a textured one is at distance 1
    assert mean == pytest.approx(1 / 5) and std > 0
    assert content(np.zeros((2, 3)), np.zeros((2, 3))) == (0.0, 0.0)
    with pytest.raises(ValueError, match="paired"):
        content(a, a[:4])


def test_baselines():
    assert list(BASELINES)[:2] == ["identity", "opencv"]
    photos = [scene(i, (40, 30)) for i in range(2)]
    same = BASELINES["identity"](photos)
    assert all(s is not p and np.array_equal(np.asarray(s), np.asarray(p)) for s, p in zip(same, photos))
    styled = BASELINES["opencv"](photos)
    import cv2

    expected = cv2.stylization(np.ascontiguousarray(np.asarray(photos[0])[:, :, ::-1]))[:, :, ::-1]
    assert styled[0].size == (40, 30) and styled[0].mode == "RGB"
    assert np.array_equal(np.asarray(styled[0]), expected)
    assert not np.array_equal(np.asarray(styled[0]), np.asarray(photos[0]))
    with pytest.raises(ValueError, match="registered twice"):
        register_baseline("opencv")(lambda images: images)


def test_contact_sheet_and_table_layout():
    cols = [("input", [scene(i, (20, 20)) for i in range(2)]), ("a rather long model name", [scene(5, (40, 40))] * 2)]
    sheet = contact_sheet(cols, cell=20)
    assert sheet.size == (40, SHEET_HEADER + 40) and sheet.mode == "RGB"
    assert np.array_equal(np.asarray(sheet)[SHEET_HEADER : SHEET_HEADER + 20, :20], np.asarray(cols[0][1][0]))
    with pytest.raises(ValueError, match="differ in length"):
        contact_sheet([("a", [scene(0)]), ("b", [])], cell=8)
    assert sheet_indices(10, 4) == [0, 2, 5, 7] and sheet_indices(3, 12) == [0, 1, 2]

    row = lambda name, k, f, c: {"name": name, "kid_x1000": k, "kid_std_x1000": 0.5, "fid": f, "content": c}  # noqa: E731
    settings = {"photos": 9, "frames": 7, "size": 256, "kid_subsets": 100, "kid_subset_size": 7, "seed": 0}
    text = format_systems([row("identity", 81.9, 259.7, 0.0), row("opencv", 48.4, 223.3, 0.1234)], settings)
    lines = text.splitlines()
    assert lines[0].split()[0] == "system" and lines[0].rstrip().endswith("content")
    assert lines[2].split() == ["opencv", "48.40", "±", "0.50", "223.30", "0.1234"]
    assert "9 photos vs 7 frames at 256x256" in lines[3]
    plain = format_systems([row("identity", 81.9, 259.7, None)], settings).splitlines()
    assert "content" not in plain[0] and plain[-1].startswith("content: not measured")


def test_the_offline_vgg_loads_for_the_content_column():
    shared = Path(__file__).resolve().parents[2] / "shared" / "weights" / "vgg19_normalised_relu3_1.safetensors"
    if not shared.is_file():
        pytest.skip(f"the shared VGG is not at {shared}")
    vgg = load_vgg(shared)
    photo = scene(0, (64, 64))
    d = content_distance(vgg, [photo.filter(ImageFilter.GaussianBlur(4)), photo.copy()], [photo, photo])
    assert d[1] == pytest.approx(0.0, abs=1e-6) and d[0] > 0.01


def test_sheet_labels_tell_same_named_folders_apart(data, tmp_path):
    torch.manual_seed(1)
    ResnetGenerator(width=4, n_blocks=1).save_pretrained(tmp_path / "other" / "tiny")
    systems = parse_systems(["opencv", str(data["tiny"]), str(tmp_path / "other" / "tiny"), "owner/repo@v1"])
    assert [s.kind for s in systems] == ["baseline", "local", "local", "hub", "baseline"]
    assert not systems[-1].listed and systems[-1].name == "identity"
    assert short_labels(systems) == ["opencv", f"{data['root'].name}/tiny", "other/tiny", "repo@v1", "identity"]
