"""The NatureLM-audio `config.json` (the constructor kwargs that PyTorchModelHubMixin saved), read and checked.

The release's config does not carry the Q-Former's BERT sizes (the reference reads bert-base-uncased's config from the
Hub at start-up) nor the LLM width (that comes from the Llama directory). We build the BERT sizes in; a checkpoint made
by this project for tests may override them with the extension key `audio_qformer` (documented below), which the
release does not have.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from edge.errors import ConfigError
from edge.spec import window_tokens

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BeatsConfig:
    """BEATs hyper-parameters, named as in BEATs.py's BEATsConfig."""

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0
    layer_norm_first: bool = False
    deep_norm: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = True
    predictor_dropout: float = 0.0
    predictor_class: int = 527


@dataclass(frozen=True)
class QFormerConfig:
    """BERT sizes of the window-level Q-Former. Defaults are bert-base-uncased's, which the release uses."""

    hidden_size: int = 768
    num_hidden_layers: int = 2
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512


@dataclass(frozen=True)
class NatureLMConfig:
    beats: BeatsConfig = field(default_factory=BeatsConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    num_audio_query_token: int = 1
    second_per_window: float = 0.333333
    second_stride: float = 0.333333
    lora: bool = True
    lora_rank: int = 32
    lora_alpha: float = 32.0
    end_sym: str = "<|end_of_text|>"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def window_kernel(self) -> int:
        return window_tokens(self.second_per_window)

    @property
    def window_stride(self) -> int:
        return window_tokens(self.second_stride)

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank


# Keys of the release's config.json that the audio/LoRA side does not need; accepted and ignored.
_IGNORED_TOP = {
    "llama_path", "beats_path", "freeze_beats", "freeze_audio_QFormer", "downsample_factor", "audio_llama_proj_model",
    "freeze_audio_llama_proj", "lora_dropout", "flash_attn", "prompt_template", "max_txt_len", "device",
}
# Keys whose value is fixed by the architecture this project reproduces.
_REQUIRED_VALUES = {"use_audio_Qformer": True, "max_pooling": False, "window_level_Qformer": True}
_BEATS_REQUIRED = {
    "layer_norm_first": False, "activation_fn": "gelu", "relative_position_embedding": True, "gru_rel_pos": True,
}


def _typed(section: str, cls, values: dict, path: Path):
    known = cls.__dataclass_fields__
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            logger.warning("%s: unknown key %s%s ignored", path, section, key)
            continue
        default = known[key].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: {section}{key} must be true or false, got {value!r}")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{path}: {section}{key} must be a number, got {value!r}")
            if isinstance(default, int) and not isinstance(default, bool) and value != int(value):
                raise ConfigError(f"{path}: {section}{key} must be an integer, got {value!r}")
            value = type(default)(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{path}: {section}{key} must be a string, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def load_naturelm_config(path: Path) -> NatureLMConfig:
    """Read and validate a NatureLM `config.json`. Errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: NatureLM config.json not found")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")

    for key, want in _REQUIRED_VALUES.items():
        if key in raw and raw[key] != want:
            raise ConfigError(f"{path}: {key}={raw[key]!r} is not supported (the NatureLM-audio architecture has {want!r})")
    beats_raw = raw.get("beats_cfg", {})
    if not isinstance(beats_raw, dict):
        raise ConfigError(f"{path}: beats_cfg must be an object")
    for key, want in _BEATS_REQUIRED.items():
        if key in beats_raw and beats_raw[key] != want:
            raise ConfigError(f"{path}: beats_cfg.{key}={beats_raw[key]!r} is not supported (BEATs here has {want!r})")
    beats = _typed("beats_cfg.", BeatsConfig, beats_raw, path)
    if beats.encoder_embed_dim % beats.encoder_attention_heads:
        raise ConfigError(f"{path}: beats_cfg.encoder_embed_dim must be divisible by encoder_attention_heads")
    if beats.encoder_embed_dim % beats.conv_pos_groups:
        raise ConfigError(f"{path}: beats_cfg.encoder_embed_dim must be divisible by conv_pos_groups")

    q_raw = raw.get("audio_qformer", {})  # naturelm-edge extension, absent from the release
    if not isinstance(q_raw, dict):
        raise ConfigError(f"{path}: audio_qformer must be an object")
    qformer = _typed("audio_qformer.", QFormerConfig, q_raw, path)
    if qformer.hidden_size % qformer.num_attention_heads:
        raise ConfigError(f"{path}: audio_qformer.hidden_size must be divisible by num_attention_heads")

    top = {k: v for k, v in raw.items() if k not in ("beats_cfg", "audio_qformer") and k not in _REQUIRED_VALUES}
    known_top = set(NatureLMConfig.__dataclass_fields__) - {"beats", "qformer", "raw"}
    unknown = set(top) - known_top - _IGNORED_TOP
    for key in sorted(unknown):
        logger.warning("%s: unknown key %s ignored", path, key)
    cfg = _typed("", NatureLMConfig, {k: v for k, v in top.items() if k in known_top}, path)
    cfg = NatureLMConfig(**{**{f: getattr(cfg, f) for f in known_top}, "beats": beats, "qformer": qformer, "raw": raw})
    if cfg.num_audio_query_token != 1:
        raise ConfigError(f"{path}: num_audio_query_token={cfg.num_audio_query_token} is not supported (the release uses 1)")
    if cfg.window_kernel < 1 or cfg.window_stride < 1:
        raise ConfigError(f"{path}: second_per_window/second_stride give an empty Q-Former window")
    if cfg.lora and cfg.lora_rank < 1:
        raise ConfigError(f"{path}: lora_rank must be >= 1")
    return cfg
