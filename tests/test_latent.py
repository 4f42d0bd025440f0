"""Latent-space tools on a small generator with the StyleGAN2 interface."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ghibli_core.latent import (
    Evolution,
    latent_stats,
    neighbours,
    noise_buffers,
    noise_loop,
    project,
    render,
    seed_ws,
    seed_z,
    slerp,
    walk,
    walk_length,
)


class _Mapping(nn.Module):
    def __init__(self, z_dim, w_dim, num_ws):
        super().__init__()
        self.num_ws = num_ws
        self.net = nn.Sequential(nn.Linear(z_dim, w_dim), nn.LeakyReLU(0.2), nn.Linear(w_dim, w_dim))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z, truncation_psi=1.0, truncation_cutoff=None):
        w = self.net(z)
        w = self.w_avg + (w - self.w_avg) * truncation_psi
        return w[:, None].repeat(1, self.num_ws, 1)


class _Synthesis(nn.Module):
    def __init__(self, w_dim, num_ws, res):
        super().__init__()
        self.res = res
        self.layers = nn.ModuleList(nn.Linear(w_dim, 3 * res * res) for _ in range(num_ws))
        g = torch.Generator().manual_seed(5)
        self.register_buffer("b0_noise_const", torch.randn(res, res, generator=g))
        self.register_buffer("b1_noise_const", torch.randn(res // 2, res // 2, generator=g))
        self.noise_strength = nn.Parameter(torch.tensor(0.05))

    def forward(self, ws, noise_mode="const"):
        x = sum(layer(ws[:, i]) for i, layer in enumerate(self.layers)).view(-1, 3, self.res, self.res)
        if noise_mode == "const":
            n0, n1 = self.b0_noise_const, self.b1_noise_const
        elif noise_mode == "random":
            n0, n1 = torch.randn(self.res, self.res), torch.randn(self.res // 2, self.res // 2)
        else:
            n0 = n1 = torch.zeros(())
        up = n1.repeat_interleave(2, 0).repeat_interleave(2, 1) if n1.ndim else n1
        return torch.tanh(x + self.noise_strength * (n0 + up))


class ToyGenerator(nn.Module):
    """The interface ghibli_core.latent relies on, at a size that runs in milliseconds."""

    def __init__(self, z_dim=8, w_dim=6, num_ws=3, res=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.z_dim, self.w_dim, self.num_ws, self.resolution = z_dim, w_dim, num_ws, res
        self.mapping = _Mapping(z_dim, w_dim, num_ws)
        self.synthesis = _Synthesis(w_dim, num_ws, res)
        with torch.no_grad():
            self.mapping.w_avg.copy_(self.mapping(torch.randn(2000, z_dim))[:, 0].mean(0))

    def forward(self, z, truncation_psi=1.0, noise_mode="const"):
        return self.synthesis(self.mapping(z, truncation_psi), noise_mode=noise_mode)


@pytest.fixture()
def G():
    return ToyGenerator().eval()


def test_seeds_are_reproducible_and_independent(G):
    a, b = seed_ws(G, [1, 2]), seed_ws(G, [2, 1])
    assert torch.allclose(a[0], b[1], atol=1e-6) and not torch.allclose(a[0], a[1])
    assert seed_z(G, [3]).shape == (1, 8)
    with pytest.raises(ValueError, match="non-negative"):
        seed_z(G, [-1])
    assert torch.equal(seed_ws(G, [4], truncation_psi=0.0)[0, 0], G.mapping.w_avg)


def test_render_with_and_without_substituted_noise(G):
    ws = seed_ws(G, [1, 2, 3])
    img = render(G, ws, batch_size=2)
    assert img.shape == (3, 3, 8, 8) and img.abs().max() <= 1
    assert torch.allclose(img, render(G, ws), atol=1e-6)  # batch size does not matter
    before = G.synthesis.b0_noise_const.clone()
    other = {"b0_noise_const": torch.zeros(8, 8), "b1_noise_const": torch.zeros(4, 4)}
    assert not torch.allclose(render(G, ws, noise=other), img)
    assert torch.equal(G.synthesis.b0_noise_const, before)  # restored afterwards
    with pytest.raises(ValueError, match="do not belong"):
        render(G, ws, noise={"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"\(N, 3, 6\)"):
        render(G, torch.zeros(1, 2, 6))


def test_latent_stats(G):
    mean, std = latent_stats(G, samples=3000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(mean, G.mapping.w_avg, atol=0.1)
    assert std > 0


def test_projection_recovers_a_generated_image(G):
    target_ws = seed_ws(G, [7])
    target = render(G, target_ws)
    start_err = (render(G, G.mapping.w_avg.repeat(1, 3, 1)) - target).square().mean()
    # the latent alone can reproduce the target exactly
    exact = project(G, target, steps=120, lr=0.1, stats_samples=500, optimise_noise=False,
                    generator=torch.Generator().manual_seed(0))
    assert (exact.image - target).square().mean() < 1e-3 * start_err
    # with the noise inputs re-drawn and fitted too (as for real paintings) it gets most of the way
    seen = []
    res = project(G, target, steps=120, lr=0.05, stats_samples=500, record_every=40,
                  generator=torch.Generator().manual_seed(0), callback=lambda s, img, loss: seen.append(s))
    end_err = (res.image - target).square().mean()
    assert end_err < 0.5 * start_err, (float(end_err), float(start_err))
    assert res.ws.shape == (1, 3, 6) and torch.equal(res.ws[0, 0], res.ws[0, 2])  # "w": one vector for all layers
    assert [s for s, _ in res.frames] == [40, 80, 120] and seen == list(range(1, 121))
    assert len(res.losses) == 120 and res.losses[-1] < res.losses[0]
    # the fitted noise reproduces the image; the generator itself was not touched
    assert torch.allclose(render(G, res.ws, noise=res.noise), res.image, atol=1e-5)
    assert set(res.noise) == {n for n, _ in noise_buffers(G)}
    assert not any(p.grad is not None for p in G.parameters())


def test_projection_options_and_errors(G):
    target = torch.rand(1, 3, 12, 20) * 2 - 1  # not square: the centre square is used
    res = project(G, target, steps=5, space="w+", optimise_noise=False, stats_samples=100,
                  generator=torch.Generator().manual_seed(0))
    assert res.ws.shape == (1, 3, 6) and res.noise == {}
    stopped = project(G, target, steps=50, stats_samples=100, callback=lambda s, i, l: s == 3)
    assert len(stopped.losses) == 3 and stopped.frames[-1][0] == 3
    calls = []

    def perceptual(x, layers):
        calls.append(x.shape)
        return {"a": x.mean(1, keepdim=True)}

    project(G, target, steps=2, stats_samples=100, perceptual=perceptual, perceptual_layers=["a"], perceptual_size=4)
    assert calls and calls[0][-1] == 4
    with pytest.raises(ValueError, match="space"):
        project(G, target, space="z")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        project(G, target * 5)
    with pytest.raises(ValueError, match="target must be"):
        project(G, torch.zeros(2, 3, 8, 8))


def test_neighbours(G):
    ws = seed_ws(G, [1])
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = neighbours(ws, n=100, sigma=0.5, generator=g())
    assert a.shape == (100, 3, 6)
    assert torch.equal(a, neighbours(ws, n=100, sigma=0.5, generator=g()))  # seeded
    assert torch.equal(neighbours(ws, n=4, sigma=0.0), ws.expand(4, -1, -1))
    assert torch.equal(a[:, 0], a[:, 2])  # one move for every layer
    spread = (a - ws).std()
    assert 0.4 < float(spread) < 0.6
    wider = neighbours(ws, n=100, sigma=0.5, scale=2.0, generator=g())
    assert torch.allclose(wider - ws, 2 * (a - ws), atol=1e-6)
    assert not torch.equal(neighbours(ws, n=2, sigma=1, per_layer=True)[:, 0], neighbours(ws, n=2, sigma=1)[:, 2])
    with pytest.raises(ValueError, match="one latent"):
        neighbours(seed_ws(G, [1, 2]))


def test_evolution_mean_crossover_and_back(G):
    first = seed_ws(G, [1, 2, 3, 4])
    evo = Evolution(first, population=6, sigma=0.0, generator=torch.Generator().manual_seed(0))
    nxt = evo.evolve([1, 3])
    assert nxt.shape == (6, 3, 6) and evo.generation == 1
    assert torch.allclose(nxt, (first[1] + first[3]).expand(6, -1, -1) / 2)  # sigma 0: the mean
    cross = evo.evolve([0, 5], mode="crossover")
    parents = nxt[[0, 5]]
    for child in cross:
        for layer in range(3):
            assert any(torch.equal(child[layer], p[layer]) for p in parents)
    assert torch.equal(evo.back(), nxt) and evo.generation == 1
    assert torch.equal(evo.back(), first) and torch.equal(evo.back(), first)  # the first stays
    mutated = Evolution(first, population=5, sigma=0.5, generator=torch.Generator().manual_seed(1)).evolve([2])
    assert torch.equal(mutated[0], first[2]) and not torch.equal(mutated[1], first[2])
    with pytest.raises(ValueError, match="not in this generation"):
        evo.evolve([9])
    with pytest.raises(ValueError, match="at least one"):
        evo.evolve([])


def test_walk_in_w_and_z(G):
    keys = seed_ws(G, [1, 2, 3])
    frames = list(walk(keys, frames_per_transition=5))
    assert len(frames) == walk_length(3, frames_per_transition=5) == 11
    assert torch.equal(frames[0][0], keys[0]) and torch.equal(frames[5][0], keys[1]) and torch.equal(frames[-1][0], keys[2])
    assert torch.allclose(frames[2][0], keys[0] + 0.4 * (keys[1] - keys[0]), atol=1e-6)
    looped = list(walk(keys, frames_per_transition=5, loop=True))
    assert len(looped) == walk_length(3, frames_per_transition=5, loop=True) == 15
    assert not torch.equal(looped[-1][0], keys[0])  # the first frame is not repeated at the end
    eased = list(walk(keys, frames_per_transition=4, easing="ease-in-out"))
    assert torch.allclose(eased[1][0], keys[0] + (0.5 - 0.5 * math.cos(math.pi / 4)) * (keys[1] - keys[0]), atol=1e-6)
    zs = seed_z(G, [1, 2])
    mid = list(walk(zs, frames_per_transition=2, space="z"))[1][0]
    assert torch.allclose(mid.norm(), (zs[0].norm() + zs[1].norm()) / 2, rtol=0.1)  # slerp keeps the norm
    with pytest.raises(ValueError, match="at least 2"):
        list(walk(keys[:1]))
    with pytest.raises(ValueError, match="easing"):
        list(walk(keys, easing="bounce"))


def test_slerp_endpoints_and_parallel_vectors():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert torch.allclose(slerp(a, b, torch.tensor(0.0)), a) and torch.allclose(slerp(a, b, torch.tensor(1.0)), b)
    assert torch.allclose(slerp(a, 2 * a, torch.tensor(0.5)), 1.5 * a)


def test_noise_loop_closes_seamlessly(G):
    ws = seed_ws(G, [1])
    frames = torch.cat(list(noise_loop(ws, stops=7, frames_between=30, sigma=0.5, generator=torch.Generator().manual_seed(0))))
    assert frames.shape == (210, 3, 6)
    steps = (frames - frames.roll(1, 0)).norm(dim=(1, 2))  # includes the wrap from last to first
    assert steps.max() < 4 * steps.median()  # no jump where the video loops
    assert not torch.equal(frames[0], frames[-1])
    with pytest.raises(ValueError, match="2 stops"):
        list(noise_loop(ws, stops=1))


def test_the_real_stylegan2_generator_fits_the_interface():
    from ghibli_core.models import StyleGAN2Generator

    torch.manual_seed(0)
    G = StyleGAN2Generator(z_dim=16, w_dim=16, resolution=16, channel_base=256, channel_max=16, mapping_layers=2).eval()
    ws = seed_ws(G, [1, 2])
    assert ws.shape == (2, G.num_ws, 16)
    img = render(G, ws)
    assert img.shape == (2, 3, 16, 16)
    assert noise_buffers(G)
    res = project(G, img[:1], steps=30, stats_samples=200, generator=torch.Generator().manual_seed(0))
    assert res.losses[-1] < res.losses[0]
    assert torch.allclose(render(G, res.ws, noise=res.noise), res.image, atol=1e-4)
    frames = list(walk(ws, frames_per_transition=3))
    assert render(G, torch.cat(frames)).shape == (4, 3, 16, 16)
