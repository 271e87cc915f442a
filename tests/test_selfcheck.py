"""The encoder checks itself where it runs (edge/selfcheck.py): the bundle's verification data, the device-side check
of every precision, its cache, a degraded graph with a valid hash refused in one line (by the check, `doctor` and the
daemon as a subprocess), and the accepted loss reported as `degraded` over a real mosquitto."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import yaml
from mqtt_broker import Subscriber
from onnx import numpy_helper
from test_daemon_e2e import ROOT, _config, _until, _wav

from edge.bundle import load_bundle, update_manifest
from edge.cpu import cpu_info, int8_kernel, u8s8_saturates
from edge.encoder import AudioEncoder
from edge.selfcheck import VERIFICATION_FILE, check_encoder, load_verification


def test_bundle_carries_verification_data(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    audio = bundle.section("audio")
    assert audio["verification_data"]["file"] == VERIFICATION_FILE
    assert VERIFICATION_FILE in bundle.manifest["files"]  # hashed like every file
    data = load_verification(bundle)
    assert set(data["inputs"]) == {"silence", "chirp", "random"}
    assert data["inputs"]["random"].shape == (2, 998, 128)
    assert data["references"]["chirp"].shape == (1, audio["embeddings_per_clip"], audio["embedding_width"])
    for entry in audio["encoders"].values():
        assert entry["verification"]["cpu"]["int8_kernel"] == cpu_info()["int8_kernel"]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_precision_passes_its_check_here_and_is_cached(tiny_bundle, tmp_path, precision):
    enc = AudioEncoder(tiny_bundle, precision=precision, provider="cpu", warmup=False)
    first = check_encoder(enc, tmp_path)
    assert first.passed and not first.cached, first.line()
    assert first.provider == "cpu" and first.precision == precision
    # The manifest's figure was measured by the same code on the same CPU: the device's must agree with it.
    recorded = load_bundle(tiny_bundle).section("audio")["encoders"][precision]["verification"]
    assert abs(first.mean_cosine - recorded["mean_cosine"]) < 1e-6
    again = check_encoder(enc, tmp_path)
    assert again.cached and again.passed and again.mean_cosine == first.mean_cosine
    assert len(list((tmp_path / "selfcheck").glob("*.json"))) == 1


def _degrade_int8(bundle_dir, levels: int = 4) -> None:
    """Re-quantize the int8 graph's weight matrices to `levels` values per tensor (2 bits): a graph that loads, runs
    and has a valid hash in the manifest, and whose accuracy is gone."""
    path = bundle_dir / "audio_encoder.int8.onnx"
    model = onnx.load(str(path))
    changed = 0
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype in (np.uint8, np.int8) and w.ndim == 2 and w.size >= 256:
            lo, hi = int(w.min()), int(w.max())
            step = max(1, (hi - lo) // (levels - 1))
            coarse = (lo + np.round((w.astype(np.int32) - lo) / step) * step).clip(lo, hi).astype(w.dtype)
            init.CopyFrom(numpy_helper.from_array(coarse, init.name))
            changed += 1
    assert changed, "no int8 weight matrix found to degrade"
    onnx.save(model, str(path))
    update_manifest(bundle_dir, "audio", {}, files=[path.name])  # the hash is valid again: only accuracy is wrong


@pytest.fixture
def degraded_bundle(tiny_full_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_full_bundle, out)
    _degrade_int8(out)
    return out


def test_degraded_encoder_with_a_valid_hash_is_caught(degraded_bundle, tmp_path):
    bundle = load_bundle(degraded_bundle)  # sizes and hashes check out
    result = check_encoder(AudioEncoder(bundle, precision="int8", provider="cpu", warmup=False), tmp_path)
    assert not result.passed
    line = result.line()
    assert "\n" not in line
    assert line.startswith("int8 audio encoder on cpu") and "mean cosine" in line and "outside its tolerance" in line


def test_doctor_fails_the_degraded_encoder(degraded_bundle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edge.cli", "doctor", "--bundle", str(degraded_bundle), "--json"],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    report = json.loads(proc.stdout)
    enc = next(c for c in report["checks"] if c["name"] == "encoder")
    assert enc["status"] == "FAIL", enc
    assert "int8 audio encoder on cpu is outside its tolerance" in enc["detail"]
    assert "fp32 on cpu: mean cosine 1.000000" in enc["detail"]  # the other precisions are still measured
    assert proc.returncode == 1


def _with_bundle(path, **keys):
    cfg = yaml.safe_load(path.read_text())
    cfg["bundle"].update(keys)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_daemon_refuses_a_degraded_encoder_in_one_line(degraded_bundle, mqtt_broker, daemons, tmp_path):
    wav = _wav(tmp_path / "clip.wav", 3.0)
    cfg = _with_bundle(_config(tmp_path, degraded_bundle, mqtt_broker.port,
                               {"type": "file", "file": {"path": str(wav)}}), encoder_precision="int8")
    d = daemons(cfg)
    assert d.wait(120) == 2
    errors = [ln for ln in d.log.splitlines() if ln.startswith("naturelm-edge: error")]
    assert len(errors) == 1, d.log[-3000:]
    assert "int8 audio encoder on cpu is outside its tolerance" in errors[0]
    assert "bundle.accept_encoder_loss" in errors[0]


def test_daemon_runs_on_an_accepted_loss_and_says_degraded(degraded_bundle, mqtt_broker, daemons, tmp_path):
    sub = Subscriber(mqtt_broker.port, ["naturelm/#"])
    wav = _wav(tmp_path / "clip.wav", 3.0)
    cfg = _with_bundle(_config(tmp_path, degraded_bundle, mqtt_broker.port,
                               {"type": "file", "file": {"path": str(wav)}}),
                       encoder_precision="int8", accept_encoder_loss=True)
    d = daemons(cfg)
    _until(lambda: "degraded" in sub.on("/status"), 120, "the degraded status", d)
    _until(lambda: sub.on("/health"), 60, "health", d)
    reasons = json.loads(sub.on("/degraded")[-1])["reasons"]
    assert "outside its tolerance" in reasons["encoder_accuracy"]["reason"]
    _until(lambda: any(json.loads(h).get("degraded", {}).get("encoder_accuracy") for h in sub.on("/health")), 60,
           "health naming encoder_accuracy", d)
    health = [json.loads(h) for h in sub.on("/health") if json.loads(h).get("degraded")][-1]
    assert health["status"] == "degraded"
    assert health["model"]["encoder_check"]["passed"] is False
    assert d.wait(120) == 0
    sub.close()


def test_int8_kernel_names():
    assert int8_kernel("x86_64", {"avx2", "avx512f", "avx512bw", "avx512_vnni"}) == "x86-avx512vnni"
    assert int8_kernel("x86_64", {"avx2", "avx_vnni"}) == "x86-avxvnni"
    assert int8_kernel("x86_64", {"avx2"}) == "x86-avx2-saturating-u8s8"
    assert int8_kernel("aarch64", {"asimd", "asimddp"}) == "arm64-dotprod"
    assert u8s8_saturates("x86-avx2-saturating-u8s8") and not u8s8_saturates("arm64-dotprod")
