"""The int8 encoder on the other kind of x86 CPU than the one running the tests.

Machines of this project's kind differ: some have AVX-512 VNNI, some only AVX2, where onnxruntime's u8 x s8 int8
kernel saturates (edge/cpu.py). A test suite that ran only on the CPU at hand would say nothing about the other, so
these tests run the device's self-check inside qemu-user with `-cpu Haswell-v4` (AVX2, FMA, no AVX-512, no VNNI):
onnxruntime chooses its kernels from CPUID, which qemu answers as that CPU. The emulation is faithful where it
matters: the scheme this project used before measures 0.988727 there, the very figure a real AVX2-only machine gave
(issue: "mean cosine 0.988727 < 0.99").
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge.bundle import update_manifest
from edge.encoder import AudioEncoder
from edge.selfcheck import check_encoder

ROOT = Path(__file__).resolve().parents[1]
QEMU = shutil.which("qemu-x86_64")
AVX2_ONLY = "Haswell-v4"

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or QEMU is None,
                                reason="needs an x86_64 host and qemu-user (apt-get install qemu-user; .ci/run does)")

_CHECK = ("import json, sys\n"
          "from edge.encoder import AudioEncoder\n"
          "from edge.selfcheck import check_encoder\n"
          "enc = AudioEncoder(sys.argv[1], precision=sys.argv[2], provider='cpu', threads=1, warmup=False)\n"
          "print(json.dumps(check_encoder(enc, None).to_dict()))\n")


def _selfcheck_emulated(bundle: Path, precision: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([QEMU, "-cpu", AVX2_ONLY, sys.executable, "-c", _CHECK, str(bundle), precision],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_int8_encoder_holds_on_an_avx2_only_cpu(tiny_bundle):
    """u8 weights (export/int8.py) cannot saturate: the same accuracy on the saturating path as here."""
    native = check_encoder(AudioEncoder(tiny_bundle, precision="int8", provider="cpu", warmup=False), None)
    emulated = _selfcheck_emulated(tiny_bundle, "int8")
    assert emulated["cpu"]["int8_kernel"] == "x86-avx2-saturating-u8s8"  # the emulated CPU took that path
    assert emulated["passed"], emulated
    # Measured: 0.999726 on both paths for this bundle. Different kernels sum in another order, nothing more.
    assert abs(emulated["mean_cosine"] - native.mean_cosine) < 1e-4
    assert abs(emulated["min_cosine"] - native.min_cosine) < 1e-3


def test_the_previous_s8_scheme_fails_there_and_the_check_says_so(tiny_bundle, tmp_path):
    """The scheme before this one (s8 weights) on the same CPU: the device-side check catches what the workstation's
    check (on a VNNI machine) could not."""
    from export.int8 import quantize

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    quantize(bundle / "audio_encoder.fp32.onnx", bundle / "audio_encoder.int8.onnx", "dyn-s8")
    update_manifest(bundle, "audio", {}, files=["audio_encoder.int8.onnx"])
    here = check_encoder(AudioEncoder(bundle, precision="int8", provider="cpu", warmup=False), None)
    emulated = _selfcheck_emulated(bundle, "int8")
    if here.cpu["int8_kernel"] in ("x86-avx512vnni", "x86-avxvnni", "x86-amx"):
        assert here.passed and here.mean_cosine > 0.999  # exact u8 x s8 products here
    assert not emulated["passed"]
    assert 0.95 < emulated["mean_cosine"] < 0.995, emulated  # measured 0.988727
