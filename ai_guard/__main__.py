"""Command line: ``python -m ai_guard demo`` runs the offline demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ai_guard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the offline demo against the fake upstream")
    demo.add_argument("--quick", action="store_true", help="a shorter scenario")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ai_guard.demo import run_demo

        return run_demo(quick=args.quick)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
