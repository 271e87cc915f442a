"""Which int8 scheme keeps the audio encoder accurate on every CPU? Measure, don't guess.

The same int8 graph gives different numbers on different CPUs (edge/cpu.py): x86 without VNNI sums pairs of u8 x s8
products in a saturating int16. This script exports the tiny and small presets' audio side to fp32 ONNX, quantizes it
with each candidate scheme, and measures mean and minimum cosine to the PyTorch float32 reference, plus latency, on:
- this machine's CPU (native), and
- an AVX2-only CPU without VNNI or AVX-512, emulated by qemu-user (`-cpu Haswell-v4`; `apt-get install qemu-user`):
  onnxruntime picks its kernels from CPUID, which qemu answers as that CPU, so the emulated run takes the
  saturating AVX2 path exactly as a real AVX2-only machine would (latency under emulation is not reported).

    PYTHONPATH=. python benchmarks/int8_schemes.py                 # -> benchmarks/results/int8_schemes.json
    PYTHONPATH=. python benchmarks/int8_schemes.py --presets tiny  # seconds

Schemes:
  dyn-s8         dynamic, s8 weights per channel, no reduce_range (the scheme before this measurement)
  dyn-s8-rr      dynamic, s8 weights per channel, reduce_range (7-bit weights: no saturation possible)
  dyn-u8u8       dynamic, u8 weights per channel (u8 x u8: no saturation)
  qdq-s8s8       static QDQ, symmetric s8 activations and weights, per channel, calibrated on audio (what TensorRT runs)
  qdq-u8s8       static QDQ, u8 activations, s8 weights, per channel, calibrated on audio
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
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SCHEMES = ("dyn-s8", "dyn-s8-rr", "dyn-u8u8", "qdq-s8s8", "qdq-u8s8")
QEMU_CPU = "Haswell-v4"


def _inputs(frames: int, mel: int, count: int) -> dict:
    """Evaluation inputs, disjoint from the calibration set (other seeds): the export's verification inputs plus
    chirps at other seeds and loudness, and a tone-rich clip."""
    from export.onnx_export import reference_features, synthetic_chirp, verification_inputs

    x = verification_inputs(frames, mel, seed=0)
    for i in range(count):
        x[f"chirp{i + 1}"] = reference_features(synthetic_chirp(seed=100 + i) * (0.3 + 0.6 * i / max(1, count - 1)))
    return x


def build(preset: str, work: Path, schemes) -> dict:
    import torch

    from export.checkpoint import load_audio_model, open_checkpoint
    from export.int8 import quantize
    from export.onnx_export import export_fp32
    from export.tiny_model import write_naturelm_dir
    from tests.conftest import LLAMA_TINY

    llama = LLAMA_TINY if preset == "tiny" else {"hidden_size": 2048, "num_attention_heads": 32,
                                                  "num_key_value_heads": 8, "num_hidden_layers": 16}
    naturelm = write_naturelm_dir(work / "naturelm", preset, 1, llama)
    model = load_audio_model(open_checkpoint(naturelm))
    frames, mel = 998, 128
    x = _inputs(frames, mel, 4 if preset == "tiny" else 2)
    with torch.no_grad():
        refs = {k: model(torch.from_numpy(v)).numpy() for k, v in x.items()}
    np.savez(work / "data.npz", **{f"input.{k}": v for k, v in x.items()}, **{f"reference.{k}": v for k, v in refs.items()})
    fp32 = work / "fp32.onnx"
    export_fp32(model, fp32, frames, mel)
    times = {}
    for s in schemes:
        t0 = time.perf_counter()
        quantize(fp32, work / f"{s}.onnx", s)
        times[s] = round(time.perf_counter() - t0, 1)
    return {"quantize_s": times}


def measure(work: Path, schemes, timed: bool) -> dict:
    import onnxruntime as ort

    from edge.cpu import cpu_info
    from edge.selfcheck import compare

    data = np.load(work / "data.npz")
    names = [k[len("input."):] for k in data.files if k.startswith("input.")]
    out = {"cpu": cpu_info(), "onnxruntime": ort.__version__, "schemes": {}}
    for s in ("fp32",) + tuple(schemes):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(str(work / f"{s}.onnx"), sess_options=opts, providers=["CPUExecutionProvider"])
        cos_mean, cos_min, n = 0.0, 1.0, 0
        per = {}
        for name in names:
            y = sess.run(None, {"fbank": data[f"input.{name}"]})[0]
            m = compare(y, data[f"reference.{name}"])
            k = y.shape[0] * y.shape[1]
            cos_mean += m["mean_cosine"] * k
            n += k
            cos_min = min(cos_min, m["min_cosine"])
            per[name] = round(m["mean_cosine"], 6)
        entry = {"mean_cosine": round(cos_mean / n, 6), "min_cosine": round(cos_min, 6), "per_input": per,
                 "file_mb": round((work / f"{s}.onnx").stat().st_size / 2**20, 2)}
        if timed:
            x = data["input.chirp"]
            sess.run(None, {"fbank": x})
            t = []
            for _ in range(5):
                t0 = time.perf_counter()
                sess.run(None, {"fbank": x})
                t.append(time.perf_counter() - t0)
            entry["ms_per_clip_median"] = round(1000 * float(np.median(t)), 1)
        out["schemes"][s] = entry
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small", help="comma-separated: tiny, small (default both)")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--no-emulation", action="store_true", help="skip the qemu AVX2-only run")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "int8_schemes.json")
    ap.add_argument("--measure-only", type=Path, help=argparse.SUPPRESS)  # internal: the run under qemu
    args = ap.parse_args(argv)
    schemes = [s for s in args.schemes.split(",") if s]
    if args.measure_only:
        print(json.dumps(measure(args.measure_only, schemes, timed=False)))
        return 0
    result = {"script": "benchmarks/int8_schemes.py", "machine_shared": True, "presets": {}}
    qemu = shutil.which("qemu-x86_64") if platform.machine() == "x86_64" and not args.no_emulation else None
    for preset in args.presets.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"int8-{preset}-"))
        try:
            print(f"[{preset}] export and quantize", flush=True)
            entry = build(preset, work, schemes)
            print(f"[{preset}] measure on this CPU", flush=True)
            entry["native"] = measure(work, schemes, timed=True)
            if qemu:
                print(f"[{preset}] measure on an emulated {QEMU_CPU} (AVX2, no VNNI): slow", flush=True)
                env = dict(os.environ, PYTHONPATH=str(HERE.parent))
                proc = subprocess.run([qemu, "-cpu", QEMU_CPU, sys.executable, __file__, "--measure-only", str(work),
                                       "--schemes", ",".join(schemes)], check=False, capture_output=True,
                                      text=True, env=env)
                if proc.returncode != 0:
                    raise SystemExit(f"the emulated run failed:\n{proc.stderr[-3000:]}")
                emu = json.loads(proc.stdout.strip().splitlines()[-1])
                emu["cpu"] = {"emulated": f"qemu-x86_64 -cpu {QEMU_CPU}", "int8_kernel": "x86-avx2-saturating-u8s8"}
                entry["emulated_avx2"] = emu
            result["presets"][preset] = entry
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _table(preset, result["presets"][preset])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def _table(preset: str, entry: dict) -> None:
    native = entry["native"]
    emu = entry.get("emulated_avx2")
    print(f"\n{preset}: scheme | {native['cpu']['int8_kernel']} mean/min cosine | ms | AVX2 (emulated) mean/min")
    for s, m in native["schemes"].items():
        e = emu["schemes"][s] if emu else None
        print(f"  {s:10s} | {m['mean_cosine']:.6f} / {m['min_cosine']:.6f} | {m.get('ms_per_clip_median', '-'):>7} | "
              + (f"{e['mean_cosine']:.6f} / {e['min_cosine']:.6f}" if e else "-"))


if __name__ == "__main__":
    sys.exit(main())
