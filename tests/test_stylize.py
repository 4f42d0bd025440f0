"""The stylization engine (ghibli_core.stylize): any size, tiling without seams, fast paths."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ghibli_core.imaging import to_tensor
from ghibli_core.models import ResnetGenerator, UnetGenerator, shared_statistics
from ghibli_core.stylize import (
    Stylizer,
    _ColumnConv,
    _SubpixelConv,
    _WinogradConv3x3,
    prepare_network,
    resolve_precision,
)


def seeded(cls, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kwargs).eval()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB for images in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / torch.mean((a.float() - b.float()) ** 2).item())


def smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, h, w) in [-1, 1]: a few low-frequency waves."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    ph = torch.rand(3, 3, generator=g) * 2 * math.pi
    img = torch.stack([
        0.6 * torch.sin(6 * xx + ph[c, 0]) * torch.cos(5 * yy + ph[c, 1]) + 0.2 * torch.sin(5 * (xx + yy) + ph[c, 2])
        for c in range(3)
    ])
    return img[None].clamp(-1, 1)


def noise_photo(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# -- exact rewrites -------------------------------------------------------------------------------
@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
@pytest.mark.parametrize("shape", [(1, 128, 16, 16), (2, 128, 9, 13), (1, 128, 2, 3)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_winograd_matches_direct_convolution(pad_mode: str, shape: tuple, channels_last: bool):
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], 96, 3, padding=1 if pad_mode == "zeros" else 0)
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = conv(F.pad(x, (1, 1, 1, 1), mode="reflect")) if pad_mode == "reflect" else conv(x)
    wino = _WinogradConv3x3(conv, pad_mode=pad_mode)
    wino.chunk_bytes = 1 << 16  # force several bands of tile rows
    out = wino(x)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4), (out - expected).abs().max()


def test_subpixel_and_column_convs_match_their_layers():
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 8, 3)
    x = torch.randn(2, 16, 7, 10)
    up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1), conv)
    assert torch.allclose(_SubpixelConv(conv)(x), up(x), atol=1e-5)
    head = nn.Conv2d(16, 3, 7)
    expected = head(F.pad(x, (3, 3, 3, 3), mode="reflect"))
    for layout in (torch.contiguous_format, torch.channels_last):
        assert torch.allclose(_ColumnConv(head, pad=3)(x.contiguous(memory_format=layout)), expected, atol=1e-5)


@pytest.mark.parametrize("upsample", ["resize", "transpose"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_prepared_network_matches_the_model(upsample: str, channels_last: bool):
    # width 32 puts 128 channels in the residual blocks: the Winograd path is taken
    model = seeded(ResnetGenerator, width=32, n_blocks=2, upsample=upsample)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = prepare_network(model, channels_last=channels_last)
    kinds = {type(m).__name__ for m in net.modules()}
    assert {"_WinogradConv3x3", "_FusedInstanceNorm", "_ResidualBlock", "_ColumnConv"} <= kinds
    assert ("_SubpixelConv" in kinds) == (upsample == "resize")
    x = torch.rand(2, 3, 36, 52) * 2 - 1
    with torch.inference_mode():
        assert torch.allclose(net(x), model(x), atol=1e-4)
    # the model handed in is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(type(m).__name__.startswith("_") for m in model.modules())


def test_prepared_unet_matches_the_model():
    model = seeded(UnetGenerator, width=8, n_downs=5)
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.inference_mode():
        assert torch.allclose(prepare_network(model)(x), model(x), atol=1e-5)


# -- any size -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(1, 1), (5, 7), (33, 17), (3, 130), (97, 61)])
def test_any_size_comes_back_at_its_own_size(size: tuple[int, int]):
    stylizer = Stylizer(seeded(ResnetGenerator, width=8, n_blocks=1), tile_size=64, tile_overlap=16)
    w, h = size
    out = stylizer(noise_photo(w, h))
    assert out.size == size and out.mode == "RGB"
    x = torch.rand(2, 3, h, w) * 2 - 1
    y = stylizer.stylize_tensor(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.abs().max() <= 1


def test_padding_does_not_change_an_aligned_image():
    model = seeded(ResnetGenerator, width=8, n_blocks=1)
    x = smooth_image(32, 48)
    with torch.inference_mode():
        expected = model(x)
    assert torch.allclose(Stylizer(model, precision="fp32").stylize_tensor(x), expected, atol=1e-5)


def test_strength_blends_with_the_original():
    stylizer = Stylizer(seeded(ResnetGenerator, width=8, n_blocks=1))
    photo = noise_photo(40, 24, seed=2)
    assert np.array_equal(np.asarray(stylizer(photo, strength=0.0)), np.asarray(photo))
    full = np.asarray(stylizer(photo, strength=1.0)).astype(int)
    half = np.asarray(stylizer(photo, strength=0.5)).astype(int)
    assert np.abs(full - np.asarray(photo)).mean() > 10  # the style changes the image
    assert np.abs(half - (full + np.asarray(photo)) / 2).max() <= 1
    with pytest.raises(ValueError, match="strength"):
        stylizer(photo, strength=1.5)


def test_max_side_caps_the_working_size():
    stylizer = Stylizer(seeded(ResnetGenerator, width=8, n_blocks=1))
    assert stylizer(noise_photo(120, 60), max_side=50).size == (50, 25)


def test_batches_of_mixed_sizes_keep_order_and_match_single_calls():
    stylizer = Stylizer(seeded(ResnetGenerator, width=8, n_blocks=1), batch_size=2)
    photos = [noise_photo(32, 24, seed=i) if i % 2 else noise_photo(20, 28, seed=i) for i in range(5)]
    seen: list[int] = []
    batched = stylizer.stylize_images(photos, progress=seen.append)
    assert sum(seen) == 5 and max(seen) <= 2
    for photo, out in zip(photos, batched):
        assert out.size == photo.size
        single = np.asarray(stylizer(photo)).astype(int)
        assert np.abs(np.asarray(out).astype(int) - single).max() <= 1


# -- tiling -------------------------------------------------------------------------------------
def test_tiling_matches_untiled_and_naive_tiling_does_not():
    model = seeded(ResnetGenerator, width=8, n_blocks=2, upsample="resize")
    x = smooth_image(200, 280)
    untiled = Stylizer(model, tile_size=512).stylize_tensor(x)
    # statistics from the whole image at full size: only the blending differs from untiled
    tiled = Stylizer(model, tile_size=96, tile_overlap=32, stats_size=512).stylize_tensor(x)
    naive = Stylizer(model, tile_size=96, tile_overlap=32, share_statistics=False).stylize_tensor(x)
    assert psnr(tiled, untiled) > 35
    assert psnr(naive, untiled) < psnr(tiled, untiled) - 10


def test_tiles_with_downscaled_statistics_are_seamless():
    # default: statistics from the image downscaled to one tile; the tiled result must equal
    # the untiled network run with those same statistics (blending adds no seams)
    model = seeded(ResnetGenerator, width=8, n_blocks=2, upsample="resize")
    x = smooth_image(200, 280, seed=1)
    stylizer = Stylizer(model, tile_size=96, tile_overlap=32)
    tiled = stylizer.stylize_tensor(x)
    with torch.inference_mode(), shared_statistics(stylizer.network, stylizer._reference(x)):
        untiled_same_stats = stylizer._forward(x)
    assert psnr(tiled, untiled_same_stats) > 35
    naive = Stylizer(model, tile_size=96, tile_overlap=32, share_statistics=False).stylize_tensor(x)
    assert psnr(naive, untiled_same_stats) < psnr(tiled, untiled_same_stats) - 10


# -- precision ----------------------------------------------------------------------------------
def test_fast_path_is_close_to_eager_fp32():
    model = seeded(ResnetGenerator, width=32, n_blocks=2, upsample="resize")
    x = smooth_image(64, 96)
    with torch.inference_mode():
        reference = model(x)
    fast = Stylizer(model)  # precision="auto"
    assert psnr(fast.stylize_tensor(x), reference) > 35
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert psnr(Stylizer(model, precision="bf16").stylize_tensor(x), reference) > 35


def test_resolve_precision(monkeypatch):
    import ghibli_core.stylize as stylize

    assert resolve_precision("auto", "cuda") == torch.float16
    assert resolve_precision("fp32", "cpu") == torch.float32
    monkeypatch.setattr(stylize, "_cpu_has_amx_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == torch.float32
    monkeypatch.setattr(stylize, "_cpu_has_amx_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", "cpu")


# -- errors -------------------------------------------------------------------------------------
def test_bad_inputs_are_clear_errors():
    stylizer = Stylizer(seeded(ResnetGenerator, width=8, n_blocks=1))
    with pytest.raises(ValueError, match=r"\(1, 4, 8, 8\)"):
        stylizer.stylize_tensor(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        stylizer.stylize_tensor(torch.full((1, 3, 8, 8), 255.0))
    with pytest.raises(ValueError, match="RGB"):
        stylizer(Image.new("L", (8, 8)))
    with pytest.raises(TypeError):
        stylizer(to_tensor(noise_photo(8, 8)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tile_overlap"):
        Stylizer(seeded(ResnetGenerator, width=8, n_blocks=1), tile_size=64, tile_overlap=40)

    class Shrinks(nn.Module):
        def forward(self, x):
            return x[..., :-1]

    with pytest.raises(ValueError, match="returned shape"):
        Stylizer(Shrinks()).stylize_tensor(torch.zeros(1, 3, 8, 8))


def test_model_without_stride_or_norms_works():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh()).eval()
    x = torch.rand(1, 3, 21, 17) * 2 - 1  # stride 1 and >= 16 pixels: nothing to pad
    with torch.inference_mode():
        expected = net(x)
    stylizer = Stylizer(net)
    assert torch.allclose(stylizer.stylize_tensor(x), expected, atol=1e-5)
    assert stylizer.stylize_tensor(x[..., :3, :2]).shape == (1, 3, 3, 2)


def test_auto_precision_calibration_picks_bf16_only_when_faster_and_accurate():
    from ghibli_core import stylize

    def fake_timer(seconds):
        def timer(net, x):
            with torch.inference_mode():
                y = net(x).float()
            return seconds[next(p.dtype for p in net.parameters())], y
        return timer

    torch.manual_seed(0)
    net = ResnetGenerator(width=4, n_blocks=1).eval()
    fast_bf16 = fake_timer({torch.float32: 0.1, torch.bfloat16: 0.04})
    slow_bf16 = fake_timer({torch.float32: 0.1, torch.bfloat16: 0.09})
    cheap = fake_timer({torch.float32: 0.005, torch.bfloat16: 0.001})
    stylize._CALIBRATED.clear()
    assert stylize.calibrate_cpu_dtype(net, timer=fast_bf16) == torch.bfloat16
    assert stylize.calibrate_cpu_dtype(net, timer=slow_bf16) == torch.bfloat16  # kept per network shape
    stylize._CALIBRATED.clear()
    assert stylize.calibrate_cpu_dtype(net, timer=slow_bf16) == torch.float32
    stylize._CALIBRATED.clear()
    assert stylize.calibrate_cpu_dtype(net, timer=cheap) == torch.float32  # too cheap to matter

    class Fragile(torch.nn.Module):  # bf16 rounding of the input is amplified far past 40 dB
        stride = 1

        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.tensor(300.0))

        def forward(self, x):
            return torch.sin(x * self.gain)

    stylize._CALIBRATED.clear()
    assert stylize.calibrate_cpu_dtype(Fragile(), timer=fast_bf16) == torch.float32
    stylize._CALIBRATED.clear()
