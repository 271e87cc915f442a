"""Decoding on this machine, on the production-shaped `small` preset (Llama-3.2-1B-shaped backbone, the real Llama 3
vocabulary; random weights), Q4_K_M:

- batched windows (EngineOptions.max_batch = B, LlmEngine.answer_windows; shared batches unless --exact) at
  B = --batches: windows/s for yes/no
  only, for yes/no + a caption of up to --max-new-tokens tokens decoded greedily, and with 2 beams; decode tokens/s
  (token rows decoded per second of generation, summed over the windows) against B. B = 1 is the one-window path;
- from its rows, beam search with 2 beams (upstream's decoding, the default for open and caption prompts) against
  greedy: ms per caption and token rows decoded per caption (random weights and random audio embeddings: the answers
  run to the token limit, the worst case for both).

The windows are the same for every variant; each variant runs once after a warm-up (a shared 2-core machine: take
the figures as lower bounds, the JSON records the load). Results printed and saved to
benchmarks/results/decoding.json.

    flock /work/.bench.lock env PYTHONPATH=. python benchmarks/bench_decoding.py [--work DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "decoding.json"
YES_NO = "Is there a American Crow in the audio? Answer Yes or No."
CAPTION = "Caption the audio."


def log(msg: str) -> None:
    print(f"[bench_decoding] {msg}", flush=True)


def cpu() -> dict:
    model, flags = "unknown", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    return {"model": model, **{f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")},
            "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0))}


def build(work: Path) -> Path:
    from export.tiny_model import build_tiny_model
    from quantize.build import build_llm_bundle

    small = work / "small"
    if not (small / "llama" / "model.safetensors").is_file() or not (small / "naturelm" / "model.safetensors").is_file():
        log("writing the small preset (minutes)")
        build_tiny_model(small, preset="small", seed=0)
    bundle = work / "bundle"
    if not (bundle / "manifest.json").is_file():
        log("converting and quantizing to Q4_K_M")
        build_llm_bundle(small / "naturelm", small / "llama", bundle, types=("Q4_K_M",), quality=False,
                         progress=False)
    return bundle


def run(bundle_dir: Path, threads: int, windows: int, max_new: int, batches: list[int], exact: bool = False) -> dict:
    from edge.bundle import load_bundle
    from edge.llm import EngineOptions, LlmEngine, Prompt

    bundle = load_bundle(bundle_dir, verify="none")
    n_embd = int(bundle.section("llm")["n_embd"])
    rng = np.random.default_rng(0)
    audios = [rng.standard_normal((29, n_embd)).astype(np.float32) * 0.02 for _ in range(windows)]
    yes_no = Prompt(id="crow", kind="yes_no", question=YES_NO)
    greedy = Prompt(id="caption", kind="caption", question=CAPTION, max_new_tokens=max_new, num_beams=1)
    beam = Prompt(id="caption", kind="caption", question=CAPTION, max_new_tokens=max_new, num_beams=2)
    out: dict = {"windows": windows, "max_new_tokens": max_new, "batches": "exact" if exact else "shared",
                 "batched": {}}
    n_ctx = 256  # per window: prefix ~45 + question ~20 + 2 beams x max_new tokens

    def options(b: int) -> EngineOptions:
        return EngineOptions(model_type="Q4_K_M", n_threads=threads, n_ctx=n_ctx, max_batch=b, exact_batches=exact)

    # Batched windows; B = 1 is the one-window path, and its rows give beam 2 against greedy.
    for b in batches:
        with LlmEngine.from_bundle(bundle, options(b)) as engine:
            engine.answer_windows(audios[:b], [yes_no])  # warm-up
            row = {}
            for name, prompts in (("yes_no", [yes_no]), ("yes_no+caption_greedy", [yes_no, greedy]),
                                  ("yes_no+caption_beam2", [yes_no, beam])):
                t0 = time.perf_counter()
                results = engine.answer_windows(audios, prompts)
                wall = time.perf_counter() - t0
                captions = [a for r in results for a in r.answers if a.kind == "caption"]
                gen_ms = sum(a.timings.decode_ms for a in captions)
                gen_rows = sum(a.timings.decode_tokens for a in captions)
                row[name] = {"windows_per_s": round(windows / wall, 3), "wall_s": round(wall, 2)}
                if captions:
                    row[name]["decode_tokens_per_s"] = round(gen_rows / (gen_ms / 1e3), 1)
                    row[name]["caption_ms_per_window"] = round(sum(a.timings.total_ms for a in captions) / windows, 1)
                    row[name]["decoded_rows_per_caption"] = round(gen_rows / windows, 1)
                    row[name]["caption_tokens_mean"] = round(float(np.mean([len(a.token_ids) for a in captions])), 1)
            out["batched"][str(b)] = row
            log(f"B={b}: {row}")
    one = out["batched"].get("1")
    if one:
        out["beam2_vs_greedy_B1"] = {
            "caption_ms_per_window_greedy": one["yes_no+caption_greedy"]["caption_ms_per_window"],
            "caption_ms_per_window_beam2": one["yes_no+caption_beam2"]["caption_ms_per_window"],
            "time_ratio": round(one["yes_no+caption_beam2"]["caption_ms_per_window"] /
                                one["yes_no+caption_greedy"]["caption_ms_per_window"], 2),
            "decoded_rows_ratio": round(one["yes_no+caption_beam2"]["decoded_rows_per_caption"] /
                                        one["yes_no+caption_greedy"]["decoded_rows_per_caption"], 2),
        }
    base = out["batched"].get("1")
    if base:
        out["speedup_vs_B1"] = {b: {k: round(v["windows_per_s"] / base[k]["windows_per_s"], 2) for k, v in r.items()}
                                for b, r in out["batched"].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "naturelm-bench-decoding")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batches", default="1,2,4,8", help="B values, run in this order (reverse it to see drift)")
    ap.add_argument("--exact", action="store_true",
                    help="exact batches (each window in llama.cpp calls of its own: the one-window answers, no "
                         "speed-up); default: shared batches, what batching buys")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    import llama_cpp

    bundle = build(args.work)
    load0 = os.getloadavg()
    t0 = time.time()
    results = run(bundle, args.threads, args.windows, args.max_new_tokens,
                  [int(b) for b in args.batches.split(",")], exact=args.exact)
    report = {
        "benchmark": "decoding",
        "preset": "small (Llama-3.2-1B-shaped, random weights), Q4_K_M",
        "machine": {"cpu": cpu(), "platform": platform.platform(), "python": platform.python_version(),
                    "llama_cpp_python": llama_cpp.__version__, "threads": args.threads,
                    "shared": "a 2-vCPU VM shared with other engineers' jobs; figures are lower bounds",
                    "loadavg_start": load0, "loadavg_end": os.getloadavg()},
        "seconds": round(time.time() - t0, 1),
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
