"""Batched inference gives the answers of the one-window path.

Tolerances: audio embeddings of a batched fp32 encoder call within 1e-5 of the one-window call, relative to their
scale (onnxruntime may pick other kernels, or split the work differently, for a larger batch: rounding differs, the
arithmetic does not); the int8 encoder is run window by window inside a batch (its dynamic quantization scales each
tensor over the whole batch), so its embeddings are bit-identical. Decisions and generated tokens identical; yes/no
scores within 1e-5 absolute.

With an engine of max_batch > 1 the LLM side is batched as well (the audio prefixes prefilled in one llama_batch,
answers decoded together), at the defaults (Q4_K_M, f16 KV cache): decisions and tokens identical, scores within 1e-4
(tests/test_llm_batch.py's bound: one KV stream per sequence, so only the matrix kernels' rounding for other row
counts is left). `infer --batch` and the daemon's backlog batches are compared with the one-window path at those
defaults in tests/test_archive.py and tests/test_daemon_e2e.py.
"""


from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

from edge.bundle import load_bundle
from edge.encoder import AudioEncoder
from edge.events import WindowInfo
from edge.llm import EngineOptions, LlmEngine
from edge.pipeline import Pipeline
from edge.prompts import parse_prompts
from edge.synth import birdsong

#: |score difference| allowed: encoder batched alone (fp32 rounding) / LLM batched too (kernel rounding).
ENCODER_BATCH_TOL = 1e-5
LLM_BATCH_TOL = 1e-4

PROMPTS = [
    {"id": "bird", "kind": "yes_no", "text": "Is there a bird in the audio? Answer Yes or No."},
    {"id": "caption", "kind": "caption", "text": "Caption the audio.", "max_tokens": 8},  # 2 beams (the default)
    {"id": "greedy", "kind": "open", "text": "What is calling?", "max_tokens": 6, "num_beams": 1,
     "every_n_windows": 2},
    {"id": "n", "kind": "count", "text": "How many individuals are vocalizing?"},
]


def _windows(n: int, sr: int = 16000):
    t0 = datetime(2026, 6, 1, tzinfo=timezone.utc)
    out = []
    for i in range(n):
        x = birdsong(10.0 if i < n - 1 else 6.5, sr, seed=10 + i).astype(np.float32)
        if i == 1:
            x *= 8  # a loud window next to quiet ones: the case a batch-wide scale would get wrong
        out.append((x, sr, WindowInfo(i, 5.0 * i, x.size / sr, t0)))
    return out


@pytest.fixture(scope="module", params=[("fp32", 1), ("int8", 1), ("int8", 5)],
                ids=["fp32-llm_one_by_one", "int8-llm_one_by_one", "int8-llm_batched"])
def pipeline(request, tiny_full_bundle):
    precision, max_batch = request.param
    bundle = load_bundle(tiny_full_bundle)
    encoder = AudioEncoder(bundle, precision=precision, provider="cpu")
    llm = LlmEngine.from_bundle(bundle, EngineOptions(n_threads=1, max_batch=max_batch))  # the defaults: Q4_K_M
    pipe = Pipeline(bundle, encoder, llm, parse_prompts(PROMPTS, "test"), device_id="t")
    yield pipe
    pipe.close()


def test_encoder_batch_matches_one_window(pipeline):
    feats = np.concatenate([pipeline.frontend.features(x, sr) for x, sr, _ in _windows(5)])
    one = np.concatenate([pipeline.encoder.encode(feats[i:i + 1]) for i in range(len(feats))])
    batched = pipeline.encoder.encode_batch(feats)
    if pipeline.encoder.precision == "int8":
        assert np.array_equal(batched, one)
    else:
        assert np.abs(batched - one).max() <= 1e-5 * np.abs(one).max()


@pytest.mark.parametrize("b", [2, 5])
def test_process_batch_gives_the_one_window_answers(pipeline, b):
    items = _windows(5)
    single = [pipeline.process(*item, source="s.wav") for item in items]
    batched = []
    for i in range(0, len(items), b):
        batched += pipeline.process_batch(items[i:i + b], "s.wav")
    assert pipeline.llm_batched == (pipeline.llm.max_batch > 1)
    assert len(batched) == len(single)
    for s, r in zip(single, batched):
        assert [(e.prompt_id, e.answer, e.positive, e.window) for e in r.events] == \
            [(e.prompt_id, e.answer, e.positive, e.window) for e in s.events]
        for es, er in zip(s.events, r.events):
            if es.score is not None:
                tol = LLM_BATCH_TOL if pipeline.llm_batched else ENCODER_BATCH_TOL
                assert er.score == pytest.approx(es.score, abs=tol)
        assert np.abs(r.embedding - s.embedding).max() <= 1e-5 * np.abs(s.embedding).max()
