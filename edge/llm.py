"""The device's language engine: NatureLM's prompt around injected audio embeddings, run by llama.cpp through
llama-cpp-python's ctypes bindings of the C API. No torch.

Why the low-level API: the high-level `Llama` class takes token ids only and keeps its own KV bookkeeping (its `eval`
drops KV entries past its own count), while NatureLM's prompt puts the audio as embedding rows between two token pieces,
and every prompt of a window should reuse one decoded audio prefix.

One window, all on sequence 0 at consecutive positions:

    BOS  <|start_header_id|>user<|end_header_id|>\\n\\n<Audio>  [audio rows]      <- the prefix: decoded once
    </Audio> QUESTION<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n   <- each prompt's suffix
    answer tokens...

After a prompt, `llama_memory_seq_rm(seq 0, from P)` drops its suffix and answer, and the next prompt starts from the
prefix still in the KV cache: K prompts cost one prefix prefill plus K suffixes, never K audio prefills. Every piece of
the prompt (BOS, the texts around the audio, the stop tokens) comes from the bundle's manifest, and the token ids it
records are checked against this GGUF's own tokenizer when the engine opens.

Prompt kinds (the answer always starts right after the assistant header, where the reference's answers start):
- `yes_no`: one forward pass; P(Yes) / (P(Yes) + P(No)) from the logits of the "Yes" and "No" tokens
  (= sigmoid of their difference: the rest of the vocabulary cancels). Answer "Yes" when it is >= 0.5.
- `label`: each label is scored as a complete answer, log P(label tokens, then a stop token | prompt), and the
  scores are normalised over the label list; the answer is the best label, the score its share. Exact for any label
  list (no greedy prefix commitment, which a grammar-constrained greedy decode would make).
- `open`, `caption`: greedy decoding, bounded length, stops on the manifest's stop tokens (<|end_of_text|>, <|eot_id|>).
- `count`: greedy decoding restricted to digit tokens (then digits or a stop); the score is the probability of the
  number under that restriction.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import BundleError, ConfigError, NatureLMEdgeError

logger = logging.getLogger(__name__)
_native_logger = logging.getLogger("llama_cpp.native")

PROMPT_KINDS = ("yes_no", "label", "open", "caption", "count")
DEFAULT_MAX_NEW_TOKENS = {"open": 64, "caption": 128, "count": 3}
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type

_lib = None
_lib_lock = threading.Lock()
_log_callback = None  # the ctypes callback must outlive every call llama.cpp makes to it


# ---------------------------------------------------------------------------------------------------------------------
# Public data types


@dataclass(frozen=True)
class EngineOptions:
    """How the device runs the bundle's LLM. Every field has a working default."""

    model_type: str | None = None  # which of the bundle's GGUFs (e.g. "Q4_K_M"); None: the manifest's default_model
    n_gpu_layers: int | None = None  # None: all layers when llama.cpp was built with GPU offload, else 0
    n_ctx: int | None = None  # None: the manifest's n_ctx
    n_threads: int | None = None  # None: the CPU cores this process may use
    kv_cache_type: str = "f16"  # "f16", "f32" (exact; parity tests), "q8_0" (half the KV memory)
    flash_attn: bool | None = None  # None: llama.cpp decides
    lora_scale: float | None = None  # runtime LoRA scale for adapter bundles; None: the manifest's merging_alpha

    def __post_init__(self):
        if self.kv_cache_type not in KV_CACHE_TYPES:
            raise ConfigError(f"kv_cache_type {self.kv_cache_type!r}: choose one of {', '.join(KV_CACHE_TYPES)}")


@dataclass(frozen=True)
class Prompt:
    """One question asked of every window."""

    id: str
    kind: str
    question: str
    labels: tuple[str, ...] = ()
    max_new_tokens: int | None = None  # open/caption/count; None: DEFAULT_MAX_NEW_TOKENS[kind]

    def __post_init__(self):
        if self.kind not in PROMPT_KINDS:
            raise ConfigError(f"prompt {self.id!r}: kind {self.kind!r} is not one of {', '.join(PROMPT_KINDS)}")
        if self.kind == "label" and not self.labels:
            raise ConfigError(f"prompt {self.id!r}: kind 'label' needs a non-empty labels list")
        if self.kind == "label" and len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"prompt {self.id!r}: labels are not unique")
        if self.kind != "label" and self.labels:
            raise ConfigError(f"prompt {self.id!r}: labels are only used by kind 'label'")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"prompt {self.id!r}: max_new_tokens must be >= 1")

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(self.kind, 1)


@dataclass(frozen=True)
class Timings:
    prompt_tokens: int = 0  # the question's tokens, prefilled in one batch
    prompt_ms: float = 0.0
    decode_tokens: int = 0  # tokens decoded after the question (generated tokens, or label tokens scored)
    decode_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.prompt_ms + self.decode_ms


@dataclass(frozen=True)
class Answer:
    prompt_id: str
    kind: str
    text: str
    token_ids: tuple[int, ...]  # the answer's tokens (generated, or the chosen label's / Yes / No), stop token excluded
    score: float | None  # yes_no: P(Yes); label: the label's share; count: P(number | digits only); else None
    timings: Timings
    scores: Mapping[str, float] | None = None  # label: every label's share; yes_no: {"Yes": p, "No": 1 - p}
    stopped: bool = True  # False when generation hit max_new_tokens (or the context) before a stop token


@dataclass(frozen=True)
class WindowAnswers:
    answers: list[Answer]
    prefix_tokens: int  # BOS + text before the audio + audio rows
    prefix_ms: float  # total time spent decoding the prefix in this window
    prefills: int  # how many times the prefix was decoded (1 when shared)

    @property
    def total_ms(self) -> float:
        return self.prefix_ms + sum(a.timings.total_ms for a in self.answers)


# ---------------------------------------------------------------------------------------------------------------------
# llama.cpp set-up


_NATIVE_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}
_native_last_level = logging.DEBUG


def _forward_native_log(level: int, text: bytes, _user_data) -> None:
    # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous message. llama.cpp's info is a
    # flood (every metadata key, every tensor) and its warnings are mostly benign (a context shorter than the
    # training context), so they go to DEBUG and INFO; errors stay errors.
    global _native_last_level
    try:
        py_level = _native_last_level if level == 5 else _NATIVE_LEVELS.get(level, logging.DEBUG)
        _native_last_level = py_level
        msg = text.decode("utf-8", errors="replace").rstrip()
        if msg:
            _native_logger.log(py_level, "%s", msg)
    except Exception:  # noqa: BLE001, S110 -- an exception must never cross back into llama.cpp's C frames
        pass


def llama_lib():
    """llama-cpp-python's ctypes bindings, with the backend initialised once and llama.cpp's log routed to logging."""
    global _lib, _log_callback
    with _lib_lock:
        if _lib is None:
            try:
                import llama_cpp.llama_cpp as lib
            except ImportError:
                raise NatureLMEdgeError("llama-cpp-python is not installed: pip install llama-cpp-python") from None
            _log_callback = lib.llama_log_callback(_forward_native_log)
            lib.llama_log_set(_log_callback, ctypes.c_void_p(0))
            lib.llama_backend_init()
            _lib = lib
    return _lib


def gpu_offload_supported() -> bool:
    return bool(llama_lib().llama_supports_gpu_offload())


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


#: transformers' `clean_up_tokenization` (applied by its decode when the tokenizer's clean_up_tokenization_spaces is
#: set, as Llama 3's is): the reference's answer text has these spaces removed.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_spaces(text: str) -> str:
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


def suffix_text(prompt: Mapping, question: str) -> str:
    """The text after the audio, as the reference builds it: it formats `<Audio><AudioHere></Audio> {question}` into
    the template after `.strip()`, which can only reach the question's trailing whitespace."""
    return (prompt["after_audio"] + question).rstrip() + prompt["after_question"]


class _Batch:
    """A llama_batch for sequence 0, with numpy views of its arrays (token or embd, pos, logits flags)."""

    def __init__(self, lib, capacity: int, n_embd: int = 0):
        self._lib = lib
        self.capacity = capacity
        self.batch = lib.llama_batch_init(capacity, n_embd, 1)
        b = self.batch
        self.pos = np.ctypeslib.as_array(b.pos, shape=(capacity,))
        self.logits = np.ctypeslib.as_array(b.logits, shape=(capacity,))
        n_seq = np.ctypeslib.as_array(b.n_seq_id, shape=(capacity,))
        n_seq[:] = 1
        for i in range(capacity):
            b.seq_id[i][0] = 0
        if n_embd:
            self.embd = np.ctypeslib.as_array(b.embd, shape=(capacity, n_embd))
            self.token = None
        else:
            self.token = np.ctypeslib.as_array(b.token, shape=(capacity,))
            self.embd = None

    def free(self) -> None:
        if self.batch is not None:
            self._lib.llama_batch_free(self.batch)
            self.batch = None


# ---------------------------------------------------------------------------------------------------------------------
# The engine


class LlmEngine:
    """NatureLM's language side on one llama.cpp model + context.

    Use `from_bundle`. Per window: `run_window(audio, prompts)`, or `set_audio(audio)` then `ask(prompt)` per prompt.
    Not thread-safe: one inference worker owns an engine.
    """

    def __init__(self, model_path: Path, llm: Mapping, *, adapter_path: Path | None = None,
                 options: EngineOptions | None = None, model_type: str = "?"):
        self.options = opts = options or EngineOptions()
        self.model_path = Path(model_path)
        self.model_type = model_type
        self._llm = llm
        self._model = self._ctx = None
        self._tok_batch = self._embd_batch = None
        lib = self._lib = llama_lib()
        for key in ("n_embd", "n_vocab", "n_ctx", "prompt", "token_ids"):
            if key not in llm:
                raise BundleError(f"{self.model_path.parent / 'manifest.json'}: llm section has no {key!r}")
        self._prompt = dict(llm["prompt"])

        mp = lib.llama_model_default_params()
        if opts.n_gpu_layers is None:
            mp.n_gpu_layers = -1 if lib.llama_supports_gpu_offload() else 0
        else:
            mp.n_gpu_layers = int(opts.n_gpu_layers)
        self.n_gpu_layers = int(mp.n_gpu_layers)
        if not self.model_path.is_file():
            raise BundleError(f"{self.model_path}: GGUF not found")
        self._model = lib.llama_model_load_from_file(str(self.model_path).encode(), mp)
        if not self._model:
            raise BundleError(f"{self.model_path}: llama.cpp could not load this GGUF (its log says why)")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_embd = int(lib.llama_model_n_embd(self._model))
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        if self.n_embd != int(llm["n_embd"]) or self.n_vocab != int(llm["n_vocab"]):
            raise BundleError(f"{self.model_path}: n_embd {self.n_embd} / n_vocab {self.n_vocab}, but the manifest "
                              f"says {llm['n_embd']} / {llm['n_vocab']}")

        self.n_ctx = int(opts.n_ctx or llm["n_ctx"])
        self._n_batch = min(self.n_ctx, 2048)
        threads = int(opts.n_threads or _usable_cpus())
        cp = lib.llama_context_default_params()
        cp.n_ctx = self.n_ctx
        cp.n_batch = self._n_batch
        cp.n_ubatch = min(512, self._n_batch)
        cp.n_seq_max = 1
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.type_k = cp.type_v = KV_CACHE_TYPES[opts.kv_cache_type]
        if opts.flash_attn is not None:
            cp.flash_attn_type = 1 if opts.flash_attn else 0
        cp.no_perf = True
        self._ctx = lib.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise NatureLMEdgeError(f"{self.model_path}: llama.cpp could not create a context of {self.n_ctx} "
                                    "tokens (out of memory? try a smaller n_ctx)")
        self._mem = lib.llama_get_memory(self._ctx)

        self.adapter_path = Path(adapter_path) if adapter_path else None
        self._adapter = None
        self.lora_scale = None
        if self.adapter_path is not None:
            self._adapter = lib.llama_adapter_lora_init(self._model, str(self.adapter_path).encode())
            if not self._adapter:
                raise BundleError(f"{self.adapter_path}: llama.cpp refused this LoRA adapter for "
                                  f"{self.model_path.name} (its log says why)")
            lora = llm.get("lora") or {}
            self.set_lora_scale(opts.lora_scale if opts.lora_scale is not None else lora.get("merging_alpha", 1.0))
        elif opts.lora_scale is not None:
            merged = (llm.get("lora") or {}).get("merging_alpha")
            if merged is None or not math.isclose(float(merged), float(opts.lora_scale)):
                raise ConfigError(f"lora_scale {opts.lora_scale}: this bundle's LoRA is merged into the weights "
                                  f"(at {merged}); a runtime scale needs a bundle built with --lora adapter")

        self._tok_batch = _Batch(lib, self._n_batch)
        self._embd_batch = None
        self._check_tokens()
        self._suffix_cache: dict[str, list[int]] = {}
        self._label_cache: dict[str, list[int]] = {}
        self._digits: np.ndarray | None = None
        self._n_prefix: int | None = None
        self.prefix_ms = 0.0
        logger.info("LLM %s: %s, n_ctx %d, %d threads, %s GPU layers%s", model_type, self.model_path.name,
                    self.n_ctx, threads, "all" if self.n_gpu_layers < 0 else self.n_gpu_layers,
                    f", LoRA adapter at scale {self.lora_scale}" if self._adapter else "")

    @classmethod
    def from_bundle(cls, bundle, options: EngineOptions | None = None) -> LlmEngine:
        """The engine for a loaded `edge.bundle.Bundle` (its llm section, model file and, if any, LoRA adapter)."""
        options = options or EngineOptions()
        llm = bundle.section("llm")
        models = llm.get("models") or {}
        model_type = options.model_type or llm.get("default_model")
        if model_type not in models:
            raise BundleError(f"{bundle.path / 'manifest.json'}: no LLM model {model_type!r}; the bundle has "
                              f"{', '.join(sorted(models)) or 'none'}")
        path = bundle.file(models[model_type]["file"])
        lora = llm.get("lora") or {}
        adapter = bundle.file(lora["adapter_file"]) if lora.get("mode") == "adapter" else None
        return cls(path, llm, adapter_path=adapter, options=options, model_type=model_type)

    # -----------------------------------------------------------------------------------------------------------------
    # Lifetime

    def close(self) -> None:
        lib = self._lib
        for b in (self._tok_batch, self._embd_batch):
            if b is not None:
                b.free()
        self._tok_batch = self._embd_batch = None
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lib.llama_model_free(self._model)  # also frees its LoRA adapters
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 -- interpreter shutdown may have torn down the bindings already
            pass

    def set_lora_scale(self, scale: float) -> None:
        """Set the runtime LoRA scale (adapter bundles). The prefix in the KV cache was computed with the old scale,
        so it is dropped: call set_audio again."""
        if self._adapter is None:
            raise ConfigError("this bundle has no LoRA adapter (its LoRA is merged); the scale is fixed")
        lib = self._lib
        adapters = (lib.llama_adapter_lora_p_ctypes * 1)(self._adapter)
        scales = (ctypes.c_float * 1)(float(scale))
        if lib.llama_set_adapters_lora(self._ctx, adapters, 1, scales) != 0:
            raise NatureLMEdgeError(f"{self.adapter_path}: llama.cpp could not apply the LoRA adapter")
        self.lora_scale = float(scale)
        self._n_prefix = None
        if self._ctx:
            lib.llama_memory_clear(self._mem, True)

    # -----------------------------------------------------------------------------------------------------------------
    # Tokens

    def tokenize(self, text: str, parse_special: bool = True) -> list[int]:
        """Token ids of `text` with no BOS added; special-token text becomes the special token when parse_special."""
        lib = self._lib
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(self._vocab, data, len(data), buf, cap, False, parse_special)
        if n < 0:
            cap = -n
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(self._vocab, data, len(data), buf, cap, False, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize failed on {text!r}")
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in ids).decode("utf-8", errors="replace")

    def answer_text(self, ids: Sequence[int]) -> str:
        """An answer's text as the reference decodes it: special tokens skipped, transformers' space clean-up when the
        bundle's tokenizer asks for it, surrounding whitespace stripped."""
        text = self.detokenize(ids)
        if (self._llm.get("text") or {}).get("clean_up_tokenization_spaces"):
            text = clean_up_spaces(text)
        return text.strip()

    def _check_tokens(self) -> None:
        """The manifest's token ids must be what this GGUF's tokenizer makes of the manifest's texts."""
        ids = self._llm["token_ids"]
        where = self.model_path

        def single(text: str, expected) -> int:
            got = self.tokenize(text)
            if expected is not None and got != [int(expected)]:
                raise BundleError(f"{where}: {text!r} tokenises to {got}, the manifest says [{expected}]")
            if len(got) != 1:
                raise BundleError(f"{where}: {text!r} is not a single token ({got})")
            return got[0]

        self.bos_id = single(self._prompt["bos"], ids.get("bos"))
        stop_texts = list(self._prompt["stop_tokens"])
        manifest_stops = list(ids.get("stop") or [None] * len(stop_texts))
        if len(manifest_stops) != len(stop_texts):
            raise BundleError(f"{where}: the manifest lists {len(manifest_stops)} stop ids for "
                              f"{len(stop_texts)} stop tokens")
        self.stop_ids = tuple(single(t, i) for t, i in zip(stop_texts, manifest_stops))
        self.yes_id = single("Yes", ids.get("yes"))
        self.no_id = single("No", ids.get("no"))
        self._stop_set = frozenset(self.stop_ids)
        self._prefix_ids = [self.bos_id] + self.tokenize(self._prompt["before_audio"])

    def suffix_ids(self, question: str) -> list[int]:
        ids = self._suffix_cache.get(question)
        if ids is None:
            ids = self._suffix_cache[question] = self.tokenize(suffix_text(self._prompt, question))
        return ids

    def prefix_ids(self) -> list[int]:
        """BOS + the text before the audio (the audio rows follow)."""
        return list(self._prefix_ids)

    def _label_ids(self, label: str) -> list[int]:
        ids = self._label_cache.get(label)
        if ids is None:
            ids = self.tokenize(label, parse_special=False)
            if not ids:
                raise ConfigError(f"label {label!r} is empty")
            self._label_cache[label] = ids
        return ids

    def _digit_tokens(self) -> np.ndarray:
        if self._digits is None:
            digits = []
            for t in range(self.n_vocab):
                piece = self.token_bytes(t)
                if piece and piece.isdigit():
                    digits.append(t)
            if not digits:
                raise BundleError(f"{self.model_path}: the vocabulary has no digit tokens")
            self._digits = np.asarray(digits, dtype=np.int64)
        return self._digits

    # -----------------------------------------------------------------------------------------------------------------
    # Decoding primitives

    def _run(self, batch: _Batch, n: int) -> None:
        batch.batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, batch.batch)
        if rc == 1:
            raise ConfigError(f"the LLM context is full (n_ctx {self.n_ctx}); raise n_ctx or lower max_new_tokens")
        if rc != 0:
            raise NatureLMEdgeError(f"{self.model_path.name}: llama_decode failed with code {rc}")

    def _last_logits(self) -> np.ndarray:
        """A view of the last output's logits, valid until the next decode."""
        ptr = self._lib.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _all_logits(self, n: int) -> np.ndarray:
        ptr = self._lib.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).copy()

    def _decode_tokens(self, ids: Sequence[int], pos0: int, logits: str = "last") -> np.ndarray | None:
        """Decode `ids` at positions pos0, pos0 + 1, ... of sequence 0. logits: "none", "last" (returns a view) or
        "all" (returns a copy, one row per token)."""
        b = self._tok_batch
        rows = []
        total = len(ids)
        for start in range(0, total, b.capacity):
            chunk = ids[start:start + b.capacity]
            n = len(chunk)
            b.token[:n] = chunk
            b.pos[:n] = np.arange(pos0 + start, pos0 + start + n, dtype=np.int32)
            b.logits[:n] = 1 if logits == "all" else 0
            if logits == "last" and start + n == total:
                b.logits[n - 1] = 1
            self._run(b, n)
            if logits == "all":
                rows.append(self._all_logits(n))
        if logits == "all":
            return np.concatenate(rows, axis=0) if rows else np.zeros((0, self.n_vocab), np.float32)
        return self._last_logits() if logits == "last" and total else None

    def _decode_embeddings(self, rows: np.ndarray, pos0: int, logits: bool = False) -> np.ndarray | None:
        n = rows.shape[0]
        if self._embd_batch is None or self._embd_batch.capacity < n:
            if self._embd_batch is not None:
                self._embd_batch.free()
            self._embd_batch = _Batch(self._lib, max(n, 64), self.n_embd)
        b = self._embd_batch
        b.embd[:n] = rows
        b.pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        b.logits[:n] = 1 if logits else 0
        self._run(b, n)
        return self._all_logits(n) if logits else None

    def _decode_one(self, token: int, pos: int) -> np.ndarray:
        b = self._tok_batch
        b.token[0] = token
        b.pos[0] = pos
        b.logits[0] = 1
        self._run(b, 1)
        return self._last_logits()

    def _rewind(self, pos: int) -> None:
        """Forget everything of sequence 0 from `pos` on (the KV cache keeps the earlier positions)."""
        if not self._lib.llama_memory_seq_rm(self._mem, 0, pos, -1):
            raise NatureLMEdgeError("llama.cpp could not trim the KV cache")

    def _check_audio(self, audio: np.ndarray) -> np.ndarray:
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        if audio.ndim != 2 or audio.shape[1] != self.n_embd or audio.shape[0] == 0:
            raise ValueError(f"audio embeddings must be [n, {self.n_embd}], got {tuple(audio.shape)}")
        if not np.all(np.isfinite(audio)):
            raise ValueError("audio embeddings contain NaN or infinity")
        return audio

    # -----------------------------------------------------------------------------------------------------------------
    # Windows and prompts

    def set_audio(self, audio: np.ndarray) -> float:
        """Start a window: clear the KV cache and decode the prefix (BOS, header, audio rows). Returns its ms."""
        audio = self._check_audio(audio)
        if len(self._prefix_ids) + audio.shape[0] >= self.n_ctx:
            raise ConfigError(f"the audio prefix ({len(self._prefix_ids) + audio.shape[0]} positions) does not fit "
                              f"the LLM context (n_ctx {self.n_ctx})")
        t0 = time.perf_counter()
        self._n_prefix = None
        self._lib.llama_memory_clear(self._mem, True)
        self._decode_tokens(self._prefix_ids, 0, logits="none")
        self._decode_embeddings(audio, len(self._prefix_ids))
        self._n_prefix = len(self._prefix_ids) + audio.shape[0]
        ms = (time.perf_counter() - t0) * 1e3
        self.prefix_ms = ms
        return ms

    @property
    def prefix_tokens(self) -> int | None:
        return self._n_prefix

    def _start_prompt(self, question: str, reserve: int) -> tuple[int, np.ndarray, Timings]:
        if self._n_prefix is None:
            raise RuntimeError("no audio prefix in the KV cache: call set_audio(audio) first")
        self._rewind(self._n_prefix)
        suffix = self.suffix_ids(question)
        end = self._n_prefix + len(suffix)
        if end + reserve > self.n_ctx:
            raise ConfigError(f"prompt {question!r} needs {end + reserve} positions (prefix, question and "
                              f"{reserve} answer tokens) but n_ctx is {self.n_ctx}")
        t0 = time.perf_counter()
        logits = self._decode_tokens(suffix, self._n_prefix, logits="last")
        ms = (time.perf_counter() - t0) * 1e3
        return end, logits, Timings(prompt_tokens=len(suffix), prompt_ms=ms)

    def ask(self, prompt: Prompt) -> Answer:
        """Answer one prompt about the audio of the current window (set_audio first)."""
        if prompt.kind == "yes_no":
            reserve = 0
        elif prompt.kind == "label":
            reserve = max(len(self._label_ids(label)) for label in prompt.labels)
        else:
            reserve = 1
        pos, logits, timings = self._start_prompt(prompt.question, reserve)
        if prompt.kind == "yes_no":
            return self._yes_no(prompt, logits, timings)
        if prompt.kind == "label":
            return self._label(prompt, pos, logits, timings)
        if prompt.kind == "count":
            return self._count(prompt, pos, logits, timings)
        return self._generate(prompt, pos, logits, timings)

    def run_window(self, audio: np.ndarray, prompts: Sequence[Prompt], share_prefix: bool = True) -> WindowAnswers:
        """Every prompt about one window. share_prefix=False re-decodes the prefix for each prompt (what the shared
        prefix saves; kept for benchmarks and tests)."""
        answers, prefix_ms, prefills = [], 0.0, 0
        for i, prompt in enumerate(prompts):
            if i == 0 or not share_prefix:
                prefix_ms += self.set_audio(audio)
                prefills += 1
            answers.append(self.ask(prompt))
        return WindowAnswers(answers=answers, prefix_tokens=self._n_prefix or 0, prefix_ms=prefix_ms,
                             prefills=prefills)

    # -----------------------------------------------------------------------------------------------------------------
    # Prompt kinds

    def _yes_no(self, prompt: Prompt, logits: np.ndarray, timings: Timings) -> Answer:
        diff = float(logits[self.yes_id]) - float(logits[self.no_id])
        p_yes = 1.0 / (1.0 + math.exp(-diff)) if diff > -700 else 0.0
        yes = p_yes >= 0.5
        token = self.yes_id if yes else self.no_id
        return Answer(prompt.id, prompt.kind, self.detokenize([token]), (token,), p_yes, timings,
                      scores={"Yes": p_yes, "No": 1.0 - p_yes})

    def _greedy(self, pos: int, logits: np.ndarray, max_new: int, allowed=None) -> tuple[list[int], float, bool, int]:
        """Greedy decoding from `logits` (the view after the question). `allowed(step)` optionally restricts each
        step to some token ids; the returned log-probability is then under that restriction. Returns the tokens
        (stop token excluded), that log-probability, whether a stop token ended it, and how many decodes it took."""
        ids: list[int] = []
        logp = 0.0
        stopped = False
        decoded = 0
        for step in range(max_new):
            if allowed is None:
                token = int(np.argmax(logits))
            else:
                cand = allowed(step)
                sub = logits[cand].astype(np.float64)
                k = int(np.argmax(sub))
                token = int(cand[k])
                m = sub[k]
                logp += -math.log(float(np.exp(sub - m).sum()))
            if token in self._stop_set:
                stopped = True
                break
            ids.append(token)
            if step + 1 == max_new or pos >= self.n_ctx:
                break
            logits = self._decode_one(token, pos)
            pos += 1
            decoded += 1
        return ids, logp, stopped, decoded

    def _generate(self, prompt: Prompt, pos: int, logits: np.ndarray, timings: Timings) -> Answer:
        t0 = time.perf_counter()
        ids, _, stopped, decoded = self._greedy(pos, logits, prompt.new_tokens)
        ms = (time.perf_counter() - t0) * 1e3
        t = Timings(timings.prompt_tokens, timings.prompt_ms, decoded, ms)
        return Answer(prompt.id, prompt.kind, self.answer_text(ids), tuple(ids), None, t, stopped=stopped)

    def _count(self, prompt: Prompt, pos: int, logits: np.ndarray, timings: Timings) -> Answer:
        digits = self._digit_tokens()
        digits_or_stop = np.concatenate([digits, np.asarray(self.stop_ids, dtype=np.int64)])
        t0 = time.perf_counter()
        ids, logp, stopped, decoded = self._greedy(pos, logits, prompt.new_tokens,
                                                   allowed=lambda step: digits if step == 0 else digits_or_stop)
        ms = (time.perf_counter() - t0) * 1e3
        t = Timings(timings.prompt_tokens, timings.prompt_ms, decoded, ms)
        return Answer(prompt.id, prompt.kind, self.answer_text(ids), tuple(ids), math.exp(logp), t,
                      stopped=stopped)

    def _label(self, prompt: Prompt, pos: int, logits: np.ndarray, timings: Timings) -> Answer:
        t0 = time.perf_counter()
        first = _log_softmax(logits)
        totals, decoded = [], 0
        for label in prompt.labels:
            ids = self._label_ids(label)
            rows = self._decode_tokens(ids, pos, logits="all")
            decoded += len(ids)
            total = float(first[ids[0]])
            for j in range(1, len(ids)):
                total += float(_log_softmax(rows[j - 1])[ids[j]])
            last = _log_softmax(rows[-1])
            total += float(np.logaddexp.reduce(last[list(self.stop_ids)]))
            totals.append(total)
            self._rewind(pos)
        shares = np.exp(np.asarray(totals) - np.logaddexp.reduce(totals))
        best = int(np.argmax(shares))
        ms = (time.perf_counter() - t0) * 1e3
        t = Timings(timings.prompt_tokens, timings.prompt_ms, decoded, ms)
        label = prompt.labels[best]
        return Answer(prompt.id, prompt.kind, label, tuple(self._label_ids(label)), float(shares[best]), t,
                      scores={lab: float(s) for lab, s in zip(prompt.labels, shares)})

    # -----------------------------------------------------------------------------------------------------------------
    # Logits, for parity tests and quantization quality reports

    def answer_logits(self, question: str, continuation: Sequence[int] = ()) -> np.ndarray:
        """On the current prefix: logits predicting the first answer token and, teacher-forced, each token after
        `continuation`: [len(continuation) + 1, n_vocab] float32."""
        pos, logits, _ = self._start_prompt(question, len(continuation))
        first = logits.copy()
        if not continuation:
            return first[None, :]
        rest = self._decode_tokens(list(continuation), pos, logits="all")
        return np.concatenate([first[None, :], rest], axis=0)

    def prompt_logits(self, audio: np.ndarray, question: str, continuation: Sequence[int] = ()) -> np.ndarray:
        """A fresh prefill of the whole prompt (+ continuation) with logits at every position, as
        `ReferenceLLM.logits` returns them: [prefix + suffix + len(continuation), n_vocab] float32."""
        audio = self._check_audio(audio)
        self._n_prefix = None
        self._lib.llama_memory_clear(self._mem, True)
        parts = [self._decode_tokens(self._prefix_ids, 0, logits="all")]
        parts.append(self._decode_embeddings(audio, len(self._prefix_ids), logits=True))
        n_prefix = len(self._prefix_ids) + audio.shape[0]
        tail = self.suffix_ids(question) + list(continuation)
        if n_prefix + len(tail) > self.n_ctx:
            raise ConfigError(f"{n_prefix + len(tail)} positions do not fit n_ctx {self.n_ctx}")
        parts.append(self._decode_tokens(tail, n_prefix, logits="all"))
        self._lib.llama_memory_clear(self._mem, True)
        return np.concatenate(parts, axis=0)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    return x - (m + math.log(float(np.exp(x - m).sum())))


__all__ = [
    "PROMPT_KINDS",
    "Answer",
    "EngineOptions",
    "LlmEngine",
    "Prompt",
    "Timings",
    "WindowAnswers",
    "clean_up_spaces",
    "gpu_offload_supported",
    "llama_lib",
    "suffix_text",
]
