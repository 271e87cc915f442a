"""Beam search as upstream decodes (transformers' generate(num_beams=2, do_sample=False)), on the device engine.

- edge/beam.py's state machine, fed the PyTorch reference's own logits, picks the tokens transformers' beam search
  picks, also when stop tokens end hypotheses early, at other widths and length penalties;
- the llama.cpp engine (beams as KV-cache sequences sharing the prompt's cells) answers with the tokens transformers'
  beam search gives on the reference, with the bundle's stop tokens and with extra stop tokens that make hypotheses
  finish at different lengths.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from edge.beam import BeamSearch
from edge.bundle import load_bundle
from edge.errors import ConfigError
from edge.llm import EngineOptions, LlmEngine, Prompt
from quantize.quality import PROBE_QUESTIONS

EXACT = EngineOptions(model_type="F32", kv_cache_type="f32", flash_attn=False, n_threads=1, max_beams=3)
QUESTIONS = (PROBE_QUESTIONS[0], PROBE_QUESTIONS[2], "Caption the audio.")
SEEDS = (0, 3)
NEW_TOKENS = 12


def audio(seed: int, n: int = 29, width: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def without_stop(ids, stops) -> tuple:
    return tuple(ids[:-1]) if ids and ids[-1] in stops else tuple(ids)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: PyTorch's thread pool costs more than it saves on a shared machine (7x slower here with 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference_beams(tiny_reference_llm) -> dict:
    ref = tiny_reference_llm
    return {(seed, q): ref.generate_beam(torch.from_numpy(audio(seed)), q, num_beams=2, max_new_tokens=NEW_TOKENS)
            for seed in SEEDS for q in QUESTIONS}


@torch.no_grad()
def _beam_search_on_reference(ref, a: np.ndarray, question: str, search: BeamSearch) -> BeamSearch:
    """Drive edge/beam.py with the reference model's logits (whole sequences recomputed: tiny model)."""
    prompt = ref.prompt_embeds(torch.from_numpy(a), question)
    table = ref.model.get_input_embeddings()
    running = [()]
    while True:
        rows = []
        for tokens in running:
            x = torch.cat([prompt, table(torch.tensor(list(tokens), dtype=torch.long))])[None]
            rows.append(ref.model(inputs_embeds=x).logits[0, -1].float().numpy())
        chosen = search.step(np.stack(rows))
        if chosen is None:
            return search
        running = [running[p] + (t,) for p, t in chosen]


def test_state_machine_picks_the_tokens_of_transformers_beam_search(tiny_reference_llm, reference_beams):
    """Each clip also stops on a token its 2-beam answer produces early, so hypotheses end on stop tokens at
    different lengths and the early-stop heuristic ends searches; widths 2 and 3, length penalties 1, 0.5 and 2."""
    ref = tiny_reference_llm
    stopped_early = 0
    for seed, q in ((0, QUESTIONS[0]), (3, QUESTIONS[2])):
        a = audio(seed)
        stops = ref.stop_ids + (reference_beams[(seed, q)][2],)
        for width, penalty in ((2, 1.0), (3, 1.0), (2, 0.5), (2, 2.0)):
            want = ref.generate_beam(torch.from_numpy(a), q, num_beams=width, max_new_tokens=NEW_TOKENS,
                                     stop_ids=stops, length_penalty=penalty)
            got = _beam_search_on_reference(ref, a, q, BeamSearch(width, NEW_TOKENS, stops, penalty))
            assert got.tokens == without_stop(want, stops), (width, penalty, seed, q)
            assert got.stopped == (want[-1] in stops)
            stopped_early += got.stopped and len(want) < NEW_TOKENS
    assert stopped_early >= 3  # the stop-token paths were exercised, not only max_new_tokens


@pytest.mark.parametrize("model_type", ["F32", "F16"])
def test_engine_beams_equal_transformers_beam_search(tiny_llm_bundle, tiny_reference_llm, reference_beams,
                                                     model_type):
    """Upstream's decoding (2 beams, the default for open and caption prompts): token-identical answers."""
    ref = tiny_reference_llm
    options = EXACT if model_type == "F32" else EngineOptions(model_type="F16", n_threads=1)
    differs_from_greedy = 0
    with LlmEngine.from_bundle(load_bundle(tiny_llm_bundle), options) as engine:
        assert engine.stop_ids == ref.stop_ids
        for seed in SEEDS:
            engine.set_audio(audio(seed))
            for q in QUESTIONS:
                got = engine.ask(Prompt(id="p", kind="caption", question=q, max_new_tokens=NEW_TOKENS))
                want = reference_beams[(seed, q)]
                assert (got.decoding, got.num_beams) == ("beam", 2)
                assert got.token_ids == without_stop(want, ref.stop_ids), (seed, q)
                assert got.stopped == (want[-1] in ref.stop_ids)
                assert got.text == ref.decode(want).strip()
                greedy = engine.ask(Prompt(id="g", kind="caption", question=q, max_new_tokens=NEW_TOKENS,
                                           num_beams=1))
                assert (greedy.decoding, greedy.num_beams) == ("greedy", 1)
                differs_from_greedy += greedy.token_ids != got.token_ids
    assert differs_from_greedy >= 2  # beam search is not greedy under another name


def test_engine_beams_stop_where_transformers_stops(tiny_llm_bundle, tiny_reference_llm, reference_beams, tmp_path):
    """A bundle whose manifest lists extra stop tokens (tokens the answers produce): hypotheses finish at different
    lengths, the early-stop heuristic ends searches, and beams that survive or branch re-use sequences. Widths 2 and
    3, and a prompt with a length penalty."""
    ref = tiny_reference_llm
    copy = shutil.copytree(tiny_llm_bundle, tmp_path / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    with LlmEngine.from_bundle(load_bundle(copy), EXACT) as engine:
        early = [reference_beams[(seed, q)][k] for k in (2, 1, 3) for seed in SEEDS for q in QUESTIONS]
        extra = []
        for t in early:  # stop tokens are texts in the manifest: take tokens whose text tokenises back to them
            if t not in extra and t not in ref.stop_ids and engine.tokenize(engine.detokenize([t], special=True)) == [t]:
                extra.append(t)
        extra = extra[:4]
        texts = [engine.detokenize([t], special=True) for t in extra]
    assert len(extra) == 4
    manifest["llm"]["prompt"]["stop_tokens"] += texts
    manifest["llm"]["token_ids"]["stop"] += extra
    (copy / "manifest.json").write_text(json.dumps(manifest))
    stops = ref.stop_ids + tuple(extra)
    stopped = 0
    with LlmEngine.from_bundle(load_bundle(copy), EXACT) as engine:
        assert engine.stop_ids == stops
        for seed in SEEDS:
            a = audio(seed)
            engine.set_audio(a)
            for q, width, penalty in ((QUESTIONS[0], 2, 1.0), (QUESTIONS[1], 3, 1.0), (QUESTIONS[2], 2, 0.5)):
                want = ref.generate_beam(torch.from_numpy(a), q, num_beams=width, max_new_tokens=NEW_TOKENS,
                                         stop_ids=stops, length_penalty=penalty)
                got = engine.ask(Prompt(id="p", kind="open", question=q, max_new_tokens=NEW_TOKENS, num_beams=width,
                                        length_penalty=penalty))
                assert got.token_ids == without_stop(want, stops), (seed, q, width)
                assert got.stopped == (want[-1] in stops)
                stopped += got.stopped
    assert stopped >= 2


def test_beam_state_machine_rules():
    """Hand-made logits: a stop token among the first num_beams ends a hypothesis; the best finished one wins."""
    stop = 5

    def rows(*ps):
        return np.log(np.asarray(ps, dtype=np.float64))

    s = BeamSearch(2, 4, [stop])
    # step 1: best token is the stop (p .5) -> finished with score log .5 / 1; beams run on tokens 1 (.3) and 2 (.1)
    chosen = s.step(rows([0.05, 0.3, 0.1, 0.02, 0.03, 0.5]))
    assert chosen == [(0, 1), (0, 2)] and s.finished == [(pytest.approx(np.log(0.5)), (), True)]
    # step 2: every continuation is worse than log .5 once normalised: the beams cannot beat two finished ones
    chosen = s.step(rows([0.1, 0.1, 0.1, 0.1, 0.1, 0.5], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]))
    assert chosen is None and s.done
    assert s.tokens == () and s.stopped
    with pytest.raises(RuntimeError):
        s.step(rows([1, 1, 1, 1, 1, 1]))
    # max_new_tokens ends unfinished beams: the best of them by sum / length
    s = BeamSearch(2, 1, [stop])
    assert s.step(rows([0.1, 0.6, 0.2, 0.05, 0.03, 0.02])) is None
    assert s.tokens == (1,) and not s.stopped
    with pytest.raises(ValueError):
        BeamSearch(0, 4, [stop])


def test_num_beams_is_checked():
    with pytest.raises(ConfigError, match="num_beams is for open and caption"):
        Prompt(id="x", kind="yes_no", question="?", num_beams=2)
    with pytest.raises(ConfigError, match=r"num_beams must be 1\.\.8"):
        Prompt(id="x", kind="open", question="?", num_beams=9)
    assert Prompt(id="x", kind="open", question="?").beams == 2
    assert Prompt(id="x", kind="count", question="?").decoding == "greedy"
    assert Prompt(id="x", kind="yes_no", question="?").decoding is None
