"""Is the GPU reachable from *here*, and did the model end up on it?

Two questions the daemon asks at start, inside its systemd sandbox (which is where it matters: `doctor` runs from a
shell, outside the unit's DevicePolicy=closed, and may pass while the service is refused the GPU):

- `probe()`: can this process open the GPU's device nodes (a refused node says EPERM: the unit's DeviceAllow; EACCES:
  the file's group), does the CUDA driver initialise (`cuInit`), which onnxruntime providers and whether llama.cpp
  was built with GPU offload. `naturelm-edge gpu-check` prints it; the daemon puts it into the reason it reports.
- `fallback_reason(cfg, info, probe)`: on a board that should use the GPU (`bundle.expect_gpu`), a one-line reason
  when the audio encoder or the LLM runs on the CPU all the same, else None. The daemon raises it as the degraded
  reason `gpu_fallback`, so the retained status says `degraded` and health says why.

Nothing here changes what runs where; edge/encoder.py still reads back the provider a session actually got.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

#: The nodes CUDA opens on a Jetson (see edge/jetson_devices.py for the sources) or on a discrete GPU. Only these are
#: opened by the probe: the driver's debugger and profiler nodes start sessions when opened, and are left alone.
PROBE_NODES = ("nvmap", "host1x-fence", "nvgpu/igpu0/ctrl", "nvgpu/igpu0/power", "nvhost-ctrl-gpu", "nvhost-ctrl",
               "nvidiactl", "nvidia0", "nvidia-uvm")
#: cuInit's results that tell a person something (cuda.h).
_CU_ERRORS = {100: "no CUDA-capable device (CUDA_ERROR_NO_DEVICE)",
              101: "invalid device (CUDA_ERROR_INVALID_DEVICE)",
              304: "the OS refused the call (CUDA_ERROR_OPERATING_SYSTEM)",
              801: "operation not supported (CUDA_ERROR_NOT_SUPPORTED: on a Jetson, typically no access to "
                   "/dev/dri/renderD*)",
              999: "unknown error (CUDA_ERROR_UNKNOWN)",
              3: "not initialised (CUDA_ERROR_NOT_INITIALIZED)",
              35: "the driver is older than the CUDA runtime (CUDA_ERROR_INSUFFICIENT_DRIVER)"}


_OFFLOAD_KEYS = ("llm_gpu_layers", "llm_layers_offloaded", "llm_offloaded", "llm_offload")


@dataclass
class Probe:
    nodes: dict[str, str] = field(default_factory=dict)  # path -> "ok" | "EPERM ..." | ...
    cuda_driver: str = "not checked"  # "ok: N device(s)" or why not
    onnxruntime: list[str] = field(default_factory=list)
    llama_gpu_offload: bool | None = None
    jetson: bool = False

    @property
    def refused(self) -> list[str]:
        return [f"{p} ({why})" for p, why in self.nodes.items() if why != "ok"]

    @property
    def gpu_ready(self) -> bool:
        ort_gpu = bool({"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(self.onnxruntime))
        return self.cuda_driver.startswith("ok") and not self.refused and ort_gpu and bool(self.llama_gpu_offload)

    def summary(self) -> str:
        """One line: what stands between this process and the GPU."""
        parts = []
        if self.refused:
            parts.append("device nodes refused: " + ", ".join(self.refused))
        elif not self.nodes:
            parts.append("no GPU device nodes under /dev")
        parts.append(f"CUDA driver: {self.cuda_driver}")
        return "; ".join(parts)


def is_jetson(root: Path = Path("/")) -> bool:
    return (root / "etc" / "nv_tegra_release").exists()


def probe_nodes(dev: Path = Path("/dev")) -> dict[str, str]:
    out = {}
    paths = [dev / n for n in PROBE_NODES] + sorted((dev / "dri").glob("renderD*"))
    for p in paths:
        if not p.exists():
            continue
        try:
            fd = os.open(p, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            name = errno.errorcode.get(e.errno, str(e.errno))
            hint = {"EPERM": "the unit's DeviceAllow= does not include it",
                    "EACCES": "not in the node's group"}.get(name, e.strerror or "")
            out[str(p)] = f"{name}: {hint}"
        else:
            os.close(fd)
            out[str(p)] = "ok"
    return out


def cuda_driver() -> str:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "libcuda.so.1 not found (no NVIDIA driver here)"
    try:
        rc = int(cuda.cuInit(0))
        if rc != 0:
            return f"cuInit failed with {rc}: {_CU_ERRORS.get(rc, 'see cuda.h')}"
        n = ctypes.c_int()
        rc = int(cuda.cuDeviceGetCount(ctypes.byref(n)))
        if rc != 0:
            return f"cuDeviceGetCount failed with {rc}: {_CU_ERRORS.get(rc, 'see cuda.h')}"
        return f"ok: {n.value} device(s)" if n.value else "cuInit ok but no device"
    except AttributeError as e:
        return f"libcuda.so.1 lacks {e}"


def probe(dev: Path = Path("/dev")) -> Probe:
    p = Probe(nodes=probe_nodes(dev), cuda_driver=cuda_driver(), jetson=is_jetson())
    try:
        import onnxruntime as ort

        p.onnxruntime = list(ort.get_available_providers())
    except ImportError:
        p.onnxruntime = []
    try:
        from edge.llm import gpu_offload_supported

        p.llama_gpu_offload = bool(gpu_offload_supported())
    except Exception as e:  # noqa: BLE001 - a broken native library is a probe result, not a crash
        logger.debug("llama.cpp offload check failed: %s", e)
        p.llama_gpu_offload = None
    return p


def expects_gpu(bundle_cfg, jetson: bool) -> bool:
    """`bundle.expect_gpu`: true/false as given; auto: a Jetson, or a config that asks for a GPU provider or for
    offloaded LLM layers."""
    setting = getattr(bundle_cfg, "expect_gpu", None)
    if setting is not None:
        return bool(setting)
    asks = bundle_cfg.provider in ("tensorrt", "cuda") or bundle_cfg.n_gpu_layers not in (None, 0)
    return asks or jetson


def fallback_reason(bundle_cfg, info: dict, p: Probe, opened_error: str | None = None) -> str | None:
    """Why a board that should use the GPU runs (part of) the model on the CPU; None when it does not.

    What counts: the audio encoder on the CPU unless bundle.provider is cpu or the precision is int8 (the CPU's
    dynamically quantized graph, which runs on the CPU by design; int8-qdq is the GPU's); the LLM not (fully)
    offloaded unless bundle.n_gpu_layers is 0. info: the pipeline's info (encoder_provider; llm_offload as configured; where the
    engine reports it, llm_gpu_layers "N/M" layers offloaded). opened_error: the error that made the daemon reopen
    the model on the CPU."""
    where = []
    if (info.get("encoder_provider") == "cpu" and bundle_cfg.provider != "cpu"
            and bundle_cfg.encoder_precision != "int8"):
        where.append("the audio encoder")
    if bundle_cfg.n_gpu_layers != 0:
        # "N/M" layers offloaded, where the engine reports what llama.cpp did (whichever of these keys it uses).
        offloaded = next((str(info[k]) for k in _OFFLOAD_KEYS if "/" in str(info.get(k) or "")), "")
        n, sep, m = offloaded.partition("/")
        if sep and n.strip().isdigit() and m.strip().isdigit():
            if int(n) < int(m):
                where.append(f"the LLM ({n.strip()} of {m.strip()} layers on the GPU)")
        elif str(info.get("llm_offload")) == "0" or p.llama_gpu_offload is False:
            where.append("the LLM")
    if not where:
        return None
    why = []
    if opened_error:
        why.append(f"opening on the GPU failed ({opened_error})")
    if p.llama_gpu_offload is False and any(w.startswith("the LLM") for w in where):
        why.append("llama.cpp was built without GPU offload")
    gpu_eps = {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(p.onnxruntime)
    if where[0] == "the audio encoder" and not gpu_eps:
        why.append("onnxruntime has no GPU provider (" + ", ".join(p.onnxruntime or ["none"]) + ")")
    why.append(p.summary())
    text = f"{' and '.join(where)} on the CPU: " + "; ".join(why)
    return text if len(text) <= 600 else text[:597] + "..."


def _wants_gpu(bundle_cfg) -> bool:
    if bundle_cfg.provider != "cpu":
        return True
    if bundle_cfg.n_gpu_layers == 0:
        return False
    try:
        from edge.llm import gpu_offload_supported

        return bool(gpu_offload_supported())
    except Exception:  # noqa: BLE001 - no usable llama.cpp: nothing of the LLM is on a GPU either
        return False


def open_model(cfg, opener):
    """opener(cfg) -> pipeline, once more on the CPU (provider cpu, no LLM layers offloaded) when it fails on a
    board that expects the GPU. Returns (pipeline, the first error as text, or None). A model that fails on the
    CPU too raises that error: the problem is not the GPU."""
    from dataclasses import replace

    from edge.errors import NatureLMEdgeError

    try:
        return opener(cfg), None
    except NatureLMEdgeError as e:
        if not (expects_gpu(cfg.bundle, is_jetson()) and _wants_gpu(cfg.bundle)):
            raise
        first = str(e)
    logger.error("opening the model with the GPU failed (%s); opening it on the CPU instead", first)
    cpu = replace(cfg, bundle=replace(cfg.bundle, provider="cpu", n_gpu_layers=0))
    return opener(cpu), first


def report(cfg, info: dict, degraded, opened_error: str | None = None) -> str | None:
    """Probe from this process, note the result in info["gpu"], and raise (or clear) the degraded reason
    `gpu_fallback`. Returns the reason."""
    p = probe()
    expected = expects_gpu(cfg.bundle, p.jetson)
    reason = fallback_reason(cfg.bundle, info, p, opened_error) if expected else None
    info["gpu"] = {"expected": expected, "ready": p.gpu_ready, "cuda_driver": p.cuda_driver,
                   "refused_nodes": p.refused, "fallback": reason}
    if reason:
        logger.warning("gpu_fallback: %s", reason)
        degraded.set("gpu_fallback", reason)
    else:
        degraded.clear("gpu_fallback")
    return reason


def cmd_gpu_check(args: argparse.Namespace) -> int:
    p = probe(Path(args.dev))
    if args.json:
        print(json.dumps({**asdict(p), "gpu_ready": p.gpu_ready}, indent=2))
    else:
        for path, why in p.nodes.items():
            print(f"{'PASS' if why == 'ok' else 'FAIL'}  {path}: {why}")
        if not p.nodes:
            print(f"FAIL  no GPU device nodes under {args.dev}")
        print(f"{'PASS' if p.cuda_driver.startswith('ok') else 'FAIL'}  CUDA driver: {p.cuda_driver}")
        gpu_eps = [e for e in p.onnxruntime if e in ("TensorrtExecutionProvider", "CUDAExecutionProvider")]
        print(f"{'PASS' if gpu_eps else 'FAIL'}  onnxruntime providers: {', '.join(p.onnxruntime) or 'none'}")
        print(f"{'PASS' if p.llama_gpu_offload else 'FAIL'}  llama.cpp GPU offload: {p.llama_gpu_offload}")
        print("GPU ready" if p.gpu_ready else "GPU NOT ready: " + p.summary())
    return 0 if p.gpu_ready else 1


def register(sub) -> None:
    ap = sub.add_parser(
        "gpu-check",
        help="can this process reach the GPU? (device nodes, CUDA driver, onnxruntime providers, llama.cpp offload)",
        description=(
            "Open the GPU's device nodes, initialise the CUDA driver and list onnxruntime's providers and llama.cpp's "
            "GPU offload, from the process it runs in. Run it inside the service's sandbox to see what the daemon "
            "sees: systemd-run --wait --pipe -p User=naturelm -p DevicePolicy=closed ... or, simpler, read the "
            "daemon's `gpu_fallback` reason, which carries the same probe. Exit 0 when every GPU path works, 1 when "
            "not."
        ),
    )
    ap.add_argument("--dev", default="/dev", help="device directory (default /dev)")
    ap.add_argument("--json", action="store_true", help="print the probe as JSON")
    ap.set_defaults(func=cmd_gpu_check)


if __name__ == "__main__":  # pragma: no cover - `python -m edge.gpu_check` for a quick look
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    a = parser.parse_args(["gpu-check", *sys.argv[1:]])
    sys.exit(a.func(a))
