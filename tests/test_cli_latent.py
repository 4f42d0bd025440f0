"""``project`` and ``walk`` commands end to end, with a small generator saved as a checkpoint folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ghibli_core.cli import main as cli_main
from ghibli_core.latent import load_latent, save_latent, seed_ws
from ghibli_core.models import MODELS, HubModel, register_model
from ghibli_core.video import probe

from test_latent import ToyGenerator


if "toy-gan-test" not in MODELS:

    @register_model("toy-gan-test")
    class ToyGAN(HubModel, ToyGenerator):
        """The toy generator as a checkpoint that hub.load can read."""

        def __init__(self, *, z_dim: int = 8, w_dim: int = 6, num_ws: int = 3, res: int = 8, seed: int = 0):
            HubModel.__init__(self)
            ToyGenerator.__init__(self, z_dim=z_dim, w_dim=w_dim, num_ws=num_ws, res=res, seed=seed)


@pytest.fixture()
def gan(tmp_path):
    G = MODELS["toy-gan-test"](res=16)
    G.save_pretrained(tmp_path / "gan")
    return tmp_path / "gan", G.eval()


def _painting(path: Path) -> Path:
    yy, xx = np.mgrid[0:30, 0:40]
    img = np.stack([xx * 6, yy * 8, np.full_like(xx, 120)], -1).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


def test_project_writes_image_latent_and_progress_video(gan, tmp_path):
    folder, G = gan
    out = tmp_path / "proj"
    assert cli_main(["project", str(_painting(tmp_path / "p.png")), "-o", str(out), "--model", str(folder),
                     "--steps", "20", "--record-every", "5", "--fps", "10"]) == 0
    assert Image.open(out / "projected.png").size == (16, 16)
    assert Image.open(out / "target.png").size == (16, 16)
    ws, noise, meta = load_latent(out / "latent.safetensors")
    assert ws.shape == (1, 3, 6) and meta["space"] == "w" and meta["steps"] == "20"
    assert set(noise) == {"b0_noise_const", "b1_noise_const"}
    info = probe(out / "progress.mp4")
    assert info.width == 32 and info.height == 16 and info.frame_count == 4
    assert sorted(p.name for p in out.iterdir()) == ["latent.safetensors", "progress.mp4", "projected.png", "target.png"]


def test_project_rejects_bad_input(gan, tmp_path, capsys):
    folder, _ = gan
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert cli_main(["project", str(bad), "-o", str(tmp_path / "o"), "--model", str(folder)]) != 0
    assert "bad.png" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    style = tmp_path / "cyc"
    from ghibli_core.models import ResnetGenerator

    ResnetGenerator(width=4, n_blocks=1).save_pretrained(style)
    assert cli_main(["project", str(_painting(tmp_path / "p.png")), "-o", str(tmp_path / "o"), "--model", str(style)]) != 0
    assert "not a StyleGAN2 generator" in capsys.readouterr().err


def test_walk_from_seeds_mp4_and_gif(gan, tmp_path):
    folder, G = gan
    mp4 = tmp_path / "walk.mp4"
    assert cli_main(["walk", "--seeds", "1,2,3", "-o", str(mp4), "--model", str(folder), "--frames", "5", "--fps", "10"]) == 0
    info = probe(mp4)
    assert info.frame_count == 11 and (info.width, info.height) == (16, 16) and abs(info.fps - 10) < 1e-6
    gif = tmp_path / "loop.gif"
    assert cli_main(["walk", "--seeds", "1,2", "-o", str(gif), "--model", str(folder), "--frames", "4", "--loop",
                     "--size", "32", "--space", "z", "--easing", "ease-in-out"]) == 0
    im = Image.open(gif)
    assert im.n_frames == 8 and im.size == (32, 32)
    # the first frame is seed 1's image
    first = np.asarray(im.convert("RGB")).astype(int)
    expect = Image.fromarray(((G.synthesis(seed_ws(G, [1])).clamp(-1, 1)[0].permute(1, 2, 0).detach().numpy() + 1) * 127.5).round().astype(np.uint8))
    expect = np.asarray(expect.resize((32, 32), Image.BICUBIC)).astype(int)
    assert np.abs(first - expect).mean() < 20  # GIF palette quantisation aside


def test_walk_from_latent_files_and_noise_loop(gan, tmp_path):
    folder, G = gan
    save_latent(tmp_path / "a.safetensors", seed_ws(G, [1]))
    save_latent(tmp_path / "b.safetensors", seed_ws(G, [2]))
    out = tmp_path / "w.mp4"
    assert cli_main(["walk", "--latents", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                     "-o", str(out), "--model", str(folder), "--frames", "3"]) == 0
    assert probe(out).frame_count == 4
    loop = tmp_path / "n.mp4"
    assert cli_main(["walk", "--latents", str(tmp_path / "a.safetensors"), "--noise-loop", "--stops", "3",
                     "--frames-between", "4", "-o", str(loop), "--model", str(folder)]) == 0
    assert probe(loop).frame_count == 12


def test_walk_errors(gan, tmp_path, capsys):
    folder, G = gan
    base = ["--model", str(folder)]
    assert cli_main(["walk", "--seeds", "1", "-o", str(tmp_path / "w.mp4")] + base) != 0
    assert "at least 2 keyframes" in capsys.readouterr().err
    assert cli_main(["walk", "--seeds", "1,2", "-o", str(tmp_path / "w.avi")] + base) != 0
    assert ".mp4" in capsys.readouterr().err
    save_latent(tmp_path / "odd.safetensors", torch.zeros(1, 5, 6))
    assert cli_main(["walk", "--latents", str(tmp_path / "odd.safetensors"), str(tmp_path / "odd.safetensors"),
                     "-o", str(tmp_path / "w.mp4")] + base) != 0
    assert "(3, 6)" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert cli_main(["walk", "--latents", str(tmp_path / "junk.safetensors"), str(tmp_path / "junk.safetensors"),
                     "-o", str(tmp_path / "w.mp4")] + base) != 0
    assert "not a latent file" in capsys.readouterr().err
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp files left
    with pytest.raises(SystemExit):
        cli_main(["walk", "--seeds", "1,x", "-o", "w.mp4"])
