"""The GGUF + llama.cpp engine against the PyTorch reference (export/reference_llm.py) on the same tiny weights.

Tolerances, and why:
- F32 GGUF, F32 KV cache, flash attention off: the same float32 arithmetic in another order (ggml's blocked dot products
  and its own rope/softmax/RMSNorm kernels against PyTorch's): max |logit difference| <= 1e-4 on logits of size ~5.
  Seen: ~3e-6. (With flash attention on, llama.cpp's CPU kernel rounds Q and K to f16 inside the attention: ~2e-3.)
- F16 GGUF (default engine settings): weights rounded to 11 significant bits (relative 2^-11 ~ 5e-4) and activations
  to f16 in the matrix products: <= 2e-2 absolute. Seen: ~3e-3.
- LoRA adapter at scale s against the weights merged at s (both F32): the adapter adds s * alpha/r * B(Ax) to W x at
  run time instead of folding it into W; the same tolerance as F32 (1e-4).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from edge.bundle import load_bundle
from edge.llm import EngineOptions, LlmEngine, Prompt
from quantize.quality import PROBE_QUESTIONS

F32_TOL = 1e-4
F16_TOL = 2e-2
EXACT = EngineOptions(model_type="F32", kv_cache_type="f32", flash_attn=False, n_threads=1)
QUESTIONS = PROBE_QUESTIONS[:4] + ("Is there a Gray Wolf in the audio? Answer Yes or No.", "Caption the audio. \n")


def audio(seed: int, n: int = 29, width: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


@pytest.fixture(scope="module")
def f32_engine(tiny_llm_bundle):
    with LlmEngine.from_bundle(load_bundle(tiny_llm_bundle), EXACT) as engine:
        yield engine


@pytest.fixture(scope="module")
def f16_engine(tiny_llm_bundle):
    with LlmEngine.from_bundle(load_bundle(tiny_llm_bundle), EngineOptions(model_type="F16", n_threads=1)) as engine:
        yield engine


def test_prompt_pieces_tokenise_identically(f32_engine, tiny_reference_llm):
    """llama_tokenize(parse_special=True) on the GGUF vocabulary == the Hugging Face tokenizer, piece by piece."""
    ref = tiny_reference_llm
    assert f32_engine.bos_id == ref.bos_id
    assert f32_engine.stop_ids == ref.stop_ids
    extra = ("What is the scientific name for the focal species in the audio? Answer:",
             "Is there an Egyptian Fruit Bat in the audio? Answer Yes or No.", "", "  How many?  ",
             "Ünïcödé ✓ 12345 <|eot_id|> inside", "\n\nnew\r\nlines\t\ttabs")
    for q in QUESTIONS + extra:
        before, after = ref.prompt_pieces(q)
        assert f32_engine.prefix_ids() == [ref.bos_id] + before, q
        assert f32_engine.suffix_ids(q) == after, q
    for word in ("Yes", "No", "American Crow", "Megaptera novaeangliae", "42", " Yes"):
        assert f32_engine.tokenize(word, parse_special=False) == ref.tokenizer(word, add_special_tokens=False)[
            "input_ids"]
    assert (f32_engine.yes_id, f32_engine.no_id) == (ref.single_token_id("Yes"), ref.single_token_id("No"))


def test_answer_text_decodes_like_the_reference(f32_engine, tiny_reference_llm):
    """Special tokens skipped and transformers' clean_up_tokenization_spaces applied (Llama 3's tokenizer sets it)."""
    for text in ("A bird sings . Is it a crow ? Yes , it is n't a raven ' s call !", "Ünïcödé ✓ 12 birds.",
                 "call<|eot_id|>"):
        ids = f32_engine.tokenize(text)
        assert f32_engine.answer_text(ids) == tiny_reference_llm.decode(ids).strip(), text


@pytest.mark.parametrize("seed", [0, 1])
def test_f32_logits_match_reference_at_every_position(f32_engine, tiny_reference_llm, seed):
    worst = 0.0
    for q in QUESTIONS:
        a = audio(seed)
        got = f32_engine.prompt_logits(a, q)
        want = tiny_reference_llm.logits(torch.from_numpy(a), q).numpy()
        assert got.shape == want.shape  # [1 + before + 29 + after, vocab + 1]
        worst = max(worst, float(np.abs(got - want).max()))
    print(f"F32 GGUF vs reference: max |logit diff| {worst:.2e}")
    assert worst <= F32_TOL


def test_f16_logits_match_reference(f16_engine, tiny_reference_llm):
    worst = 0.0
    for q in QUESTIONS:
        a = audio(2)
        got = f16_engine.prompt_logits(a, q)
        want = tiny_reference_llm.logits(torch.from_numpy(a), q).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
        assert got[-1].argmax() == want[-1].argmax()
    print(f"F16 GGUF vs reference: max |logit diff| {worst:.2e}")
    assert worst <= F16_TOL


@pytest.fixture(scope="module")
def reference_answers(tiny_reference_llm) -> dict:
    """The reference's greedy answers (24 new tokens at most) per (audio seed, question), computed once."""
    return {(seed, q): tiny_reference_llm.generate(torch.from_numpy(audio(seed)), q, max_new_tokens=24)
            for seed in (0, 3) for q in QUESTIONS}


@pytest.mark.parametrize("engine_name", ["f32_engine", "f16_engine"])
def test_greedy_answers_are_token_identical(request, engine_name, tiny_reference_llm, reference_answers):
    engine = request.getfixturevalue(engine_name)
    for seed in (0, 3):
        engine.set_audio(audio(seed))
        for q in QUESTIONS:
            got = engine.ask(Prompt(id="p", kind="open", question=q, max_new_tokens=24, num_beams=1))
            want = reference_answers[(seed, q)]
            want_ids = tuple(i for i in want if i not in tiny_reference_llm.stop_ids)
            assert got.token_ids == want_ids, q
            assert got.stopped == (want[-1] in tiny_reference_llm.stop_ids)
            assert got.text == tiny_reference_llm.decode(want).strip()


def test_yes_no_score_matches_reference(f32_engine, tiny_reference_llm):
    for seed in (0, 1, 2):
        a = audio(seed)
        f32_engine.set_audio(a)
        q = "Is there a American Crow in the audio? Answer Yes or No."
        got = f32_engine.ask(Prompt(id="crow", kind="yes_no", question=q))
        want = tiny_reference_llm.yes_no_score(torch.from_numpy(a), q)
        assert abs(got.score - want) <= 1e-5
        assert got.text == ("Yes" if want >= 0.5 else "No")


def test_label_scores_match_reference(f32_engine, tiny_reference_llm):
    """The label kind's scores are log P(label tokens + a stop token | prompt), normalised over the labels."""
    ref = tiny_reference_llm
    labels = ("American Crow", "Common Raven", "Blue Jay", "Song Sparrow")
    q = PROBE_QUESTIONS[0]
    a = audio(5)
    f32_engine.set_audio(a)
    got = f32_engine.ask(Prompt(id="species", kind="label", question=q, labels=labels))
    shares = ref.label_shares(torch.from_numpy(a), q, labels)
    np.testing.assert_allclose([got.scores[lab] for lab in labels], shares, atol=1e-5)
    assert got.text == labels[int(np.argmax(shares))]


@pytest.fixture(scope="module")
def merged_half_bundle(tiny_model, tmp_path_factory) -> Path:
    from quantize.build import build_llm_bundle

    out = tmp_path_factory.mktemp("merged_half") / "bundle"
    build_llm_bundle(*tiny_model, out, types=("F32",), merging_alpha=0.5, quality=False, threads=1, progress=False)
    return out


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_adapter_at_scale_equals_merged_at_scale(tiny_llm_adapter_bundle, tiny_llm_bundle, merged_half_bundle,
                                                 tiny_model, scale):
    merged_dir = merged_half_bundle if scale == 0.5 else tiny_llm_bundle
    a = audio(7)
    with LlmEngine.from_bundle(load_bundle(merged_dir), EXACT) as merged:
        want = np.concatenate([merged.prompt_logits(a, q) for q in QUESTIONS[:3]])
    options = EngineOptions(model_type="F32", kv_cache_type="f32", flash_attn=False, lora_scale=scale, n_threads=1)
    with LlmEngine.from_bundle(load_bundle(tiny_llm_adapter_bundle), options) as adapted:
        assert adapted.lora_scale == scale
        got = np.concatenate([adapted.prompt_logits(a, q) for q in QUESTIONS[:3]])
        adapted.set_lora_scale(0.0)  # and the scale really acts: the base model differs
        base = np.concatenate([adapted.prompt_logits(a, q) for q in QUESTIONS[:3]])
    worst = float(np.abs(got - want).max())
    print(f"adapter at {scale} vs merged at {scale}: max |logit diff| {worst:.2e}")
    assert worst <= F32_TOL
    assert float(np.abs(base - want).max()) > 100 * F32_TOL
    if scale == 0.5:  # and the merged-at-0.5 GGUF is the reference at merging_alpha 0.5
        from export.checkpoint import open_checkpoint
        from export.reference_llm import ReferenceLLM

        ckpt = open_checkpoint(tiny_model[0])
        ref = ReferenceLLM(tiny_model[1], ckpt.lora(), ckpt.config.lora_alpha, ckpt.config.lora_rank, 0.5)
        want_ref = np.concatenate([ref.logits(torch.from_numpy(a), q).numpy() for q in QUESTIONS[:3]])
        assert float(np.abs(got - want_ref).max()) <= F32_TOL


def test_carried_resized_rows_replace_the_llamas(tiny_model, tmp_path):
    """A NatureLM file that carries the [PAD]-resized embed_tokens/lm_head: the GGUF uses them, as the reference does."""
    from export.checkpoint import open_checkpoint
    from export.reference_llm import ReferenceLLM
    from quantize.build import build_llm_bundle

    naturelm_dir, llama_dir = tiny_model
    naturelm = Path(shutil.copytree(naturelm_dir, tmp_path / "naturelm"))
    llama = load_file(str(llama_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(11)
    rows = {}
    for name, key in (("embed_tokens", "model.embed_tokens.weight"), ("lm_head", "lm_head.weight")):
        old = llama[key].float()
        rows[name] = torch.cat([old, torch.randn(1, old.shape[1], generator=gen)]) + 0.05 * torch.randn(
            old.shape[0] + 1, old.shape[1], generator=gen)
    state = load_file(str(naturelm / "model.safetensors"))
    state["llama_embed_tokens.weight"] = rows["embed_tokens"].contiguous()
    state["llama_model.base_model.model.lm_head.weight"] = rows["lm_head"].contiguous()
    save_file(state, str(naturelm / "model.safetensors"), metadata={"format": "pt"})

    out = tmp_path / "bundle"
    build_llm_bundle(naturelm, llama_dir, out, types=("F32",), quality=False, threads=1, progress=False)
    ckpt = open_checkpoint(naturelm)
    assert set(ckpt.resized_rows()) == {"embed_tokens", "lm_head"}
    ref = ReferenceLLM(llama_dir, ckpt.lora(), ckpt.config.lora_alpha, ckpt.config.lora_rank, 1.0,
                       resized_rows=ckpt.resized_rows())
    a = audio(9)
    with LlmEngine.from_bundle(load_bundle(out), EXACT) as engine:
        for q in QUESTIONS[:2]:
            got = engine.prompt_logits(a, q)
            want = ref.logits(torch.from_numpy(a), q).numpy()
            assert float(np.abs(got - want).max()) <= F32_TOL
