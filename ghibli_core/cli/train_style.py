"""``train style``: a fast feed-forward style network (Johnson et al.), from style images or a teacher.

Examples::

    # a Ghibli look from one or more frames
    python -m ghibli_core train style --photos ../shared/data/photos \\
        --style frame.jpg --vgg ../shared/weights/vgg19_normalised_relu3_1.safetensors \\
        --preset slim --out runs/style

    # distil the CycleGAN default into a fast network for video
    python -m ghibli_core train style --photos ../shared/data/photos --teacher photo2ghibli \\
        --vgg ../shared/weights/vgg19_normalised_relu3_1.safetensors --preset slim --out runs/distil
"""
from __future__ import annotations

import argparse
import dataclasses
import os

from . import resumed_settings


def add_style_parser(p: argparse.ArgumentParser) -> None:
    from ..models.style_net import PRESETS
    from ..training.style_net import StyleNetConfig

    d = {f.name: f.default for f in dataclasses.fields(StyleNetConfig) if f.default is not dataclasses.MISSING}
    p.add_argument("--photos", nargs="+", required=True, metavar="DIR", help="content photos (folders)")
    p.add_argument("--style", nargs="*", default=[], metavar="IMAGE", help="style image(s); their mean Gram matrices are the target")
    p.add_argument("--teacher", metavar="SPEC", help="image model to distil (embedded name, folder or owner/name[@rev])")
    p.add_argument("--vgg", required=True, metavar="FILE_OR_REPO",
                   help="loss network: torchvision-layout VGG16/19 weights (.safetensors file or Hub repo); "
                        "e.g. ../shared/weights/vgg19_normalised_relu3_1.safetensors")
    p.add_argument("--out", "-o", required=True, help="run folder: checkpoints, previews, log, exported network")
    p.add_argument("--include", nargs="*", default=[], metavar="GLOB", help="keep only photos matching")
    p.add_argument("--exclude", nargs="*", default=[], metavar="GLOB", help="drop photos matching")
    g = p.add_argument_group("network")
    g.add_argument("--preset", choices=sorted(PRESETS), default="johnson",
                   help="johnson: width 32, 5 blocks (the paper); slim: width 16, 3 blocks (fast on CPU); "
                        "fast: width 12, 3 blocks, 3x3 stem/head at half resolution through pixel (un)shuffle "
                        "(for video on a CPU)")
    g.add_argument("--width", type=int, default=None, help="override the preset's width")
    g.add_argument("--n-blocks", type=int, default=None, help="override the preset's residual blocks")
    g = p.add_argument_group("data")
    g.add_argument("--image-size", type=int, default=d["image_size"], help="training crop size")
    g.add_argument("--load-size", type=int, default=None,
                   help="short side photos are resized to before cropping (default: --image-size); "
                        "larger trains at the scale of bigger inputs, e.g. 480 for 480p video")
    g.add_argument("--style-size", type=int, default=d["style_size"], help="short side of the style images")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="per process")
    g = p.add_argument_group("loss")
    g.add_argument("--content-weight", type=float, default=d["content_weight"])
    g.add_argument("--style-weight", type=float, default=d["style_weight"])
    g.add_argument("--tv-weight", type=float, default=d["tv_weight"])
    g.add_argument("--teacher-weight", type=float, default=d["teacher_weight"], help="L1 to the teacher's output")
    g.add_argument("--content-layer", default=d["content_layer"])
    g.add_argument("--style-layers", nargs="+", default=None, metavar="LAYER",
                   help="default: relu1_2 relu2_2 relu3_1")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d["steps"])
    g.add_argument("--lr", type=float, default=None,
                   help=f"{d['lr']:g}; with --resume the run's own unless given (a new rate applies from the resumed step)")
    g.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default=d["mixed_precision"])
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--preview", nargs="*", default=None, metavar="IMAGE_OR_DIR",
                   help="test images for the preview grids (default: the first photos)")
    g.add_argument("--preview-every", type=int, default=d["preview_every"])
    g.add_argument("--log-every", type=int, default=d["log_every"])
    g.add_argument("--save-every", type=int, default=d["save_every"])
    g.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"])
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--stop-after", type=int, default=None, help="end this invocation after N more steps")


def run_style(args: argparse.Namespace) -> int:
    from ..imaging import list_images, load_image
    from ..models.perceptual import load_vgg
    from ..models.style_net import PRESETS
    from ..training.style_net import StyleNetConfig, train_style_net

    preset = dict(PRESETS[args.preset])
    if args.width is not None:
        preset["width"] = args.width
    if args.n_blocks is not None:
        preset["n_blocks"] = args.n_blocks
    extra = {} if args.style_layers is None else {"style_layers": args.style_layers}
    if args.lr is not None:
        extra["lr"] = args.lr
    extra.update(resumed_settings(args, "lr"))  # a resumed run keeps its own rate unless told
    cfg = StyleNetConfig(
        photos=args.photos, style=args.style, vgg=str(args.vgg), out=args.out, include=args.include,
        exclude=args.exclude, teacher=args.teacher, **preset, image_size=args.image_size, load_size=args.load_size, style_size=args.style_size,
        batch_size=args.batch_size, content_weight=args.content_weight, style_weight=args.style_weight,
        tv_weight=args.tv_weight, teacher_weight=args.teacher_weight, content_layer=args.content_layer,
        steps=args.steps, mixed_precision=args.mixed_precision, seed=args.seed,
        log_every=args.log_every, preview_every=args.preview_every, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, **extra,
    )
    missing = [s for s in args.style if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"style image(s) not found: {', '.join(missing)}")
    vgg = load_vgg(args.vgg)
    teacher = None
    if args.teacher:
        from ..hub import load

        teacher = load(args.teacher)
    previews = None
    if args.preview:
        previews = [load_image(p) for p in list_images(args.preview)]
        if not previews:
            raise ValueError(f"no images found in --preview {args.preview}")
    folder = train_style_net(cfg, vgg, teacher=teacher, preview_images=previews, resume=args.resume,
                             cpu=args.cpu, stop_after=args.stop_after)
    print(f"generator: {folder}")
    return 0
