"""Llama (+ NatureLM's LoRA and [PAD] row) -> GGUF for llama.cpp, written one tensor, and one row chunk, at a time.

What llama.cpp expects, and where it differs from the Hugging Face files:
- tensor names `token_embd`, `blk.N.attn_q` ..., `output`; shapes in ggml order (the writer reverses numpy's);
- q_proj/k_proj rows reordered per head: Hugging Face rotates the two *halves* of each head (rotate_half), llama.cpp's
  "normal" rope rotates *adjacent pairs*; reordering each head's rows from [half, i] to [i, half] makes the two agree
  (k uses the number of KV heads);
- Llama 3.1's "llama3" rope scaling is not a metadata switch in llama.cpp but a `rope_freqs` tensor: one divisor per
  rotary frequency (1 for high frequencies, `factor` for low ones, a smooth blend between), which is exactly how
  transformers' llama3 rope init rescales its inverse frequencies;
- the tokenizer goes into metadata as a "gpt2" (byte-level BPE) vocabulary with the "llama-bpe" pre-tokenizer, every
  token with its type (special tokens CONTROL), the merges (an empty list fails to load), and the special ids.

NatureLM's changes to the backbone:
- `[PAD]` appended to the vocabulary (n_vocab + 1). When the NatureLM file carries the resized embed/lm_head matrices
  they replace the Llama's; otherwise the new row is the mean of the old rows, as export/reference_llm.py makes it
  (transformers' mean-resizing without its 1e-9-scaled noise);
- `--lora merge`: W' = W + merging_alpha * (alpha / r) * B @ A, computed in float64 from the float32 weights and rounded
  once to float32 (as the reference does), before the permutation and the cast to f16;
- `--lora adapter`: the base is written unchanged and the LoRA goes into a llama.cpp adapter GGUF (general.type
  "adapter", adapter.type "lora", adapter.lora.alpha = alpha). llama.cpp scales it by user_scale * alpha / r with r read
  from the tensors, so the device passes merging_alpha as the scale. lora_b of q/k gets the same row permutation as
  the weight it patches (B @ A's rows are the weight's rows); lora_a is untouched.

Memory: tensors are produced lazily. `GGUFWriter.add_tensor` is handed a stand-in that knows its shape, dtype and size
(from the safetensors header) and produces its bytes only when the writer reaches it, in row chunks of about
`chunk_bytes` float32; the LoRA targets (q/k/v/o, at most hidden x hidden) are handled whole because the merge and the
permutation need whole heads. The peak is the interpreter + one attention matrix in float64 + a few row chunks,
whatever the model's size.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.errors import CheckpointError
from quantize.llama_source import LlamaHParams, LlamaSource, LlamaVocab
from quantize.safetensors_stream import DEFAULT_CHUNK_BYTES, StreamingSafetensors

logger = logging.getLogger(__name__)
# gguf's writer logs a few lines per file at INFO ("This GGUF file is for Little Endian only", the shard plan); the
# converter reports what it wrote itself.
logging.getLogger("gguf").setLevel(logging.WARNING)

#: general.file_type of the float files (llama_ftype LLAMA_FTYPE_ALL_F32 / LLAMA_FTYPE_MOSTLY_F16).
FLOAT_TYPES = {"F32": (0, np.float32), "F16": (1, np.float16)}
_GGUF_PROJ = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}
_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_LORA_TARGET = re.compile(r"^self_attn\.([qkvo])_proj\.weight$")


# ---------------------------------------------------------------------------------------------------------------------
# The NatureLM checkpoint's language side


@dataclass
class NatureLMLanguageSide:
    """What the NatureLM file changes in the Llama: the LoRA and, when present, the [PAD]-resized matrices."""

    directory: Path
    weights: StreamingSafetensors
    lora_alpha: float
    lora_rank: int
    lora_keys: dict  # (layer, proj) -> (key A, key B)
    embed_key: str | None
    lm_head_key: str | None
    _sha256: Callable[[], str] = field(repr=False, default=lambda: "")

    def sha256(self) -> str:
        return self._sha256()

    def lora_pair(self, layer: int, proj: str) -> tuple[np.ndarray, np.ndarray] | None:
        keys = self.lora_keys.get((layer, proj))
        if keys is None:
            return None
        return self.weights.read(keys[0]), self.weights.read(keys[1])


def _proj_shapes(hp: LlamaHParams) -> dict[str, tuple[int, int]]:
    """(out, in) of each LoRA target."""
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    return {"q": (q, hp.n_embd), "k": (kv, hp.n_embd), "v": (kv, hp.n_embd), "o": (hp.n_embd, q)}


def open_naturelm_language_side(naturelm_dir: Path, hp: LlamaHParams, n_vocab_out: int) -> NatureLMLanguageSide:
    """Open the NatureLM release with the strict loader (every key accounted for) and check that its LoRA and resized
    rows fit the Llama of `hp`, naming the tensor that does not."""
    from export.checkpoint import open_checkpoint  # torch: workstation only

    ckpt = open_checkpoint(Path(naturelm_dir))
    weights = StreamingSafetensors(list(ckpt.file.files))
    where = ckpt.file.files[0]
    shapes = _proj_shapes(hp)
    lora_keys = {}
    if ckpt.config.lora:
        for (layer, proj), ab in sorted(ckpt.lora_keys.items()):
            if layer >= hp.n_layer:
                raise CheckpointError(f"{where}: {ab['A']} adapts layer {layer}, but the Llama has {hp.n_layer} layers")
            out_f, in_f = shapes[proj]
            a_shape, b_shape = weights.shape(ab["A"]), weights.shape(ab["B"])
            r = ckpt.config.lora_rank
            if a_shape != (r, in_f):
                raise CheckpointError(f"{where}: {ab['A']} has shape {a_shape}, the Llama needs ({r}, {in_f})")
            if b_shape != (out_f, r):
                raise CheckpointError(f"{where}: {ab['B']} has shape {b_shape}, the Llama needs ({out_f}, {r})")
            lora_keys[(layer, proj)] = (ab["A"], ab["B"])
    for key in (ckpt.embed_key, ckpt.lm_head_key):
        if key is not None and weights.shape(key) != (n_vocab_out, hp.n_embd):
            raise CheckpointError(f"{where}: {key} has shape {weights.shape(key)}, the [PAD]-resized Llama needs "
                                  f"({n_vocab_out}, {hp.n_embd})")
    return NatureLMLanguageSide(
        directory=Path(naturelm_dir), weights=weights, lora_alpha=float(ckpt.config.lora_alpha),
        lora_rank=int(ckpt.config.lora_rank), lora_keys=lora_keys, embed_key=ckpt.embed_key,
        lm_head_key=ckpt.lm_head_key, _sha256=ckpt.sha256,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Pure transforms


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q/k projection (or of its LoRA B) from Hugging Face's rotate-half layout to llama.cpp's
    adjacent-pair layout: within each head, row (half, i) moves to (i, half)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of pairs")
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def llama3_rope_factors(head_dim: int, rope_theta: float, scaling: dict) -> np.ndarray:
    """The `rope_freqs` divisors of Llama 3.1's rope scaling, one per rotary frequency (head_dim / 2).

    transformers (`_compute_llama3_parameters`) rescales each inverse frequency by wavelength: unchanged below
    original_context / high_freq_factor, divided by `factor` above original_context / low_freq_factor, and in between
    blended as (1 - s) / factor + s with s = (original_context / wavelength - low) / (high - low). llama.cpp divides
    the frequency by the tensor's value, so the value is the reciprocal of that multiplier."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            s = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.asarray(out, dtype=np.float32)


def merge_lora(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """W + scale * B @ A in float64, rounded once to float32."""
    return (w.astype(np.float64) + scale * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Streaming into GGUFWriter


@dataclass
class ConversionStats:
    tensors: int = 0
    bytes_written: int = 0
    largest_buffer: int = 0  # bytes of the largest array produced at once (what the row chunking bounds)

    def note(self, arr: np.ndarray) -> None:
        self.largest_buffer = max(self.largest_buffer, arr.nbytes)


class _LazyTensor:
    """Stands in for a numpy array in `GGUFWriter.add_tensor`: shape, dtype and size are known up front (the header
    needs them), the data are produced only when the writer calls `tofile`, chunk by chunk."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype, produce: Callable[[], Iterable[np.ndarray]],
                 stats: ConversionStats, bar):
        self.name = name
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._produce = produce
        self._stats = stats
        self._bar = bar

    def tofile(self, fp) -> None:
        written = 0
        for chunk in self._produce():
            self._stats.note(chunk)
            out = np.ascontiguousarray(chunk, dtype=self.dtype)
            self._stats.note(out)
            if not np.all(np.isfinite(out)):
                raise CheckpointError(f"tensor {self.name}: values overflow {self.dtype.name} (inf/NaN after "
                                      "conversion)")
            out.tofile(fp)
            written += out.nbytes
            if self._bar is not None:
                self._bar.update(out.nbytes)
        if written != self.nbytes:
            raise RuntimeError(f"tensor {self.name}: produced {written} bytes, declared {self.nbytes}")
        self._stats.tensors += 1
        self._stats.bytes_written += written


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def _write(writer, path: Path, tensors: list[_LazyTensor]) -> None:
    tmp = path.with_name(path.name + ".partial")
    for t in tensors:
        writer.add_tensor(t.name, t)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, path)


def _add_llama_metadata(writer, hp: LlamaHParams, n_vocab: int, file_type: int, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(hp.n_ctx_train)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_norm_eps)
    if hp.head_dim != hp.n_embd // hp.n_head:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    scaling = hp.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer_metadata(writer, vocab: LlamaVocab, where: Path) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.id_of(vocab.bos_token, where))
    writer.add_eos_token_id(vocab.id_of(vocab.eos_token, where))
    if "<|eot_id|>" in vocab.ids:
        writer.add_eot_token_id(vocab.ids["<|eot_id|>"])
    if "<|eom_id|>" in vocab.ids:
        writer.add_eom_token_id(vocab.ids["<|eom_id|>"])
    if "[PAD]" in vocab.ids:
        writer.add_pad_token_id(vocab.ids["[PAD]"])
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def write_model_gguf(
    src: LlamaSource,
    out_path: Path,
    out_type: str = "F16",
    naturelm: NatureLMLanguageSide | None = None,
    merge_lora_scale: float | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
    name: str = "NatureLM-audio Llama",
) -> ConversionStats:
    """Write the backbone as an F32 or F16 GGUF. `merge_lora_scale` = merging_alpha merges the LoRA of `naturelm`
    into q/k/v/o (None: the base weights, for `--lora adapter`)."""
    import gguf

    if out_type not in FLOAT_TYPES:
        raise ValueError(f"out_type must be one of {', '.join(FLOAT_TYPES)}, got {out_type!r}")
    file_type, float_dtype = FLOAT_TYPES[out_type]
    hp = src.hparams
    vocab = src.vocab.with_pad()
    n_vocab_out = len(vocab.tokens)
    w = src.weights
    stats = ConversionStats()
    lora_scale = None
    if merge_lora_scale is not None and naturelm is not None and naturelm.lora_keys:
        lora_scale = float(merge_lora_scale) * naturelm.lora_alpha / naturelm.lora_rank

    writer = gguf.GGUFWriter(None, "llama")
    _add_llama_metadata(writer, hp, n_vocab_out, file_type, name)
    _add_tokenizer_metadata(writer, vocab, src.directory / "tokenizer.json")

    specs: list[tuple[str, tuple[int, ...], object, Callable[[], Iterable[np.ndarray]]]] = []

    def rows_of(key: str) -> Callable[[], Iterator[np.ndarray]]:
        return lambda: w.iter_rows(key, chunk_bytes)

    def vocab_matrix(hf_key: str, carried: str | None) -> Callable[[], Iterator[np.ndarray]]:
        def produce():
            if carried is not None:  # NatureLM's own resized matrix replaces the Llama's wholesale
                yield from naturelm.weights.iter_rows(carried, chunk_bytes)
                return
            total = np.zeros(hp.n_embd, dtype=np.float64)
            for chunk in w.iter_rows(hf_key, chunk_bytes):
                total += chunk.sum(axis=0, dtype=np.float64)
                yield chunk
            extra = n_vocab_out - hp.n_vocab
            if extra:
                mean = (total / hp.n_vocab).astype(np.float32)
                yield np.repeat(mean[None, :], extra, axis=0)
        return produce

    def attention(layer: int, proj: str, key: str) -> Callable[[], Iterator[np.ndarray]]:
        def produce():
            weight = w.read(key)
            if lora_scale is not None:
                pair = naturelm.lora_pair(layer, proj)
                if pair is not None:
                    weight = merge_lora(weight, pair[0], pair[1], lora_scale)
            if proj == "q":
                weight = permute_qk(weight, hp.n_head)
            elif proj == "k":
                weight = permute_qk(weight, hp.n_head_kv)
            yield weight
        return produce

    if (hp.rope_scaling or {}).get("rope_type", (hp.rope_scaling or {}).get("type")) == "llama3":
        factors = llama3_rope_factors(hp.head_dim, hp.rope_theta, hp.rope_scaling)
        specs.append(("rope_freqs.weight", factors.shape, np.float32, lambda: iter([factors])))
    embed_carried = naturelm.embed_key if naturelm is not None else None
    head_carried = naturelm.lm_head_key if naturelm is not None else None
    specs.append(("token_embd.weight", (n_vocab_out, hp.n_embd), float_dtype,
                  vocab_matrix("model.embed_tokens.weight", embed_carried)))
    for layer in range(hp.n_layer):
        for hf_suffix, gguf_suffix in _LAYER_MAP.items():
            key = f"model.layers.{layer}.{hf_suffix}"
            shape = w.shape(key)
            dtype = np.float32 if len(shape) == 1 else float_dtype
            m = _LORA_TARGET.match(hf_suffix)
            produce = attention(layer, m.group(1), key) if m else rows_of(key)
            specs.append((f"blk.{layer}.{gguf_suffix}", shape, dtype, produce))
    specs.append(("output_norm.weight", (hp.n_embd,), np.float32, rows_of("model.norm.weight")))
    if "lm_head.weight" in w or head_carried is not None:
        specs.append(("output.weight", (n_vocab_out, hp.n_embd), float_dtype,
                      vocab_matrix("lm_head.weight", head_carried)))
    # else: tied embeddings; llama.cpp then uses token_embd as the output matrix

    total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d, _ in specs)
    bar = _progress(total, f"{out_type} GGUF", progress)
    try:
        _write(writer, Path(out_path), [_LazyTensor(n, s, d, p, stats, bar) for n, s, d, p in specs])
    finally:
        if bar is not None:
            bar.close()
    logger.info("wrote %s (%d tensors, %.1f MB; largest buffer %.1f MB)", out_path, stats.tensors,
                stats.bytes_written / 1e6, stats.largest_buffer / 1e6)
    return stats


def write_lora_adapter_gguf(src: LlamaSource, naturelm: NatureLMLanguageSide, out_path: Path,
                            progress: bool = True, name: str = "NatureLM-audio LoRA") -> ConversionStats:
    """NatureLM's LoRA as a llama.cpp adapter GGUF (float32: it is small, and exact)."""
    import gguf

    if not naturelm.lora_keys:
        raise CheckpointError(f"{naturelm.directory}: the checkpoint has no LoRA to write as an adapter")
    hp = src.hparams
    stats = ConversionStats()
    writer = gguf.GGUFWriter(None, "llama")
    writer.add_type("adapter")
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(naturelm.lora_alpha))

    def part(layer: int, proj: str, which: int) -> Callable[[], Iterator[np.ndarray]]:
        def produce():
            a, b = naturelm.lora_pair(layer, proj)
            if which == 0:
                yield a
            elif proj in ("q", "k"):
                yield permute_qk(b, hp.n_head if proj == "q" else hp.n_head_kv)
            else:
                yield b
        return produce

    specs = []
    for (layer, proj), (key_a, key_b) in sorted(naturelm.lora_keys.items()):
        base = f"blk.{layer}.{_GGUF_PROJ[proj]}.weight"
        specs.append((base + ".lora_a", naturelm.weights.shape(key_a), np.float32, part(layer, proj, 0)))
        specs.append((base + ".lora_b", naturelm.weights.shape(key_b), np.float32, part(layer, proj, 1)))
    total = sum(int(np.prod(s)) * 4 for _, s, _, _ in specs)
    bar = _progress(total, "LoRA adapter GGUF", progress)
    try:
        _write(writer, Path(out_path), [_LazyTensor(n, s, d, p, stats, bar) for n, s, d, p in specs])
    finally:
        if bar is not None:
            bar.close()
    return stats
