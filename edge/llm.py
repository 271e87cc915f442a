"""The device's language engine: NatureLM's prompt around injected audio embeddings, run by llama.cpp through
llama-cpp-python's ctypes bindings of the C API. No torch.

Why the low-level API: the high-level `Llama` class takes token ids only and keeps its own KV bookkeeping (its `eval`
drops KV entries past its own count), while NatureLM's prompt puts the audio as embedding rows between two token pieces,
and every prompt of a window should reuse one decoded audio prefix. The functions and struct fields used here are
checked once against the installed bindings (edge/llama_api.py).

One window lives in a *slot*: a base llama.cpp sequence plus up to `max_beams` beam sequences:

    BOS  <|start_header_id|>user<|end_header_id|>\\n\\n<Audio>  [audio rows]      <- the prefix: decoded once
    </Audio> QUESTION<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n   <- each prompt's suffix
    answer tokens...

After a prompt, `llama_memory_seq_rm(base, from P)` drops its suffix and answer, and the next prompt starts from the
prefix still in the KV cache: K prompts cost one prefix prefill plus K suffixes, never K audio prefills. Beams are
sequences too: `llama_memory_seq_cp` gives each beam a copy of the prompt's KV, a beam that survives keeps its
sequence, a second child of one parent gets a dropped beam's sequence, cleared and copied from the parent. Every piece
of the prompt (BOS, the texts around the audio, the stop tokens) comes from the bundle's manifest, and the token ids it
records are checked against this GGUF's own tokenizer when the engine opens.

Each sequence has its own KV stream of n_ctx cells (llama.cpp's `kv_unified = false`), sized to the prompts the engine
is opened for (EngineOptions.prompts): a window takes (1 + beams) x n_ctx cells, where beams is the most any of its
beam-searched prompts uses (0 for yes/no, label, count and greedy prompts).

Batches of windows (`answer_windows`): up to `EngineOptions.max_batch` windows sit in as many slots of one context.
Their BOS and header tokens are decoded once and copied, each prompt is asked of all of them, and their answers
(greedy or beam) advance one token per step together. One window (`run_window`, `set_audio` + `ask`) is the same code
with one slot. Exact batches (the default, `exact_batches`): each window's rows go to llama.cpp in a call of their own,
and its answers are bit for bit those of one window at a time, on every CPU. Two things make it so, both measured:
with one KV stream per sequence a window's attention reads its own cells at the same places as alone (in one shared
pool its cells sit elsewhere and attention's sums round differently), and with its rows alone in a call every matrix
kernel does the same arithmetic on them (ggml's kernels round a row's sums differently with the number of rows beside
it: AVX2's repacked Q4_K kernels take rows by fours and the rest one by one, and F32 takes another path for a single
row). Shared batches (`exact_batches=False`) put every window's rows in one call: long answers decode faster, the
scores move in the last digits, and a near-tie between two tokens can flip. tests/test_llm_batch.py checks both.

Prompt kinds (the answer always starts right after the assistant header, where the reference's answers start):
- `yes_no`: one forward pass; P(Yes) / (P(Yes) + P(No)) from the logits of the "Yes" and "No" tokens
  (= sigmoid of their difference: the rest of the vocabulary cancels). Answer "Yes" when it is >= 0.5.
- `label`: each label is scored as a complete answer, log P(label tokens, then a stop token | prompt), and the
  scores are normalised over the label list; the answer is the best label, the score its share. Exact for any label
  list (no greedy prefix commitment, which a grammar-constrained greedy decode would make).
- `open`, `caption`: beam search with 2 beams by default, as upstream decodes (edge/beam.py has its semantics:
  transformers' `generate(num_beams=2, do_sample=False)`), or greedy (`num_beams=1`); bounded length; stops on the
  manifest's stop tokens.
- `count`: greedy decoding restricted to digit tokens (then digits or a stop); the score is the probability of the
  number under that restriction.

Stop tokens: upstream's `generate` stops on the Llama-3.1-Instruct generation config's eos list (<|end_of_text|>,
<|eom_id|>, <|eot_id|>), which new bundles record in their manifest, plus a stopping criterion on token id 2, a
leftover from Llama 2's `</s>`. In Llama 3 id 2 is the ordinary text "#", so stopping on it would cut answers that
contain "#"; it is left out on purpose. (Bundles made before <|eom_id|> was recorded stop on the other two; the
model does not produce <|eom_id|> without tool use.)
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.beam import LENGTH_PENALTY, BeamSearch, log_softmax_rows
from edge.errors import BundleError, ConfigError, NatureLMEdgeError
from edge.llama_api import check_bindings

logger = logging.getLogger(__name__)
_native_logger = logging.getLogger("llama_cpp.native")

PROMPT_KINDS = ("yes_no", "label", "open", "caption", "count")
DEFAULT_MAX_NEW_TOKENS = {"open": 64, "caption": 128, "count": 3}
#: Beams when a prompt gives none: upstream's configs/inference.yml decodes with num_beams 2.
DEFAULT_NUM_BEAMS = {"open": 2, "caption": 2}
#: The most beams a prompt may ask for.
MAX_BEAMS = 8
#: Beam sequences a window gets when the engine is not told its prompts (upstream's num_beams).
DEFAULT_BEAMS = 2
#: llama.cpp rounds each sequence's KV cells up to this (its KV padding; the graph keeps its shape across steps).
KV_CELL_ROUND = 256


def _round_cells(n: int) -> int:
    return -(-n // KV_CELL_ROUND) * KV_CELL_ROUND
#: llama.cpp's LLAMA_MAX_SEQ (src/llama-cparams.h).
LLAMA_MAX_SEQ = 256
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type

_lib = None
_lib_lock = threading.Lock()
_load_lock = threading.Lock()  # the offload line of llama.cpp's log belongs to the model being loaded
_log_callback = None  # the ctypes callback must outlive every call llama.cpp makes to it
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_last_offload: tuple[int, int] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Public data types


@dataclass(frozen=True)
class EngineOptions:
    """How the device runs the bundle's LLM. Every field has a working default."""

    model_type: str | None = None  # which of the bundle's GGUFs (e.g. "Q4_K_M"); None: the manifest's default_model
    n_gpu_layers: int | None = None  # None or -1: all layers (n_layer + 1) when llama.cpp can offload, else 0
    n_ctx: int | None = None  # KV cells of each sequence (a window's base, each beam); None: see LlmEngine
    n_threads: int | None = None  # None: the CPU cores this process may use
    kv_cache_type: str = "f16"  # "f16", "f32" (exact; parity tests), "q8_0" (half the KV memory)
    flash_attn: bool | None = None  # None: llama.cpp decides
    lora_scale: float | None = None  # runtime LoRA scale for adapter bundles; None: the manifest's merging_alpha
    max_batch: int = 1  # windows answer_windows runs together
    #: True: each window of a batch is decoded in its own llama.cpp call, so its answers are bit for bit the
    #: one-window path's on every CPU. False: the windows share calls (faster decoding of long answers); scores then
    #: move in the last bits and a near-tie between two tokens can flip (README: A season of recordings).
    exact_batches: bool = True
    max_beams: int | None = None  # beam sequences per window; None: the most `prompts` use, else DEFAULT_BEAMS
    prompts: tuple = ()  # the Prompts this engine will answer, if known: the KV cache is sized to them

    def __post_init__(self):
        if self.kv_cache_type not in KV_CACHE_TYPES:
            raise ConfigError(f"kv_cache_type {self.kv_cache_type!r}: choose one of {', '.join(KV_CACHE_TYPES)}")
        if self.max_beams is not None and not 0 <= self.max_beams <= MAX_BEAMS:
            raise ConfigError(f"max_beams {self.max_beams}: must be 0..{MAX_BEAMS}")
        per_window = 1 + self.beam_sequences
        limit = LLAMA_MAX_SEQ // per_window
        if not 1 <= self.max_batch <= limit:
            raise ConfigError(f"max_batch {self.max_batch}: must be 1..{limit} (llama.cpp holds at most "
                              f"{LLAMA_MAX_SEQ} sequences, {per_window} per window with {self.beam_sequences} "
                              "beams)")

    @property
    def beam_sequences(self) -> int:
        """Beam sequences each window gets: the most any beam-searched prompt needs (a prompt answered greedily or
        scored needs none)."""
        if self.max_beams is not None:
            return self.max_beams
        if self.prompts:
            return max((p.beams for p in self.prompts if p.decoding == "beam"), default=0)
        return DEFAULT_BEAMS


@dataclass(frozen=True)
class Prompt:
    """One question asked of every window."""

    id: str
    kind: str
    question: str
    labels: tuple[str, ...] = ()
    max_new_tokens: int | None = None  # open/caption/count; None: DEFAULT_MAX_NEW_TOKENS[kind]
    num_beams: int | None = None  # open/caption: 1 is greedy; None: DEFAULT_NUM_BEAMS (2, as upstream)
    length_penalty: float = LENGTH_PENALTY  # beam search: finished scores are sum log p / length ** this

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
        if self.num_beams is not None:
            if not 1 <= self.num_beams <= MAX_BEAMS:
                raise ConfigError(f"prompt {self.id!r}: num_beams must be 1..{MAX_BEAMS}, got {self.num_beams}")
            if self.num_beams > 1 and self.kind not in DEFAULT_NUM_BEAMS:
                raise ConfigError(f"prompt {self.id!r}: num_beams is for open and caption prompts, not "
                                  f"{self.kind}")

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(self.kind, 1)

    @property
    def beams(self) -> int:
        return self.num_beams or DEFAULT_NUM_BEAMS.get(self.kind, 1)

    @property
    def decoding(self) -> str | None:
        """How the answer is decoded: "beam", "greedy", or None for the scored kinds (yes_no, label)."""
        if self.kind in ("yes_no", "label"):
            return None
        return "beam" if self.beams > 1 else "greedy"


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
    decoding: str | None = None  # "beam" or "greedy" (open, caption, count); None for yes_no and label
    num_beams: int = 1


@dataclass(frozen=True)
class WindowAnswers:
    answers: list[Answer]
    prefix_tokens: int  # BOS + text before the audio + audio rows
    prefix_ms: float  # time spent decoding the prefix for this window (its share of a batched prefill)
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
    global _native_last_level, _last_offload
    try:
        py_level = _native_last_level if level == 5 else _NATIVE_LEVELS.get(level, logging.DEBUG)
        _native_last_level = py_level
        msg = text.decode("utf-8", errors="replace").rstrip()
        if msg:
            m = _OFFLOADED.search(msg)
            if m:
                _last_offload = (int(m.group(1)), int(m.group(2)))
            _native_logger.log(py_level, "%s", msg)
    except Exception:  # noqa: BLE001, S110 -- an exception must never cross back into llama.cpp's C frames
        pass


def llama_lib():
    """llama-cpp-python's ctypes bindings, checked for every capability the engine uses (edge/llama_api.py), with the
    backend initialised once and llama.cpp's log routed to logging."""
    global _lib, _log_callback
    with _lib_lock:
        if _lib is None:
            try:
                import llama_cpp
                import llama_cpp.llama_cpp as lib
            except ImportError:
                raise NatureLMEdgeError("llama-cpp-python is not installed: pip install llama-cpp-python") from None
            check_bindings(lib, getattr(llama_cpp, "__version__", None))
            _log_callback = lib.llama_log_callback(_forward_native_log)
            lib.llama_log_set(_log_callback, ctypes.c_void_p(0))
            lib.llama_backend_init()
            _lib = lib
    return _lib


def gpu_offload_supported() -> bool:
    return bool(llama_lib().llama_supports_gpu_offload())


def model_layer_count(path: Path) -> int:
    """The GGUF's number of transformer layers, `{architecture}.block_count` in its metadata, read by llama.cpp from a
    vocab-only load (no weights; llama_model_n_layer is 0 on such a load, the metadata is there)."""
    lib = llama_lib()
    mp = lib.llama_model_default_params()
    mp.vocab_only = True
    mp.n_gpu_layers = 0
    model = lib.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise BundleError(f"{path}: llama.cpp could not load this GGUF (its log says why)")
    try:
        buf = ctypes.create_string_buffer(128)

        def meta(key: str) -> str | None:
            n = lib.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
            return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

        arch = meta("general.architecture")
        count = meta(f"{arch}.block_count") if arch else None
        if count is None or not count.isdigit() or int(count) < 1:
            raise BundleError(f"{path}: no {arch or '?'}.block_count in the GGUF's metadata")
        return int(count)
    finally:
        lib.llama_model_free(model)


def resolve_gpu_layers(requested: int | None, n_layer: int, gpu: bool) -> int:
    """The layer count to ask llama.cpp for: None or negative is "all", spelled out as n_layer + 1 (the transformer
    layers and the output layer), because llama.cpp builds before "negative means all" put no layer on the GPU for
    -1; 0 without GPU offload in this build; never more than n_layer + 1."""
    if requested is None or requested < 0:
        return n_layer + 1 if gpu else 0
    return min(int(requested), n_layer + 1)


def _load_model(path: Path, n_gpu_layers: int):
    """llama_model_load_from_file, and the offload llama.cpp reported while loading ((N, M) or None)."""
    global _last_offload
    lib = llama_lib()
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers = n_gpu_layers
    with _load_lock:
        _last_offload = None
        model = lib.llama_model_load_from_file(str(path).encode(), mp)
        offload = _last_offload
    if not model:
        raise BundleError(f"{path}: llama.cpp could not load this GGUF (its log says why)")
    return model, offload


def probe_offload(path: Path, n_gpu_layers: int | None = None) -> tuple[int, int, int]:
    """Load the GGUF as the engine would (weights included, no context) and free it: (layers llama.cpp offloaded to
    the GPU, layers it could offload (n_layer + 1), the layer count asked for). For `doctor`."""
    lib = llama_lib()
    n_layer = model_layer_count(path)
    asked = resolve_gpu_layers(n_gpu_layers, n_layer, bool(lib.llama_supports_gpu_offload()))
    model, offload = _load_model(path, asked)
    lib.llama_model_free(model)
    done, total = offload or (0, n_layer + 1)
    return done, total, asked


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
    """A llama_batch with numpy views of its arrays (token or embd, pos, logits flags); each row in one sequence."""

    def __init__(self, lib, capacity: int, n_embd: int = 0):
        self._lib = lib
        self.capacity = capacity
        self.batch = lib.llama_batch_init(capacity, n_embd, 1)
        b = self.batch
        self.pos = np.ctypeslib.as_array(b.pos, shape=(capacity,))
        self.logits = np.ctypeslib.as_array(b.logits, shape=(capacity,))
        n_seq = np.ctypeslib.as_array(b.n_seq_id, shape=(capacity,))
        n_seq[:] = 1
        self._seq_rows = [b.seq_id[i] for i in range(capacity)]
        self._seqs = np.zeros(capacity, dtype=np.int64)
        for row in self._seq_rows:
            row[0] = 0
        if n_embd:
            self.embd = np.ctypeslib.as_array(b.embd, shape=(capacity, n_embd))
            self.token = None
        else:
            self.token = np.ctypeslib.as_array(b.token, shape=(capacity,))
            self.embd = None

    def set_seqs(self, seqs: np.ndarray) -> None:
        for i in np.flatnonzero(self._seqs[:len(seqs)] != seqs):
            self._seq_rows[i][0] = int(seqs[i])
        self._seqs[:len(seqs)] = seqs

    def free(self) -> None:
        if self.batch is not None:
            self._lib.llama_batch_free(self.batch)
            self.batch = None


@dataclass
class _Slot:
    """One window's place in the context: its base sequence (prefix, suffix, greedy answers) and beam sequences.
    Ids are role-major: window w of max_batch has base w and beams max_batch * (1 + j) + w, so the same role of
    neighbouring windows has consecutive ids and llama.cpp decodes them in one ubatch (it groups only consecutive
    sequence ids when each has its own KV stream)."""

    base: int
    beams: list[int]
    n_prefix: int | None = None

    @property
    def beam_seqs(self) -> list[int]:
        return list(self.beams)


@dataclass
class _Open:
    """A prompt in flight on one slot: where its answer starts and the logits for its first token."""

    slot: _Slot
    end: int  # first answer position
    logits: np.ndarray  # a copy
    prompt_tokens: int
    prompt_ms: float
    decode_ms: float = 0.0
    decoded: int = 0


# ---------------------------------------------------------------------------------------------------------------------
# The engine


class LlmEngine:
    """NatureLM's language side on one llama.cpp model + context.

    Use `from_bundle`. Per window: `run_window(audio, prompts)`, or `set_audio(audio)` then `ask(prompt)` per prompt.
    Many windows at once: `answer_windows(audios, prompts)` (with EngineOptions.max_batch > 1 to batch them).
    Not thread-safe: one inference worker owns an engine.
    """

    def __init__(self, model_path: Path, llm: Mapping, *, adapter_path: Path | None = None,
                 options: EngineOptions | None = None, model_type: str = "?", audio_rows: int | None = None):
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
        if not self.model_path.is_file():
            raise BundleError(f"{self.model_path}: GGUF not found")

        # "All layers" is spelled out as the model's layer count + 1 (the output layer): older llama.cpp builds read
        # a negative n_gpu_layers as none, and health should say what was asked for in numbers.
        self.n_layer = model_layer_count(self.model_path)
        self.n_gpu_layers = resolve_gpu_layers(opts.n_gpu_layers, self.n_layer, bool(lib.llama_supports_gpu_offload()))
        self._model, offload = _load_model(self.model_path, self.n_gpu_layers)
        # llama.cpp logs "offloaded N/M layers to GPU" only when it can offload at all; without, nothing is.
        self.offloaded_layers, self.offloadable_layers = offload or (0, self.n_layer + 1)
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_embd = int(lib.llama_model_n_embd(self._model))
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        if self.n_embd != int(llm["n_embd"]) or self.n_vocab != int(llm["n_vocab"]):
            raise BundleError(f"{self.model_path}: n_embd {self.n_embd} / n_vocab {self.n_vocab}, but the manifest "
                              f"says {llm['n_embd']} / {llm['n_vocab']}")

        self._check_tokens()  # the vocabulary is loaded with the model; the context's size depends on the prompts
        self._suffix_cache: dict[str, list[int]] = {}
        self._label_cache: dict[str, list[int]] = {}
        self._digits: np.ndarray | None = None
        self._fits: set[Prompt] = set()  # prompts check_prompts let through

        self.max_batch = int(opts.max_batch)
        self.exact = bool(opts.exact_batches)
        self.max_beams = opts.beam_sequences
        self._audio_rows = int(audio_rows) if audio_rows else None
        self._manifest_n_ctx = int(llm["n_ctx"])
        self.n_ctx = self._cells_per_sequence(opts, self._manifest_n_ctx, audio_rows)
        n_seq = self.max_batch * (1 + self.max_beams)
        self._n_batch = min(self.n_ctx * self.max_batch, 8192)
        threads = int(opts.n_threads or _usable_cpus())
        cp = lib.llama_context_default_params()
        cells = _round_cells(self.n_ctx)
        cp.n_ctx = cells * n_seq
        cp.n_batch = self._n_batch
        cp.n_ubatch = min(512, self._n_batch)
        cp.n_seq_max = n_seq
        # One KV stream per sequence, not one pool for all: attention then reads a window's cells at the same places
        # whatever else is in the batch, so a window's answers are bit for bit those of the one-window path (in one
        # pool they sit elsewhere, and the sums over the cache round differently: scores moved by up to 3e-2 and
        # beams changed at Q4_K_M). llama.cpp puts consecutive sequence ids of a batch into one ubatch, so sequence
        # ids are laid out role-major (see _Slot) and _decode sorts its rows by sequence.
        cp.kv_unified = False
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.type_k = cp.type_v = KV_CACHE_TYPES[opts.kv_cache_type]
        if opts.flash_attn is not None:
            cp.flash_attn_type = 1 if opts.flash_attn else 0
        cp.no_perf = True
        self._ctx = lib.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise NatureLMEdgeError(f"{self.model_path}: llama.cpp could not create a context of {n_seq} x "
                                    f"{self.n_ctx} cells (out of memory? try a smaller n_ctx or max_batch)")
        got = int(lib.llama_n_ctx_seq(self._ctx))
        if got < self.n_ctx:
            raise NatureLMEdgeError(f"{self.model_path}: llama.cpp gave each sequence {got} KV cells, not "
                                    f"{cells}")
        self._mem = lib.llama_get_memory(self._ctx)
        self._slots = [_Slot(base=w, beams=[(1 + j) * self.max_batch + w for j in range(self.max_beams)])
                       for w in range(self.max_batch)]

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
        self.prefix_ms = 0.0
        logger.info("LLM %s: %s, %d window(s) x (1 + %d beams) sequences of %d KV cells, %d threads, GPU layers "
                    "%s%s", model_type, self.model_path.name, self.max_batch, self.max_beams, self.n_ctx, threads,
                    self.offload_text, f", LoRA adapter at scale {self.lora_scale}" if self._adapter else "")

    def _cells_per_sequence(self, opts: EngineOptions, manifest_n_ctx: int, audio_rows: int | None) -> int:
        """Positions each sequence may use: EngineOptions.n_ctx as given; else, when the engine knows its prompts and
        the audio's row count, what the longest of them needs (prefix, question, answer) rounded up to the cells
        llama.cpp allocates anyway (KV_CELL_ROUND), capped by the manifest's n_ctx; else the manifest's n_ctx."""
        if opts.n_ctx:
            return int(opts.n_ctx)
        if opts.prompts and audio_rows:
            need = max(self.cells_needed(p, int(audio_rows)) for p in opts.prompts)
            return min(manifest_n_ctx, _round_cells(need))
        return manifest_n_ctx

    def cells_needed(self, prompt: Prompt, audio_rows: int) -> int:
        """Positions one window's prompt takes: the prefix with `audio_rows` rows, the question, the longest answer."""
        if prompt.kind == "label":
            answer = max(len(self._label_ids(label)) for label in prompt.labels)
        elif prompt.kind == "yes_no":
            answer = 0
        else:
            answer = prompt.new_tokens
        return len(self._prefix_ids) + audio_rows + len(self.suffix_ids(prompt.question)) + answer

    def check_prompts(self, prompts: Sequence[Prompt]) -> None:
        """Refuse, naming the prompt, one this engine's context cannot answer as asked: more beams than it holds per
        window, or, when its context was sized to other prompts, a longer one (a new engine is needed: restart).
        With the manifest's full n_ctx, an answer too long for it is cut there, as always."""
        for prompt in prompts:
            if prompt in self._fits:
                continue
            if prompt.decoding == "beam" and prompt.beams > self.max_beams:
                raise ConfigError(f"prompt {prompt.id!r} asks for {prompt.beams} beams but the LLM was opened with "
                                  f"{self.max_beams} per window: restart to open it for these prompts")
            if self._audio_rows and self.n_ctx < self._manifest_n_ctx:
                need = min(self.cells_needed(prompt, self._audio_rows), self._manifest_n_ctx)
                if need > self.n_ctx:
                    raise ConfigError(f"prompt {prompt.id!r} needs {need} positions but the LLM was opened with "
                                      f"{self.n_ctx} for its first prompts: restart to open it for these prompts")
            self._fits.add(prompt)  # checked once, not again for every window that asks it

    @property
    def offload_text(self) -> str:
        """"N/M": the layers llama.cpp put on the GPU, of the model's layers + its output layer."""
        return f"{self.offloaded_layers}/{self.offloadable_layers}"

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
        audio = bundle.manifest.get("audio") or {}
        return cls(path, llm, adapter_path=adapter, options=options, model_type=model_type,
                   audio_rows=audio.get("embeddings_per_clip"))

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
        self._forget_all()

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

    def _forget_all(self) -> None:
        for slot in self._slots:
            slot.n_prefix = None
        if self._ctx:
            self._lib.llama_memory_clear(self._mem, True)

    def _run(self, batch: _Batch, n: int) -> None:
        batch.batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, batch.batch)
        if rc == 1:
            raise ConfigError(f"the LLM context is full (n_ctx {self.n_ctx} per window); raise n_ctx or lower "
                              "max_new_tokens")
        if rc != 0:
            raise NatureLMEdgeError(f"{self.model_path.name}: llama_decode failed with code {rc}")

    def _decode(self, seqs, pos, *, tokens=None, embd: np.ndarray | None = None, logits=None) -> np.ndarray:
        """Decode rows i = (sequence seqs[i], position pos[i], tokens[i] or embd[i]) in as few llama_decode calls as
        n_batch allows. logits: a mask of the rows whose logits to return, or None for none, or True for all.
        Returns a copy, one row per flagged row in order: [n_flagged, n_vocab] float32."""
        seqs = np.asarray(seqs, dtype=np.int64)
        pos = np.asarray(pos, dtype=np.int32)
        n = len(seqs)
        if logits is None or logits is False:
            want = np.zeros(n, dtype=bool)
        elif logits is True:
            want = np.ones(n, dtype=bool)
        else:
            want = np.asarray(logits, dtype=bool)
        # Rows by window, then by sequence (a sequence's rows keep their order), and the logits back in the caller's
        # order. Exact batching (the default) gives each window its own llama_decode: its rows are then the rows it
        # would have alone, and every kernel does the same arithmetic on them. Shared batching decodes all windows in
        # one call: llama.cpp fills a ubatch with a run of consecutive sequence ids, which the role-major ids and this
        # order give it.
        window = seqs % self.max_batch if self.exact else np.zeros(n, dtype=np.int64)
        order = np.lexsort((seqs, window))
        if not np.array_equal(order, np.arange(n)):
            embd = None if embd is None else np.asarray(embd)[order]
            tokens = None if tokens is None else np.asarray(tokens)[order]
            got = self._decode(seqs[order], pos[order], tokens=tokens, embd=embd, logits=want[order])
            return got[np.argsort(order[want[order]], kind="stable")]
        if self.exact and n and window[0] != window[-1]:
            cuts = np.flatnonzero(np.diff(window)) + 1
            parts = [self._decode(seqs[a:b], pos[a:b], tokens=None if tokens is None else tokens[a:b],
                                  embd=None if embd is None else embd[a:b], logits=want[a:b])
                     for a, b in zip(np.r_[0, cuts], np.r_[cuts, n])]
            return np.concatenate(parts, axis=0)
        if embd is not None:
            cap = min(n, self._n_batch)
            if self._embd_batch is None or self._embd_batch.capacity < cap:
                if self._embd_batch is not None:
                    self._embd_batch.free()
                self._embd_batch = _Batch(self._lib, max(cap, 64), self.n_embd)
            batch = self._embd_batch
        else:
            batch = self._tok_batch
            tokens = np.asarray(tokens, dtype=np.int32)
        out = []
        for start in range(0, n, batch.capacity):
            stop = min(n, start + batch.capacity)
            m = stop - start
            if embd is not None:
                batch.embd[:m] = embd[start:stop]
            else:
                batch.token[:m] = tokens[start:stop]
            batch.pos[:m] = pos[start:stop]
            batch.set_seqs(seqs[start:stop])
            flags = want[start:stop]
            batch.logits[:m] = flags
            self._run(batch, m)
            for i in np.flatnonzero(flags):
                ptr = self._lib.llama_get_logits_ith(self._ctx, int(i))
                out.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return np.stack(out) if out else np.zeros((0, self.n_vocab), np.float32)

    def _seq_rm(self, seq: int, p0: int = -1) -> None:
        """Forget sequence `seq` from position p0 on (-1: all of it); the cells stay for other sequences that share
        them."""
        if not self._lib.llama_memory_seq_rm(self._mem, seq, p0, -1):
            raise NatureLMEdgeError("llama.cpp could not trim the KV cache")

    def _seq_cp(self, src: int, dst: int) -> None:
        self._lib.llama_memory_seq_cp(self._mem, src, dst, -1, -1)

    def _check_audio(self, audio: np.ndarray) -> np.ndarray:
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        if audio.ndim != 2 or audio.shape[1] != self.n_embd or audio.shape[0] == 0:
            raise ValueError(f"audio embeddings must be [n, {self.n_embd}], got {tuple(audio.shape)}")
        if not np.all(np.isfinite(audio)):
            raise ValueError("audio embeddings contain NaN or infinity")
        if len(self._prefix_ids) + audio.shape[0] >= self.n_ctx:
            raise ConfigError(f"the audio prefix ({len(self._prefix_ids) + audio.shape[0]} positions) does not fit "
                              f"the LLM context (n_ctx {self.n_ctx})")
        return audio

    def _prefill(self, audios: Sequence[np.ndarray]) -> float:
        """Clear the context and decode the prefixes of the windows into slots 0, 1, ...: the BOS and header tokens
        once (then shared by sequence copies), all the audio rows in one batch. Returns ms per window."""
        if not 1 <= len(audios) <= self.max_batch:
            raise ValueError(f"{len(audios)} windows for {self.max_batch} slots")
        audios = [self._check_audio(a) for a in audios]
        t0 = time.perf_counter()
        self._forget_all()
        slots = self._slots[:len(audios)]
        ids = self._prefix_ids
        k = len(ids)
        self._decode([slots[0].base] * k, np.arange(k), tokens=ids)
        for slot in slots[1:]:
            self._seq_cp(slots[0].base, slot.base)
        counts = [a.shape[0] for a in audios]
        self._decode(np.repeat([s.base for s in slots], counts), np.concatenate([k + np.arange(c) for c in counts]),
                     embd=np.concatenate(audios))
        for slot, c in zip(slots, counts):
            slot.n_prefix = k + c
        return (time.perf_counter() - t0) * 1e3 / len(audios)

    # -----------------------------------------------------------------------------------------------------------------
    # Windows and prompts

    def set_audio(self, audio: np.ndarray) -> float:
        """Start a window: clear the KV cache and decode the prefix (BOS, header, audio rows). Returns its ms."""
        ms = self._prefill([audio])
        self.prefix_ms = ms
        return ms

    @property
    def prefix_tokens(self) -> int | None:
        return self._slots[0].n_prefix

    def _start(self, question: str, reserve: int, slots: Sequence[_Slot]) -> list[_Open]:
        """Drop each slot's previous prompt and decode this question's suffix on all of them in one batch."""
        for slot in slots:
            if slot.n_prefix is None:
                raise RuntimeError("no audio prefix in the KV cache: call set_audio(audio) first")
        suffix = self.suffix_ids(question)
        n = len(suffix)
        for slot in slots:
            self._seq_rm(slot.base, slot.n_prefix)
            end = slot.n_prefix + n
            if end + reserve > self.n_ctx:
                raise ConfigError(f"prompt {question!r} needs {end + reserve} positions (prefix, question and "
                                  f"{reserve} answer tokens) but n_ctx is {self.n_ctx}")
        t0 = time.perf_counter()
        want = np.zeros(n * len(slots), dtype=bool)
        want[n - 1::n] = True
        rows = self._decode(np.repeat([s.base for s in slots], n),
                            np.concatenate([s.n_prefix + np.arange(n) for s in slots]),
                            tokens=np.tile(suffix, len(slots)), logits=want)
        ms = (time.perf_counter() - t0) * 1e3 / len(slots)
        return [_Open(slot=s, end=s.n_prefix + n, logits=rows[i], prompt_tokens=n, prompt_ms=ms)
                for i, s in enumerate(slots)]

    def _reserve(self, prompt: Prompt) -> int:
        if prompt.kind == "yes_no":
            return 0
        if prompt.kind == "label":
            return max(len(self._label_ids(label)) for label in prompt.labels)
        return 1

    def ask(self, prompt: Prompt) -> Answer:
        """Answer one prompt about the audio of the current window (set_audio first)."""
        return self._ask_many(prompt, self._slots[:1])[0]

    def _ask_many(self, prompt: Prompt, slots: Sequence[_Slot]) -> list[Answer]:
        self.check_prompts([prompt])
        opens = self._start(prompt.question, self._reserve(prompt), slots)
        if prompt.kind == "yes_no":
            return [self._yes_no(prompt, o) for o in opens]
        if prompt.kind == "label":
            return self._label(prompt, opens)
        if prompt.kind == "count":
            return self._count(prompt, opens)
        if prompt.beams > 1:
            return self._beam(prompt, opens)
        return self._generate(prompt, opens)

    def run_window(self, audio: np.ndarray, prompts: Sequence[Prompt], share_prefix: bool = True) -> WindowAnswers:
        """Every prompt about one window. share_prefix=False re-decodes the prefix for each prompt (what the shared
        prefix saves; kept for benchmarks and tests)."""
        if share_prefix:
            return self.answer_windows([audio], list(prompts))[0]
        answers, prefix_ms = [], 0.0
        for prompt in prompts:
            prefix_ms += self.set_audio(audio)
            answers.append(self.ask(prompt))
        return WindowAnswers(answers=answers, prefix_tokens=self.prefix_tokens or 0, prefix_ms=prefix_ms,
                             prefills=len(answers))

    def answer_windows(self, audios: Sequence[np.ndarray],
                       prompts: Sequence[Prompt] | Sequence[Sequence[Prompt]]) -> list[WindowAnswers]:
        """Answer the prompts of many windows, `max_batch` windows at a time in one llama.cpp context.

        audios: each window's audio embeddings, [n_audio, n_embd] float32 (what AudioEncoder.encode gives per window).
        prompts: one list of Prompts for every window, or one list per window (a window's due prompts; may be empty).
        Returns one WindowAnswers per window, in order, each with its answers in its prompts' order.

        Per group of up to max_batch windows: their audio prefixes are prefilled together (one llama_batch of audio
        rows, one sequence per window), then each distinct prompt is asked of every window that has it: the suffixes
        in one batch (yes_no answers come straight from it), label tokens one batch per label, and open, caption and
        count answers, greedy or beam, advance one token per batch for all those windows together. The answers equal
        the one-window path's (run_window / set_audio + ask): same decisions and tokens, logits within float noise.
        Timings of shared batches are split evenly between the windows in them. Leaves the last group's prefixes in
        the cache (set_audio/ask afterwards work on the first window of it).
        """
        audios = list(audios)
        if not prompts or isinstance(prompts[0], Prompt):
            per_window = [list(prompts)] * len(audios)
        else:
            per_window = [list(p) for p in prompts]
            if len(per_window) != len(audios):
                raise ValueError(f"{len(per_window)} prompt lists for {len(audios)} windows")
        results: list[WindowAnswers] = []
        for start in range(0, len(audios), self.max_batch):
            group = audios[start:start + self.max_batch]
            group_prompts = per_window[start:start + self.max_batch]
            share = self._prefill(group)
            got: list[dict] = [{} for _ in group]
            distinct: list[Prompt] = []
            for ps in group_prompts:
                distinct.extend(p for p in ps if p not in distinct)
            for prompt in distinct:
                which = [w for w, ps in enumerate(group_prompts) if prompt in ps]
                for w, answer in zip(which, self._ask_many(prompt, [self._slots[w] for w in which])):
                    got[w][prompt] = answer
            for w, ps in enumerate(group_prompts):
                results.append(WindowAnswers(answers=[got[w][p] for p in ps], prefix_tokens=self._slots[w].n_prefix,
                                             prefix_ms=share, prefills=1))
        return results

    # -----------------------------------------------------------------------------------------------------------------
    # Prompt kinds

    @staticmethod
    def _timings(o: _Open) -> Timings:
        return Timings(o.prompt_tokens, o.prompt_ms, o.decoded, o.decode_ms)

    def _yes_no(self, prompt: Prompt, o: _Open) -> Answer:
        diff = float(o.logits[self.yes_id]) - float(o.logits[self.no_id])
        p_yes = 1.0 / (1.0 + math.exp(-diff)) if diff > -700 else 0.0
        yes = p_yes >= 0.5
        token = self.yes_id if yes else self.no_id
        return Answer(prompt.id, prompt.kind, self.detokenize([token]), (token,), p_yes, self._timings(o),
                      scores={"Yes": p_yes, "No": 1.0 - p_yes})

    def _greedy(self, opens: Sequence[_Open], max_new: int, allowed=None) -> list[tuple[list[int], float, bool]]:
        """Greedy decoding of every open answer, one batch per step. `allowed(step)` optionally restricts each step
        to some token ids; the returned log-probability is then under that restriction. Returns per answer the tokens
        (stop token excluded), that log-probability and whether a stop token ended it."""
        n = len(opens)
        ids: list[list[int]] = [[] for _ in range(n)]
        logp = [0.0] * n
        stopped = [False] * n
        logits = [o.logits for o in opens]
        pos = [o.end for o in opens]
        active = list(range(n))
        step = 0
        while active:
            t0 = time.perf_counter()
            rows = []
            for i in active:
                if allowed is None:
                    token = int(np.argmax(logits[i]))
                else:
                    cand = allowed(step)
                    sub = logits[i][cand].astype(np.float64)
                    k = int(np.argmax(sub))
                    token = int(cand[k])
                    logp[i] += -math.log(float(np.exp(sub - sub[k]).sum()))
                if token in self._stop_set:
                    stopped[i] = True
                    continue
                ids[i].append(token)
                if step + 1 == max_new or pos[i] >= self.n_ctx:
                    continue
                rows.append((i, token))
            if rows:
                out = self._decode([opens[i].slot.base for i, _ in rows], [pos[i] for i, _ in rows],
                                   tokens=[t for _, t in rows], logits=True)
                for r, (i, _) in enumerate(rows):
                    logits[i] = out[r]
                    pos[i] += 1
                    opens[i].decoded += 1
            ms = (time.perf_counter() - t0) * 1e3
            for i in active:
                opens[i].decode_ms += ms / len(active)
            active = [i for i, _ in rows]
            step += 1
        return [(ids[i], logp[i], stopped[i]) for i in range(n)]

    def _generate(self, prompt: Prompt, opens: Sequence[_Open]) -> list[Answer]:
        results = self._greedy(opens, prompt.new_tokens)
        return [Answer(prompt.id, prompt.kind, self.answer_text(ids), tuple(ids), None, self._timings(o),
                       stopped=stopped, decoding="greedy", num_beams=1)
                for o, (ids, _, stopped) in zip(opens, results)]

    def _count(self, prompt: Prompt, opens: Sequence[_Open]) -> list[Answer]:
        digits = self._digit_tokens()
        digits_or_stop = np.concatenate([digits, np.asarray(self.stop_ids, dtype=np.int64)])
        results = self._greedy(opens, prompt.new_tokens, allowed=lambda step: digits if step == 0 else digits_or_stop)
        return [Answer(prompt.id, prompt.kind, self.answer_text(ids), tuple(ids), math.exp(logp), self._timings(o),
                       stopped=stopped, decoding="greedy", num_beams=1)
                for o, (ids, logp, stopped) in zip(opens, results)]

    def _reseat(self, slot: _Slot, parent_seqs: list[int] | None, chosen: list[tuple[int, int]]) -> list[int]:
        """Give each chosen (parent, token) beam a sequence holding its parent's cells. parent_seqs None: the parent
        is the prompt on the slot's base sequence. A parent's first child keeps the parent's sequence; another child
        gets a sequence no beam runs on now, given a copy of the parent's KV stream."""
        if parent_seqs is None:
            seqs = slot.beam_seqs[:len(chosen)]
            for s in seqs:
                self._seq_rm(s)
                self._seq_cp(slot.base, s)
            return seqs
        seqs: list[int | None] = [None] * len(chosen)
        claimed = set()
        for k, (parent, _) in enumerate(chosen):
            if parent not in claimed:
                claimed.add(parent)
                seqs[k] = parent_seqs[parent]
        free = [s for j, s in enumerate(parent_seqs) if j not in claimed]
        free += [s for s in slot.beam_seqs if s not in parent_seqs]
        for k, (parent, _) in enumerate(chosen):
            if seqs[k] is None:
                s = free.pop(0)
                self._seq_rm(s)
                self._seq_cp(parent_seqs[parent], s)
                seqs[k] = s
        return seqs

    def _beam(self, prompt: Prompt, opens: Sequence[_Open]) -> list[Answer]:
        """Beam search (edge/beam.py) of every open answer; all their running beams decode in one batch per step."""
        width = prompt.beams
        searches = []
        for o in opens:
            max_new = min(prompt.new_tokens, self.n_ctx - o.end)  # each beam has a sequence of n_ctx cells
            if max_new < 1:
                raise ConfigError(f"prompt {prompt.question!r}: no room for an answer in n_ctx {self.n_ctx}")
            searches.append(BeamSearch(width, max_new, self.stop_ids, prompt.length_penalty))
        seqs: list[list[int] | None] = [None] * len(opens)
        logits = [o.logits[None, :] for o in opens]
        active = list(range(len(opens)))
        while active:
            t0 = time.perf_counter()
            rows: list[tuple[int, int, int, int]] = []  # (answer, sequence, position, token)
            still = []
            for i in active:
                chosen = searches[i].step(logits[i])
                if chosen is None:
                    continue
                seqs[i] = self._reseat(opens[i].slot, seqs[i], chosen)
                at = opens[i].end + searches[i].length - 1
                rows.extend((i, s, at, token) for (_, token), s in zip(chosen, seqs[i]))
                still.append(i)
            if rows:
                out = self._decode([r[1] for r in rows], [r[2] for r in rows], tokens=[r[3] for r in rows],
                                   logits=True)
                for i in still:
                    mine = [r for r, row in enumerate(rows) if row[0] == i]
                    logits[i] = out[mine]
                    opens[i].decoded += len(mine)
            ms = (time.perf_counter() - t0) * 1e3
            for i in active:
                opens[i].decode_ms += ms / len(active)
            active = still
        for o in opens:
            for s in o.slot.beam_seqs[:width]:
                self._seq_rm(s)
        return [Answer(prompt.id, prompt.kind, self.answer_text(b.tokens), b.tokens, None, self._timings(o),
                       stopped=b.stopped, decoding="beam", num_beams=width) for o, b in zip(opens, searches)]

    def _label(self, prompt: Prompt, opens: Sequence[_Open]) -> list[Answer]:
        t0 = time.perf_counter()
        firsts = log_softmax_rows(np.stack([o.logits for o in opens]))
        totals = np.zeros((len(opens), len(prompt.labels)))
        decoded = 0
        for j, label in enumerate(prompt.labels):
            ids = self._label_ids(label)
            m = len(ids)
            rows = self._decode(np.repeat([o.slot.base for o in opens], m),
                                np.concatenate([o.end + np.arange(m) for o in opens]),
                                tokens=np.tile(ids, len(opens)), logits=True)
            decoded += m
            for i, o in enumerate(opens):
                lp = log_softmax_rows(rows[i * m:(i + 1) * m])
                total = float(firsts[i, ids[0]])
                for k in range(1, m):
                    total += float(lp[k - 1, ids[k]])
                total += float(np.logaddexp.reduce(lp[m - 1, list(self.stop_ids)]))
                totals[i, j] = total
                self._seq_rm(o.slot.base, o.end)
        ms = (time.perf_counter() - t0) * 1e3 / len(opens)
        answers = []
        for i, o in enumerate(opens):
            shares = np.exp(totals[i] - np.logaddexp.reduce(totals[i]))
            best = int(np.argmax(shares))
            o.decoded, o.decode_ms = decoded, ms
            label = prompt.labels[best]
            answers.append(Answer(prompt.id, prompt.kind, label, tuple(self._label_ids(label)), float(shares[best]),
                                  self._timings(o), scores={lab: float(s) for lab, s in zip(prompt.labels, shares)}))
        return answers

    # -----------------------------------------------------------------------------------------------------------------
    # Logits, for parity tests and quantization quality reports

    def answer_logits(self, question: str, continuation: Sequence[int] = ()) -> np.ndarray:
        """On the current prefix: logits predicting the first answer token and, teacher-forced, each token after
        `continuation`: [len(continuation) + 1, n_vocab] float32."""
        o = self._start(question, len(continuation), self._slots[:1])[0]
        first = o.logits[None, :]
        if not continuation:
            return first
        m = len(continuation)
        rest = self._decode([o.slot.base] * m, o.end + np.arange(m), tokens=list(continuation), logits=True)
        return np.concatenate([first, rest], axis=0)

    def first_token_logits(self, audios: Sequence[np.ndarray], question: str) -> np.ndarray:
        """The logits predicting the first answer token of `question` for each window, the windows batched as
        answer_windows batches them (up to max_batch at a time): [len(audios), n_vocab] float32."""
        rows = []
        for start in range(0, len(audios), self.max_batch):
            group = audios[start:start + self.max_batch]
            self._prefill(group)
            rows.extend(o.logits for o in self._start(question, 0, self._slots[:len(group)]))
        return np.stack(rows)

    def prompt_logits(self, audio: np.ndarray, question: str, continuation: Sequence[int] = ()) -> np.ndarray:
        """A fresh prefill of the whole prompt (+ continuation) with logits at every position, as
        `ReferenceLLM.logits` returns them: [prefix + suffix + len(continuation), n_vocab] float32."""
        audio = self._check_audio(audio)
        self._forget_all()
        ids = self._prefix_ids
        k = len(ids)
        parts = [self._decode([0] * k, np.arange(k), tokens=ids, logits=True)]
        n = audio.shape[0]
        parts.append(self._decode([0] * n, k + np.arange(n), embd=audio, logits=True))
        n_prefix = k + n
        tail = self.suffix_ids(question) + list(continuation)
        if n_prefix + len(tail) > self.n_ctx:
            raise ConfigError(f"{n_prefix + len(tail)} positions do not fit n_ctx {self.n_ctx}")
        parts.append(self._decode([0] * len(tail), n_prefix + np.arange(len(tail)), tokens=tail, logits=True))
        self._forget_all()
        return np.concatenate(parts, axis=0)


__all__ = [
    "DEFAULT_NUM_BEAMS",
    "MAX_BEAMS",
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
    "model_layer_count",
    "probe_offload",
    "resolve_gpu_layers",
    "suffix_text",
]
