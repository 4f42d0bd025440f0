"""``train cyclegan``: unpaired photo -> Ghibli training (one CPU, one GPU, or ``accelerate launch``)."""
from __future__ import annotations

import argparse
import dataclasses

from . import command, resumed_settings
from .train_distill import add_distill_parser, run_distill
from .train_style import add_style_parser, run_style
from .train_stylegan import add_stylegan_parser, run_stylegan


def _add_cyclegan(p: argparse.ArgumentParser) -> None:
    from ..training.cyclegan import CycleGANConfig

    d = {f.name: f.default for f in dataclasses.fields(CycleGANConfig) if f.default is not dataclasses.MISSING}
    p.add_argument("--domain-a", nargs="+", required=True, metavar="DIR",
                   help="photos (domain A): folders, or manifests made by `prepare` (DIR/manifest.jsonl)")
    p.add_argument("--domain-b", nargs="+", required=True, metavar="DIR",
                   help="Ghibli frames (domain B): folders, or manifests made by `prepare`")
    p.add_argument("--out", "-o", required=True, help="run folder: checkpoints, samples, log, exported generator")
    for dom in ("a", "b"):
        p.add_argument(f"--include-{dom}", nargs="*", default=[], metavar="GLOB",
                       help=f"keep only domain-{dom.upper()} images whose path relative to its folder matches")
        p.add_argument(f"--exclude-{dom}", nargs="*", default=[], metavar="GLOB",
                       help=f"drop domain-{dom.upper()} images matching (e.g. held-out films: 'ponyo/*')")
        p.add_argument(f"--where-{dom}", nargs="*", default=[], metavar="EXPR",
                       help=f"keep only domain-{dom.upper()} manifest records passing every expression "
                            "('warmth>0.6', 'group=3', 'studio=ghibli', 'source!=ponyo*')")
    g = p.add_argument_group("networks")
    g.add_argument("--generator", choices=["resnet", "unet"], default=d["generator"])
    g.add_argument("--width", type=int, default=d["width"], help="generator filters (ngf)")
    g.add_argument("--n-blocks", type=int, default=d["n_blocks"], help="ResNet blocks (6 or 9)")
    g.add_argument("--n-downs", type=int, default=d["n_downs"], help="U-Net downsamplings (8 for 256 px)")
    g.add_argument("--upsample", choices=["transpose", "resize"], default=d["upsample"])
    g.add_argument("--init-a", metavar="SPEC", default=None,
                   help="start the photo->Ghibli generator from this trained one (embedded name, folder or "
                        "owner/name[@rev]; same architecture), e.g. to continue the shipped default")
    g.add_argument("--disc-width", type=int, default=d["disc_width"])
    g.add_argument("--disc-layers", type=int, default=d["disc_layers"])
    g = p.add_argument_group("data")
    g.add_argument("--load-size", type=int, default=d["load_size"], help="short side after resizing")
    g.add_argument("--crop-size", type=int, default=d["crop_size"], help="random crop size")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="per process")
    g.add_argument("--no-preload", action="store_true", help="decode images on every access instead of once")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d["steps"], help="total optimisation steps")
    g.add_argument("--decay-steps", type=int, default=None, help="final steps of linear LR decay (default: half)")
    g.add_argument("--lr", type=float, default=None,
                   help=f"{d['lr']:g}; with --resume the run's own unless given (a new rate applies from the resumed step)")
    g.add_argument("--lambda-cycle", type=float, default=d["lambda_cycle"])
    g.add_argument("--lambda-identity", type=float, default=d["lambda_identity"])
    g.add_argument("--pool-size", type=int, default=d["pool_size"])
    g.add_argument("--ema-decay", type=float, default=d["ema_decay"], help="0 disables the EMA generator")
    g.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default=d["mixed_precision"])
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--log-every", type=int, default=d["log_every"])
    g.add_argument("--sample-every", type=int, default=d["sample_every"])
    g.add_argument("--save-every", type=int, default=d["save_every"])
    g.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"])
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--stop-after", type=int, default=None,
                   help="end this invocation after N more steps (resume later; the schedule is unchanged)")
    g = p.add_argument_group("evaluation at checkpoints (FID/KID)")
    g.add_argument("--eval-photos", metavar="DIR", help="photos to translate for FID/KID")
    g.add_argument("--eval-frames", metavar="DIR", help="held-out Ghibli frames to compare against")
    g.add_argument("--eval-include", nargs="*", default=[], metavar="GLOB", help="filter for --eval-frames")
    g.add_argument("--eval-every", type=int, default=d["eval_every"], help="0: only at the end")
    g.add_argument("--eval-size", type=int, default=256)
    g.add_argument("--eval-max-images", type=int, default=None)


def _run_cyclegan(args: argparse.Namespace) -> int:
    from ..training.cyclegan import CycleGANConfig, train_cyclegan

    lr = args.lr if args.lr is not None else resumed_settings(args, "lr").get("lr", CycleGANConfig.lr)
    cfg = CycleGANConfig(
        domain_a=args.domain_a, domain_b=args.domain_b, out=args.out,
        include_a=args.include_a, exclude_a=args.exclude_a, include_b=args.include_b, exclude_b=args.exclude_b,
        where_a=args.where_a, where_b=args.where_b,
        generator=args.generator, width=args.width, n_blocks=args.n_blocks, n_downs=args.n_downs,
        upsample=args.upsample, init_a=args.init_a, disc_width=args.disc_width, disc_layers=args.disc_layers,
        load_size=args.load_size, crop_size=args.crop_size, batch_size=args.batch_size, preload=not args.no_preload,
        steps=args.steps, decay_steps=args.steps // 2 if args.decay_steps is None else args.decay_steps,
        lr=lr, lambda_cycle=args.lambda_cycle, lambda_identity=args.lambda_identity,
        pool_size=args.pool_size, ema_decay=args.ema_decay, mixed_precision=args.mixed_precision, seed=args.seed,
        log_every=args.log_every, sample_every=args.sample_every, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, eval_every=args.eval_every,
    )
    evaluator = None
    if args.eval_photos or args.eval_frames:
        if not (args.eval_photos and args.eval_frames):
            raise ValueError("--eval-photos and --eval-frames go together")
        evaluator = _make_evaluator(args)
    folder = train_cyclegan(cfg, resume=args.resume, cpu=args.cpu, evaluator=evaluator, stop_after=args.stop_after)
    print(f"generator: {folder}")
    return 0


def _make_evaluator(args: argparse.Namespace):
    return make_translation_evaluator(
        photos=args.eval_photos, frames=args.eval_frames, include=args.eval_include,
        size=args.eval_size, max_images=args.eval_max_images,
    )


def make_translation_evaluator(*, photos, frames, include, size: int, max_images: int | None):
    """FID/KID of translated ``photos`` against the ``frames`` matching ``include``.

    The frames' and raw photos' Inception features are computed once; each checkpoint only
    translates and scores. ``max_images`` keeps evenly spaced images so every film stays
    represented.
    """
    from ..data.datasets import select_images
    from ..imaging import load_image
    from ..metrics import TranslationEvaluator
    from ..stylize import Stylizer

    def spaced(paths, n):
        if n is None or n >= len(paths):
            return paths
        return [paths[round(i * (len(paths) - 1) / max(1, n - 1))] for i in range(n)]

    photo_images = [load_image(p) for p in spaced(select_images([photos]), max_images)]
    frame_images = [load_image(p) for p in spaced(select_images([frames], include=include), max_images)]
    evaluator = TranslationEvaluator(photo_images, frame_images, size=size)

    def evaluate(G) -> dict:
        result = evaluator(Stylizer(G, precision="fp32").stylize_images)
        model, identity = result["model"], result["identity"]
        return {
            "fid": model["fid"], "kid_x1000": model["kid_x1000"], "kid_std_x1000": model["kid_std_x1000"],
            "identity_fid": identity["fid"], "identity_kid_x1000": identity["kid_x1000"],
        }

    return evaluate


def _add(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="trainer", metavar="TRAINER", required=True)
    _add_cyclegan(sub.add_parser("cyclegan", help="unpaired photo -> Ghibli translator (CycleGAN)"))
    add_style_parser(sub.add_parser("style", help="fast feed-forward style network (Johnson et al.), for video"))
    add_distill_parser(sub.add_parser("distill", help="fast student generator from a teacher model and real Ghibli frames"))
    add_stylegan_parser(sub.add_parser("stylegan", help="StyleGAN2 generator for the latent-space tools (ADA augmentation)"))


@command("train", "train a model (cyclegan, distill, style, stylegan)", _add)
def run(args: argparse.Namespace) -> int:
    if args.trainer == "cyclegan":
        return _run_cyclegan(args)
    if args.trainer == "style":
        return run_style(args)
    if args.trainer == "distill":
        return run_distill(args)
    if args.trainer == "stylegan":
        return run_stylegan(args)
    raise ValueError(f"unknown trainer {args.trainer!r}")
