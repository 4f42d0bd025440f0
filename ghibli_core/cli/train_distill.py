"""``train distill``: a fast student generator from a teacher model and real Ghibli frames.

Example (CartoonGAN converted with ``convert`` as the teacher, held-out films excluded)::

    python -m ghibli_core train distill --teacher /work/anchors/cartoongan \\
        --photos ../shared/data/photos --frames ../shared/data/ghibli_frames \\
        --frames-exclude 'howls_moving_castle/*' 'kikis_delivery_service/*' 'ponyo/*' \\
        --vgg ../shared/weights/vgg19_normalised_relu3_1.safetensors --out runs/distill \\
        --eval-frames-include 'howls_moving_castle/*' 'kikis_delivery_service/*' 'ponyo/*'
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
from pathlib import Path

from . import resumed_settings


def add_distill_parser(p: argparse.ArgumentParser) -> None:
    from ..models.style_net import PRESETS as STYLE_NET_PRESETS
    from ..training.distill import DISCRIMINATORS, STUDENTS, DistillConfig

    d = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(DistillConfig)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    p.add_argument("--teacher", required=True, metavar="SPEC",
                   help="the teacher: an image model spec (embedded name, folder such as a converted CartoonGAN, "
                        "owner/name[@rev]) or a diffusion model, diffusion:REPO[@REV] (on a GPU; its outputs are "
                        "cached in --teacher-cache, so a CPU run can reuse them later)")
    p.add_argument("--teacher-device", default=None,
                   help="where the teacher runs (default: cuda when available)")
    p.add_argument("--photos", nargs="+", required=True, metavar="DIR", help="training photos (folders)")
    p.add_argument("--frames", nargs="+", required=True, metavar="DIR", help="real Ghibli frames (folders)")
    p.add_argument("--photos-include", nargs="*", default=[], metavar="GLOB")
    p.add_argument("--photos-exclude", nargs="*", default=[], metavar="GLOB")
    p.add_argument("--frames-include", nargs="*", default=[], metavar="GLOB")
    p.add_argument("--frames-exclude", nargs="*", default=[], metavar="GLOB",
                   help="drop frames matching, e.g. the held-out films: 'ponyo/*'")
    p.add_argument("--vgg", required=True, metavar="FILE_OR_REPO",
                   help="loss network reaching relu3_1, e.g. ../shared/weights/vgg19_normalised_relu3_1.safetensors")
    p.add_argument("--out", "-o", required=True, help="run folder")
    p.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="where the teacher's outputs are cached (default OUT/teacher_cache); reuse it across runs")
    p.add_argument("--init", default=None, metavar="SPEC", help="start the student from this generator (same architecture)")
    p.add_argument("--init-blocks", nargs="+", type=int, default=None, metavar="I",
                   help="with a deeper ResNet --init: its residual blocks the student keeps, e.g. 0 3 4 5 for a "
                        "4-block student (a faster network that starts from the trained one)")
    g = p.add_argument_group("networks")
    g.add_argument("--student", choices=STUDENTS, default=d["student"],
                   help="resnet: the photo generator (width, n-blocks, upsample); style-net: the fast video network "
                        "(width, n-blocks, kernel, shuffle; --preset sets them)")
    g.add_argument("--preset", choices=sorted(STYLE_NET_PRESETS), default=None,
                   help="with --student style-net: a named size (fast: the video default's)")
    g.add_argument("--width", type=int, default=None, help=f"default {d['width']} (or the preset's)")
    g.add_argument("--n-blocks", type=int, default=None, help=f"default {d['n_blocks']} (or the preset's)")
    g.add_argument("--upsample", choices=["resize", "transpose"], default=d["upsample"])
    g.add_argument("--discriminator", choices=DISCRIMINATORS, default=d["discriminator"],
                   help="vgg: heads on frozen VGG features (default); patch: 70x70 PatchGAN on pixels")
    g.add_argument("--disc-width", type=int, default=d["disc_width"])
    g = p.add_argument_group("data")
    g.add_argument("--teacher-sizes", nargs="+", type=int, default=d["teacher_sizes"],
                   help="short sides the photos are taught at (default 256 384)")
    g.add_argument("--frames-size", type=int, default=d["frames_size"])
    g.add_argument("--crop-size", type=int, default=d["crop_size"])
    g.add_argument("--border", type=int, default=d["border"])
    g.add_argument("--batch-size", type=int, default=d["batch_size"])
    g = p.add_argument_group("losses")
    for name in ("l1_weight", "vgg_weight", "adv_weight", "edge_weight", "photo_colour_weight"):
        g.add_argument("--" + name.replace("_", "-"), type=float, default=d[name])
    g.add_argument("--teacher-luma-weight", type=float, default=d["teacher_luma_weight"], metavar="W",
                   help="L1 of the 8x-downscaled luma to the teacher's: holds where light and dark lie "
                        "(against dark blobs grown by the adversarial term)")
    g.add_argument("--teacher-recolour", type=float, default=d["teacher_recolour"], metavar="S",
                   help="move the teacher's low-frequency chroma this share (0-1) of the way to the photo's: "
                        "keeps its drawing, drops its colour casts (a red sky, a purple floor)")
    g.add_argument("--vgg-layer", default=d["vgg_layer"])
    g.add_argument("--adv-start", type=int, default=d["adv_start"], help="steps of pure distillation first")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d["steps"])
    g.add_argument("--decay-steps", type=int, default=d["decay_steps"])
    g.add_argument("--lr", type=float, default=None,
                   help=f"student's rate ({d['lr']:g}; with --resume the run's own unless given: a new rate applies "
                        "from the resumed step)")
    g.add_argument("--lr-d", type=float, default=None, help=f"discriminator's rate ({d['lr_d']:g}; likewise)")
    g.add_argument("--ema-decay", type=float, default=d["ema_decay"])
    g.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default=d["mixed_precision"])
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    g = p.add_argument_group("bookkeeping")
    for name in ("log_every", "preview_every", "save_every", "keep_checkpoints", "eval_every"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=d[name])
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--stop-after", type=int, default=None, help="end this invocation after N more steps")
    g = p.add_argument_group("evaluation (KID on held-out frames at checkpoints; the best is exported)")
    g.add_argument("--eval-frames-include", nargs="*", default=[], metavar="GLOB",
                   help="frames of --frames to score against (the held-out films); none: no evaluation")
    g.add_argument("--eval-size", type=int, default=256)
    g.add_argument("--eval-max-images", type=int, default=None)


def _teacher_id(spec: str) -> str:
    """The teacher's spec and the sha256 of its weights: a changed teacher never reuses a cache."""
    from ..hub import resolve
    from ..models.base import WEIGHTS_NAME

    folder = Path(resolve(spec))
    digest = hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()[:16]
    return f"{spec}#{digest}"


def run_distill(args: argparse.Namespace) -> int:
    from ..hub import load
    from ..models.perceptual import load_vgg
    from ..stylize import Stylizer
    from ..training.distill import DistillConfig, train_distill

    from ..models.style_net import PRESETS

    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.preset is not None:
        if args.student != "style-net":
            raise ValueError("--preset names a style-net size: use it with --student style-net")
        values = {**PRESETS[args.preset], **values}
    values.update(resumed_settings(args, "lr", "lr_d"))  # a resumed run keeps its own rates unless told
    cfg = DistillConfig(**values)
    import torch

    from ..diffusion import is_diffusion_spec

    vgg = load_vgg(args.vgg)
    args.teacher_device = args.teacher_device or ("cuda" if torch.cuda.is_available() else "cpu")

    if is_diffusion_spec(args.teacher):
        from ..diffusion import as_teacher, load_diffusion

        teach = as_teacher(load_diffusion(args.teacher, device=args.teacher_device))
        teacher_id = teach.teacher_id
    else:
        teach = Stylizer(load(args.teacher), device=args.teacher_device, precision="fp32").stylize_images
        teacher_id = _teacher_id(args.teacher)
    init = load(args.init) if args.init else None
    evaluator = None
    if args.eval_frames_include:
        from .train import make_translation_evaluator

        evaluator = make_translation_evaluator(
            photos=args.photos[0], frames=args.frames[0], include=args.eval_frames_include,
            size=args.eval_size, max_images=args.eval_max_images,
        )
    folder = train_distill(cfg, vgg, teach, teacher_id=teacher_id, init=init,
                           evaluator=evaluator, resume=args.resume, cpu=args.cpu, stop_after=args.stop_after)
    print(f"generator: {folder}")
    return 0
