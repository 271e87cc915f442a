"""Batched inference against the one-window path, on the production-shaped `small` preset, on this CPU.

The same N windows (edge.synth.birdsong, 10 s at 16 kHz, a different seed each: different audio, different answers)
go through `Pipeline.process` one at a time (what the daemon and `infer --batch 1` run: the "one-window path") and
through `Pipeline.process_batch` B at a time (what `infer --batch B` runs), for B in --batches, in one process per
workload (the model loaded once, one untimed warm-up window first):

- `yes_no`: one yes/no prompt per window;
- `yes_no+caption`: the yes/no prompt and a caption of up to --max-new-tokens tokens (2 beams, as upstream).

Each B is run twice: with exact batches (the default: each window's rows in llama.cpp calls of their own, answers
bit for bit the one-window path's) and with shared batches (--shared-batches: one call for all windows).

Measured: windows per second of each (wall time over all N windows), the ratio batched / one-window at each B, and
the caption's tokens per second at each B = (caption tokens) / (time with the caption - time without it): the
caption's prefill and decode, whatever the engine does inside a batch. Checked: the batched answers equal the
one-window ones (decisions and caption text identical; the largest yes/no score difference is recorded).

    PYTHONPATH=. flock /work/.bench.lock python benchmarks/bench_batch.py [--work DIR] [--windows 16]
        [--batches 1,2,4,8,16] [--precision int8] [--max-new-tokens 16]

The bundle is bench_pipeline.py's (built once into --work: small preset, encoders fp32 and int8, Q4_K_M and F16).
This machine is shared (2 vCPUs, other engineers' jobs): the JSON records the cores other processes used during
each measurement; compare ratios from one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_pipeline import QTYPE, WindowClock, machine, prepare, save_report, usable_cpus

RESULTS = REPO / "benchmarks" / "results" / "batch.json"
YES_NO = "Is there a Song Sparrow in the audio? Answer Yes or No."
CAPTION = "Caption the audio."
SAMPLE_RATE = 16000


def log(msg: str) -> None:
    print(f"[bench_batch] {msg}", file=sys.stderr, flush=True)


def worker(work: Path, workload: str, precision: str, quantization: str, windows: int, batches: list[int],
           max_new: int, threads: int) -> dict:
    from edge.events import WindowInfo
    from edge.pipeline import open_pipeline
    from edge.prompts import parse_prompts
    from edge.synth import birdsong

    specs = [{"id": "sparrow", "kind": "yes_no", "text": YES_NO}]
    if workload == "yes_no+caption":
        specs.append({"id": "caption", "kind": "caption", "text": CAPTION, "max_tokens": max_new})
    def open_(max_batch: int, shared: bool = False):
        return open_pipeline(work / "small-bundle", parse_prompts(specs, "bench"), device_id="bench", provider="cpu",
                             precision=precision, quantization=quantization, threads=threads, llm_threads=threads,
                             verify="size", max_batch=max_batch, shared_batches=shared)

    # Today's one-window path: an engine with one window's slot, Pipeline.process per window.
    pipe = open_(1)
    start = datetime(2026, 6, 1, tzinfo=timezone.utc)
    items = [(birdsong(10.0, SAMPLE_RATE, seed=100 + i), SAMPLE_RATE, WindowInfo(i, 10.0 * i, 10.0, start))
             for i in range(windows)]
    pipe.process(*items[0], source="warmup")  # allocation, kernel choice

    def answers(results):
        return [[(e.prompt_id, e.answer, e.positive, e.score) for e in r.events] for r in results]

    out = {"runs": {}}
    tokens = []
    ask = pipe.llm.ask

    def counting_ask(prompt):  # the caption's generated tokens, from the one-window run's answers
        a = ask(prompt)
        if prompt.kind == "caption":
            tokens.append(len(a.token_ids))
        return a

    pipe.llm.ask = counting_ask
    with WindowClock() as clock:
        seq = [pipe.process(*item, source="bench") for item in items]
    pipe.llm.ask = ask
    want = answers(seq)
    pipe.close()
    out["runs"]["one_window"] = {"seconds": clock.wall, "windows_per_s": windows / clock.wall,
                                 "other_processes_cores": clock.others, "steal_or_unaccounted": clock.steal + clock.lost}
    out["caption_tokens"] = sum(tokens) if tokens else None
    # The batched path, exact batches (the default) then shared ones: an engine with max(B) slots,
    # Pipeline.process_batch B windows at a time.
    out["engine"] = {}
    for mode in ("exact", "shared"):
        pipe = open_(max(batches), shared=mode == "shared")
        pipe.process_batch(items[:2], "warmup")
        for b in batches:
            got = []
            with WindowClock() as clock:
                for i in range(0, windows, b):
                    got += pipe.process_batch(items[i:i + b], "bench")
            got = answers(got)
            same = all([x[:3] for x in g] == [x[:3] for x in w] for g, w in zip(got, want))
            diff = max((abs(x[3] - y[3]) for g, w in zip(got, want) for x, y in zip(g, w) if x[3] is not None),
                       default=0.0)
            out["runs"][f"{mode}_batch_{b}"] = {
                "mode": mode, "batch": b, "seconds": clock.wall, "windows_per_s": windows / clock.wall,
                "answers_identical": same, "bit_identical": got == want, "max_yes_no_score_difference": diff,
                "other_processes_cores": clock.others, "steal_or_unaccounted": clock.steal + clock.lost}
        out["engine"][mode] = {"llm_batched": pipe.llm_batched, "llm_slots": pipe.llm.max_batch,
                               "llm_exact_batches": pipe.llm.exact, "kv_cells_per_sequence": pipe.llm.n_ctx,
                               "beams_per_window": pipe.llm.max_beams, "encoder_batch_exact": pipe.encoder.batch_exact,
                               "info": pipe.info}
        pipe.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "naturelm-bench")
    ap.add_argument("--windows", type=int, default=16, help="windows per measurement (default 16)")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--precision", default="int8", help="audio encoder (default int8, the shipped one)")
    ap.add_argument("--quantization", default=QTYPE)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=usable_cpus())
    ap.add_argument("--workloads", default="yes_no,yes_no+caption")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        print(json.dumps(worker(args.work, args.worker, args.precision, args.quantization, args.windows, batches,
                                args.max_new_tokens, args.threads)))
        return 0

    build = prepare(args.work)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    results = {}
    t0 = time.perf_counter()
    for wl in args.workloads.split(","):
        log(f"{wl}: {args.windows} windows one at a time, then batches of {args.batches}")
        proc = subprocess.run([sys.executable, __file__, "--worker", wl, "--work", str(args.work), "--windows",
                               str(args.windows), "--batches", args.batches, "--precision", args.precision,
                               "--quantization", args.quantization, "--max-new-tokens", str(args.max_new_tokens),
                               "--threads", str(args.threads)], capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{wl} worker failed:\n{proc.stderr[-4000:]}")
        results[wl] = json.loads(proc.stdout.strip().splitlines()[-1])
        base = results[wl]["runs"]["one_window"]["windows_per_s"]
        for run in results[wl]["runs"].values():
            run["ratio_vs_one_window"] = round(run["windows_per_s"] / base, 3)
    decode = {}
    if {"yes_no", "yes_no+caption"} <= set(results):
        tokens = results["yes_no+caption"]["caption_tokens"]
        for key, run in results["yes_no+caption"]["runs"].items():
            extra = run["seconds"] - results["yes_no"]["runs"][key]["seconds"]
            decode[key] = {"caption_tokens": tokens, "caption_seconds": round(extra, 3),
                           "caption_tokens_per_s": round(tokens / extra, 2) if extra > 0 else None}
    report = {
        "what": f"windows/s of Pipeline.process_batch (B windows at once) against Pipeline.process (one window), "
                f"small preset, encoder {args.precision}, LLM {args.quantization}, {args.threads} threads, CPU",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": dict(machine(args.threads), shared="yes: a 2-vCPU build VM shared with other engineers' jobs; "
                        "other_processes_cores per run says how much they took; compare ratios within this run"),
        "method": f"{args.windows} different 10 s windows (birdsong seeds 100..), one process per workload, model "
                  "loaded once, one warm-up window; each configuration timed once over all windows (wall time)",
        "build": {k: v for k, v in build.items() if k in ("built_utc", "build_command")},
        "results": results,
        "caption_decode_by_batch": decode,
        "bench_seconds": round(time.perf_counter() - t0, 1),
    }
    save_report(args.out, report)
    for wl, r in results.items():
        print(f"\n{wl}")
        print(f"{'run':16} {'windows/s':>10} {'x one-window':>13} {'identical':>10} {'max |dscore|':>13} "
              f"{'others cores':>13}")
        for k, run in r["runs"].items():
            print(f"{k:16} {run['windows_per_s']:10.3f} {run['ratio_vs_one_window']:13.2f} "
                  f"{run.get('answers_identical', '-')!s:>10} {run.get('max_yes_no_score_difference', 0):13.2e} "
                  f"{run['other_processes_cores']:13.2f}")
    if decode:
        print("caption tokens/s by batch: " + ", ".join(f"{k} {v['caption_tokens_per_s']}" for k, v in decode.items()))
    print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
