"""The `naturelm-edge` command line.

Device subcommands import only device modules; workstation subcommands (tiny-model, export, quantize, build) import
torch lazily, inside their handlers, and say which extra to install when it is missing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edge import __version__
from edge.errors import NatureLMEdgeError

logger = logging.getLogger("naturelm_edge")

WORKSTATION_HINT = "this command runs on the workstation and needs the export extra: pip install 'naturelm-edge[export]'"


def _require_workstation() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise NatureLMEdgeError(f"{e.name} is not installed; {WORKSTATION_HINT}") from None


def cmd_tiny_model(args: argparse.Namespace) -> int:
    _require_workstation()
    from export.tiny_model import build_tiny_model

    naturelm_dir, llama_dir = build_tiny_model(Path(args.out_dir), preset=args.preset, seed=args.seed)
    print(f"wrote {naturelm_dir} and {llama_dir} (preset {args.preset}, seed {args.seed}; random weights)")
    return 0


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
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "tiny-model",
        help="write a seeded random-weight NatureLM checkpoint + Llama directory (for tests and benchmarks)",
        description=(
            "Write OUT_DIR/naturelm (config.json + model.safetensors with the release's key names, LoRA included) "
            "and OUT_DIR/llama (a Hugging Face Llama-3 directory with tokenizer). The weights are random: answers are "
            "meaningless, but every loading and conversion step runs for real. Same seed -> byte-identical files."
        ),
    )
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny",
                   help="tiny: seconds to build, for tests; small: production-shaped (BEATs 768, Llama-3.2-1B shape)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_tiny_model)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except NatureLMEdgeError as e:
        print(f"naturelm-edge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("naturelm-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
