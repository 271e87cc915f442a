"""The Hugging Face Llama directory (meta-llama/Llama-3.1-8B-Instruct or a stand-in), read and checked before anything
is written: its config.json, its byte-level BPE tokenizer, and the key and shape of every weight.

Everything a user can get wrong (a wrong directory, a missing file or tensor, a non-Llama-3 tokenizer, a shape that
contradicts config.json) is a `CheckpointError` naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from edge.errors import CheckpointError
from edge.hashing import sha256_file
from quantize.safetensors_stream import StreamingSafetensors

logger = logging.getLogger(__name__)

#: Llama 3's pre-tokenizer split pattern (the tiktoken `pat_str` of meta-llama/llama-models). llama.cpp implements it
#: natively under the pre-tokenizer name "llama-bpe"; a tokenizer.json that splits text any other way would tokenise
#: differently in llama.cpp than in transformers, so it is refused rather than converted wrongly.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: The token NatureLM adds (tokenizer.add_special_tokens({"pad_token": "[PAD]"})), growing the vocabulary by one row.
PAD_TOKEN = "[PAD]"

# gguf.TokenType values (kept here so this module imports without gguf).
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5

#: Buffers some older checkpoints saved; recomputed from config.json, never needed.
_TOLERATED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class LlamaHParams:
    n_vocab: int  # rows of embed_tokens / lm_head in the Llama directory (before the [PAD] row)
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    n_ctx_train: int
    tie_word_embeddings: bool


@dataclass
class LlamaVocab:
    """The tokenizer as llama.cpp's "gpt2"-type (byte-level BPE) vocabulary wants it."""

    tokens: list[str]  # by id; byte-level unicode text as in tokenizer.json
    types: list[int]  # gguf TokenType per token
    merges: list[str]  # "left right"
    bos_token: str
    eos_token: str
    chat_template: str | None
    add_bos: bool
    clean_up_spaces: bool = False  # transformers' clean_up_tokenization_spaces when decoding
    ids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.ids = {t: i for i, t in enumerate(self.tokens)}

    def id_of(self, token: str, where: Path) -> int:
        if token not in self.ids:
            raise CheckpointError(f"{where}: the tokenizer has no token {token!r}")
        return self.ids[token]

    def with_pad(self) -> LlamaVocab:
        """The vocabulary NatureLM runs with: [PAD] appended as a control token unless the tokenizer has one."""
        if PAD_TOKEN in self.ids:
            return self
        return LlamaVocab(
            tokens=self.tokens + [PAD_TOKEN],
            types=self.types + [TOKEN_CONTROL],
            merges=self.merges,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            chat_template=self.chat_template,
            add_bos=self.add_bos,
            clean_up_spaces=self.clean_up_spaces,
        )


@dataclass
class LlamaSource:
    directory: Path
    hparams: LlamaHParams
    vocab: LlamaVocab  # as in the directory (no [PAD])
    weights: StreamingSafetensors

    def source_files(self) -> list[Path]:
        names = ["config.json", "tokenizer.json", "tokenizer_config.json"]
        return [self.directory / n for n in names if (self.directory / n).is_file()] + list(self.weights.files)

    def sha256(self) -> dict:
        """Per-file sha256 of what the conversion read, and one digest over them (name:sha lines, sorted)."""
        files = {p.name: sha256_file(p) for p in self.source_files()}
        h = hashlib.sha256()
        for name, digest in sorted(files.items()):
            h.update(f"{name}:{digest}\n".encode())
        return {"sha256": h.hexdigest(), "files": files}


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {path.parent} a Hugging Face Llama directory?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _hparams(path: Path) -> LlamaHParams:
    cfg = _load_json(path)

    def need(key, kind=int):
        if key not in cfg:
            raise CheckpointError(f"{path}: missing key {key}")
        try:
            return kind(cfg[key])
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: {key} is {cfg[key]!r}, expected a {kind.__name__}") from None

    if cfg.get("model_type") != "llama":
        raise CheckpointError(f"{path}: model_type is {cfg.get('model_type')!r}, expected 'llama'")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise CheckpointError(f"{path}: {flag} is true; Llama 3 has no biases and the converter writes none")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act is {cfg.get('hidden_act')!r}, expected 'silu'")
    n_embd, n_head = need("hidden_size"), need("num_attention_heads")
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    if head_dim * n_head != n_embd:
        raise CheckpointError(f"{path}: head_dim {head_dim} x num_attention_heads {n_head} != hidden_size {n_embd}")
    if n_head % n_head_kv:
        raise CheckpointError(f"{path}: num_attention_heads {n_head} is not a multiple of num_key_value_heads "
                              f"{n_head_kv}")
    scaling = cfg.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3":
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in scaling:
                    raise CheckpointError(f"{path}: rope_scaling (llama3) has no {key}")
        elif kind not in ("linear", "default"):
            raise CheckpointError(f"{path}: rope_scaling type {kind!r} is not supported (llama3 and linear are)")
    return LlamaHParams(
        n_vocab=need("vocab_size"),
        n_embd=n_embd,
        n_layer=need("num_hidden_layers"),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=need("intermediate_size"),
        rms_norm_eps=need("rms_norm_eps", float),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        n_ctx_train=need("max_position_embeddings"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _split_patterns(pre) -> list[str]:
    """Regexes of every Split step of a tokenizer.json pre_tokenizer (possibly nested in a Sequence)."""
    if not isinstance(pre, dict):
        return []
    if pre.get("type") == "Sequence":
        return [p for sub in pre.get("pretokenizers", []) for p in _split_patterns(sub)]
    if pre.get("type") == "Split":
        pattern = pre.get("pattern", {})
        return [pattern.get("Regex") or pattern.get("String") or ""]
    return []


def _vocab(directory: Path, n_vocab: int) -> LlamaVocab:
    tok_path = directory / "tokenizer.json"
    tok = _load_json(tok_path)
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{tok_path}: tokenizer model is {model.get('type')!r}, expected a byte-level BPE")
    patterns = _split_patterns(tok.get("pre_tokenizer"))
    if LLAMA3_SPLIT_PATTERN not in patterns:
        raise CheckpointError(f"{tok_path}: the pre-tokenizer is not Llama 3's (its split pattern differs), so "
                              "llama.cpp's 'llama-bpe' tokenizer would not reproduce it")
    vocab = model.get("vocab") or {}
    by_id: dict[int, tuple[str, int]] = {}
    for text, i in vocab.items():
        by_id[int(i)] = (text, TOKEN_NORMAL)
    for added in tok.get("added_tokens") or []:
        by_id[int(added["id"])] = (added["content"], TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED)
    size = max(by_id) + 1 if by_id else 0
    if size != n_vocab:
        raise CheckpointError(f"{tok_path}: the tokenizer has {size} tokens but config.json's vocab_size is {n_vocab}")
    tokens, types = [], []
    for i in range(size):
        text, kind = by_id.get(i, (f"[PAD{i}]", TOKEN_UNUSED))
        tokens.append(text)
        types.append(kind)
    merges = []
    for m in model.get("merges") or []:
        merges.append(" ".join(m) if isinstance(m, (list, tuple)) else str(m))
    if not merges:
        raise CheckpointError(f"{tok_path}: the BPE tokenizer has no merges")

    cfg_path = directory / "tokenizer_config.json"
    tcfg = _load_json(cfg_path) if cfg_path.is_file() else {}
    llama_cfg = _load_json(directory / "config.json")
    bos = _token_text(tcfg.get("bos_token"))
    eos = _token_text(tcfg.get("eos_token"))
    if bos is None and isinstance(llama_cfg.get("bos_token_id"), int):
        bos = tokens[llama_cfg["bos_token_id"]]
    if eos is None:
        eos_id = llama_cfg.get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        if isinstance(eos_id, int):
            eos = tokens[eos_id]
    if bos is None or eos is None:
        raise CheckpointError(f"{cfg_path}: no bos_token/eos_token (nor bos_token_id/eos_token_id in config.json)")
    # Recent transformers save the template as chat_template.jinja (and drop it from tokenizer_config.json); when
    # both exist, the file wins, as it does when transformers loads the directory.
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            template = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{jinja}: cannot read the chat template ({e})") from None
    else:
        template = tcfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: keep the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    v = LlamaVocab(tokens=tokens, types=types, merges=merges, bos_token=bos, eos_token=eos,
                   chat_template=template, add_bos=bool(tcfg.get("add_bos_token", True)),
                   clean_up_spaces=bool(tcfg.get("clean_up_tokenization_spaces", False)))
    v.id_of(bos, cfg_path)
    v.id_of(eos, cfg_path)
    return v


def expected_shapes(hp: LlamaHParams) -> dict[str, tuple[int, ...]]:
    kv = hp.n_head_kv * hp.head_dim
    q = hp.n_head * hp.head_dim
    shapes = {
        "model.embed_tokens.weight": (hp.n_vocab, hp.n_embd),
        "model.norm.weight": (hp.n_embd,),
    }
    if not hp.tie_word_embeddings:
        shapes["lm_head.weight"] = (hp.n_vocab, hp.n_embd)
    per_layer = {
        "input_layernorm.weight": (hp.n_embd,),
        "post_attention_layernorm.weight": (hp.n_embd,),
        "self_attn.q_proj.weight": (q, hp.n_embd),
        "self_attn.k_proj.weight": (kv, hp.n_embd),
        "self_attn.v_proj.weight": (kv, hp.n_embd),
        "self_attn.o_proj.weight": (hp.n_embd, q),
        "mlp.gate_proj.weight": (hp.n_ff, hp.n_embd),
        "mlp.up_proj.weight": (hp.n_ff, hp.n_embd),
        "mlp.down_proj.weight": (hp.n_embd, hp.n_ff),
    }
    for layer in range(hp.n_layer):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{name}"] = shape
    return shapes


def open_llama_dir(directory: Path) -> LlamaSource:
    """Read and check a Hugging Face Llama-3 directory; nothing is converted yet."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: Llama directory not found")
    hp = _hparams(directory / "config.json")
    vocab = _vocab(directory, hp.n_vocab)
    weights = StreamingSafetensors.from_directory(directory)
    expected = expected_shapes(hp)
    where = weights.files[0] if len(weights.files) == 1 else directory
    present = set(weights.keys())
    if hp.tie_word_embeddings and "lm_head.weight" in present:
        expected["lm_head.weight"] = (hp.n_vocab, hp.n_embd)  # saved anyway: use it
    missing = sorted(set(expected) - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor {missing[0]}{more}")
    unknown = sorted(k for k in present - set(expected) if not _TOLERATED.match(k))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise CheckpointError(f"{where}: unexpected tensor {unknown[0]}{more} (not part of a Llama of config.json)")
    for name, shape in expected.items():
        got = weights.shape(name)
        if got != shape:
            raise CheckpointError(f"{weights.entry(name).path}: tensor {name} has shape {got}, config.json implies "
                                  f"{shape}")
    return LlamaSource(directory=directory, hparams=hp, vocab=vocab, weights=weights)
