"""scripts/install-jetson.sh: valid bash, refuses a machine that is not a JetPack 6 Jetson, and in --dry-run prints the
install it would do (the GPU builds, the engine one-shot, the units, the doctor) without changing anything. The
JetPack checks run on fixture boards (tests/fixtures/jetson/*: etc/nv_tegra_release, proc/device-tree/model,
proc/meminfo) through --board-root."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install-jetson.sh"
BOARDS = Path(__file__).parent / "fixtures" / "jetson"


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
    assert "--index-url https://pypi.jetson-ai-lab.io/jp6/cu126" in out
    assert "pip uninstall -y onnxruntime" in out
    assert out.index("uninstall -y onnxruntime") < out.index("jp6-cu126.lock")
    # The pinned wheels: downloaded into the cache with their hashes checked, installed from it alone.
    assert "pip download --no-deps --require-hashes --dest /opt/naturelm-edge/wheels" in out
    assert ("install --no-index --find-links /opt/naturelm-edge/wheels --require-hashes --no-deps --force-reinstall -r "
            f"{ROOT}/scripts/jetson/jp6-cu126.lock") in out
    assert "pip install --no-cache-dir --force-reinstall --no-deps /opt/naturelm-edge/wheels/llama_cpp_python-" in out
    # The credential file exists before the unit can start; the GPU drop-ins are written from the board.
    assert "install -m 0600 -o root -g root /dev/null /etc/naturelm-edge/mqtt-password" in out
    assert ("naturelm-edge jetson-devices --root / --write /etc/systemd/system/naturelm-edge.service.d --write "
            "/etc/systemd/system/naturelm-edge-engine.service.d") in out
    assert out.index("jetson-devices") < out.index("systemctl daemon-reload")
    assert "systemctl start naturelm-edge-engine.service" in out  # the TensorRT engine, once
    assert "naturelm-edge doctor --config /etc/naturelm-edge/daemon.yaml" in out
    assert "systemctl enable --now naturelm-edge.service" in out
    assert "cp -r /media/usb/bundle /opt/naturelm-edge/bundle.new" in out


@pytest.mark.skipif(platform.machine() == "aarch64", reason="checks the refusal on a machine that is not a Jetson")
def test_refuses_a_machine_that_is_not_a_jetson():
    r = _run("--dry-run")
    assert r.returncode == 1
    assert "not a Jetson (aarch64)" in r.stderr


def _board(*args, board: str | Path) -> subprocess.CompletedProcess:
    return _run("--dry-run", "--board-root", str(board), *args)


def _release_only(tmp_path, first_line: str) -> Path:
    (tmp_path / "etc").mkdir(parents=True, exist_ok=True)
    (tmp_path / "etc" / "nv_tegra_release").write_text(first_line + "\n")
    return tmp_path


def test_pins_are_hashed_and_numpy_stays_below_2():
    pins = ROOT / "scripts" / "jetson"
    assert "numpy<2" in [ln.strip() for ln in (pins / "constraints.txt").read_text().splitlines()]
    for lock in ("jp6-cu126.lock", "llama-cpp-python.lock"):
        reqs = [ln for ln in (pins / lock).read_text().splitlines() if "==" in ln and not ln.startswith("#")]
        hashes = re.findall(r"--hash=sha256:([0-9a-f]+)", (pins / lock).read_text())
        assert reqs and len(hashes) == len(reqs) and all(len(h) == 64 for h in hashes), lock
    assert "numpy==1.26.4" in (pins / "jp6-cu126.lock").read_text()


@pytest.mark.parametrize("board", sorted(p.name for p in BOARDS.iterdir()))
def test_supported_boards(board):
    r = _board("--start", board=BOARDS / board)
    assert r.returncode == 0, r.stderr
    assert "JetPack 6.1/6.2" in r.stdout and "supported" in r.stdout
    nano = "orin-nano" in board
    assert ("-DGGML_CUDA_NO_VMM=ON" in r.stdout) == nano  # the 8 GB Nano's VMM reservation fails
    jobs = int(re.search(r"CMAKE_BUILD_PARALLEL_LEVEL=(\d+)", r.stdout).group(1))
    if nano:
        assert jobs <= 2  # 7.3 GiB: one nvcc job per 3 GiB
    assert f"--root {BOARDS / board}" in r.stdout
    assert ("NvMap fix for CVE-2025-33177" in r.stdout) == board.endswith("36.4.7")


@pytest.mark.parametrize("line, reason", [
    ("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64", "JetPack 6.0 (CUDA 12.2, TensorRT 8.6)"),
    ("# R36 (release), REVISION: 2.0, GCID: 35084178, BOARD: generic, EABI: aarch64", "JetPack 6.0"),
    ("# R38 (release), REVISION: 2.0, GCID: 40000000, BOARD: generic, EABI: aarch64", "JetPack 7 (Ubuntu 24.04, Python 3.12, CUDA 13)"),
    ("# R35 (release), REVISION: 5.0, GCID: 35550185, BOARD: t186ref, EABI: aarch64", "JetPack 5 or older"),
    ("# R99 (release), REVISION: 1.0", "unknown JetPack release"),
    ("garbage", "cannot read the L4T release"),
])
def test_unsupported_releases_are_refused_with_the_reason(tmp_path, line, reason):
    r = _board(board=_release_only(tmp_path, line))
    assert r.returncode == 1
    assert reason in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr  # one line
    assert "2/8" not in r.stdout  # nothing after the refusal


def test_a_missing_release_file_is_named(tmp_path):
    r = _board(board=tmp_path)
    assert r.returncode == 1 and f"{tmp_path}/etc/nv_tegra_release not found" in r.stderr
