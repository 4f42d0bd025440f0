"""Import checkpoints of the reference PyTorch CycleGAN/pix2pix implementation.

The reference implementation (junyanz/pytorch-CycleGAN-and-pix2pix, ``models/networks.py``)
saves ``*_net_G_A.pth`` / ``*_net_D_A.pth`` files holding the state dict of one of:

- ``ResnetGenerator``: one flat ``nn.Sequential`` called ``model`` (``model.1.weight`` is the 7x7
  stem convolution, ``model.10.conv_block.1.weight`` the first residual block, transposed
  convolutions for the upsampling, ``model.{17 + n_blocks}`` the 7x7 output convolution);
- ``UnetGenerator``: nested ``UnetSkipConnectionBlock``s (``model.model.0`` is the outermost
  down convolution, ``model.model.1.model.3.model...`` goes one level deeper each time);
- ``NLayerDiscriminator`` (PatchGAN): one flat ``nn.Sequential`` called ``model``.

:func:`convert_state_dict` infers the architecture and its configuration from the keys and
shapes, maps every key onto our networks (:mod:`ghibli_core.models.cyclegan`) explicitly and
loads them strictly: an unmatched key is an error naming it, never a silent skip. The one
exception is the instance-norm running statistics that old PyTorch versions stored (and
that the reference itself deletes when loading): they are dropped and the report says so.

Files are read with ``torch.load(..., weights_only=True)`` (or as safetensors): a pickled
whole module, or anything else that is not a flat state dict of tensors, is refused.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .models import CheckpointError, HubModel, PatchDiscriminator, ResnetGenerator, UnetGenerator
from .models.base import CONFIG_NAME, WEIGHTS_NAME

ARCHS = ("auto", "resnet", "unet", "patchgan")

# Buffers that old PyTorch (<= 0.3, or InstanceNorm2d(track_running_stats=True)) saved for
# instance norm. Instance norm normalises by each image's own statistics (the reference
# runs its test in train mode and deletes these keys on load), so they carry no weights.
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")

# The reference's ResnetBlock keeps its layers in ``conv_block``; several re-implementations
# with the same layout (vintagify among them) call it ``block``.
_BLOCK_NAMES = ("conv_block", "block")

_PATCHGAN_NOTE = (
    "a final Sigmoid (the reference's use_sigmoid) is not recorded in a state dict; "
    "our discriminator returns logits"
)
_UNET_DROPOUT = 0.5
_UNET_DROPOUT_NOTE = (
    "dropout is not recorded in a U-Net state dict; set to 0.5 (the reference's default for "
    "pix2pix), it only acts in training mode"
)


# -- reading files --------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict of tensors from a ``.pth``/``.pt`` or ``.safetensors`` file.

    ``.pth`` files are read with ``torch.load(map_location="cpu", weights_only=True)`` only:
    a pickled whole module (``torch.save(net)``) would need full unpickling, which can run
    arbitrary code, so it is refused with an explanation.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            state: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            if found is None:
                raise CheckpointError(
                    f"{path} is not a readable PyTorch checkpoint: torch.load(weights_only=True) failed "
                    f"({_unpickler_reason(exc)})"
                ) from exc
            raise CheckpointError(
                f"refusing {path}: it holds pickled Python objects ({found.group(1)}; for example a whole "
                "module saved with torch.save(net)), and loading those can run arbitrary code. Only state "
                "dicts of tensors are accepted: if you trust the file, re-save it where it was made with "
                "torch.save(net.state_dict(), path)"
            ) from exc
        except Exception as exc:  # torch raises KeyError, RuntimeError, EOFError... on non-checkpoints
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {type(exc).__name__}: {exc}") from exc
    return _check_state_dict(state, str(path))


def _unpickler_reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if line.startswith("Unsupported")]
    if not lines:
        return type(exc).__name__
    return "; ".join(useful) or lines[0]


def _check_state_dict(state: Any, source: str) -> dict[str, Tensor]:
    if not isinstance(state, dict):
        raise CheckpointError(
            f"refusing {source}: expected a state dict (a mapping of names to tensors, as saved by "
            f"torch.save(net.state_dict(), path)), got a {type(state).__name__}"
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        kinds = ", ".join(f"{k!r}: {type(state[k]).__name__}" for k in bad[:5])
        raise CheckpointError(
            f"refusing {source}: expected a flat state dict of tensors, but {len(bad)} entries are not "
            f"tensors ({kinds}{', ...' if len(bad) > 5 else ''}). A training checkpoint that wraps "
            "several networks must be split into one state dict per network first."
        )
    return dict(state)


# -- architecture inference -----------------------------------------------------------------
def _weight(state: dict[str, Tensor], module: str) -> Tensor:
    key = f"{module}.weight"
    if key not in state:
        raise CheckpointError(f"expected key {key!r} is missing: the layout does not fit")
    return state[key]


def _indices(state: dict[str, Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := rx.match(k))})


def _infer_resnet(state: dict[str, Tensor]) -> tuple[dict, dict[str, str], list[str]]:
    notes: list[str] = []
    stem = _weight(state, "model.1")
    if stem.ndim != 4 or stem.shape[-1] != 7:
        raise CheckpointError(f"model.1.weight should be the 7x7 stem convolution, got shape {tuple(stem.shape)}")
    width, in_channels = int(stem.shape[0]), int(stem.shape[1])

    names = {m.group(1) for k in state if (m := re.match(r"model\.\d+\.([A-Za-z_]+)\.", k))}
    unknown = names - set(_BLOCK_NAMES)
    if unknown or len(names) > 1:
        raise CheckpointError(
            f"residual blocks must keep their layers in one of {_BLOCK_NAMES}, found {sorted(names)}"
        )
    block = names.pop() if names else "conv_block"
    if block != "conv_block":
        notes.append(f"residual blocks are named {block!r} (the reference says 'conv_block'); same layout")
    blocks = _indices(state, rf"model\.(\d+)\.{block}\.")
    n_blocks = len(blocks)
    if blocks != list(range(10, 10 + n_blocks)):
        raise CheckpointError(f"residual blocks should sit at model.10 .. model.{9 + n_blocks}, found model.{blocks}")

    dropout = 0.0
    if n_blocks:
        # the second 3x3 convolution of a block sits at index 5, or 6 when Dropout precedes it
        weights = _indices(state, rf"model\.10\.{block}\.(\d+)\.weight")
        convs = [j for j in weights if state[f"model.10.{block}.{j}.weight"].ndim == 4]
        if convs == [1, 6]:
            dropout = 0.5
            notes.append("residual blocks contain Dropout(0.5) (trained with use_dropout)")
        elif convs != [1, 5]:
            raise CheckpointError(f"residual block model.10 has convolutions at {convs}, expected [1, 5] or [1, 6]")

    up = 10 + n_blocks  # first ConvTranspose2d, then norm, ReLU, ConvTranspose2d, norm, ReLU, pad, conv
    first_up = _weight(state, f"model.{up}")
    if first_up.shape[:2] != (width * 4, width * 2):
        raise CheckpointError(
            f"model.{up}.weight should be a ConvTranspose2d from {width * 4} to {width * 2} channels "
            f"(shape ({width * 4}, {width * 2}, 3, 3)), got {tuple(first_up.shape)}: only the reference's "
            "transposed-convolution upsampling is supported"
        )
    head = _weight(state, f"model.{up + 7}")
    config = {
        "in_channels": in_channels,
        "out_channels": int(head.shape[0]),
        "width": width,
        "n_blocks": n_blocks,
        "norm_affine": "model.2.weight" in state,
        "dropout": dropout,
        "upsample": "transpose",
    }
    modules = {"model.1": "stem.1", "model.2": "stem.2", "model.4": "down.0.0", "model.5": "down.0.1",
               "model.7": "down.1.0", "model.8": "down.1.1"}
    for b in range(n_blocks):
        for j in range(8):
            modules[f"model.{10 + b}.{block}.{j}"] = f"blocks.{b}.conv_block.{j}"
    modules.update({f"model.{up}": "up.0.0", f"model.{up + 1}": "up.0.1", f"model.{up + 3}": "up.1.0",
                    f"model.{up + 4}": "up.1.1", f"model.{up + 7}": "head.1"})
    return config, modules, notes


def _infer_unet(state: dict[str, Tensor]) -> tuple[dict, dict[str, str], list[str]]:
    # level 0 is the outermost block; each deeper block is the `submodule` entry of its parent
    # Sequential: index 1 in the outermost one, index 3 in the others
    prefixes = ["model.model"]
    while any(k.startswith(prefixes[-1] + (".1.model." if len(prefixes) == 1 else ".3.model.")) for k in state):
        prefixes.append(prefixes[-1] + (".1.model" if len(prefixes) == 1 else ".3.model"))
    n_downs = len(prefixes)
    if n_downs < 5:
        raise CheckpointError(f"a U-Net needs at least 5 nested levels, found {n_downs}")
    first = _weight(state, f"{prefixes[0]}.0")
    last = _weight(state, f"{prefixes[0]}.3")  # ConvTranspose2d weight: (in, out, kH, kW)
    config = {
        "in_channels": int(first.shape[1]),
        "out_channels": int(last.shape[1]),
        "width": int(first.shape[0]),
        "n_downs": n_downs,
        "norm_affine": f"{prefixes[1]}.2.weight" in state,
        "dropout": _UNET_DROPOUT,
    }
    modules = {f"{prefixes[0]}.0": "encoder.0", f"{prefixes[0]}.3": f"decoder.{n_downs - 1}.1"}
    for i in range(1, n_downs - 1):
        # [LeakyReLU, down conv, norm, submodule, ReLU, up conv, norm, (Dropout)]
        p, d = prefixes[i], n_downs - 1 - i
        modules.update({f"{p}.1": f"encoder.{i}.1", f"{p}.2": f"encoder.{i}.2",
                        f"{p}.5": f"decoder.{d}.1", f"{p}.6": f"decoder.{d}.2"})
    # innermost: [LeakyReLU, down conv, ReLU, up conv, norm]
    p = prefixes[-1]
    modules.update({f"{p}.1": f"encoder.{n_downs - 1}.1", f"{p}.3": "decoder.0.1", f"{p}.4": "decoder.0.2"})
    return config, modules, [_UNET_DROPOUT_NOTE]


def _infer_patchgan(state: dict[str, Tensor]) -> tuple[dict, dict[str, str], list[str]]:
    first = _weight(state, "model.0")
    convs = [i for i in _indices(state, r"model\.(\d+)\.weight$") if state[f"model.{i}.weight"].ndim == 4]
    n_layers = len(convs) - 2
    expected = [0] + [2 + 3 * n for n in range(n_layers + 1)]
    if n_layers < 0 or convs != expected:
        raise CheckpointError(f"PatchGAN convolutions should sit at model.{expected}, found model.{convs}")
    config = {
        "in_channels": int(first.shape[1]),
        "width": int(first.shape[0]),
        "n_layers": n_layers,
        "norm_affine": "model.3.weight" in state,
    }
    modules = {f"model.{i}": f"model.{i}" for i in range(3 + 3 * n_layers)}
    return config, modules, [_PATCHGAN_NOTE]


_ARCHS: dict[str, tuple[type[HubModel], Any]] = {
    "resnet": (ResnetGenerator, _infer_resnet),
    "unet": (UnetGenerator, _infer_unet),
    "patchgan": (PatchDiscriminator, _infer_patchgan),
}


def _detect(state: dict[str, Tensor]) -> str:
    if "model.model.0.weight" in state:
        return "unet"
    stem = state.get("model.1.weight")
    if stem is not None and stem.ndim == 4 and stem.shape[-2:] == (7, 7):
        return "resnet"
    first = state.get("model.0.weight")
    if first is not None and first.ndim == 4 and first.shape[-2:] == (4, 4):
        return "patchgan"
    sample = ", ".join(list(state)[:4])
    raise CheckpointError(
        "cannot recognise the layout: expected a reference CycleGAN/pix2pix state dict with keys like "
        "'model.1.weight' (ResnetGenerator), 'model.model.0.weight' (UnetGenerator) or 'model.0.weight' "
        f"(NLayerDiscriminator); got {sample}{', ...' if len(state) > 4 else ''}"
    )


# -- conversion -----------------------------------------------------------------------------
def convert_state_dict(state: dict[str, Tensor], *, arch: str = "auto") -> tuple[HubModel, dict]:
    """Build our network for a reference-layout state dict and load it strictly.

    Args:
        state: the reference network's ``state_dict()`` (float tensors, any float dtype).
        arch: ``"resnet"``, ``"unet"``, ``"patchgan"``, or ``"auto"`` to infer it from the keys.

    Returns:
        ``(model, report)``: the network on the CPU in float32 and eval mode, and a JSON-able
        report ``{"arch", "model_type", "config", "dropped_keys", "notes"}`` of what was inferred.

    Raises:
        CheckpointError (a ValueError) naming the first unmatched, missing or misshapen keys.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    state = _check_state_dict(state, "state dict")
    notes: list[str] = []
    if state and all(k.startswith("module.") for k in state):
        # saved from a DataParallel wrapper instead of its .module
        state = {k[len("module."):]: v for k, v in state.items()}
        notes.append("stripped the 'module.' prefix (saved from nn.DataParallel)")
    if arch == "auto":
        arch = _detect(state)
    cls, infer = _ARCHS[arch]
    config, modules, arch_notes = infer(state)
    notes += arch_notes
    model = cls(**config)
    own = model.state_dict()
    own_modules = dict(model.named_modules())

    # 1. map every key through the module table; collect what has no place in our network
    mapped: dict[str, Tensor] = {}
    dropped: list[str] = []
    unexpected: list[str] = []
    for key, value in state.items():
        module, _, name = key.rpartition(".")
        target = modules.get(module)
        if target is None:
            unexpected.append(key)
        elif name in _RUNNING_STATS and isinstance(own_modules.get(target), nn.InstanceNorm2d):
            dropped.append(key)
        elif f"{target}.{name}" in own:
            mapped[f"{target}.{name}"] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} keys of the checkpoint have no place in {cls.__name__}({_fmt(config)}): "
            f"{_first(unexpected)}"
        )

    # 2. every parameter of ours must be filled, with the right shape
    missing = [k for k in own if k not in mapped]
    if missing:
        hint = ""
        if all(k.endswith(".bias") for k in missing):
            hint = (
                " (convolutions without bias: the checkpoint was trained with norm='batch'; our "
                "networks use instance norm, so batch-norm checkpoints cannot be converted)"
            )
        reference = {ours: ref for ref, ours in modules.items()}
        named = [_reference_key(k, reference) for k in missing]
        raise CheckpointError(f"the checkpoint lacks {len(missing)} weights of {cls.__name__}: {_first(named)}{hint}")
    for key, value in mapped.items():
        if value.shape != own[key].shape:
            source = next(k for k in state if _target(k, modules) == key)
            raise CheckpointError(
                f"{source} has shape {tuple(value.shape)}, but {cls.__name__}({_fmt(config)}) expects "
                f"{tuple(own[key].shape)} for {key}"
            )
        if not value.is_floating_point():
            raise CheckpointError(f"{key} holds {value.dtype} values, expected floating point weights")
    model.load_state_dict(mapped, strict=True)
    model.eval()

    if dropped:
        notes.append(
            f"dropped {len(dropped)} instance-norm running-statistics keys (running_mean/running_var/"
            "num_batches_tracked, saved by old PyTorch): instance norm uses per-image statistics"
        )
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
    if dtypes != ["float32"]:
        notes.append(f"source weights were {'/'.join(dtypes)}; loaded as float32")
    report = {
        "arch": arch,
        "model_type": cls.model_type,
        "config": config,
        "dropped_keys": dropped,
        "notes": notes,
    }
    return model, report


def _reference_key(key: str, reference: dict[str, str]) -> str:
    module, _, name = key.rpartition(".")
    return f"{reference[module]}.{name} (our {key})" if module in reference else key


def _target(key: str, modules: dict[str, str]) -> str | None:
    module, _, name = key.rpartition(".")
    return f"{modules[module]}.{name}" if module in modules else None


def _first(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _fmt(config: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())


# -- files ----------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_folder(out_dir: str | Path, *, overwrite: bool) -> Path:
    """``out_dir`` as a Path, refusing to replace a checkpoint already there unless ``overwrite``."""
    out = Path(out_dir)
    existing = [name for name in (CONFIG_NAME, WEIGHTS_NAME, "README.md") if (out / name).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{out} already holds {', '.join(existing)}; choose another folder or pass overwrite=True "
            "(--overwrite on the command line)"
        )
    return out


def save_converted(
    model: HubModel,
    report: dict,
    out_dir: str | Path,
    *,
    source: str | Path,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a converted network as safetensors + config.json + a model card naming its source.

    ``source`` is the original checkpoint file: the card records its name and sha256.
    ``dtype`` (e.g. ``torch.float16``) casts the saved floating-point weights. An existing
    checkpoint in ``out_dir`` is only replaced with ``overwrite=True``.
    """
    out = check_output_folder(out_dir, overwrite=overwrite)
    source = Path(source)
    digest = sha256_file(source)
    model.save_pretrained(out, dtype=dtype)
    (out / "README.md").write_text(_model_card(report, source.name, digest, dtype))
    return out


def convert_file(
    path: str | Path,
    out_dir: str | Path,
    *,
    arch: str = "auto",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a reference-layout checkpoint file (``.pth`` or ``.safetensors``) into ``out_dir``.

    Returns ``out_dir``, which then loads with :func:`ghibli_core.load_model`.
    """
    model, report = convert_state_dict(read_checkpoint(path), arch=arch)
    return save_converted(model, report, out_dir, source=path, dtype=dtype, overwrite=overwrite)


_REFERENCE_CLASS = {"resnet": "ResnetGenerator", "unet": "UnetGenerator", "patchgan": "NLayerDiscriminator"}


def _model_card(report: dict, source_name: str, digest: str, dtype: torch.dtype | None) -> str:
    saved = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    notes = "".join(f"- {n}\n" for n in report["notes"]) or "- none\n"
    return f"""---
library_name: ghibli-studio
tags:
- ghibli-studio
- image-to-image
- cyclegan
- converted
---

# {report["model_type"]} converted from a reference CycleGAN/pix2pix checkpoint

- Source file: `{source_name}`
- Source sha256: `{digest}`
- Source layout: the reference CycleGAN/pix2pix `{_REFERENCE_CLASS[report["arch"]]}` (junyanz/pytorch-CycleGAN-and-pix2pix)
- Converted with: `python -m ghibli_core convert` (every key mapped explicitly, loaded strictly)
- Saved weights: {saved} safetensors

## Inferred configuration

```json
{json.dumps(report["config"], indent=2, sort_keys=True)}
```

## Conversion notes

{notes}
## Licence and data

Those of the source checkpoint: this conversion changes the file format only. Check the
source's licence before redistributing.

```python
from ghibli_core import load_model
model = load_model("path/to/this/folder")  # (N, 3, H, W) in [-1, 1]
```
"""
