"""`drivejepa bench NAME`: run the benchmark module drivejepa/benchmarks/NAME.py (prints a table, writes JSON)."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

HELP = "run a benchmark (drivejepa bench NAME --help lists its options); prints a table and writes a JSON"


def available() -> list[str]:
    import drivejepa.benchmarks as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def add_arguments(parser) -> None:
    parser.add_argument("name", help="benchmark module in drivejepa/benchmarks (e.g. preprocess, loader)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options of that benchmark")


def run(args) -> int:
    from drivejepa.errors import UserError

    names = available()
    if args.name not in names:
        raise UserError(f"bench: unknown benchmark '{args.name}' (available: {', '.join(names) or 'none'})")
    module = importlib.import_module(f"drivejepa.benchmarks.{args.name}")
    parser = argparse.ArgumentParser(prog=f"drivejepa bench {args.name}",
                                     description=(module.__doc__ or "").strip().splitlines()[0])
    module.add_arguments(parser)
    parser.add_argument("--out", default=f"out/bench/{args.name}.json", help="JSON file for the numbers")
    bench_args = parser.parse_args(args.args)
    bench_args.quiet = getattr(args, "quiet", False)
    result = module.run(bench_args)
    if result is None:
        return 1
    from drivejepa.io import atomic_write_json

    atomic_write_json(bench_args.out, result)
    print(f"wrote {bench_args.out}")
    sys.stdout.flush()
    return 0
