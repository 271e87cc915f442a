"""Resampling one window on the device path: edge/resample.py (resampy's kaiser_best in numpy) against resampy itself.

Two questions. (1) What does the device pay per window? The front end resamples each 10 s window from the first
11 s of input (edge/frontend.py keeps 1 s past the clip for the filter's reach); the figure is milliseconds per
window at 48, 44.1 and 32 kHz, steady state (median of --runs calls; the filter table and per-length plan are built
on the first call and kept), in float64 (the device's choice) and float32, beside torchaudio's windowed sinc (the
legacy filter) and soxr HQ, and against the audio encoder's time per window (benchmarks/results/audio_encoder.json).
(2) Could the device take resampy itself? Each of the two runs in a fresh process: time to import, time of the first
call (resampy's includes numba's JIT compilation), steady-state time, and resident memory after import and after
the first call (VmRSS) and at peak (VmHWM), the interpreter and numpy included in both.

    PYTHONPATH=. python benchmarks/bench_resample.py [--rounds 3] [--runs 20]

Run it under `flock /work/.bench.lock` on shared build machines; the JSON says the machine was shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edge.cpu import cpu_info

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "resample.json"
MODEL_RATE = 16000
RATES = (48000, 44100, 32000)
SECONDS = 11.0  # what the front end resamples for one 10 s window


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _input(rate: int) -> np.ndarray:
    rng = np.random.default_rng(rate)
    t = np.arange(int(rate * SECONDS)) / rate
    x = 0.3 * rng.standard_normal(t.size) + 0.5 * np.sin(2 * np.pi * (500 * t + 300 * t**2))
    return np.clip(x, -1, 1).astype(np.float32)


def _median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(float(np.median(times)), 2)


def worker(which: str, runs: int) -> dict:
    """One fresh process: import, first call, steady state, memory."""
    x48 = _input(48000)
    x64 = x48.astype(np.float64)  # upstream hands resampy soundfile's float64
    rss0 = _status_mb("VmRSS")
    t0 = time.perf_counter()
    if which == "resampy":
        import resampy

        def call(x, rate, dtype=np.float64):
            return resampy.resample(x.astype(dtype), rate, MODEL_RATE)
    else:
        from edge.resample import resampy_resample

        def call(x, rate, dtype=np.float64):
            return resampy_resample(x, rate, MODEL_RATE, dtype=dtype)
    import_s = time.perf_counter() - t0
    rss_import = _status_mb("VmRSS")
    t0 = time.perf_counter()
    call(x64, 48000)
    first_s = time.perf_counter() - t0
    rss_first = _status_mb("VmRSS")
    out = {"import_s": round(import_s, 3), "first_call_s": round(first_s, 3),
           "rss_before_import_mb": round(rss0, 1), "rss_after_import_mb": round(rss_import, 1),
           "rss_after_first_call_mb": round(rss_first, 1), "steady_ms": {}}
    for rate in RATES:
        x = _input(rate)
        for dtype in (np.float64, np.float32):
            call(x, rate, dtype)  # plan for this length and rate
            out["steady_ms"][f"{rate}_{np.dtype(dtype).name}"] = _median_ms(
                lambda x=x, rate=rate, dtype=dtype: call(x, rate, dtype), runs)
    if which == "edge":
        import soxr

        from edge.frontend import AudioFrontEnd
        from edge.resample import sinc_resample
        from edge.spec import CLIP_SECONDS, FBANK

        fe = AudioFrontEnd(FBANK, CLIP_SECONDS)
        for rate in RATES:
            x = _input(rate)
            out["steady_ms"][f"{rate}_legacy_windowed_sinc_float32"] = _median_ms(
                lambda x=x, rate=rate: sinc_resample(x, rate, MODEL_RATE), runs)
            out["steady_ms"][f"{rate}_soxr_hq"] = _median_ms(
                lambda x=x, rate=rate: soxr.resample(x, rate, MODEL_RATE, "HQ"), runs)
            fe.features(x, rate)
            out["steady_ms"][f"{rate}_front_end_features_total"] = _median_ms(
                lambda x=x, rate=rate: fe.features(x, rate), runs)
    out["peak_rss_mb"] = round(_status_mb("VmHWM"), 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per implementation (default 3)")
    ap.add_argument("--runs", type=int, default=20, help="timed calls per figure in each process (default 20)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", choices=("edge", "resampy"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.runs)))
        return 0

    env = dict(os.environ, PYTHONPATH=str(REPO))
    # numpy's OpenBLAS starts a thread per core for any product above ~0.26 M multiply-adds; on a loaded machine
    # those threads wait on each other, so the device path is also timed with BLAS held to one thread.
    one = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    variants = {"edge": ("edge", env), "edge_blas_1_thread": ("edge", dict(env, **one)), "resampy": ("resampy", env)}
    rounds = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, (which, wenv) in variants.items():  # take turns, so that a burst of load lands on all of them
            print(f"round {r + 1}/{args.rounds}: {name}", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--worker", which, "--runs", str(args.runs)],
                                  capture_output=True, text=True, env=wenv, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{name} worker failed:\n{proc.stderr}")
            rounds[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def summary(rs: list) -> dict:
        keys = [k for k in rs[0] if k != "steady_ms"]
        s = {k: round(float(np.median([r[k] for r in rs])), 3) for k in keys}
        s["steady_ms_median_of_rounds"] = {k: round(float(np.median([r["steady_ms"][k] for r in rs])), 2)
                                           for k in rs[0]["steady_ms"]}
        return s

    results = {k: summary(v) for k, v in rounds.items()}
    encoder = {}
    enc_path = REPO / "benchmarks" / "results" / "audio_encoder.json"
    if enc_path.is_file():
        enc = json.loads(enc_path.read_text())["results"]
        encoder = {p: enc[p]["ms_per_window_median"] for p in ("fp32", "int8") if p in enc}
    ours = results["edge"]["steady_ms_median_of_rounds"]
    ours1 = results["edge_blas_1_thread"]["steady_ms_median_of_rounds"]
    import numba
    import resampy

    report = {
        "what": "resampling one 10 s window (11 s of input, as the front end keeps) to 16 kHz: edge/resample.py "
                "(resampy kaiser_best in numpy) vs resampy itself; each implementation in fresh processes",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": cpu_info(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__,
                    "resampy": resampy.__version__, "numba": numba.__version__,
                    "shared": "yes: a 2-core build VM shared with other work; timings are medians and noisy"},
        "method": f"{args.rounds} rounds, each a fresh process per implementation: import, one first call "
                  f"(48 kHz, float64), then for each rate and dtype one warm-up call and the median of {args.runs} "
                  "timed calls; figures are medians over rounds. RSS from /proc/self/status (VmRSS, VmHWM).",
        "results": results,
        "encoder_ms_per_window_small_preset": encoder,
        "share_of_encoder_48k_float64": {
            p: {"blas_default": round(ours["48000_float64"] / ms, 4),
                "blas_1_thread": round(ours1["48000_float64"] / ms, 4)}
            for p, ms in encoder.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    e, e1, r = results["edge"], results["edge_blas_1_thread"], results["resampy"]
    cpu = report["machine"]["cpu"]
    print(f"\n{cpu['model']}, {cpu['flags']}, int8 kernel {cpu['int8_kernel']}")
    print(f"{'':44}{'edge':>10}{'edge 1 thr':>12}{'resampy':>10}")
    for k in ("import_s", "first_call_s", "rss_after_import_mb", "rss_after_first_call_mb", "peak_rss_mb"):
        print(f"{k:44}{e[k]:>10}{e1[k]:>12}{r[k]:>10}")
    for k, v in ours.items():
        theirs = r["steady_ms_median_of_rounds"].get(k, "")
        print(f"{k + ' (ms)':44}{v:>10}{ours1[k]:>12}{theirs:>10}")
    print(f"share of the encoder's time per window at 48 kHz: {report['share_of_encoder_48k_float64']}")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
