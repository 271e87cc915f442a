"""benchmarks/gpu_check.py on a machine without a GPU: `--help` explains it, the check refuses in one line (exit 2)
and writes nothing, and its measuring parts (a variant in a child process, compared with the CPU reference, with a
peak memory figure) run on the CPU provider over the tiny bundle, so that a GPU machine meets tested code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))


def _no_cuda() -> bool:
    from edge.gpu_check import cuda_driver

    return not cuda_driver().startswith("ok")


def test_help_explains_it():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, check=False)
    assert r.returncode == 0
    for word in ("--install", "TensorRT", "peak GPU memory", "exit status 2", "scripts/install-jetson.sh"):
        assert word in r.stdout, word


def test_refuses_without_a_gpu_and_writes_nothing(tmp_path):
    if not _no_cuda():
        pytest.skip("this machine has a CUDA GPU")
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith("gpu_check: no usable NVIDIA GPU here (") and r.stderr.count("\n") == 1
    assert not out.exists() and not (tmp_path / "work").exists()


def test_a_variant_in_a_child_against_the_cpu_reference(tiny_full_bundle, tmp_path):
    import gpu_check

    state = tmp_path / "state"
    state.mkdir()
    ref = gpu_check.run_child(["encoder", str(tiny_full_bundle), "cpu", "fp32", "2", str(state), "-"], sys.executable)
    assert ref["ok"] and ref["provider"] == "cpu" and (state / "cpu_fp32_embeddings.npy").is_file()
    assert ref["memory_method"] and ref["peak_gpu_memory_mb"] is not None
    same = gpu_check.run_child(["encoder", str(tiny_full_bundle), "cpu", "fp32", "2", str(state),
                                str(state / "cpu_fp32_embeddings.npy")], sys.executable)
    assert same["ok"] and same["cosine_min"] > 0.99999 and same["max_abs_diff"] < 1e-4
    gone = gpu_check.run_child(["encoder", str(tiny_full_bundle), "cuda", "fp32", "2", str(state), "-"],
                               sys.executable)
    if _no_cuda():
        assert gone["ok"] is False and "CUDAExecutionProvider" in gone["error"]  # the failure, in one line
    llm = gpu_check.run_child(["llm", str(tiny_full_bundle), "cpu", str(state), "-"], sys.executable)
    assert llm["ok"] and llm["n_gpu_layers"] == 0 and 0.0 <= llm["p_yes"] <= 1.0
    again = gpu_check.run_child(["llm", str(tiny_full_bundle), "cpu", str(state), str(state / "cpu_llm_logits.npy")],
                                sys.executable)
    assert again["ok"] and again["logits_max_abs_diff"] == 0.0 and again["same_top1"] and again["caption_same_as_cpu"]
    json.dumps([ref, same, gone, llm, again])  # all of it goes into the report
