"""Diffusion stylizer: Stable Diffusion img2img (diffusers) behind the photo stylizer's interface.

On a GPU the richest Ghibli look comes from a fine-tuned Stable Diffusion model repainting the
photo: the default is ``nitrosocke/Ghibli-Diffusion`` (an SD 1.5 fine-tune, licence CreativeML
OpenRAIL-M, trigger words "ghibli style"), and any Stable Diffusion 1.5 or SDXL repo in diffusers
layout works. :class:`DiffusionStylizer` takes a PIL photo and returns a PIL image of the photo's
own size: the photo is resized to a working size the model handles (multiples of the VAE's
factor, longer side between ``min_side`` and ``max_side``), repainted, and resized back.

Optional extras: structure preservation with a Canny ControlNet (edges from OpenCV, so faces and
buildings keep their shape) and one LoRA at a time (:meth:`DiffusionStylizer.load_lora`,
:meth:`~DiffusionStylizer.unload_lora` restores the model exactly). On CUDA the pipeline runs in
float16, with ``enable_model_cpu_offload`` when the GPU's memory is smaller than the weights plus
:data:`OFFLOAD_HEADROOM`; large working sizes decode through VAE tiling. On a CPU it works, slowly.

Loading (:func:`resolve_pipeline`, :func:`load_diffusion`) fetches from the Hub the way
:mod:`ghibli_core.hub` does (pinned commit, cache offline or when the Hub is down, the same
errors) and is, with it, the place that does network I/O. Only safetensors are fetched and
loaded (``use_safetensors=True``): a repo or component with pickled weights only is refused,
never unpickled; custom pipeline code is refused too. The safety checker is not fetched (see the
README's licence notes). ``diffusers``, ``transformers`` and (for LoRA) ``peft`` are imported
when a pipeline is loaded, never when this module is: the CPU app starts as fast as before.

For distillation, :func:`as_teacher` makes a stylizer a ``list[PIL] -> list[PIL]`` teacher and
:func:`tensor_teacher` a ``(N, 3, H, W)`` one, with outputs cached on disk so they outlive a GPU
session.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from . import hub
from .imaging import to_pil, to_tensor
from .models import CheckpointError

__all__ = [
    "DEFAULT_CONTROLNET",
    "DEFAULT_DIFFUSION_MODEL",
    "DEFAULT_DIFFUSION_REVISION",
    "DIFFUSION_PREFIX",
    "DiffusionSettings",
    "DiffusionStylizer",
    "as_teacher",
    "canny_edges",
    "check_pipeline_folder",
    "gpu_task",
    "is_diffusion_spec",
    "load_diffusion",
    "parse_diffusion_spec",
    "resolve_controlnet",
    "resolve_lora",
    "resolve_pipeline",
    "tensor_teacher",
]

DEFAULT_DIFFUSION_MODEL = "nitrosocke/Ghibli-Diffusion"
# The commit the default model is pinned to, and the only place it is written. Public pages name
# it as the commit that added safetensors weights; it could not be checked from where this was
# written (no network). The README ("Diffusion model") says how to check and update it.
DEFAULT_DIFFUSION_REVISION = "75f68c4d7a51cf573ded51526297fd2b8cdb84ff"
# Canny ControlNet for SD 1.5. Not pinned to a commit yet (no sha could be checked from here):
# it follows the repo's main branch; the commit actually used is reported (``sources``) so it
# can be pinned with ``--structure-model REPO@SHA``.
DEFAULT_CONTROLNET = "lllyasviel/control_v11p_sd15_canny"
DIFFUSION_PREFIX = "diffusion:"

DEFAULT_PROMPT = "ghibli style, hand-painted background, soft natural light, detailed"
DEFAULT_NEGATIVE_PROMPT = "soft blurry, lowres, bad anatomy, deformed, text, watermark"
# GPU memory kept free beyond the weights (activations, attention, VAE decoding) before the
# pipeline is kept whole on the GPU instead of offloaded model by model.
OFFLOAD_HEADROOM = 4 * 1024**3
LORA_ADAPTER = "lora"
MAX_PROMPT_CHARS = 1000

# model_index.json classes this stylizer runs (the text-to-image ones are loaded as img2img)
PIPELINE_CLASSES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
)
COMPONENT_LIBRARIES = ("diffusers", "transformers")
# components neither fetched nor loaded: the safety checker and the image encoders it and
# IP-Adapters use (about 1.2 GB for SD 1.5; see the README's licence notes)
SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")

# What a download fetches. Patterns are fnmatch, where '*' also matches '/'. Component folders
# only (a root-level single-file checkpoint is a second copy of the weights); variant files
# such as ``*.fp16.safetensors`` are skipped (a second copy again: we cast on load).
PIPELINE_FILES = hub.RepoFiles(
    allow=("model_index.json", "README.md", "*/*.json", "*/*.txt", "*/*.safetensors"),
    ignore=("*/*.*.safetensors", *(f"{name}/*" for name in SKIPPED_COMPONENTS)),
    pull_command="python -m ghibli_core pull diffusion:{spec}",
)
CONTROLNET_FILES = hub.RepoFiles(
    allow=("config.json", "README.md", "*.safetensors"),
    ignore=("*/*", "*.*.safetensors"),
    pull_command="python -m ghibli_core pull diffusion:{spec}",
)
LORA_FILES = hub.RepoFiles(allow=("README.md", "*.safetensors"), ignore=("*/*",), pull_command="python -m ghibli_core pull diffusion:{spec}")


# -- specs -----------------------------------------------------------------------------------
def is_diffusion_spec(spec: str | None) -> bool:
    """Whether a ``--model`` value asks for the diffusion stylizer (``diffusion:[REPO[@REV]]``)."""
    return isinstance(spec, str) and spec.strip().startswith(DIFFUSION_PREFIX)


def parse_diffusion_spec(spec: str) -> tuple[str, str | None]:
    """``"diffusion:REPO[@REV]"`` -> ``(REPO, REV or None)``; ``"diffusion:"`` names the default.

    The default repo without a revision means its pinned commit; any other repo without one
    means its main branch. REPO may also be a local folder in diffusers layout.
    """
    if not is_diffusion_spec(spec):
        raise ValueError(f"a diffusion model spec starts with {DIFFUSION_PREFIX!r}, got {spec!r}")
    text = spec.strip()[len(DIFFUSION_PREFIX):].strip()
    if not text:
        return DEFAULT_DIFFUSION_MODEL, DEFAULT_DIFFUSION_REVISION
    if Path(text).expanduser().is_dir():
        return text, None
    repo, at, revision = text.partition("@")
    if at and not revision:
        raise ValueError(f"empty revision after '@' in {spec!r}: expected 'diffusion:owner/name@revision'")
    return repo, revision or None


def _default_revision(repo: str, revision: str | None) -> str | None:
    return DEFAULT_DIFFUSION_REVISION if revision is None and repo == DEFAULT_DIFFUSION_MODEL else revision


# -- checking what arrived -------------------------------------------------------------------
def _listing(folder: Path, repo_files: list[str] | None) -> list[str]:
    if repo_files is not None:
        return repo_files
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _pickles(files: list[str], prefix: str = "") -> list[str]:
    return [f for f in files if f.startswith(prefix) and f.endswith(hub.PICKLE_SUFFIXES)]


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what}: {path.name} cannot be read ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path.name} is not a JSON object")
    return data


def _no_safetensors(what: str, where: str, pickles: list[str]) -> CheckpointError:
    if pickles:
        return CheckpointError(
            f"{what}: {where} has only pickled weights ({', '.join(pickles)}). ghibli-studio loads safetensors only "
            "and never unpickles files from the network: use a revision of the repo that has .safetensors weights, "
            "or convert a copy you trust with diffusers' own scripts"
        )
    return CheckpointError(f"{what}: {where} holds no .safetensors weights")


def check_pipeline_folder(folder: str | Path, *, what: str | None = None, repo_files: list[str] | None = None) -> Path:
    """Check ``folder`` is a Stable Diffusion 1.5 / SDXL pipeline in diffusers layout with
    safetensors weights for every model component, and no custom code; return it.

    ``repo_files`` (the repo's full listing, when known) only words the errors: a component
    whose weights exist only as pickles is named with those files.
    """
    folder = Path(folder)
    what = what or str(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{what} is not a folder")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        files = _listing(folder, repo_files)
        raise CheckpointError(
            f"{what} is not a diffusers pipeline: it has no model_index.json (it holds: {', '.join(files) or 'nothing'})"
        )
    index = _read_json(index_path, what)
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise CheckpointError(
            f"{what} is a {cls!r} pipeline; the diffusion stylizer runs Stable Diffusion 1.5 and SDXL "
            f"({', '.join(PIPELINE_CLASSES)})"
        )
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        if name in SKIPPED_COMPONENTS:
            continue
        library, _ = entry
        if library not in COMPONENT_LIBRARIES:
            raise CheckpointError(
                f"{what}: component {name!r} comes from {library!r}, which would run code from the repo; "
                f"only components from {' and '.join(COMPONENT_LIBRARIES)} are loaded"
            )
        part = folder / name
        if not part.is_dir():
            raise CheckpointError(f"{what}: model_index.json lists {name!r} but the repo has no {name}/ folder")
        is_model = (part / "config.json").is_file()
        if is_model and not any(part.glob("*.safetensors")):
            raise _no_safetensors(what, f"component {name!r}", _pickles(_listing(folder, repo_files), f"{name}/"))
    return folder


def _check_controlnet_folder(folder: Path, what: str, repo_files: list[str] | None = None) -> Path:
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{what} is not a diffusers ControlNet: it has no config.json")
    cls = _read_json(config, what).get("_class_name")
    if cls != "ControlNetModel":
        raise CheckpointError(f"{what} is a {cls!r}, not a ControlNetModel")
    if not any(folder.glob("*.safetensors")):
        raise _no_safetensors(what, "the repo", _pickles(_listing(folder, repo_files)))
    return folder


def _lora_weights(folder: Path, what: str, weight_name: str | None, repo_files: list[str] | None = None) -> str:
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if weight_name is not None:
        if weight_name not in found:
            raise CheckpointError(
                f"{what} has no {weight_name!r} (safetensors files: {', '.join(found) or 'none'})"
            )
        return weight_name
    if not found:
        raise _no_safetensors(what, "the repo", _pickles(_listing(folder, repo_files)))
    if len(found) > 1:
        raise CheckpointError(f"{what} holds several LoRA files ({', '.join(found)}): name one")
    return found[0]


def _hub_check(checker: Callable[[Path, str, list[str] | None], Any]):
    """A :func:`hub.download_repo` check that words its errors with the repo's full listing."""

    def check(spec: hub.ModelSpec, folder: Path, where: str, cache: Path) -> Path:
        what = f"{where} (commit {folder.name})"
        try:
            checker(folder, what, None)
        except CheckpointError:
            files = hub._repo_files(spec.location, folder.name, cache)
            if files is None:
                raise
            checker(folder, what, files)  # raises again, naming the repo's pickled files if any
            raise
        return folder

    return check


# -- resolving (network and file I/O) --------------------------------------------------------
def _resolve(
    spec: str,
    revision: str | None,
    files: hub.RepoFiles,
    checker: Callable[[Path, str, list[str] | None], Any],
    *,
    what: str,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{what} must be a Hub repo 'owner/name[@revision]' or a local folder, got {spec!r}")
    path = Path(spec.strip()).expanduser()
    if path.is_dir():
        if revision:
            raise ValueError(f"a revision ({revision!r}) only applies to Hub repos, not to the local folder {spec!r}")
        checker(path.resolve(), str(path), None)
        return path.resolve()
    return hub.download_repo(
        spec.strip(), files, _hub_check(checker), revision=revision, cache_dir=cache_dir, offline=offline, token=token
    )


def resolve_pipeline(
    spec: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """The folder of a Stable Diffusion pipeline: a local folder, or a Hub repo downloaded into
    the Hugging Face cache (model_index.json, configs, tokenizers, safetensors and the card only).

    ``spec`` defaults to :data:`DEFAULT_DIFFUSION_MODEL`, which without a revision means
    :data:`DEFAULT_DIFFUSION_REVISION`. Errors are :mod:`ghibli_core.hub`'s: ModelNotFound (no
    such repo or revision; for the default pin, with how to update it), ModelNotAvailable
    (offline or Hub down, nothing cached), CheckpointError (not a usable pipeline).
    """
    spec = (spec or DEFAULT_DIFFUSION_MODEL).strip()
    if is_diffusion_spec(spec):
        spec, in_spec = parse_diffusion_spec(spec)
        if in_spec and revision and in_spec != revision:
            raise ValueError(f"two revisions for {spec}: {in_spec!r} and {revision!r}")
        revision = revision or in_spec
    repo, at, in_text = spec.partition("@")
    if at and not Path(spec).expanduser().is_dir():
        if revision and in_text != revision:
            raise ValueError(f"two revisions for {repo}: {in_text!r} and {revision!r}")
        spec, revision = repo, in_text
    revision = _default_revision(spec, revision)
    try:
        return _resolve(spec, revision, PIPELINE_FILES, lambda f, w, r: check_pipeline_folder(f, what=w, repo_files=r),
                        what="the diffusion model", cache_dir=cache_dir, offline=offline, token=token)
    except hub.ModelNotFound as exc:
        if spec == DEFAULT_DIFFUSION_MODEL and revision == DEFAULT_DIFFUSION_REVISION:
            raise hub.ModelNotFound(
                f"{exc}. This is the default diffusion model's pinned commit "
                "(ghibli_core.diffusion.DEFAULT_DIFFUSION_REVISION): find the repo's current safetensors commit on "
                "the Hub and update that constant (see the README, 'Diffusion model'), or name a revision with "
                f"'{DIFFUSION_PREFIX}{DEFAULT_DIFFUSION_MODEL}@REVISION'"
            ) from exc
        raise


def resolve_controlnet(spec: str = DEFAULT_CONTROLNET, *, revision: str | None = None, **resolve_kwargs) -> Path:
    """The folder of a ControlNet (config.json + safetensors), local or from the Hub."""
    repo, at, in_text = spec.strip().partition("@")
    if at and not Path(spec).expanduser().is_dir():
        spec, revision = repo, revision or in_text
    return _resolve(spec, revision, CONTROLNET_FILES, _check_controlnet_folder, what="the ControlNet", **resolve_kwargs)


def resolve_lora(
    spec: str, *, revision: str | None = None, weight_name: str | None = None, **resolve_kwargs
) -> tuple[Path, str]:
    """``(folder, file name)`` of a LoRA in safetensors, local or from the Hub (root files only)."""
    repo, at, in_text = spec.strip().partition("@")
    if at and not Path(spec).expanduser().is_dir():
        spec, revision = repo, revision or in_text
    folder = _resolve(spec, revision, LORA_FILES, lambda f, w, r: _lora_weights(f, w, weight_name, r),
                      what="the LoRA", **resolve_kwargs)
    return folder, _lora_weights(folder, str(folder), weight_name)


def _source(folder: Path, cache_dir: str | Path | None = None) -> str:
    """``repo@commit`` for a folder in the Hugging Face cache, else the folder's path."""
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/") + "@" + parts[-1]
    return str(folder)


# -- loading ---------------------------------------------------------------------------------
def _dtype(precision: str, device: torch.device) -> torch.dtype:
    choices = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in choices:
        raise ValueError(f"precision must be one of auto, {', '.join(choices)}, got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision 'fp16' needs a GPU (CPU kernels for it are missing or slow): use 'fp32' or 'bf16'")
    return choices[precision]


def _dtype_argument(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # diffusers renamed from_pretrained's torch_dtype to dtype (and warns on the old name)
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401 - only there since the rename
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def load_pipeline(folder: str | Path, *, dtype: torch.dtype = torch.float32):
    """The img2img pipeline of a checked pipeline folder, on the CPU in ``dtype``."""
    from diffusers import AutoPipelineForImage2Image

    folder = check_pipeline_folder(folder)
    index = _read_json(folder / "model_index.json", str(folder))
    skipped: dict[str, Any] = {name: None for name in SKIPPED_COMPONENTS if name in index}
    if "safety_checker" in index:
        skipped["requires_safety_checker"] = False
    pipe = AutoPipelineForImage2Image.from_pretrained(
        str(folder), **_dtype_argument(dtype), use_safetensors=True, local_files_only=True, **skipped
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_controlnet(folder: str | Path, *, dtype: torch.dtype = torch.float32):
    """The ControlNet of a checked folder, on the CPU in ``dtype``."""
    from diffusers import ControlNetModel

    folder = Path(folder)
    _check_controlnet_folder(folder, str(folder))
    return ControlNetModel.from_pretrained(str(folder), **_dtype_argument(dtype), use_safetensors=True, local_files_only=True)


def load_diffusion(
    spec: str | None = None,
    *,
    revision: str | None = None,
    controlnet: str | None = None,
    controlnet_revision: str | None = None,
    lora: str | None = None,
    lora_revision: str | None = None,
    lora_weight: float = 1.0,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    offload: str = "auto",
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
    token: str | bool | None = None,
    **settings: Any,
) -> "DiffusionStylizer":
    """Resolve, load and wrap: a :class:`DiffusionStylizer` for a pipeline spec.

    ``spec``: a Hub repo ``owner/name[@rev]``, ``diffusion:REPO[@REV]`` or a local folder
    (default: :data:`DEFAULT_DIFFUSION_MODEL` at its pinned commit). ``controlnet``: a Canny
    ControlNet spec (e.g. :data:`DEFAULT_CONTROLNET`) for structure preservation, or None.
    ``lora``: a LoRA spec loaded at ``lora_weight``. ``settings``: the stylizer's keyword
    arguments (prompt, strength, steps, ...). Nothing is downloaded when everything is cached
    at a commit sha.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine; use cpu")
    dtype = _dtype(precision, device)
    where = dict(cache_dir=cache_dir, offline=offline, token=token)
    folder = resolve_pipeline(spec, revision=revision, **where)
    cn_folder = resolve_controlnet(controlnet, revision=controlnet_revision, **where) if controlnet else None
    lora_where = resolve_lora(lora, revision=lora_revision, **where) if lora else None
    pipe = load_pipeline(folder, dtype=dtype)
    sources = {"model": _source(folder)}
    net = None
    if cn_folder is not None:
        net = load_controlnet(cn_folder, dtype=dtype)
        sources["controlnet"] = _source(cn_folder)
    stylizer = DiffusionStylizer(
        pipe, controlnet=net, device=device, precision=precision, offload=offload, sources=sources, folder=folder,
        **settings,
    )
    if lora_where is not None:
        stylizer.load_lora(lora_where[0], weight_name=lora_where[1], weight=lora_weight)
    return stylizer


def needs_offload(weights_bytes: int, gpu_bytes: int, *, headroom: int = OFFLOAD_HEADROOM) -> bool:
    """Whether a pipeline of ``weights_bytes`` should be offloaded model by model on a GPU of
    ``gpu_bytes`` (the whole pipeline plus ``headroom`` for activations does not fit)."""
    return weights_bytes + headroom > gpu_bytes


def _module_bytes(*modules) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        if module is None:
            continue
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


# -- edges -----------------------------------------------------------------------------------
def canny_edges(img: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges of an RGB image (OpenCV) as a white-on-black RGB image of the same size:
    the control image of a Canny ControlNet."""
    import cv2
    import numpy as np

    if not 0 <= low < high <= 1000:
        raise ValueError(f"Canny thresholds must satisfy 0 <= low < high <= 1000, got ({low}, {high})")
    gray = cv2.cvtColor(np.asarray(_check_image(img)), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


# -- the stylizer ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffusionSettings:
    """One run's settings (each documented on :class:`DiffusionStylizer`); JSON-able."""

    prompt: str
    negative_prompt: str
    strength: float
    steps: int
    guidance: float
    seed: int
    structure: bool
    structure_scale: float
    canny_low: int
    canny_high: int
    min_side: int
    max_side: int

    @property
    def denoising_steps(self) -> int:
        """Steps actually run: img2img starts ``strength`` of the way into the schedule."""
        return min(int(self.steps * self.strength), self.steps)


def _check_image(img: Image.Image) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__} (load it with imaging.load_image)")
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode!r} (load it with imaging.load_image)")
    if img.width < 1 or img.height < 1:
        raise ValueError(f"expected a non-empty image, got size {img.size}")
    return img


def _number(value: Any, name: str, lo: float, hi: float, *, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"{name} must be between {lo:g} and {hi:g}, got {value!r}")
    return int(value) if integer else float(value)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is {len(value)} characters long; at most {MAX_PROMPT_CHARS} are accepted")
    return value


class DiffusionStylizer:
    """Stylize photos with a Stable Diffusion img2img pipeline; PIL in, PIL out at the photo's size.

    Args:
        pipeline: a diffusers img2img pipeline (SD 1.5 or SDXL), e.g. from :func:`load_pipeline`.
            It is moved to ``device`` and ``precision`` (and offloaded, see ``offload``).
        controlnet: a Canny ``ControlNetModel`` matching the pipeline's UNet, for ``structure``.
        device: where the pipeline runs.
        precision: ``"auto"`` (float16 on CUDA, float32 elsewhere), ``"fp32"``, ``"fp16"`` (GPU
            only) or ``"bf16"``.
        offload: ``"auto"`` (``enable_model_cpu_offload`` on CUDA when the weights plus
            :data:`OFFLOAD_HEADROOM` exceed the GPU's memory), ``"model"`` (always, CUDA only)
            or ``"none"``.
        prompt, negative_prompt: the text the picture is steered towards and away from (the
            default opens with the default model's trigger words, "ghibli style").
        strength: how far from the photo: 0 returns it, 1 ignores it (img2img's strength).
        steps: the denoising schedule's length; ``int(steps * strength)`` steps are run.
        guidance: classifier-free guidance scale (how hard the prompt pulls; <= 1 turns it off).
        seed: the noise; the same seed, photo and settings give the same picture on a device.
        structure: use the ControlNet (default: whenever one is given).
        structure_scale: the ControlNet's weight (0 = no effect).
        canny_thresholds: OpenCV Canny's (low, high) hysteresis thresholds for the edge map.
        min_side, max_side: the working size's longer side is the photo's, raised to ``min_side``
            and capped at ``max_side`` (defaults: the model's native size, 512 for SD 1.5 and
            1024 for SDXL, and 1.5 times it); the result is resized back to the photo's size.
        vae_tiling_above: decode (and encode) through VAE tiles when the working size's longer
            side exceeds this, to bound memory for large photos.
        sources: what was loaded, e.g. ``{"model": "owner/name@sha"}`` (for cards and caches).
        folder: the pipeline's folder (for its model card).
    """

    def __init__(
        self,
        pipeline,
        *,
        controlnet=None,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        offload: str = "auto",
        prompt: str = DEFAULT_PROMPT,
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        strength: float = 0.5,
        steps: int = 30,
        guidance: float = 7.0,
        seed: int = 0,
        structure: bool | None = None,
        structure_scale: float = 0.8,
        canny_thresholds: tuple[int, int] = (100, 200),
        min_side: int | None = None,
        max_side: int | None = None,
        vae_tiling_above: int = 1024,
        sources: dict[str, str] | None = None,
        folder: str | Path | None = None,
    ):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device}: CUDA is not available on this machine; use cpu")
        self.dtype = _dtype(precision, self.device)
        if offload not in ("auto", "model", "none"):
            raise ValueError(f"offload must be 'auto', 'model' or 'none', got {offload!r}")
        if offload == "model" and self.device.type != "cuda":
            raise ValueError("offload='model' moves models between the CPU and a GPU: it needs a CUDA device")
        self.multiple = int(pipeline.vae_scale_factor)
        native = int(pipeline.unet.config.sample_size) * self.multiple
        if controlnet is not None:
            _check_controlnet_fits(controlnet, pipeline.unet)
        elif structure:
            raise ValueError("structure=True needs a ControlNet (load one with controlnet=...)")
        self.vae_tiling_above = int(_number(vae_tiling_above, "vae_tiling_above", 1, 1 << 20, integer=True))
        self.sources = dict(sources or {})
        self.folder = Path(folder) if folder is not None else None
        # the defaults, checked once; calls override them one by one
        self.settings = self._settings(
            None,
            prompt=prompt, negative_prompt=negative_prompt, strength=strength, steps=steps, guidance=guidance,
            seed=seed, structure=controlnet is not None if structure is None else structure,
            structure_scale=structure_scale, canny_low=canny_thresholds[0], canny_high=canny_thresholds[1],
            min_side=native if min_side is None else min_side,
            max_side=(native * 3 // 2) if max_side is None else max_side,
        )

        # 1. precision, then the pipeline with the ControlNet sharing its modules
        pipeline.to(dtype=self.dtype)
        self._pipe = pipeline
        self._control = None
        if controlnet is not None:
            from diffusers import AutoPipelineForImage2Image

            self._control = AutoPipelineForImage2Image.from_pipe(pipeline, controlnet=controlnet.to(dtype=self.dtype))
            self._control.set_progress_bar_config(disable=True)
        # 2. placement: whole on the device, or model by model when the GPU is small
        outer = self._control or self._pipe
        weights = _module_bytes(*(m for m in outer.components.values() if isinstance(m, torch.nn.Module)))
        self.weights_bytes = weights
        self.offloaded = offload == "model" or (
            offload == "auto" and self.device.type == "cuda"
            and needs_offload(weights, torch.cuda.get_device_properties(self.device).total_memory)
        )
        if self.offloaded:
            # the hooks sit on the shared modules, so the plain pipeline is offloaded too
            outer.enable_model_cpu_offload(device=self.device)
        else:
            outer.to(self.device)
        self.lora: dict[str, Any] | None = None
        self._lock = threading.Lock()

    # -- settings -------------------------------------------------------------------------------
    def _settings(self, base: DiffusionSettings | None, **given: Any) -> DiffusionSettings:
        values = {k: v for k, v in given.items() if v is not None}
        if base is not None and "max_side" in values and "min_side" not in values:
            # a lower cap alone brings the default floor down with it
            values["min_side"] = min(base.min_side, values["max_side"]) if isinstance(values["max_side"], int) else base.min_side
        s = replace(base, **values) if base is not None else DiffusionSettings(**values)
        _text(s.prompt, "prompt")
        _text(s.negative_prompt, "negative prompt")
        _number(s.strength, "strength", 0.0, 1.0)
        _number(s.steps, "steps", 1, 1000, integer=True)
        _number(s.guidance, "guidance", 0.0, 50.0)
        _number(s.seed, "seed", 0, 2**63 - 1, integer=True)
        _number(s.structure_scale, "structure scale", 0.0, 2.0)
        _number(s.canny_low, "Canny low threshold", 0, 1000, integer=True)
        _number(s.canny_high, "Canny high threshold", 0, 1000, integer=True)
        if not s.canny_low < s.canny_high:
            raise ValueError(f"Canny thresholds must satisfy low < high, got ({s.canny_low}, {s.canny_high})")
        _number(s.max_side, "max side", self.multiple, 1 << 14, integer=True)
        _number(s.min_side, "min side", self.multiple, 1 << 14, integer=True)
        if s.min_side > s.max_side:
            raise ValueError(f"min side ({s.min_side}) must not exceed max side ({s.max_side})")
        if s.structure and base is not None and self._control is None:
            raise ValueError("structure preservation needs a ControlNet: load the stylizer with one")
        if s.strength > 0 and s.denoising_steps < 1:
            raise ValueError(
                f"strength {s.strength:g} x {s.steps} steps runs no denoising step (img2img runs int(steps x strength)): "
                f"raise the steps to at least {math.ceil(1 / s.strength)} or the strength"
            )
        return replace(s, steps=int(s.steps), seed=int(s.seed), canny_low=int(s.canny_low),
                       canny_high=int(s.canny_high), min_side=int(s.min_side), max_side=int(s.max_side))

    def working_size(self, size: tuple[int, int], settings: DiffusionSettings | None = None) -> tuple[int, int]:
        """The ``(width, height)`` a photo of ``size`` is repainted at (see ``min_side``/``max_side``)."""
        s = settings or self.settings
        w, h = size
        longest = max(w, h)
        scale = min(max(longest, s.min_side), s.max_side) / longest
        m = self.multiple
        return max(m, round(w * scale / m) * m), max(m, round(h * scale / m) * m)

    def fingerprint(self) -> dict[str, Any]:
        """What decides this stylizer's outputs besides the photo (for caches of its results)."""
        return {
            "settings": asdict(self.settings), "sources": self.sources, "lora": self.lora,
            "dtype": str(self.dtype), "device": self.device.type,
        }

    # -- stylizing ------------------------------------------------------------------------------
    def __call__(self, img: Image.Image, *, progress: Callable[[int, int], None] | None = None, **overrides: Any) -> Image.Image:
        """Stylize one RGB photo; the result has its size. ``overrides``: any of the settings
        (``strength``, ``seed``, ``prompt``, ``steps``, ``max_side``, ...) for this call."""
        return self.stylize_images([img], progress=progress, **overrides)[0]

    def stylize_images(
        self,
        images: Sequence[Image.Image],
        *,
        progress: Callable[[int, int], None] | None = None,
        **overrides: Any,
    ) -> list[Image.Image]:
        """Stylize RGB photos one by one (each with the same seed: a result depends on its photo
        and the settings only). ``progress(done, total)`` is called after every denoising step."""
        unknown = set(overrides) - set(DiffusionSettings.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(DiffusionSettings.__dataclass_fields__)}")
        s = self._settings(self.settings, **overrides)
        images = [_check_image(im) for im in images]
        if s.strength == 0:
            return [im.copy() for im in images]
        total = len(images) * s.denoising_steps
        results = []
        with self._lock:
            for i, img in enumerate(images):
                results.append(self._run(img, s, progress, i * s.denoising_steps, total))
        return results

    def _run(self, img: Image.Image, s: DiffusionSettings, progress, done: int, total: int) -> Image.Image:
        w, h = self.working_size(img.size, s)
        x = img if (w, h) == img.size else img.resize((w, h), Image.Resampling.LANCZOS)
        kwargs: dict[str, Any] = dict(
            prompt=s.prompt, negative_prompt=s.negative_prompt or None, image=x, strength=s.strength,
            num_inference_steps=s.steps, guidance_scale=s.guidance, output_type="pil",
            # a CPU generator: the same seed gives the same starting noise on every device
            generator=torch.Generator(device="cpu").manual_seed(s.seed),
        )
        if progress is not None:
            def on_step(pipe, step: int, timestep, tensors: dict) -> dict:
                progress(done + step + 1, total)
                return tensors

            kwargs["callback_on_step_end"] = on_step
        pipe = self._pipe
        if s.structure:
            pipe = self._control
            kwargs.update(control_image=canny_edges(x, s.canny_low, s.canny_high), height=h, width=w,
                          controlnet_conditioning_scale=s.structure_scale)
        vae = self._pipe.vae
        if max(w, h) > self.vae_tiling_above:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
        with torch.inference_mode():
            out = pipe(**kwargs).images[0]
        if out.size != (w, h):
            raise RuntimeError(f"the pipeline returned {out.size} for a {w}x{h} input")
        return out if out.size == img.size else out.resize(img.size, Image.Resampling.LANCZOS)

    # -- LoRA -----------------------------------------------------------------------------------
    def load_lora(self, folder: str | Path, *, weight: float = 1.0, weight_name: str | None = None) -> None:
        """Load a LoRA (safetensors) onto the pipeline at ``weight`` (0 = no effect, 1 = as
        trained), replacing any loaded one. Needs ``peft``."""
        weight = _number(weight, "LoRA weight", 0.0, 2.0)
        folder = Path(folder)
        name = _lora_weights(folder, str(folder), weight_name)
        with self._lock:
            if self.lora is not None:
                self._pipe.unload_lora_weights()
                self.lora = None
            try:
                self._pipe.load_lora_weights(str(folder), weight_name=name, adapter_name=LORA_ADAPTER)
            except (ValueError, KeyError) as exc:
                self._pipe.unload_lora_weights()
                raise ValueError(f"LoRA {folder / name} does not fit this model: {exc}") from exc
            self._pipe.set_adapters([LORA_ADAPTER], adapter_weights=[weight])
            self.lora = {"source": _source(folder) + f"/{name}", "weight": weight}

    def set_lora_weight(self, weight: float) -> None:
        """Change the loaded LoRA's weight."""
        weight = _number(weight, "LoRA weight", 0.0, 2.0)
        with self._lock:
            if self.lora is None:
                raise ValueError("no LoRA is loaded")
            self._pipe.set_adapters([LORA_ADAPTER], adapter_weights=[weight])
            self.lora = {**self.lora, "weight": weight}

    def unload_lora(self) -> None:
        """Remove the LoRA: the pipeline is as before it was loaded."""
        with self._lock:
            if self.lora is not None:
                self._pipe.unload_lora_weights()
                self.lora = None

    def card(self) -> str:
        """The pipeline repo's README.md model card, or "" when it has none."""
        return hub.model_card(self.folder) if self.folder is not None else ""


def _check_controlnet_fits(controlnet, unet) -> None:
    for key in ("cross_attention_dim", "block_out_channels", "in_channels"):
        mine, theirs = controlnet.config.get(key), unet.config.get(key)
        if isinstance(mine, (list, tuple)):
            mine, theirs = list(mine), list(theirs or ())
        if mine != theirs:
            raise ValueError(
                f"the ControlNet was made for another base model: its {key} is {mine}, the pipeline's UNet has {theirs}"
            )


# -- Spaces -------------------------------------------------------------------------------------
def gpu_task(fn: Callable | None = None, *, duration: int = 120):
    """``spaces.GPU(duration=...)`` where the ``spaces`` package is installed (Hugging Face
    Spaces; on ZeroGPU hardware it lends a GPU for the call), ``fn`` unchanged elsewhere.
    Usable as ``@gpu_task`` or ``@gpu_task(duration=60)``."""
    if fn is None:
        return functools.partial(gpu_task, duration=duration)
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)


# -- as a teacher -------------------------------------------------------------------------------
def _image_key(img: Image.Image, fingerprint: str) -> str:
    digest = hashlib.sha256(fingerprint.encode())
    digest.update(f"{img.mode}{img.size}".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()


def as_teacher(
    stylizer: DiffusionStylizer, *, cache_dir: str | Path | None = None, **overrides: Any
) -> Callable[[list[Image.Image]], list[Image.Image]]:
    """``list[PIL] -> list[PIL]``: the stylizer as a distillation teacher (outputs at the
    inputs' sizes). With ``cache_dir``, each output is stored as a PNG named by a hash of the
    input's pixels and everything that decides the output (settings, model commits, LoRA,
    dtype), and read back instead of recomputed: pseudo-pairs made in a GPU session outlive it.
    """
    folder = Path(cache_dir) if cache_dir is not None else None
    stylizer._settings(stylizer.settings, **overrides)  # fail now, not in the training loop

    def teach(images: list[Image.Image]) -> list[Image.Image]:
        fingerprint = json.dumps({**stylizer.fingerprint(), "overrides": overrides}, sort_keys=True, default=str)
        if folder is None:
            return stylizer.stylize_images(images, **overrides)
        keys = [_image_key(_check_image(im), fingerprint) for im in images]
        paths = [folder / k[:2] / f"{k}.png" for k in keys]
        todo = [i for i, p in enumerate(paths) if not p.is_file()]
        made = dict(zip(todo, stylizer.stylize_images([images[i] for i in todo], **overrides))) if todo else {}
        results = []
        for i, path in enumerate(paths):
            if i in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                made[i].save(tmp, format="PNG")
                os.replace(tmp, path)  # a crash never leaves a half-written output to be read back
                results.append(made[i])
            else:
                with Image.open(path) as cached:
                    results.append(cached.convert("RGB"))
        return results

    # names the teacher in the caller's own caches (train distill's cache key)
    teach.teacher_id = "diffusion:" + hashlib.sha256(
        json.dumps({**stylizer.fingerprint(), "overrides": overrides}, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    return teach


def tensor_teacher(
    stylizer: DiffusionStylizer, *, cache_dir: str | Path | None = None, **overrides: Any
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(N, 3, H, W)`` in ``[-1, 1]`` -> the teacher's ``(N, 3, H, W)`` float32 in ``[-1, 1]``
    on the input's device (through 8-bit images, as the PNG cache stores them)."""
    teach = as_teacher(stylizer, cache_dir=cache_dir, **overrides)

    def run(x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"expected a float (N, 3, H, W) tensor in [-1, 1], got {getattr(x, 'shape', type(x).__name__)}")
        return to_tensor(teach([to_pil(xi) for xi in x.detach().float().cpu()])).to(x.device)

    return run
