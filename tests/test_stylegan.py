"""StyleGAN2 on tiny networks: the generator's interface, augmentation, exact resume, the CLI."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from ghibli_core.cli import main as cli_main
from ghibli_core.models import MODELS, CheckpointError, StyleGAN2Discriminator, StyleGAN2Generator, load_model
from ghibli_core.models.stylegan import SynthesisLayer, minibatch_stddev, modulated_conv2d
from ghibli_core.training.common import list_checkpoints
from ghibli_core.training.augment import AdaptiveAugment, ada_augment, diff_augment, gaussian_blur
from ghibli_core.training.stylegan import GeneratorEvaluator, StyleGANConfig, grow_into, train_stylegan

REPO = Path(__file__).resolve().parents[1]
TINY = dict(z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=16)


def tiny_generator(resolution: int = 16, seed: int = 0, **kw) -> StyleGAN2Generator:
    torch.manual_seed(seed)
    return StyleGAN2Generator(resolution=resolution, **{**TINY, **kw}).eval()


def z_of(n: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _make_images(folder: Path, n: int, *, colour=(220, 60, 40), seed: int = 0, size=(24, 20)) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
        img = np.array(colour, dtype=np.float64) + 30 * np.sin(xx[..., None] / (2 + i % 3)) + rng.normal(0, 8, (*xx.shape, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture()
def frames(tmp_path):
    root = tmp_path / "frames"
    _make_images(root / "film1", 6, seed=1)
    _make_images(root / "film2", 4, colour=(60, 160, 90), seed=2)
    return root


def _cfg(data, out, **kw) -> StyleGANConfig:
    base = dict(
        data=[str(data)], out=str(out), resolution=16, **TINY, d_channel_base=128, d_channel_max=16,
        batch_size=4, steps=12, r1_every=4, pl_weight=2.0, pl_every=3, augment_p=0.3, ada_interval=2, ada_kimg=0.5,
        log_every=3, sample_every=6, save_every=6, num_samples=4, seed=5,
    )
    base.update(kw)
    return StyleGANConfig(**base)


# -- the generator ----------------------------------------------------------------------------
@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_shapes_and_ranges(resolution):
    G = tiny_generator(resolution)
    assert (G.z_dim, G.w_dim, G.resolution) == (16, 16, resolution)
    assert G.num_ws == 2 * int(math.log2(resolution)) - 2
    ws = G.mapping(z_of(3))
    assert ws.shape == (3, G.num_ws, 16)
    img = G.synthesis(ws)
    assert img.shape == (3, 3, resolution, resolution) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    # untrained output is of order one (the skip outputs of each resolution add up)
    assert 0.1 < float(img.detach().std()) < 5.0
    assert torch.equal(G(z_of(3)), img)
    torch.manual_seed(1)
    D = StyleGAN2Discriminator(resolution=resolution, channel_base=128, channel_max=16)
    logits = D(img)
    assert logits.shape == (3, 1) and torch.isfinite(logits).all()


def test_bad_configs_and_inputs_are_errors():
    for resolution in (4, 12, 2048):
        with pytest.raises(ValueError, match="power of two"):
            StyleGAN2Generator(resolution=resolution, **TINY)
    G = tiny_generator()
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        G.mapping(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="ws of shape"):
        G.synthesis(torch.zeros(2, 3, 16))
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(G.mapping(z_of(1)), noise_mode="fixed")
    with pytest.raises(ValueError, match="truncation_cutoff"):
        G.mapping(z_of(1), truncation_psi=0.5, truncation_cutoff=99)
    D = StyleGAN2Discriminator(resolution=16, channel_base=128, channel_max=16)
    with pytest.raises(ValueError, match="images of shape"):
        D(torch.zeros(2, 3, 8, 8))


def test_truncation_around_w_avg():
    G = tiny_generator()
    with torch.no_grad():
        G.mapping.w_avg.copy_(torch.linspace(-1, 1, 16))
    z = z_of(4)
    ws = G.mapping(z)
    assert torch.equal(G.mapping(z, truncation_psi=1.0), ws)
    # psi = 0 gives exactly w_avg for every layer
    w0 = G.mapping(z, truncation_psi=0.0)
    assert torch.equal(w0, G.mapping.w_avg.expand(4, G.num_ws, -1))
    half = G.mapping(z, truncation_psi=0.5, truncation_cutoff=2)
    assert torch.allclose(half[:, :2], (ws[:, :2] + G.mapping.w_avg) / 2, atol=1e-6)
    assert torch.equal(half[:, 2:], ws[:, 2:])
    # every image at psi = 0 is the same image
    img = G(z, truncation_psi=0.0)
    assert torch.allclose(img, img[:1].expand_as(img), atol=1e-5)
    # the running mean follows batch means
    G.mapping.update_w_avg(torch.ones(16))
    assert torch.allclose(G.mapping.w_avg, torch.linspace(-1, 1, 16) * 0.995 + 0.005)


def test_noise_modes_and_buffers():
    G = tiny_generator()
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.5)
    ws = G.mapping(z_of(2))
    const = G.synthesis(ws, noise_mode="const")
    assert torch.equal(const, G.synthesis(ws))  # "const" is the default and deterministic
    r1 = G.synthesis(ws, noise_mode="random", generator=torch.Generator().manual_seed(1))
    r1b = G.synthesis(ws, noise_mode="random", generator=torch.Generator().manual_seed(1))
    r2 = G.synthesis(ws, noise_mode="random", generator=torch.Generator().manual_seed(2))
    none = G.synthesis(ws, noise_mode="none")
    assert torch.equal(r1, r1b)
    assert not torch.allclose(r1, r2) and not torch.allclose(const, none) and not torch.allclose(const, r1)
    # the constant noise is a set of named buffers, one per convolution, that a projector edits in place
    bufs = [(n, b) for n, b in G.synthesis.named_buffers() if "noise_const" in n]
    assert len(bufs) == G.num_ws - 1
    # "blocks.i...." is the block at resolution 2^(i+2); its noise is one (R, R) map
    assert all(b.shape == (2 ** (int(n.split(".")[1]) + 2),) * 2 for n, b in bufs)
    with torch.no_grad():
        bufs[-1][1].zero_()
    assert not torch.allclose(G.synthesis(ws), const)
    assert torch.equal(G.synthesis(ws, noise_mode="none"), none)
    assert all(f"synthesis.{n}" in G.state_dict() for n, _ in bufs)


def test_noise_min_res_removes_coarse_noise(tmp_path):
    G = tiny_generator(resolution=32, noise_min_res=16)
    buffers = [n for n, _ in G.synthesis.named_buffers() if "noise_const" in n]
    assert buffers and all(n.startswith(("blocks.2.", "blocks.3.")) for n in buffers)  # 16 and 32 px only
    assert not any("noise_strength" in n for n, _ in G.synthesis.blocks[:2].named_parameters())
    quiet = tiny_generator(resolution=32, noise_min_res=64)  # above the output: no noise anywhere
    assert not [n for n, _ in quiet.synthesis.named_buffers() if "noise_const" in n]
    z = torch.randn(2, quiet.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = quiet(z, noise_mode="random", generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, quiet(z, noise_mode="const")) and torch.equal(a, quiet(z, noise_mode="none"))
    quiet.save_pretrained(tmp_path / "g")
    back = load_model(tmp_path / "g")
    assert back.synthesis.blocks[0].conv1.use_noise is False and torch.equal(back(z), quiet(z))
    with pytest.raises(ValueError, match="noise_min_res"):
        tiny_generator(noise_min_res=-1)


def test_demodulation_keeps_activations_at_unit_scale():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    weight = torch.randn(5, 8, 3, 3)
    styles = torch.rand(2, 8) + 0.5
    y, d = modulated_conv2d(x, weight, styles)
    y10, d10 = modulated_conv2d(x, weight, styles * 10)
    # demodulation undoes any scaling of the styles
    assert torch.allclose(y * d[:, :, None, None], y10 * d10[:, :, None, None], rtol=1e-4, atol=1e-5)
    # same function as convolving each sample with its own modulated, demodulated weight
    for i in range(2):
        w = weight / math.sqrt(8 * 9) * styles[i].reshape(1, 8, 1, 1)
        w = w / w.square().sum((1, 2, 3), keepdim=True).add(1e-8).sqrt()
        ref = torch.nn.functional.conv2d(x[i : i + 1], w, padding=1)
        assert torch.allclose(ref, y[i : i + 1] * d[i].reshape(1, 5, 1, 1), atol=1e-5)
    # in a whole generator every layer's output stays of order one, even with huge styles
    G = tiny_generator(32, channel_base=512, channel_max=32)
    scales = []
    hooks = [m.register_forward_hook(lambda m, i, o: scales.append(float(o.square().mean().sqrt())))
             for m in G.modules() if isinstance(m, SynthesisLayer)]
    with torch.no_grad():
        G(z_of(8))
        for layer in G.modules():
            if isinstance(layer, SynthesisLayer):
                layer.affine.bias.mul_(100.0)
        G(z_of(8))
    for h in hooks:
        h.remove()
    assert len(scales) == 2 * (G.num_ws - 1)
    assert all(0.3 < s < 3.0 for s in scales), scales


def test_bf16_autocast_runs_close_to_fp32():
    G = tiny_generator().requires_grad_(False)
    z = z_of(2)
    ref = G(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = G(z)
    assert low.shape == ref.shape
    assert float((low.float() - ref).abs().mean()) < 0.1 * float(ref.abs().mean())


def test_minibatch_stddev_groups():
    x = torch.randn(6, 4, 4, 4)
    y = minibatch_stddev(x, 4)  # 6 is not divisible by 4: groups of 3
    assert y.shape == (6, 5, 4, 4) and torch.equal(y[:, :4], x)
    # samples i and i + 2 share a group (stride N / G)
    assert torch.equal(y[0, 4], y[2, 4]) and torch.equal(y[0, 4], y[4, 4])
    assert minibatch_stddev(torch.randn(1, 4, 4, 4), 4)[:, 4].abs().max() < 1e-3  # one sample: no spread


def test_mapped_input_puts_the_layout_in_w(tmp_path):
    G = tiny_generator(input_mode="mapped")
    first = G.synthesis.blocks[0]
    assert not hasattr(first, "const") and first.input.weight.shape == (16 * 16, 16)
    ws = G.mapping(z_of(2)).clone()
    with torch.no_grad():
        # the 4x4 input differs between latents (a const input is the same tensor for all)
        inputs = first.input(ws[:, 0]).reshape(2, -1, 4, 4)
        assert inputs.shape == (2, 16, 4, 4) and (inputs[0] - inputs[1]).abs().mean() > 0.1
        # changing only the input's linear map changes the image: the input is used
        a = G.synthesis(ws)
        first.input.bias.add_(1.0)
        assert (G.synthesis(ws) - a).abs().mean() > 1e-3
    G.save_pretrained(tmp_path / "g")
    back = load_model(tmp_path / "g")
    assert back.synthesis.blocks[0].mapped and torch.equal(back.synthesis(ws), G.synthesis(ws))
    assert json.loads((tmp_path / "g" / "config.json").read_text())["input_mode"] == "mapped"
    # a checkpoint written before the option (no input_mode in its config) loads as const
    const = tiny_generator()
    const.save_pretrained(tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    del config["input_mode"]
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    old = load_model(tmp_path / "c")
    assert not old.synthesis.blocks[0].mapped and torch.equal(old(z_of(2)), const(z_of(2)))
    with pytest.raises(ValueError, match="input_mode must be one of const, mapped"):
        tiny_generator(input_mode="learned")


def test_save_load_round_trip(tmp_path):
    from ghibli_core import hub

    G = tiny_generator()
    with torch.no_grad():
        G.mapping.w_avg.normal_()
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.3)
    G.save_pretrained(tmp_path / "g")
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert config["model_type"] == "stylegan2" and MODELS["stylegan2"] is StyleGAN2Generator
    for loaded in (load_model(tmp_path / "g"), hub.load(str(tmp_path / "g"))):
        assert isinstance(loaded, StyleGAN2Generator) and loaded.num_ws == G.num_ws
        assert torch.equal(loaded.mapping.w_avg, G.mapping.w_avg)
        z = z_of(2)
        assert torch.equal(loaded(z, truncation_psi=0.7), G(z, truncation_psi=0.7))
    # strict: a checkpoint of other widths does not load into this config
    other = StyleGAN2Generator(resolution=16, **{**TINY, "channel_max": 8})
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "g" / "config.json").read_text())
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "other")


# -- augmentation -----------------------------------------------------------------------------
def test_ada_augment_identity_determinism_and_gradients():
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    assert ada_augment(x, 0.0, generator=torch.Generator().manual_seed(0)) is x
    assert torch.equal(ada_augment(x, 1e-9, generator=torch.Generator().manual_seed(0)), x)
    a = ada_augment(x, 0.5, generator=torch.Generator().manual_seed(3))
    b = ada_augment(x, 0.5, generator=torch.Generator().manual_seed(3))
    c = ada_augment(x, 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    full = ada_augment(x, 1.0, generator=torch.Generator().manual_seed(3))
    assert full.shape == x.shape and torch.isfinite(full).all()
    assert ((full - x).flatten(1).abs().max(1).values > 1e-3).all()  # every image changed
    leaf = x.clone().requires_grad_(True)
    ada_augment(leaf, 0.8, generator=torch.Generator().manual_seed(0)).square().sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        ada_augment(x, 1.5, generator=torch.Generator())


def test_colour_transforms_act_on_colour_only():
    # a flat grey image is unchanged by every geometric transform (reflection padding) and by
    # hue and saturation (grey stays grey); what changes is its brightness/contrast/luma flip
    grey = torch.full((8, 3, 16, 16), 0.25)
    out = ada_augment(grey, 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out), atol=1e-5)  # still flat
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)


def test_diffaugment():
    x = torch.rand(8, 3, 16, 16) + 0.5  # positive: cutout zeros are easy to count
    a = diff_augment(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, diff_augment(x, generator=torch.Generator().manual_seed(0)))
    assert a.shape == x.shape
    zero_fraction = float((a == 0).all(1).float().mean())
    assert 0.1 < zero_fraction < 0.6  # a half-side square (a quarter) plus translation padding
    # without the colour step a flat colour stays that colour where it is not cut out or padded
    flat = torch.full((4, 3, 16, 16), 0.4)
    kept = AdaptiveAugment("diffaugment-nocolour")(flat, generator=torch.Generator().manual_seed(0))
    shown = kept[(kept != 0).any(1, keepdim=True).expand_as(kept)]
    assert shown.numel() > 0.3 * flat.numel() and torch.allclose(shown, torch.tensor(0.4))
    coloured = AdaptiveAugment("diffaugment")(flat, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(coloured[coloured != 0], torch.tensor(0.4))


def test_gaussian_blur():
    x = torch.rand(2, 3, 16, 16)
    assert gaussian_blur(x, 0.0) is x
    flat = torch.full((1, 3, 12, 12), 0.3)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat, atol=1e-6)  # normalised kernel: flat stays flat
    impulse = torch.zeros(1, 1, 15, 15)
    impulse[0, 0, 7, 7] = 1.0
    out = gaussian_blur(impulse, 1.5)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)  # the kernel fits inside: mass kept
    assert torch.allclose(out, out.flip(2)) and torch.allclose(out, out.transpose(2, 3), atol=1e-7)
    assert out[0, 0, 7, 7] == out.max() and out[0, 0, 7, 9] > out[0, 0, 7, 11] > 0
    blurred = gaussian_blur(x, 1.0)
    assert blurred.shape == x.shape and blurred.var() < 0.5 * x.var()  # noise averaged away
    assert gaussian_blur(x, 3.0).var() < blurred.var()
    y = torch.rand(1, 3, 4, 4, requires_grad=True)
    gaussian_blur(y, 10.0).sum().backward()  # a kernel wider than the image is clipped, still differentiable
    assert y.grad is not None and torch.isfinite(y.grad).all()
    with pytest.raises(ValueError, match="float images"):
        gaussian_blur(torch.zeros(3, 8, 8), 1.0)


def test_adaptive_probability_and_its_state():
    aug = AdaptiveAugment("ada", p=0.0, target=0.6, interval=2, kimg=1.0)
    aug.accumulate(8.0, 8)  # D sure of every real: r_t = 1 > 0.6
    aug.step(1, batch_images=8)
    assert aug.p == 0.0  # not an adjustment step
    aug.step(2, batch_images=8)
    assert aug.last_rt == 1.0 and aug.p == pytest.approx(8 * 2 / 1000)
    aug.accumulate(-4.0, 8)  # r_t = -0.5 < 0.6: p goes down, not below 0
    aug.step(4, batch_images=8)
    aug.accumulate(-4.0, 8)
    aug.step(6, batch_images=8)
    assert aug.p == 0.0
    aug.p = 0.999
    aug.accumulate(3.0, 3)
    state = aug.state_dict()
    fresh = AdaptiveAugment("ada")
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    fresh.step(8, batch_images=8)
    assert fresh.p == 1.0  # clamped
    fixed = AdaptiveAugment("fixed", p=0.3)
    fixed.accumulate(5.0, 5)
    fixed.step(4, batch_images=8)
    assert fixed.p == 0.3
    x = torch.rand(2, 3, 8, 8)
    assert AdaptiveAugment("none")(x, generator=torch.Generator()) is x
    with pytest.raises(ValueError, match="policy"):
        AdaptiveAugment("random")


# -- training ---------------------------------------------------------------------------------
def test_resume_is_exact(frames, tmp_path):
    straight = train_stylegan(_cfg(frames, tmp_path / "straight"), progress=False, cpu=True)
    train_stylegan(_cfg(frames, tmp_path / "split"), progress=False, cpu=True, stop_after=5)
    resumed = train_stylegan(_cfg(frames, tmp_path / "split"), progress=False, cpu=True, resume=True)
    for sub in ("generator", "discriminator"):
        a = load_file(str(straight.parent / sub / "model.safetensors"))
        b = load_file(str(resumed.parent / sub / "model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    last = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()][-1]
    again = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()][-1]
    assert last["aug_p"] != 0.3 and last["aug_p"] == again["aug_p"]  # the augmentation strength resumed too
    assert "pl" in last and last["pl"] == again["pl"]
    G = load_model(straight)
    assert G.mapping.w_avg.abs().sum() > 0  # tracked during training, shipped with the generator


def test_resume_at_a_new_learning_rate(frames, tmp_path, capsys):
    # the optimisers' saved rates must not override the configured ones: resumed at a rate of
    # 1e-12, the discriminator stays where the checkpoint left it; resumed at its own rate, it moves
    for name in ("same", "lower"):
        train_stylegan(_cfg(frames, tmp_path / name), progress=False, cpu=True, stop_after=6)
    at6 = load_file(str(tmp_path / "same" / "discriminator" / "model.safetensors"))
    capsys.readouterr()
    train_stylegan(_cfg(frames, tmp_path / "lower", g_lr=1e-12, d_lr=1e-12), progress=False, cpu=True, resume=True)
    assert "learning rates G 0.0025 -> 1e-12, D 0.0025 -> 1e-12" in capsys.readouterr().out
    train_stylegan(_cfg(frames, tmp_path / "same"), progress=False, cpu=True, resume=True)
    assert "learning rates" not in capsys.readouterr().out
    lower = load_file(str(tmp_path / "lower" / "discriminator" / "model.safetensors"))
    same = load_file(str(tmp_path / "same" / "discriminator" / "model.safetensors"))
    assert max((lower[k] - at6[k]).abs().max().item() for k in at6) < 1e-9
    assert max((same[k] - at6[k]).abs().max().item() for k in at6) > 1e-4
    assert json.loads((tmp_path / "lower" / "train_config.json").read_text())["d_lr"] == 1e-12


def test_a_few_steps_learn_the_data_colour(tmp_path):
    data = _make_images(tmp_path / "red", 8, colour=(220, 60, 40), size=(10, 10))
    target = torch.tensor([220.0, 60.0, 40.0]) / 127.5 - 1

    def colour_error(steps: int) -> tuple[float, list[dict]]:
        out = tmp_path / f"run{steps}"
        cfg = StyleGANConfig(
            data=[str(data)], out=str(out), resolution=8, z_dim=8, w_dim=8, mapping_layers=1, channel_base=64,
            channel_max=8, d_channel_base=64, d_channel_max=8, batch_size=4, steps=steps, augment="none",
            ema_kimg=0.02, log_every=10, save_every=1000, sample_every=1000, seed=3,
        )
        G = load_model(train_stylegan(cfg, progress=False, cpu=True))
        with torch.no_grad():
            img = G(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)))
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return float((img.mean((0, 2, 3)) - target).abs().mean()), log

    before, _ = colour_error(1)
    after, log = colour_error(40)
    assert after < 0.6 * before, (before, after)
    # the discriminator separates reals from fakes better than chance by then
    assert log[-1]["D"] < math.log(4) and log[-1]["D_real"] > log[-1]["D_fake"]
    assert any("r1" in r for r in log)


def test_generator_evaluator_and_training_scores(frames, tmp_path):
    def features(images, progress=False, desc=""):
        # a cheap stand-in for Inception: per-channel mean and std of each image
        if isinstance(images, torch.Tensor):
            x = images.float()
        else:
            x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for im in images])
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1).double().numpy()

    pils = [Image.open(p).convert("RGB") for p in sorted(frames.rglob("*.png"))]
    evaluator = GeneratorEvaluator(pils, num_samples=8, features=features, kid_subsets=5)
    G = tiny_generator()
    first, second = evaluator(G), evaluator(G)
    assert first == second and first["samples"] == 8 and first["size"] == 16
    assert {"fid", "kid_x1000", "kid_std_x1000"} <= first.keys()
    out = tmp_path / "scored"
    train_stylegan(_cfg(frames, out, steps=6, pl_weight=0.0), progress=False, cpu=True, evaluator=evaluator)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "kid_x1000" in r] == [0, 6]  # untrained baseline, then the end
    assert json.loads((out / "init_scores.json").read_text())["samples"] == 8
    best = json.loads((out / "generator-best" / "scores.json").read_text())
    assert best["step"] == 6 and isinstance(load_model(out / "generator-best"), StyleGAN2Generator)


def test_refuses_to_clobber_or_change_architecture(frames, tmp_path):
    out = tmp_path / "run"
    train_stylegan(_cfg(frames, out, steps=2, pl_weight=0.0), progress=False, cpu=True)
    with pytest.raises(ValueError, match="--resume"):
        train_stylegan(_cfg(frames, out, steps=4), progress=False, cpu=True)
    with pytest.raises(ValueError, match="channel_max"):
        train_stylegan(_cfg(frames, out, steps=4, channel_max=8), progress=False, cpu=True, resume=True)
    with pytest.raises(ValueError, match="does not fit"):
        train_stylegan(_cfg(frames, tmp_path / "ft", steps=2), init_generator=tiny_generator(32), progress=False, cpu=True)


def test_a_grown_generator_starts_as_the_small_ones_image_upsampled():
    small = tiny_generator(16, seed=1, noise_min_res=8)
    with torch.no_grad():
        small.mapping.w_avg.normal_()
    big = StyleGAN2Generator(resolution=32, **TINY, noise_min_res=8)
    grow_into(big, small)
    z = z_of(3)
    with torch.no_grad():
        want = F.interpolate(small(z, truncation_psi=0.7, noise_mode="const"), scale_factor=2, mode="bilinear",
                             align_corners=False)
        got = big.eval()(z, truncation_psi=0.7, noise_mode="const")
    assert got.shape == (3, 3, 32, 32) and torch.allclose(got, want, atol=1e-5)
    # the new block learns: its tRGB gets a gradient at once
    big.train()(z).square().mean().backward()
    assert big.synthesis.blocks[-1].torgb.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="does not fit"):
        grow_into(StyleGAN2Generator(resolution=32, **{**TINY, "channel_max": 8}), small)
    with pytest.raises(ValueError, match="does not fit"):  # noise inputs where the small one has none
        grow_into(StyleGAN2Generator(resolution=32, **TINY), small)
    with pytest.raises(ValueError, match="lower-resolution"):
        grow_into(tiny_generator(16), small)


# -- the command line -------------------------------------------------------------------------
def _cli(frames, out, *extra) -> int:
    return cli_main([
        "train", "stylegan", "--data", str(frames), "--resolution", "16", "--out", str(out),
        "--z-dim", "16", "--w-dim", "16", "--mapping-layers", "2", "--channel-base", "128", "--channel-max", "16",
        "--batch-size", "2", "--log-every", "2", "--sample-every", "2", "--save-every", "2", "--num-samples", "4",
        "--cpu", *extra,
    ])


def test_cli_resume_keeps_or_changes_the_learning_rates(frames, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(frames, out, "--steps", "6", "--stop-after", "2", "--g-lr", "0.001") == 0
    assert _cli(frames, out, "--steps", "6", "--stop-after", "2", "--resume") == 0
    config = json.loads((out / "train_config.json").read_text())
    assert (config["g_lr"], config["d_lr"]) == (0.001, 0.0025)  # the run's own, not the defaults
    assert "learning rates" not in capsys.readouterr().out
    assert _cli(frames, out, "--steps", "6", "--resume", "--d-lr", "0.0001") == 0
    assert "learning rates D 0.0025 -> 0.0001" in capsys.readouterr().out
    config = json.loads((out / "train_config.json").read_text())
    assert (config["g_lr"], config["d_lr"]) == (0.001, 0.0001)


def test_cli_end_to_end(frames, tmp_path, capsys):
    from ghibli_core import hub

    out = tmp_path / "run"
    assert _cli(frames, out, "--steps", "4", "--exclude", "film2/*", "--stop-after", "2") == 0
    assert _cli(frames, out, "--steps", "4", "--exclude", "film2/*", "--resume") == 0
    config = json.loads((out / "train_config.json").read_text())
    assert config["exclude"] == ["film2/*"] and config["resolution"] == 16
    assert config["d_channel_max"] == 16  # the discriminator follows the generator's widths
    for name in ("reals.png", "step-0000002.png", "step-0000004.png"):
        assert (out / "samples" / name).is_file()
    assert (out / "generator" / "samples.png").is_file()
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 4]
    G = hub.load(str(out / "generator"))
    assert isinstance(G, StyleGAN2Generator) and G.resolution == 16
    assert isinstance(load_model(out / "discriminator"), StyleGAN2Discriminator)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4]

    # fine-tuning: the widths come from --init's checkpoint, G and D start from its weights
    ft = tmp_path / "ft"
    assert cli_main([
        "train", "stylegan", "--data", str(frames), "--out", str(ft), "--init", str(out), "--steps", "1",
        "--batch-size", "2", "--g-lr", "1e-12", "--d-lr", "1e-12", "--cpu", "--num-samples", "2",
    ]) == 0
    assert json.loads((ft / "train_config.json").read_text())["channel_max"] == 16
    a, b = load_file(str(out / "generator" / "model.safetensors")), load_file(str(ft / "generator" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a if "w_avg" not in k)
    da = load_file(str(out / "discriminator" / "model.safetensors"))
    db = load_file(str(ft / "discriminator" / "model.safetensors"))
    assert all(torch.allclose(da[k], db[k], atol=1e-6) for k in da)

    # growing: a larger --resolution than --init's adds blocks; the 16 px discriminator is not reused
    capsys.readouterr()
    grown = tmp_path / "grown"
    assert cli_main(["train", "stylegan", "--data", str(frames), "--out", str(grown), "--init", str(out),
                     "--resolution", "32", "--steps", "1", "--batch-size", "2", "--cpu", "--num-samples", "2"]) == 0
    assert "growing its 16px generator to 32px" in capsys.readouterr().out
    assert load_model(grown / "generator").resolution == 32
    assert json.loads((grown / "train_config.json").read_text())["channel_max"] == 16
    assert cli_main(["train", "stylegan", "--data", str(frames), "--out", str(tmp_path / "bad"), "--init", str(out),
                     "--resolution", "8", "--cpu"]) == 2
    assert "grown, not shrunk" in capsys.readouterr().err
    assert cli_main(["train", "stylegan", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "bad2"),
                     "--resolution", "16", "--cpu"]) == 2


def test_two_cpu_processes_stay_in_sync(frames, tmp_path):
    out = tmp_path / "ddp"
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    cmd = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "ghibli_core", "train", "stylegan", "--data", str(frames), "--resolution", "16", "--out", str(out),
        "--z-dim", "16", "--w-dim", "16", "--mapping-layers", "2", "--channel-base", "128", "--channel-max", "16",
        "--batch-size", "2", "--steps", "4", "--save-every", "2", "--log-every", "2", "--sample-every", "4",
        "--r1-every", "2", "--ada-interval", "2", "--ada-kimg", "0.01", "--cpu",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert "r_t" in records[-1] and 0.0 <= records[-1]["aug_p"] <= 1.0  # the controller ran on both processes' reals
    assert (out / "generator" / "model.safetensors").is_file()
