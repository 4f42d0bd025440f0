"""The reconstruction anchor of ``train stylegan`` (IMLE matching + perceptual pull), on tiny networks."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_projected_gan import PROJECTED_FLAGS, TINY_G, _cfg, _cli, frames, tiny_d  # noqa: F401 (fixture)

from ghibli_core.models import StyleGAN2Generator
from ghibli_core.training.stylegan import imle_select, perceptual_distance, train_stylegan


def _tiny_g(seed: int = 0) -> StyleGAN2Generator:
    torch.manual_seed(seed)
    return StyleGAN2Generator(resolution=16, **TINY_G).eval()


def test_imle_select_returns_the_nearest_samples_latent():
    G = _tiny_g()
    pool = torch.randn(32, G.z_dim, generator=torch.Generator().manual_seed(3))  # what the seeded pool will draw
    with torch.no_grad():
        made = G(pool[[5, 17]], noise_mode="const")
    other = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    targets = torch.cat([made, other])
    z, dist = imle_select(G, targets, pool=32, side=8, generator=torch.Generator().manual_seed(3), batch=7)
    assert torch.equal(z[0], pool[5]) and torch.equal(z[1], pool[17])
    assert dist[:2].max() < 1e-3 and dist[2] > 0.05  # (cdist by matrix products: not exactly 0)
    # the third target's match is the brute-force nearest at 8 px
    with torch.no_grad():
        small = F.adaptive_avg_pool2d(G(pool, noise_mode="const"), 8).flatten(1)
    best = (small - F.adaptive_avg_pool2d(other, 8).flatten(1)).square().sum(1).argmin()
    assert torch.equal(z[2], pool[best])
    # uint8 targets are read as images in [0, 255]
    as_bytes = ((made + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    z8, dist8 = imle_select(G, as_bytes, pool=32, side=8, generator=torch.Generator().manual_seed(3))
    zf, distf = imle_select(G, as_bytes.float() / 127.5 - 1, pool=32, side=8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(z8, zf) and torch.allclose(dist8, distf)


def test_perceptual_distance_is_zero_for_equal_images_and_grows_with_the_difference():
    D = tiny_d(resolution=16)
    real = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    assert perceptual_distance(D, real.clone(), real, 8).abs().max() < 1e-6
    d_small, d_big = (perceptual_distance(D, real + a * noise, real, 8) for a in (0.05, 0.5))
    assert d_small.shape == (3,) and (d_big > d_small).all() and (d_small > 0).all()
    fake = (real + 0.3 * noise).requires_grad_(True)
    perceptual_distance(D, fake, real, 8).sum().backward()
    assert fake.grad.abs().sum() > 0


def test_training_with_the_anchor_resumes_exactly_and_logs_it(frames, tmp_path):  # noqa: F811
    # matchings at steps 0, 2, 4; the split run stops after step 3, between two matchings
    kw = dict(imle_weight=1.0, imle_every=2, imle_pool=8, imle_side=8)
    straight = train_stylegan(_cfg(frames, tmp_path / "straight", **kw), progress=False, cpu=True)
    train_stylegan(_cfg(frames, tmp_path / "split", **kw), progress=False, cpu=True, stop_after=3)
    resumed = train_stylegan(_cfg(frames, tmp_path / "split", **kw), progress=False, cpu=True, resume=True)
    a, b = (load_file(str(p.parent / "generator" / "model.safetensors")) for p in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert all("rec" in r and "imle_dist" in r for r in log)
    plain = train_stylegan(_cfg(frames, tmp_path / "plain"), progress=False, cpu=True)
    c = load_file(str(plain.parent / "generator" / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the anchor changed what G learned
    assert all("rec" not in json.loads(line) for line in (tmp_path / "plain" / "log.jsonl").read_text().splitlines())


def test_the_anchor_pulls_the_matches_towards_the_images(frames, tmp_path):  # noqa: F811
    # a strong anchor and an all but frozen discriminator: the matched samples' distance falls
    cfg = _cfg(frames, tmp_path / "pull", imle_weight=20.0, imle_every=4, imle_pool=16, imle_side=8, steps=48,
               log_every=4, save_every=48, sample_every=48, d_lr=1e-9, g_lr=0.005)
    train_stylegan(cfg, progress=False, cpu=True)
    log = [json.loads(line) for line in (tmp_path / "pull" / "log.jsonl").read_text().splitlines()]
    dist = [r["imle_dist"] for r in log]  # one matching per logged interval
    assert len(dist) == 12 and dist[-1] < 0.5 * dist[0] and sum(dist[-3:]) < 0.6 * sum(dist[:3]), dist


def test_anchor_options_are_checked(frames, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="use discriminator='projected'"):
        _cfg(frames, tmp_path / "a", discriminator="stylegan2", imle_weight=1.0)
    with pytest.raises(ValueError, match="imle_side"):
        _cfg(frames, tmp_path / "a", imle_weight=1.0, imle_side=32)
    with pytest.raises(ValueError, match="imle_weight must not be negative"):
        _cfg(frames, tmp_path / "a", imle_weight=-1.0)
    with pytest.raises(ValueError, match="imle_pool must be at least 1"):
        _cfg(frames, tmp_path / "a", imle_weight=1.0, imle_pool=0)


def test_cli_flags(frames, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert _cli(frames, out, *PROJECTED_FLAGS, "--imle-weight", "2", "--imle-pool", "8", "--imle-side", "8",
                "--imle-every", "3", "--steps", "2") == 0
    config = json.loads((out / "train_config.json").read_text())
    assert (config["imle_weight"], config["imle_pool"], config["imle_side"], config["imle_every"]) == (2.0, 8, 8, 3)
    assert _cli(frames, tmp_path / "bad", "--imle-weight", "1", "--steps", "2") == 2
    assert "use discriminator='projected'" in capsys.readouterr().err
