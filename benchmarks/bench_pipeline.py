"""The whole window end to end on this CPU: the edge pipeline (ONNX audio encoder + llama.cpp Q4_K_M) against the
PyTorch reference pipeline (export.reference.ReferencePipeline, float32) on the production-shaped `small` preset
(the release's BEATs and bert-base Q-Former, a Llama-3.2-1B-shaped LLM with the Llama 3 vocabulary + [PAD], LoRA
rank 32 merged at 1.0; random weights, the same checkpoint on both sides).

Same audio (edge.synth.birdsong, 10 s at 16 kHz, one clip for every window), same two prompts on both sides:
- a yes_no question, answered from the logits of the first answer token (P(Yes) vs P(No));
- a caption, greedy, exactly --max-new-tokens tokens when no stop token comes first (the generated token counts
  of both sides are recorded and checked).

Per window, what each side does:
- edge (`Pipeline.process`, what `infer` and the daemon run): numpy front end (resample: none at 16 kHz; Kaldi
  fbank; normalise) -> onnxruntime encoder (int8 or fp32) -> llama.cpp: the audio prefix (BOS, header, 29 audio rows)
  decoded into the KV cache once, then per prompt only its question suffix (yes_no: one batch, read P(Yes); caption:
  one batch + N-1 single-token decodes).
- reference, encoder once (the headline; the same work as the edge's apart from the shared prefix):
  ReferencePipeline.audio_embeddings (torch Kaldi fbank, eager BEATs + Q-Former + projection), then
  .llm.yes_no_score(emb, q) (a forward over BOS + text + audio + question) and .llm.generate(emb, q, N) (that forward
  again with the caption question + N-1 cached single-token decodes). ReferencePipeline.yes_no_score/.generate are
  exactly these calls, each preceded by its own audio_embeddings.
- reference, as its API is called (`reference_api`): ReferencePipeline.yes_no_score(audio) then
  .generate(audio, N), i.e. the encoder twice per window. Timed in the reference's process, windows alternating with
  the headline mode; reported, not used for the aims.

Measured: seconds per 10 s window (median over timed windows) and the real-time factor at hop 10 s (seconds of
compute per second of audio); for the edge, the split front end / encoder / LLM from WindowResult.timings (and the
LLM's prefix / prompt prefill / decode from the engine's answers); for the reference the same split from timers and
forward hooks on the Llama; the peak resident memory (VmHWM) of each variant's process (interpreter, imports, model
load and the timed windows; every variant runs in its own fresh process) and its RSS once loaded; the bundle's build
time and peak RSS (`naturelm-edge build` in a child process), file sizes, the machine.

Method: --rounds rounds of the variants in turn, each a fresh process: --warmup windows untimed, then --windows timed
ones (per mode for the reference). Windows that did not have the machine to themselves are left out of the medians
and counted (this 2-vCPU VM is shared and loses a vCPU at times; llama.cpp's spinning threads then slow down 10x):
a window is starved when other processes used more than 0.25 cores beyond those --threads leaves free, or more than 10% of the machine's CPU
time was stolen (/proc/stat steal) or unaccounted for, or, for the edge variants (whose threads spin, ~2.0 cores
busy on 2 threads), when its process kept fewer than 75% of its threads' cores busy. Rounds are added (up to
--max-rounds) until every variant has --windows unstarved windows.

    PYTHONPATH=. python benchmarks/bench_pipeline.py [--work /tmp/naturelm-bench] [--max-new-tokens 16] [--rounds 3] [--threads N]

The small preset and its bundle (Q4_K_M; encoders fp32,int8) are built once into --work and reused while complete.
Aims (issue 5): edge int8 + Q4_K_M >= 5x faster per window than the reference, peak RSS <= 1/3 of the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "pipeline.json"
VARIANTS = ("edge_int8", "edge_fp32", "reference")
EDGE_PRECISION = {"edge_int8": "int8", "edge_fp32": "fp32"}
QTYPE = "Q4_K_M"
#: Built into the bundle: the shipped type first (the default), F16 for the matched-precision edge variant.
BUILD_TYPES = "Q4_K_M,F16"
PRECISIONS = "fp32,int8"
SAMPLE_RATE = 16000
HOP_SECONDS = 10.0
YES_NO_QUESTION = "Is there a Song Sparrow in the audio? Answer Yes or No."
CAPTION_QUESTION = "Caption the audio."
AIMS = {"speedup": 5.0, "memory_fraction": 1 / 3}
STARVED_BUSY_BELOW = 0.75  # of the threads' cores (edge variants only, see starved())
STARVED_STEAL_ABOVE = 0.10  # of the machine's CPU time, stolen or unaccounted for
STARVED_OTHERS_ABOVE = 0.25  # cores used by other processes, beyond those the threads leave free
BUILD_RECORD = "build.json"


def log(msg: str) -> None:
    print(f"[bench_pipeline] {msg}", file=sys.stderr, flush=True)


def usable_cpus() -> int:
    return max(1, len(os.sched_getaffinity(0)))


# ---------------------------------------------------------------------------------------------------------------------
# Process measurements


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {key} in /proc/self/status")


def _cpu_ticks() -> list[int]:
    """The machine's /proc/stat `cpu` line: user nice system idle iowait irq softirq steal (clock ticks)."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]


class WindowClock:
    """Wall time over one window, this process's CPU time, and what the rest of the machine did meanwhile: CPU time of
    other processes (another job on this VM), steal, and time no CPU accounted for (a vCPU the host paused)."""

    tick = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1

    def __enter__(self):
        self.ticks0, self.cpu0, self.t0 = _cpu_ticks(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.busy = (time.process_time() - self.cpu0) / self.wall  # CPU seconds of all threads per wall second
        d = [b - a for a, b in zip(self.ticks0, _cpu_ticks())]
        machine_busy = (d[0] + d[1] + d[2] + d[5] + d[6]) / self.tick / self.wall  # cores
        self.others = max(0.0, machine_busy - self.busy)  # cores used by other processes
        self.steal = d[7] / self.tick / self.wall / self.ncpu  # fraction of the machine
        self.lost = max(0.0, 1 - sum(d) / self.tick / self.wall / self.ncpu)  # fraction of the machine


def _window_record(clock: WindowClock, **parts) -> dict:
    return {"seconds": clock.wall, "cores_busy": clock.busy, "other_processes_cores": clock.others,
            "steal": clock.steal, "unaccounted": clock.lost, **parts}


# ---------------------------------------------------------------------------------------------------------------------
# Workers (each in its own fresh process)


def _audio() -> np.ndarray:
    from edge.synth import birdsong

    return birdsong(seconds=HOP_SECONDS, sample_rate=SAMPLE_RATE, seed=0)


def edge_worker(variant: str, work: Path, threads: int, warmup: int, windows: int, max_new: int) -> dict:
    """Pipeline.process on each window, as infer and the daemon call it. Imports no torch."""
    from edge.events import WindowInfo
    from edge.pipeline import open_pipeline
    from edge.prompts import parse_prompts

    audio = _audio()
    rss_imports = _status_mb("VmRSS")
    prompts = parse_prompts([
        {"id": "sparrow", "kind": "yes_no", "text": YES_NO_QUESTION},
        {"id": "caption", "kind": "caption", "text": CAPTION_QUESTION, "max_tokens": max_new},
    ], "bench")
    t0 = time.perf_counter()
    # verify="full" (sha256 of every file) as the device does; it is load time, not window time
    pipe = open_pipeline(work / "small-bundle", prompts, device_id="bench", provider="cpu",
                         precision=EDGE_PRECISION[variant], quantization=QTYPE, threads=threads, llm_threads=threads)
    load_s = time.perf_counter() - t0
    rss_loaded = _status_mb("VmRSS")
    answers = []
    ask = pipe.llm.ask

    def recording_ask(prompt):  # instrumentation only: keep each Answer (its prefill / decode timings)
        a = ask(prompt)
        answers.append(a)
        return a

    pipe.llm.ask = recording_ask
    records, sample = [], None
    start = datetime.now(timezone.utc)
    for i in range(warmup + windows):
        answers.clear()
        info = WindowInfo(index=i, offset_s=i * HOP_SECONDS, duration_s=HOP_SECONDS, start_utc=start)
        with WindowClock() as clock:
            result = pipe.process(audio, SAMPLE_RATE, info, source="birdsong")
        yn, cap = answers
        if sample is None:
            sample = {"yes_no_score": yn.score, "caption": cap.text, "caption_tokens": len(cap.token_ids),
                      "caption_stopped": cap.stopped,
                      "events": [{"prompt_id": e.prompt_id, "answer": e.answer, "score": e.score}
                                 for e in result.events]}
        if i >= warmup:
            t = result.timings
            records.append(_window_record(
                clock, frontend=t["frontend"] / 1e3, encoder=t["encoder"] / 1e3, llm=t["llm"] / 1e3,
                pipeline_total=t["total"] / 1e3, llm_prefix=pipe.llm.prefix_ms / 1e3,
                llm_yes_no=yn.timings.total_ms / 1e3, llm_caption_prefill=cap.timings.prompt_ms / 1e3,
                llm_caption_decode=cap.timings.decode_ms / 1e3, caption_tokens=len(cap.token_ids),
                caption_decodes=cap.timings.decode_tokens))
    pipe.close()
    return {"windows": records, "load_seconds": load_s, "rss_after_imports_mb": rss_imports,
            "rss_after_load_mb": rss_loaded, "peak_rss_mb": _status_mb("VmHWM"), "sample": sample,
            "info": pipe.info}


def reference_worker(work: Path, threads: int, warmup: int, windows: int, max_new: int) -> dict:
    """ReferencePipeline in float32 on the CPU; windows alternate between the two modes (see the module docstring)."""
    import torch

    from export.reference import ReferencePipeline

    torch.set_num_threads(threads)
    audio = _audio()
    rss_imports = _status_mb("VmRSS")
    t0 = time.perf_counter()
    ref = ReferencePipeline(work / "small" / "naturelm", work / "small" / "llama")
    load_s = time.perf_counter() - t0
    rss_loaded = _status_mb("VmRSS")
    forwards: list[list[float]] = []  # [start, end] of every call of the Llama's forward

    def pre(_module, _args):
        forwards.append([time.perf_counter(), None])

    def post(_module, _args, _out):
        forwards[-1][1] = time.perf_counter()

    ref.llm.model.register_forward_pre_hook(pre)
    ref.llm.model.register_forward_hook(post)

    def encoder_once():
        t = time.perf_counter()
        feats = ref.features(audio, SAMPLE_RATE)
        t1 = time.perf_counter()
        with torch.no_grad():
            emb = ref.audio(feats)[0]
        t2 = time.perf_counter()
        p_yes = ref.llm.yes_no_score(emb, YES_NO_QUESTION)
        ids = ref.llm.generate(emb, CAPTION_QUESTION, max_new_tokens=max_new)
        return p_yes, ids, {"frontend": t1 - t, "encoder": t2 - t1}

    def as_api():
        p_yes = ref.yes_no_score(audio, SAMPLE_RATE, YES_NO_QUESTION)
        ids = ref.generate(audio, SAMPLE_RATE, CAPTION_QUESTION, max_new_tokens=max_new)
        return p_yes, ids, {}

    records = {"reference": [], "reference_api": []}
    sample = None
    for i in range(warmup + windows):
        for mode, fn in (("reference", encoder_once), ("reference_api", as_api)):
            forwards.clear()
            with WindowClock() as clock:
                p_yes, ids, parts = fn()
            fw = [e - s for s, e in forwards]  # yes_no forward, caption prefill, caption decodes
            stop = bool(ids) and ids[-1] in ref.llm.stop_ids
            if sample is None:
                text = ref.llm.decode([t for t in ids if t not in ref.llm.stop_ids])
                sample = {"yes_no_score": p_yes, "caption": text,
                          "caption_tokens": len(ids) - int(stop), "caption_stopped": stop}
            if i >= warmup:
                llm = sum(fw)
                rec = _window_record(clock, llm=llm, llm_yes_no=fw[0], llm_caption_prefill=fw[1],
                                     llm_caption_decode=sum(fw[2:]), caption_tokens=len(ids) - int(stop),
                                     caption_decodes=len(fw) - 2, llm_forwards=len(fw), **parts)
                if mode == "reference":
                    rec["other"] = clock.wall - rec["frontend"] - rec["encoder"] - llm  # tokenising, embedding, glue
                else:
                    rec["audio_and_other"] = clock.wall - llm  # two front ends + two encoder runs + glue
                records[mode].append(rec)
    return {"windows": records["reference"], "windows_api": records["reference_api"], "load_seconds": load_s,
            "rss_after_imports_mb": rss_imports, "rss_after_load_mb": rss_loaded,
            "peak_rss_mb": _status_mb("VmHWM"), "sample": sample}


# ---------------------------------------------------------------------------------------------------------------------
# The small preset and its bundle, built once


def _bundle_complete(work: Path) -> dict | None:
    """The build record when the cached bundle is complete (recorded, sizes as in its manifest, the encoders and
    LLM type this benchmark needs), else None."""
    from edge.bundle import load_bundle
    from edge.errors import NatureLMEdgeError

    record = work / BUILD_RECORD
    if not record.is_file():
        return None
    try:
        bundle = load_bundle(work / "small-bundle", verify="size")
    except NatureLMEdgeError:
        return None
    m = bundle.manifest
    if (not set(PRECISIONS.split(",")) <= set(m.get("audio", {}).get("encoders", {}))
            or not set(BUILD_TYPES.split(",")) <= set(m.get("llm", {}).get("models", {}))):
        return None
    for d in ("naturelm", "llama"):
        if not (work / "small" / d / "model.safetensors").is_file():
            return None
    return json.loads(record.read_text())


def prepare(work: Path) -> dict:
    """Write the small preset and build its bundle with `naturelm-edge build` (exactly cmd_build) in a child process,
    unless a complete one is already in `work`."""
    from quantize.peak_rss import measure

    work.mkdir(parents=True, exist_ok=True)
    found = _bundle_complete(work)
    if found is not None:
        log(f"reusing the bundle in {work / 'small-bundle'} (built {found['built_utc']})")
        return dict(found, reused=True)
    record: dict = {}
    small = work / "small"
    if not all((small / d / "model.safetensors").is_file() for d in ("naturelm", "llama")):
        from export.tiny_model import build_tiny_model

        log(f"writing the small preset into {small} (a few minutes)")
        shutil.rmtree(small, ignore_errors=True)
        t0 = time.perf_counter()
        build_tiny_model(small, preset="small", seed=0)
        record["preset_write_seconds"] = time.perf_counter() - t0
    partial = work / "small-bundle.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(work / "small-bundle", ignore_errors=True)
    args = ["cli", "build", "--naturelm", str(small / "naturelm"), "--llama", str(small / "llama"), "--out",
            str(partial), "--type", BUILD_TYPES, "--precision", PRECISIONS, "--no-progress"]
    log("building the bundle: naturelm-edge " + " ".join(args[1:]) + f" (log: {work / 'build.log'})")
    r = measure(args, report=work / "build-rss.json", log=work / "build.log")
    if r["rc"] != 0:
        raise SystemExit(f"bundle build failed (rc {r['rc']}); see {work / 'build.log'}")
    partial.rename(work / "small-bundle")
    record.update({"build_seconds": r["seconds"], "build_peak_rss_mb": r["peak_rss"] / 2**20,
                   "build_command": "naturelm-edge " + " ".join(args[1:]).replace(str(partial),
                                                                                  str(work / "small-bundle")),
                   "built_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
    (work / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return dict(record, reused=False)


def file_sizes(work: Path) -> dict:
    bundle = work / "small-bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    mb = {name: round(info["size"] / 2**20, 1) for name, info in sorted(manifest["files"].items())}
    return {
        "bundle_files_mb": mb,
        "bundle_total_mb": round(sum(mb.values()), 1),
        "edge_int8_loads_mb": round(sum(v for k, v in mb.items() if "fp32" not in k), 1),
        "edge_fp32_loads_mb": round(sum(v for k, v in mb.items() if "int8" not in k), 1),
        "reference_checkpoint_mb": {d: round(sum(f.stat().st_size for f in (work / "small" / d).iterdir()) / 2**20, 1)
                                    for d in ("naturelm", "llama")},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Summary


def starved(w: dict, threads: int, edge: bool) -> bool:
    """A window during which this process did not have the machine to itself. The edge variants keep every thread
    busy for the whole window (llama.cpp and onnxruntime spin between ops: ~2.0 cores on 2 threads), so fewer busy
    cores also mean a lost vCPU; the reference idles part of the time by itself (~1.4-1.7 cores), so only the
    machine-wide signs count for it."""
    free = (os.cpu_count() or 1) - threads  # cores other processes may use without competing
    return (w["other_processes_cores"] > free + STARVED_OTHERS_ABOVE
            or w["steal"] + w["unaccounted"] > STARVED_STEAL_ABOVE
            or (edge and w["cores_busy"] < STARVED_BUSY_BELOW * threads))


def summarise(runs: list[dict], key: str, threads: int, edge: bool) -> dict:
    windows = [w for r in runs for w in r[key]]
    quiet = [w for w in windows if not starved(w, threads, edge)]
    use = quiet or windows
    parts = [k for k in use[0] if k not in ("seconds", "cores_busy", "other_processes_cores", "steal", "unaccounted",
                                               "caption_tokens", "caption_decodes", "llm_forwards")]
    med = float(np.median([w["seconds"] for w in use]))
    out = {
        "seconds_per_window_median": round(med, 3),
        "seconds_per_window_min": round(float(np.min([w["seconds"] for w in use])), 3),
        "seconds_per_window_max": round(float(np.max([w["seconds"] for w in use])), 3),
        "real_time_factor": round(med / HOP_SECONDS, 4),
        "split_seconds_median": {p: round(float(np.median([w[p] for w in use])), 4) for p in parts},
        "caption_tokens": sorted({w["caption_tokens"] for w in windows}),
        "caption_single_token_decodes": sorted({w["caption_decodes"] for w in windows}),
        "timed_windows": len(windows),
        "starved_windows_excluded": len(windows) - len(quiet) if quiet else 0,
        "all_windows_starved": not quiet,  # then the figures are over all windows, and unreliable
        "cores_busy_median": round(float(np.median([w["cores_busy"] for w in windows])), 2),
        "other_processes_cores_max": round(float(np.max([w["other_processes_cores"] for w in windows])), 2),
        "steal_or_unaccounted_max": round(float(np.max([w["steal"] + w["unaccounted"] for w in windows])), 3),
        "round_medians_s": [round(float(np.median([w["seconds"] for w in r[key]])), 3) for r in runs],
    }
    dec = [w["llm_caption_decode"] / w["caption_decodes"] for w in use if w["caption_decodes"]]
    if dec:
        out["decode_seconds_per_token_median"] = round(float(np.median(dec)), 4)
    return out


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine(threads: int) -> dict:
    import llama_cpp
    import onnxruntime
    import torch

    from edge.cpu import cpu_info

    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    return {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus(), "threads_used": threads,
            "memory_gib": round(mem / 2**20, 1), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "llama_cpp_python": llama_cpp.__version__, "loadavg_at_start": os.getloadavg(), "features": cpu_info()}


def other_load(seconds: float = 3.0) -> float:
    """Cores other processes use right now (this process sleeps meanwhile)."""
    with WindowClock() as clock:
        time.sleep(seconds)
    return round(clock.others, 2)


def _run_worker(variant: str, args, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", variant, "--work", str(args.work), "--threads", str(args.threads),
         "--warmup", str(args.warmup), "--windows", str(args.windows), "--max-new-tokens", str(args.max_new_tokens)],
        capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "naturelm-bench",
                    help="cache: the small preset, its bundle and the build record (reused while complete)")
    ap.add_argument("--threads", type=int, default=usable_cpus(),
                    help="threads for torch, onnxruntime and llama.cpp (default: the usable cores)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="caption length bound, both sides (default 16)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed windows per process (default 1)")
    ap.add_argument("--windows", type=int, default=3, help="timed windows per process (per mode) (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all variants in turn (default 3)")
    ap.add_argument("--max-rounds", type=int, default=4,
                    help="keep adding rounds, up to this many, while a variant has fewer than --windows unstarved ones")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--prepare-only", action="store_true", help="build (or check) the cached bundle and stop")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        if args.worker == "reference":
            res = reference_worker(args.work, args.threads, args.warmup, args.windows, args.max_new_tokens)
        else:
            res = edge_worker(args.worker, args.work, args.threads, args.warmup, args.windows, args.max_new_tokens)
        print(json.dumps(res))
        return 0

    from tqdm import tqdm

    build = prepare(args.work)
    if args.prepare_only:
        return 0
    info = machine(args.threads)
    info["other_processes_cores_at_start"] = busy = other_load()
    if busy > usable_cpus() - args.threads + STARVED_OTHERS_ABOVE:
        log(f"warning: other processes use {busy} cores of {usable_cpus()}; with {args.threads} threads most windows "
            "will count as starved (stop them, or pass --threads to leave them their cores)")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads))
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}

    def short(v: str) -> int:  # unstarved windows so far (the reference's fewer of its two modes)
        keys = ("windows", "windows_api") if v == "reference" else ("windows",)
        return min(sum(not starved(w, args.threads, v != "reference") for r in runs[v] for w in r[k]) for k in keys)

    bar = tqdm(total=args.rounds * len(VARIANTS), desc="benchmark", unit="process")
    round_ = 0
    t_start = time.perf_counter()
    while round_ < args.rounds or (round_ < args.max_rounds and min(short(v) for v in VARIANTS) < args.windows):
        if round_ >= args.rounds:
            bar.total += len(VARIANTS)  # a starved machine: one more round
        for v in VARIANTS:
            bar.set_postfix_str(f"round {round_ + 1} {v}")
            runs[v].append(_run_worker(v, args, env))
            bar.update(1)
        round_ += 1
    bar.close()

    results = {v: summarise(runs[v], "windows", args.threads, v != "reference") for v in VARIANTS}
    results["reference_api"] = summarise(runs["reference"], "windows_api", args.threads, False)
    for v in VARIANTS:
        rs = runs[v]
        results[v].update({
            "load_seconds_median": round(float(np.median([r["load_seconds"] for r in rs])), 2),
            "rss_after_imports_mb": round(max(r["rss_after_imports_mb"] for r in rs), 1),
            "rss_after_load_mb": round(max(r["rss_after_load_mb"] for r in rs), 1),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs), 1),
            "sample_answers": rs[0]["sample"],
        })
    results["reference_api"]["peak_rss_mb"] = results["reference"]["peak_rss_mb"]  # the same process
    ref_s = results["reference"]["seconds_per_window_median"]
    ref_mem = results["reference"]["peak_rss_mb"]
    for r in results.values():
        r["speedup_vs_reference"] = round(ref_s / r["seconds_per_window_median"], 2)
        r["peak_rss_fraction_of_reference"] = round(r["peak_rss_mb"] / ref_mem, 3)

    # The verdict depends on the caption length: project each side as (its median window) + (N - max) decodes at its
    # median decode cost per token. A linear model from this run's figures, not a measurement.
    projection = {}
    for n in (1, 8, 16, 32, 48):
        secs = {v: r["seconds_per_window_median"] + (n - args.max_new_tokens) * r["decode_seconds_per_token_median"]
                for v, r in results.items() if "decode_seconds_per_token_median" in r}
        projection[str(n)] = {f"{v}_seconds": round(x, 3) for v, x in secs.items()}
        projection[str(n)].update({f"{v}_speedup": round(secs["reference"] / secs[v], 2)
                                   for v in ("edge_int8", "edge_fp32") if v in secs and "reference" in secs})
    same_tokens = len({t for r in results.values() for t in r["caption_tokens"]}) == 1
    reliable = not any(results[v]["all_windows_starved"] for v in results)
    edge = results["edge_int8"]
    aims = {
        "edge_int8_speedup_>=_5x": edge["speedup_vs_reference"] >= AIMS["speedup"] if reliable
        else "unreliable (every window of a variant starved)",
        "edge_int8_peak_rss_<=_1/3_of_reference": edge["peak_rss_fraction_of_reference"] <= AIMS["memory_fraction"],
    }
    bundle = json.loads((args.work / "small-bundle" / "manifest.json").read_text())
    report = {
        "what": "one 10 s window end to end (hop 10 s), small preset (BEATs 768x12, bert-base Q-Former, "
                "Llama-3.2-1B-shaped LLM, vocab 128257; random weights), edge pipeline (ONNX encoder + llama.cpp "
                f"{QTYPE}) vs the PyTorch float32 reference on the CPU, same checkpoint",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": dict(info, loadavg_at_end=os.getloadavg()),
        "workload": {
            "audio": f"edge.synth.birdsong(seconds={HOP_SECONDS}, sample_rate={SAMPLE_RATE}, seed=0), the same clip "
                     "every window",
            "prompts": [{"kind": "yes_no", "text": YES_NO_QUESTION},
                        {"kind": "caption", "text": CAPTION_QUESTION, "max_new_tokens": args.max_new_tokens}],
            "edge": "Pipeline.process (open_pipeline, provider cpu, threads and llm_threads = "
                    f"{args.threads}): numpy front end -> onnxruntime encoder -> llama.cpp: audio prefix decoded "
                    "once, yes_no = question suffix prefill + P(Yes) from its logits, caption = question suffix "
                    "prefill + greedy decode (N-1 single-token decodes for N tokens)",
            "reference": "ReferencePipeline (float32, CPU, torch threads "
                         f"{args.threads}): audio_embeddings once (torch fbank + eager BEATs/Q-Former/projection), "
                         "llm.yes_no_score (full prompt forward) and llm.generate(max_new_tokens=N) (full prompt "
                         "forward + N-1 cached decodes) on those embeddings",
            "reference_api": "ReferencePipeline.yes_no_score(audio) + ReferencePipeline.generate(audio, N) as "
                             "called: the same, but audio_embeddings computed for each call (twice per window)",
            "caption_token_counts_equal": same_tokens,
        },
        "method": f"{round_} rounds of {', '.join(VARIANTS)} in turn, each a fresh process: {args.warmup} untimed "
                  f"window(s), then {args.windows} timed (the reference's process alternates its two modes window "
                  "by window). Median over the windows that were not starved: other processes used <= "
                  f"{STARVED_OTHERS_ABOVE} cores beyond the {(os.cpu_count() or 1) - args.threads} left free, steal + CPU time unaccounted for <= {STARVED_STEAL_ABOVE:.0%} of "
                  f"the machine, and (edge variants, which keep their threads spinning) >= {STARVED_BUSY_BELOW:.0%} "
                  f"of the {args.threads} threads' cores busy; the others are excluded and counted. Peak RSS = "
                  "VmHWM of the variant's own process (interpreter, imports, model load, windows): torch + transformers for "
                  "the reference; numpy + onnxruntime + llama.cpp (GGUF memory-mapped) for the edge",
        "build": {k: (round(v, 1) if isinstance(v, float) else v) for k, v in build.items()},
        "file_sizes": file_sizes(args.work),
        "bundle_quality": {
            "llm": (bundle["llm"]["models"][QTYPE].get("quality") or {}),
            "encoders": {p: {k: e["verification"][k] for k in ("mean_cosine", "max_abs_error")}
                         for p, e in bundle["audio"]["encoders"].items() if "verification" in e},
        },
        "results": results,
        "projection_by_caption_tokens": projection,
        "aims": aims,
        "bench_seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")[1])
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    _print(report)
    print(f"\nsaved {args.out}")
    return 0


def _print(report: dict) -> None:
    m = report["machine"]
    print(f"\n{report['what']}\n{m['cpu']}, {m['usable_cpus']} usable CPUs, {m['threads_used']} threads, "
          f"{m['memory_gib']} GiB")
    print(f"prompts: yes_no + caption of {report['workload']['prompts'][1]['max_new_tokens']} tokens max; caption "
          f"token counts equal on all sides: {report['workload']['caption_token_counts_equal']}")
    print(f"{'variant':14} {'s/window':>9} {'RTF':>7} {'speedup':>8} {'peak RSS MB':>12} {'of ref':>7} "
          f"{'load s':>7} {'windows kept':>13}")
    for v, r in report["results"].items():
        kept = ("all starved" if r["all_windows_starved"]
                else f"{r['timed_windows'] - r['starved_windows_excluded']}/{r['timed_windows']}")
        load = f"{r['load_seconds_median']:7.1f}" if "load_seconds_median" in r else f"{'(same)':>7}"
        print(f"{v:14} {r['seconds_per_window_median']:9.3f} {r['real_time_factor']:7.4f} "
              f"{r['speedup_vs_reference']:7.2f}x {r['peak_rss_mb']:12.0f} {r['peak_rss_fraction_of_reference']:7.2f} "
              f"{load} {kept:>13}")
    print("\nsplit (s, median):")
    for v, r in report["results"].items():
        split = ", ".join(f"{k} {val:.3f}" for k, val in r["split_seconds_median"].items())
        dec = r.get("decode_seconds_per_token_median")
        print(f"  {v:14} {split}" + (f"; decode {dec * 1e3:.1f} ms/token" if dec else ""))
    b = report["build"]
    print(f"\nbundle build ({'cached' if b.get('reused') else 'this run'}): {b['build_seconds']:.0f} s, peak RSS "
          f"{b['build_peak_rss_mb']:.0f} MB" + (f"; preset written in {b['preset_write_seconds']:.0f} s"
                                                if "preset_write_seconds" in b else ""))
    fs = report["file_sizes"]
    print("files (MB): " + ", ".join(f"{k} {v}" for k, v in fs["bundle_files_mb"].items())
          + f"; reference checkpoint {fs['reference_checkpoint_mb']}")
    proj = report["projection_by_caption_tokens"]
    print("projected edge_int8 speedup by caption length (linear in decode cost): "
          + ", ".join(f"{n} tokens {p.get('edge_int8_speedup', '?')}x" for n, p in proj.items()))
    for aim, ok in report["aims"].items():
        print(f"aim {aim}: {ok if isinstance(ok, str) else 'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
