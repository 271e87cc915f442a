"""Batched windows (EngineOptions.max_batch, LlmEngine.answer_windows) against the one-window path.

Exact batches (the default): the same tokens, scores and logits, bit for bit, at every model type the quantizer makes
and with the defaults (f16 KV cache, flash attention as llama.cpp decides). Why it holds (edge/llm.py): each llama.cpp
sequence has its own KV stream, so a window's attention reads its own cells at the same places as alone, and each
window's rows go through llama.cpp in a call of their own, so every matrix kernel does the same arithmetic on them as
alone. Checked with this machine's kernels (AVX-512 VNNI) and with an AVX2-only build of the same llama.cpp (AVX2's
repacked Q4_K kernels sum a lone row and rows by fours differently: sharing calls moved the small preset's yes/no
scores by 6e-3 and changed 3 of 4 captions there).

Shared batches (exact_batches=False): the windows' rows share llama.cpp calls, and a row's sums depend on how many
rows a kernel gets. Decisions identical, logits within SHARED_LOGIT_TOL, scores within SHARED_SCORE_TOL (measured on
the tiny model, batches of 4 against one window, first-token logits: AVX-512 build F16 0, Q4_K_M 1.2e-6; AVX2 build
F16 1.7e-4, Q4_K_M 1.2e-6; scores, which sum several positions' log-probabilities for labels and counts, up to 1.7e-3
on AVX2). Tokens of generated text can flip at a near-tie, so they are not compared. Before one KV stream per sequence, sharing one pool: max |logit diff| 0.16 on the small
preset at Q4_K_M.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge.bundle import load_bundle
from edge.errors import ConfigError
from edge.llm import EngineOptions, LlmEngine, Prompt

SHARED_LOGIT_TOL = 1e-2
SHARED_SCORE_TOL = 1e-2
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
    assert (a.prompt_id, a.text, a.token_ids, a.stopped, a.decoding, a.num_beams, a.score, a.scores) == \
           (b.prompt_id, b.text, b.token_ids, b.stopped, b.decoding, b.num_beams, b.score, b.scores)


def _one_and_batched(bundle, model_type: str, audios, exact: bool = True):
    one = EngineOptions(model_type=model_type, n_threads=2, prompts=PROMPTS)
    many = EngineOptions(model_type=model_type, n_threads=2, prompts=PROMPTS, max_batch=4, exact_batches=exact)
    with LlmEngine.from_bundle(bundle, one) as single:
        want = [single.run_window(a, PROMPTS) for a in audios]
        want_logits = np.concatenate([single.first_token_logits([a], PROMPTS[0].question) for a in audios])
    with LlmEngine.from_bundle(bundle, many) as batched:
        got = batched.answer_windows(audios, PROMPTS)
        got_logits = batched.first_token_logits(audios, PROMPTS[0].question)
    assert len(got) == len(audios)
    for g, w in zip(got, want):
        assert g.prefills == 1 and g.prefix_tokens == w.prefix_tokens
        assert [a.prompt_id for a in g.answers] == [a.prompt_id for a in w.answers]
    assert len({w.answers[2].token_ids for w in want}) > 1  # the windows' answers differ: nothing was mixed up
    return got, want, float(np.abs(got_logits - want_logits).max())


@pytest.mark.parametrize("model_type", ["F32", "F16", "Q8_0", "Q4_K_M"])
def test_batched_windows_answer_as_one_window(tiny_llm_bundle, model_type):
    audios = [audio(seed) for seed in range(6)]  # a group of 4 and a group of 2
    got, want, worst = _one_and_batched(load_bundle(tiny_llm_bundle), model_type, audios)
    for g, w in zip(got, want):
        for x, y in zip(g.answers, w.answers):
            _same_answers(x, y)
    assert worst == 0.0


@pytest.mark.parametrize("model_type", ["F16", "Q4_K_M"])
def test_shared_batches_keep_decisions_and_bound_the_rest(tiny_llm_bundle, model_type):
    audios = [audio(seed) for seed in range(6)]
    got, want, worst = _one_and_batched(load_bundle(tiny_llm_bundle), model_type, audios, exact=False)
    score_diffs = [abs(x.scores[k] - y.scores[k]) for g, w in zip(got, want) for x, y in zip(g.answers, w.answers)
                   if x.scores and y.scores and x.scores.keys() == y.scores.keys() for k in x.scores]
    print(f"{model_type}, shared batches: max |logit diff| {worst:.2e}, max |score diff| {max(score_diffs):.2e}")
    assert worst <= SHARED_LOGIT_TOL
    for g, w in zip(got, want):
        for x, y in zip(g.answers, w.answers):
            if x.kind in ("yes_no", "label"):
                assert x.text == y.text  # the decision
                assert x.scores.keys() == y.scores.keys()
                for k in x.scores:
                    assert x.scores[k] == pytest.approx(y.scores[k], abs=SHARED_SCORE_TOL)


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
