"""ghibli-studio: Studio-Ghibli-style photos and videos, and a generator's latent space to explore."""
from .models import (
    MODELS,
    CheckpointError,
    HubModel,
    PatchDiscriminator,
    ResnetGenerator,
    UnetGenerator,
    load_model,
)

__version__ = "0.1.0"

__all__ = [
    "MODELS",
    "CheckpointError",
    "HubModel",
    "PatchDiscriminator",
    "ResnetGenerator",
    "UnetGenerator",
    "load_model",
    "__version__",
]
