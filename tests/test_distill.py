"""Teacher-student training (ghibli_core.training.distill, `train distill`) on tiny networks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from ghibli_core.cli import main as cli_main
from ghibli_core.data.datasets import ImageSet
from ghibli_core.models import ResnetGenerator, load_model, load_vgg
from ghibli_core.training.distill import (
    DistillConfig,
    DistillCrops,
    _luma,
    VGGFeatureDiscriminator,
    edge_smoothed,
    keep_resnet_blocks,
    recolour_target,
    teacher_pairs,
    train_distill,
)
from test_style_net import tiny_vgg


def _images(folder: Path, n: int, size=(52, 44), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
        img = 128 + 60 * np.sin(xx[..., None] / (2 + i) + yy[..., None] / 5) + rng.normal(0, 10, (size[1], size[0], 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"im{i}.png")
    return folder


class Inverter:
    """A teacher whose look is easy to check (colour inversion); counts the photos it is given."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += len(images)
        return [ImageOps.invert(im) for im in images]


@pytest.fixture()
def data(tmp_path):
    _images(tmp_path / "photos", 3)
    _images(tmp_path / "frames", 3, seed=1)
    return load_vgg(tiny_vgg(tmp_path))


def _cfg(tmp_path, out, **kw) -> DistillConfig:
    base = dict(
        photos=[str(tmp_path / "photos")], frames=[str(tmp_path / "frames")], teacher="invert", vgg="tiny",
        out=str(out), teacher_cache=str(tmp_path / "cache"), width=4, n_blocks=1, disc_width=4,
        teacher_sizes=[36, 40], frames_size=32, crop_size=16, border=2, batch_size=2, steps=6, decay_steps=2,
        log_every=2, preview_every=3, save_every=3, eval_every=3, num_previews=2, adv_weight=0.5, edge_weight=0.5,
        photo_colour_weight=0.5, lr=1e-2,
    )
    base.update(kw)
    return DistillConfig(**base)


def test_teacher_outputs_are_cached_per_photo_scale_and_teacher(tmp_path):
    paths = sorted(_images(tmp_path / "p", 2).iterdir())
    teacher = Inverter()
    pairs = teacher_pairs(paths, teacher, sizes=[32, 40], cache_dir=tmp_path / "c", teacher_id="inv", progress=False)
    assert teacher.calls == 4 and len(pairs) == 4
    assert pairs[0].shape == (32, 38, 6) and pairs[1].shape[0] == 40  # short side 32, then 40
    assert np.array_equal(pairs[0][..., 3:], 255 - pairs[0][..., :3])
    again = teacher_pairs(paths, teacher, sizes=[32, 40], cache_dir=tmp_path / "c", teacher_id="inv", progress=False)
    assert teacher.calls == 4 and all(np.array_equal(a, b) for a, b in zip(pairs, again))
    teacher_pairs(paths, teacher, sizes=[32], cache_dir=tmp_path / "c", teacher_id="other", progress=False)
    assert teacher.calls == 6  # another teacher never reuses the cache
    assert not list((tmp_path / "c").glob("*.tmp"))


def test_teacher_that_changes_the_size_is_refused(tmp_path):
    paths = sorted(_images(tmp_path / "p", 1).iterdir())
    with pytest.raises(ValueError, match="teacher returned"):
        teacher_pairs(paths, lambda ims: [im.resize((8, 8)) for im in ims], sizes=[32], cache_dir=tmp_path / "c",
                      teacher_id="bad", progress=False)


def test_crops_keep_photo_and_target_aligned_and_inside_the_border(tmp_path):
    paths = sorted(_images(tmp_path / "p", 2).iterdir())
    pairs = teacher_pairs(paths, Inverter(), sizes=[32], cache_dir=tmp_path / "c", teacher_id="inv", progress=False)
    # mark the outer 4 pixels of the photos: a crop with border 4 never sees them
    for p in pairs:
        p[:4], p[-4:], p[:, :4], p[:, -4:] = 0, 0, 0, 0
    frames = ImageSet(sorted(_images(tmp_path / "f", 2, seed=3).iterdir()), load_size=24, progress=False)
    ds = DistillCrops(pairs, frames, crop=16, border=4, seed=0)
    for k in range(20):
        photo, target, frame, smooth = ds[k]
        assert photo.shape == target.shape == frame.shape == smooth.shape == (3, 16, 16)
        assert torch.allclose(photo, -target, atol=1e-6)  # uint8 inversion is exact negation in [-1, 1]
        assert (photo > -1).flatten(1).any(0).all()  # no pixel from the zeroed border
    a, b = ds[5], DistillCrops(pairs, frames, crop=16, border=4, seed=0)[5]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_edge_smoothing_blurs_only_near_edges():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 16:] = 255
    img[2, 2] = 40  # a faint dot: no Canny edge there
    out = edge_smoothed(img)
    assert out[10, 15].tolist() != img[10, 15].tolist()  # the step is blurred
    assert out[2, 2].tolist() == img[2, 2].tolist() and out[10, 2].tolist() == [0, 0, 0]


def test_recolour_takes_the_photos_region_colour_and_keeps_the_teachers_drawing():
    rng = np.random.default_rng(0)
    photo = np.zeros((64, 96, 3), np.uint8)
    photo[:32] = (60, 110, 220)  # a blue sky over a green field
    photo[32:] = (70, 160, 60)
    lines = np.zeros((64, 96), bool)
    lines[::8] = True  # the teacher's drawing: dark lines
    target = np.where(lines[..., None], 20, np.array((200, 80, 90), np.uint8)).astype(np.uint8)  # ...on a red cast
    target = np.clip(target.astype(int) + rng.integers(-5, 6, target.shape), 0, 255).astype(np.uint8)
    pair = np.concatenate([photo, target], axis=2)
    assert recolour_target(pair, 0.0) is pair
    full, half = recolour_target(pair, 1.0), recolour_target(pair, 0.5)
    assert np.array_equal(full[..., :3], photo)  # the photo half is untouched
    luma = lambda a: (a[..., :3].astype(float) @ [0.299, 0.587, 0.114])  # noqa: E731
    assert np.abs(luma(full[..., 3:]) - luma(target)).mean() < 12  # the drawing's light and dark stay
    sky, field = full[4:12, 30:60, 3:].reshape(-1, 3).mean(0), full[48:60, 30:60, 3:].reshape(-1, 3).mean(0)
    assert sky[2] > sky[0] + 40 and field[1] > field[0] + 30  # blue above, green below: the photo's colours
    red = lambda a: (a[..., 3].astype(float) - a[..., 5]).mean()  # noqa: E731
    assert red(pair) > red(half) > red(full)  # the share moves the cast part of the way


def test_keep_resnet_blocks_starts_a_shallower_student():
    deep = ResnetGenerator(width=4, n_blocks=3, upsample="resize")
    state = keep_resnet_blocks(deep.state_dict(), [0, 2])
    shallow = ResnetGenerator(width=4, n_blocks=2, upsample="resize")
    shallow.load_state_dict(state)  # strict: exactly the right keys
    assert torch.equal(shallow.blocks[1].conv_block[1].weight, deep.blocks[2].conv_block[1].weight)
    assert torch.equal(shallow.head[1].weight, deep.head[1].weight)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():  # the same network as the deep one with its block 1 skipped
        y = deep.head(deep.up(deep.blocks[2](deep.blocks[0](deep.down(deep.stem(x))))))
        assert torch.allclose(shallow(x), y, atol=1e-6)
    with pytest.raises(ValueError, match="distinct blocks"):
        keep_resnet_blocks(deep.state_dict(), [0, 3])
    with pytest.raises(ValueError, match="distinct blocks"):
        keep_resnet_blocks(deep.state_dict(), [1, 1])


def test_cli_init_blocks_trains_from_a_deeper_generator(tmp_path, capsys):
    _images(tmp_path / "photos", 2)
    _images(tmp_path / "frames", 2, seed=1)
    ResnetGenerator(width=4, n_blocks=3, upsample="resize").save_pretrained(tmp_path / "deep")
    args = ["train", "distill", "--teacher", str(tmp_path / "deep"), "--photos", str(tmp_path / "photos"),
            "--frames", str(tmp_path / "frames"), "--vgg", str(tiny_vgg(tmp_path)), "--out", str(tmp_path / "run"),
            "--init", str(tmp_path / "deep"), "--init-blocks", "2", "0", "--width", "4", "--n-blocks", "2",
            "--upsample", "resize", "--disc-width", "4", "--teacher-sizes", "36", "--frames-size", "32",
            "--crop-size", "16", "--border", "2", "--batch-size", "1", "--steps", "1", "--decay-steps", "0",
            "--teacher-recolour", "0.5"]
    assert cli_main(args) == 0
    assert load_model(tmp_path / "run" / "generator").blocks.__len__() == 2
    cfg = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert cfg["init_blocks"] == [2, 0] and cfg["teacher_recolour"] == 0.5
    i = args.index("--init-blocks")
    assert cli_main(args[: i + 1] + ["0"] + args[i + 3 :] + ["--out", str(tmp_path / "bad")]) == 2
    assert "init_blocks names 1 blocks for a 2-block student" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_vgg_discriminator_gives_a_map_per_feature_level(data):
    disc = VGGFeatureDiscriminator(width=4)
    maps = disc(data(torch.zeros(2, 3, 32, 32), ["relu1_1", "relu2_1", "relu3_1"]))
    assert [m.shape for m in maps] == [(2, 1, 4, 4)] * 3


def test_resume_at_a_new_learning_rate(data, tmp_path, capsys):
    # the schedulers' saved base rates must not override --lr / --lr-d on resume
    train_distill(_cfg(tmp_path, tmp_path / "b"), data, Inverter(), teacher_id="inv", progress=False, stop_after=3)
    capsys.readouterr()
    train_distill(_cfg(tmp_path, tmp_path / "b", lr=1e-6, lr_d=1e-7), data, Inverter(), teacher_id="inv",
                  progress=False, resume=True)
    assert "learning rates G 0.01 -> 1e-06, D 0.0002 -> 1e-07" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    records = [r for r in records if "lr" in r]
    before, after = [r for r in records if r["step"] <= 3], [r for r in records if r["step"] > 3]
    assert before and all(r["lr"] == pytest.approx(1e-2) for r in before)
    assert [r["step"] for r in after] == [4, 6]
    # the new rate, at the schedule's decay (1 until step 4, 0 at step 6)
    assert after[0]["lr"] == pytest.approx(1e-6) and after[1]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("discriminator", ["vgg", "patch"])
def test_resume_is_exact_and_the_run_folder_is_complete(data, tmp_path, discriminator):
    scored = []

    def evaluator(G):
        scored.append(type(G).__name__)
        return {"kid_x1000": 10.0 - len(scored)}  # improves every time: the last one is the best

    # the 70x70 PatchGAN needs crops of at least 32 px (its last norms see 2x2 maps there)
    kw = dict(discriminator=discriminator, disc_width=4, crop_size=32 if discriminator == "patch" else 16)
    straight = train_distill(_cfg(tmp_path, tmp_path / "a", **kw), data, Inverter(), teacher_id="inv", evaluator=evaluator, progress=False)
    train_distill(_cfg(tmp_path, tmp_path / "b", **kw), data, Inverter(), teacher_id="inv", progress=False, stop_after=3)
    resumed = train_distill(_cfg(tmp_path, tmp_path / "b", **kw), data, Inverter(), teacher_id="inv", progress=False, resume=True)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    out = tmp_path / "a"
    assert isinstance(load_model(straight), ResnetGenerator)
    assert json.loads((out / "generator-best" / "scores.json").read_text())["step"] == 6
    assert scored == ["ResnetGenerator", "ResnetGenerator"]
    assert Image.open(out / "previews" / "step-0000006.png").size == (3 * 36, 2 * 36)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "l1" in line]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert {"l1", "vgg", "adv", "d", "colour"} <= set(records[0])
    with pytest.raises(ValueError, match="width"):
        train_distill(_cfg(tmp_path, tmp_path / "a", width=8, **kw), data, Inverter(), teacher_id="inv", progress=False, resume=True)


def _photo_crop(tmp_path) -> torch.Tensor:
    """The first test photo's top-left 32x32 as a (1, 3, 32, 32) tensor in [-1, 1]."""
    x = torch.from_numpy(np.array(Image.open(tmp_path / "photos" / "im0.png").crop((0, 0, 32, 32)))).permute(2, 0, 1)
    return x[None].float() / 127.5 - 1


def test_the_student_learns_the_teacher(data, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, out, steps=100, decay_steps=0, log_every=10, adv_weight=0.0, edge_weight=0.0,
               photo_colour_weight=0.0, vgg_weight=0.0, lr=2e-2)
    gen = train_distill(cfg, data, Inverter(), teacher_id="inv", progress=False)
    losses = [json.loads(line)["l1"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0], losses
    net = load_model(gen)
    x = _photo_crop(tmp_path)
    with torch.no_grad():
        assert (net(x) + x).abs().mean() < (net(x) - x).abs().mean()


def test_the_luma_term_alone_teaches_where_the_teacher_is_light_and_dark(data, tmp_path):
    out = tmp_path / "luma"
    cfg = _cfg(tmp_path, out, steps=100, decay_steps=0, log_every=10, l1_weight=0.0, vgg_weight=0.0, adv_weight=0.0,
               edge_weight=0.0, photo_colour_weight=0.0, teacher_luma_weight=1.0, lr=2e-2)
    gen = train_distill(cfg, data, Inverter(), teacher_id="inv", progress=False)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "l1" not in records[0] and records[-1]["luma"] < 0.5 * records[0]["luma"], records
    x = _photo_crop(tmp_path)
    with torch.no_grad():
        y = load_model(gen)(x)
    # the inverting teacher's 8x8-block brightness, not the photo's
    assert (_luma(y) - _luma(-x)).abs().mean() < 0.5 * (_luma(y) - _luma(x)).abs().mean()


def test_adversarial_term_waits_for_adv_start(data, tmp_path):
    out = tmp_path / "late"
    train_distill(_cfg(tmp_path, out, steps=4, adv_start=2, save_every=4), data, Inverter(), teacher_id="inv", progress=False)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "adv" not in records[0] and "adv" in records[1]


def test_config_errors():
    base = dict(photos=["p"], frames=["f"], teacher="t", vgg="v", out="o")
    with pytest.raises(ValueError, match="discriminator"):
        DistillConfig(**base, discriminator="stylegan")
    with pytest.raises(ValueError, match="teacher_sizes"):
        DistillConfig(**base, crop_size=128, teacher_sizes=[128])
    with pytest.raises(ValueError, match="edge_weight needs"):
        DistillConfig(**base, adv_weight=0.0, edge_weight=1.0)
    with pytest.raises(ValueError, match="multiple of 4"):
        DistillConfig(**base, crop_size=30)
    with pytest.raises(ValueError, match="teacher_luma_weight"):
        DistillConfig(**base, teacher_luma_weight=-1.0)
    with pytest.raises(ValueError, match="teacher_recolour"):
        DistillConfig(**base, teacher_recolour=1.5)
    with pytest.raises(ValueError, match="--init"):
        DistillConfig(**base, n_blocks=2, init_blocks=[0, 1])


def test_cli_train_distill_with_a_model_folder_as_teacher(tmp_path):
    _images(tmp_path / "photos", 2)
    _images(tmp_path / "frames", 2, seed=1)
    teacher = ResnetGenerator(width=4, n_blocks=1)
    teacher.save_pretrained(tmp_path / "teacher")
    args = ["train", "distill", "--teacher", str(tmp_path / "teacher"), "--photos", str(tmp_path / "photos"),
            "--frames", str(tmp_path / "frames"), "--vgg", str(tiny_vgg(tmp_path)), "--out", str(tmp_path / "run"),
            "--width", "4", "--n-blocks", "1", "--disc-width", "4", "--teacher-sizes", "36", "--frames-size", "32",
            "--crop-size", "16", "--border", "2", "--batch-size", "1", "--decay-steps", "1"]
    assert cli_main([*args, "--steps", "2", "--lr", "0.001"]) == 0
    assert isinstance(load_model(tmp_path / "run" / "generator"), ResnetGenerator)
    assert len(list((tmp_path / "run" / "teacher_cache").glob("*.npy"))) == 2
    cfg = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert cfg["teacher_sizes"] == [36] and cfg["steps"] == 2 and cfg["lr"] == 0.001
    # resumed without --lr, the run keeps its own rate rather than the default
    assert cli_main([*args, "--steps", "3", "--resume"]) == 0
    cfg = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (cfg["steps"], cfg["lr"], cfg["lr_d"]) == (3, 0.001, 2e-4)


def test_style_net_student_for_video(data, tmp_path):
    from ghibli_core.models import StyleNet

    gen = train_distill(_cfg(tmp_path, tmp_path / "v", student="style-net", width=4, n_blocks=1, kernel=3, shuffle=True,
                             steps=2, save_every=2), data, Inverter(), teacher_id="inv", progress=False)
    net = load_model(gen)
    assert isinstance(net, StyleNet) and net._hub_mixin_config["shuffle"] is True
    with pytest.raises(ValueError, match="student"):
        DistillConfig(photos=["p"], frames=["f"], teacher="t", vgg="v", out="o", student="unet")


def test_cli_takes_a_diffusion_teacher(tmp_path, monkeypatch):
    """`--teacher diffusion:REPO` goes through the diffusion stylizer as a cached teacher
    (the pipeline itself is tested in test_diffusion.py; here a stand-in takes its place)."""
    import ghibli_core.diffusion as diffusion

    _images(tmp_path / "photos", 2)
    _images(tmp_path / "frames", 2, seed=1)
    teacher = Inverter()
    teacher.teacher_id = "diffusion:abc"
    asked = {}
    monkeypatch.setattr(diffusion, "load_diffusion", lambda spec, device: asked.update(spec=spec, device=device) or "pipe")
    monkeypatch.setattr(diffusion, "as_teacher", lambda stylizer: teacher if stylizer == "pipe" else None)
    args = ["train", "distill", "--teacher", "diffusion:someone/sd@abc", "--teacher-device", "cpu",
            "--photos", str(tmp_path / "photos"), "--frames", str(tmp_path / "frames"),
            "--vgg", str(tiny_vgg(tmp_path)), "--out", str(tmp_path / "run"), "--width", "4", "--n-blocks", "1",
            "--disc-width", "4", "--teacher-sizes", "36", "--frames-size", "32", "--crop-size", "16", "--border", "2",
            "--batch-size", "1", "--steps", "1", "--decay-steps", "0"]
    assert cli_main(args) == 0
    assert asked == {"spec": "diffusion:someone/sd@abc", "device": "cpu"} and teacher.calls == 2
