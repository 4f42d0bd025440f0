"""Base class and registry shared by every shipped network.

A checkpoint is a folder (or a Hub repo) holding ``config.json`` (the constructor's keyword
arguments plus ``model_type``), ``model.safetensors`` and usually a ``README.md`` model card.
Loading is strict: a missing or unexpected key is an error. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

MODELS: dict[str, type["HubModel"]] = {}

T = TypeVar("T", bound=type)


def register_model(name: str) -> Callable[[T], T]:
    """Class decorator: make a network loadable from a config's ``model_type``."""

    def wrap(cls: T) -> T:
        if name in MODELS:
            raise ValueError(f"model_type {name!r} is registered twice")
        cls.model_type = name
        MODELS[name] = cls
        return cls

    return wrap


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as asked."""


class HubModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="ghibli-studio",
    tags=["ghibli-studio", "image-to-image"],
    repo_url="https://github.com/ghibli-studio/ghibli-studio",
):
    """``nn.Module`` that saves/loads as safetensors + config.json (PyTorchModelHubMixin).

    Differences from the plain mixin, on purpose:
    - strict loading by default (a missing or extra key raises);
    - safetensors only: no fallback to ``pytorch_model.bin`` (no pickles from the network);
    - ``config.json`` also records ``model_type`` so :func:`load_model` can pick the class;
    - ``save_pretrained(..., dtype=torch.float16)`` ships small half-precision files; they are
      cast back to the module's dtype on load.
    """

    model_type: ClassVar[str] = ""

    # -- saving ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory, *, dtype: torch.dtype | None = None, **kwargs):
        self._save_dtype = dtype
        try:
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            del self._save_dtype

    def _save_pretrained(self, save_directory: Path) -> None:
        dtype = getattr(self, "_save_dtype", None)
        state = {}
        for key, value in self.state_dict().items():
            value = value.detach().to("cpu")
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            state[key] = value.contiguous()
        save_file(state, str(Path(save_directory) / WEIGHTS_NAME), metadata={"format": "pt"})
        config = dict(self._hub_mixin_config or {})
        config["model_type"] = self.model_type
        (Path(save_directory) / CONFIG_NAME).write_text(json.dumps(config, sort_keys=True, indent=2))

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir,
        force_download: bool,
        local_files_only: bool,
        token,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs,
    ):
        model = cls(**model_kwargs)
        if Path(model_id).is_dir():
            weights = Path(model_id) / WEIGHTS_NAME
            if not weights.is_file():
                raise CheckpointError(f"{model_id} has no {WEIGHTS_NAME}")
        else:
            weights = hf_hub_download(
                repo_id=model_id,
                filename=WEIGHTS_NAME,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        load_weights(model, weights, strict=strict)
        model.to(map_location)
        model.eval()
        return model


def load_weights(model: nn.Module, path, *, strict: bool = True) -> nn.Module:
    """Load a safetensors file into ``model``; with ``strict`` every key must match exactly."""
    state = load_file(str(path), device="cpu")
    own = model.state_dict()
    if strict:
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise CheckpointError(
                f"{path} does not fit {type(model).__name__}: "
                f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected keys {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=strict)
    return model


def read_config(folder) -> dict[str, Any]:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a checkpoint folder: it has no {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def load_model(folder, *, map_location: str | torch.device = "cpu") -> HubModel:
    """Build the network a checkpoint folder describes and load its weights (strict)."""
    config = read_config(folder)
    model_type = config.get("model_type")
    if model_type not in MODELS:
        raise CheckpointError(
            f"{folder}: unknown model_type {model_type!r}; known: {', '.join(sorted(MODELS))}"
        )
    cls = MODELS[model_type]
    return cls.from_pretrained(str(folder), map_location=str(map_location))
