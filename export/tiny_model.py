"""Seeded random-weight NatureLM-audio checkpoints with the release's exact file layout.

No weights can be downloaded where this project is built and tested, so every test and benchmark runs on checkpoints
made here: `naturelm/` (config.json + model.safetensors with the release's key names, LoRA included) and `llama/`
(a Hugging Face Llama-3 directory, see tiny_llama.py). Presets:
- `tiny`: a few MB, builds in seconds; what the tests use. Small BEATs/Q-Former (the Q-Former sizes go in the
  `audio_qformer` extension key of config.json), LoRA rank 8 / alpha 16 (so alpha/r = 2 and a forgotten scale shows).
- `small`: production-shaped for benchmarks: the release's BEATs and bert-base Q-Former (no extension key: the
  built-in defaults are exercised), projection to 2048, a Llama-3.2-1B-shaped backbone, LoRA rank 32 / alpha 32.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from export.audio_model import NatureLMAudio
from export.checkpoint import POS_CONV
from export.naturelm_config import NatureLMConfig, load_naturelm_config

logger = logging.getLogger(__name__)

PRESETS = ("tiny", "small")

_BEATS_RELEASE = {
    "input_patch_size": 16, "embed_dim": 512, "conv_bias": False, "encoder_layers": 12, "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12, "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 0.6, "layer_norm_first": False, "deep_norm": True, "dropout": 0.0,
    "attention_dropout": 0.0, "activation_dropout": 0.0, "encoder_layerdrop": 0.05, "dropout_input": 0.0,
    "conv_pos": 128, "conv_pos_groups": 16, "relative_position_embedding": True, "num_buckets": 320,
    "max_distance": 800, "gru_rel_pos": True, "finetuned_model": True, "predictor_dropout": 0.0,
    "predictor_class": 527,
}
_BEATS_TINY = dict(
    _BEATS_RELEASE, embed_dim=32, encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
    encoder_attention_heads=4, conv_pos=16, conv_pos_groups=4,
)
_QFORMER_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def naturelm_config_dict(preset: str) -> dict:
    """The release's config.json keys, with this preset's sizes."""
    cfg = {
        "llama_path": "meta-llama/Llama-3.1-8B-Instruct",
        "beats_path": None,
        "beats_cfg": _BEATS_TINY if preset == "tiny" else _BEATS_RELEASE,
        "freeze_beats": False,
        "use_audio_Qformer": True,
        "max_pooling": False,
        "num_audio_query_token": 1,
        "freeze_audio_QFormer": False,
        "window_level_Qformer": True,
        "second_per_window": 0.333333,
        "second_stride": 0.333333,
        "downsample_factor": 8,
        "audio_llama_proj_model": None,
        "freeze_audio_llama_proj": False,
        "lora": True,
        "lora_rank": 8 if preset == "tiny" else 32,
        "lora_alpha": 16 if preset == "tiny" else 32,
        "lora_dropout": 0.1,
        "flash_attn": "eager",
        "prompt_template": "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "max_txt_len": 160,
        "end_sym": "<|end_of_text|>",
        "device": "cuda",
    }
    if preset == "tiny":
        cfg["audio_qformer"] = _QFORMER_TINY
    return cfg


def _init_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Random weights that keep activations finite and informative: fan-in scaled matrices, norms near 1."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif "LayerNorm" in name or "layer_norm" in name or name.startswith("ln_audio"):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.05)
            elif name.endswith("grep_a"):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith("relative_attention_bias.weight") or name == "audio_query_tokens":
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def _release_state(model: NatureLMAudio, gen: torch.Generator) -> dict:
    """Rename to the release's layout: pos_conv as weight_g/weight_v (torch.nn.utils.weight_norm, dim=2)."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    w = state.pop(POS_CONV + "weight")
    norm = w.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
    g = norm * (1.0 + 0.1 * torch.rand(norm.shape, generator=gen))
    state[POS_CONV + "weight_g"] = g.contiguous()
    state[POS_CONV + "weight_v"] = (w * (norm / g)).contiguous()  # so that g * v / |v| == w up to rounding
    # BLIP-2's BERT keeps position_ids as a persistent buffer even though NatureLM removes the embeddings
    state["audio_Qformer.bert.embeddings.position_ids"] = torch.arange(512, dtype=torch.long)[None, :]
    return state


def write_naturelm_dir(out_dir: Path, preset: str, seed: int, llama_config: dict) -> Path:
    """Write `config.json` + `model.safetensors` for a Llama of `llama_config` (the HF config dict)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = naturelm_config_dict(preset)
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    cfg: NatureLMConfig = load_naturelm_config(out_dir / "config.json")

    gen = torch.Generator().manual_seed(seed)
    hidden = llama_config["hidden_size"]
    model = NatureLMAudio(cfg, llm_width=hidden)
    _init_(model, gen)
    state = _release_state(model, gen)

    heads = llama_config["num_attention_heads"]
    kv = llama_config.get("num_key_value_heads", heads) * (hidden // heads)
    r = cfg.lora_rank
    prefix = "llama_model.base_model.model.model.layers"
    for layer in range(llama_config["num_hidden_layers"]):
        for proj, out_dim in (("q", hidden), ("k", kv), ("v", kv), ("o", hidden)):
            a = torch.randn((r, hidden), generator=gen) / math.sqrt(hidden)
            # Trained LoRA B is small next to the base weight; big enough here that merging_alpha visibly matters.
            b = torch.randn((out_dim, r), generator=gen) * (0.5 / math.sqrt(hidden))
            state[f"{prefix}.{layer}.self_attn.{proj}_proj.lora_A.default.weight"] = a.contiguous()
            state[f"{prefix}.{layer}.self_attn.{proj}_proj.lora_B.default.weight"] = b.contiguous()
    save_file(dict(sorted(state.items())), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def build_tiny_model(out_dir: Path, preset: str = "tiny", seed: int = 0) -> tuple[Path, Path]:
    """Write OUT_DIR/llama and OUT_DIR/naturelm. Deterministic: the same seed gives byte-identical files."""
    from export.tiny_llama import write_llama_dir

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out_dir = Path(out_dir)
    llama_dir = out_dir / "llama"
    write_llama_dir(llama_dir, preset, seed)
    llama_config = json.loads((llama_dir / "config.json").read_text())
    naturelm_dir = write_naturelm_dir(out_dir / "naturelm", preset, seed + 1, llama_config)
    return naturelm_dir, llama_dir
