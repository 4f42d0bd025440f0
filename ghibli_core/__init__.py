"""ghibli-studio: Studio-Ghibli-style photos and videos, and a generator's latent space to explore.

The public API. Names load lazily (PEP 562) so that ``import ghibli_core`` stays cheap for the
app's start-up and the CLI; ``from ghibli_core import Stylizer`` imports only what it needs.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (explicit: no discovery by file name)
_EXPORTS = {
    # networks and checkpoints
    "MODELS": "ghibli_core.models",
    "CheckpointError": "ghibli_core.models",
    "HubModel": "ghibli_core.models",
    "PatchDiscriminator": "ghibli_core.models",
    "ResnetGenerator": "ghibli_core.models",
    "UnetGenerator": "ghibli_core.models",
    "load_model": "ghibli_core.models",
    # model specs: weights/ -> local folder -> Hub
    "DEFAULT_MODEL": "ghibli_core.hub",
    "HubError": "ghibli_core.hub",
    "ModelNotAvailable": "ghibli_core.hub",
    "ModelNotFound": "ghibli_core.hub",
    "embedded_models": "ghibli_core.hub",
    "parse_spec": "ghibli_core.hub",
    "resolve": "ghibli_core.hub",
    "load": "ghibli_core.hub",
    "load_with_fallback": "ghibli_core.hub",
    "model_card": "ghibli_core.hub",
    "push": "ghibli_core.hub",
    "StyleNet": "ghibli_core.models",
    "StyleGAN2Generator": "ghibli_core.models",
    "StyleGAN2Discriminator": "ghibli_core.models",
    "VGGFeatures": "ghibli_core.models",
    "load_vgg": "ghibli_core.models",
    # data preparation
    "FrameExtractor": "ghibli_core.data.frames",
    "ImageCleaner": "ghibli_core.data.frames",
    "detect_bars": "ghibli_core.data.frames",
    "phash": "ghibli_core.data.frames",
    "PaletteAnalyzer": "ghibli_core.data.palette",
    "Palette": "ghibli_core.data.palette",
    "group_palettes": "ghibli_core.data.palette",
    "contact_sheet": "ghibli_core.data.palette",
    "Manifest": "ghibli_core.data.manifest",
    "parse_where": "ghibli_core.data.manifest",
    "select_paths": "ghibli_core.data.manifest",
    "select_images": "ghibli_core.data.datasets",
    # video
    "stylize_video": "ghibli_core.video",
    "probe": "ghibli_core.video",
    "VideoInfo": "ghibli_core.video",
    "VideoLimits": "ghibli_core.video",
    "VideoError": "ghibli_core.video",
    "VideoResult": "ghibli_core.video",
    "FrameReader": "ghibli_core.video",
    "VideoWriter": "ghibli_core.video",
    "TemporalStabilizer": "ghibli_core.temporal",
    "warping_error": "ghibli_core.temporal",
    # latent space
    "DEFAULT_GAN": "ghibli_core.hub",
    "project": "ghibli_core.latent",
    "Projection": "ghibli_core.latent",
    "neighbours": "ghibli_core.latent",
    "Evolution": "ghibli_core.latent",
    "walk": "ghibli_core.latent",
    "noise_loop": "ghibli_core.latent",
    "seed_ws": "ghibli_core.latent",
    "render": "ghibli_core.latent",
    "save_latent": "ghibli_core.latent",
    "load_latent": "ghibli_core.latent",
    # images in, images out
    "ImageLoadError": "ghibli_core.imaging",
    "load_image": "ghibli_core.imaging",
    "to_tensor": "ghibli_core.imaging",
    "to_pil": "ghibli_core.imaging",
    "Stylizer": "ghibli_core.stylize",
    # the GPU path: Stable Diffusion img2img (diffusers, imported on first load)
    "DiffusionStylizer": "ghibli_core.diffusion",
    "load_diffusion": "ghibli_core.diffusion",
    # evaluation
    "InceptionFeatures": "ghibli_core.metrics",
    "TranslationEvaluator": "ghibli_core.metrics",
    "evaluate_translation": "ghibli_core.metrics",
    "fid": "ghibli_core.metrics",
    "kid": "ghibli_core.metrics",
    # reference-implementation checkpoints
    "convert_file": "ghibli_core.convert",
    "convert_state_dict": "ghibli_core.convert",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ghibli_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
