"""Entry point for launchers: ``torchrun --nproc_per_node N -m drivejepa.train --config ... --shards ... --out ...``.

Same arguments as ``drivejepa train``. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
each process trains its share of every batch and rank 0 logs, checkpoints and prints the summary."""
from __future__ import annotations

import argparse
import os
import sys

from drivejepa.cli import os_error_line
from drivejepa.commands import train as command
from drivejepa.config import ConfigError
from drivejepa.errors import UserError
from drivejepa.runtime import setup_logging


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drivejepa.train", description=command.HELP)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    command.add_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(-1 if args.quiet or rank != 0 else 0)
    try:
        return command.run(args)
    except (ConfigError, UserError) as exc:
        print(f"drivejepa train: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"drivejepa train: error: {os_error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
