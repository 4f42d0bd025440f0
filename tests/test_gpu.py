"""CUDA paths: run with ``python -m pytest -m gpu`` on a machine with a GPU (skipped elsewhere).

The default run (``-m "not slow and not gpu"``) leaves them out; CI has no GPU. They check what
only a GPU can: the stylizer's half-precision path against float32 on the CPU (the speed bar's
accuracy condition, PSNR >= 35 dB), the video pipeline on CUDA, and a few CycleGAN training
steps under mixed precision.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ghibli_core.hub import load
from ghibli_core.stylize import Stylizer
from test_video import psnr  # noqa: E402 - the tests' helpers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"


def _photo(side: int = 512) -> Image.Image:
    found = sorted(PHOTOS.glob("*.jpg")) if PHOTOS.is_dir() else []
    if found:
        img = Image.open(found[0]).convert("RGB")
        return img.resize((side, side * img.height // img.width))
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", ["photo2ghibli", "ghibli-video-fast"])
def test_cuda_auto_precision_is_half_and_close_to_fp32(name):
    model = load(name, map_location="cpu")
    fast = Stylizer(model, device="cuda")
    assert fast.dtype == torch.float16
    exact = Stylizer(model, device="cpu", precision="fp32", fuse=False, channels_last=False)
    img = _photo()
    out = fast(img)
    assert out.size == img.size
    assert psnr(np.asarray(out), np.asarray(exact(img))) >= 35.0


def test_video_pipeline_on_cuda(tmp_path):
    from test_video import make_clip

    from ghibli_core.video import probe, stylize_video

    src = make_clip(tmp_path / "clip.mp4", size=(128, 96), rate=10, seconds=1)
    model = load("ghibli-video-fast", map_location="cpu")
    result = stylize_video(src, tmp_path / "out.mp4", model, height=None, device="cuda")
    info = probe(result.path)
    assert info.frame_count == 10 and (info.width, info.height) == (128, 96)


def test_cyclegan_trains_a_few_steps_with_mixed_precision(tmp_path):
    from test_training import _cfg, _make_domain

    from ghibli_core.training.cyclegan import train_cyclegan

    a = _make_domain(tmp_path / "photos", 5, warm=False, seed=1)
    b = _make_domain(tmp_path / "frames" / "film1", 4, warm=True, seed=2)
    _make_domain(tmp_path / "frames" / "film2", 3, warm=True, seed=3)
    generator = train_cyclegan(_cfg((a, b.parent), tmp_path / "run", mixed_precision="auto"), progress=False)
    weights = load_file(str(generator / "model.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def test_diffusion_in_half_precision_and_offloaded(tmp_path):
    """The diffusion stylizer on CUDA: float16 by default, close to float32 on the CPU; model
    offloading (small GPUs) gives the same pictures and leaves the models on the CPU between
    calls; the ControlNet path runs offloaded too."""
    pytest.importorskip("diffusers")
    from test_diffusion import build_tiny_repos, photo

    from ghibli_core.diffusion import DiffusionStylizer, load_controlnet, load_pipeline

    repos = build_tiny_repos(tmp_path)
    settings = dict(steps=4, strength=0.5, seed=3)
    img = photo((37, 53))
    exact = DiffusionStylizer(load_pipeline(repos.pipeline), device="cpu", **settings)(img)

    half = DiffusionStylizer(load_pipeline(repos.pipeline, dtype=torch.float16), device="cuda", **settings)
    assert half.dtype == torch.float16 and not half.offloaded
    assert half._pipe.unet.dtype == torch.float16 and half._pipe.unet.device.type == "cuda"
    out = half(img)
    assert out.size == img.size
    assert np.array_equal(np.asarray(half(img)), np.asarray(out))  # same seed, same picture
    assert psnr(np.asarray(out), np.asarray(exact)) >= 25.0  # random tiny weights: a loose bar
    torch.cuda.reset_peak_memory_stats()

    offloaded = DiffusionStylizer(
        load_pipeline(repos.pipeline, dtype=torch.float16), controlnet=load_controlnet(repos.controlnet),
        device="cuda", offload="model", structure=False, **settings,
    )
    assert offloaded.offloaded
    moved = offloaded(img)
    assert psnr(np.asarray(moved), np.asarray(out)) >= 40.0
    assert offloaded._pipe.unet.device.type == "cpu"  # back on the CPU after the call
    assert offloaded(img, structure=True).size == img.size
