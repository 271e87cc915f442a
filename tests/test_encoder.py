"""The device's audio encoder (edge/encoder.py): providers, input checks, broken bundles, bad audio end to end."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from edge.bundle import load_bundle, update_manifest
from edge.encoder import AudioEncoder, available_providers, engine_cache_dir
from edge.errors import AudioError, BundleError, ProviderError
from edge.frontend import AudioFrontEnd
from edge.spec import FbankSpec
from export.onnx_export import synthetic_chirp
from tests.conftest import LLAMA_TINY


@pytest.fixture(scope="module")
def encoder(tiny_bundle):
    return AudioEncoder(tiny_bundle, precision="fp32", provider="cpu")


def _copy(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def test_auto_says_which_provider_it_chose_and_why(tiny_bundle, caplog):
    with caplog.at_level(logging.INFO, logger="edge.encoder"):
        enc = AudioEncoder(tiny_bundle, precision="fp32")
    if "TensorrtExecutionProvider" not in available_providers():
        assert enc.provider in ("cuda", "cpu")
        assert "tensorrt: not in this onnxruntime build" in caplog.text
    assert f"provider auto chose {enc.provider}" in caplog.text
    assert enc.session.get_providers()[0] == {"tensorrt": "TensorrtExecutionProvider",
                                              "cuda": "CUDAExecutionProvider",
                                              "cpu": "CPUExecutionProvider"}[enc.provider]
    assert enc.warmup_ms is not None


@pytest.mark.parametrize("provider", ["tensorrt", "cuda"])
def test_missing_provider_is_an_error_not_a_fallback(tiny_bundle, provider):
    if {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider"}[provider] in available_providers():
        pytest.skip(f"{provider} is available here")
    with pytest.raises(ProviderError, match=f"{provider} was requested"):
        AudioEncoder(tiny_bundle, precision="fp32", provider=provider)


def test_auto_runs_int8_on_the_cpu(tiny_bundle, caplog):
    with caplog.at_level(logging.INFO, logger="edge.encoder"):
        enc = AudioEncoder(tiny_bundle, precision="int8")
    assert enc.provider == "cpu"


def test_encode_checks_the_input_against_the_manifest(encoder):
    y = encoder.encode(np.zeros((2, 998, 128), dtype=np.float64))  # float64 is cast
    assert y.shape == (2, 29, LLAMA_TINY["hidden_size"]) and y.dtype == np.float32
    with pytest.raises(AudioError, match=r"shape \(1, 1000, 128\).*takes \(batch, 998, 128\)"):
        encoder.encode(np.zeros((1, 1000, 128), dtype=np.float32))
    with pytest.raises(AudioError, match=r"takes \(batch, 998, 128\)"):
        encoder.encode(np.zeros((998, 128), dtype=np.float32))
    with pytest.raises(AudioError, match="empty batch"):
        encoder.encode(np.zeros((0, 998, 128), dtype=np.float32))
    bad = np.zeros((1, 998, 128), dtype=np.float32)
    bad[0, 5, 7] = np.nan
    with pytest.raises(AudioError, match="1 NaN or infinite"):
        encoder.encode(bad)


def test_unknown_precision_names_what_the_bundle_has(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    update_manifest(bundle, "audio", {"encoders": {"fp32": load_bundle(bundle).manifest["audio"]["encoders"]["fp32"]}})
    with pytest.raises(BundleError, match=r"no int8 audio encoder in this bundle \(it has: fp32\)"):
        AudioEncoder(bundle, precision="int8", provider="cpu")


def test_truncated_onnx_is_a_bundle_error_naming_the_file(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    onnx_file = bundle / "audio_encoder.fp32.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:5000])
    # the manifest's size check catches it first ...
    with pytest.raises(BundleError, match=r"audio_encoder.fp32.onnx: size 5000 does not match"):
        AudioEncoder(bundle, provider="cpu")
    # ... and a broken file whose hash was recorded (a faulty export) is caught when onnxruntime parses it
    update_manifest(bundle, "audio", {}, files=["audio_encoder.fp32.onnx"])
    with pytest.raises(BundleError) as e:
        AudioEncoder(bundle, provider="cpu")
    message = str(e.value)
    assert str(onnx_file) in message and "onnxruntime cannot load it" in message and "\n" not in message


def test_tampered_file_fails_the_hash_check(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    f = bundle / "audio_encoder.int8.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"audio_encoder.int8.onnx: sha256 .* does not match the manifest"):
        load_bundle(bundle)
    with pytest.raises(BundleError, match="does not match the manifest"):
        AudioEncoder(bundle, precision="fp32", provider="cpu")


def test_engine_cache_key_separates_gpu_tensorrt_and_graph(tmp_path):
    a = engine_cache_dir(tmp_path, "ab" * 32, 1, gpu="Orin (nvgpu)", trt="100300")
    assert a == tmp_path / "tensorrt" / "Orin-nvgpu-trt100300-abababababababab-b1"
    assert a != engine_cache_dir(tmp_path, "ab" * 32, 1, gpu="Orin (nvgpu)", trt="8601")
    assert a != engine_cache_dir(tmp_path, "cd" * 32, 1, gpu="Orin (nvgpu)", trt="100300")
    assert a != engine_cache_dir(tmp_path, "ab" * 32, 1, gpu="NVIDIA H100", trt="100300")


# --- bad audio, end to end through the front end and the encoder ------------------------------------------------

def _pipeline(bundle_dir, encoder):
    audio = load_bundle(bundle_dir, verify="none").manifest["audio"]
    front = AudioFrontEnd(FbankSpec.from_dict(audio["fbank"]), audio["clip_seconds"])
    return lambda samples, rate: encoder.encode(front.features(samples, rate, name="clip.wav"))


def test_good_audio_goes_through(tiny_bundle, encoder):
    embed = _pipeline(tiny_bundle, encoder)
    y = embed(synthetic_chirp(seconds=4.0, sample_rate=32000), 32000)
    assert y.shape == (1, 29, LLAMA_TINY["hidden_size"]) and np.isfinite(y).all()


@pytest.mark.parametrize(
    "samples, message",
    [
        (np.zeros(0, dtype=np.float32), "empty"),
        (np.full(16000, np.nan, dtype=np.float32), "no finite samples"),
        (np.zeros(160, dtype=np.float32), "minimum"),  # 10 ms: shorter than one 25 ms fbank frame
    ],
    ids=["empty", "all-nan", "too-short"],
)
def test_bad_audio_is_a_clear_error(tiny_bundle, encoder, samples, message):
    embed = _pipeline(tiny_bundle, encoder)
    with pytest.raises(AudioError, match=message) as e:
        embed(samples, 16000)
    assert "clip.wav" in str(e.value) and "\n" not in str(e.value)
