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
    _register_build(sub)


# --- export (audio encoder to ONNX) -------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    require_workstation()
    from export.onnx_export import encoder_file, export_bundle, parse_precisions

    precisions = parse_precisions(args.precision)
    manifest = export_bundle(Path(args.naturelm), Path(args.out), precisions=precisions,
                             progress=not args.no_progress)
    for p in precisions:
        v = manifest["audio"]["encoders"][p]["verification"]
        verdict = "" if v["passed"] else (f"; OUTSIDE tolerance on this machine ({v['failure']}): the device checks "
                                          "it again on its own CPU or GPU before using it")
        print(f"{args.out}/{encoder_file(p)}: mean cosine {v['mean_cosine']:.6f}, min {v['min_cosine']:.6f}, max abs "
              f"error {v['max_abs_error']:.3g} against the PyTorch reference (CPU int8 kernel "
              f"{v['cpu']['int8_kernel']}){verdict}")
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
                   help="comma-separated precisions out of fp32,fp16,int8,int8-qdq (default fp32,fp16,int8). "
                        "int8 is the CPU's graph (dynamic, u8 weights: accurate on every CPU); int8-qdq the static "
                        "QDQ graph, calibrated on audio, that TensorRT builds an int8 engine from (for a Jetson)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)


# --- build (export + quantize into one bundle) ----------------------------------------------------------------------

def cmd_build(args: argparse.Namespace) -> int:
    require_workstation()
    from edge.bundle import load_bundle
    from export.onnx_export import export_bundle, parse_precisions
    from quantize.build import build_llm_bundle, parse_types

    out = Path(args.out)
    precisions = parse_precisions(args.precision)
    types = parse_types(args.type)  # checked before the minutes-long export starts
    export_bundle(Path(args.naturelm), out, precisions=precisions, progress=not args.no_progress)
    build_llm_bundle(naturelm_dir=Path(args.naturelm), llama_dir=Path(args.llama), out_dir=out, types=types,
                     lora_mode=args.lora, merging_alpha=args.merging_alpha, n_ctx=args.n_ctx,
                     quality=not args.no_quality, threads=args.threads, progress=not args.no_progress)
    bundle = load_bundle(out)  # what the device will do first: every file's size and sha256
    size = sum(info["size"] for info in bundle.manifest["files"].values())
    print(f"bundle {bundle.bundle_id} ready in {out} ({len(bundle.manifest['files'])} files, {size / 2**20:.1f} MiB): "
          f"encoders {', '.join(precisions)}; LLM {', '.join(types)} (LoRA {args.lora})")
    return 0


def _register_build(sub) -> None:
    p = sub.add_parser(
        "build",
        help="export + quantize: make a complete model bundle for the device in one step",
        description=(
            "Run `export` (audio side to ONNX, verified) and `quantize` (Llama + LoRA to GGUF, with a quality report) "
            "into one bundle directory, then open it the way the device does (manifest, sizes, sha256)."
        ),
    )
    p.add_argument("--naturelm", required=True, metavar="DIR", help="NatureLM directory (config.json + model.safetensors)")
    p.add_argument("--llama", required=True, metavar="DIR", help="Hugging Face Llama-3.1-8B-Instruct directory")
    p.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="bundle directory (created or added to)")
    p.add_argument("--type", default="Q4_K_M", metavar="TYPES",
                   help="comma-separated LLM types (Q4_K_M, Q5_K_M, Q6_K, Q8_0, F16, F32); the first is the default")
    p.add_argument("--precision", default="fp32,int8", metavar="LIST",
                   help="audio encoder precisions out of fp32,fp16,int8,int8-qdq (default fp32,int8; add int8-qdq "
                        "or fp16 for TensorRT on a Jetson)")
    p.add_argument("--lora", choices=["merge", "adapter"], default="merge",
                   help="merge the LoRA into the weights, or keep it as an adapter scaled at run time")
    p.add_argument("--merging-alpha", type=float, default=1.0,
                   help="LoRA scale: W + merging_alpha * alpha/r * B@A (default 1.0, the model as fine-tuned). "
                        "Upstream suggests 0.4-0.6 (NatureLM-audio README, NatureLM.model_merging_scaling): closer "
                        "to Llama's instruction following and free-form prompts, at some cost on bioacoustic tasks")
    p.add_argument("--n-ctx", type=int, default=1024, help="the device's context size in tokens (default 1024)")
    p.add_argument("--threads", type=int, default=0, help="threads for quantizing and the quality report (0: all)")
    p.add_argument("--no-quality", action="store_true", help="skip the LLM quality report")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build)
