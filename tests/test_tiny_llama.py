"""The random stand-in for Llama-3.1-8B-Instruct must look like the real directory to every consumer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaForCausalLM

from export.tiny_llama import (
    LLAMA3_SPECIAL_TOKENS,
    PRESETS,
    build_tokenizer,
    llama_config,
    special_token_ids,
    write_llama_dir,
    write_tokenizer_files,
)

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
NATURELM_TEXTS = [
    "What is the common name for the focal species in the audio? Answer:",
    "Caption the audio.",
    "Is there a American Crow in the audio? Answer Yes or No.",
    "How many individuals are vocalizing?",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_llama")
    write_llama_dir(out, "tiny", seed=0)
    return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_same_seed_gives_identical_bytes_and_another_seed_other_weights(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_llama_dir(a, "tiny", seed=7)
    write_llama_dir(b, "tiny", seed=7)
    write_llama_dir(c, "tiny", seed=8)
    assert {p.name for p in a.iterdir()} == EXPECTED_FILES
    for name in EXPECTED_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    # The tokenizer is trained from a fixed corpus: the seed only drives the weights.
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_tokenizer_training_is_deterministic_across_processes():
    here = build_tokenizer("tiny").to_str()
    assert build_tokenizer("tiny").to_str() == here
    # Rust hash maps are seeded per process, so a fresh interpreter is the real test of the trainer's tie-breaking.
    code = (
        "import sys; from export.tiny_llama import build_tokenizer; sys.stdout.write(build_tokenizer('tiny').to_str())"
    )
    root = Path(__file__).resolve().parents[1]
    other = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    ).stdout
    assert other == here


def test_config_matches_llama31_layout(tiny_dir):
    cfg = _read_json(tiny_dir / "config.json")
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert cfg["max_position_embeddings"] == 131072
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["tie_word_embeddings"] is False
    assert cfg["hidden_act"] == "silu"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (256, 2, 4)
    assert (cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"]) == (2, 512, 768)
    for preset in PRESETS.values():
        # llama.cpp K-quants work on 256-wide blocks of each row.
        assert preset.hidden_size % 256 == 0 and preset.intermediate_size % 256 == 0


def test_special_token_ids_agree_everywhere(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = special_token_ids(tok)
    assert len(tok) == 768
    assert sorted(ids.values()) == list(range(512, 768))
    assert [ids[t] for t in LLAMA3_SPECIAL_TOKENS] == list(range(512, 768))
    bos, eot, eos, eom = ids["<|begin_of_text|>"], ids["<|eot_id|>"], ids["<|end_of_text|>"], ids["<|eom_id|>"]
    assert (bos, eos, eom, eot) == (512, 513, 520, 521)

    cfg = _read_json(tiny_dir / "config.json")
    gen = _read_json(tiny_dir / "generation_config.json")
    assert cfg["bos_token_id"] == gen["bos_token_id"] == bos == tok.bos_token_id
    assert cfg["eos_token_id"] == gen["eos_token_id"] == [eos, eom, eot]
    assert (gen["do_sample"], gen["temperature"], gen["top_p"]) == (True, 0.6, 0.9)

    tcfg = _read_json(tiny_dir / "tokenizer_config.json")
    assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tcfg["bos_token"] == "<|begin_of_text|>" and tcfg["eos_token"] == "<|eot_id|>"
    assert tok.eos_token_id == eot
    declared = {int(k): v["content"] for k, v in tcfg["added_tokens_decoder"].items()}
    assert declared == {i: t for t, i in ids.items()}
    assert all(v["special"] for v in tcfg["added_tokens_decoder"].values())
    smap = _read_json(tiny_dir / "special_tokens_map.json")
    assert smap["bos_token"]["content"] == "<|begin_of_text|>" and smap["eos_token"]["content"] == "<|eot_id|>"
    # No regular token may be special.
    assert all(tok.convert_ids_to_tokens(i) not in ids for i in range(512))


def test_small_tokenizer_uses_the_real_llama3_ids(tmp_path):
    write_tokenizer_files(tmp_path, "small")
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 128256 == llama_config("small")["vocab_size"]
    ids = special_token_ids(tok)
    assert ids["<|begin_of_text|>"] == 128000
    assert ids["<|end_of_text|>"] == 128001
    assert ids["<|finetune_right_pad_id|>"] == 128004
    assert ids["<|start_header_id|>"] == 128006
    assert ids["<|end_header_id|>"] == 128007
    assert ids["<|eom_id|>"] == 128008
    assert ids["<|eot_id|>"] == 128009
    assert ids["<|python_tag|>"] == 128010
    assert ids["<|reserved_special_token_247|>"] == 128255
    cfg = llama_config("small")
    assert cfg["bos_token_id"] == 128000 and cfg["eos_token_id"] == [128001, 128008, 128009]
    # The trained tokens come first and encode identically to tiny; filler ids are never produced.
    tiny = build_tokenizer("tiny")
    for text in NATURELM_TEXTS:
        small_ids = tok(text, add_special_tokens=False)["input_ids"]
        assert small_ids == tiny.encode(text, add_special_tokens=False).ids
        assert max(small_ids) < 512


def test_tokenizer_is_llama3_shaped_and_encodes_prompts_compactly(tiny_dir):
    spec = _read_json(tiny_dir / "tokenizer.json")
    assert spec["model"]["type"] == "BPE" and spec["model"]["ignore_merges"] is True
    pre = spec["pre_tokenizer"]["pretokenizers"]
    assert [p["type"] for p in pre] == ["Split", "ByteLevel"]
    assert pre[0]["behavior"] == "Isolated" and pre[1]["use_regex"] is False and pre[1]["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel"

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert tok("Caption the audio.")["input_ids"][0] == bos
    assert tok("Caption the audio.", add_special_tokens=False)["input_ids"][0] != bos
    for text in NATURELM_TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) * 2.5 < len(text.encode("utf-8")), (text, tok.convert_ids_to_tokens(ids))
        assert tok.decode(ids) == text
    for word in ("Yes", " Yes", "No", " No", "\n\n"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    # Byte-level: any text round-trips, including what the corpus never saw.
    odd = "Ça chante — 鳥の声 🐦\t\r\n 12345"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Caption the audio."}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert text.endswith(
        "<|start_header_id|>user<|end_header_id|>\n\nCaption the audio.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_safetensors_keys_dtype_and_metadata(tiny_dir):
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        expected |= {p + f"self_attn.{m}_proj.weight" for m in "qkvo"}
        expected |= {p + f"mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    assert keys == expected
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert tensors["model.embed_tokens.weight"].shape == (768, 256)
    assert tensors["lm_head.weight"].shape == (768, 256)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (128, 256)
    assert tensors["model.layers.1.mlp.down_proj.weight"].shape == (256, 512)
    norm = tensors["model.layers.0.input_layernorm.weight"].float()
    assert 0.8 < norm.mean() < 1.2 and norm.std() > 0.01


def test_hf_loads_it_and_activations_stay_sane(tiny_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.rope_scaling["rope_type"] == "llama3"
    greedy_next = set()
    for text in NATURELM_TEXTS:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        for h in out.hidden_states:
            rms = h.float().pow(2).mean().sqrt()
            assert torch.isfinite(h).all() and 0.1 < rms < 50, rms
        logits = out.logits[0].float()
        assert torch.isfinite(logits).all()
        assert 0.3 < logits.std(dim=-1).min() and logits.std(dim=-1).max() < 10
        # Not one token everywhere: the argmax moves with the position.
        assert len(set(logits.argmax(-1).tolist())) > logits.shape[0] // 2
        greedy_next.add(int(logits[-1].argmax()))
    assert len(greedy_next) > 1


def test_unknown_preset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown Llama preset"):
        write_llama_dir(tmp_path, "huge", seed=0)
