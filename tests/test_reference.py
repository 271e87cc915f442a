"""The end-to-end reference on the tiny preset: shapes through every stage, determinism, CLI determinism."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from edge.spec import CLIP_SAMPLES, FBANK
from export.fbank import kaldi_fbank, reference_waveform
from export.reference import ReferencePipeline


def _chirp(seconds: float, sr: int = 16000, f0: float = 800.0, f1: float = 4000.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    return (0.3 * np.sin(phase) + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def pipeline(tiny_model):
    naturelm_dir, llama_dir = tiny_model
    return ReferencePipeline(naturelm_dir, llama_dir)


def test_shapes_through_the_stages(pipeline):
    wav = reference_waveform(_chirp(10.0), 16000)
    assert wav.shape == (CLIP_SAMPLES,)
    fb = kaldi_fbank(wav)
    assert fb.shape[-2:] == (998, FBANK.num_mel_bins)
    with torch.no_grad():
        tokens = pipeline.audio.beats(pipeline.features(_chirp(10.0), 16000))
    assert tokens.shape[1] == 496
    emb = pipeline.audio_embeddings(_chirp(10.0), 16000)
    assert emb.shape == (29, pipeline.llm.model.config.hidden_size)


def test_short_clips_are_padded_and_long_ones_truncated(pipeline):
    short = _chirp(3.0)
    padded = np.concatenate([short, np.zeros(CLIP_SAMPLES - short.size, np.float32)])
    torch.testing.assert_close(pipeline.features(short, 16000), pipeline.features(padded, 16000))
    long = _chirp(12.5)
    torch.testing.assert_close(pipeline.features(long, 16000), pipeline.features(long[:CLIP_SAMPLES], 16000))
    assert pipeline.features(long, 16000).shape == (1, 998, 128)


def test_same_audio_same_answer_and_audio_matters(pipeline):
    a = pipeline.generate(_chirp(10.0, seed=1), 16000, "Caption the audio.", max_new_tokens=12)
    b = pipeline.generate(_chirp(10.0, seed=1), 16000, "Caption the audio.", max_new_tokens=12)
    assert a == b and len(a) > 0
    noise = np.random.default_rng(5).standard_normal(CLIP_SAMPLES).astype(np.float32) * 0.5
    emb_chirp = pipeline.audio_embeddings(_chirp(10.0, seed=1), 16000)
    emb_noise = pipeline.audio_embeddings(noise, 16000)
    assert not torch.allclose(emb_chirp, emb_noise, atol=1e-3)
    s = pipeline.yes_no_score(_chirp(10.0, seed=1), 16000, "Is there a American Crow in the audio? Answer Yes or No.")
    assert 0.0 < s < 1.0


def test_tiny_model_cli_is_deterministic(tmp_path):
    def run(out, seed):
        subprocess.run([sys.executable, "-m", "edge.cli", "-q", "tiny-model", str(out), "--seed", str(seed)],
                       check=True)
        return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file()}

    first, second, other = run(tmp_path / "a", 3), run(tmp_path / "b", 3), run(tmp_path / "c", 4)
    assert first == second
    assert "naturelm/model.safetensors" in first and "llama/model.safetensors" in first
    assert first["naturelm/model.safetensors"] != other["naturelm/model.safetensors"]
    assert first["llama/model.safetensors"] != other["llama/model.safetensors"]
