"""What the LLM engine needs of llama-cpp-python's ctypes bindings, checked once when they are first loaded.

llama.cpp's C API changes often (functions renamed, struct fields added), and llama-cpp-python follows it. An older
build fails late and obscurely: a missing function is an AttributeError in the middle of a window, and a struct field
the build does not know is worse, because ctypes lets Python set any attribute on a Structure: `cp.flash_attn_type =
1` on a build without that field silently does nothing. So every function (with its argument count, which tells a
renamed-but-reshaped call apart) and every struct field edge/llm.py uses is listed here, and `check_bindings` compares
them with the installed module, field names read from each Structure's `_fields_`. A gap is one clear error naming
what is missing and the llama-cpp-python version this engine is tested with, which is also pyproject's floor.
"""

from __future__ import annotations

from edge.errors import NatureLMEdgeError

#: The llama-cpp-python release this engine is tested with; pyproject.toml requires at least this. Keep both equal.
MIN_LLAMA_CPP_PYTHON = "0.3.36"

#: C functions -> number of arguments. (llama_log_callback, llama_token and llama_adapter_lora_p_ctypes are types.)
FUNCTIONS = {
    "llama_backend_init": 0,
    "llama_log_set": 2,
    "llama_supports_gpu_offload": 0,
    "llama_model_default_params": 0,
    "llama_model_load_from_file": 2,
    "llama_model_free": 1,
    "llama_model_get_vocab": 1,
    "llama_model_n_embd": 1,
    "llama_model_meta_val_str": 4,
    "llama_vocab_n_tokens": 1,
    "llama_context_default_params": 0,
    "llama_init_from_model": 2,
    "llama_free": 1,
    "llama_n_seq_max": 1,
    "llama_n_ctx_seq": 1,
    "llama_get_memory": 1,
    "llama_memory_clear": 2,
    "llama_memory_seq_rm": 4,
    "llama_memory_seq_cp": 5,
    "llama_adapter_lora_init": 2,
    "llama_set_adapters_lora": 4,
    "llama_batch_init": 3,
    "llama_batch_free": 1,
    "llama_decode": 2,
    "llama_get_logits": 1,
    "llama_get_logits_ith": 2,
    "llama_tokenize": 7,
    "llama_token_to_piece": 6,
}
TYPES = ("llama_log_callback", "llama_token", "llama_adapter_lora_p_ctypes", "llama_model_params",
         "llama_context_params", "llama_batch")
#: Structure -> the fields the engine reads or sets.
FIELDS = {
    "llama_model_params": ("n_gpu_layers", "vocab_only"),
    "llama_context_params": ("n_ctx", "n_batch", "n_ubatch", "n_seq_max", "n_threads", "n_threads_batch", "type_k",
                             "type_v", "flash_attn_type", "no_perf", "kv_unified"),
    "llama_batch": ("n_tokens", "token", "embd", "pos", "n_seq_id", "seq_id", "logits"),
}


def missing_capabilities(lib) -> list[str]:
    """What of FUNCTIONS, TYPES and FIELDS the bindings module `lib` lacks, one short phrase each."""
    gaps = []
    for name in TYPES:
        if not hasattr(lib, name):
            gaps.append(f"type {name}")
    for name, n_args in FUNCTIONS.items():
        fn = getattr(lib, name, None)
        if fn is None:
            gaps.append(f"function {name}")
            continue
        argtypes = getattr(fn, "argtypes", None)
        if argtypes is not None and len(argtypes) != n_args:
            gaps.append(f"function {name} with {n_args} arguments (this build's takes {len(argtypes)})")
    for struct, fields in FIELDS.items():
        cls = getattr(lib, struct, None)
        if cls is None:
            continue  # already reported as a missing type
        have = {f[0] for f in getattr(cls, "_fields_", ())}
        gaps.extend(f"field {struct}.{f}" for f in fields if f not in have)
    return gaps


def check_bindings(lib, version: str | None) -> None:
    """Raise one NatureLMEdgeError naming every missing capability, or return quietly."""
    gaps = missing_capabilities(lib)
    if gaps:
        raise NatureLMEdgeError(
            f"llama-cpp-python {version or '(unknown version)'} lacks {', '.join(gaps)}: naturelm-edge needs "
            f"llama-cpp-python >= {MIN_LLAMA_CPP_PYTHON} (pip install -U 'llama-cpp-python>={MIN_LLAMA_CPP_PYTHON}')")


__all__ = ["FIELDS", "FUNCTIONS", "MIN_LLAMA_CPP_PYTHON", "TYPES", "check_bindings", "missing_capabilities"]
