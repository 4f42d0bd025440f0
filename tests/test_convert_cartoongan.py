"""CartoonGAN import (ghibli_core.convert_cartoongan): synthetic folders always, the real release when ../shared is there."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ghibli_core import CheckpointError, load_model
from ghibli_core.cli import main
from ghibli_core.convert_cartoongan import convert_cartoongan, read_cartoongan
from ghibli_core.imaging import to_tensor
from ghibli_core.models.cartoongan import CartoonGANGenerator

CARTOONGAN = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "cartoongan_hayao"


class RefCartoonGAN(torch.nn.Module):
    """The original's layout and names (BGR in and out), written from the paper's description."""

    def __init__(self, w: int = 4, n_blocks: int = 2):
        super().__init__()
        self.w, self.n = w, n_blocks
        c = torch.nn.Conv2d
        self.layers = torch.nn.ModuleDict()
        self.layers["conv01_1"] = c(3, w, 7)
        self.layers["conv02_1"], self.layers["conv02_2"] = c(w, 2 * w, 3, 2, 1), c(2 * w, 2 * w, 3, 1, 1)
        self.layers["conv03_1"], self.layers["conv03_2"] = c(2 * w, 4 * w, 3, 2, 1), c(4 * w, 4 * w, 3, 1, 1)
        for b in range(n_blocks):
            self.layers[f"conv{b + 4:02d}_1"], self.layers[f"conv{b + 4:02d}_2"] = c(4 * w, 4 * w, 3), c(4 * w, 4 * w, 3)
        self.layers["deconv01_1"] = torch.nn.ConvTranspose2d(4 * w, 2 * w, 3, 2, 1, 1)
        self.layers["deconv01_2"] = c(2 * w, 2 * w, 3, 1, 1)
        self.layers["deconv02_1"] = torch.nn.ConvTranspose2d(2 * w, w, 3, 2, 1, 1)
        self.layers["deconv02_2"] = c(w, w, 3, 1, 1)
        self.layers["deconv03_1"] = c(w, 3, 7)
        norms = ["in01_1", "in02_1", "in03_1"] + [f"in{b + 4:02d}_{k}" for b in range(n_blocks) for k in (1, 2)]
        norms += [f"in{n_blocks + 4:02d}_1", f"in{n_blocks + 5:02d}_1"]
        g = torch.Generator().manual_seed(1)
        self.norms = {n: (1 + 0.3 * torch.randn(self._ch(n), generator=g), 0.2 * torch.randn(self._ch(n), generator=g)) for n in norms}

    def _ch(self, name: str) -> int:
        i = int(name[2:4])
        return self.w if i in (1, self.n + 5) else 2 * self.w if i in (2, self.n + 4) else 4 * self.w

    def _in(self, x, name):
        scale, shift = self.norms[name]
        mean = x.mean((2, 3), keepdim=True)
        var = x.var((2, 3), keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + 1e-9) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    def forward(self, bgr):
        L, F = self.layers, torch.nn.functional
        pad = lambda x, p: F.pad(x, (p, p, p, p), mode="reflect")
        y = F.relu(self._in(L["conv01_1"](pad(bgr, 3)), "in01_1"))
        y = F.relu(self._in(L["conv02_2"](L["conv02_1"](y)), "in02_1"))
        y = F.relu(self._in(L["conv03_2"](L["conv03_1"](y)), "in03_1"))
        for b in range(self.n):
            n = b + 4
            t = F.relu(self._in(L[f"conv{n:02d}_1"](pad(y, 1)), f"in{n:02d}_1"))
            y = y + self._in(L[f"conv{n:02d}_2"](pad(t, 1)), f"in{n:02d}_2")
        y = F.relu(self._in(L["deconv01_2"](L["deconv01_1"](y)), f"in{self.n + 4:02d}_1"))
        y = F.relu(self._in(L["deconv02_2"](L["deconv02_1"](y)), f"in{self.n + 5:02d}_1"))
        return torch.tanh(L["deconv03_1"](pad(y, 3)))

    def save_npy(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, layer in self.layers.items():
            np.save(folder / f"{name}.weight.npy", layer.weight.detach().numpy())
            np.save(folder / f"{name}.bias.npy", layer.bias.detach().numpy())
        for name, (scale, shift) in self.norms.items():
            np.save(folder / f"{name}.scale.npy", scale.numpy())
            np.save(folder / f"{name}.shift.npy", shift.numpy())


def test_converted_network_matches_the_original_layout_in_rgb(tmp_path):
    torch.manual_seed(0)
    ref = RefCartoonGAN().eval()
    ref.save_npy(tmp_path / "cg")
    model, report = convert_cartoongan(read_cartoongan(tmp_path / "cg"))
    assert report["config"] == {"width": 4, "n_blocks": 2}
    rgb = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        expected = ref(rgb.flip(1)).flip(1)  # the original works in BGR
        got = model(rgb)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_cli_writes_a_model_folder_every_command_loads(tmp_path):
    RefCartoonGAN().save_npy(tmp_path / "cg")
    assert main(["convert", str(tmp_path / "cg"), "-o", str(tmp_path / "out")]) == 0
    model = load_model(tmp_path / "out")
    assert isinstance(model, CartoonGANGenerator)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "CartoonGAN" in card and "do not redistribute" in card
    # a second conversion into the same folder is refused without --overwrite
    assert main(["convert", str(tmp_path / "cg"), "-o", str(tmp_path / "out")]) == 2


def test_bad_folders_are_refused_with_the_reason(tmp_path):
    ref = RefCartoonGAN()
    ref.save_npy(tmp_path / "cg")
    (tmp_path / "cg" / "conv02_2.weight.npy").unlink()
    with pytest.raises(CheckpointError, match="conv02_2.weight"):
        convert_cartoongan(read_cartoongan(tmp_path / "cg"))
    ref.save_npy(tmp_path / "extra")
    np.save(tmp_path / "extra" / "conv99_1.weight.npy", np.zeros((1, 1, 1, 1), np.float32))
    with pytest.raises(CheckpointError, match="conv99_1"):
        convert_cartoongan(read_cartoongan(tmp_path / "extra"))
    ref.save_npy(tmp_path / "obj")
    np.save(tmp_path / "obj" / "conv01_1.bias.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match="not a plain numeric"):
        read_cartoongan(tmp_path / "obj")


@pytest.mark.skipif(not CARTOONGAN.is_dir(), reason=f"CartoonGAN release not found at {CARTOONGAN} (../shared beside the repository)")
@pytest.mark.slow
def test_real_cartoongan_reproduces_the_authors_outputs():
    model, report = convert_cartoongan(read_cartoongan(CARTOONGAN))
    assert sum(p.numel() for p in model.parameters()) == 11_129_667
    for i in (1, 2, 3):
        img = Image.open(CARTOONGAN / "reference" / f"in{i}.png").convert("RGB")
        w, h = img.size
        # the authors' test script: long side 450, bicubic, sizes truncated
        size = (int(450 / (h / w)), 450) if h > w else (450, int(450 * h / w))
        x = to_tensor(img.resize(size, Image.BICUBIC))
        with torch.no_grad():  # no stride check: the original runs any size (and outputs up to 3 px more)
            y = model.head(model.up(model.blocks(model.down(model.stem(x)))))
        ours = np.clip(np.round((y[0].permute(1, 2, 0).numpy() + 1) * 127.5), 0, 255)
        theirs = np.asarray(Image.open(CARTOONGAN / "reference" / f"in{i}_Hayao.png").convert("RGB"), dtype=np.float64)
        assert ours.shape == theirs.shape
        psnr = 10 * math.log10(255**2 / ((ours - theirs) ** 2).mean())
        assert psnr >= 30, f"in{i}: {psnr:.1f} dB"
