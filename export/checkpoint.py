"""Loading the NatureLM-audio release (`config.json` + `model.safetensors`) into the reference modules.

The file holds the audio side and the PEFT LoRA of the Llama, not the Llama base. Every key in it must be accounted for:
a key we do not know, or one we expect and cannot find, is an error that names it, never a silent skip.

Key families (prefixes as in the release, see MODEL.md):
- audio: `beats.*`, `ln_audio.*`, `audio_Qformer.*`, `audio_query_tokens`, `audio_llama_proj.*`;
- LoRA: `llama_model.base_model.model.model.layers.N.self_attn.{q,k,v,o}_proj.lora_{A,B}.default.weight`;
- optional [PAD]-resized embedding rows: `llama_embed_tokens.weight` (the reference registers the embedding module a
  second time under that name, so safetensors' de-duplication of tied tensors may keep either name),
  `llama_model.base_model.model.model.embed_tokens.weight`, `llama_model.base_model.model.lm_head.weight`;
- tolerated and unused: `audio_Qformer.bert.embeddings.position_ids` (a persistent buffer of BLIP-2's BERT), copies of
  the relative position table in layers > 0 (tied to layer 0 in the reference; checked to be identical).
The weight-normed positional convolution is stored as `weight_g`/`weight_v` (torch.nn.utils.weight_norm) or
`parametrizations.weight.original0/1` (torch.nn.utils.parametrizations.weight_norm), depending on the torch that saved
it; both are folded here into the plain `weight` that the export needs.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from edge.errors import CheckpointError
from edge.hashing import sha256_file
from export.audio_model import NatureLMAudio
from export.naturelm_config import NatureLMConfig, load_naturelm_config

logger = logging.getLogger(__name__)

AUDIO_PREFIXES = ("beats.", "ln_audio.", "audio_Qformer.", "audio_llama_proj.")
AUDIO_KEYS = ("audio_query_tokens",)
LORA_RE = re.compile(
    r"^llama_model\.base_model\.model\.model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.lora_([AB])\.default\.weight$"
)
EMBED_KEYS = ("llama_embed_tokens.weight", "llama_model.base_model.model.model.embed_tokens.weight")
LM_HEAD_KEYS = ("llama_model.base_model.model.lm_head.weight",)
IGNORED_KEYS = ("audio_Qformer.bert.embeddings.position_ids",)
REL_BIAS_RE = re.compile(r"^beats\.encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight$")
POS_CONV = "beats.encoder.pos_conv.0."
WEIGHT_NORM_NAMES = (
    ("weight_g", "weight_v"),
    ("parametrizations.weight.original0", "parametrizations.weight.original1"),
)


def _names(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


class SafetensorsFile:
    """Lazy access to one safetensors file or a sharded set (model.safetensors.index.json): tensors are read one at
    a time, so an 8B checkpoint can be walked with little memory."""

    def __init__(self, directory: Path, stem: str = "model"):
        directory = Path(directory)
        single = directory / f"{stem}.safetensors"
        index = directory / f"{stem}.safetensors.index.json"
        self._where: dict[str, Path] = {}
        if single.is_file():
            files = [single]
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
            files = sorted({directory / f for f in weight_map.values()})
        else:
            raise CheckpointError(f"{directory}: no {stem}.safetensors (or {stem}.safetensors.index.json) found")
        self.files = files
        self._handles = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in the index is missing")
            try:
                h = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
            self._handles[f] = h
            for k in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except KeyError:
            raise CheckpointError(f"{self.files[0].parent}: tensor {key} not found") from None
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self._where[key]}: tensor {key} unreadable ({e})") from None

    def shape(self, key: str) -> tuple:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())


@dataclass
class NatureLMCheckpoint:
    directory: Path
    config: NatureLMConfig
    file: SafetensorsFile
    audio_keys: list = field(default_factory=list)
    lora_keys: dict = field(default_factory=dict)  # (layer, proj) -> {"A": key, "B": key}
    embed_key: str | None = None
    lm_head_key: str | None = None

    @property
    def llm_width(self) -> int:
        return self.file.shape("audio_llama_proj.weight")[0]

    def sha256(self) -> str:

        return sha256_file(self.file.files[0]) if len(self.file.files) == 1 else "+".join(
            sha256_file(f) for f in self.file.files
        )

    def lora(self, dtype=torch.float32) -> dict:
        """HF module name -> (A [r, in], B [out, r]) for every adapted projection."""
        out = {}
        for (layer, proj), ab in sorted(self.lora_keys.items()):
            out[f"model.layers.{layer}.self_attn.{proj}_proj"] = (
                self.file.get(ab["A"]).to(dtype),
                self.file.get(ab["B"]).to(dtype),
            )
        return out

    def resized_rows(self) -> dict:
        rows = {}
        if self.embed_key:
            rows["embed_tokens"] = self.file.get(self.embed_key)
        if self.lm_head_key:
            rows["lm_head"] = self.file.get(self.lm_head_key)
        return rows


def open_checkpoint(directory: Path) -> NatureLMCheckpoint:
    """Open a NatureLM directory and sort every key of its weights file into a family, or fail naming the stray."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: NatureLM checkpoint directory not found")
    config = load_naturelm_config(directory / "config.json")
    f = SafetensorsFile(directory)
    ckpt = NatureLMCheckpoint(directory=directory, config=config, file=f)
    unknown = []
    for key in f.keys():  # noqa: SIM118 (SafetensorsFile is not a dict)
        m = LORA_RE.match(key)
        if key.startswith(AUDIO_PREFIXES) or key in AUDIO_KEYS:
            ckpt.audio_keys.append(key)
        elif m:
            layer, proj, ab = int(m.group(1)), m.group(2), m.group(3)
            ckpt.lora_keys.setdefault((layer, proj), {})[ab] = key
        elif key in EMBED_KEYS:
            if ckpt.embed_key is None:
                ckpt.embed_key = key
        elif key in LM_HEAD_KEYS:
            ckpt.lm_head_key = key
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{f.files[0]}: unexpected keys: {_names(unknown)}")
    for (layer, proj), ab in sorted(ckpt.lora_keys.items()):
        for part in ("A", "B"):
            if part not in ab:
                raise CheckpointError(
                    f"{f.files[0]}: missing key llama_model.base_model.model.model.layers.{layer}.self_attn."
                    f"{proj}_proj.lora_{part}.default.weight (its lora_{'B' if part == 'A' else 'A'} is present)"
                )
        ra, rb = f.shape(ab["A"])[0], f.shape(ab["B"])[1]
        if config.lora and (ra != config.lora_rank or rb != config.lora_rank):
            raise CheckpointError(
                f"{f.files[0]}: {ab['A']} has rank {ra} and its lora_B {rb}, but config.json says lora_rank "
                f"{config.lora_rank}"
            )
    if config.lora and not ckpt.lora_keys:
        raise CheckpointError(f"{f.files[0]}: config.json says lora=true but the file has no LoRA keys")
    if config.lora:
        layers = sorted({layer for layer, _ in ckpt.lora_keys})
        for layer in layers:
            for proj in "qkvo":
                if (layer, proj) not in ckpt.lora_keys:
                    raise CheckpointError(
                        f"{f.files[0]}: missing key llama_model.base_model.model.model.layers.{layer}.self_attn."
                        f"{proj}_proj.lora_A.default.weight"
                    )
    if "audio_llama_proj.weight" not in f:
        raise CheckpointError(f"{f.files[0]}: missing key audio_llama_proj.weight")
    return ckpt


def _fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weight_norm(dim=2): w = g * v / ||v||, the norm taken over every dim but 2 (one norm per kernel tap)."""
    norm = v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
    return v * (g / norm)


def audio_state_dict(ckpt: NatureLMCheckpoint) -> dict:
    """The file's audio tensors renamed to this project's module names (weight norm folded, tied copies dropped)."""
    f = ckpt.file
    state = {}
    rel_copies = {}
    for key in ckpt.audio_keys:
        m = REL_BIAS_RE.match(key)
        if key in IGNORED_KEYS:
            continue
        if m and int(m.group(1)) != 0:
            rel_copies[key] = f.get(key)
            continue
        state[key] = f.get(key)
    rel0 = state.get("beats.encoder.layers.0.self_attn.relative_attention_bias.weight")
    for key, t in rel_copies.items():
        if rel0 is None or t.shape != rel0.shape or not torch.equal(t, rel0):
            raise CheckpointError(
                f"{f.files[0]}: {key} differs from layer 0's table, but BEATs ties every layer's relative position "
                "table to layer 0's"
            )
    for g_name, v_name in WEIGHT_NORM_NAMES:
        g_key, v_key = POS_CONV + g_name, POS_CONV + v_name
        if g_key in state or v_key in state:
            if g_key not in state or v_key not in state:
                missing = g_key if g_key not in state else v_key
                raise CheckpointError(f"{f.files[0]}: missing key {missing} (half of the weight-normed pos_conv)")
            state[POS_CONV + "weight"] = _fold_weight_norm(state.pop(g_key).float(), state.pop(v_key).float())
    return state


def load_audio_model(ckpt: NatureLMCheckpoint) -> NatureLMAudio:
    """Build the reference audio modules and load the file's tensors with strict, named accounting."""
    model = NatureLMAudio(ckpt.config, llm_width=ckpt.llm_width)
    state = audio_state_dict(ckpt)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    where = ckpt.file.files[0]
    if missing:
        raise CheckpointError(f"{where}: missing keys: {_names(missing)}")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected keys: {_names(unexpected)}")
    for key, t in state.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{where}: {key} has shape {tuple(t.shape)}, the architecture in config.json needs "
                f"{tuple(expected[key].shape)}"
            )
        state[key] = t.to(torch.float32)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model
