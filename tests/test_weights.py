"""The embedded defaults in weights/: each loads strictly, has a card, is small, and runs."""
from __future__ import annotations

import torch

from ghibli_core import hub
from ghibli_core.latent import render, seed_ws
from ghibli_core.models import StyleGAN2Generator, read_config


def test_every_embedded_model_loads_and_has_a_card():
    names = hub.embedded_models()
    assert hub.DEFAULT_MODEL in names and hub.DEFAULT_GAN in names and hub.DEFAULT_VIDEO_MODEL in names
    for name in names:
        folder = hub.WEIGHTS_DIR / name
        assert (folder / "README.md").read_text().strip(), name
        assert (folder / "model.safetensors").stat().st_size < 20 * 2**20, name  # a few MB, fp16
        model = hub.load(name)
        assert model.model_type == read_config(folder)["model_type"]


def test_the_photo_default_translates():
    G = hub.load(hub.DEFAULT_MODEL)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        y = G(x)
    assert y.shape == x.shape and torch.isfinite(y).all() and not torch.allclose(y, x, atol=0.05)


def test_the_video_default_is_the_fast_network_and_styles_frames():
    from ghibli_core.models import StyleNet
    from ghibli_core.video import as_frame_model

    assert hub.default_video_model() == hub.DEFAULT_VIDEO_MODEL
    net = hub.load(hub.DEFAULT_VIDEO_MODEL)
    assert isinstance(net, StyleNet) and net._hub_mixin_config["shuffle"] is True
    run = as_frame_model(net, (90, 50))  # odd 480p-like aspect, padded to the stride inside
    x = torch.rand(2, 3, 50, 90) * 2 - 1
    y = run(x)
    assert y.shape == x.shape and torch.isfinite(y).all() and (y - x).abs().mean() > 0.05


def test_the_gan_default_renders_distinct_images():
    G = hub.load(hub.DEFAULT_GAN)
    assert isinstance(G, StyleGAN2Generator)
    images = render(G, seed_ws(G, [1, 2]))
    assert images.shape == (2, 3, G.resolution, G.resolution) and torch.isfinite(images).all()
    assert (images[0] - images[1]).abs().mean() > 0.01


def test_every_embedded_card_declares_its_held_out_kid():
    # the convention of hub.card_metrics, which the app's model pickers and notice show
    for name in hub.embedded_models():
        figures = hub.card_metrics(hub.WEIGHTS_DIR / name)
        assert figures["kid_x1000"] > 0 and figures["kid_films"], name
        assert f"{figures['kid_x1000']:.2f}" in (hub.WEIGHTS_DIR / name / "README.md").read_text().split("\n---\n", 1)[1], name
        assert figures["kid_baseline"] and figures["kid_baseline_x1000"] > 0, name
