"""Workstation subcommands for the language side (no torch import at module level)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge.cli_util import require_workstation


def cmd_quantize(args: argparse.Namespace) -> int:
    require_workstation()
    from quantize.build import build_llm_bundle, parse_types

    llm = build_llm_bundle(
        naturelm_dir=Path(args.naturelm),
        llama_dir=Path(args.llama),
        out_dir=Path(args.out),
        types=parse_types(args.type),
        lora_mode=args.lora,
        merging_alpha=args.merging_alpha,
        n_ctx=args.n_ctx,
        quality=not args.no_quality,
        quality_clips=args.quality_clips,
        threads=args.threads,
        progress=not args.no_progress,
        work_dir=Path(args.work_dir) if args.work_dir else None,
    )
    lora = llm["lora"]
    print(f"wrote the LLM of bundle {args.out}: LoRA {lora['mode']} (merging_alpha {lora['merging_alpha']})")
    for qtype, info in llm["models"].items():
        q = info.get("quality")
        detail = (f"KL {q['kl_mean']:.3g} (max {q['kl_max']:.3g}), top-1 {q['top1_agreement']:.1%}"
                  + (f", |dP(Yes)| max {q['yes_no_abs_dp_max']:.3g}, label top-1 {q['label_top1_agreement']:.0%}"
                     if "yes_no_abs_dp_max" in q else "")
                  + (f", answers {q['answer_token_agreement']:.0%} of tokens" if "answer_token_agreement" in q else "")
                  + " vs F16" if q else "reference")
        print(f"  {qtype:7s} {info['file']:22s} {info['bytes'] / 2**20:9.1f} MiB  {detail}")
    if lora.get("adapter_file"):
        print(f"  adapter {lora['adapter_file']}")
    return 0


def register(sub) -> None:
    """Adds the language-side subcommands (quantize) to the CLI."""
    p = sub.add_parser(
        "quantize",
        help="convert the Llama backbone (+ NatureLM LoRA) to GGUF and quantize it into a model bundle",
        description=(
            "Write the bundle's LLM: an F16 GGUF of the Llama directory with NatureLM's [PAD] row and LoRA (merged at "
            "--merging-alpha, or as a llama.cpp LoRA adapter whose scale the device sets at run time), the requested "
            "llama.cpp quantizations of it, and a quality report of each (KL divergence and top-1 agreement of the "
            "next-token distribution against the F16) in manifest.json. Tensors are streamed: memory stays far below "
            "the model's size."
        ),
    )
    p.add_argument("--naturelm", required=True, metavar="DIR", help="NatureLM-audio release (config.json + "
                   "model.safetensors)")
    p.add_argument("--llama", required=True, metavar="DIR", help="Hugging Face Llama-3.1-8B-Instruct directory")
    p.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="bundle directory (created or updated)")
    p.add_argument("--type", default="Q4_K_M,Q8_0", metavar="TYPES",
                   help="comma-separated model types to put in the bundle, the first is the device's default: "
                        "Q4_K_M, Q5_K_M, Q6_K, Q8_0, F16, F32 (default Q4_K_M,Q8_0)")
    p.add_argument("--lora", choices=["merge", "adapter"], default="merge",
                   help="merge the LoRA into the weights (default) or write it as a runtime-scalable adapter GGUF")
    p.add_argument("--merging-alpha", type=float, default=1.0,
                   help="LoRA scale: W + merging_alpha * alpha/r * B@A (default 1.0, the model as fine-tuned; "
                        "upstream suggests 0.4-0.6 to keep more of Llama's instruction following, at some cost on "
                        "bioacoustic tasks; with --lora adapter it is the device's default scale)")
    p.add_argument("--n-ctx", type=int, default=1024, help="the device's context size in tokens (default 1024)")
    p.add_argument("--threads", type=int, default=0, help="threads for quantizing and the quality report (0: all)")
    p.add_argument("--no-quality", action="store_true", help="skip the quality report")
    p.add_argument("--quality-clips", type=int, default=2,
                   help="random audio windows in the quality probe (x 8 questions; default 2)")
    p.add_argument("--work-dir", metavar="DIR", help="where the intermediate F16 goes when not kept (default: "
                   "inside BUNDLE_DIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quantize)
