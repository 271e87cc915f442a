"""A GPU board whose model ends up on the CPU says so: the daemon (a subprocess, the real pipeline on the tiny bundle,
a real mosquitto) configured for the CUDA provider, on this machine without one, reopens the model on the CPU and
keeps recording, and the retained status turns `degraded` with the reason `gpu_fallback`; health says why. Also the
probe (`naturelm-edge gpu-check`) and the reason's rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mqtt_broker import Subscriber
from test_daemon_e2e import _config, _wav

from edge.config import BundleConfig
from edge.gpu_check import Probe, expects_gpu, fallback_reason, probe_nodes

ROOT = Path(__file__).resolve().parents[1]


def _needs_cpu_only_machine():
    from edge.encoder import available_providers
    from edge.llm import gpu_offload_supported

    if {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(available_providers()) or gpu_offload_supported():
        pytest.skip("this machine has a GPU build: the fallback is tested where the GPU is absent")


@pytest.mark.parametrize("bundle_over, expect", [
    ({"provider": "cuda"}, ("opening on the GPU failed (cuda was requested, but this onnxruntime build has no "
                            "CUDAExecutionProvider")),
    ({"provider": "auto", "expect_gpu": True}, "onnxruntime has no GPU provider ("),
])
def test_gpu_board_on_the_cpu_is_degraded(tiny_full_bundle, mqtt_broker, daemons, tmp_path,
                                          bundle_over, expect):
    _needs_cpu_only_machine()
    wav = _wav(tmp_path / "a.wav", 4.0)
    cfg = _config(tmp_path, tiny_full_bundle, mqtt_broker.port,
                  {"type": "file", "file": {"path": str(wav), "realtime": False}})
    data = yaml.safe_load(cfg.read_text())
    data["bundle"].update(bundle_over)
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    sub = Subscriber(mqtt_broker.port, ["naturelm/#"])
    d = daemons(cfg)
    assert d.wait(120) == 0, d.log
    sub.wait_for(lambda s: s.on("/status")[-1:] == ["stopped"], what="stopped")

    # It kept recording on the CPU: every window answered.
    events = sub.events()
    assert events and all(e["model"]["encoder_provider"] == "cpu" for e in events)
    status = sub.on("/status")
    assert "degraded" in status and "online" not in status[1:-1], status
    reasons = json.loads(sub.on("/degraded")[-1])["reasons"]
    assert list(reasons) == ["gpu_fallback"]
    why = reasons["gpu_fallback"]["reason"]
    # llama.cpp reports what it loaded onto the GPU (0 of the tiny model's 3 layers), and the reason says so.
    assert why.startswith("the audio encoder and the LLM (0 of 3 layers on the GPU) on the CPU: "), why
    assert expect in why and "llama.cpp was built without GPU offload" in why
    assert "CUDA driver:" in why  # the probe from inside the daemon's process
    health = [json.loads(p) for p in sub.on("/health")]
    assert health[-1]["status"] == "degraded"
    assert health[-1]["degraded"]["gpu_fallback"]["reason"] == why
    assert health[-1]["model"]["gpu"]["expected"] is True and health[-1]["model"]["gpu"]["fallback"] == why
    assert "gpu_fallback: the audio encoder" in d.log and "Traceback" not in d.log
    sub.close()


def test_cpu_board_stays_online(tiny_full_bundle, mqtt_broker, daemons, tmp_path):
    """provider cpu (a board without a GPU, not a Jetson): the CPU is what was asked for, nothing is degraded."""
    if Path("/etc/nv_tegra_release").exists():
        pytest.skip("a Jetson expects its GPU")
    wav = _wav(tmp_path / "a.wav", 3.0)
    cfg = _config(tmp_path, tiny_full_bundle, mqtt_broker.port,
                  {"type": "file", "file": {"path": str(wav), "realtime": False}})
    sub = Subscriber(mqtt_broker.port, ["naturelm/#"])
    d = daemons(cfg)
    assert d.wait(120) == 0, d.log
    sub.wait_for(lambda s: s.on("/status")[-1:] == ["stopped"], what="stopped")
    assert "degraded" not in sub.on("/status")
    health = json.loads(sub.on("/health")[-1])
    assert health["degraded"] == {} and health["model"]["gpu"]["expected"] is False
    sub.close()


def test_expects_gpu():
    b = BundleConfig(path=Path("."))
    assert not expects_gpu(b, jetson=False)
    assert expects_gpu(b, jetson=True)
    assert expects_gpu(BundleConfig(path=Path("."), provider="tensorrt"), jetson=False)
    assert expects_gpu(BundleConfig(path=Path("."), n_gpu_layers=-1), jetson=False)
    assert not expects_gpu(BundleConfig(path=Path("."), expect_gpu=False), jetson=True)
    assert expects_gpu(BundleConfig(path=Path("."), expect_gpu=True), jetson=False)


def test_fallback_reason_rules():
    gpu = Probe(nodes={"/dev/nvmap": "ok"}, cuda_driver="ok: 1 device(s)",
                onnxruntime=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                llama_gpu_offload=True)
    b = BundleConfig(path=Path("."))
    on_gpu = {"encoder_provider": "tensorrt", "llm_offload": "all", "llm_gpu_layers": "17/17"}
    assert fallback_reason(b, on_gpu, gpu) is None
    # llama.cpp loaded only part of the model onto the GPU.
    r = fallback_reason(b, {**on_gpu, "llm_gpu_layers": "9/17"}, gpu)
    assert r.startswith("the LLM (9 of 17 layers on the GPU) on the CPU")
    r = fallback_reason(b, {"encoder_provider": "cuda", "llm_offload": "0/17"}, gpu)
    assert r.startswith("the LLM (0 of 17 layers on the GPU) on the CPU")
    # The sandbox refused nvmap: the reason names the node and the unit setting.
    refused = Probe(nodes={"/dev/nvmap": "EPERM: the unit's DeviceAllow= does not include it"},
                    cuda_driver="cuInit failed with 801: operation not supported", onnxruntime=gpu.onnxruntime,
                    llama_gpu_offload=True)
    r = fallback_reason(b, {"encoder_provider": "cpu", "llm_offload": "all"}, refused, "cuda: no device")
    assert "the audio encoder on the CPU" in r and "/dev/nvmap (EPERM" in r and "cuInit failed with 801" in r
    assert "opening on the GPU failed (cuda: no device)" in r
    # What the config asks for is not a fallback: provider cpu, n_gpu_layers 0.
    asked = BundleConfig(path=Path("."), provider="cpu", n_gpu_layers=0, expect_gpu=True)
    assert fallback_reason(asked, {"encoder_provider": "cpu", "llm_offload": "0"}, refused) is None
    # int8 is the CPU's graph: auto runs it on the CPU by design, which is no fallback (the LLM still counts).
    cpu_int8 = BundleConfig(path=Path("."), encoder_precision="int8")
    assert fallback_reason(cpu_int8, {**on_gpu, "encoder_provider": "cpu"}, gpu) is None
    assert fallback_reason(cpu_int8, {"encoder_provider": "cpu", "llm_gpu_layers": "0/17"}, gpu).startswith("the LLM")


def test_probe_reports_a_node_that_cannot_be_opened(tmp_path):
    """A node the process cannot open is named with its errno (here ENXIO: a major no driver holds; inside the unit
    a refused node gives EPERM, and the reason says it is the DeviceAllow=)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make device nodes")
    os.mknod(tmp_path / "nvmap", 0o600 | 0o020000, os.makedev(1, 3))  # /dev/null's numbers: opens
    os.mknod(tmp_path / "host1x-fence", 0o600 | 0o020000, os.makedev(511, 77))  # no driver there
    (tmp_path / "dri").mkdir()
    os.mknod(tmp_path / "dri" / "renderD128", 0o600 | 0o020000, os.makedev(511, 78))
    got = probe_nodes(tmp_path)
    assert got[str(tmp_path / "nvmap")] == "ok"
    assert got[str(tmp_path / "host1x-fence")].startswith("ENXIO")
    assert got[str(tmp_path / "dri" / "renderD128")].startswith("ENXIO")
    p = Probe(nodes=got, cuda_driver="libcuda.so.1 not found (no NVIDIA driver here)")
    assert "device nodes refused: " in p.summary() and "renderD128 (ENXIO" in p.summary()


def test_gpu_check_cli_on_a_cpu_machine():
    _needs_cpu_only_machine()
    r = subprocess.run([sys.executable, "-m", "edge.cli", "gpu-check", "--json"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT, check=False)
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert out["gpu_ready"] is False and out["llama_gpu_offload"] is False
    assert "CPUExecutionProvider" in out["onnxruntime"] and "CUDAExecutionProvider" not in out["onnxruntime"]
    r = subprocess.run([sys.executable, "-m", "edge.cli", "gpu-check"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, check=False)
    assert r.returncode == 1 and "GPU NOT ready: " in r.stdout and "FAIL  llama.cpp GPU offload: False" in r.stdout
