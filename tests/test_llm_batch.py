"""Batched windows (EngineOptions.max_batch, LlmEngine.answer_windows) against the one-window path.

Tolerance, and why: a batch of B windows decodes B x 29 audio rows (and B suffixes, B x beams answer tokens) per
llama_decode where one window decodes 29. ggml's matrix products block and sum their rows in an order that depends on
how many rows a batch has, and a window's KV cells sit elsewhere in a bigger unified cache, so the same window's logits
differ in the last bits of float32 sums.
- F32 weights, F32 KV cache, flash attention off: relative ~1e-7 per product, compounded over the layers: 1e-4 bounds
  logits of size ~5 (seen: 1e-6).
- F16 with the defaults (f16 KV cache, flash attention as llama.cpp decides, which on the CPU rounds Q and K to f16):
  a last-bit change of a sum can flip an f16 rounding (2^-11 relative) of a KV entry or an attention input, and that
  propagates: 2e-2 bounds it, the same bound as F16 against the PyTorch reference in test_llm_parity.py (seen: 2e-3).
Decisions and tokens must be identical: they could only move where two candidates sit closer than that, which no answer
here does (and a user's could only with a near-tie the one-window path would break by the same noise).
"""

from __future__ import annotations

import numpy as np
import pytest

from edge.bundle import load_bundle
from edge.llm import EngineOptions, LlmEngine, Prompt

F32_BATCH_TOL = 1e-4
F16_BATCH_TOL = 2e-2
PROMPTS = (
    Prompt(id="crow", kind="yes_no", question="Is there a American Crow in the audio? Answer Yes or No."),
    Prompt(id="species", kind="label", question="What is the common name for the focal species in the audio? Answer:",
           labels=("American Crow", "Common Raven", "Blue Jay")),
    Prompt(id="caption", kind="caption", question="Caption the audio.", max_new_tokens=10),
    Prompt(id="count", kind="count", question="How many individuals are vocalizing?"),
    Prompt(id="stage", kind="open", question="What is the life stage of the focal species in the audio?",
           max_new_tokens=8, num_beams=1),
    Prompt(id="wide", kind="open", question="What are the common names for the species in the audio, if any?",
           max_new_tokens=8, num_beams=3),
)


def audio(seed: int, n: int = 29, width: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def _same_answers(a, b, score_tol: float) -> None:
    assert (a.prompt_id, a.text, a.token_ids, a.stopped, a.decoding, a.num_beams) == \
           (b.prompt_id, b.text, b.token_ids, b.stopped, b.decoding, b.num_beams)
    if a.score is None:
        assert b.score is None
    else:
        assert a.score == pytest.approx(b.score, abs=score_tol)


@pytest.mark.parametrize("model_type, tol", [("F32", F32_BATCH_TOL), ("F16", F16_BATCH_TOL)])
def test_batched_windows_answer_as_one_window(tiny_llm_bundle, model_type, tol):
    bundle = load_bundle(tiny_llm_bundle)
    kv = "f32" if model_type == "F32" else "f16"
    flash = False if model_type == "F32" else None  # F32: exact settings; F16: the defaults (llama.cpp decides)
    one = EngineOptions(model_type=model_type, kv_cache_type=kv, flash_attn=flash, n_threads=1)
    many = EngineOptions(model_type=model_type, kv_cache_type=kv, flash_attn=flash, n_threads=1, max_batch=4)
    audios = [audio(seed) for seed in range(6)]  # a group of 4 and a group of 2
    with LlmEngine.from_bundle(bundle, one) as single:
        want = [single.run_window(a, PROMPTS) for a in audios]
        want_logits = np.concatenate([single.first_token_logits([a], PROMPTS[0].question) for a in audios])
    with LlmEngine.from_bundle(bundle, many) as batched:
        got = batched.answer_windows(audios, PROMPTS)
        got_logits = batched.first_token_logits(audios, PROMPTS[0].question)
    assert len(got) == len(audios)
    for g, w in zip(got, want):
        assert g.prefills == 1 and g.prefix_tokens == w.prefix_tokens
        for x, y in zip(g.answers, w.answers):
            _same_answers(x, y, score_tol=tol)
    worst = float(np.abs(got_logits - want_logits).max())
    print(f"{model_type}: max |logit diff| batched (4 windows) vs one window: {worst:.2e}")
    assert worst <= tol, worst
    assert np.array_equal(got_logits.argmax(axis=1), want_logits.argmax(axis=1))
    assert len({w.answers[2].token_ids for w in want}) > 1  # the windows' answers differ: nothing was mixed up


def test_each_window_has_its_own_prompts(tiny_llm_bundle):
    """Windows of one batch asking different prompts (a scheduler's due lists), one asking none."""
    bundle = load_bundle(tiny_llm_bundle)
    options = EngineOptions(model_type="F32", kv_cache_type="f32", flash_attn=False, n_threads=1)
    lists = [list(PROMPTS[:3]), [PROMPTS[2]], [], [PROMPTS[4], PROMPTS[0]]]
    audios = [audio(10 + i) for i in range(len(lists))]
    with LlmEngine.from_bundle(bundle, options) as single:
        want = [single.run_window(a, ps) for a, ps in zip(audios, lists)]
    with LlmEngine.from_bundle(bundle, EngineOptions(model_type="F32", kv_cache_type="f32", flash_attn=False,
                                                     n_threads=1, max_batch=4)) as batched:
        got = batched.answer_windows(audios, lists)
        for g, w, ps in zip(got, want, lists):
            assert [a.prompt_id for a in g.answers] == [p.id for p in ps]
            for x, y in zip(g.answers, w.answers):
                _same_answers(x, y, score_tol=F32_BATCH_TOL)
        with pytest.raises(ValueError, match="2 prompt lists for 4 windows"):
            batched.answer_windows(audios, lists[:2])
        # the one-window calls still work on the batched engine (slot 0)
        single_again = batched.run_window(audios[0], lists[0])
        for x, y in zip(single_again.answers, want[0].answers):
            _same_answers(x, y, score_tol=F32_BATCH_TOL)
