"""Decoding on this machine, on the production-shaped `small` preset (Llama-3.2-1B-shaped backbone, the real Llama 3
vocabulary; random weights), Q4_K_M:

1. beam search with 2 beams (upstream's decoding, the default for open and caption prompts) against greedy: ms per
   answer and decoded tokens per answer for a caption of up to --max-new-tokens tokens, over --windows windows (random
   audio embeddings; the answers of random weights run to the token limit, the worst case for both);
2. batched windows (EngineOptions.max_batch = B, LlmEngine.answer_windows) at B = 1, 2, 4, 8, 16: windows/s for
   yes/no only, for yes/no + a caption (greedy) and yes/no + a caption (2 beams), and decode tokens/s (generated
   token rows per second of generation) against B. B = 1 is the one-window path.

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


def run(bundle_dir: Path, threads: int, windows: int, max_new: int, batches: list[int]) -> dict:
    from edge.bundle import load_bundle
    from edge.llm import EngineOptions, LlmEngine, Prompt

    bundle = load_bundle(bundle_dir, verify="none")
    n_embd = int(bundle.section("llm")["n_embd"])
    rng = np.random.default_rng(0)
    audios = [rng.standard_normal((29, n_embd)).astype(np.float32) * 0.02 for _ in range(windows)]
    yes_no = Prompt(id="crow", kind="yes_no", question=YES_NO)
    greedy = Prompt(id="caption", kind="caption", question=CAPTION, max_new_tokens=max_new, num_beams=1)
    beam = Prompt(id="caption", kind="caption", question=CAPTION, max_new_tokens=max_new, num_beams=2)
    out: dict = {"windows": windows, "max_new_tokens": max_new, "batched": {}}
    n_ctx = 256  # per window: prefix ~45 + question ~20 + 2 beams x max_new tokens

    def options(b: int) -> EngineOptions:
        return EngineOptions(model_type="Q4_K_M", n_threads=threads, n_ctx=n_ctx, max_batch=b)

    # 1. beam 2 against greedy, one window at a time
    with LlmEngine.from_bundle(bundle, options(1)) as engine:
        engine.run_window(audios[0], [yes_no, greedy])  # warm-up
        per = {}
        for name, prompt in (("greedy", greedy), ("beam2", beam)):
            ms, decoded, tokens = [], [], []
            for a in audios:
                engine.set_audio(a)
                ans = engine.ask(prompt)
                ms.append(ans.timings.total_ms)
                decoded.append(ans.timings.decode_tokens)
                tokens.append(len(ans.token_ids))
            per[name] = {"ms_per_answer_median": round(float(np.median(ms)), 1),
                         "decoded_tokens_per_answer": round(float(np.mean(decoded)), 1),
                         "answer_tokens_mean": round(float(np.mean(tokens)), 1)}
            log(f"{name}: {per[name]}")
        per["beam2_over_greedy_time"] = round(per["beam2"]["ms_per_answer_median"] /
                                              per["greedy"]["ms_per_answer_median"], 2)
        out["beam_vs_greedy"] = per

    # 2. batched windows
    for b in batches:
        with LlmEngine.from_bundle(bundle, options(b)) as engine:
            engine.answer_windows(audios[:b], [yes_no])  # warm-up
            row = {}
            for name, prompts in (("yes_no", [yes_no]), ("yes_no+caption_greedy", [yes_no, greedy]),
                                  ("yes_no+caption_beam2", [yes_no, beam])):
                t0 = time.perf_counter()
                results = engine.answer_windows(audios, prompts)
                wall = time.perf_counter() - t0
                gen_ms = sum(a.timings.decode_ms for r in results for a in r.answers if a.kind == "caption")
                gen_rows = sum(a.timings.decode_tokens for r in results for a in r.answers if a.kind == "caption")
                row[name] = {"windows_per_s": round(windows / wall, 3), "wall_s": round(wall, 2)}
                if gen_rows:
                    row[name]["decode_tokens_per_s"] = round(gen_rows / (gen_ms / 1e3), 1)
            out["batched"][str(b)] = row
            log(f"B={b}: {row}")
    base = out["batched"].get("1")
    if base:
        out["speedup_vs_B1"] = {b: {k: round(v["windows_per_s"] / base[k]["windows_per_s"], 2) for k, v in r.items()}
                                for b, r in out["batched"].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "naturelm-bench-decoding")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batches", default="1,2,4,8,16")
    args = ap.parse_args()
    import llama_cpp

    bundle = build(args.work)
    load0 = os.getloadavg()
    t0 = time.time()
    results = run(bundle, args.threads, args.windows, args.max_new_tokens,
                  [int(b) for b in args.batches.split(",")])
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
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
