"""The diffusion options of ``python -m ghibli_core stylize`` (``--model diffusion:REPO[@REV]``).

Example::

    python -m ghibli_core stylize photos/ -o out/ --model diffusion: --device cuda \\
        --prompt "ghibli style, a seaside town" --diffusion-strength 0.55 --structure

``diffusion:`` alone is the default model at its pinned commit. ``--strength`` keeps its meaning
for every model (a blend of the result with the photo, 1 = the result alone); how far the
diffusion model repaints is ``--diffusion-strength``.
"""
from __future__ import annotations

import argparse
import sys

# option -> the stylizer setting it sets (None: it is not a setting of the stylizer)
_SETTINGS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "diffusion_strength": "strength",
    "diffusion_steps": "steps",
    "guidance": "guidance",
    "seed": "seed",
    "structure_scale": "structure_scale",
}
_OTHERS = ("structure", "structure_model", "lora", "lora_weight", "offload")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The diffusion options, all defaulting to None ("the model's default")."""
    g = p.add_argument_group("diffusion models (--model diffusion:REPO[@REV]; a GPU is strongly advised)")
    g.add_argument("--prompt", default=None, help="what the picture is steered towards (default opens with 'ghibli style')")
    g.add_argument("--negative-prompt", default=None, help="what it is steered away from")
    g.add_argument("--diffusion-strength", type=float, default=None, metavar="S", help="how far from the photo: 0 = the photo, 1 = ignore it (default 0.5)")
    g.add_argument("--diffusion-steps", type=int, default=None, metavar="N", help="denoising schedule length; N x strength steps run (default 30)")
    g.add_argument("--guidance", type=float, default=None, help="how hard the prompt pulls (default 7)")
    g.add_argument("--seed", type=int, default=None, help="the noise: same seed, same picture (default 0)")
    g.add_argument("--structure", action="store_true", default=None, help="keep shapes with a Canny ControlNet (default one for SD 1.5)")
    g.add_argument("--structure-model", default=None, metavar="REPO[@REV]", help="the Canny ControlNet to use (implies --structure)")
    g.add_argument("--structure-scale", type=float, default=None, help="the ControlNet's weight (default 0.8)")
    g.add_argument("--lora", default=None, metavar="REPO[@REV]", help="a LoRA (safetensors) to load onto the model")
    g.add_argument("--lora-weight", type=float, default=None, help="the LoRA's weight, 0-2 (default 1)")
    g.add_argument("--offload", choices=["auto", "model", "none"], default=None, help="move models between CPU and GPU (default auto: when the GPU is small)")


def check_unused(args: argparse.Namespace) -> None:
    """A diffusion option with a model that is not a diffusion model is a mistake: say so."""
    given = [name for name in (*_SETTINGS, *_OTHERS) if getattr(args, name, None) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flags} only apply to diffusion models (--model diffusion:REPO[@REV])")


class _Blended:
    """The diffusion stylizer behind the stylize command's ``(photo, strength=)`` call, where
    ``strength`` blends the result with the photo as it does for every model."""

    def __init__(self, stylizer):
        self.stylizer = stylizer

    def __call__(self, photo, *, strength: float = 1.0):
        from PIL import Image

        if strength == 0:
            return photo.copy()
        result = self.stylizer(photo)
        return result if strength == 1 else Image.blend(photo, result, strength)


def make_stylizer(args: argparse.Namespace, device) -> _Blended:
    """Load the diffusion model ``args.model`` names, with the options given."""
    from ..diffusion import DEFAULT_CONTROLNET, load_diffusion

    settings = {key: getattr(args, name) for name, key in _SETTINGS.items() if getattr(args, name) is not None}
    controlnet = args.structure_model or (DEFAULT_CONTROLNET if args.structure else None)
    stylizer = load_diffusion(
        args.model, revision=args.revision, controlnet=controlnet, lora=args.lora,
        lora_weight=1.0 if args.lora_weight is None else args.lora_weight,
        device=device, precision=args.precision, offload=args.offload or "auto", **settings,
    )
    # the commits actually used, so a run on a branch can be pinned next time
    used = ", ".join(f"{what} {source}" for what, source in stylizer.sources.items())
    print(f"diffusion: {used}" + (" (offloaded model by model)" if stylizer.offloaded else ""), file=sys.stderr)
    if device.type == "cpu":
        print("diffusion: running on the CPU, which takes minutes per photo; use --device cuda where there is a GPU",
              file=sys.stderr)
    return _Blended(stylizer)
