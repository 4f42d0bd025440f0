"""Ghibli Studio: the Gradio app (layout and events only; the work is done by ``ghibli_core``).

Run it with ``python app.py`` (http://127.0.0.1:7860, no network needed) or as a Hugging Face
Space (``SYSTEM=spaces`` binds 0.0.0.0). ``python app.py --help`` lists the flags.

Structure: :class:`Models` loads models lazily and shares them between sessions; each tab is
one function taking an :class:`AppContext` and building its components and events inside the
current ``gr.Blocks`` (:data:`TABS` lists them, in order); :func:`build_app` assembles the
Blocks and its queue, :func:`launch` serves it. Importing this module loads no model.
"""
from __future__ import annotations

import argparse
import atexit
import html
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import numpy as np
import torch
from PIL import Image

from ghibli_core import app_diffusion, hub
from ghibli_core.imaging import (
    DEFAULT_MAX_PIXELS, MIN_SIDE, ImageLoadError, center_crop_resize, load_image, to_tensor, to_uint8,
)
from ghibli_core.latent import (
    EASINGS,
    Evolution,
    latent_stats,
    load_latent,
    neighbours,
    noise_loop,
    project,
    render,
    save_animation,
    save_latent,
    seed_ws,
    walk,
    walk_length,
)
from ghibli_core.models import CheckpointError, read_config
from ghibli_core.stylize import Stylizer
from ghibli_core.video import (
    RESOLUTIONS, VideoError, VideoLimits, check_limits, mallopt, probe, reuse_freed_memory, stylize_video,
)

ROOT = Path(__file__).resolve().parent
EXAMPLES_DIR = ROOT / "examples"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# Uploads above this are refused by Gradio before any of our code runs; the pixel limit of
# load_image then guards against small files that decode into huge images.
MAX_FILE_SIZE = "50mb"
HEAVY = "heavy"  # concurrency_id shared by every event that runs a network
# Gradio's copies of uploads and results older than this are deleted, checked this often.
CACHE_S = 3600
# Video caps for a free CPU Space (2 vCPU): 30 s and 900 frames at most per job (trim longer
# clips), input frames up to 4K (decoding cost); checked before anything is decoded.
VIDEO_LIMITS = VideoLimits(max_seconds=30.0, max_pixels=3840 * 2160, max_frames=900)

_REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_FRONT_MATTER_RE = re.compile(r"\A---\s*\n.*?\n---\s*\n", re.DOTALL)


# model_type (config.json) -> the tabs that offer it
MODEL_KINDS = {
    "image": {"cyclegan-resnet", "cyclegan-unet", "style-net"},
    "video": {"cyclegan-resnet", "cyclegan-unet", "style-net"},  # the image models, another default
    "gan": {"stylegan2"},
}


class UserError(ValueError):
    """A problem with what the user asked for; shown as it is."""


# -- models -----------------------------------------------------------------------------------
class Models:
    """The models the app serves: embedded ones under ``weights_dir`` or Hub repos.

    Models load on first use and stay loaded (``ghibli_core.hub`` keeps the modules, this class
    the :class:`Stylizer` built on each), so a second request with the same model costs nothing.
    Thread-safe: Gradio runs events in worker threads.

    Args:
        weights_dir: folder of embedded checkpoints (one sub-folder each).
        default_model: the embedded model selected at start, and the fallback when a Hub repo
            cannot be reached.
        default_gan: the embedded generator of the latent-space tabs.
        default_video: the embedded model the video tab selects at start (``default_model``
            where it is not installed).
        device: torch device the networks run on.
        precision: compute precision passed to :class:`Stylizer` (``"auto"`` picks per device).
        cache_size: how many engines to keep.
    """

    def __init__(
        self,
        *,
        weights_dir: str | Path = hub.WEIGHTS_DIR,
        default_model: str = hub.DEFAULT_MODEL,
        default_gan: str = hub.DEFAULT_GAN,
        default_video: str = hub.DEFAULT_VIDEO_MODEL,
        device: str = "cpu",
        precision: str = "auto",
        cache_size: int = 4,
    ):
        self.weights_dir = Path(weights_dir)
        self.default_model = default_model
        self.default_gan = default_gan
        self.default_video = default_video
        self.device = device
        self.precision = precision
        self.cache_size = cache_size
        # id(model) -> (model, engine); the model is held so its id cannot be reused
        self._engines: OrderedDict[int, tuple[Any, Stylizer]] = OrderedDict()
        self._lock = threading.Lock()

    def embedded(self, kind: str = "image") -> list[str]:
        """Names of the embedded models of ``kind``, read from disk each time (new exports show up).

        ``kind`` is ``"image"`` (image-to-image networks: photo and video tabs) or ``"gan"``
        (generators for the latent-space tabs); discriminators are never offered.
        """
        if kind not in MODEL_KINDS:
            raise ValueError(f"kind must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
        names = []
        for name in hub.embedded_models(self.weights_dir):
            try:
                model_type = read_config(self.weights_dir / name).get("model_type", "")
            except CheckpointError:
                continue
            if model_type in MODEL_KINDS[kind]:
                names.append(name)
        return names

    def figures(self, name: str) -> dict[str, Any]:
        """The held-out figures the card of embedded model ``name`` declares (``hub.card_metrics``);
        ``{}`` when it declares none or its front matter cannot be read."""
        try:
            return hub.card_metrics(self.weights_dir / name)
        except ValueError:
            return {}

    def choices(self, kind: str = "image") -> list[tuple[str, str]]:
        """``(label, name)`` of each embedded model of ``kind`` for a picker: the label adds the
        held-out KID its card declares, so what a model achieves shows before it is chosen."""
        return [(model_label(name, self.figures(name)), name) for name in self.embedded(kind)]

    def quality_notice(self) -> str:
        """Markdown saying which embedded models miss the project's bar (KID x 1000 above
        ``hub.KID_BAR_X1000`` on held-out films), with their figures; "" when none does."""
        below = []
        for kind in ("image", "gan"):
            for name in self.embedded(kind):
                figures = self.figures(name)
                if figures.get("kid_x1000", 0.0) > hub.KID_BAR_X1000:
                    below.append(f"`{name}` {_kid_text(figures)}")
        if not below:
            return ""
        return (
            "⚠️ **Early models, below the project's quality bar:** their results do not look like Ghibli "
            "films yet. KID×1000 of their results against frames of Ghibli films held out of training "
            "(lower is better; the bar is "
            f"{hub.KID_BAR_X1000:g}, and other Ghibli films score about 13): " + "; ".join(below) + ". "
            "Each model's card has its recipe and figures."
        )

    def initial_choice(self, kind: str = "image") -> str | None:
        names = self.embedded(kind)
        if kind == "gan":
            preferred = [self.default_gan]
        elif kind == "video":  # the fast video network, else the photo model
            preferred = [self.default_video, self.default_model]
        else:
            preferred = [self.default_model]
        for name in preferred:
            if name in names:
                return name
        return names[0] if names else None

    def spec(self, embedded: str | None, hub_repo: str | None, revision: str | None, *, kind: str = "image") -> str | hub.ModelSpec:
        """The model the controls name: the Hub repo when one is typed, else the embedded choice.

        The dropdown value is checked against the embedded names and the repo box is always
        read as a Hub repo: an API caller must not be able to point the app at arbitrary
        folders on the server.
        """
        repo_text = (hub_repo or "").strip()
        revision = (revision or "").strip() or None
        if repo_text:
            repo, at, rev_in_text = repo_text.partition("@")
            if not _REPO_ID_RE.fullmatch(repo) or ".." in repo:
                raise UserError(f"Hub repo must look like 'owner/name', got {repo_text!r}")
            if at and not rev_in_text:
                raise UserError(f"empty revision after '@' in {repo_text!r}")
            if rev_in_text and revision and rev_in_text != revision:
                raise UserError(f"two revisions for {repo}: {rev_in_text!r} in the repo box and {revision!r} in the revision box")
            return hub.parse_spec(hub.ModelSpec("hub", repo), revision or rev_in_text or None)
        if revision:
            raise UserError("a revision only applies to a Hub repo: type the repo as owner/name, or clear the revision")
        names = self.embedded(kind)
        if not embedded:
            if not names:
                raise UserError(f"no embedded model is installed in {self.weights_dir}: type a Hub repo as owner/name")
            raise UserError("choose a model")
        if embedded not in names:
            raise UserError(f"unknown model {embedded!r}; embedded models: {', '.join(names) or 'none'}")
        return embedded

    def stylizer(self, spec: str | hub.ModelSpec) -> tuple[Stylizer, str | None, str]:
        """``(engine, notice, card)`` for ``spec``: ``notice`` says when the default was used
        instead (Hub unreachable and no cached copy), ``card`` is the served model's card."""
        model, notice = hub.load_with_fallback(
            spec, weights_dir=self.weights_dir, default=self.default_model, map_location="cpu"
        )
        # after a successful load the files are local: read the card without asking the Hub again
        card = self.card(self.default_model) if notice else self.card(spec, offline=True)
        with self._lock:
            entry = self._engines.get(id(model))
            if entry is None:
                entry = (model, Stylizer(model, device=self.device, precision=self.precision))
                self._engines[id(model)] = entry
                while len(self._engines) > self.cache_size:
                    self._engines.popitem(last=False)
            self._engines.move_to_end(id(model))
        return entry[1], notice, card

    def gan(self, spec: str | hub.ModelSpec) -> tuple[Any, str | None, str]:
        """``(generator, notice, card)`` for a StyleGAN2 ``spec`` (the embedded default GAN when
        the Hub cannot be reached), in eval mode on the app's device."""
        model, notice = hub.load_with_fallback(
            spec, weights_dir=self.weights_dir, default=self.default_gan, map_location=self.device
        )
        missing = [a for a in ("mapping", "synthesis", "num_ws", "w_dim", "z_dim") if not hasattr(model, a)]
        if missing:
            raise UserError(f"{spec} is a {type(model).__name__}, not a StyleGAN2 generator")
        card = self.card(self.default_gan) if notice else self.card(spec, offline=True)
        return model.eval(), notice, card

    def card(self, spec: str | hub.ModelSpec | None, *, offline: bool = True) -> str:
        """The model card as Markdown (YAML front matter removed), or a line saying there is none."""
        if not spec:
            return "*No model selected.*"
        try:
            folder = hub.resolve(spec, weights_dir=self.weights_dir, offline=offline)
        except (ValueError, hub.HubError) as exc:
            return f"*No model card: {html.escape(str(exc))}*"
        text = _FRONT_MATTER_RE.sub("", hub.model_card(folder), count=1).strip()
        return text or f"*{spec} has no model card.*"


def _kid_text(figures: dict[str, Any]) -> str:
    text = f"{figures['kid_x1000']:.2f}"
    if "kid_baseline_x1000" in figures:
        text += f" ({figures.get('kid_baseline', 'baseline')}: {figures['kid_baseline_x1000']:.2f})"
    return text


def model_label(name: str, figures: dict[str, Any]) -> str:
    """A picker's label for an embedded model: its name and, when its card declares it, its
    held-out KID x 1000 (``photo2ghibli · KID 106.85 (the photos unchanged: 93.97)``)."""
    return f"{name} · KID {_kid_text(figures)}" if "kid_x1000" in figures else name


# -- results on disk ----------------------------------------------------------------------------
class OutputFolder:
    """Where result files are written for Gradio to serve.

    Gradio copies every returned file into its own cache (and deletes those copies on its own
    schedule), so ours are only needed for a moment; folders older than ``keep_s`` are removed
    on each write.
    """

    def __init__(self, *, keep_s: float = 600.0):
        self.keep_s = keep_s
        self._root: Path | None = None
        self._lock = threading.Lock()

    def path_for(self, name: str) -> Path:
        with self._lock:
            if self._root is None or not self._root.is_dir():
                self._root = Path(tempfile.mkdtemp(prefix="ghibli-studio-"))
                atexit.register(shutil.rmtree, self._root, True)
            now = time.time()
            for old in self._root.iterdir():
                try:
                    if now - old.stat().st_mtime > self.keep_s:
                        shutil.rmtree(old, ignore_errors=True)
                except FileNotFoundError:
                    continue
            folder = self._root / uuid.uuid4().hex
            folder.mkdir()
        return folder / name

    @property
    def root(self) -> Path | None:
        """The folder holding one sub-folder per result (None before the first result)."""
        return self._root


def _safe_stem(name: str | None, fallback: str = "photo") -> str:
    stem = Path(name or "").stem
    stem = re.sub(r"[^\w.-]+", "_", stem).strip("._")[:80]
    return stem or fallback


# -- shared context -----------------------------------------------------------------------------
@dataclass
class AppContext:
    """What every tab builder gets: the models, the output folder and the app's limits."""

    models: Models
    outputs: OutputFolder
    max_pixels: int = DEFAULT_MAX_PIXELS
    examples_dir: Path = EXAMPLES_DIR
    heavy_concurrency: int = 1
    video_limits: VideoLimits = field(default_factory=lambda: VIDEO_LIMITS)
    vgg: str | None = None  # VGG weights (file or Hub repo) for the projection's perceptual distance
    diffusion: Any = None  # app_diffusion.DiffusionService where the photo tab offers a diffusion model
    _perceptual: Any = field(default=None, repr=False)
    _perceptual_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def perceptual(self):
        """The projection's loss network, loaded once; ``None`` (pixel distance only) without ``vgg``."""
        if not self.vgg:
            return None
        with self._perceptual_lock:
            if self._perceptual is None:
                from ghibli_core.models import load_vgg

                try:
                    self._perceptual = load_vgg(self.vgg, device=self.models.device)
                except (ValueError, FileNotFoundError) as exc:
                    raise UserError(f"the app's VGG weights could not be loaded: {exc}") from None
            return self._perceptual

    @property
    def heavy(self) -> dict[str, Any]:
        """Event keywords for jobs that run a network: they share one concurrency limit."""
        return {"concurrency_id": HEAVY, "concurrency_limit": self.heavy_concurrency}


def user_error(exc: Exception, *, replace: dict[str, str] | None = None) -> gr.Error:
    """A library error as a ``gr.Error`` the user sees (the message, no traceback)."""
    message = str(exc)
    for old, new in (replace or {}).items():
        message = message.replace(old, new)
    # gr.Error renders HTML: a message naming "<bytes>" or a path with "<" must stay visible text
    return gr.Error(html.escape(message, quote=False), print_exception=False)


def _uploaded_path(payload: Any, what: str) -> tuple[str, str]:
    """``(server path, the name the user gave it)`` of an uploaded file payload (FileData dict)."""
    if payload is None:
        raise UserError(f"upload {what} first")
    if isinstance(payload, dict):
        path = payload.get("path")
        name = payload.get("orig_name") or (Path(path).name if path else None)
    else:
        # never a bare path: that would let an API caller name any file on the server
        raise UserError(f"expected {what} as an uploaded file, got {type(payload).__name__}")
    if not path:
        raise UserError(f"upload {what} first")
    return str(path), name or Path(path).name


def _number(value: Any, name: str, *, lo: float, hi: float) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not lo <= x <= hi:
        raise UserError(f"{name} must be between {lo:g} and {hi:g}, got {x:g}")
    return x


def stylize_at_photo_size(stylizer: Stylizer, photo: Image.Image, *, strength: float, max_side: int) -> Image.Image:
    """Stylize ``photo`` at most ``max_side`` pixels on its longer side and return it at the
    photo's own size; for a downscaled run the strength blend is done at full size, so the
    original keeps its detail where it shows through."""
    if max(photo.size) <= max_side:
        return stylizer(photo, strength=strength)
    styled = stylizer(photo, strength=1.0, max_side=max_side).resize(photo.size, Image.Resampling.LANCZOS)
    return Image.blend(photo, styled, strength)


# -- tab: Photo -> Ghibli -----------------------------------------------------------------------
MAX_SIDE_RANGE = (256, 4096)
MODEL_INFO = (
    f"an embedded model, with its KID×1000 on held-out films from its card (lower is better; the bar is "
    f"{hub.KID_BAR_X1000:g}); a Hub repo typed below takes precedence"
)


def photo_tab(ctx: AppContext) -> None:
    """Tab "Photo → Ghibli": one photo in, the stylized PNG out at the photo's own size."""

    def run(photo, model, hub_repo, revision, strength, max_side, progress=gr.Progress()):
        # The event runs with preprocess=False: Gradio's own image preprocessing would decode the
        # upload with plain PIL (no pixel cap, a stack trace for a non-image). Inputs arrive raw
        # and are checked here, by the library's safe loader.
        try:
            path, name = _uploaded_path(photo, "a photo")
            strength = _number(strength, "strength", lo=0.0, hi=1.0)
            max_side = int(_number(max_side, "max side", lo=MAX_SIDE_RANGE[0], hi=MAX_SIDE_RANGE[1]))
            spec = ctx.models.spec(model, hub_repo, revision)
        except (ValueError, hub.HubError) as exc:
            raise user_error(exc) from None
        try:
            image = load_image(path, max_pixels=ctx.max_pixels, min_side=MIN_SIDE)
        except ImageLoadError as exc:
            raise user_error(exc, replace={path: name}) from None
        # a first request loads the model (seconds on a CPU), a large photo takes seconds too
        progress(0.1, desc="loading the model")
        try:
            stylizer, notice, card = ctx.models.stylizer(spec)
        except (ValueError, hub.HubError) as exc:
            raise user_error(exc) from None
        if notice:
            gr.Warning(html.escape(notice, quote=False))

        progress(0.3, desc=f"stylizing {image.width}x{image.height}")
        result = stylize_at_photo_size(stylizer, image, strength=strength, max_side=max_side)
        out = ctx.outputs.path_for(f"{_safe_stem(name)}_ghibli.png")
        result.save(out, format="PNG")
        # plain values, not component updates: API clients get a path, a path, text, text
        return str(out), str(out), f"⚠️ {html.escape(notice, quote=False)}" if notice else "", card

    def show_card(model):
        if not model or model not in ctx.models.embedded():
            return "*No model selected.*"
        return ctx.models.card(model)

    initial = ctx.models.initial_choice()
    with gr.Tab("Photo → Ghibli", id="photo"):
        with gr.Row():
            with gr.Column():
                photo = gr.Image(label="Photo", type="filepath", sources=["upload", "clipboard"])
                with gr.Group():
                    model = gr.Dropdown(
                        choices=ctx.models.choices(),
                        value=initial,
                        label="Model",
                        info=MODEL_INFO,
                    )
                    with gr.Row():
                        hub_repo = gr.Textbox("", label="Hub repo owner/name", placeholder="owner/name", scale=3)
                        revision = gr.Textbox("", label="Revision (optional)", placeholder="main, a tag or a commit", scale=2)
                strength = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="Strength", info="0 = the photo, 1 = fully stylized")
                max_side = gr.Slider(
                    *MAX_SIDE_RANGE,
                    value=1024,
                    step=64,
                    label="Max side (px)",
                    info="larger photos are stylized at this size and returned at their own size",
                )
                button = gr.Button("Run", variant="primary")
            with gr.Column():
                result = gr.Image(label="Ghibli style", type="filepath", format="png", interactive=False)
                download = gr.DownloadButton("Download PNG")
                notice = gr.Markdown(label="Notice")
                with gr.Accordion("Model card", open=False):
                    card = gr.Markdown(ctx.models.card(initial), label="Model card")
        examples = sorted(p for p in ctx.examples_dir.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
        if examples:
            gr.Examples(
                examples=[[str(p)] for p in examples],
                inputs=[photo],
                cache_examples=False,
                label="Examples (synthetic scenes)",
                api_name="photo_example",
            )

        if ctx.diffusion is not None:
            app_diffusion.diffusion_section(
                ctx, photo=photo, outputs=[result, download, notice, card], uploaded_path=_uploaded_path,
                number=_number, error=user_error, safe_stem=_safe_stem,
                strip_card=lambda text: _FRONT_MATTER_RE.sub("", text, count=1).strip(),
            )

        button.click(
            run,
            inputs=[photo, model, hub_repo, revision, strength, max_side],
            outputs=[result, download, notice, card],
            api_name="stylize",
            preprocess=False,
            **ctx.heavy,
        )
        model.change(show_card, inputs=[model], outputs=[card], api_name="model_card")


# -- tab: Video stylize ---------------------------------------------------------------------------
def _video_payload(payload: Any) -> Any:
    """The uploaded file of a ``gr.Video`` payload: FileData, or ``{"video": FileData, ...}`` as
    older Gradio versions send it."""
    if isinstance(payload, dict) and isinstance(payload.get("video"), dict):
        return payload["video"]
    return payload


def _eta(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def video_tab(ctx: AppContext) -> None:
    """Tab "Video stylize": a clip in, an MP4 out with the clip's sound, frame rate and duration."""

    def show_card(model):
        if not model or model not in ctx.models.embedded():
            return "*No model selected.*"
        return ctx.models.card(model)

    def run(video, model, hub_repo, revision, resolution, stability, start, end, side_by_side, progress=gr.Progress()):
        # preprocess=False, as in the photo tab: Gradio's own video preprocessing would call a
        # system ffmpeg; the upload is probed by the library instead
        try:
            path, name = _uploaded_path(_video_payload(video), "a video")
            if resolution not in RESOLUTIONS:
                raise UserError(f"resolution must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
            stability = _number(stability, "stability", lo=0.0, hi=1.0)
            start = 0.0 if start in (None, "") else _number(start, "start", lo=0.0, hi=1e7)
            # empty, None, or 0 (the number box this replaced sent 0) mean "to the end"
            end = None if end is None or not str(end).strip() else (_number(str(end).strip(), "end", lo=0.0, hi=1e7) or None)
            if side_by_side not in (None, True, False):
                raise UserError(f"side by side must be true or false, got {side_by_side!r}")
            side_by_side = bool(side_by_side)
            spec = ctx.models.spec(model, hub_repo, revision)
        except (ValueError, hub.HubError) as exc:
            raise user_error(exc) from None
        names = {path: name, Path(path).name: name}
        try:
            info = probe(path)
            check_limits(info, ctx.video_limits, start=start, end=end)
        except (VideoError, ValueError, FileNotFoundError) as exc:
            raise user_error(exc, replace=names) from None
        try:
            network, notice = hub.load_with_fallback(
                spec, weights_dir=ctx.models.weights_dir, default=ctx.models.default_model, map_location="cpu"
            )
        except (ValueError, hub.HubError) as exc:
            raise user_error(exc) from None
        if notice:
            gr.Warning(html.escape(notice, quote=False))

        began = time.perf_counter()
        out = ctx.outputs.path_for(f"{_safe_stem(name, 'video')}_ghibli.mp4")

        def report(done: int, total: int) -> None:
            # a long job keeps its folder fresh: OutputFolder removes folders idle for keep_s
            os.utime(out.parent)
            left = (time.perf_counter() - began) / done * (total - done) if done else 0.0
            progress((done, total), desc=f"{done}/{total} frames, about {_eta(left)} left", unit="frames")

        progress((0, 1), desc="starting", unit="frames")
        try:
            result = stylize_video(
                info, out, network,
                height=RESOLUTIONS[resolution], stability=stability, start=start, end=end,
                side_by_side=side_by_side, device=ctx.models.device, precision=ctx.models.precision,
                limits=ctx.video_limits, progress=report,
            )
        except BaseException as exc:
            # a failed or cancelled job leaves nothing behind: the folder holds only this job's output
            shutil.rmtree(out.parent, ignore_errors=True)
            if isinstance(exc, VideoError):  # e.g. the video data turns out to be corrupt while decoding
                raise user_error(exc, replace=names) from None
            raise
        w, h = result.size
        details = (
            f"{result.frames} frames, {w}x{h}, {float(result.fps):.3g} fps, {result.duration:.2f} s, "
            f"{'original audio' if result.has_audio else 'no audio track'}; "
            f"took {_eta(result.timings.get('total', 0.0))}"
        )
        return str(out), str(out), f"⚠️ {html.escape(notice, quote=False)}" if notice else "", details

    with gr.Tab("Video stylize", id="video"):
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="Clip", sources=["upload"])
                with gr.Group():
                    model = gr.Dropdown(
                        choices=ctx.models.choices("video"),
                        value=ctx.models.initial_choice("video"),
                        label="Model",
                        info=MODEL_INFO,
                    )
                    with gr.Row():
                        hub_repo = gr.Textbox("", label="Hub repo owner/name", placeholder="owner/name", scale=3)
                        revision = gr.Textbox("", label="Revision (optional)", placeholder="main, a tag or a commit", scale=2)
                resolution = gr.Radio(
                    list(RESOLUTIONS), value="360p", label="Processing resolution",
                    info="the shorter side; lower is much faster (never upscaled)",
                )
                stability = gr.Slider(
                    0.0, 1.0, value=0.5, step=0.05, label="Temporal stability",
                    info="0 = every frame on its own (flicker), 1 = strongest smoothing along the motion",
                )
                with gr.Row():
                    start = gr.Number(0, label="Start (s)", minimum=0)
                    # a text box: Gradio's number box shows 0 for "no value", which read as "end at 0 s"
                    end = gr.Textbox("", label="End (s)", placeholder="to the end", info="seconds; empty = to the end")
                side_by_side = gr.Checkbox(False, label="Side by side (original | stylized)")
                limits = ctx.video_limits
                gr.Markdown(
                    f"Up to {limits.max_seconds:g} s ({limits.max_frames} frames) per run: trim longer clips."
                )
                button = gr.Button("Run", variant="primary")
            with gr.Column():
                result = gr.Video(label="Ghibli style", interactive=False)
                download = gr.DownloadButton("Download MP4")
                notice = gr.Markdown(label="Notice")
                details = gr.Markdown(label="Details")
                with gr.Accordion("Model card", open=False):
                    card = gr.Markdown(ctx.models.card(ctx.models.initial_choice("video")), label="Model card")
        clips = sorted(p for p in ctx.examples_dir.glob("*") if p.suffix.lower() in (".mp4", ".webm", ".mov"))
        if clips:
            gr.Examples(examples=[[str(p)] for p in clips], inputs=[video], cache_examples=False,
                        label="Examples (synthetic)", api_name="video_example")

        model.change(show_card, inputs=[model], outputs=[card], api_name="video_model_card")
        button.click(
            run,
            inputs=[video, model, hub_repo, revision, resolution, stability, start, end, side_by_side],
            outputs=[result, download, notice, details],
            api_name="video_stylize",
            preprocess=False,
            **ctx.heavy,
        )


# -- tabs: latent space (painting projection, neighbour gallery, evolution; latent walk) ----------
NEIGHBOURS_RANGE = (1, 100)
PROJECTION_STEPS_RANGE = (10, 1000)
MAX_WALK_FRAMES = 900  # 30 s at 30 fps per render on a CPU
LATENT_VIEW_PX = 256  # displayed height of the projection and its target, whatever the generator's size
# Gradio shows an image no larger than its own pixels (a 64 px projection was a thin strip): the
# views of the generator's images fill their box instead, with sharp pixels. Passed to launch().
APP_CSS = ".latent-view img { object-fit: contain !important; image-rendering: pixelated; }"
PREVIEW_EVERY_S = 1.0  # the projection preview refreshes at least this often (when steps finish)


def _as_int_list(text: Any, what: str, *, lo: int = 0, hi: int | None = None) -> list[int]:
    """``"1, 2,3"`` -> ``[1, 2, 3]`` with a clear error for anything else."""
    values = []
    for part in str(text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise UserError(f"{what} must be comma-separated whole numbers like 1, 2, 3; got {part!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise UserError(f"{what} must be between {lo} and {hi}, got {value}" if hi is not None else f"{what} must be at least {lo}, got {value}")
        values.append(value)
    return values


def _editor_file(payload: Any) -> Any:
    """The composite image of a sketchpad payload (``{"composite": FileData, ...}``), else the payload."""
    if isinstance(payload, dict) and "composite" in payload:
        return payload.get("composite")
    return payload


class LatentSession:
    """One user's latent-space work: the model, the projection, the evolution, the walk keyframes.

    Held in a ``gr.State`` (one per browser session; API clients get their own too).
    """

    def __init__(self) -> None:
        self.model_key: str | None = None
        self.shape: tuple[int, int] | None = None  # (num_ws, w_dim) of the model's latents
        self.projected = None  # (1, num_ws, w_dim)
        self.noise: dict = {}
        self.evolution: Evolution | None = None
        self.keyframes: list = []  # (1, num_ws, w_dim) each

    def use_model(self, key: str, G) -> None:
        """Switching to a model with other latents drops what does not fit it."""
        shape = (G.num_ws, G.w_dim)
        if self.shape is not None and shape != self.shape:
            self.projected, self.noise, self.evolution, self.keyframes = None, {}, None, []
        elif key != self.model_key:
            self.noise = {}
        self.model_key, self.shape = key, shape


def latent_tabs(ctx: AppContext) -> None:
    """Tabs "Painting projection" (projection, neighbour gallery, evolution) and "Latent walk"."""
    stats: dict[int, float] = {}  # id(G) -> spread of w, computed once per model

    def spread(G) -> float:
        if id(G) not in stats:
            stats[id(G)] = latent_stats(G, samples=2000, generator=torch.Generator().manual_seed(0))[1]
        return stats[id(G)]

    def load_gan(model, hub_repo, revision, session: LatentSession | None):
        try:
            spec = ctx.models.spec(model, hub_repo, revision, kind="gan")
            G, notice, card = ctx.models.gan(spec)
        except (ValueError, hub.HubError) as exc:
            raise user_error(exc) from None
        if notice:
            gr.Warning(html.escape(notice, quote=False))
        session = session if isinstance(session, LatentSession) else LatentSession()
        session.use_model(str(spec), G)
        return G, session, notice

    def save_images(images, prefix: str) -> list[str]:
        folder = ctx.outputs.path_for("x").parent
        paths = []
        for i, img in enumerate(images):
            path = folder / f"{prefix}_{i:03d}.png"
            Image.fromarray(to_uint8(img[None])[0]).save(path, format="PNG")
            paths.append(str(path))
        return paths

    def gallery_of(G, ws, prefix: str, progress=None, noise=None) -> list[tuple[str, str]]:
        images = []
        for start in range(0, ws.shape[0], 8):
            images.append(render(G, ws[start : start + 8], noise=noise))
            if progress is not None:
                progress((min(start + 8, ws.shape[0]), ws.shape[0]), desc="rendering", unit="images")
        paths = save_images(torch.cat(images), prefix)
        return [(p, str(i)) for i, p in enumerate(paths)]

    # ---- projection ----
    def project_run(painting, sketch, model, hub_repo, revision, steps, space, session):
        try:
            payload = painting if painting is not None else _editor_file(sketch)
            path, name = _uploaded_path(payload, "a painting (or draw one)")
            steps = int(_number(steps, "steps", lo=PROJECTION_STEPS_RANGE[0], hi=PROJECTION_STEPS_RANGE[1]))
            if space not in ("w", "w+"):
                raise UserError(f"space must be 'w' or 'w+', got {space!r}")
        except ValueError as exc:
            raise user_error(exc) from None
        try:
            image = load_image(path, max_pixels=ctx.max_pixels, min_side=MIN_SIDE)
        except ImageLoadError as exc:
            raise user_error(exc, replace={path: name}) from None
        G, session, notice = load_gan(model, hub_repo, revision, session)
        # what the projection fits: the centre square at the generator's resolution, shown beside it
        target_image = center_crop_resize(image, G.resolution)
        target_path = str(ctx.outputs.path_for(f"{_safe_stem(name, 'painting')}_target.png"))
        target_image.save(target_path, format="PNG")
        target = to_tensor(target_image).to(ctx.models.device)
        perceptual = ctx.perceptual()

        latest: dict[str, Any] = {}
        stop = threading.Event()
        outcome: dict[str, Any] = {}

        def callback(step, img, loss):
            latest["step"], latest["img"], latest["loss"] = step, img, loss
            return stop.is_set()

        def work():
            try:
                outcome["result"] = project(G, target, steps=steps, space=space, perceptual=perceptual,
                                            generator=torch.Generator().manual_seed(0), callback=callback)
            except Exception as exc:  # reported below, in the event's thread
                outcome["error"] = exc

        thread = threading.Thread(target=work, name="projection", daemon=True)
        thread.start()
        note = "" if perceptual is not None else " (pixel distance only: set GHIBLI_VGG for a perceptual one)"
        shown = -1
        yield gr.skip(), f"projecting: {steps} steps{note}", gr.skip(), session, target_path
        try:
            while thread.is_alive():
                thread.join(PREVIEW_EVERY_S)
                step = latest.get("step", 0)
                if step != shown and "img" in latest:
                    shown = step
                    preview = save_images(latest["img"][:1].cpu(), "preview")[0]
                    status = f"step {step}/{steps}, loss {latest['loss']:.4f}{note}"
                    yield preview, status, gr.skip(), session, gr.skip()
        finally:
            stop.set()  # the client went away (or an error): end the optimisation too
            thread.join()
        if "error" in outcome:
            raise user_error(outcome["error"])
        result = outcome["result"]
        session.projected, session.noise = result.ws, result.noise
        projected = save_images(result.image, "projected")[0]
        latent_path = ctx.outputs.path_for(f"{_safe_stem(name, 'painting')}_latent.safetensors")
        save_latent(latent_path, result.ws, noise=result.noise, model=session.model_key or "", space=space)
        status = f"projected in {len(result.losses)} steps, loss {result.losses[-1]:.4f}{note}"
        if notice:
            status = f"⚠️ {html.escape(notice, quote=False)}\n\n{status}"
        yield projected, status, str(latent_path), session, target_path

    # ---- neighbours and evolution ----
    def neighbours_run(model, hub_repo, revision, sigma, count, seed, session, progress=gr.Progress()):
        try:
            sigma = _number(sigma, "sigma", lo=0.0, hi=5.0)
            count = int(_number(count, "count", lo=NEIGHBOURS_RANGE[0], hi=NEIGHBOURS_RANGE[1]))
            seed = int(_number(seed, "seed", lo=0, hi=2**31 - 1))
        except ValueError as exc:
            raise user_error(exc) from None
        G, session, _ = load_gan(model, hub_repo, revision, session)
        if session.projected is None:
            raise user_error(UserError("project a painting first, or start from random images"))
        g = torch.Generator().manual_seed(seed)
        ws = neighbours(session.projected, n=count, sigma=sigma, scale=spread(G), generator=g)
        session.evolution = Evolution(ws, population=count, sigma=sigma, scale=spread(G), generator=g)
        gallery = gallery_of(G, ws, "neighbour", progress)
        return gallery, "", f"{count} neighbours at sigma {sigma:g} (image 0 is the projection when sigma is 0)", session

    def random_run(model, hub_repo, revision, count, seed, session, progress=gr.Progress()):
        try:
            count = int(_number(count, "count", lo=NEIGHBOURS_RANGE[0], hi=NEIGHBOURS_RANGE[1]))
            seed = int(_number(seed, "seed", lo=0, hi=2**31 - 1))
        except ValueError as exc:
            raise user_error(exc) from None
        G, session, _ = load_gan(model, hub_repo, revision, session)
        ws = seed_ws(G, list(range(seed, seed + count))).cpu()
        session.evolution = Evolution(ws, population=count, scale=spread(G), generator=torch.Generator().manual_seed(seed))
        return gallery_of(G, ws, "random", progress), "", f"{count} random images, seeds {seed}..{seed + count - 1}", session

    def toggle_favourite(favourites, evt: gr.SelectData):
        picks = _as_int_list(favourites, "favourites")
        index = int(evt.index if not isinstance(evt.index, (list, tuple)) else evt.index[0])
        picks = [p for p in picks if p != index] if index in picks else picks + [index]
        return ", ".join(str(p) for p in sorted(picks))

    def evolve_run(model, hub_repo, revision, favourites, sigma, mode, session, progress=gr.Progress()):
        try:
            picks = _as_int_list(favourites, "favourites")
            sigma = _number(sigma, "sigma", lo=0.0, hi=5.0)
            if mode not in ("mean", "crossover"):
                raise UserError(f"mode must be 'mean' or 'crossover', got {mode!r}")
        except ValueError as exc:
            raise user_error(exc) from None
        G, session, _ = load_gan(model, hub_repo, revision, session)
        if session.evolution is None:
            raise user_error(UserError("show neighbours or random images first"))
        if not picks:
            raise user_error(UserError("click one or more images to choose favourites first"))
        try:
            ws = session.evolution.evolve(picks, sigma=sigma, mode=mode)
        except ValueError as exc:
            raise user_error(exc) from None
        gen = session.evolution.generation
        return gallery_of(G, ws, f"gen{gen}", progress), "", f"generation {gen} from favourites {picks} ({mode})", session

    def back_run(model, hub_repo, revision, session, progress=gr.Progress()):
        G, session, _ = load_gan(model, hub_repo, revision, session)
        if session.evolution is None:
            raise user_error(UserError("nothing to go back to yet"))
        ws = session.evolution.back()
        gen = session.evolution.generation
        return gallery_of(G, ws, f"gen{gen}", progress), "", f"back to generation {gen}", session

    # ---- keyframes for the walk ----
    def keyframe_gallery(G, session) -> list[tuple[str, str]]:
        if not session.keyframes:
            return []
        return gallery_of(G, torch.cat(session.keyframes), "key")

    def send_to_walk(model, hub_repo, revision, favourites, session):
        try:
            picks = _as_int_list(favourites, "favourites")
        except ValueError as exc:
            raise user_error(exc) from None
        G, session, _ = load_gan(model, hub_repo, revision, session)
        if picks:
            if session.evolution is None:
                raise user_error(UserError("show a gallery first"))
            current = session.evolution.current
            bad = [p for p in picks if not 0 <= p < current.shape[0]]
            if bad:
                raise user_error(UserError(f"favourites {bad} are not in the gallery of {current.shape[0]}"))
            session.keyframes += [current[p : p + 1].clone() for p in picks]
            what = f"images {picks}"
        elif session.projected is not None:
            session.keyframes.append(session.projected.clone())
            what = "the projection"
        else:
            raise user_error(UserError("choose favourites in the gallery, or project a painting first"))
        return keyframe_gallery(G, session), f"added {what}: {len(session.keyframes)} keyframes", session

    def add_seeds(model, hub_repo, revision, seeds, session):
        try:
            values = _as_int_list(seeds, "seeds", lo=0, hi=2**31 - 1)
            if not values:
                raise UserError("type seeds like 1, 2, 3")
            if len(values) > 32:
                raise UserError(f"at most 32 seeds at a time, got {len(values)}")
        except ValueError as exc:
            raise user_error(exc) from None
        G, session, _ = load_gan(model, hub_repo, revision, session)
        session.keyframes += [w[None] for w in seed_ws(G, values).cpu()]
        return keyframe_gallery(G, session), f"added seeds {values}: {len(session.keyframes)} keyframes", session

    def add_latent_file(model, hub_repo, revision, upload, session):
        try:
            path, name = _uploaded_path(upload, "a latent file (.safetensors)")
        except ValueError as exc:
            raise user_error(exc) from None
        G, session, _ = load_gan(model, hub_repo, revision, session)
        try:
            ws, _, _ = load_latent(path)
        except (ValueError, FileNotFoundError) as exc:
            raise user_error(exc, replace={path: name}) from None
        if ws.shape[1:] != (G.num_ws, G.w_dim):
            raise user_error(UserError(f"{name} holds latents of shape {tuple(ws.shape[1:])}; this model needs ({G.num_ws}, {G.w_dim})"))
        session.keyframes.append(ws[:1].float())
        return keyframe_gallery(G, session), f"added {name}: {len(session.keyframes)} keyframes", session

    def clear_keyframes(session):
        if isinstance(session, LatentSession):
            session.keyframes = []
        return [], "no keyframes", session

    def walk_run(model, hub_repo, revision, mode, frames, fps, easing, loop, stops, between, sigma, fmt, session,
                 progress=gr.Progress()):
        try:
            if mode not in ("walk", "noise loop"):
                raise UserError(f"mode must be 'walk' or 'noise loop', got {mode!r}")
            if fmt not in ("mp4", "gif"):
                raise UserError(f"format must be mp4 or gif, got {fmt!r}")
            if easing not in EASINGS:
                raise UserError(f"easing must be one of {', '.join(EASINGS)}, got {easing!r}")
            frames = int(_number(frames, "frames per transition", lo=1, hi=MAX_WALK_FRAMES))
            fps = _number(fps, "fps", lo=1, hi=60)
            stops = int(_number(stops, "stops", lo=2, hi=50))
            between = int(_number(between, "frames between stops", lo=1, hi=MAX_WALK_FRAMES))
            sigma = _number(sigma, "sigma", lo=0.0, hi=5.0)
        except ValueError as exc:
            raise user_error(exc) from None
        G, session, _ = load_gan(model, hub_repo, revision, session)
        keys = session.keyframes
        if mode == "walk":
            if len(keys) < 2:
                raise user_error(UserError(f"a walk needs at least 2 keyframes, there are {len(keys)}"))
            total = walk_length(len(keys), frames_per_transition=frames, loop=bool(loop))
            latents = walk(torch.cat(keys), frames_per_transition=frames, easing=easing, loop=bool(loop))
        else:
            if not keys:
                raise user_error(UserError("a noise loop goes around a keyframe: add one first (the last one is used)"))
            total = stops * between
            latents = noise_loop(keys[-1], stops=stops, frames_between=between, sigma=sigma, scale=spread(G),
                                 easing=easing, generator=torch.Generator().manual_seed(0))
        if total > MAX_WALK_FRAMES:
            raise user_error(UserError(f"that is {total} frames; at most {MAX_WALK_FRAMES} per render: use fewer frames or keyframes"))
        out = ctx.outputs.path_for(f"walk.{fmt}")
        done = [0]

        def frames_iter():
            batch = []
            for latent in latents:
                batch.append(latent)
                if len(batch) == 8:
                    yield from flush(batch)
                    batch = []
            if batch:
                yield from flush(batch)

        def flush(batch):
            for img in render(G, torch.cat(batch)):
                done[0] += 1
                progress((done[0], total), desc=f"{done[0]}/{total} frames", unit="frames")
                yield np.ascontiguousarray(to_uint8(img[None])[0])

        R = G.resolution
        save_animation(frames_iter(), out, fps=fps, size=(R, R))
        status = f"{total} frames at {fps:g} fps ({total / fps:.1f} s)"
        if fmt == "gif":
            return None, str(out), str(out), status
        return str(out), None, str(out), status

    initial = ctx.models.initial_choice("gan")
    no_model = "" if initial else (
        "*No StyleGAN2 model is embedded in this installation: type a Hub repo (owner/name) of one.*"
    )
    session = gr.State(None)

    def model_controls():
        with gr.Group():
            model = gr.Dropdown(choices=ctx.models.choices("gan"), value=initial, label="Generator",
                                info=MODEL_INFO.replace("an embedded model", "an embedded StyleGAN2 model"))
            with gr.Row():
                hub_repo = gr.Textbox("", label="Hub repo owner/name", placeholder="owner/name", scale=3)
                revision = gr.Textbox("", label="Revision (optional)", placeholder="main, a tag or a commit", scale=2)
        return model, hub_repo, revision

    with gr.Tab("Painting projection", id="projection"):
        if no_model:
            gr.Markdown(no_model)
        with gr.Row():
            with gr.Column():
                with gr.Tab("Upload"):
                    painting = gr.Image(label="Painting", type="filepath", sources=["upload", "clipboard"])
                with gr.Tab("Draw"):
                    sketch = gr.Sketchpad(label="Sketch", type="filepath")
                model, hub_repo, revision = model_controls()
                with gr.Accordion("Model card", open=False):
                    gan_card = gr.Markdown(ctx.models.card(initial), label="Model card")
                steps = gr.Slider(*PROJECTION_STEPS_RANGE, value=300, step=10, label="Steps")
                space = gr.Radio(["w", "w+"], value="w", label="Latent space",
                                 info="w: one latent for all layers (more typical images); w+: one per layer (closer fits)")
                project_button = gr.Button("Project", variant="primary")
            with gr.Column():
                # the generator's images are small (64 px for the default): shown large, pixels kept sharp
                with gr.Row():
                    target_view = gr.Image(label="Target", type="filepath", format="png", interactive=False,
                                           height=LATENT_VIEW_PX, elem_classes=["latent-view"])
                    preview = gr.Image(label="Projection", type="filepath", format="png", interactive=False,
                                       height=LATENT_VIEW_PX, elem_classes=["latent-view"])
                project_status = gr.Markdown()
                latent_file = gr.DownloadButton("Download latent (.safetensors)")
        gr.Markdown("### Neighbours and evolution\nClick images to choose favourites, then evolve the next generation.")
        with gr.Row():
            sigma = gr.Slider(0.0, 2.0, value=0.5, step=0.05, label="Sigma", info="distance from the latent, in typical w spreads")
            count = gr.Slider(*NEIGHBOURS_RANGE, value=36, step=1, label="Images")
            seed = gr.Number(0, label="Seed", precision=0, minimum=0)
            mode = gr.Radio(["mean", "crossover"], value="mean", label="Evolve by",
                            info="mean of the favourites, or each layer's style from one of them")
        with gr.Row():
            neighbours_button = gr.Button("Show neighbours", variant="primary")
            random_button = gr.Button("Random images")
            evolve_button = gr.Button("Evolve")
            back_button = gr.Button("Back")
            send_button = gr.Button("Send to walk")
        favourites = gr.Textbox("", label="Favourites (image numbers)", placeholder="click images, or type 0, 5, 12")
        gallery_status = gr.Markdown()
        gallery = gr.Gallery(label="Gallery", columns=6, height="auto", object_fit="contain", interactive=False)
        if initial:
            gr.Examples(
                examples=[[str(p)] for p in sorted(ctx.examples_dir.glob("*")) if p.suffix.lower() in (".jpg", ".jpeg", ".png")],
                inputs=[painting], cache_examples=False, label="Examples", api_name="projection_example",
            )

    with gr.Tab("Latent walk", id="walk"):
        if no_model:
            gr.Markdown(no_model)
        with gr.Row():
            with gr.Column():
                gr.Markdown("Keyframes come from the gallery (**Send to walk**), from seeds, or from latent files.")
                with gr.Row():
                    seeds = gr.Textbox("1, 2, 3", label="Seeds", scale=3)
                    add_seeds_button = gr.Button("Add seeds", scale=1)
                latent_upload = gr.File(label="Add a latent file (.safetensors)", file_types=[".safetensors"])
                keyframes = gr.Gallery(label="Keyframes", columns=6, height="auto", interactive=False)
                key_status = gr.Markdown()
                clear_button = gr.Button("Clear keyframes")
            with gr.Column():
                walk_mode = gr.Radio(["walk", "noise loop"], value="walk", label="Mode",
                                     info="walk: through the keyframes; noise loop: around the last keyframe")
                # only the chosen mode's controls show (walk_mode.change below)
                with gr.Group(visible=True) as walk_controls:
                    frames = gr.Slider(2, 300, value=150, step=1, label="Frames per transition")
                    loop = gr.Checkbox(False, label="Loop back to the first keyframe")
                with gr.Group(visible=False) as noise_controls:
                    with gr.Row():
                        stops = gr.Slider(2, 20, value=7, step=1, label="Noise-loop stops")
                        between = gr.Slider(2, 120, value=30, step=1, label="Frames between stops")
                        loop_sigma = gr.Slider(0.0, 2.0, value=0.5, step=0.05, label="Noise-loop sigma")
                with gr.Row():
                    fps = gr.Slider(1, 60, value=30, step=1, label="FPS")
                    easing = gr.Radio(list(EASINGS), value="linear", label="Easing")
                fmt = gr.Radio(["mp4", "gif"], value="mp4", label="Format")
                walk_button = gr.Button("Render", variant="primary")
                # one result panel, the chosen format's (fmt.change below)
                walk_video = gr.Video(label="Walk", interactive=False, visible=True)
                walk_gif = gr.Image(label="Walk (GIF)", type="filepath", interactive=False, visible=False,
                                    height=LATENT_VIEW_PX, elem_classes=["latent-view"])
                walk_download = gr.DownloadButton("Download")
                walk_status = gr.Markdown()

    def show_gan_card(name):
        if not name or name not in ctx.models.embedded("gan"):
            return "*No model selected.*"
        return ctx.models.card(name)

    controls = [model, hub_repo, revision]
    model.change(show_gan_card, inputs=[model], outputs=[gan_card], api_name="gan_model_card")
    project_button.click(
        project_run, inputs=[painting, sketch, *controls, steps, space, session],
        outputs=[preview, project_status, latent_file, session, target_view], api_name="project", preprocess=False,
        **ctx.heavy,
    )
    gallery_outputs = [gallery, favourites, gallery_status, session]
    neighbours_button.click(neighbours_run, inputs=[*controls, sigma, count, seed, session], outputs=gallery_outputs,
                            api_name="neighbours", **ctx.heavy)
    random_button.click(random_run, inputs=[*controls, count, seed, session], outputs=gallery_outputs,
                        api_name="random_images", **ctx.heavy)
    gallery.select(toggle_favourite, inputs=[favourites], outputs=[favourites], api_name="toggle_favourite")
    evolve_button.click(evolve_run, inputs=[*controls, favourites, sigma, mode, session], outputs=gallery_outputs,
                        api_name="evolve", **ctx.heavy)
    back_button.click(back_run, inputs=[*controls, session], outputs=gallery_outputs, api_name="evolve_back", **ctx.heavy)
    send_button.click(send_to_walk, inputs=[*controls, favourites, session], outputs=[keyframes, key_status, session],
                      api_name="send_to_walk", **ctx.heavy)
    add_seeds_button.click(add_seeds, inputs=[*controls, seeds, session], outputs=[keyframes, key_status, session],
                           api_name="add_seeds", **ctx.heavy)
    latent_upload.upload(add_latent_file, inputs=[*controls, latent_upload, session], outputs=[keyframes, key_status, session],
                         api_name="add_latent_file", preprocess=False, **ctx.heavy)
    clear_button.click(clear_keyframes, inputs=[session], outputs=[keyframes, key_status, session], api_name="clear_keyframes")
    # layout only: private events (not offered to API clients), answered outside the queue
    walk_mode.change(
        lambda mode: (gr.update(visible=mode != "noise loop"), gr.update(visible=mode == "noise loop")),
        inputs=[walk_mode], outputs=[walk_controls, noise_controls], api_name="walk_mode", api_visibility="private",
        queue=False,
    )
    fmt.change(
        lambda f: (gr.update(visible=f != "gif"), gr.update(visible=f == "gif")),
        inputs=[fmt], outputs=[walk_video, walk_gif], api_name="walk_format", api_visibility="private", queue=False,
    )
    walk_button.click(
        walk_run,
        inputs=[*controls, walk_mode, frames, fps, easing, loop, stops, between, loop_sigma, fmt, session],
        outputs=[walk_video, walk_gif, walk_download, walk_status], api_name="walk", **ctx.heavy,
    )


TABS: list[Callable[[AppContext], None]] = [photo_tab, video_tab, latent_tabs]


# -- assembly -----------------------------------------------------------------------------------
def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_app(
    *,
    weights_dir: str | Path | None = None,
    default_model: str | None = None,
    device: str | None = None,
    precision: str = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    heavy_concurrency: int = 1,
    queue_size: int = 16,
    examples_dir: str | Path = EXAMPLES_DIR,
    video_limits: VideoLimits | None = None,
    default_gan: str | None = None,
    default_video_model: str | None = None,
    vgg: str | None = None,
    cache_s: int = CACHE_S,
    diffusion: bool | None = None,
) -> gr.Blocks:
    """Build the app (no model is loaded until a request needs it).

    Args:
        weights_dir: embedded checkpoints; default ``$GHIBLI_WEIGHTS_DIR`` or ``weights/``.
        default_model: the embedded model selected at start and used as the fallback;
            default ``$GHIBLI_DEFAULT_MODEL`` or ``photo2ghibli``.
        device: torch device for the networks; default CUDA when available, else CPU.
        precision: compute precision of the engines (``auto``, ``fp32``, ``bf16``, ``fp16``).
        max_pixels: uploads that decode to more pixels are refused with a message.
        heavy_concurrency: how many network jobs run at once, over all tabs and users.
        queue_size: requests waiting beyond this are turned away ("queue full").
        examples_dir: images offered as examples.
        video_limits: caps of the video tab (default :data:`VIDEO_LIMITS`, for a free CPU Space).
        default_gan: the embedded StyleGAN2 model of the latent-space tabs; default
            ``$GHIBLI_DEFAULT_GAN`` or ``ghibli-stylegan2``.
        default_video_model: the embedded model the video tab selects at start; default
            ``$GHIBLI_DEFAULT_VIDEO_MODEL`` or ``ghibli-video-fast`` (``default_model`` where
            that is not installed).
        vgg: VGG weights (a file or Hub repo) for the projection's perceptual distance; default
            ``$GHIBLI_VGG``; without one the projection fits pixels only.
        cache_s: every ``cache_s`` seconds Gradio deletes the uploads and results it holds that
            are older than ``cache_s`` (so a file lives between one and two periods).
        diffusion: offer a Stable Diffusion model in the photo tab (see ``ghibli_core.app_diffusion``);
            default ``$GHIBLI_DIFFUSION``, else only where CUDA is available. Nothing is loaded
            until it is used.
    """
    if heavy_concurrency < 1:
        raise ValueError(f"heavy_concurrency must be at least 1, got {heavy_concurrency}")
    if queue_size < 1:
        raise ValueError(f"queue_size must be at least 1, got {queue_size}")
    if cache_s < 1:
        raise ValueError(f"cache_s must be at least 1 second, got {cache_s}")
    models = Models(
        weights_dir=weights_dir or os.environ.get("GHIBLI_WEIGHTS_DIR") or hub.WEIGHTS_DIR,
        default_model=default_model or os.environ.get("GHIBLI_DEFAULT_MODEL") or hub.DEFAULT_MODEL,
        default_gan=default_gan or os.environ.get("GHIBLI_DEFAULT_GAN") or hub.DEFAULT_GAN,
        default_video=default_video_model or os.environ.get("GHIBLI_DEFAULT_VIDEO_MODEL") or hub.DEFAULT_VIDEO_MODEL,
        device=device or default_device(),
        precision=precision,
    )
    ctx = AppContext(
        models=models,
        outputs=OutputFolder(),
        max_pixels=max_pixels,
        examples_dir=Path(examples_dir),
        heavy_concurrency=heavy_concurrency,
        video_limits=video_limits or VIDEO_LIMITS,
        vgg=vgg or os.environ.get("GHIBLI_VGG") or None,
        diffusion=app_diffusion.DiffusionService(device=models.device, precision=precision)
        if app_diffusion.wanted(diffusion) else None,
    )
    # analytics off: the app promises to run with no network, and never calls home
    with gr.Blocks(title="Ghibli Studio", analytics_enabled=False, delete_cache=(cache_s, cache_s)) as demo:
        gr.Markdown(
            "# Ghibli Studio\nTurn photos and video clips into Studio-Ghibli-style images and films, "
            "and explore a generator's latent space."
        )
        notice = models.quality_notice()
        if notice:
            gr.Markdown(notice, elem_id="quality-notice")
        for tab in TABS:
            tab(ctx)
    demo.queue(max_size=queue_size, default_concurrency_limit=4)
    demo.ghibli_context = ctx  # for tests and embedding code that want the app's models
    return demo


def resolve_binding(host: str | None, port: int | None, env: dict[str, str] | None = None) -> tuple[str, int]:
    """Host and port from the flags, else Gradio's environment variables, else the defaults
    (127.0.0.1:7860; 0.0.0.0 on a Hugging Face Space, where ``SYSTEM=spaces``)."""
    env = os.environ if env is None else env
    if not host:
        host = env.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if env.get("SYSTEM") == "spaces" else DEFAULT_HOST)
    if port is None:
        raw = env.get("GRADIO_SERVER_PORT")
        try:
            port = int(raw) if raw else DEFAULT_PORT
        except ValueError:
            raise ValueError(f"GRADIO_SERVER_PORT must be a port number, got {raw!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    return host, port


def launch(
    demo: gr.Blocks,
    *,
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
    max_file_size: str | int = MAX_FILE_SIZE,
):
    """Serve ``demo`` (see :func:`resolve_binding` for where); returns Gradio's ``launch`` result.

    ``max_file_size`` (bytes, or a string like ``"50mb"``) caps each upload; Gradio refuses a
    larger one before any of our code runs.
    """
    host, port = resolve_binding(host, port)
    ctx: AppContext | None = getattr(demo, "ghibli_context", None)
    # Gradio serves its own cache (uploads and results, in content-hashed folders) and the paths
    # allowed here: the examples only. Blocked paths win over everything, even if a later change
    # allows a parent folder: the code, the checkpoints and the Hugging Face cache (it can hold a token).
    allowed = [str(ctx.examples_dir)] if ctx is not None else []
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=max_file_size,
        allowed_paths=allowed,
        blocked_paths=blocked_paths(ctx),
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        css=APP_CSS,
    )


def blocked_paths(ctx: AppContext | None) -> list[str]:
    """Absolute paths Gradio must never serve (see :func:`launch`)."""
    from huggingface_hub import constants

    paths = [ROOT / "app.py", ROOT / "ghibli_core", ROOT / "weights", ROOT / ".git",
             Path(constants.HF_HOME), Path(constants.HF_HUB_CACHE)]
    if ctx is not None:
        paths.append(ctx.models.weights_dir)
    unique = dict.fromkeys(str(Path(p).resolve()) for p in paths)
    return list(unique)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for this process; True when the cap is in place.

    glibc gives each thread that allocates its own arena and seldom hands their free memory back,
    so a server whose jobs run on a pool of worker threads climbs by about 150 MB over the first
    64 photo jobs and stays there (measured with tests/test_load.py's burst); with 2 arenas it
    stays within a few tens of MB. A no-op off glibc.
    """
    return mallopt(-8, arenas)  # -8 is M_ARENA_MAX


def argument_parser() -> argparse.ArgumentParser:
    """The flags of ``python app.py`` (the README's "Launch options and limits" lists each)."""
    parser = argparse.ArgumentParser(description="Ghibli Studio: the Gradio app.")
    parser.add_argument("--host", default=None, help=f"address to bind (default $GRADIO_SERVER_NAME, or {DEFAULT_HOST}; 0.0.0.0 on a Space)")
    parser.add_argument("--port", type=int, default=None, help=f"port (default $GRADIO_SERVER_PORT, or {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs network)")
    parser.add_argument("--weights-dir", default=None, help="folder of embedded checkpoints (default $GHIBLI_WEIGHTS_DIR or weights/)")
    parser.add_argument("--model", default=None, help="embedded model selected at start and used as the fallback (default photo2ghibli)")
    parser.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="compute precision (default auto)")
    parser.add_argument("--concurrency", type=int, default=1, help="network jobs run at once (default 1)")
    parser.add_argument("--queue-size", type=int, default=16, help="requests allowed to wait (default 16)")
    parser.add_argument("--video-model", default=None, help="embedded model the video tab selects at start (default ghibli-video-fast, else --model)")
    parser.add_argument("--gan", default=None, help="embedded StyleGAN2 model of the latent-space tabs (default ghibli-stylegan2)")
    parser.add_argument("--vgg", default=None, help="VGG weights for the projection's perceptual distance (default $GHIBLI_VGG)")
    parser.add_argument("--diffusion", action=argparse.BooleanOptionalAction, default=None,
                        help="offer a Stable Diffusion model in the photo tab (default $GHIBLI_DIFFUSION, else only with CUDA)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    limit_malloc_arenas()
    reuse_freed_memory()  # the video tab: no page faults per frame (see its docstring)
    demo = build_app(
        weights_dir=args.weights_dir,
        default_model=args.model,
        device=args.device,
        precision=args.precision,
        heavy_concurrency=args.concurrency,
        queue_size=args.queue_size,
        default_gan=args.gan,
        default_video_model=args.video_model,
        vgg=args.vgg,
        diffusion=args.diffusion,
    )
    launch(demo, host=args.host, port=args.port, share=args.share)


if __name__ == "__main__":
    main()
