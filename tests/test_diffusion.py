"""ghibli_core.diffusion on tiny random Stable Diffusion pipelines, served by the fake Hub.

The components are built here at the sizes diffusers' own tests use (a UNet with 32/64 channels,
a two-block VAE, a two-layer CLIP text encoder from a config, a CLIP tokenizer from a vocab.json
and merges.txt written here), saved in diffusers layout, published to tests/hub_server.py's fake
Hub and loaded through the real download path. Every run is 2 denoising steps at a few dozen
pixels. The fp16 and offload paths need CUDA: tests/test_gpu.py.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ghibli_core import diffusion  # noqa: E402
from ghibli_core.diffusion import (  # noqa: E402
    DEFAULT_DIFFUSION_MODEL,
    DEFAULT_DIFFUSION_REVISION,
    DiffusionStylizer,
    as_teacher,
    canny_edges,
    gpu_task,
    load_diffusion,
    parse_diffusion_spec,
    resolve_pipeline,
    tensor_teacher,
)
from ghibli_core.hub import CheckpointError, ModelNotAvailable, ModelNotFound  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub  # noqa: E402

REPO = "tester/tiny-sd"
CONTROLNET_REPO = "tester/tiny-canny"
LORA_REPO = "tester/tiny-lora"
CARD = "---\nlicense: creativeml-openrail-m\n---\n# Tiny SD\nRandom weights, for tests.\n"
FAST = dict(steps=4, strength=0.5)  # 2 denoising steps


# -- tiny components -------------------------------------------------------------------------
def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (the alphabet of CLIP's BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def tiny_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars), "gh", "ghi", "st", "sty"]:
        vocab.setdefault(token, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\ng h\ngh i\ns t\nst y\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=32,
    )


def build_tiny_repos(root: Path) -> SimpleNamespace:
    """A tiny SD pipeline, a matching and a mismatched ControlNet, a LoRA and a .bin-only
    pipeline, each saved as a repo folder under ``root``."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = tiny_unet(0)
    torch.manual_seed(1)
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
    )
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=1000, max_position_embeddings=77,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(root / "vocab"), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline = root / "tiny-sd"
    pipe.save_pretrained(pipeline)
    (pipeline / "README.md").write_text(CARD)

    # ControlNets: one made from this UNet, one for another base model (other text width)
    torch.manual_seed(3)
    controlnet = root / "tiny-canny"
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # from_unet zero-initialises the output convolutions: give them weight
        for name, p in net.named_parameters():
            if "zero_conv" in name or "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                p.copy_(0.1 * torch.randn_like(p))
    net.save_pretrained(controlnet)
    mismatched = root / "other-canny"
    ControlNetModel.from_unet(tiny_unet(0, cross_attention_dim=16), conditioning_embedding_out_channels=(16, 32)).save_pretrained(mismatched)

    # a LoRA on the UNet's attention projections, with non-zero weights so it shows
    lora_unet = tiny_unet(0)
    torch.manual_seed(4)
    lora_unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    lora = root / "tiny-lora"
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(lora_unet))
    StableDiffusionPipeline.save_lora_weights(lora, unet_lora_layers=layers, safe_serialization=True)

    # the same pipeline with pickled weights only (what old repos hold): must never be unpickled
    pickled = root / "pickled-sd"
    pipe.save_pretrained(pickled, safe_serialization=False)
    return SimpleNamespace(pipeline=pipeline, controlnet=controlnet, mismatched=mismatched, lora=lora, pickled=pickled)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def publish(server: FakeHub, repos: SimpleNamespace) -> dict[str, str]:
    """Commit the tiny repos to ``server``; returns repo id -> commit sha."""
    return {
        REPO: server.add_commit(REPO, folder_files(repos.pipeline)),
        CONTROLNET_REPO: server.add_commit(CONTROLNET_REPO, folder_files(repos.controlnet)),
        LORA_REPO: server.add_commit(LORA_REPO, folder_files(repos.lora)),
        "tester/other-canny": server.add_commit("tester/other-canny", folder_files(repos.mismatched)),
        "tester/pickled-sd": server.add_commit("tester/pickled-sd", folder_files(repos.pickled)),
    }


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth test picture with an edge (so Canny finds something) plus a little noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), 255 * (xx > w // 2)], -1)
    img = img + rng.integers(-20, 21, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> SimpleNamespace:
    return build_tiny_repos(tmp_path_factory.mktemp("tiny-repos"))


@pytest.fixture(scope="module")
def served(repos, tmp_path_factory):
    """(server, shas, cache): the tiny repos on a fake Hub this module's huggingface_hub talks to."""
    with pytest.MonkeyPatch.context() as mp:
        server = FakeHub().start()
        cache = server.patch_huggingface_hub(mp, tmp_path_factory.mktemp("hf"))
        try:
            yield server, publish(server, repos), cache
        finally:
            server.down()


@pytest.fixture(scope="module")
def stylizer(served) -> DiffusionStylizer:
    server, shas, _ = served
    return load_diffusion(f"{REPO}@{shas[REPO]}", **FAST)


@pytest.fixture
def fresh_hub(repos, tmp_path, monkeypatch):
    """A fake Hub of this test's own (it may go down) with an empty cache."""
    server = FakeHub().start()
    server.cache = server.patch_huggingface_hub(monkeypatch, tmp_path / "hf")
    server.shas = publish(server, repos)
    yield server
    server.down()


# -- specs -----------------------------------------------------------------------------------
def test_diffusion_specs():
    assert parse_diffusion_spec("diffusion:") == (DEFAULT_DIFFUSION_MODEL, DEFAULT_DIFFUSION_REVISION)
    assert parse_diffusion_spec("diffusion:owner/name") == ("owner/name", None)
    assert parse_diffusion_spec(" diffusion:owner/name@v2 ") == ("owner/name", "v2")
    assert diffusion.is_diffusion_spec("diffusion:x/y") and not diffusion.is_diffusion_spec("photo2ghibli")
    with pytest.raises(ValueError, match="empty revision"):
        parse_diffusion_spec("diffusion:owner/name@")
    with pytest.raises(ValueError, match="starts with 'diffusion:'"):
        parse_diffusion_spec("owner/name")
    assert len(DEFAULT_DIFFUSION_REVISION) == 40  # a commit, not a branch


# -- the Hub: pinned, cached, offline, down ----------------------------------------------------
def test_pinned_download_then_offline_and_hub_down(fresh_hub):
    sha = fresh_hub.shas[REPO]
    folder = resolve_pipeline(f"{REPO}@{sha}")
    assert folder.name == sha and Path(fresh_hub.cache) in folder.parents
    assert (folder / "model_index.json").is_file() and (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    first = load_diffusion(f"diffusion:{REPO}@{sha}", **FAST)(photo((40, 30)))
    assert first.size == (40, 30)
    assert first.size == (40, 30) and diffusion._source(folder) == f"{REPO}@{sha}"

    # a pinned commit in the cache is not looked up again, and survives the Hub going down
    fresh_hub.clear_requests()
    assert resolve_pipeline(f"{REPO}@{sha}") == folder
    assert fresh_hub.requests == []
    fresh_hub.down()
    again = load_diffusion(f"{REPO}@{sha}", **FAST)(photo((40, 30)))
    assert np.array_equal(pixels(again), pixels(first))
    assert resolve_pipeline(f"{REPO}@{sha}", offline=True) == folder


def test_branch_falls_back_to_the_cache_when_the_hub_is_down(fresh_hub):
    folder = resolve_pipeline(REPO)  # main
    fresh_hub.down()
    assert resolve_pipeline(REPO) == folder
    with pytest.raises(ModelNotAvailable) as info:  # never downloaded: nothing to fall back on
        resolve_pipeline(CONTROLNET_REPO)
    assert f"{CONTROLNET_REPO}@main" in str(info.value) and "pull diffusion:" in str(info.value)


def test_offline_with_nothing_cached_says_what_to_do(fresh_hub):
    with pytest.raises(ModelNotAvailable, match="offline mode was requested") as info:
        resolve_pipeline(f"{REPO}@{fresh_hub.shas[REPO]}", offline=True)
    assert REPO in str(info.value) and fresh_hub.shas[REPO] in str(info.value)
    assert fresh_hub.requests == []


def test_wrong_revision_and_missing_repo_are_clear_errors(fresh_hub):
    with pytest.raises(ModelNotFound, match="revision 'f{40}' does not exist") as info:
        resolve_pipeline(f"{REPO}@{'f' * 40}")
    assert REPO in str(info.value)
    with pytest.raises(ModelNotFound, match="not found"):
        resolve_pipeline("tester/no-such-model")
    # the default model's pin: the error names the constant to update and the README
    fresh_hub.add_commit(DEFAULT_DIFFUSION_MODEL, folder_files(Path(resolve_pipeline(REPO))))
    with pytest.raises(ModelNotFound) as info:
        resolve_pipeline()
    message = str(info.value)
    assert DEFAULT_DIFFUSION_MODEL in message and DEFAULT_DIFFUSION_REVISION in message
    assert "DEFAULT_DIFFUSION_REVISION" in message and "README" in message


def test_bin_only_repo_is_refused_without_fetching_the_pickles(fresh_hub):
    with pytest.raises(CheckpointError, match="only pickled weights") as info:
        resolve_pipeline("tester/pickled-sd")
    assert "diffusion_pytorch_model.bin" in str(info.value) and "safetensors" in str(info.value)
    assert not [r for r in fresh_hub.requests if r.path.endswith(".bin")]
    cached = list(Path(fresh_hub.cache).rglob("*.bin"))
    assert cached == []


def test_only_safetensors_configs_and_card_are_fetched(fresh_hub, repos):
    extra = {
        "unet/diffusion_pytorch_model.bin": b"pickle that must not travel",
        "unet/diffusion_pytorch_model.fp16.safetensors": b"a second copy",
        "tiny-sd.ckpt": b"single-file checkpoint",
        "tiny-sd.safetensors": b"single-file checkpoint",
        "safety_checker/model.safetensors": b"not loaded",
        "pipeline.py": b"import os",
    }
    sha = fresh_hub.add_commit(REPO, extra)
    folder = resolve_pipeline(f"{REPO}@{sha}")
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == sorted(folder_files(repos.pipeline))


def test_custom_code_and_other_pipelines_are_refused(tmp_path, repos):
    import shutil

    custom = tmp_path / "custom"
    shutil.copytree(repos.pipeline, custom)
    index = json.loads((custom / "model_index.json").read_text())
    index["unet"] = ["my_module", "MyUNet"]
    (custom / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'my_module', which would run code"):
        resolve_pipeline(str(custom))
    index["_class_name"] = "FluxPipeline"
    (custom / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'FluxPipeline' pipeline"):
        resolve_pipeline(str(custom))
    with pytest.raises(CheckpointError, match="no model_index.json"):
        resolve_pipeline(str(repos.lora))
    with pytest.raises(ValueError, match="only applies to Hub repos"):
        resolve_pipeline(str(repos.pipeline), revision="main")


# -- the stylizer ----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(37, 53), (53, 37), (61, 9), (20, 20)])
def test_output_has_the_photo_size(stylizer, size):
    out = stylizer(photo(size))
    assert out.size == size and out.mode == "RGB"


def test_working_size_keeps_the_shape_within_the_bounds(stylizer):
    s = stylizer.settings
    assert (s.min_side, s.max_side) == (32, 48)  # the tiny model's native 16 x 2 px, and 1.5x
    assert stylizer.working_size((37, 53)) == (34, 48)
    assert stylizer.working_size((10, 16)) == (20, 32)  # small photos are worked on larger
    assert stylizer.working_size((1000, 1)) == (48, 2)


def test_same_seed_same_picture_other_seed_other_picture(stylizer):
    img = photo((40, 30), seed=1)
    a, b = stylizer(img, seed=7), stylizer(img, seed=7)
    assert np.array_equal(pixels(a), pixels(b))
    c = stylizer(img, seed=8)
    assert np.abs(pixels(a) - pixels(c)).mean() > 1
    # and a photo's result does not depend on the others in the batch
    batch = stylizer.stylize_images([photo((20, 20), seed=5), img], seed=7)
    assert np.array_equal(pixels(batch[1]), pixels(a))


def test_strength_zero_keeps_the_photo_and_more_strength_moves_further(stylizer):
    img = photo((40, 30), seed=2)
    assert np.array_equal(pixels(stylizer(img, strength=0.0)), pixels(img))
    near = np.abs(pixels(stylizer(img, strength=0.25, steps=8)) - pixels(img)).mean()
    far = np.abs(pixels(stylizer(img, strength=1.0, steps=2)) - pixels(img)).mean()
    assert near < far


def test_progress_is_reported_per_denoising_step(stylizer):
    calls = []
    stylizer.stylize_images([photo((20, 20)), photo((30, 20))], progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_prompt_changes_the_picture(stylizer):
    img = photo((40, 30), seed=3)
    a, b = stylizer(img), stylizer(img, prompt="a city street at night")
    assert not np.array_equal(pixels(a), pixels(b))


def test_vae_tiling_for_large_working_sizes(stylizer):
    stylizer.vae_tiling_above = 40
    try:
        stylizer(photo((30, 20)))
        assert not stylizer._pipe.vae.use_tiling
        assert stylizer(photo((90, 60)), max_side=64).size == (90, 60)
        assert stylizer._pipe.vae.use_tiling
    finally:
        stylizer.vae_tiling_above = 1024


@pytest.mark.parametrize(
    "image, overrides, error, match",
    [
        ("not an image", {}, TypeError, "expected a PIL image"),
        (Image.new("L", (20, 20)), {}, ValueError, "expected an RGB image"),
        (None, {"strength": 1.5}, ValueError, "strength must be between 0 and 1"),
        (None, {"strength": float("nan")}, ValueError, "strength must be between"),
        (None, {"steps": 0}, ValueError, "steps must be between 1"),
        (None, {"steps": 2.5}, ValueError, "steps must be an integer"),
        (None, {"steps": 3, "strength": 0.2}, ValueError, "runs no denoising step.*at least 5"),
        (None, {"seed": -1}, ValueError, "seed must be between"),
        (None, {"guidance": -1}, ValueError, "guidance must be between"),
        (None, {"prompt": 3}, ValueError, "prompt must be text"),
        (None, {"prompt": "x" * 5000}, ValueError, "at most 1000"),
        (None, {"max_side": 1}, ValueError, "max side must be between 2"),
        (None, {"structure": True}, ValueError, "needs a ControlNet"),
        (None, {"colour": "blue"}, TypeError, "unknown setting.*colour"),
    ],
)
def test_bad_inputs_are_clear_errors(stylizer, image, overrides, error, match):
    with pytest.raises(error, match=match):
        stylizer(photo((20, 20)) if image is None else image, **overrides)


def test_bad_construction_is_a_clear_error(stylizer):
    pipe = stylizer._pipe
    with pytest.raises(ValueError, match="'fp16' needs a GPU"):
        DiffusionStylizer(pipe, precision="fp16")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        DiffusionStylizer(pipe, offload="model")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            DiffusionStylizer(pipe, device="cuda")
    with pytest.raises(ValueError, match="min side .* must not exceed max side"):
        DiffusionStylizer(pipe, min_side=64, max_side=32)


def test_offload_decision():
    gib = 1024**3
    assert not diffusion.needs_offload(2 * gib, 24 * gib)  # SD 1.5 in fp16 on a 24 GB card
    assert diffusion.needs_offload(2 * gib, 5 * gib)       # ... on a 5 GB one
    assert diffusion.needs_offload(7 * gib, 10 * gib)      # SDXL on 10 GB


# -- ControlNet --------------------------------------------------------------------------------
def test_canny_edges():
    edges = canny_edges(photo((40, 30)))
    assert edges.size == (40, 30) and edges.mode == "RGB"
    values = np.unique(np.asarray(edges))
    assert set(values) <= {0, 255} and 255 in values
    with pytest.raises(ValueError, match="low < high"):
        canny_edges(photo((40, 30)), 200, 100)


def test_structure_with_a_controlnet_from_the_hub(served):
    server, shas, _ = served
    styl = load_diffusion(
        f"{REPO}@{shas[REPO]}", controlnet=f"{CONTROLNET_REPO}@{shas[CONTROLNET_REPO]}", **FAST
    )
    assert styl.settings.structure and styl.sources["controlnet"] == f"{CONTROLNET_REPO}@{shas[CONTROLNET_REPO]}"
    img = photo((37, 53), seed=4)
    shaped = styl(img)
    assert shaped.size == (37, 53)
    plain = styl(img, structure=False)
    assert not np.array_equal(pixels(shaped), pixels(plain))
    # structure off is exactly the pipeline without a ControlNet
    alone = load_diffusion(f"{REPO}@{shas[REPO]}", **FAST)
    assert np.array_equal(pixels(plain), pixels(alone(img)))
    with pytest.raises(ValueError, match="made for another base model.*cross_attention_dim"):
        load_diffusion(f"{REPO}@{shas[REPO]}", controlnet=f"tester/other-canny@{shas['tester/other-canny']}")
    with pytest.raises(CheckpointError, match="not a diffusers ControlNet"):
        load_diffusion(f"{REPO}@{shas[REPO]}", controlnet=f"{LORA_REPO}@{shas[LORA_REPO]}")


# -- LoRA ----------------------------------------------------------------------------------------
def test_lora_changes_the_picture_and_unloading_restores_it(served, stylizer):
    server, shas, _ = served
    img = photo((40, 30), seed=5)
    before = stylizer(img)
    folder, name = diffusion.resolve_lora(f"{LORA_REPO}@{shas[LORA_REPO]}")
    assert name == "pytorch_lora_weights.safetensors"
    stylizer.load_lora(folder)
    try:
        assert stylizer.lora["source"].startswith(f"{LORA_REPO}@{shas[LORA_REPO]}")
        with_lora = stylizer(img)
        assert np.abs(pixels(with_lora) - pixels(before)).mean() > 0.5
        stylizer.set_lora_weight(0.0)
        assert np.array_equal(pixels(stylizer(img)), pixels(before))
        stylizer.set_lora_weight(1.0)
        assert np.array_equal(pixels(stylizer(img)), pixels(with_lora))
    finally:
        stylizer.unload_lora()
    assert stylizer.lora is None
    assert np.array_equal(pixels(stylizer(img)), pixels(before))
    with pytest.raises(ValueError, match="LoRA weight must be between 0 and 2"):
        stylizer.load_lora(folder, weight=5)
    with pytest.raises(ValueError, match="no LoRA is loaded"):
        stylizer.set_lora_weight(0.5)
    with pytest.raises(CheckpointError, match="has no 'missing.safetensors'"):
        stylizer.load_lora(folder, weight_name="missing.safetensors")


# -- as a teacher, on Spaces ----------------------------------------------------------------------
def test_teacher_caches_its_outputs_on_disk(stylizer, tmp_path, monkeypatch):
    images = [photo((20, 20), seed=6), photo((30, 20), seed=7)]
    teach = as_teacher(stylizer, cache_dir=tmp_path / "pairs")
    first = teach(images)
    assert [im.size for im in first] == [(20, 20), (30, 20)]
    assert len(list((tmp_path / "pairs").rglob("*.png"))) == 2

    def no_more(*args, **kwargs):
        raise AssertionError("the cached outputs should have been read back")

    monkeypatch.setattr(stylizer, "stylize_images", no_more)
    again = as_teacher(stylizer, cache_dir=tmp_path / "pairs")(images)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(first, again))
    monkeypatch.undo()
    # other settings are other outputs, not the cached ones
    other = as_teacher(stylizer, cache_dir=tmp_path / "pairs", seed=99)(images[:1])
    assert len(list((tmp_path / "pairs").rglob("*.png"))) == 3
    assert not np.array_equal(pixels(other[0]), pixels(first[0]))

    x = torch.rand(2, 3, 20, 20) * 2 - 1  # (N, 3, H, W) in [-1, 1]
    y = tensor_teacher(stylizer)(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.min() >= -1 and y.max() <= 1
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        tensor_teacher(stylizer)(torch.zeros(3, 20, 20))
    with pytest.raises(ValueError, match="strength must be between"):
        as_teacher(stylizer, strength=2)


def test_gpu_task_uses_spaces_when_installed(monkeypatch):
    def work(x):
        return x + 1

    monkeypatch.setitem(sys.modules, "spaces", None)  # not installed: the function itself
    assert gpu_task(work) is work and gpu_task(duration=30)(work) is work
    seen = {}

    def GPU(duration):
        seen["duration"] = duration
        return lambda fn: lambda *a: ("on a GPU", fn(*a))

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    assert gpu_task(duration=30)(work)(1) == ("on a GPU", 2) and seen == {"duration": 30}


# -- the CLI ---------------------------------------------------------------------------------------
def test_cli_stylize_with_a_diffusion_model(served, tmp_path, capsys):
    from ghibli_core.cli import main as cli_main

    server, shas, _ = served
    (tmp_path / "in").mkdir()
    photo((37, 53)).save(tmp_path / "in" / "a.png")
    photo((53, 37), seed=1).save(tmp_path / "in" / "b.png")
    model = f"diffusion:{REPO}@{shas[REPO]}"
    code = cli_main([
        "stylize", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", model,
        "--diffusion-steps", "4", "--diffusion-strength", "0.5", "--seed", "3", "--prompt", "ghibli style, a meadow",
        "--structure-model", f"{CONTROLNET_REPO}@{shas[CONTROLNET_REPO]}",
        "--lora", f"{LORA_REPO}@{shas[LORA_REPO]}", "--lora-weight", "0.5",
    ])
    assert code == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (37, 53)
    assert Image.open(tmp_path / "out" / "b.png").size == (53, 37)
    err = capsys.readouterr().err
    assert f"model {REPO}@{shas[REPO]}" in err and f"controlnet {CONTROLNET_REPO}@" in err  # commits to pin
    # the library's picture, and --strength blends it with the photo as for every model
    expected = load_diffusion(model, steps=4, strength=0.5, seed=3)(photo((37, 53)))
    assert cli_main(["stylize", str(tmp_path / "in" / "a.png"), "-o", str(tmp_path / "one.png"), "--model", model,
                     "--diffusion-steps", "4", "--diffusion-strength", "0.5", "--seed", "3"]) == 0
    assert np.array_equal(pixels(Image.open(tmp_path / "one.png")), pixels(expected))
    assert cli_main(["stylize", str(tmp_path / "in" / "a.png"), "-o", str(tmp_path / "zero.png"), "--model", model,
                     "--strength", "0"]) == 0
    assert np.array_equal(pixels(Image.open(tmp_path / "zero.png")), pixels(photo((37, 53))))
    capsys.readouterr()

    assert cli_main(["stylize", str(tmp_path / "in" / "a.png"), "-o", str(tmp_path / "x.png"),
                     "--model", f"diffusion:{REPO}@{'0' * 40}"]) == 2
    assert f"{REPO} at revision '{'0' * 40}'" in capsys.readouterr().err  # a clean message, no traceback
    assert cli_main(["stylize", str(tmp_path / "in" / "a.png"), "-o", str(tmp_path / "x.png"), "--prompt", "x",
                     "--seed", "1"]) == 2
    assert "--prompt, --seed only apply to diffusion models" in capsys.readouterr().err


def test_pull_caches_a_diffusion_model(fresh_hub, capsys):
    from ghibli_core.cli import main as cli_main

    assert cli_main(["pull", f"diffusion:{REPO}@{fresh_hub.shas[REPO]}"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert (folder / "model_index.json").is_file()
    fresh_hub.down()
    assert resolve_pipeline(f"{REPO}@{fresh_hub.shas[REPO]}") == folder


# -- the app -------------------------------------------------------------------------------------
def test_app_offers_diffusion_where_asked_or_on_a_gpu(monkeypatch):
    from ghibli_core.app_diffusion import wanted

    assert wanted(True, {}) and not wanted(False, {"GHIBLI_DIFFUSION": "1"})
    assert wanted(None, {"GHIBLI_DIFFUSION": "1"}) and not wanted(None, {"GHIBLI_DIFFUSION": "0"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert wanted(None, {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not wanted(None, {})


def test_app_event_through_gradio_client(served, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    import app
    from test_app import launch_on_loopback

    server, shas, _ = served
    demo = app.build_app(device="cpu", diffusion=True, examples_dir=tmp_path)
    service = demo.ghibli_context.diffusion
    assert service is not None and service.loaded == []  # nothing is built until asked for
    assert service.limits.max_steps == 20  # capped on a CPU
    service.controlnet = f"{CONTROLNET_REPO}@{shas[CONTROLNET_REPO]}"
    launch_on_loopback(demo)
    try:
        client = Client(demo.local_url, verbose=False, download_files=str(tmp_path / "dl"), analytics_enabled=False,
                        httpx_kwargs={"timeout": 300})
        src = tmp_path / "portrait.png"
        photo((37, 53)).save(src)
        args = dict(photo=handle_file(str(src)), repo=f"{REPO}@{shas[REPO]}", prompt="ghibli style", negative_prompt="",
                    strength=0.5, steps=4, guidance=7.0, seed=1, structure=False, lora="", lora_weight=1.0)

        def stylize(**changes):
            result, download, notice, card = client.predict(*{**args, **changes}.values(), api_name="/stylize_diffusion")
            return Image.open(result), download, notice, card

        first, download, notice, card = stylize()
        assert first.size == (37, 53)
        assert download.endswith("portrait_ghibli.png")
        assert "Tiny SD" in card and "license:" not in card
        assert "CPU" in notice and f"{REPO}@{shas[REPO]}" in notice  # the cost, said plainly, and the commit
        assert np.array_equal(pixels(stylize()[0]), pixels(first))  # same seed, same picture
        assert len(service.loaded) == 1
        shaped = stylize(structure=True)[0]
        assert shaped.size == (37, 53) and not np.array_equal(pixels(shaped), pixels(first))
        with_lora = stylize(lora=f"{LORA_REPO}@{shas[LORA_REPO]}")[0]
        assert not np.array_equal(pixels(with_lora), pixels(first))
        assert np.array_equal(pixels(stylize()[0]), pixels(first))  # the LoRA is gone again
        assert len(service.loaded) == 1

        for changes, match in [
            (dict(steps=500), "steps must be between 1 and 20"),
            (dict(repo="../../etc"), "owner/name"),
            (dict(lora="/etc"), "owner/name"),
            (dict(seed=-3), "seed must be between"),
            (dict(repo="tester/pickled-sd"), "only pickled weights"),
            (dict(repo=f"{REPO}@{'0' * 40}"), "does not exist"),
        ]:
            with pytest.raises(AppError, match=match):
                stylize(**changes)
        bad = tmp_path / "holiday.png"
        bad.write_text("not a photo")
        with pytest.raises(AppError, match="holiday.png") as info:
            stylize(photo=handle_file(str(bad)))
        assert str(tmp_path) not in str(info.value)
    finally:
        demo.close()
