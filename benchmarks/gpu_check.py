"""The GPU check anyone with an NVIDIA GPU can run (an x86 machine with CUDA, or a Jetson): the project's own encoder
and LLM code on CUDA and TensorRT, compared with the CPU, timed, with the peak GPU memory of each run, as JSON.

    PYTHONPATH=. python benchmarks/gpu_check.py [--install] [--work /tmp/naturelm-gpu-check] [--windows 5]

What it does:
  1. refuses, in one line and exit status 2, where the CUDA driver finds no GPU (nothing is built or written then);
  2. with --install, puts the CUDA builds into this Python environment: onnxruntime-gpu (with its CUDA/cuDNN
     wheels) and TensorRT's libraries from PyPI in place of the CPU onnxruntime, and llama-cpp-python rebuilt with
     CMAKE_ARGS=-DGGML_CUDA=on (needs nvcc). On a Jetson use scripts/install-jetson.sh instead (it refuses --install);
  3. builds the `small` preset (production-shaped, random weights) and its bundle once into --work: `naturelm-edge
     build --precision fp32,fp16,int8 --type Q4_K_M` (--precision; needs the workstation extra:
     pip install -e '.[export]');
  4. audio encoder (edge.encoder.AudioEncoder, what the daemon runs): the CPU fp32 run is the reference; then every
     precision of the bundle on CUDA and on TensorRT (fp16 kernels; TensorRT's int8 as edge/encoder.py configures
     it). Per variant: open + engine build time, warm-up, median ms per 10 s window, cosine and max |diff| of the
     embeddings against the CPU fp32 ones, peak GPU memory;
  5. LLM (edge.llm.LlmEngine on the bundle's Q4_K_M): all layers offloaded against n_gpu_layers 0: the logits of a
     yes/no question after the audio prefix (max |diff|, same top-1 token, P(Yes) both ways), a 16-token greedy
     caption (tokens identical?), prefix / prompt / decode timings, peak GPU memory;
  6. prints the JSON and saves it to benchmarks/results/gpu_check.json (--out).

Every variant runs in its own child process (fresh CUDA context, so the peak memory is that variant's). Peak GPU
memory: the child's own use from NVML (pynvml) where it answers; else the device's used memory from nvidia-smi,
less the idle baseline; on a Jetson (unified memory, no NVML on JetPack 6) the drop of MemAvailable in /proc/meminfo
while the child runs. The JSON names the method used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "gpu_check.json"
QTYPE = "Q4_K_M"
PRECISIONS = "fp32,fp16,int8"
PROVIDERS = ("cuda", "tensorrt")
YES_NO = "Is there a bird singing in the audio? Answer Yes or No."
CAPTION = "Caption the audio."
CAPTION_TOKENS = 16
REFUSED = 2  # exit status where there is no GPU


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def cuda_status() -> tuple[bool, str]:
    """(a GPU is usable, the CUDA driver's answer). Reads libcuda directly: no onnxruntime, torch or llama.cpp."""
    sys.path.insert(0, str(REPO))
    from edge.gpu_check import cuda_driver

    text = cuda_driver()
    return text.startswith("ok"), text


def is_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists()


# --- 2. the CUDA builds ------------------------------------------------------------------------------------------


def install(py: str) -> None:
    if is_jetson():
        raise SystemExit("gpu_check: on a Jetson the CUDA builds come from NVIDIA's Jetson wheels: run "
                         "scripts/install-jetson.sh (then this script without --install)")
    import importlib.metadata as md

    def pip(*args: str, env: dict | None = None) -> None:
        log("pip " + " ".join(args))
        subprocess.run([py, "-m", "pip", *args], check=True, env={**os.environ, **(env or {})})

    llama = md.version("llama_cpp_python")
    pip("uninstall", "-y", "onnxruntime")
    # The CUDA 12 / cuDNN 9 runtime libraries as wheels (the extras), and TensorRT 10's libraries for its provider.
    pip("install", "onnxruntime-gpu[cuda,cudnn]", "tensorrt-cu12-libs>=10,<11")
    if not shutil.which("nvcc") and not Path("/usr/local/cuda/bin/nvcc").exists():
        raise SystemExit("gpu_check: nvcc not found: llama-cpp-python needs the CUDA toolkit to build with CUDA")
    pip("install", "--force-reinstall", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python",
        f"llama-cpp-python=={llama}",
        env={"CMAKE_ARGS": "-DGGML_CUDA=on", "FORCE_CMAKE": "1",
             "CUDACXX": shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc",
             "CMAKE_BUILD_PARALLEL_LEVEL": str(max(1, (os.cpu_count() or 2) // 2))})


def child_env() -> dict:
    """TensorRT's pip libraries on the loader path of the children (onnxruntime's TensorRT provider dlopens
    libnvinfer); the CUDA/cuDNN wheels are loaded by onnxruntime.preload_dlls() in the child."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        import importlib.util

        spec = importlib.util.find_spec("tensorrt_libs")
        if spec is not None and spec.submodule_search_locations:
            libdir = next(iter(spec.submodule_search_locations))
            env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    except ImportError:
        pass
    return env


# --- 3. the small preset and its bundle ----------------------------------------------------------------------------


def prepare(work: Path, py: str, precisions: str) -> Path:
    bundle = work / "small-bundle"
    sys.path.insert(0, str(REPO))
    from edge.bundle import load_bundle
    from edge.errors import NatureLMEdgeError

    try:
        m = load_bundle(bundle, verify="size").manifest
        if set(precisions.split(",")) <= set(m["audio"]["encoders"]) and QTYPE in m["llm"]["models"]:
            log(f"reusing the bundle in {bundle}")
            return bundle
    except (NatureLMEdgeError, KeyError):
        pass
    small = work / "small"
    if not all((small / d / "model.safetensors").is_file() for d in ("naturelm", "llama")):
        log(f"writing the small preset into {small} (minutes)")
        subprocess.run([py, "-m", "edge.cli", "tiny-model", str(small), "--preset", "small"], check=True,
                       env=child_env(), cwd=REPO)
    partial = work / "small-bundle.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(bundle, ignore_errors=True)
    log("building the bundle (minutes)")
    subprocess.run([py, "-m", "edge.cli", "build", "--naturelm", str(small / "naturelm"), "--llama",
                    str(small / "llama"), "--out", str(partial), "--type", QTYPE, "--precision", precisions,
                    "--no-quality", "--no-progress"], check=True, env=child_env(), cwd=REPO)
    partial.rename(bundle)
    return bundle


# --- peak GPU memory of a child -------------------------------------------------------------------------------------


class MemorySampler:
    """Samples every 50 ms while a child runs; .peak_mb() after .stop()."""

    def __init__(self, pid: int):
        self.pid = pid
        self.samples: list[float] = []
        self.method = None
        self._stop = threading.Event()
        self._read, self.baseline = self._pick()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _pick(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)

            def read():
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                    if p.pid == self.pid and p.usedGpuMemory is not None:
                        return p.usedGpuMemory / 2**20
                return 0.0

            self.method = "NVML: the child process's own GPU memory"
            return read, 0.0
        except Exception as e:  # noqa: BLE001 - no NVML (not installed, or a Jetson): the next method
            log(f"NVML not used ({type(e).__name__}: {e})")
        if shutil.which("nvidia-smi") and not is_jetson():
            def read():
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5, check=False).stdout
                return float(out.strip().splitlines()[0]) if out.strip() else 0.0

            self.method = "nvidia-smi: the device's used memory less the idle baseline"
            return read, read()

        def read():
            info = {ln.split(":")[0]: int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                    if ln.startswith(("MemTotal", "MemAvailable"))}
            return (info["MemTotal"] - info["MemAvailable"]) / 1024

        self.method = "unified memory: MemTotal - MemAvailable (/proc/meminfo) less the idle baseline"
        return read, read()

    def _run(self):
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a missed sample, not a failed check
                self.samples.append(self._read())
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()

    def peak_mb(self) -> float | None:
        return round(max(self.samples) - self.baseline, 1) if self.samples else None


def run_child(args: list[str], py: str) -> dict:
    """One variant in a fresh process; its JSON (last stdout line) with the peak GPU memory added."""
    proc = subprocess.Popen([py, str(Path(__file__).resolve()), "--child", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(), cwd=REPO)
    sampler = MemorySampler(proc.pid)
    out, err = proc.communicate()
    sampler.stop()
    if proc.returncode != 0:
        tail = (err.strip().splitlines() or ["(no output)"])[-1]
        return {"ok": False, "error": tail, "returncode": proc.returncode}
    result = json.loads(out.strip().splitlines()[-1])
    result.update(ok=True, peak_gpu_memory_mb=sampler.peak_mb(), memory_method=sampler.method)
    return result


# --- the children ----------------------------------------------------------------------------------------------------


def _preload() -> None:
    try:
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21: CUDA/cuDNN from their pip wheels
            ort.preload_dlls()
    except Exception as e:  # noqa: BLE001 - the session creation below says what is missing
        log(f"onnxruntime.preload_dlls failed: {e}")


def _features(bundle_dir: Path, windows: int):
    import numpy as np

    from edge.bundle import load_bundle
    from edge.frontend import AudioFrontEnd
    from edge.spec import FbankSpec, ResamplerSpec
    from edge.synth import birdsong

    audio = load_bundle(bundle_dir, verify="none").section("audio")
    sinc = ResamplerSpec.from_dict(audio["resampler"]) if "resampler" in audio else ResamplerSpec()
    fe = AudioFrontEnd(FbankSpec.from_dict(audio["fbank"]), float(audio["clip_seconds"]), sinc=sinc)
    sr = int(audio["sample_rate"])
    secs = float(audio["clip_seconds"])
    return np.stack([fe.features(birdsong(secs, sr, seed=i), sr, name=f"window {i}")[0] for i in range(windows)])


def child_encoder(bundle_dir: Path, provider: str, precision: str, windows: int, state: Path, ref: Path | None):
    import numpy as np

    _preload()
    from edge.encoder import AudioEncoder

    feats = _features(bundle_dir, windows)
    t0 = time.perf_counter()
    enc = AudioEncoder(bundle_dir, precision=precision, provider=provider, state_dir=state, warmup=True)
    open_s = time.perf_counter() - t0
    times, outs = [], []
    for i in range(windows):
        t = time.perf_counter()
        outs.append(enc.encode(feats[i:i + 1])[0])
        times.append((time.perf_counter() - t) * 1e3)
    emb = np.stack(outs)
    res = {"provider": enc.provider, "precision": precision, "session": enc.session.get_providers(),
           "open_and_warmup_s": round(open_s, 2), "encode_ms_median": round(statistics.median(times), 2),
           "encode_ms_all": [round(t, 2) for t in times]}
    if ref is None:
        np.save(state / "cpu_fp32_embeddings.npy", emb)
    else:
        r = np.load(ref)
        a, b = emb.reshape(len(emb), -1, emb.shape[-1]), r.reshape(len(r), -1, r.shape[-1])
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
        res.update(cosine_mean=round(float(cos.mean()), 5), cosine_min=round(float(cos.min()), 5),
                   max_abs_diff=round(float(np.abs(emb - r).max()), 5))
    print(json.dumps(res))


def child_llm(bundle_dir: Path, gpu: bool, state: Path, ref: Path | None):
    import numpy as np

    from edge.bundle import load_bundle
    from edge.llm import EngineOptions, LlmEngine, Prompt

    audio = np.load(state / "cpu_fp32_embeddings.npy")[0]
    bundle = load_bundle(bundle_dir, verify="none")
    t0 = time.perf_counter()
    eng = LlmEngine.from_bundle(bundle, EngineOptions(model_type=QTYPE, n_gpu_layers=-1 if gpu else 0))
    load_s = time.perf_counter() - t0
    logits = eng.prompt_logits(audio, YES_NO)
    prefix_ms = eng.set_audio(audio)
    yn = eng.ask(Prompt(id="yn", kind="yes_no", question=YES_NO))
    cap = eng.ask(Prompt(id="cap", kind="caption", question=CAPTION, max_new_tokens=CAPTION_TOKENS))
    t = cap.timings
    res = {"n_gpu_layers": eng.n_gpu_layers, "load_s": round(load_s, 2), "prefix_ms": round(prefix_ms, 1),
           "yes_no_ms": round(yn.timings.total_ms, 1), "p_yes": yn.score, "caption": cap.text,
           "caption_token_ids": list(cap.token_ids), "caption_prompt_ms": round(t.prompt_ms, 1),
           "caption_decode_ms": round(t.decode_ms, 1), "caption_decode_tokens": t.decode_tokens,
           "decode_tokens_per_s": round(t.decode_tokens / (t.decode_ms / 1e3), 1) if t.decode_ms else None}
    for name in ("gpu_layers", "offloaded_layers", "offload"):  # where the engine reports what llama.cpp did
        if hasattr(eng, name):
            res["offload_reported"] = str(getattr(eng, name))
    if ref is None:
        np.save(state / "cpu_llm_logits.npy", logits)
        (state / "cpu_llm.json").write_text(json.dumps(res))
    else:
        r = np.load(ref)
        cpu = json.loads((state / "cpu_llm.json").read_text())
        res.update(logits_max_abs_diff=round(float(np.abs(logits - r).max()), 4),
                   same_top1=bool(int(np.argmax(logits)) == int(np.argmax(r))),
                   p_yes_cpu=cpu["p_yes"], caption_same_as_cpu=list(cap.token_ids) == cpu["caption_token_ids"])
    eng.close()
    print(json.dumps(res))


# --- the report -------------------------------------------------------------------------------------------------------


def machine() -> dict:
    flags = set()
    model = platform.processor()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith(("flags", "Features")) and not flags:
                flags = set(ln.split(":", 1)[1].split())
            if ln.startswith("model name") and model in ("", platform.machine()):
                model = ln.split(":", 1)[1].strip()
    except OSError:
        pass
    info = {"cpu": model, "cpu_flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")},
            "machine": platform.machine(), "python": platform.python_version(), "jetson": is_jetson(),
            "note": "timings on a machine shared with other work are upper bounds"}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    try:
        import importlib.metadata as md

        info["llama_cpp_python"] = md.version("llama_cpp_python")
    except md.PackageNotFoundError:
        info["llama_cpp_python"] = None
    sys.path.insert(0, str(REPO))
    from edge.encoder import gpu_name, tensorrt_version

    info.update(gpu=gpu_name(), tensorrt=tensorrt_version())
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        info["nvidia_smi"] = out
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__,
        epilog="Exit status: 0 all variants ran; 1 a variant failed (in the JSON); 2 no GPU here (one line, nothing "
               "written).", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--install", action="store_true",
                    help="first put onnxruntime-gpu, TensorRT's libraries and a CUDA llama-cpp-python into this "
                         "environment (not on a Jetson: use scripts/install-jetson.sh)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/naturelm-gpu-check"),
                    help="the small preset, its bundle and the TensorRT engines (reused while complete)")
    ap.add_argument("--windows", type=int, default=5, help="encoder windows timed per variant (default 5)")
    ap.add_argument("--precision", default=PRECISIONS, metavar="LIST",
                    help=f"encoder precisions to build into the bundle (default {PRECISIONS}); every encoder the "
                         "bundle has is then run on each provider")
    ap.add_argument("--skip-llm", action="store_true", help="the encoder only")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"where the JSON goes (default {RESULTS})")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        kind, *rest = args.child
        if kind == "encoder":
            bundle, provider, precision, windows, state, ref = rest
            child_encoder(Path(bundle), provider, precision, int(windows), Path(state),
                          None if ref == "-" else Path(ref))
        else:
            bundle, gpu, state, ref = rest
            child_llm(Path(bundle), gpu == "gpu", Path(state), None if ref == "-" else Path(ref))
        return 0

    ok, why = cuda_status()
    if not ok:
        print(f"gpu_check: no usable NVIDIA GPU here ({why}); nothing was measured or written", file=sys.stderr)
        return REFUSED
    py = sys.executable
    if args.install:
        install(py)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    bundle = prepare(work, py, args.precision)
    state = work / "state"
    state.mkdir(exist_ok=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    precisions = sorted(manifest["audio"]["encoders"])  # all of them, a static int8 one included where built

    report: dict = {"what": "the project's encoder and LLM on CUDA and TensorRT against the CPU, small preset "
                            "(production-shaped, random weights)",
                    "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "machine": machine(), "cuda_driver": why, "bundle": str(bundle), "encoder": {}, "llm": {}}
    log("encoder: CPU fp32 (the reference)")
    report["encoder"]["cpu/fp32"] = run_child(["encoder", str(bundle), "cpu", "fp32", str(args.windows),
                                               str(state), "-"], py)
    ref = state / "cpu_fp32_embeddings.npy"
    for provider in PROVIDERS:
        for precision in precisions:
            log(f"encoder: {provider} {precision}")
            report["encoder"][f"{provider}/{precision}"] = run_child(
                ["encoder", str(bundle), provider, precision, str(args.windows), str(state), str(ref)], py)
    if not args.skip_llm and ref.exists():
        log("LLM: CPU (n_gpu_layers 0)")
        report["llm"]["cpu"] = run_child(["llm", str(bundle), "cpu", str(state), "-"], py)
        log("LLM: all layers on the GPU")
        report["llm"]["gpu"] = run_child(["llm", str(bundle), "gpu", str(state), str(state / "cpu_llm_logits.npy")],
                                         py)
    failed = [k for part in ("encoder", "llm") for k, v in report[part].items() if not v.get("ok")]
    report["failed"] = failed
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    log(f"saved {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
