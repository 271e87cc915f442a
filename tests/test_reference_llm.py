"""The reference LLM is the oracle for the GGUF side, so its prompt, LoRA merge and decoding are pinned down here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edge.errors import CheckpointError
from edge.spec import PROMPT
from export.reference_llm import ReferenceLLM
from export.tiny_llama import write_llama_dir

HIDDEN = 256
N_AUDIO = 29
QUESTION = "What is the common name for the focal species in the audio? Answer:"
DETECT = "Is there a American Crow in the audio? Answer Yes or No."


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_llama")
    write_llama_dir(out, "tiny", seed=0)
    return out


@pytest.fixture(scope="module")
def ref(llama_dir) -> ReferenceLLM:
    return ReferenceLLM(llama_dir, lora=None, lora_alpha=32, lora_rank=32)


def audio(seed: int, n: int = N_AUDIO) -> torch.Tensor:
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed))


def random_lora(rank: int, seed: int, layers=(0, 1)) -> dict:
    gen = torch.Generator().manual_seed(seed)
    kv = 128  # 2 KV heads x head_dim 64
    shapes = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (kv, HIDDEN), "v_proj": (kv, HIDDEN), "o_proj": (HIDDEN, HIDDEN)}
    lora = {}
    for layer in layers:
        for proj, (out_f, in_f) in shapes.items():
            a = torch.randn(rank, in_f, generator=gen) / in_f**0.5
            b = torch.randn(out_f, rank, generator=gen) / rank**0.5
            lora[f"model.layers.{layer}.self_attn.{proj}"] = (a, b)
    return lora


def enc(ref: ReferenceLLM, text: str) -> list[int]:
    return ref.tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------------------ prompt


def test_prompt_texts_follow_the_reference_template():
    before, after = ReferenceLLM.prompt_texts("Caption the audio.")
    assert before == "<|start_header_id|>user<|end_header_id|>\n\n<Audio>"
    assert after == "</Audio> Caption the audio.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert (before, after) == (PROMPT.before_audio, PROMPT.after_audio + "Caption the audio." + PROMPT.after_question)
    # The reference strips the whole instruction: only the question's trailing whitespace can go...
    assert ReferenceLLM.prompt_texts("Caption the audio. \n") == (before, after)
    assert ReferenceLLM.prompt_texts("  Caption the audio.")[1].startswith("</Audio>   Caption")
    # ...or, for an empty question, the space after </Audio>.
    assert ReferenceLLM.prompt_texts("")[1] == "</Audio>" + PROMPT.after_question
    with pytest.raises(ValueError, match="AudioHere"):
        ReferenceLLM.prompt_texts("<AudioHere> Caption the audio.")


def test_prompt_token_ids_piece_by_piece(ref):
    ids_before, ids_after = ref.prompt_pieces("Caption the audio.")
    sh, eh, eot, bos = (
        ref.tokenizer.convert_tokens_to_ids(t)
        for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>")
    )
    newlines = enc(ref, "\n\n")
    assert len(newlines) == 1
    assert ids_before == [sh] + enc(ref, "user") + [eh] + newlines + enc(ref, "<Audio>")
    assert ids_after == (enc(ref, "</Audio> Caption the audio.") + [eot, sh] + enc(ref, "assistant") + [eh] + newlines)
    assert bos not in ids_before + ids_after
    assert ref.tokenizer.decode(ids_before) == PROMPT.before_audio
    assert ref.tokenizer.decode(ids_after) == PROMPT.after_audio + "Caption the audio." + PROMPT.after_question


def test_prompt_embeds_splice_bos_text_audio_text(ref):
    a = audio(0)
    ids_before, ids_after = ref.prompt_pieces(QUESTION)
    embeds = ref.prompt_embeds(a, QUESTION)
    table = ref.model.get_input_embeddings().weight
    nb = len(ids_before)
    assert embeds.shape == (1 + nb + N_AUDIO + len(ids_after), HIDDEN)
    assert torch.equal(embeds[0], table[ref.bos_id])
    assert torch.equal(embeds[1 : 1 + nb], table[ids_before])
    assert torch.equal(embeds[1 + nb : 1 + nb + N_AUDIO], a)
    assert torch.equal(embeds[1 + nb + N_AUDIO :], table[ids_after])


def test_spliced_embeddings_equal_plain_token_input(ref):
    # Audio embeddings that are themselves token embeddings must give the logits of the plain token sequence.
    ids_before, ids_after = ref.prompt_pieces(QUESTION)
    middle = enc(ref, " a crow calls twice")
    fake_audio = ref.model.get_input_embeddings().weight[middle].detach()
    spliced = ref.logits(fake_audio, QUESTION)
    with torch.no_grad():
        plain = ref.model(input_ids=torch.tensor([[ref.bos_id] + ids_before + middle + ids_after])).logits[0]
    torch.testing.assert_close(spliced, plain, rtol=1e-5, atol=1e-5)


def test_audio_shape_is_checked(ref):
    with pytest.raises(ValueError, match=r"\[n_audio, 256\]"):
        ref.logits(torch.zeros(29, 128), QUESTION)
    with pytest.raises(ValueError, match="NaN"):
        ref.logits(torch.full((29, HIDDEN), float("nan")), QUESTION)


# ------------------------------------------------------------------------------------------------------------ [PAD]


def test_pad_token_grows_the_vocabulary_deterministically(ref):
    assert len(ref.tokenizer) == 769 and ref.pad_id == 768
    assert ref.tokenizer.pad_token == "[PAD]"
    embed = ref.model.get_input_embeddings().weight
    head = ref.model.get_output_embeddings().weight
    assert embed.shape == head.shape == (769, HIDDEN)
    torch.testing.assert_close(embed[768], embed[:768].mean(dim=0))
    torch.testing.assert_close(head[768], head[:768].mean(dim=0))
    assert ref.logits(audio(0), QUESTION).shape[-1] == 769


def test_resized_rows_from_the_checkpoint_replace_the_init(llama_dir):
    gen = torch.Generator().manual_seed(3)
    rows = {"embed_tokens": torch.randn(769, HIDDEN, generator=gen), "lm_head": torch.randn(769, HIDDEN, generator=gen)}
    r = ReferenceLLM(llama_dir, None, 32, 32, resized_rows=rows)
    assert torch.equal(r.model.get_input_embeddings().weight, rows["embed_tokens"])
    assert torch.equal(r.model.get_output_embeddings().weight, rows["lm_head"])
    with pytest.raises(CheckpointError, match="shape"):
        ReferenceLLM(llama_dir, None, 32, 32, resized_rows={"lm_head": torch.zeros(768, HIDDEN)})


# ------------------------------------------------------------------------------------------------------------ LoRA


def test_lora_at_merging_alpha_zero_is_the_base_model(ref, llama_dir):
    zero = ReferenceLLM(llama_dir, random_lora(4, seed=1), lora_alpha=8, lora_rank=4, merging_alpha=0.0)
    a = audio(2)
    assert torch.equal(zero.logits(a, QUESTION), ref.logits(a, QUESTION))


def test_lora_changes_the_logits_and_merges_by_the_formula(ref, llama_dir):
    lora = random_lora(4, seed=1)
    full = ReferenceLLM(llama_dir, lora, lora_alpha=8, lora_rank=4, merging_alpha=1.0)
    half = ReferenceLLM(llama_dir, lora, lora_alpha=8, lora_rank=4, merging_alpha=0.5)
    a = audio(2)
    assert (full.logits(a, QUESTION) - ref.logits(a, QUESTION)).abs().max() > 1e-2
    name = "model.layers.1.self_attn.v_proj"
    w0 = ref.model.get_submodule(name).weight
    la, lb = lora[name]
    for model, merging_alpha in ((full, 1.0), (half, 0.5)):
        expected = w0 + merging_alpha * (8 / 4) * (lb @ la)
        torch.testing.assert_close(model.model.get_submodule(name).weight, expected, rtol=1e-6, atol=1e-6)
    # Layers without a LoRA entry stay untouched.
    assert torch.equal(
        full.model.get_submodule("model.layers.0.mlp.up_proj").weight,
        ref.model.get_submodule("model.layers.0.mlp.up_proj").weight,
    )


def test_bad_lora_entries_are_named(llama_dir):
    a, b = torch.zeros(4, HIDDEN), torch.zeros(HIDDEN, 4)
    with pytest.raises(CheckpointError, match="model.layers.9.self_attn.q_proj"):
        ReferenceLLM(llama_dir, {"model.layers.9.self_attn.q_proj": (a, b)}, 8, 4)
    with pytest.raises(CheckpointError, match="do not fit"):
        ReferenceLLM(llama_dir, {"model.layers.0.self_attn.k_proj": (a, b)}, 8, 4)
    with pytest.raises(CheckpointError, match="rank 4 but lora_rank is 32"):
        ReferenceLLM(llama_dir, {"model.layers.0.self_attn.q_proj": (a, b)}, 32, 32)
    with pytest.raises(CheckpointError, match="not a Linear"):
        ReferenceLLM(llama_dir, {"model.layers.0.input_layernorm": (a, b)}, 8, 4)


# ------------------------------------------------------------------------------------------------------------ decoding


def test_generate_is_deterministic_and_depends_on_the_audio(ref):
    first = ref.generate(audio(0), QUESTION, max_new_tokens=12)
    assert ref.generate(audio(0), QUESTION, max_new_tokens=12) == first
    outputs = {tuple(ref.generate(audio(s), QUESTION, max_new_tokens=12)) for s in range(4)}
    assert len(outputs) >= 3
    # Not one token repeated: the random model must produce varied text for parity tests to mean anything.
    assert all(len(set(o)) > 3 for o in outputs)
    assert isinstance(ref.decode(first), str)


def test_kv_cache_decoding_equals_full_recompute(ref):
    a = audio(5)
    assert ref.generate(a, DETECT, max_new_tokens=10) == ref.generate(a, DETECT, max_new_tokens=10, use_cache=False)


def test_generate_stops_on_stop_ids(ref):
    base = ref.generate(audio(1), QUESTION, max_new_tokens=10)
    assert len(base) == 10 and not set(base) & set(ref.stop_ids)
    stop_at = next(i for i, t in enumerate(base) if t not in base[:i] and i >= 2)
    assert ref.generate(audio(1), QUESTION, max_new_tokens=10, stop_ids=[base[stop_at]]) == base[: stop_at + 1]
    assert ref.generate(audio(1), QUESTION, max_new_tokens=0) == []


def test_default_stops_are_the_generation_configs_eos_list(llama_dir):
    """Upstream's generate stops on generation_config.eos_token_id: <|end_of_text|>, <|eom_id|>, <|eot_id|>."""
    r = ReferenceLLM(llama_dir, None, 32, 32)
    tok = r.tokenizer
    assert r.stop_ids == tuple(tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))
    assert list(r.stop_ids) == r.model.generation_config.eos_token_id
    for stop in r.stop_ids:
        r = ReferenceLLM(llama_dir, None, 32, 32)
        first = r.generate(audio(0), QUESTION, max_new_tokens=1)[0]
        assert float(r.next_token_logits(audio(0), QUESTION)[first]) > 0
        with torch.no_grad():
            # Make the stop token the argmax of the first step: its logit becomes twice the old winner's.
            r.model.get_output_embeddings().weight[stop] = 2 * r.model.get_output_embeddings().weight[first]
        assert r.generate(audio(0), QUESTION, max_new_tokens=20) == [stop]
        assert r.decode([stop]) == ""


def test_yes_no_score_is_the_two_way_softmax(ref):
    yes, no = ref.single_token_id("Yes"), ref.single_token_id("No")
    assert yes != no
    scores = []
    for s in range(3):
        probs = torch.softmax(ref.next_token_logits(audio(s), DETECT).double(), dim=-1)
        expected = float(probs[yes] / (probs[yes] + probs[no]))
        score = ref.yes_no_score(audio(s), DETECT)
        assert 0.0 < score < 1.0
        assert score == pytest.approx(expected, rel=1e-9)
        scores.append(score)
    assert len(set(scores)) == 3
    with pytest.raises(ValueError, match="not a single token"):
        ref.single_token_id("Yes, a crow")
