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
    _register_export(sub)


# --- export (audio encoder to ONNX) -------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    require_workstation()
    from export.onnx_export import encoder_file, export_bundle, parse_precisions

    precisions = parse_precisions(args.precision)
    manifest = export_bundle(Path(args.naturelm), Path(args.out), precisions=precisions,
                             progress=not args.no_progress)
    for p in precisions:
        v = manifest["audio"]["encoders"][p]["verification"]
        print(f"{args.out}/{encoder_file(p)}: mean cosine {v['mean_cosine']:.6f}, max abs error "
              f"{v['max_abs_error']:.3g} against the PyTorch reference")
    return 0


def _register_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export NatureLM's audio encoder to ONNX (fp32, fp16, int8) into a model bundle, verified",
        description=(
            "Export the audio side of a NatureLM-audio checkpoint (BEATs + Q-Former + projection) to one ONNX graph "
            "per precision, from the normalised fbank (batch x 998 x 128) to the audio embeddings (batch x 29 x LLM "
            "width). Each graph is checked against the PyTorch reference; its errors go into BUNDLE_DIR/manifest.json "
            "and an fp32 graph outside tolerance is refused."
        ),
    )
    p.add_argument("--naturelm", required=True, metavar="DIR", help="NatureLM directory (config.json + model.safetensors)")
    p.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="bundle directory (created or added to)")
    # Literal, not export.onnx_export.PRECISIONS: building the parser must not import torch.
    p.add_argument("--precision", default="fp32,fp16,int8", metavar="LIST",
                   help="comma-separated precisions out of fp32,fp16,int8 (default: all three)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)
