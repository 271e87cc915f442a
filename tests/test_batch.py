"""Batched inference gives the answers of the one-window path.

Exact batches (the default: EngineOptions.exact_batches, open_pipeline's shared_batches=False): bit for bit. The audio
encoder runs window by window (a batched call rounds differently: within 1e-5 of scale for fp32, and the int8 graph's
dynamic quantization scales activations over the whole batch), and the LLM holds the windows in one context but
decodes each window's rows in calls of its own (tests/test_llm_batch.py).

Shared batches (shared_batches=True): one encoder call for fp32/fp16 (int8 still window by window), the windows' LLM
rows in shared llama.cpp calls. Decisions identical, scores within SHARED_TOL (tests/test_llm_batch.py measures
1.7e-3 at most); generated text can differ at a near-tie, so it is not compared. `infer --batch` and the daemon's
backlog batches are compared with the one-window path in tests/test_archive.py and tests/test_daemon_e2e.py.
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

#: |score difference| allowed with shared batches.
SHARED_TOL = 1e-2

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


@pytest.fixture(scope="module", params=[("fp32", 1, False), ("int8", 1, False), ("int8", 5, False), ("fp32", 5, True)],
                ids=["fp32-llm_one_by_one", "int8-llm_one_by_one", "int8-llm_batched", "fp32-shared_batches"])
def pipeline(request, tiny_full_bundle):
    precision, max_batch, shared = request.param
    bundle = load_bundle(tiny_full_bundle)
    encoder = AudioEncoder(bundle, precision=precision, provider="cpu")
    llm = LlmEngine.from_bundle(bundle, EngineOptions(n_threads=1, max_batch=max_batch, exact_batches=not shared))
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
        if pipeline.llm.exact:
            assert [(e.prompt_id, e.answer, e.positive, e.window, e.score) for e in r.events] == \
                [(e.prompt_id, e.answer, e.positive, e.window, e.score) for e in s.events]
            assert np.array_equal(r.embedding, s.embedding)
            continue
        assert [(e.prompt_id, e.window) for e in r.events] == [(e.prompt_id, e.window) for e in s.events]
        for es, er in zip(s.events, r.events):
            if es.kind in ("yes_no", "label"):
                assert (er.answer, er.positive) == (es.answer, es.positive)
                assert er.score == pytest.approx(es.score, abs=SHARED_TOL)
        assert np.abs(r.embedding - s.embedding).max() <= 1e-5 * np.abs(s.embedding).max()
