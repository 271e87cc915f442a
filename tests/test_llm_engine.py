"""The device LLM engine: prefix sharing, prompt kinds, the bundle contract, quantized models, clear errors."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from edge.bundle import load_bundle
from edge.errors import BundleError, ConfigError
from edge.llm import EngineOptions, LlmEngine, Prompt, suffix_text
from edge.spec import PROMPT

WINDOW = (
    Prompt(id="crow", kind="yes_no", question="Is there a American Crow in the audio? Answer Yes or No."),
    Prompt(id="species", kind="label", question="What is the common name for the focal species in the audio? Answer:",
           labels=("American Crow", "Common Raven", "Blue Jay", "Song Sparrow", "Humpback Whale")),
    Prompt(id="caption", kind="caption", question="Caption the audio.", max_new_tokens=12),
    Prompt(id="count", kind="count", question="How many individuals are vocalizing?"),
    Prompt(id="stage", kind="open", question="What is the life stage of the focal species in the audio?",
           max_new_tokens=8),
)


def audio(seed: int, n: int = 29, width: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


@pytest.fixture(scope="module")
def engine(tiny_llm_bundle):
    with LlmEngine.from_bundle(load_bundle(tiny_llm_bundle), EngineOptions(model_type="F16", n_threads=1)) as e:
        yield e


def test_shared_prefix_gives_the_logits_of_a_fresh_prefill(engine):
    """Every prompt of a window, asked on the shared prefix after other prompts ran (their suffixes and answers
    dropped from the KV cache), gets bit for bit the logits of a fresh prefill of its own whole prompt (KV cache
    cleared, prefix and suffix decoded in the same batches). Against a prefill that also computes the logits of every
    earlier position (llama.cpp then runs the last layer on all rows, not only the output row), it agrees to float
    noise."""
    a = audio(0)
    fresh, every_position = {}, {}
    for p in WINDOW:
        engine.set_audio(a)
        fresh[p.id] = engine.answer_logits(p.question)[0].copy()
        every_position[p.id] = engine.prompt_logits(a, p.question)[-1]
    engine.set_audio(a)
    for p in WINDOW + WINDOW[::-1]:
        shared = engine.answer_logits(p.question)[0]
        engine.ask(p)  # leaves its suffix and answer in the cache: the next prompt must drop them
        np.testing.assert_array_equal(shared, fresh[p.id])
        np.testing.assert_allclose(shared, every_position[p.id], rtol=0, atol=1e-3)


def test_shared_window_equals_reprefilled_window(engine):
    a = audio(1)
    shared = engine.run_window(a, WINDOW)
    again = engine.run_window(a, WINDOW, share_prefix=False)
    assert shared.prefills == 1 and again.prefills == len(WINDOW)
    assert shared.prefix_tokens == len(engine.prefix_ids()) + 29
    for x, y in zip(shared.answers, again.answers):
        assert (x.prompt_id, x.text, x.token_ids) == (y.prompt_id, y.text, y.token_ids)
        assert x.score == pytest.approx(y.score, abs=1e-5) if x.score is not None else y.score is None


def test_prompt_kinds_answer_in_their_form(engine):
    window = engine.run_window(audio(2), WINDOW)
    by_id = {a.prompt_id: a for a in window.answers}
    yes_no = by_id["crow"]
    assert yes_no.text in ("Yes", "No") and 0.0 <= yes_no.score <= 1.0
    assert yes_no.token_ids == ((engine.yes_id,) if yes_no.text == "Yes" else (engine.no_id,))
    assert yes_no.scores["Yes"] + yes_no.scores["No"] == pytest.approx(1.0)
    assert yes_no.timings.decode_tokens == 0  # one forward pass
    label = by_id["species"]
    assert label.text in WINDOW[1].labels and math.isclose(sum(label.scores.values()), 1.0, rel_tol=1e-9)
    assert label.score == max(label.scores.values())
    caption = by_id["caption"]
    assert len(caption.token_ids) <= 12 and not set(caption.token_ids) & set(engine.stop_ids)
    count = by_id["count"]
    assert count.text.isdigit() and 0.0 < count.score <= 1.0 and 1 <= len(count.token_ids) <= 3
    for a in window.answers:
        assert a.timings.prompt_tokens == len(engine.suffix_ids(next(p for p in WINDOW if p.id == a.prompt_id)
                                                                  .question))
        assert a.timings.total_ms >= 0
    assert window.total_ms > window.prefix_ms > 0


def test_yes_no_is_one_forward_pass_of_the_logits(engine):
    a = audio(3)
    q = WINDOW[0].question
    logits = engine.prompt_logits(a, q)[-1].astype(np.float64)
    engine.set_audio(a)
    ans = engine.ask(WINDOW[0])
    p = 1 / (1 + math.exp(-(logits[engine.yes_id] - logits[engine.no_id])))
    assert ans.score == pytest.approx(p, abs=1e-6)


def test_suffix_text_follows_the_reference_strip():
    prompt = PROMPT.to_dict()
    assert suffix_text(prompt, "Caption the audio. \n") == "</Audio> Caption the audio." + PROMPT.after_question
    assert suffix_text(prompt, "") == "</Audio>" + PROMPT.after_question


def test_quantized_models_load_with_finite_logits_and_quality_reports(tiny_llm_bundle):
    bundle = load_bundle(tiny_llm_bundle)
    llm = bundle.section("llm")
    assert llm["default_model"] == "Q4_K_M"
    a = audio(4)
    for qtype in ("Q4_K_M", "Q8_0"):
        with LlmEngine.from_bundle(bundle, EngineOptions(model_type=qtype, n_threads=1)) as e:
            logits = e.prompt_logits(a, WINDOW[2].question)
            assert np.all(np.isfinite(logits))
            assert e.run_window(a, WINDOW).answers[0].text in ("Yes", "No")
        q = llm["models"][qtype]["quality"]
        assert q["reference"] == "F16" and q["positions"] >= q["prompts"] >= 8
        assert 0.0 <= q["kl_mean"] <= q["kl_max"] and math.isfinite(q["kl_max"])
        assert 0.0 <= q["top1_agreement"] <= 1.0
        # What a user sees, next to KL and top-1 (bounded end to end in tests/test_shipped_parity.py).
        assert q["yes_no_prompts"] == 2 and q["label_prompts"] == 1  # one probe clip
        assert 0.0 <= q["yes_no_abs_dp_mean"] <= q["yes_no_abs_dp_max"] < 0.5
        for key in ("yes_no_decision_agreement", "label_top1_agreement", "answer_token_agreement", "answers_identical"):
            assert 0.0 <= q[key] <= 1.0, key
        assert q["answers_identical"] <= q["answer_token_agreement"]
    models = llm["models"]
    assert models["Q8_0"]["quality"]["kl_mean"] < models["Q4_K_M"]["quality"]["kl_mean"]
    assert models["F32"]["quality"]["kl_max"] < models["Q8_0"]["quality"]["kl_mean"]
    # F32 against F16 differs only by F16's rounding: its answers and scores are nearly the F16's own.
    f32 = models["F32"]["quality"]
    assert f32["yes_no_abs_dp_max"] < models["Q4_K_M"]["quality"]["yes_no_abs_dp_max"]
    assert f32["yes_no_abs_dp_max"] < 0.01 and f32["answer_token_agreement"] >= 0.75
    assert models["F16"]["quality"] is None
    with LlmEngine.from_bundle(bundle, EngineOptions(n_threads=1)) as e:  # the default model
        assert e.model_type == "Q4_K_M"


def test_manifest_llm_section(tiny_llm_bundle, tiny_reference_llm):
    manifest = json.loads((tiny_llm_bundle / "manifest.json").read_text())
    llm = manifest["llm"]
    ref = tiny_reference_llm
    assert llm["n_embd"] == 256 and llm["n_vocab"] == len(ref.tokenizer) == 769
    assert llm["prompt"] == PROMPT.to_dict()
    assert llm["token_ids"] == {"bos": ref.bos_id, "stop": list(ref.stop_ids), "yes": ref.single_token_id("Yes"),
                                "no": ref.single_token_id("No"), "pad": ref.pad_id}
    assert llm["text"] == {"skip_special_tokens": True,
                           "clean_up_tokenization_spaces": ref.tokenizer.clean_up_tokenization_spaces}
    assert llm["lora"] == {"mode": "merge", "merging_alpha": 1.0, "adapter_file": None, "alpha": 16.0, "rank": 8}
    assert len(llm["source"]["llama_sha256"]) == 64 and len(manifest["source"]["llama"]["sha256"]) == 64
    assert {"gguf", "llama-cpp-python", "naturelm-edge"} <= set(llm["tools"])
    for info in llm["models"].values():
        assert info["file"] in manifest["files"]
    assert not any(p.name.startswith(".llm-work") for p in tiny_llm_bundle.iterdir())


def test_adapter_bundle_manifest(tiny_llm_adapter_bundle):
    llm = load_bundle(tiny_llm_adapter_bundle).section("llm")
    assert llm["lora"] == {"mode": "adapter", "merging_alpha": 1.0, "adapter_file": "llm-lora.gguf", "alpha": 16.0,
                           "rank": 8}
    assert set(llm["models"]) == {"F32"}


def test_errors_a_user_can_cause(tiny_llm_bundle, tmp_path):
    bundle = load_bundle(tiny_llm_bundle)
    with pytest.raises(BundleError, match=r"no LLM model 'Q6_K'; the bundle has F16, F32, Q4_K_M, Q8_0"):
        LlmEngine.from_bundle(bundle, EngineOptions(model_type="Q6_K", n_threads=1))
    with pytest.raises(ConfigError, match="needs a bundle built with --lora adapter"):
        LlmEngine.from_bundle(bundle, EngineOptions(model_type="Q8_0", lora_scale=0.5, n_threads=1))
    with pytest.raises(ConfigError, match="kind 'story'"):
        Prompt(id="x", kind="story", question="?")
    with pytest.raises(ConfigError, match="needs a non-empty labels list"):
        Prompt(id="x", kind="label", question="?")
    with LlmEngine.from_bundle(bundle, EngineOptions(model_type="Q8_0", n_ctx=64, n_threads=1)) as e:
        with pytest.raises(ValueError, match=r"audio embeddings must be \[n, 256\]"):
            e.set_audio(np.zeros((29, 128), np.float32))
        e.set_audio(audio(0))
        with pytest.raises(ConfigError, match="n_ctx is 64"):
            e.ask(Prompt(id="long", kind="open", question="word " * 40))
        with pytest.raises(ConfigError, match="does not fit the LLM context"):
            e.set_audio(audio(0, n=80))
    # a manifest whose token ids disagree with the GGUF's tokenizer is refused, naming the file
    copy = shutil.copytree(tiny_llm_bundle, tmp_path / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["llm"]["token_ids"]["yes"] = 5
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"llm-q8_0\.gguf: 'Yes' tokenises to \[\d+\], the manifest says \[5\]"):
        LlmEngine.from_bundle(load_bundle(copy), EngineOptions(model_type="Q8_0", n_threads=1))
    (copy / "llm-q8_0.gguf").write_bytes(b"GGUF broken")
    with pytest.raises(BundleError, match=r"llm-q8_0\.gguf: llama\.cpp could not load this GGUF"):
        LlmEngine(copy / "llm-q8_0.gguf", bundle.section("llm"))


def test_ask_without_audio_is_a_bug(tiny_llm_bundle):
    with LlmEngine.from_bundle(load_bundle(tiny_llm_bundle), EngineOptions(model_type="Q8_0", n_threads=1)) as e, \
            pytest.raises(RuntimeError, match="set_audio"):
        e.ask(WINDOW[0])
