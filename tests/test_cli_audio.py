"""`naturelm-edge export` and `naturelm-edge build-engine` from the command line, errors included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from edge.bundle import load_bundle
from edge.cli import main
from edge.encoder import available_providers

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("naturelm-edge: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_export_end_to_end(tiny_model, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["export", "--naturelm", str(tiny_model[0]), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    for p in ("fp32", "fp16", "int8"):
        assert f"audio_encoder.{p}.onnx: mean cosine" in printed.out
    assert "export" in printed.err  # the progress bar
    bundle = load_bundle(out)
    assert sorted(bundle.section("audio")["encoders"]) == ["fp16", "fp32", "int8"]


def test_export_rejects_an_unknown_precision(tiny_model, tmp_path, capsys):
    assert main(["export", "--naturelm", str(tiny_model[0]), "--out", str(tmp_path / "b"), "--precision",
                 "fp32,bf16"]) == 2
    assert "unknown precision bf16" in capsys.readouterr().err


def test_build_engine_without_tensorrt_exits_nonzero(tiny_bundle, tmp_path):
    if "TensorrtExecutionProvider" in available_providers():
        import pytest

        pytest.skip("TensorRT is available here")
    proc = _cli("build-engine", "--bundle", str(tiny_bundle), "--state-dir", str(tmp_path / "state"))
    line = _one_error_line(proc)
    assert "TensorRT is not available" in line and "No engine was built" in line
    assert not (tmp_path / "state").exists()


def test_truncated_onnx_gives_one_line(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    f = bundle / "audio_encoder.fp16.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    line = _one_error_line(_cli("build-engine", "--bundle", str(bundle)))
    assert str(f) in line and "truncated" in line


def test_tampered_bundle_gives_one_line(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    f = bundle / "audio_encoder.fp32.onnx"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    line = _one_error_line(_cli("build-engine", "--bundle", str(bundle)))
    assert str(f) in line and "sha256" in line and "does not match the manifest" in line
