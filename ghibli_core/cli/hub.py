"""``push`` and ``pull``: publish a checkpoint folder to the Hugging Face Hub, fetch one into the cache."""
from __future__ import annotations

import argparse

from . import command


def _push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="checkpoint folder: config.json + model.safetensors (+ README.md, sample PNGs)")
    p.add_argument(
        "--repo", required=True, metavar="OWNER/NAME", help="Hub model repo to publish to (created if missing)"
    )
    p.add_argument(
        "--revision", metavar="BRANCH", help="branch to commit to (default main; created from main if missing)"
    )
    p.add_argument("--private", action="store_true", help="create the repo as private (no effect on an existing repo)")
    p.add_argument("--message", metavar="MSG", help="commit message")


@command(
    "push",
    "publish a checkpoint folder to a Hugging Face Hub model repo (token: HF_TOKEN or `hf auth login`)",
    _push_arguments,
)
def run_push(args: argparse.Namespace) -> int:
    from ..hub import push

    sha = push(args.folder, args.repo, revision=args.revision, private=args.private, commit_message=args.message)
    print(f"pushed {args.folder} to {args.repo} (branch {args.revision or 'main'}), commit {sha}")
    print(f"pinned spec: {args.repo}@{sha}")
    return 0


def _pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="model spec: OWNER/NAME[@REVISION] (or an embedded name / local folder, just checked), "
                   "or diffusion:OWNER/NAME[@REVISION] for a Stable Diffusion pipeline")
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit sha (alternative to @REVISION)")


@command(
    "pull",
    "download a Hub checkpoint or diffusion pipeline (configs, safetensors, card only) into the Hugging Face cache "
    "and print its folder",
    _pull_arguments,
)
def run_pull(args: argparse.Namespace) -> int:
    from ..diffusion import is_diffusion_spec, resolve_pipeline
    from ..hub import resolve

    if is_diffusion_spec(args.spec):
        print(resolve_pipeline(args.spec, revision=args.revision))
    else:
        print(resolve(args.spec, revision=args.revision))
    return 0
