"""Fast neural style: the VGG loss network loader, the StyleNet, and its trainer (tiny networks)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from ghibli_core.cli import main as cli_main
from ghibli_core.imaging import to_pil, to_tensor
from ghibli_core.models import MODELS, StyleNet, VGGFeatures, gram_matrix, load_model, load_vgg
from ghibli_core.models.perceptual import layer_indices
from ghibli_core.stylize import Stylizer
from ghibli_core.training.style_net import StyleNetConfig, style_targets, train_style_net

from hub_server import FakeHub

SHARED_VGG = Path(__file__).resolve().parents[2] / "shared" / "weights" / "vgg19_normalised_relu3_1.safetensors"


def _vgg_state(arch: str, last_conv: int, *, seed: int = 0, classifier: bool = False) -> dict[str, torch.Tensor]:
    """Random torchvision-layout weights for the convolutions up to index ``last_conv``."""
    g = torch.Generator().manual_seed(seed)
    net = VGGFeatures(arch=arch, depth=last_conv + 1)
    state = {}
    for i, m in enumerate(net.features):
        if isinstance(m, torch.nn.Conv2d):
            state[f"features.{i}.weight"] = torch.randn(m.weight.shape, generator=g) * 0.1
            state[f"features.{i}.bias"] = torch.randn(m.bias.shape, generator=g) * 0.01
    if classifier:
        state["classifier.0.weight"] = torch.zeros(4, 4)
    return state


def tiny_vgg(tmp_path: Path) -> Path:
    path = tmp_path / "vgg.safetensors"
    save_file(_vgg_state("vgg19", 10), str(path))  # up to conv3_1, like the shared file
    return path


# -- the loss network --------------------------------------------------------------------------
def test_layer_names_match_torchvision_indices():
    v16, v19 = layer_indices("vgg16"), layer_indices("vgg19")
    assert (v16["relu1_2"], v16["relu2_2"], v16["relu3_3"], v16["relu4_3"]) == (3, 8, 15, 22)
    assert (v19["relu3_1"], v19["relu4_4"], v19["relu5_4"]) == (11, 26, 35)


def test_load_vgg_detects_the_architecture_and_depth(tmp_path):
    for arch, last in (("vgg16", 17), ("vgg19", 16)):
        path = tmp_path / f"{arch}.safetensors"
        save_file(_vgg_state(arch, last, classifier=True), str(path))
        net = load_vgg(path)
        assert net.arch == arch
        assert net.available[-1] == ("relu4_1" if arch == "vgg16" else "relu3_4")


def test_vgg_features_are_torchvision_preprocessing_and_convolutions(tmp_path):
    net = load_vgg(tiny_vgg(tmp_path))
    state = load_file(str(tmp_path / "vgg.safetensors"))
    x = torch.rand(2, 3, 20, 24) * 2 - 1
    feats = net(x, ["relu1_1", "relu3_1"])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expect = F.relu(F.conv2d(((x + 1) / 2 - mean) / std, state["features.0.weight"], state["features.0.bias"], padding=1))
    assert torch.allclose(feats["relu1_1"], expect, atol=1e-5)
    assert feats["relu3_1"].shape == (2, 256, 5, 6)
    with pytest.raises(ValueError, match="deeper than these weights go.*relu3_1"):
        net(x, ["relu3_2"])
    with pytest.raises(ValueError, match="unknown VGG layer"):
        net(x, ["relu9_9"])
    assert not any(p.requires_grad for p in net.parameters())


def test_load_vgg_accepts_a_local_pth_state_dict(tmp_path):
    state = _vgg_state("vgg19", 7)
    torch.save(state, tmp_path / "vgg.pth")
    save_file(state, str(tmp_path / "vgg.safetensors"))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    a = load_vgg(tmp_path / "vgg.pth")(x, ["relu2_2"])["relu2_2"]
    b = load_vgg(tmp_path / "vgg.safetensors")(x, ["relu2_2"])["relu2_2"]
    assert torch.equal(a, b)


def test_load_vgg_rejects_bad_weights(tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"features.1.weight": torch.zeros(3)}, str(bad))  # index 1 is a ReLU
    with pytest.raises(ValueError, match="do not match"):
        load_vgg(bad)
    save_file({"encoder.weight": torch.zeros(3)}, str(bad))
    with pytest.raises(ValueError, match="unexpected key"):
        load_vgg(bad)
    wrong = _vgg_state("vgg19", 2)
    wrong["features.2.weight"] = torch.zeros(64, 32, 3, 3)
    save_file(wrong, str(bad))
    with pytest.raises(ValueError, match="do not fit"):
        load_vgg(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_vgg(tmp_path / "missing.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match=".safetensors"):
        load_vgg(tmp_path / "w.onnx")


def test_load_vgg_from_a_hub_repo(tmp_path, monkeypatch):
    server = FakeHub().start()
    try:
        server.patch_huggingface_hub(monkeypatch, tmp_path / "hf")
        path = tiny_vgg(tmp_path)
        server.add_commit("someone/vgg", {"vgg19.safetensors": path.read_bytes(), "README.md": b"# vgg\n"})
        net = load_vgg("someone/vgg")
        x = torch.rand(1, 3, 16, 16) * 2 - 1
        assert torch.equal(net(x, ["relu3_1"])["relu3_1"], load_vgg(path)(x, ["relu3_1"])["relu3_1"])
        server.add_commit("someone/pickled", {"vgg.pth": b"not loaded"})
        with pytest.raises(ValueError, match="0 .safetensors"):
            load_vgg("someone/pickled")
        server.down()
        with pytest.raises(FileNotFoundError, match="Offline, pass a local"):
            load_vgg("someone/other", filename="vgg19.safetensors")
        # what was downloaded stays usable from the cache
        assert torch.equal(load_vgg("someone/vgg", filename="vgg19.safetensors")(x, ["relu3_1"])["relu3_1"],
                           net(x, ["relu3_1"])["relu3_1"])
    finally:
        server.down()


@pytest.mark.skipif(not SHARED_VGG.exists(), reason=f"{SHARED_VGG} is not here")
def test_shared_vgg19_relu3_1_loads():
    net = load_vgg(SHARED_VGG)
    assert net.arch == "vgg19" and net.available[-1] == "relu3_1"
    feats = net(torch.zeros(1, 3, 32, 32), ["relu1_2", "relu2_2", "relu3_1"])
    assert feats["relu3_1"].shape == (1, 256, 8, 8)


def test_gram_matrix_and_style_targets():
    f = torch.randn(2, 5, 4, 3)
    g = gram_matrix(f)
    assert torch.allclose(g[1], f[1].reshape(5, 12) @ f[1].reshape(5, 12).T / 60, atol=1e-6)
    vgg = VGGFeatures(arch="vgg19", depth=4)
    styles = [torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 24, 20) * 2 - 1]
    t = style_targets(vgg, styles, ["relu1_2"])
    each = [gram_matrix(vgg(s, ["relu1_2"])["relu1_2"]) for s in styles]
    assert torch.allclose(t["relu1_2"], (each[0] + each[1]) / 2, atol=1e-6)


# -- the network -------------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [False, True])
def test_style_net_round_trip_and_stylizer(tmp_path, shuffle):
    torch.manual_seed(0)
    net = StyleNet(width=4, n_blocks=1, kernel=3 if shuffle else 9, shuffle=shuffle)
    for p in net.parameters():  # leave the init: make the output depend on the input
        p.data.normal_(0, 0.3)
    assert MODELS["style-net"] is StyleNet
    net.save_pretrained(tmp_path / "m")
    again = load_model(tmp_path / "m")
    x = torch.rand(1, 3, 24, 32) * 2 - 1
    assert torch.equal(net.eval()(x), again(x))
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.zeros(1, 3, 30, 32))
    # the stylizer pads odd sizes and runs the fused fast path with the same result
    img = to_pil((torch.rand(3, 37, 51) * 2 - 1))
    fast = np.asarray(Stylizer(net, precision="fp32").stylize_images([img])[0]).astype(int)
    plain = np.asarray(Stylizer(net, precision="fp32", fuse=False, channels_last=False).stylize_images([img])[0]).astype(int)
    assert fast.shape == (37, 51, 3)
    assert np.abs(fast - plain).max() <= 1


def test_fast_preset_has_no_full_resolution_convolution():
    from ghibli_core.models.style_net import PRESETS

    net = StyleNet(**PRESETS["fast"]).eval()
    seen = []
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-2:]))
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape and y.abs().max() <= 1
    assert seen and all(h <= 32 + 2 and w <= 48 + 2 for h, w in seen)  # half size, plus padding
    # the paper's layout does convolve at full size
    seen.clear()
    slim = StyleNet(**PRESETS["slim"]).eval()
    for m in slim.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-2:]))
    with torch.no_grad():
        slim(x)
    assert max(h for h, _ in seen) >= 64


# -- training ----------------------------------------------------------------------------------
def _photos(folder: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        yy, xx = np.mgrid[0:40, 0:44]
        img = 128 + 60 * np.sin(xx[..., None] / (2 + i) + yy[..., None] / 5) + rng.normal(0, 10, (40, 44, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def _style(path: Path) -> Path:
    yy, xx = np.mgrid[0:48, 0:48]
    img = np.stack([(xx // 6 % 2) * 255, (yy // 6 % 2) * 200, np.full_like(xx, 40)], -1)
    Image.fromarray(img.astype(np.uint8)).save(path)
    return path


def _cfg(tmp_path, out, **kw) -> StyleNetConfig:
    base = dict(
        photos=[str(tmp_path / "photos")], style=[str(tmp_path / "style.png")], vgg="tiny", out=str(out),
        width=4, n_blocks=1, image_size=32, style_size=48, batch_size=2, steps=6, lr=1e-2,
        log_every=2, preview_every=3, save_every=3, num_previews=2, style_layers=["relu1_2", "relu2_2"],
    )
    base.update(kw)
    return StyleNetConfig(**base)


@pytest.fixture()
def data(tmp_path):
    _photos(tmp_path / "photos")
    _style(tmp_path / "style.png")
    return load_vgg(tiny_vgg(tmp_path))


def test_resume_is_exact_and_outputs(data, tmp_path):
    straight = train_style_net(_cfg(tmp_path, tmp_path / "a"), data, progress=False)
    train_style_net(_cfg(tmp_path, tmp_path / "b"), data, progress=False, stop_after=3)
    resumed = train_style_net(_cfg(tmp_path, tmp_path / "b"), data, progress=False, resume=True)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    out = tmp_path / "a"
    assert Image.open(out / "previews" / "step-0000006.png").size == (2 * 32, 2 * 32)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6] and {"content", "style"} <= set(records[0])
    assert isinstance(load_model(straight), StyleNet)
    with pytest.raises(ValueError, match="--resume"):
        train_style_net(_cfg(tmp_path, tmp_path / "a"), data, progress=False)
    with pytest.raises(ValueError, match="width"):
        train_style_net(_cfg(tmp_path, tmp_path / "a", width=8, steps=8), data, progress=False, resume=True)


def test_resume_at_a_new_learning_rate(data, tmp_path, capsys):
    # the optimiser's saved rate must not override the configured one: at 1e-12 the network stays
    at3 = load_file(str(train_style_net(_cfg(tmp_path, tmp_path / "b"), data, progress=False, stop_after=3)
                        / "model.safetensors"))
    capsys.readouterr()
    end = train_style_net(_cfg(tmp_path, tmp_path / "b", lr=1e-12), data, progress=False, resume=True)
    assert "learning rate 0.01 -> 1e-12" in capsys.readouterr().out
    final = load_file(str(end / "model.safetensors"))
    assert max((final[k] - at3[k]).abs().max().item() for k in at3) < 1e-9


def test_style_loss_falls(data, tmp_path):
    out = tmp_path / "run"
    train_style_net(_cfg(tmp_path, out, steps=40, log_every=10, content_weight=0.0, style_weight=1e3), data, progress=False)
    style = [json.loads(line)["style"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert style[-1] < 0.5 * style[0], style


def test_distillation_learns_the_teacher(data, tmp_path):
    class Invert(torch.nn.Module):
        def forward(self, x):  # a "teacher" whose look is easy to check: colour inversion
            return -x

    out = tmp_path / "distil"
    cfg = _cfg(tmp_path, out, style=[], teacher="invert", steps=60, log_every=10, content_weight=0.0, lr=2e-2)
    gen = train_style_net(cfg, data, teacher=Invert(), progress=False)
    losses = [json.loads(line)["teacher"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0], losses
    net = load_model(gen)
    x = to_tensor(Image.open(tmp_path / "photos" / "p0.png").crop((0, 0, 32, 32)))
    with torch.no_grad():
        err_inverted = (net(x) + x).abs().mean()
        err_identity = (net(x) - x).abs().mean()
    assert err_inverted < err_identity
    with pytest.raises(ValueError, match="teacher"):
        train_style_net(cfg, data, progress=False)  # the config names a teacher, none passed


def test_pure_distillation_never_runs_the_vgg(data, tmp_path):
    calls = []
    data.register_forward_hook(lambda *a: calls.append(1))
    cfg = _cfg(tmp_path, tmp_path / "d", style=[], teacher="invert", steps=3, content_weight=0.0, load_size=40,
               width=4, n_blocks=1, kernel=3, shuffle=True)
    gen = train_style_net(cfg, data, teacher=_Invert(), progress=False)
    assert calls == []
    assert load_model(gen)._hub_mixin_config["shuffle"] is True
    # with a content term it does
    cfg = _cfg(tmp_path, tmp_path / "e", style=[], teacher="invert", steps=1, content_weight=1.0)
    train_style_net(cfg, data, teacher=_Invert(), progress=False)
    assert calls


class _Invert(torch.nn.Module):
    def forward(self, x):
        return -x


def test_config_errors():
    with pytest.raises(ValueError, match="load_size"):
        StyleNetConfig(photos=["p"], style=["s"], vgg="v", out="o", image_size=64, load_size=32)
    with pytest.raises(ValueError, match="style image, or a teacher"):
        StyleNetConfig(photos=["p"], style=[], vgg="v", out="o")
    with pytest.raises(ValueError, match="multiple of 4"):
        StyleNetConfig(photos=["p"], style=["s"], vgg="v", out="o", image_size=30)
    with pytest.raises(ValueError, match="style_weight must not be negative"):
        StyleNetConfig(photos=["p"], style=["s"], vgg="v", out="o", style_weight=-1)


def test_loss_layers_must_exist_in_the_vgg(data, tmp_path):
    with pytest.raises(ValueError, match="not in this VGG"):
        train_style_net(_cfg(tmp_path, tmp_path / "x", style_layers=["relu4_1"]), data, progress=False)


def test_cli_train_style(tmp_path, capsys):
    _photos(tmp_path / "photos")
    style = _style(tmp_path / "style.png")
    vgg = tiny_vgg(tmp_path)
    base = ["train", "style", "--photos", str(tmp_path / "photos"), "--vgg", str(vgg), "--preset", "slim",
            "--width", "4", "--n-blocks", "1", "--image-size", "32", "--batch-size", "1", "--steps", "2",
            "--style-layers", "relu1_2", "relu2_2"]
    assert cli_main(base + ["--style", str(style), "--out", str(tmp_path / "run")]) == 0
    net = load_model(tmp_path / "run" / "generator")
    assert (net.config if hasattr(net, "config") else {}) is not None
    cfg = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (cfg["width"], cfg["n_blocks"], cfg["steps"]) == (4, 1, 2)
    # a resumed run keeps its own rate unless --lr is given
    again = ["--style", str(style), "--out", str(tmp_path / "lr"), "--lr", "0.003"]
    assert cli_main([*base, *again, "--stop-after", "1"]) == 0
    assert cli_main([*base, *again[:-2], "--resume"]) == 0
    assert json.loads((tmp_path / "lr" / "train_config.json").read_text())["lr"] == 0.003
    assert cli_main(base + ["--style", str(tmp_path / "nope.png"), "--out", str(tmp_path / "r2")]) != 0
    assert "nope.png" in capsys.readouterr().err
