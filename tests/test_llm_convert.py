"""Llama (+ NatureLM LoRA) -> GGUF: the transforms llama.cpp needs, the metadata it reads, streaming, and errors that
name the file and tensor."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from edge.errors import CheckpointError, ConfigError
from quantize.convert import (
    llama3_rope_factors,
    open_naturelm_language_side,
    permute_qk,
    write_lora_adapter_gguf,
    write_model_gguf,
)
from quantize.llama_source import LLAMA3_SPLIT_PATTERN, TOKEN_CONTROL, open_llama_dir
from quantize.safetensors_stream import StreamingSafetensors


def _tensors(path: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: np.array(t.data) for t in reader.tensors}


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.fields[key]
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.contents(i) for i in range(len(f.data))]
    return f.contents()


# ---------------------------------------------------------------------------------------------------------- transforms


def test_permute_qk_turns_rotate_half_into_adjacent_pairs():
    """Hugging Face's rope rotates (x[i], x[i + d/2]); llama.cpp's rotates (x[2i], x[2i + 1]). After the permutation,
    llama.cpp's rotation of the permuted projection equals the permuted Hugging Face rotation."""
    rng = np.random.default_rng(0)
    n_heads, head_dim, hidden = 4, 16, 32
    w = rng.standard_normal((n_heads * head_dim, hidden))
    x = rng.standard_normal(hidden)
    theta = rng.uniform(0, 6.28, head_dim // 2)
    cos, sin = np.cos(theta), np.sin(theta)

    def hf_rope(q):  # per head: [a | b] -> [a cos - b sin | b cos + a sin]
        q = q.reshape(n_heads, 2, head_dim // 2)
        a, b = q[:, 0], q[:, 1]
        return np.stack([a * cos - b * sin, b * cos + a * sin], axis=1).reshape(-1)

    def ggml_rope(q):  # per head: pairs (q[2i], q[2i+1]) rotated by theta_i
        q = q.reshape(n_heads, head_dim // 2, 2)
        a, b = q[..., 0], q[..., 1]
        return np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(-1)

    expected = permute_qk(hf_rope(w @ x)[:, None], n_heads)[:, 0]
    np.testing.assert_allclose(ggml_rope(permute_qk(w, n_heads) @ x), expected, rtol=1e-12, atol=1e-12)


def test_llama3_rope_factors_reproduce_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling,
                      max_position_embeddings=131072)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (500000.0 ** (np.arange(0, 128, 2, dtype=np.float64) / 128))
    factors = llama3_rope_factors(128, 500000.0, scaling)
    assert factors.shape == (64,) and factors.dtype == np.float32
    assert factors[0] == 1.0 and factors[-1] == 8.0 and np.any((factors > 1) & (factors < 8))
    np.testing.assert_allclose(base / factors, inv_freq.numpy(), rtol=1e-6)


# -------------------------------------------------------------------------------------------------- the written GGUF


def test_gguf_metadata_tokenizer_and_tensors(tiny_llm_bundle, tiny_model):
    src = open_llama_dir(tiny_model[1])
    hp = src.hparams
    reader = gguf.GGUFReader(str(tiny_llm_bundle / "llm-f32.gguf"))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.file_type") == 0
    assert _field(reader, "llama.embedding_length") == hp.n_embd
    assert _field(reader, "llama.attention.head_count_kv") == hp.n_head_kv
    assert _field(reader, "llama.rope.dimension_count") == hp.head_dim
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges")
    assert len(tokens) == len(types) == hp.n_vocab + 1 and tokens[-1] == "[PAD]"
    assert merges and merges == src.vocab.merges
    assert tokens[:hp.n_vocab] == src.vocab.tokens
    for special in ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "[PAD]"):
        assert types[tokens.index(special)] == TOKEN_CONTROL
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokens.index("<|begin_of_text|>")
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokens.index("<|eot_id|>")  # the Instruct eos
    assert _field(reader, "tokenizer.ggml.eot_token_id") == tokens.index("<|eot_id|>")
    assert _field(reader, "tokenizer.ggml.padding_token_id") == hp.n_vocab
    assert "bos_token" in _field(reader, "tokenizer.chat_template")

    t = _tensors(tiny_llm_bundle / "llm-f32.gguf")
    expected = {"rope_freqs.weight", "token_embd.weight", "output_norm.weight", "output.weight"}
    for layer in range(hp.n_layer):
        expected |= {f"blk.{layer}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                         "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(t) == expected
    assert t["token_embd.weight"].shape == (hp.n_vocab + 1, hp.n_embd)
    np.testing.assert_array_equal(t["rope_freqs.weight"],
                                  llama3_rope_factors(hp.head_dim, hp.rope_theta, hp.rope_scaling))
    # the norms stay float32 in the F16 file
    r16 = gguf.GGUFReader(str(tiny_llm_bundle / "llm-f16.gguf"))
    kinds = {t.name: t.tensor_type for t in r16.tensors}
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16


def test_pad_row_and_merged_lora_values(tiny_llm_bundle, tiny_reference_llm):
    """The [PAD] rows are the mean rows the reference makes, and the merged, permuted q/k/v equal the reference's
    merged weights (float32 GGUF: exact up to the reference's own rounding)."""
    t = _tensors(tiny_llm_bundle / "llm-f32.gguf")
    model = tiny_reference_llm.model
    embed = model.get_input_embeddings().weight.detach().numpy()
    head = model.get_output_embeddings().weight.detach().numpy()
    np.testing.assert_allclose(t["token_embd.weight"], embed, rtol=0, atol=1e-6)
    np.testing.assert_allclose(t["output.weight"], head, rtol=0, atol=1e-6)
    cfg = model.config
    for layer in range(cfg.num_hidden_layers):
        attn = model.model.layers[layer].self_attn
        np.testing.assert_array_equal(t[f"blk.{layer}.attn_v.weight"], attn.v_proj.weight.detach().numpy())
        np.testing.assert_array_equal(t[f"blk.{layer}.attn_q.weight"],
                                      permute_qk(attn.q_proj.weight.detach().numpy(), cfg.num_attention_heads))
        np.testing.assert_array_equal(t[f"blk.{layer}.attn_k.weight"],
                                      permute_qk(attn.k_proj.weight.detach().numpy(), cfg.num_key_value_heads))


def test_adapter_gguf_layout(tiny_llm_adapter_bundle, tiny_model):
    reader = gguf.GGUFReader(str(tiny_llm_adapter_bundle / "llm-lora.gguf"))
    assert _field(reader, "general.type") == "adapter"
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "adapter.type") == "lora"
    assert _field(reader, "adapter.lora.alpha") == 16.0
    t = _tensors(tiny_llm_adapter_bundle / "llm-lora.gguf")
    assert len(t) == 2 * 4 * 2
    assert t["blk.1.attn_k.weight.lora_a"].shape == (8, 256)  # numpy order [r, in] = ggml ne [in, r]
    assert t["blk.1.attn_k.weight.lora_b"].shape == (128, 8)  # [out, r]
    state = load_file(str(tiny_model[0] / "model.safetensors"))
    b = state["llama_model.base_model.model.model.layers.1.self_attn.k_proj.lora_B.default.weight"].numpy()
    np.testing.assert_array_equal(t["blk.1.attn_k.weight.lora_b"], permute_qk(b, 2))


# ----------------------------------------------------------------------------------------------------------- streaming


def test_row_chunking_bounds_buffers_and_changes_no_byte(tiny_model, tmp_path):
    """Conversion holds one row chunk (or one attention matrix) at a time; the chunk size does not change the file."""
    naturelm_dir, llama_dir = tiny_model
    src = open_llama_dir(llama_dir)
    side = open_naturelm_language_side(naturelm_dir, src.hparams, src.hparams.n_vocab + 1)
    whole = write_model_gguf(src, tmp_path / "a.gguf", "F16", side, 1.0, chunk_bytes=1 << 30, progress=False)
    small = write_model_gguf(src, tmp_path / "b.gguf", "F16", side, 1.0, chunk_bytes=4096, progress=False)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    embed_f32 = src.hparams.n_vocab * src.hparams.n_embd * 4  # the Llama's rows; the [PAD] row follows alone
    attn_f32 = src.hparams.n_embd * src.hparams.n_embd * 4  # q/o, the largest LoRA target, handled whole
    assert whole.largest_buffer >= embed_f32
    assert small.largest_buffer <= attn_f32 < embed_f32


def test_streaming_reader_matches_safetensors(tiny_model):
    st = StreamingSafetensors.from_directory(tiny_model[1])
    ref = load_file(str(tiny_model[1] / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight"):
        np.testing.assert_array_equal(np.concatenate(list(st.iter_rows(name, 1000))), ref[name].float().numpy())


# -------------------------------------------------------------------------------------------------- errors that name


def _copy_llama(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model[1], tmp_path / "llama"))


def _mutate_weights(directory: Path, mutate) -> None:
    path = directory / "model.safetensors"
    state = load_file(str(path))
    mutate(state)
    save_file(state, str(path), metadata={"format": "pt"})


def _drop(key):
    return lambda s: s.pop(key)


def _add(key, value):
    return lambda s: s.__setitem__(key, value)


def _reshape(key):
    return lambda s: s.__setitem__(key, s[key][:-1].clone())


@pytest.mark.parametrize(
    "mutate, match",
    [
        (_drop("model.layers.1.mlp.up_proj.weight"), r"model\.safetensors: missing tensor model\.layers\.1\.mlp\.up_proj"),
        (_reshape("model.layers.0.self_attn.k_proj.weight"),
         r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape \(127, 256\)"),
        (_add("model.layers.2.mlp.up_proj.weight", torch.zeros(2, 2)),
         r"unexpected tensor model\.layers\.2\.mlp\.up_proj\.weight"),
    ],
    ids=["missing", "shape", "unknown"],
)
def test_broken_weights_name_the_tensor(tiny_model, tmp_path, mutate, match):
    llama = _copy_llama(tiny_model, tmp_path)
    _mutate_weights(llama, mutate)
    with pytest.raises(CheckpointError, match=match):
        open_llama_dir(llama)


def test_truncated_weights_file_is_named(tiny_model, tmp_path):
    llama = _copy_llama(tiny_model, tmp_path)
    path = llama / "model.safetensors"
    os.truncate(path, path.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* truncated"):
        open_llama_dir(llama)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_missing_file_is_named(tiny_model, tmp_path, name):
    llama = _copy_llama(tiny_model, tmp_path)
    (llama / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        open_llama_dir(llama)


def test_wrong_config_and_tokenizer_are_named(tiny_model, tmp_path):
    llama = _copy_llama(tiny_model, tmp_path)
    cfg = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps(dict(cfg, vocab_size=900)))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: the tokenizer has 768 tokens but config\.json"):
        open_llama_dir(llama)
    (llama / "config.json").write_text(json.dumps(dict(cfg, rope_scaling={"rope_type": "yarn", "factor": 4.0})))
    with pytest.raises(CheckpointError, match=r"config\.json: rope_scaling type 'yarn'"):
        open_llama_dir(llama)
    (llama / "config.json").write_text(json.dumps(cfg))
    tok = (llama / "tokenizer.json").read_text()
    (llama / "tokenizer.json").write_text(tok.replace(json.dumps(LLAMA3_SPLIT_PATTERN)[1:-1], "\\\\s+"))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: the pre-tokenizer is not Llama 3's"):
        open_llama_dir(llama)


def test_lora_that_does_not_fit_the_llama_is_named(tiny_model, tmp_path):
    naturelm = Path(shutil.copytree(tiny_model[0], tmp_path / "naturelm"))
    key = "llama_model.base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"
    _mutate_weights(naturelm, lambda s: s.__setitem__(key, torch.zeros(200, 8)))
    src = open_llama_dir(tiny_model[1])
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + r" has shape \(200, 8\)"):
        open_naturelm_language_side(naturelm, src.hparams, src.hparams.n_vocab + 1)


def test_cli_reports_a_wrong_directory_in_one_line(tiny_model, tmp_path, capsys):
    from edge.cli import main

    rc = main(["quantize", "--naturelm", str(tiny_model[0]), "--llama", str(tmp_path / "nope"),
               "--out", str(tmp_path / "bundle"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == f"naturelm-edge: error: {tmp_path / 'nope'}: Llama directory not found"
    assert not (tmp_path / "bundle").exists()
    rc = main(["quantize", "--naturelm", str(tiny_model[0]), "--llama", str(tiny_model[1]),
               "--out", str(tmp_path / "bundle"), "--type", "Q4_K_M,Q3_K"])
    assert rc == 2 and "unknown model type 'Q3_K'" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        from quantize.build import parse_types

        parse_types("")


def test_adapter_needs_a_lora(tiny_model, tmp_path):
    naturelm = Path(shutil.copytree(tiny_model[0], tmp_path / "naturelm"))
    src = open_llama_dir(tiny_model[1])
    side = open_naturelm_language_side(naturelm, src.hparams, src.hparams.n_vocab + 1)
    side.lora_keys = {}
    with pytest.raises(CheckpointError, match="no LoRA"):
        write_lora_adapter_gguf(src, side, tmp_path / "x.gguf", progress=False)


# ------------------------------------------------------------------------------------------------- memory (slow)


@pytest.mark.slow
def test_conversion_memory_is_bounded_on_the_small_preset(tmp_path_factory):
    """The bound: peak RSS < 1.5 GiB while converting the ~3 GB (bf16) Llama-3.2-1B-shaped preset to a ~3 GB F16
    GGUF, i.e. the interpreter (+ torch, imported by the NatureLM checkpoint loader) + one attention matrix in float64
    + a few 32 MB row chunks. For Llama-3.1-8B the same terms give well under 2 GiB (a 4096 x 4096 q_proj is 128 MB in
    float64), against a 16 GB model. Builds the small preset (about a minute and ~6 GB of disk): `-m slow`."""
    from export.tiny_model import build_tiny_model
    from quantize.peak_rss import measure

    root = tmp_path_factory.mktemp("small")
    naturelm_dir, llama_dir = build_tiny_model(root, preset="small", seed=0)
    run = measure(["cli", "quantize", "--naturelm", str(naturelm_dir), "--llama", str(llama_dir), "--out",
                   str(root / "bundle"), "--type", "F16", "--no-quality", "--no-progress"],
                  report=root / "rss.json", log=root / "quantize.log")
    assert run["rc"] == 0, (root / "quantize.log").read_text()[-2000:]
    peak, seconds = run["peak_rss"], run["seconds"]
    model_bytes = (llama_dir / "model.safetensors").stat().st_size
    out_bytes = (root / "bundle" / "llm-f16.gguf").stat().st_size
    print(f"small preset: {model_bytes / 2**30:.2f} GiB model -> {out_bytes / 2**30:.2f} GiB F16 GGUF in "
          f"{seconds:.0f} s, peak RSS {peak / 2**30:.2f} GiB")
    assert peak < 1.5 * 2**30
    assert peak < model_bytes / 2
    shutil.rmtree(root, ignore_errors=True)  # 6 GB


def test_chat_template_is_read_from_chat_template_jinja(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    original = open_llama_dir(tiny_model[1]).vocab.chat_template
    assert original and "bos_token" in original
    # Recent transformers save the template as chat_template.jinja and leave it out of tokenizer_config.json.
    saved = tmp_path / "saved"
    AutoTokenizer.from_pretrained(str(tiny_model[1])).save_pretrained(str(saved))
    assert (saved / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((saved / "tokenizer_config.json").read_text())
    llama = _copy_llama(tiny_model, tmp_path)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(saved / name, llama / name)
    assert open_llama_dir(llama).vocab.chat_template == original
    # Both present: the file wins, as when transformers loads the directory.
    (llama / "chat_template.jinja").write_text("{{ bos_token }}edited", encoding="utf-8")
    cfg = json.loads((tiny_model[1] / "tokenizer_config.json").read_text())
    (llama / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert open_llama_dir(llama).vocab.chat_template == "{{ bos_token }}edited"
    assert AutoTokenizer.from_pretrained(str(llama)).chat_template == "{{ bos_token }}edited"
    (llama / "chat_template.jinja").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CheckpointError, match=r"chat_template\.jinja"):
        open_llama_dir(llama)
