"""Command line: ``python -m ai_guard demo`` runs the offline demo (see :mod:`ai_guard.demo`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ai_guard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run the example Flask app against the embedded fake upstream, offline",
        description="A scripted scenario (normal traffic, a paced burst, an outage that trips "
        "and heals the breakers, idempotent replays, a stream, a structured output) through "
        "the example Flask app, against the embedded fake upstream; then a report.",
    )
    demo.add_argument("--quick", action="store_true", help="a shorter scenario")
    demo.add_argument(
        "--serve", action="store_true", help="keep the app and its dashboard running (Ctrl-C)"
    )
    demo.add_argument(
        "--port", type=int, default=0, help="port of the example app (default: a free one)"
    )
    demo.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ai_guard.demo import run_demo

        return run_demo(quick=args.quick, serve=args.serve, port=args.port, json_path=args.json)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
