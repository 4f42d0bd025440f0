"""The app's diffusion section: Stable Diffusion img2img inside the "Photo → Ghibli" tab.

Offered where it can run in reasonable time (a CUDA GPU) or where it is asked for
(``python app.py --diffusion`` or ``GHIBLI_DIFFUSION=1``). On a CPU it says plainly what it costs
and caps the size and the steps (:data:`CPU_LIMITS`). Nothing is imported from diffusers and no
pipeline is built until the first request; :class:`DiffusionService` then keeps one pipeline
loaded (they take gigabytes) and reloads only when another model or a ControlNet is asked for.

``app.py`` calls :func:`diffusion_section` inside its photo tab, passing the tab's components and
its input helpers; the handlers live here.
"""
from __future__ import annotations

import gc
import html
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import hub
from .diffusion import (
    DEFAULT_CONTROLNET,
    DEFAULT_DIFFUSION_MODEL,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_PROMPT,
    DiffusionStylizer,
    gpu_task,
    load_diffusion,
    resolve_lora,
    resolve_pipeline,
)
from .imaging import ImageLoadError, load_image

ENV_FLAG = "GHIBLI_DIFFUSION"
_TRUE = ("1", "true", "yes", "on")
# what a CPU costs, said where the section opens and with every CPU result (figure reported in
# issue 14 from this project's 2-core machines)
CPU_COST = (
    "**No GPU here: Stable Diffusion runs on the CPU, which takes minutes per picture** (an SD 1.5 "
    "img2img at 512 px and 20 steps took several minutes on a 2-core machine). Size and steps are capped "
    "below; the first run also downloads the model (several GB)."
)
GPU_NOTE = "Runs on the GPU. The first run downloads the model (several GB) and loads it; later runs reuse it."


@dataclass(frozen=True)
class DiffusionLimits:
    """Caps on a request: the working size's longer side and the schedule's length."""

    max_side: int
    max_steps: int


GPU_LIMITS = DiffusionLimits(max_side=1536, max_steps=80)
CPU_LIMITS = DiffusionLimits(max_side=512, max_steps=20)


def wanted(flag: bool | None = None, env: dict[str, str] | None = None) -> bool:
    """Whether the app offers diffusion: ``flag`` when given, else ``$GHIBLI_DIFFUSION`` when
    set, else whether CUDA is available."""
    if flag is not None:
        return bool(flag)
    value = (os.environ if env is None else env).get(ENV_FLAG, "").strip().lower()
    if value:
        return value in _TRUE
    return torch.cuda.is_available()


class DiffusionService:
    """The app's diffusion models: one pipeline at a time, loaded on the first request.

    Args:
        device: where pipelines run.
        precision: passed to :class:`~ghibli_core.diffusion.DiffusionStylizer`.
        controlnet: the Canny ControlNet "keep shapes" loads (a Hub spec).
        limits: request caps (default :data:`GPU_LIMITS` on CUDA, :data:`CPU_LIMITS` elsewhere).
    """

    def __init__(
        self,
        *,
        device: str = "cpu",
        precision: str = "auto",
        controlnet: str = DEFAULT_CONTROLNET,
        limits: DiffusionLimits | None = None,
    ):
        self.device = device
        self.precision = precision
        self.controlnet = controlnet
        self.on_cpu = torch.device(device).type == "cpu"
        self.limits = limits or (CPU_LIMITS if self.on_cpu else GPU_LIMITS)
        self._key: tuple | None = None
        self._stylizer: DiffusionStylizer | None = None
        self._lora: hub.ModelSpec | None = None  # the LoRA spec loaded onto it
        # one request at a time configures (LoRA) and runs the shared pipeline
        self.lock = threading.Lock()

    @property
    def loaded(self) -> list[tuple]:
        """Keys of the pipelines held now (at most one)."""
        return [self._key] if self._key is not None else []

    def stylizer(self, repo: str, revision: str | None, *, structure: bool) -> DiffusionStylizer:
        """The pipeline for ``repo@revision`` (with the ControlNet when ``structure``); call
        under :attr:`lock`. One with a ControlNet also serves requests without."""
        key = (repo, revision)
        current = self._stylizer
        if current is not None and self._key == key and (current._control is not None or not structure):
            return current
        # 1. free the old pipeline before loading a new one: two rarely fit in GPU memory
        self._stylizer = self._key = self._lora = None
        del current
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # 2. load
        stylizer = load_diffusion(
            repo, revision=revision, controlnet=self.controlnet if structure else None,
            device=self.device, precision=self.precision,
        )
        self._stylizer, self._key = stylizer, key
        return stylizer

    def use_lora(self, spec: hub.ModelSpec | None, weight: float) -> None:
        """Load the LoRA ``spec`` names (Hub) at ``weight`` onto the current pipeline, or remove
        any with None; a LoRA already loaded only has its weight set. Call under :attr:`lock`."""
        stylizer = self._stylizer
        if stylizer is None:
            raise RuntimeError("load a pipeline first (DiffusionService.stylizer)")
        if spec is None:
            stylizer.unload_lora()
            self._lora = None
        elif spec == self._lora:
            stylizer.set_lora_weight(weight)
        else:
            folder, weight_name = resolve_lora(spec.location, revision=spec.revision)
            self._lora = None  # until it is in place
            stylizer.load_lora(folder, weight_name=weight_name, weight=weight)
            self._lora = spec

    def card(self, repo: str = DEFAULT_DIFFUSION_MODEL, revision: str | None = None) -> str:
        """The repo's model card from the cache (never the network), or a line saying why not."""
        try:
            folder = resolve_pipeline(repo, revision=revision, offline=True)
        except hub.ModelNotAvailable:
            return f"*The model card of {html.escape(repo)} is shown once the model has been downloaded (first run).*"
        except (ValueError, hub.HubError) as exc:
            return f"*No model card: {html.escape(str(exc))}*"
        text = hub.model_card(folder)
        return text or f"*{html.escape(repo)} has no model card.*"


def diffusion_section(
    ctx: Any,
    *,
    photo,
    outputs: list,
    uploaded_path: Callable[[Any, str], tuple[str, str]],
    number: Callable[..., float],
    error: Callable[[Exception], Exception],
    safe_stem: Callable[[str | None], str],
    strip_card: Callable[[str], str] = lambda text: text,
) -> None:
    """Build the diffusion accordion and its ``stylize_diffusion`` event in the current tab.

    ``photo`` is the tab's upload component and ``outputs`` its ``[result, download, notice,
    card]``; ``uploaded_path``, ``number``, ``error`` and ``safe_stem`` are the app's own input
    checks, error wrapping and file naming, ``strip_card`` its model-card cleaning.
    """
    import gradio as gr

    service: DiffusionService = ctx.diffusion
    limits = service.limits

    def run(photo_payload, repo, prompt, negative_prompt, strength, steps, guidance, seed, structure, lora,
            lora_weight, progress=gr.Progress()):
        # 1. every input checked before anything is loaded
        try:
            path, name = uploaded_path(photo_payload, "a photo")
            strength = number(strength, "strength", lo=0.0, hi=1.0)
            steps = int(number(steps, "steps", lo=1, hi=limits.max_steps))
            guidance = number(guidance, "guidance", lo=0.0, hi=30.0)
            seed = int(number(seed, "seed", lo=0, hi=2**32 - 1))
            lora_weight = number(lora_weight, "LoRA weight", lo=0.0, hi=2.0)
            model = ctx.models.spec(None, repo, None) if (repo or "").strip() else hub.ModelSpec("hub", DEFAULT_DIFFUSION_MODEL)
            lora_spec = ctx.models.spec(None, lora, None) if (lora or "").strip() else None
            if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
                raise ValueError("the prompts must be text")
        except (ValueError, hub.HubError) as exc:
            raise error(exc) from None
        try:
            image = load_image(path, max_pixels=ctx.max_pixels)
        except ImageLoadError as exc:
            raise error(ValueError(str(exc).replace(path, name))) from None

        # 2. the pipeline (downloaded and loaded on first use), then the picture
        with service.lock:
            progress(0.02, desc="loading the diffusion model")
            try:
                stylizer = service.stylizer(model.location, model.revision, structure=bool(structure))
                service.use_lora(lora_spec, lora_weight)

                def report(done: int, total: int) -> None:
                    progress((done, total), desc="denoising", unit="steps")

                result = stylizer(
                    image, prompt=prompt, negative_prompt=negative_prompt, strength=strength, steps=steps,
                    guidance=guidance, seed=seed, structure=bool(structure),
                    max_side=min(limits.max_side, stylizer.settings.max_side), progress=report,
                )
            except (ValueError, hub.HubError) as exc:
                raise error(exc) from None
            used = ", ".join(f"{what} {source}" for what, source in stylizer.sources.items())
            card = strip_card(stylizer.card()) or f"*{html.escape(model.location)} has no model card.*"
        out = ctx.outputs.path_for(f"{safe_stem(name)}_ghibli.png")
        result.save(out, format="PNG")
        notice = (CPU_COST + " " if service.on_cpu else "") + f"Used: {html.escape(used)}."
        return str(out), str(out), notice, card

    with gr.Accordion("Diffusion model (Stable Diffusion img2img)", open=False):
        gr.Markdown(
            "A Stable Diffusion model repaints the photo, steered by the prompt: richer than the fast "
            "models, and much slower. " + (CPU_COST if service.on_cpu else GPU_NOTE)
        )
        repo = gr.Textbox(
            "", label="Diffusion repo (owner/name[@revision])", placeholder=f"{DEFAULT_DIFFUSION_MODEL} (pinned commit)",
            info="any Stable Diffusion 1.5 or SDXL repo in diffusers layout with safetensors weights",
        )
        prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", info="keep 'ghibli style' for the default model")
        negative_prompt = gr.Textbox(DEFAULT_NEGATIVE_PROMPT, label="Negative prompt")
        with gr.Row():
            strength = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Strength", info="0 = the photo, 1 = ignore it")
            steps = gr.Slider(1, limits.max_steps, value=min(30, limits.max_steps), step=1, label="Steps",
                              info="strength x steps denoising steps run")
        with gr.Row():
            guidance = gr.Slider(0.0, 30.0, value=7.0, step=0.5, label="Guidance", info="how hard the prompt pulls")
            seed = gr.Number(0, precision=0, label="Seed", info="same seed, same picture")
        structure = gr.Checkbox(False, label="Keep shapes (Canny ControlNet)",
                                info=f"loads {service.controlnet} beside the model")
        with gr.Row():
            lora = gr.Textbox("", label="LoRA repo (optional)", placeholder="owner/name[@revision]", scale=3)
            lora_weight = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA weight", scale=2)
        button = gr.Button("Run diffusion", variant="primary")
        with gr.Accordion("Diffusion model card", open=False):
            gr.Markdown(strip_card(service.card()))
    button.click(
        gpu_task(run, duration=180),
        inputs=[photo, repo, prompt, negative_prompt, strength, steps, guidance, seed, structure, lora, lora_weight],
        outputs=outputs,
        api_name="stylize_diffusion",
        preprocess=False,
        **ctx.heavy,
    )
