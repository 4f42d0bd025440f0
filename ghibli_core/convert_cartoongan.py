"""Import the CartoonGAN generator from its one-``.npy``-per-tensor release.

The folder holds one file per tensor, named as in the PyTorch port of the authors' model
(``conv01_1.weight.npy``, ``in01_1.scale.npy``, ``deconv01_1.weight.npy``, ...; convolutions
``(out, in, k, k)``, transposed convolutions ``(in, out, k, k)``). :func:`read_cartoongan`
reads them with ``numpy.load(allow_pickle=False)`` (no pickles), :func:`convert_cartoongan`
maps every name onto :class:`~ghibli_core.models.cartoongan.CartoonGANGenerator` explicitly
and folds the original's BGR channel order into the first and last convolutions, so the
converted network takes and returns RGB.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .models import CheckpointError
from .models.cartoongan import CartoonGANGenerator

_NAME_RE = re.compile(r"^((?:conv|deconv|in)\d\d_\d)\.(weight|bias|scale|shift)\.npy$")


def is_cartoongan_folder(path: str | Path) -> bool:
    """True for a folder in the one-``.npy``-per-tensor CartoonGAN layout."""
    path = Path(path)
    return path.is_dir() and (path / "conv01_1.weight.npy").is_file()


def read_cartoongan(folder: str | Path) -> dict[str, Tensor]:
    """``{"conv01_1.weight": tensor, ...}`` from the ``.npy`` files of ``folder`` (no pickles)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"CartoonGAN folder {folder} does not exist")
    state: dict[str, Tensor] = {}
    for path in sorted(folder.glob("*.npy")):
        m = _NAME_RE.match(path.name)
        if not m:
            raise CheckpointError(f"{path}: not a CartoonGAN tensor name (expected e.g. conv01_1.weight.npy)")
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise CheckpointError(f"{path} is not a plain numeric .npy file: {exc}") from exc
        if array.dtype.kind != "f":
            raise CheckpointError(f"{path}: expected floating-point values, got dtype {array.dtype}")
        state[f"{m.group(1)}.{m.group(2)}"] = torch.from_numpy(array.astype(np.float32))
    if not state:
        raise CheckpointError(f"{folder} holds no .npy tensors")
    return state


def _mapping(n_blocks: int) -> dict[str, str]:
    """Our module name -> the original's, for every layer with weights."""
    m = {"stem.1": "conv01_1", "stem.2": "in01_1"}
    for stage in range(2):  # conv02/conv03: stride-2 conv, conv, norm in02/in03
        m[f"down.{stage}.0"] = f"conv0{stage + 2}_1"
        m[f"down.{stage}.1"] = f"conv0{stage + 2}_2"
        m[f"down.{stage}.2"] = f"in0{stage + 2}_1"
    for b in range(n_blocks):  # conv04 .. conv11
        n = b + 4
        m[f"blocks.{b}.conv_block.1"] = f"conv{n:02d}_1"
        m[f"blocks.{b}.conv_block.2"] = f"in{n:02d}_1"
        m[f"blocks.{b}.conv_block.5"] = f"conv{n:02d}_2"
        m[f"blocks.{b}.conv_block.6"] = f"in{n:02d}_2"
    for stage in range(2):  # deconv01/deconv02 + norm in12/in13
        m[f"up.{stage}.0"] = f"deconv0{stage + 1}_1"
        m[f"up.{stage}.1"] = f"deconv0{stage + 1}_2"
        m[f"up.{stage}.2"] = f"in{n_blocks + 4 + stage:02d}_1"
    m["head.1"] = "deconv03_1"
    return m


_PARAM = {"weight": ("weight", "scale"), "bias": ("bias", "shift")}


def convert_cartoongan(state: dict[str, Tensor]) -> tuple[CartoonGANGenerator, dict]:
    """Build the RGB :class:`CartoonGANGenerator` holding ``state`` (strict: every tensor used)."""
    stem = state.get("conv01_1.weight")
    if stem is None or stem.ndim != 4 or stem.shape[1] != 3:
        raise CheckpointError("not a CartoonGAN generator: conv01_1.weight (out, 3, 7, 7) is missing")
    width = int(stem.shape[0])
    n_blocks = 0  # residual blocks are conv04 .. conv(03 + n), numbered without gaps
    while f"conv{n_blocks + 4:02d}_1.weight" in state:
        n_blocks += 1
    model = CartoonGANGenerator(width=width, n_blocks=n_blocks)
    own = model.state_dict()
    new: dict[str, Tensor] = {}
    used: set[str] = set()
    for ours, theirs in _mapping(n_blocks).items():
        for param, names in _PARAM.items():
            key = f"{ours}.{param}"
            if key not in own:
                continue
            source = next((f"{theirs}.{n}" for n in names if f"{theirs}.{n}" in state), None)
            if source is None:
                raise CheckpointError(f"CartoonGAN tensor {theirs}.{names[0]} (for our {key}) is missing")
            value = state[source].reshape(own[key].shape) if state[source].numel() == own[key].numel() else None
            if value is None:
                raise CheckpointError(
                    f"CartoonGAN tensor {source} has shape {tuple(state[source].shape)}, "
                    f"our {key} expects {tuple(own[key].shape)}"
                )
            new[key] = value
            used.add(source)
    unused = sorted(set(state) - used)
    if unused:
        raise CheckpointError(f"CartoonGAN tensors not mapped onto the network: {', '.join(unused[:5])}")
    # The original reads and writes BGR: permute the stem's input and the head's output channels.
    new["stem.1.weight"] = new["stem.1.weight"].flip(1)
    new["head.1.weight"] = new["head.1.weight"].flip(0)
    new["head.1.bias"] = new["head.1.bias"].flip(0)
    model.load_state_dict(new, strict=True)
    model.eval()
    report = {
        "arch": "cartoongan",
        "model_type": model.model_type,
        "config": {"width": width, "n_blocks": n_blocks},
        "notes": ["BGR input/output of the original folded into the first and last convolutions: the network takes RGB"],
    }
    return model, report


def folder_digest(folder: str | Path) -> str:
    """sha256 over the names and bytes of the folder's ``.npy`` files, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.npy")):
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


CARTOONGAN_CARD = """---
library_name: ghibli-studio
tags:
- ghibli-studio
- image-to-image
- cartoongan
- converted
---

# CartoonGAN Hayao generator (converted)

The generator of CartoonGAN (Yang Chen, Yu-Kun Lai, Yong-Jin Liu, "CartoonGAN: Generative
Adversarial Networks for Photo Cartoonization", CVPR 2018), converted from a folder of `.npy`
tensors with `python -m ghibli_core convert`.

- Source folder: `{source}` ({count} tensors, sha256 over names and bytes `{digest}`)
- Architecture: `cartoongan`, width {width}, {n_blocks} residual blocks, {params:,} parameters
- Channel order: the original takes and returns BGR; the conversion folds that into the first
  and last convolutions, so this network takes and returns RGB in [-1, 1] like every model here
- Saved weights: {saved} safetensors

## Terms

The model authors released the weights without a licence; the `.npy` extraction comes from
mnicnc404/CartoonGan-tensorflow (Apache-2.0). Treat it as a research teacher and a
side-by-side anchor: do not redistribute it, and do not ship it as a product's weights.
"""


def save_cartoongan(
    source: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = False
) -> tuple[Path, dict]:
    """Convert the CartoonGAN folder ``source`` into a model folder ``out_dir``; returns it and the report."""
    from .convert import check_output_folder

    out = check_output_folder(out_dir, overwrite=overwrite)
    state = read_cartoongan(source)
    model, report = convert_cartoongan(state)
    model.save_pretrained(out, dtype=dtype)
    card = CARTOONGAN_CARD.format(
        source=Path(source).name, count=len(state), digest=folder_digest(source),
        params=sum(p.numel() for p in model.parameters()),
        saved=str(dtype).removeprefix("torch.") if dtype is not None else "float32", **report["config"],
    )
    (out / "README.md").write_text(card)
    return out, report
