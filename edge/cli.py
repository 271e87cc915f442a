"""The `naturelm-edge` command line.

Subcommands live next to the code they drive, in modules that expose `register(subparsers)` and import nothing heavy
at module level: device subcommands never touch torch; workstation subcommands (tiny-model, export, quantize, build)
import it inside their handlers and say which extra to install when it is missing.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edge import __version__
from edge.errors import NatureLMEdgeError

logger = logging.getLogger("naturelm_edge")

# Order is the order of `--help`.
SUBCOMMAND_MODULES = ("export.commands", "quantize.commands", "edge.commands")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="naturelm-edge",
        description=(
            "Run the NatureLM-audio bioacoustics audio-language model on field hardware. Workstation commands turn "
            "the released checkpoint into a model bundle (ONNX audio encoder + quantized GGUF Llama); device commands "
            "run the bundle on recordings or a live microphone and publish results over MQTT."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except NatureLMEdgeError as e:
        for line in e.lines():
            print(f"naturelm-edge: error: {line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("naturelm-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
