"""Quantization with llama.cpp's own quantizer (`llama_model_quantize`), called through llama-cpp-python.

llama.cpp decides the per-tensor types of each scheme (Q4_K_M keeps some attn_v/ffn_down and the output matrix at
Q6_K, norms stay float32), and falls back from a K-quant to q5_0/q8_0 for a tensor whose rows are not a multiple of 256
(llama.cpp's log says so).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

from edge.errors import NatureLMEdgeError

logger = logging.getLogger(__name__)

#: Quantization scheme -> llama_ftype (llama.h).
QUANT_FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7}
#: Float types the converter writes itself.
FLOAT_TYPES = ("F32", "F16")
ALL_TYPES = FLOAT_TYPES + tuple(QUANT_FTYPES)


def quantize_gguf(src: Path, dst: Path, qtype: str, n_threads: int = 0) -> None:
    """Quantize an F16/F32 GGUF into `dst` (written to a temporary name, renamed when complete)."""
    from edge.llm import llama_lib

    if qtype not in QUANT_FTYPES:
        raise ValueError(f"unknown quantization {qtype!r}; choose one of {', '.join(QUANT_FTYPES)}")
    lib = llama_lib()
    params = lib.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[qtype]
    params.nthread = int(n_threads)
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    rc = lib.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise NatureLMEdgeError(f"{src}: llama.cpp could not quantize it to {qtype} (code {rc}; its log says why)")
    tmp.replace(dst)
