"""Batched windows (EngineOptions.max_batch, LlmEngine.answer_windows) against the one-window path.

Claim: the same tokens and decisions, and logits within LOGIT_TOL, at every model type the quantizer makes, with the
defaults (f16 KV cache, flash attention as llama.cpp decides). Why so close (edge/llm.py): each llama.cpp sequence has
its own KV stream, so a window's attention reads its own cells at the same places as alone. What is left is ggml's
matrix kernels: a row's sums are the same whatever other rows share the batch within one kernel, but the kernel can
change with the row count (the repacked Q4_K gemm takes rows by fours and leaves the rest to a gemv; F32 takes another
path for a single row, as at the last layer, where llama.cpp keeps only the rows whose logits are asked for). Those
round differently in the last bits of float32.
Measured on the tiny model (batches of 4 against one window, this machine's AVX-512 kernels): Q8_0 0 (bit-identical),
F32 7e-7, Q4_K_M 1.2e-6, F16 0 with flash attention and 5.9e-5 without (max |logit diff|); 1e-4 bounds them. Scores
(P(Yes), a label's share, a count's probability) are smooth in the logits: the same bound, measured <= 8e-6. On the production-shaped small preset Q4_K_M and F16 were bit-identical (answers
and logits, benchmarks/bench_batch.py records it). Before, with one shared KV pool: max |logit diff| 0.16 on the small
preset at Q4_K_M, yes/no scores 1.1e-2 apart, 2-beam captions changed in 2 of 4 windows.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge.bundle import load_bundle
from edge.errors import ConfigError
from edge.llm import EngineOptions, LlmEngine, Prompt

LOGIT_TOL = 1e-4
SCORE_TOL = 1e-4
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


def _same_answers(a, b) -> None:
    assert (a.prompt_id, a.text, a.token_ids, a.stopped, a.decoding, a.num_beams) == \
           (b.prompt_id, b.text, b.token_ids, b.stopped, b.decoding, b.num_beams)
    if a.score is None:
        assert b.score is None
    else:
        assert a.score == pytest.approx(b.score, abs=SCORE_TOL)
        assert (a.scores or {}).keys() == (b.scores or {}).keys()


@pytest.mark.parametrize("model_type", ["F32", "F16", "Q8_0", "Q4_K_M"])
def test_batched_windows_answer_as_one_window(tiny_llm_bundle, model_type):
    bundle = load_bundle(tiny_llm_bundle)
    one = EngineOptions(model_type=model_type, n_threads=2, prompts=PROMPTS)
    many = EngineOptions(model_type=model_type, n_threads=2, prompts=PROMPTS, max_batch=4)
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
            _same_answers(x, y)
    worst = float(np.abs(got_logits - want_logits).max())
    print(f"{model_type}: max |logit diff| batched (4 windows) vs one window: {worst:.2e}")
    assert worst <= LOGIT_TOL, worst
    assert np.array_equal(got_logits.argmax(axis=1), want_logits.argmax(axis=1))
    assert len({w.answers[2].token_ids for w in want}) > 1  # the windows' answers differ: nothing was mixed up


def test_each_window_has_its_own_prompts(tiny_llm_bundle):
    """Windows of one batch asking different prompts (a scheduler's due lists), one asking none."""
    bundle = load_bundle(tiny_llm_bundle)
    options = EngineOptions(model_type="Q4_K_M", n_threads=1, prompts=PROMPTS)
    lists = [list(PROMPTS[:3]), [PROMPTS[2]], [], [PROMPTS[4], PROMPTS[0]]]
    audios = [audio(10 + i) for i in range(len(lists))]
    with LlmEngine.from_bundle(bundle, options) as single:
        want = [single.run_window(a, ps) for a, ps in zip(audios, lists)]
    with LlmEngine.from_bundle(bundle, EngineOptions(model_type="Q4_K_M", n_threads=1, prompts=PROMPTS,
                                                     max_batch=4)) as batched:
        got = batched.answer_windows(audios, lists)
        for g, w, ps in zip(got, want, lists):
            assert [a.prompt_id for a in g.answers] == [p.id for p in ps]
            for x, y in zip(g.answers, w.answers):
                _same_answers(x, y)
        with pytest.raises(ValueError, match="2 prompt lists for 4 windows"):
            batched.answer_windows(audios, lists[:2])
        # the one-window calls still work on the batched engine (slot 0)
        single_again = batched.run_window(audios[0], lists[0])
        for x, y in zip(single_again.answers, want[0].answers):
            _same_answers(x, y)


def test_the_kv_cache_is_sized_to_the_prompts(tiny_full_bundle):
    """A window gets one KV stream per sequence it can use: its base, plus as many beams as its beam-searched prompts
    need (none for yes/no, label, count and greedy ones), each of the cells its longest prompt needs. A prompt asking
    for more beams than the engine was opened with is refused by name, before anything runs."""
    bundle = load_bundle(tiny_full_bundle)
    rows = bundle.section("audio")["embeddings_per_clip"]
    scored = PROMPTS[:2] + PROMPTS[3:5]
    with LlmEngine.from_bundle(bundle, EngineOptions(model_type="Q8_0", n_threads=1, prompts=scored)) as e:
        assert e.max_beams == 0
        need = max(e.cells_needed(p, rows) for p in scored)
        assert e.n_ctx == -(-need // 256) * 256  # rounded up to the cells llama.cpp allocates anyway
        assert e.n_ctx < bundle.section("llm")["n_ctx"]
        e.run_window(audio(0, n=rows), scored)
        with pytest.raises(ConfigError, match=r"prompt 'wide' asks for 3 beams but the LLM was opened with 0"):
            e.check_prompts(PROMPTS[5:])
        with pytest.raises(ConfigError, match=r"prompt 'caption' asks for 2 beams"):
            e.run_window(audio(0, n=rows), [PROMPTS[2]])
    with LlmEngine.from_bundle(bundle, EngineOptions(model_type="Q8_0", n_threads=1, prompts=PROMPTS)) as e:
        assert e.max_beams == 3
    with LlmEngine.from_bundle(bundle, EngineOptions(model_type="Q8_0", n_threads=1)) as e:
        assert e.max_beams == 2 and e.n_ctx == bundle.section("llm")["n_ctx"]  # not told: upstream's 2 beams


def test_a_longer_prompt_than_the_context_was_sized_for_is_refused(tiny_full_bundle):
    bundle = load_bundle(tiny_full_bundle)
    short = (Prompt(id="crow", kind="yes_no", question="Crow?"),)
    with LlmEngine.from_bundle(bundle, EngineOptions(model_type="Q8_0", n_threads=1, prompts=short)) as e:
        assert e.n_ctx == 256
        e.check_prompts([Prompt(id="ok", kind="open", question="What?", max_new_tokens=100, num_beams=1)])
        with pytest.raises(ConfigError, match=r"prompt 'long' needs \d+ positions but the LLM was opened with 256"):
            e.check_prompts([Prompt(id="long", kind="open", question="What?", max_new_tokens=300, num_beams=1)])
