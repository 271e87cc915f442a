"""Loading the release layout into the reference modules: every key accounted for, errors that name the key."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from edge.errors import CheckpointError, ConfigError
from export.checkpoint import load_audio_model, open_checkpoint
from export.tiny_model import write_naturelm_dir
from tests.conftest import LLAMA_TINY


@pytest.fixture()
def naturelm_dir(tmp_path):
    return write_naturelm_dir(tmp_path / "naturelm", "tiny", 1, LLAMA_TINY)


def _rewrite(directory, mutate):
    path = directory / "model.safetensors"
    state = load_file(str(path))
    mutate(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_tiny_checkpoint_loads_every_key(naturelm_dir):
    ckpt = open_checkpoint(naturelm_dir)
    model = load_audio_model(ckpt)  # strict: raises on any missing or unexpected key
    assert ckpt.llm_width == LLAMA_TINY["hidden_size"]
    lora = ckpt.lora()
    assert len(lora) == 4 * LLAMA_TINY["num_hidden_layers"]
    a, b = lora["model.layers.1.self_attn.k_proj"]
    assert a.shape == (8, 256) and b.shape == (128, 8)
    # the folded pos_conv weight is the weight-norm product of the stored g and v
    state = load_file(str(naturelm_dir / "model.safetensors"))
    g, v = state["beats.encoder.pos_conv.0.weight_g"], state["beats.encoder.pos_conv.0.weight_v"]
    want = g * v / v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
    torch.testing.assert_close(model.beats.encoder.pos_conv[0].weight, want)


def test_renamed_key_is_reported_by_name(naturelm_dir):
    def rename(s):
        s["beats.encoder.layers.1.fc1.weights"] = s.pop("beats.encoder.layers.1.fc1.weight")

    _rewrite(naturelm_dir, rename)
    with pytest.raises(CheckpointError) as e:
        load_audio_model(open_checkpoint(naturelm_dir))
    assert "beats.encoder.layers.1.fc1.weight" in str(e.value)


def test_unknown_key_family_is_reported_by_name(naturelm_dir):
    _rewrite(naturelm_dir, lambda s: s.__setitem__("llama_model.something.else", torch.zeros(1)))
    with pytest.raises(CheckpointError, match="unexpected keys: llama_model.something.else"):
        open_checkpoint(naturelm_dir)


def test_removed_key_is_reported_by_name(naturelm_dir):
    _rewrite(naturelm_dir, lambda s: s.pop("audio_Qformer.bert.encoder.layer.0.crossattention.self.key.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys: .*crossattention\.self\.key\.bias"):
        load_audio_model(open_checkpoint(naturelm_dir))


def test_removed_lora_half_is_reported_by_name(naturelm_dir):
    key = "llama_model.base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight"
    _rewrite(naturelm_dir, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        open_checkpoint(naturelm_dir)


def test_wrong_shape_is_reported(naturelm_dir):
    _rewrite(naturelm_dir, lambda s: s.__setitem__("ln_audio.weight", torch.ones(65)))
    with pytest.raises(CheckpointError, match=r"ln_audio\.weight has shape \(65,\)"):
        load_audio_model(open_checkpoint(naturelm_dir))


def test_parametrization_names_load_the_same(naturelm_dir, tmp_path):
    reference = load_audio_model(open_checkpoint(naturelm_dir))
    other = tmp_path / "other"
    shutil.copytree(naturelm_dir, other)

    def to_parametrizations(s):
        s["beats.encoder.pos_conv.0.parametrizations.weight.original0"] = s.pop("beats.encoder.pos_conv.0.weight_g")
        s["beats.encoder.pos_conv.0.parametrizations.weight.original1"] = s.pop("beats.encoder.pos_conv.0.weight_v")

    _rewrite(other, to_parametrizations)
    model = load_audio_model(open_checkpoint(other))
    torch.testing.assert_close(model.beats.encoder.pos_conv[0].weight, reference.beats.encoder.pos_conv[0].weight)


def test_tied_relative_position_tables(naturelm_dir):
    key0 = "beats.encoder.layers.0.self_attn.relative_attention_bias.weight"
    key1 = "beats.encoder.layers.1.self_attn.relative_attention_bias.weight"
    _rewrite(naturelm_dir, lambda s: s.__setitem__(key1, s[key0].clone()))
    load_audio_model(open_checkpoint(naturelm_dir))  # identical copies (as a non-deduplicating save writes) load
    _rewrite(naturelm_dir, lambda s: s.__setitem__(key1, s[key0] + 1))
    with pytest.raises(CheckpointError, match="differs from layer 0"):
        load_audio_model(open_checkpoint(naturelm_dir))


def test_resized_embedding_rows_are_recognised(naturelm_dir):
    _rewrite(naturelm_dir, lambda s: s.__setitem__("llama_embed_tokens.weight", torch.zeros(769, 256)))
    ckpt = open_checkpoint(naturelm_dir)
    assert ckpt.resized_rows()["embed_tokens"].shape == (769, 256)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("window_level_Qformer", False, "window_level_Qformer=False is not supported"),
        ("lora_rank", "eight", "lora_rank must be a number"),
        ("beats_cfg", {"layer_norm_first": True}, "beats_cfg.layer_norm_first=True is not supported"),
        ("beats_cfg", {"encoder_attention_heads": 5}, "divisible by encoder_attention_heads"),
    ],
)
def test_config_contradicting_the_architecture_is_rejected(naturelm_dir, key, value, message):
    path = naturelm_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message) as e:
        open_checkpoint(naturelm_dir)
    assert str(path) in str(e.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="directory not found"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        open_checkpoint(tmp_path / "x")


def test_windows_match_the_reference_unfold(naturelm_dir):
    """NatureLM.py windows BEATs tokens with F.unfold; the export writes it as slicing. Same tensor, same order."""
    model = load_audio_model(open_checkpoint(naturelm_dir))
    x = torch.randn(2, 496, 64)
    b, _, c = x.shape
    k = model.cfg.window_kernel
    assert k == 17
    unfolded = F.unfold(x.transpose(1, 2).unsqueeze(2), kernel_size=(1, k), stride=(1, k))
    ref = unfolded.view(b, -1, k, unfolded.shape[-1]).permute(0, 3, 2, 1).reshape(-1, k, c)
    torch.testing.assert_close(model.windows(x), ref, rtol=0, atol=0)
    assert ref.shape[0] == 2 * 29


def test_shapes_through_the_audio_side(naturelm_dir):
    model = load_audio_model(open_checkpoint(naturelm_dir))
    with torch.no_grad():
        tokens = model.beats(torch.randn(1, 998, 128))
        emb = model(torch.randn(1, 998, 128))
    assert tokens.shape == (1, 496, 64)
    assert emb.shape == (1, 29, 256)
    assert torch.isfinite(emb).all()
