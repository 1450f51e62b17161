"""`parity` entry point: each subcommand lives in its own module with `register(subparsers)`.

Exit codes: 0 ok, 2 bad arguments or input, 1 internal failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, each exposing register(subparsers) that sets `func` on its parser.
COMMANDS = ["parity.cli.generate", "parity.cli.diagnose", "parity.cli.train", "parity.cli.serve"]


class UsageError(Exception):
    """Bad arguments or input: reported in one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parity", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"parity {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
