"""Workstation subcommands for the audio side. Imported by the CLI to build its parser: no torch import at module
level (handlers import lazily, after checking the export extra is installed)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge.cli_util import require_workstation


def cmd_tiny_model(args: argparse.Namespace) -> int:
    require_workstation()
    from export.tiny_model import build_tiny_model

    naturelm_dir, llama_dir = build_tiny_model(Path(args.out_dir), preset=args.preset, seed=args.seed)
    print(f"wrote {naturelm_dir} and {llama_dir} (preset {args.preset}, seed {args.seed}; random weights)")
    return 0


def register(sub) -> None:
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
