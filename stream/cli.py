"""The `avatar` console script: one entry point for the server and the offline tools.

Torch-free at import: engine commands import their dependencies only when they run.
"""

from __future__ import annotations

import argparse
import logging
import sys

from engine import commands as engine_commands
from stream import latency_probe, latency_run, render, server, soak


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    server.add_command(sub)
    render.add_command(sub)
    soak.add_command(sub)
    latency_probe.add_command(sub)
    latency_run.add_command(sub)
    engine_commands.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
