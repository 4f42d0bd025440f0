"""The latent-space tabs end to end over gradio_client: projection, neighbours, evolution, walk."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import app  # noqa: E402
from ghibli_core.latent import load_latent, save_latent  # noqa: E402
from ghibli_core.models import ResnetGenerator, StyleGAN2Generator  # noqa: E402
from ghibli_core.video import probe  # noqa: E402

from test_app import launch_on_loopback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")
TINY = dict(z_dim=16, w_dim=16, resolution=16, channel_base=256, channel_max=16, mapping_layers=2)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_app")
    torch.manual_seed(0)
    StyleGAN2Generator(**TINY).save_pretrained(root / "weights" / "gan")
    (root / "weights" / "gan" / "README.md").write_text("# tiny gan\n")
    ResnetGenerator(width=4, n_blocks=1).save_pretrained(root / "weights" / "tiny")
    demo = app.build_app(weights_dir=root / "weights", default_model="tiny", default_gan="gan", device="cpu")
    launch_on_loopback(demo)
    try:
        yield demo, root
    finally:
        demo.close()


@pytest.fixture()
def client(served):
    demo, root = served  # a new client is a new session (its own state)
    return Client(demo.local_url, verbose=False, download_files=str(root / "downloads"), analytics_enabled=False,
                    httpx_kwargs={"timeout": 300}), root


def painting(path):
    yy, xx = np.mgrid[0:40, 0:50]
    Image.fromarray(np.stack([xx * 5, yy * 6, np.full_like(xx, 90)], -1).astype(np.uint8)).save(path)
    return str(path)


def _projected(c, root):
    return c.predict(handle_file(painting(root / "p.png")), None, "gan", "", "", 20, "w", api_name="/project")


def test_models_are_offered_by_kind(served):
    demo, _ = served
    models = demo.ghibli_context.models
    assert models.embedded("image") == ["tiny"] and models.embedded("gan") == ["gan"]
    with pytest.raises(ValueError, match="unknown model"):
        models.spec("gan", "", "")  # a GAN is not an image model
    assert models.spec("gan", "", "", kind="gan") == "gan"


def test_video_tab_prefers_the_video_model(tmp_path):
    weights = tmp_path / "weights"
    torch.manual_seed(0)
    ResnetGenerator(width=4, n_blocks=1).save_pretrained(weights / "photo")
    models = app.Models(weights_dir=weights, default_model="photo", default_video="fast")
    assert models.initial_choice("video") == "photo"  # no video model installed: the photo default
    from ghibli_core.models import StyleNet

    StyleNet(width=4, n_blocks=1, kernel=3, shuffle=True).save_pretrained(weights / "fast")
    assert models.initial_choice("video") == "fast" and models.initial_choice("image") == "photo"
    assert models.embedded("video") == models.embedded("image") == ["fast", "photo"]


def test_projection_then_neighbours_evolution_and_back(client):
    c, root = client
    preview, status, latent, target = _projected(c, root)
    assert Image.open(preview).size == (16, 16) and "projected in 20 steps" in status
    # the target beside it: the painting's centre square (40x40 of 50x40) at the generator's 16 px
    want = np.asarray(Image.open(root / "p.png").crop((5, 0, 45, 40)).resize((16, 16), Image.Resampling.LANCZOS), int)
    assert np.abs(np.asarray(Image.open(target).convert("RGB"), int) - want).max() <= 1
    ws, noise, meta = load_latent(latent)
    assert ws.shape[0] == 1 and ws.shape[2] == 16 and noise and meta["space"] == "w"
    gallery, favourites, status = c.predict("gan", "", "", 0.0, 6, 0, api_name="/neighbours")
    assert len(gallery) == 6 and favourites == ""
    first = [np.asarray(Image.open(g["image"])).astype(int) for g in gallery]
    assert all(np.abs(f - first[0]).max() == 0 for f in first)  # sigma 0: the latent itself, 6 times
    gallery, _, _ = c.predict("gan", "", "", 1.0, 6, 0, api_name="/neighbours")
    spread = [np.asarray(Image.open(g["image"])).astype(int) for g in gallery]
    assert any(np.abs(s - spread[0]).max() > 0 for s in spread[1:])
    evolved, favourites, status = c.predict("gan", "", "", "1, 3", 0.0, "mean", api_name="/evolve")
    assert len(evolved) == 6 and "generation 1" in status
    back, _, status = c.predict("gan", "", "", api_name="/evolve_back")
    assert "generation 0" in status
    again = [np.asarray(Image.open(g["image"])).astype(int) for g in back]
    assert all(np.array_equal(a, b) for a, b in zip(again, spread))


def test_walk_from_gallery_seeds_and_files(client):
    c, root = client
    keys, status = c.predict("gan", "", "", "1, 2", api_name="/add_seeds")
    assert len(keys) == 2 and "2 keyframes" in status
    video, gif, download, status = c.predict("gan", "", "", "walk", 4, 10, "linear", False, 7, 30, 0.5, "mp4", api_name="/walk")
    info = probe(video["video"] if isinstance(video, dict) else video)
    assert info.frame_count == 5 and abs(info.fps - 10) < 1e-6 and gif is None
    video, gif, download, status = c.predict("gan", "", "", "noise loop", 4, 10, "ease-in-out", False, 3, 4, 0.5, "gif", api_name="/walk")
    assert video is None and Image.open(gif).n_frames == 12
    # a latent file from elsewhere
    G = StyleGAN2Generator(**TINY)
    save_latent(root / "k.safetensors", torch.zeros(1, G.num_ws, 16))
    keys, status = c.predict("gan", "", "", handle_file(str(root / "k.safetensors")), api_name="/add_latent_file")
    assert len(keys) == 3
    keys, status = c.predict(api_name="/clear_keyframes")
    assert keys == [] or keys is None


def test_send_to_walk_uses_favourites_or_the_projection(client):
    c, root = client
    _projected(c, root)
    keys, status = c.predict("gan", "", "", "", api_name="/send_to_walk")
    assert len(keys) == 1 and "the projection" in status
    c.predict("gan", "", "", 4, 1, api_name="/random_images")
    keys, status = c.predict("gan", "", "", "0, 3", api_name="/send_to_walk")
    assert len(keys) == 3


@pytest.mark.parametrize(
    "api, args, message",
    [
        ("/neighbours", ("gan", "", "", 0.5, 4, 0), "project a painting first"),
        ("/evolve", ("gan", "", "", "0", 0.5, "mean"), "first"),
        ("/walk", ("gan", "", "", "walk", 4, 10, "linear", False, 7, 30, 0.5, "mp4"), "at least 2 keyframes"),
        ("/add_seeds", ("gan", "", "", "1, x"), "whole numbers"),
        ("/add_seeds", ("tiny", "", "", "1"), "not in the list of choices"),
        ("/walk", ("gan", "", "", "walk", 300, 10, "linear", True, 7, 30, 0.5, "mp4"), None),
    ],
)
def test_mistakes_are_clean_errors(client, api, args, message):
    c, _ = client
    if api == "/walk" and args[4] == 300:
        c.predict("gan", "", "", "1, 2, 3, 4", api_name="/add_seeds")  # 4 x 300 frames, looped
        message = "at most 900"
    with pytest.raises(AppError, match=message):
        c.predict(*args, api_name=api)


def test_bad_uploads_are_clean_errors(client):
    c, root = client
    bad = root / "bad.png"
    bad.write_bytes(b"<html>not an image</html>")
    with pytest.raises(AppError, match="bad.png"):
        c.predict(handle_file(str(bad)), None, "gan", "", "", 20, "w", api_name="/project")
    save_latent(root / "wrong.safetensors", torch.zeros(1, 3, 5))
    with pytest.raises(AppError, match="this model needs"):
        c.predict("gan", "", "", handle_file(str(root / "wrong.safetensors")), api_name="/add_latent_file")
    (root / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(AppError, match="not a latent file"):
        c.predict("gan", "", "", handle_file(str(root / "junk.safetensors")), api_name="/add_latent_file")
