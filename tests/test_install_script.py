"""scripts/install-jetson.sh: valid bash, refuses a machine that is not a JetPack 6 Jetson, and in --dry-run prints the
install it would do (the GPU builds, the engine one-shot, the units, the doctor) without changing anything."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install-jetson.sh"


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False)


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], check=True)


def test_dry_run_prints_the_whole_install():
    r = _run("--dry-run", "--force", "--bundle", "/media/usb/bundle", "--start")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    steps = [line for line in out.splitlines() if line.startswith("[install-jetson]")]
    assert [s.split()[1] for s in steps] == [f"{i}/8" for i in range(1, 9)]
    assert r"CMAKE_ARGS=-DGGML_CUDA=on\ -DCMAKE_CUDA_ARCHITECTURES=87" in out  # llama.cpp with CUDA, for Orin
    assert "--index-url https://pypi.jetson-ai-lab.io/jp6/cu126 onnxruntime-gpu" in out
    assert "pip uninstall -y onnxruntime" in out
    assert out.index("uninstall -y onnxruntime") < out.index("onnxruntime-gpu")
    assert "systemctl start naturelm-edge-engine.service" in out  # the TensorRT engine, once
    assert "naturelm-edge doctor --config /etc/naturelm-edge/daemon.yaml" in out
    assert "systemctl enable --now naturelm-edge.service" in out
    assert "cp -r /media/usb/bundle /opt/naturelm-edge/bundle.new" in out


@pytest.mark.skipif(platform.machine() == "aarch64", reason="checks the refusal on a machine that is not a Jetson")
def test_refuses_a_machine_that_is_not_a_jetson():
    r = _run("--dry-run")
    assert r.returncode == 1
    assert "not a Jetson (aarch64)" in r.stderr
