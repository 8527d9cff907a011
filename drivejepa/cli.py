"""The ``drivejepa`` command: one verb per stage of the pipeline.

Each verb lives in a module that is cheap to import (argument definitions only; heavy imports happen in ``run``)
and exposes ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from drivejepa import __version__
from drivejepa.config import ConfigError
from drivejepa.errors import UserError
from drivejepa.runtime import setup_logging

VERBS = {
    "synth": "drivejepa.commands.synth",
    "preprocess": "drivejepa.commands.preprocess",
    "train": "drivejepa.commands.train",
    "evaluate": "drivejepa.commands.evaluate",
    "visualize": "drivejepa.commands.visualize",
    "plan": "drivejepa.commands.plan",
    "drive": "drivejepa.commands.drive",
    "bench": "drivejepa.commands.bench",
    "demo": "drivejepa.commands.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drivejepa", description="A multimodal JEPA world model for driving.")
    parser.add_argument("--version", action="version", version=f"drivejepa {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    noise = common.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    noise.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb, module_name in VERBS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(verb, help=module.HELP, description=module.HELP, parents=[common])
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(-1 if args.quiet else (1 if args.verbose else 0))
    try:
        return int(args._module.run(args) or 0)
    except (ConfigError, UserError) as exc:
        logging.getLogger("drivejepa").debug("error details", exc_info=True)
        print(f"drivejepa {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only or missing directory, a permission: one line naming the path
        logging.getLogger("drivejepa").debug("error details", exc_info=True)
        print(f"drivejepa {args.verb}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"drivejepa {args.verb}: interrupted", file=sys.stderr)
        return 130


def os_error_line(exc: OSError) -> str:
    """'PATH: reason' for an OS error (the reason alone when it names no path)."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    target = f" -> {exc.filename2}" if exc.filename2 else ""
    return f"{exc.filename}{target}: {reason}"


if __name__ == "__main__":
    sys.exit(main())
