"""``python -m ghibli_core <command>``: the command-line front end.

Each command lives in its own module of this package and registers itself with
:func:`command`; :data:`COMMAND_MODULES` lists them explicitly (no discovery by file name).
Commands do the file and network I/O; the library functions they call take and return objects.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}

COMMAND_MODULES = [
    "ghibli_core.cli.stylize",
    "ghibli_core.cli.train",
    "ghibli_core.cli.evaluate",
    "ghibli_core.cli.hub",
    "ghibli_core.cli.convert",
    "ghibli_core.cli.export",
    "ghibli_core.cli.prepare",
    "ghibli_core.cli.video",
    "ghibli_core.cli.latent",
]


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Decorator registering ``run(args) -> int`` as the sub-command ``name``."""

    def wrap(run):
        if name in COMMANDS:
            raise ValueError(f"command {name!r} registered twice")
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return wrap


def resumed_settings(args: argparse.Namespace, *keys: str) -> dict:
    """With ``--resume``, the run folder's saved values of ``keys`` that were not given on the
    command line (``None`` in ``args``), e.g. the learning rates a resumed run keeps unless told."""
    import json
    from pathlib import Path

    path = Path(args.out) / "train_config.json"
    if not (args.resume and path.is_file()):
        return {}
    old = json.loads(path.read_text())
    return {k: old[k] for k in keys if getattr(args, k, None) is None and k in old}


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real missing dependency, not a command still to be written
                raise
    parser = argparse.ArgumentParser(prog="python -m ghibli_core", description="Ghibli-style photos, videos and latent walks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # user-facing errors: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
