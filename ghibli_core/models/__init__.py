"""Networks. Importing this package registers every model family in :data:`MODELS`."""
from .animegan import AnimeGANv3Generator
from .base import MODELS, CheckpointError, HubModel, load_model, load_weights, read_config, register_model
from .cartoongan import CartoonGANGenerator
from .cyclegan import (
    InstanceNorm,
    PatchDiscriminator,
    ResnetGenerator,
    UnetGenerator,
    init_weights,
    shared_statistics,
)
from .perceptual import VGGFeatures, gram_matrix, load_vgg
from .projected import EfficientNetLite, ProjectedDiscriminator
from .style_net import PRESETS as STYLE_NET_PRESETS, StyleNet, init_style_net
from .stylegan import StyleGAN2Discriminator, StyleGAN2Generator

__all__ = [
    "MODELS",
    "AnimeGANv3Generator",
    "CartoonGANGenerator",
    "CheckpointError",
    "HubModel",
    "InstanceNorm",
    "PatchDiscriminator",
    "EfficientNetLite",
    "ProjectedDiscriminator",
    "ResnetGenerator",
    "UnetGenerator",
    "init_weights",
    "load_model",
    "load_weights",
    "read_config",
    "register_model",
    "shared_statistics",
    "STYLE_NET_PRESETS",
    "StyleNet",
    "VGGFeatures",
    "gram_matrix",
    "init_style_net",
    "load_vgg",
    "StyleGAN2Discriminator",
    "StyleGAN2Generator",
]
