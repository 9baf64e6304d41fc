"""`python -m engine COMMAND`: the engine's commands (bench, check-checkpoint,
make-tiny-checkpoint) without the server's network stack, for GPU machines that have PyTorch
but not aiohttp/aiortc/PyAV. `avatar COMMAND` is the same with the server commands added."""

from __future__ import annotations

import argparse
import logging
import sys

from engine.commands import add_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
