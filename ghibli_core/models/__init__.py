"""Networks. Importing this package registers every model family in :data:`MODELS`."""
from .base import MODELS, CheckpointError, HubModel, load_model, load_weights, read_config, register_model
from .cyclegan import (
    InstanceNorm,
    PatchDiscriminator,
    ResnetGenerator,
    UnetGenerator,
    init_weights,
    shared_statistics,
)

__all__ = [
    "MODELS",
    "CheckpointError",
    "HubModel",
    "InstanceNorm",
    "PatchDiscriminator",
    "ResnetGenerator",
    "UnetGenerator",
    "init_weights",
    "load_model",
    "load_weights",
    "read_config",
    "register_model",
    "shared_statistics",
]
