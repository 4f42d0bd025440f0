"""Import of reference CycleGAN/pix2pix checkpoints (ghibli_core.convert).

The tiny reference-layout networks below rebuild the module structure (and therefore the
state-dict keys) of junyanz/pytorch-CycleGAN-and-pix2pix ``models/networks.py``, including
its in-place LeakyReLU before each skip concatenation, so that a converted network must
reproduce their outputs exactly. The vintagify tests do the same with a real third-party
checkpoint and that package's own generator.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ghibli_core import CheckpointError, PatchDiscriminator, ResnetGenerator, UnetGenerator, load_model
from ghibli_core.convert import convert_file, convert_state_dict, read_checkpoint, sha256_file

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos"


# -- minimal reference-layout networks ---------------------------------------------------------
def _norm(kind: str):
    if kind == "batch":
        return lambda c: nn.BatchNorm2d(c)
    return lambda c: nn.InstanceNorm2d(c, affine=kind == "affine")


class RefResnetBlock(nn.Module):
    def __init__(self, dim: int, norm: str, dropout: bool, attr: str):
        super().__init__()
        bias, make = norm != "batch", _norm(norm)
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), make(dim), nn.ReLU(True)]
        if dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), make(dim)]
        self.attr = attr
        setattr(self, attr, nn.Sequential(*layers))

    def forward(self, x):
        return x + getattr(self, self.attr)(x)


class RefResnet(nn.Module):
    def __init__(self, ngf: int, n_blocks: int, norm: str, dropout: bool = False, attr: str = "conv_block", out_nc: int = 3):
        super().__init__()
        bias, make = norm != "batch", _norm(norm)
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7, bias=bias), make(ngf), nn.ReLU(True)]
        for i in range(2):
            m = 2**i
            layers += [nn.Conv2d(ngf * m, ngf * m * 2, 3, stride=2, padding=1, bias=bias), make(ngf * m * 2), nn.ReLU(True)]
        layers += [RefResnetBlock(ngf * 4, norm, dropout, attr) for _ in range(n_blocks)]
        for i in range(2):
            m = 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(ngf * m, ngf * m // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                make(ngf * m // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class RefUnetBlock(nn.Module):
    def __init__(self, outer, inner, *, input_nc=None, sub=None, outermost=False, innermost=False, norm="plain", dropout=False):
        super().__init__()
        self.outermost = outermost
        bias, make = norm != "batch", _norm(norm)
        input_nc = outer if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner, 4, stride=2, padding=1, bias=bias)
        if outermost:
            layers = [downconv, sub, nn.ReLU(True), nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1), nn.Tanh()]
        elif innermost:
            layers = [nn.LeakyReLU(0.2, True), downconv, nn.ReLU(True),
                      nn.ConvTranspose2d(inner, outer, 4, stride=2, padding=1, bias=bias), make(outer)]
        else:
            layers = [nn.LeakyReLU(0.2, True), downconv, make(inner), sub, nn.ReLU(True),
                      nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1, bias=bias), make(outer)]
            if dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        # the in-place LeakyReLU of the inner block rewrites x before it is concatenated: a
        # quirk of the reference that a faithful conversion must reproduce
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class RefUnet(nn.Module):
    def __init__(self, num_downs: int, ngf: int, norm: str, dropout: bool = True):
        super().__init__()
        block = RefUnetBlock(ngf * 8, ngf * 8, innermost=True, norm=norm)
        for _ in range(num_downs - 5):
            block = RefUnetBlock(ngf * 8, ngf * 8, sub=block, norm=norm, dropout=dropout)
        block = RefUnetBlock(ngf * 4, ngf * 8, sub=block, norm=norm)
        block = RefUnetBlock(ngf * 2, ngf * 4, sub=block, norm=norm)
        block = RefUnetBlock(ngf, ngf * 2, sub=block, norm=norm)
        self.model = RefUnetBlock(3, ngf, input_nc=3, sub=block, outermost=True, norm=norm)

    def forward(self, x):
        return self.model(x)


class RefNLayer(nn.Module):
    def __init__(self, ndf: int, n_layers: int, norm: str):
        super().__init__()
        bias, make = norm != "batch", _norm(norm)
        seq = [nn.Conv2d(3, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2 if n < n_layers else 1, padding=1, bias=bias),
                    make(ndf * mult), nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*seq)

    def forward(self, x):
        return self.model(x)


def _randomize(net: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter from a seeded generator (norm scales near 1), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if p.ndim == 1 and name.endswith("weight") else 0.2 * noise)
    return net.eval()


def _image(size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=g) * 2 - 1  # (1, 3, H, W) in [-1, 1]


def _same(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        a, b = ours(x.clone()), ref(x.clone())
    assert a.shape == b.shape
    assert b.abs().max() > 0  # a dead reference would make the comparison meaningless
    return float((a - b).abs().max())


# -- tiny reference-layout networks --------------------------------------------------------------
@pytest.mark.parametrize(
    "norm, dropout, attr",
    [("plain", False, "conv_block"), ("affine", False, "conv_block"), ("plain", True, "conv_block"), ("affine", True, "block")],
)
def test_resnet_converts_exactly(norm, dropout, attr):
    ref = _randomize(RefResnet(4, 2, norm, dropout, attr), seed=1)
    model, report = convert_state_dict(ref.state_dict())
    assert isinstance(model, ResnetGenerator)
    assert report["arch"] == "resnet" and report["model_type"] == "cyclegan-resnet"
    assert report["config"] == {
        "in_channels": 3, "out_channels": 3, "width": 4, "n_blocks": 2,
        "norm_affine": norm == "affine", "dropout": 0.5 if dropout else 0.0, "upsample": "transpose",
    }
    assert any("'block'" in n for n in report["notes"]) == (attr == "block")
    assert _same(model, ref, _image(16)) < 1e-5


@pytest.mark.parametrize("norm", ["plain", "affine"])
@pytest.mark.parametrize("num_downs", [5, 6])
def test_unet_converts_exactly(norm, num_downs):
    ref = _randomize(RefUnet(num_downs, 2, norm), seed=2)
    model, report = convert_state_dict(ref.state_dict())
    assert isinstance(model, UnetGenerator)
    assert report["arch"] == "unet"
    assert report["config"]["n_downs"] == num_downs
    assert report["config"]["width"] == 2
    assert report["config"]["norm_affine"] == (norm == "affine")
    assert any("dropout" in n for n in report["notes"])
    assert _same(model, ref, _image(2**num_downs)) < 1e-5


@pytest.mark.parametrize("norm", ["plain", "affine"])
@pytest.mark.parametrize("n_layers", [2, 3])
def test_patchgan_converts_exactly(norm, n_layers):
    ref = _randomize(RefNLayer(4, n_layers, norm), seed=3)
    model, report = convert_state_dict(ref.state_dict())
    assert isinstance(model, PatchDiscriminator)
    assert report["config"] == {"in_channels": 3, "width": 4, "n_layers": n_layers, "norm_affine": norm == "affine"}
    assert _same(model, ref, _image(64)) < 1e-5


def test_explicit_arch_and_auto_agree():
    state = _randomize(RefUnet(5, 2, "plain"), seed=4).state_dict()
    _, auto = convert_state_dict(state)
    _, explicit = convert_state_dict(state, arch="unet")
    assert auto == explicit
    with pytest.raises(CheckpointError, match="model.1.weight"):
        convert_state_dict(state, arch="resnet")
    with pytest.raises(ValueError, match="arch must be one of"):
        convert_state_dict(state, arch="vgg")


def test_old_pytorch_running_stats_are_dropped_with_a_note():
    ref = _randomize(RefResnet(4, 1, "plain"), seed=5)
    state = ref.state_dict()
    state["model.2.running_mean"] = torch.full((4,), 5.0)
    state["model.2.running_var"] = torch.full((4,), 9.0)
    state["model.2.num_batches_tracked"] = torch.tensor(7)
    state["model.10.conv_block.2.running_mean"] = torch.full((16,), 5.0)
    state["model.12.running_var"] = torch.full((8,), 9.0)
    model, report = convert_state_dict(state)
    assert sorted(report["dropped_keys"]) == [
        "model.10.conv_block.2.running_mean", "model.12.running_var",
        "model.2.num_batches_tracked", "model.2.running_mean", "model.2.running_var",
    ]
    assert any("running" in n for n in report["notes"])
    assert _same(model, ref, _image(16)) < 1e-5


def test_unexpected_key_is_an_error_naming_it():
    state = _randomize(RefResnet(4, 1, "plain"), seed=6).state_dict()
    with pytest.raises(CheckpointError, match=r"model\.30\.weight"):
        convert_state_dict({**state, "model.30.weight": torch.zeros(3)})
    # running statistics are only dropped where our network has an instance norm
    with pytest.raises(CheckpointError, match=r"model\.1\.running_mean"):
        convert_state_dict({**state, "model.1.running_mean": torch.zeros(4)})


def test_missing_and_misshapen_keys_are_errors_naming_them():
    state = _randomize(RefResnet(4, 1, "affine"), seed=7).state_dict()
    without = {k: v for k, v in state.items() if k != "model.5.weight"}
    with pytest.raises(CheckpointError, match=r"model\.5\.weight \(our down\.0\.1\.weight\)"):
        convert_state_dict(without)
    bad = {**state, "model.10.conv_block.5.weight": torch.zeros(16, 16, 1, 1)}
    with pytest.raises(CheckpointError, match=r"model\.10\.conv_block\.5\.weight has shape \(16, 16, 1, 1\)"):
        convert_state_dict(bad)


def test_batch_norm_checkpoint_is_refused_with_the_reason():
    state = _randomize(RefResnet(4, 1, "batch"), seed=8).state_dict()
    with pytest.raises(CheckpointError, match="norm='batch'"):
        convert_state_dict(state)


def test_unknown_layout_and_non_tensors_are_refused():
    with pytest.raises(CheckpointError, match="cannot recognise the layout"):
        convert_state_dict({"net.0.weight": torch.zeros(4, 3, 1, 1)})
    with pytest.raises(CheckpointError, match="not tensors"):
        convert_state_dict({"epoch": 3, "model.1.weight": torch.zeros(4, 3, 7, 7)})


def test_dataparallel_prefix_is_stripped():
    ref = _randomize(RefNLayer(4, 2, "plain"), seed=9)
    model, report = convert_state_dict({f"module.{k}": v for k, v in ref.state_dict().items()})
    assert any("module." in n for n in report["notes"])
    assert _same(model, ref, _image(32)) < 1e-5


# -- files and the command line ------------------------------------------------------------------
def test_pickled_module_file_is_refused(tmp_path):
    path = tmp_path / "whole_module.pth"
    torch.save(nn.Conv2d(3, 4, 3), path)
    with pytest.raises(CheckpointError, match="refusing .*pickled Python objects"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="state_dict"):
        convert_file(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unreadable_and_wrapped_files_are_refused(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(junk)
    wrapped = tmp_path / "training.pth"
    torch.save({"G_A": {"model.1.weight": torch.zeros(1)}, "epoch": 3}, wrapped)
    with pytest.raises(CheckpointError, match="one state dict per network"):
        read_checkpoint(wrapped)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "absent.pth")


def test_convert_file_pth_round_trip_and_card(tmp_path):
    ref = _randomize(RefResnet(4, 2, "affine"), seed=10)
    src = tmp_path / "latest_net_G_A.pth"
    torch.save(ref.state_dict(), src)
    out = convert_file(src, tmp_path / "converted")
    assert json.loads((out / "config.json").read_text())["model_type"] == "cyclegan-resnet"
    card = (out / "README.md").read_text()
    assert "latest_net_G_A.pth" in card and sha256_file(src) in card and '"n_blocks": 2' in card
    loaded = load_model(out)
    assert _same(loaded, ref, _image(16)) < 1e-5
    with pytest.raises(ValueError, match="already holds"):
        convert_file(src, out)
    assert convert_file(src, out, overwrite=True) == out


def test_convert_file_safetensors_fp16(tmp_path):
    ref = _randomize(RefUnet(5, 2, "affine"), seed=11)
    src = tmp_path / "net_G.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(src))
    out = convert_file(src, tmp_path / "half", dtype=torch.float16)
    weights = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert "float16" in (out / "README.md").read_text()
    # fp16 weights: close, not exact
    assert _same(load_model(out), ref, _image(32)) < 5e-2


def test_cli_convert_prints_inferred_config(tmp_path, capsys):
    import ghibli_core.cli.convert  # noqa: F401  (registers the command)
    from ghibli_core.cli import COMMANDS

    ref = _randomize(RefNLayer(4, 3, "affine"), seed=12)
    src = tmp_path / "latest_net_D_A.pth"
    torch.save(ref.state_dict(), src)
    _, add_arguments, run = COMMANDS["convert"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(src), "-o", str(tmp_path / "d"), "--fp16"])) == 0
    printed = capsys.readouterr().out
    assert "patchgan" in printed and "n_layers: 3" in printed and "norm_affine: True" in printed
    assert load_model(tmp_path / "d").model[0].weight.dtype == torch.float32  # cast back on load
    with pytest.raises(SystemExit):
        parser.parse_args([str(src), "-o", str(tmp_path / "e"), "--arch", "vgg"])


# -- a real third-party checkpoint: vintagify's 9-block ResNet generator -------------------------
def _vintagify_dir() -> Path | None:
    # find_spec does not execute the package (its __init__ imports torchvision)
    spec = importlib.util.find_spec("vintagify")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def vintagify_pair(tmp_path_factory):
    root = _vintagify_dir()
    if root is None:
        pytest.skip("vintagify is not installed (pip install --no-deps vintagify==0.1.2)")
    checkpoint = root / "resources" / "G_A2B_epoch33.pth"
    spec = importlib.util.spec_from_file_location("vintagify_generator", root / "generator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    theirs = module.ResnetGenerator()
    theirs.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    theirs.eval()
    out = convert_file(checkpoint, tmp_path_factory.mktemp("vintagify"))
    ours = load_model(out)
    return ours, theirs, json.loads((out / "config.json").read_text())


def test_vintagify_config_is_inferred(vintagify_pair):
    _, _, config = vintagify_pair
    assert config == {
        "model_type": "cyclegan-resnet", "in_channels": 3, "out_channels": 3, "width": 64,
        "n_blocks": 9, "norm_affine": True, "dropout": 0.0, "upsample": "transpose",
    }


def test_vintagify_same_output_on_synthetic_image(vintagify_pair):
    ours, theirs, _ = vintagify_pair
    # smooth gradients plus a few rectangles: image-like, not white noise
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 128), torch.linspace(-1, 1, 128), indexing="ij")
    x = torch.stack([xx, yy, xx * yy]).unsqueeze(0).clone()
    x[:, :, 20:60, 30:90] = torch.tensor([0.8, -0.5, 0.1]).view(1, 3, 1, 1)
    x[:, :, 80:120, 10:50] = -0.9
    assert _same(ours, theirs, x) < 1e-4


def test_vintagify_same_output_on_real_photo(vintagify_pair):
    if not PHOTOS.is_dir():
        pytest.skip(f"real photos not found at {PHOTOS} (../shared is beside the repository)")
    from PIL import Image

    photo = sorted(PHOTOS.glob("*.jpg"))[0]
    with Image.open(photo) as im:
        rgb = np.asarray(im.convert("RGB").resize((256, 256), Image.BICUBIC), dtype=np.float32)
    x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1  # (1, 3, 256, 256) in [-1, 1]
    ours, theirs, _ = vintagify_pair
    assert _same(ours, theirs, x) < 1e-4
