"""`naturelm-edge quantize`: the bundle's language side, from the NatureLM release + the Llama directory.

Steps: check both inputs (nothing is written when one is wrong) -> F16 GGUF (LoRA merged at merging_alpha, or base +
a LoRA adapter GGUF) -> F32 on request -> each llama.cpp quantization of the F16 -> a quality report of each against the
F16, through the device engine -> the manifest's "llm" section. The F16 is the quantizer's input and the quality
reference; it stays in the bundle only when F16 is among the requested types.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from edge import __version__
from edge.bundle import update_manifest
from edge.errors import CheckpointError, ConfigError
from edge.spec import PROMPT
from quantize.convert import open_naturelm_language_side, write_lora_adapter_gguf, write_model_gguf
from quantize.llama_quant import ALL_TYPES, QUANT_FTYPES, quantize_gguf
from quantize.llama_source import PAD_TOKEN, LlamaSource, open_llama_dir
from quantize.safetensors_stream import DEFAULT_CHUNK_BYTES

logger = logging.getLogger(__name__)

DEFAULT_TYPES = ("Q4_K_M", "Q8_0")
DEFAULT_N_CTX = 1024
ADAPTER_FILE = "llm-lora.gguf"
LORA_MODES = ("merge", "adapter")


def model_file(qtype: str) -> str:
    return f"llm-{qtype.lower()}.gguf"


def parse_types(text: str | Sequence[str]) -> tuple[str, ...]:
    items = [t.strip().upper() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not items:
        raise ConfigError("--type: no model type given")
    for t in items:
        if t not in ALL_TYPES:
            raise ConfigError(f"--type: unknown model type {t!r}; choose from {', '.join(ALL_TYPES)}")
    return tuple(dict.fromkeys(items))


def _tool_versions() -> dict:
    out = {"naturelm-edge": __version__}
    for dist in ("gguf", "llama_cpp_python", "numpy"):
        try:
            out[dist.replace("_", "-")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _single_token(src: LlamaSource, text: str) -> int:
    """The Hugging Face tokenizer's id for `text` when it is one token (the yes/no scorer needs "Yes" and "No")."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src.directory / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
        raise CheckpointError(f"{src.directory / 'tokenizer.json'}: {text!r} is not a single token ({ids}); the "
                              "yes/no scorer needs it to be")
    return ids[0]


def build_llm_bundle(
    naturelm_dir: Path,
    llama_dir: Path,
    out_dir: Path,
    types: Sequence[str] = DEFAULT_TYPES,
    lora_mode: str = "merge",
    merging_alpha: float = 1.0,
    n_ctx: int = DEFAULT_N_CTX,
    quality: bool = True,
    quality_clips: int = 2,
    threads: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
    work_dir: Path | None = None,
) -> dict:
    """Write the LLM files into `out_dir` and its manifest's "llm" section; returns that section."""
    types = parse_types(types)
    if lora_mode not in LORA_MODES:
        raise ConfigError(f"--lora: {lora_mode!r} is not one of {', '.join(LORA_MODES)}")
    if not (math.isfinite(merging_alpha) and merging_alpha >= 0):
        raise ConfigError(f"--merging-alpha must be a finite number >= 0, got {merging_alpha}")
    if n_ctx < 64:
        raise ConfigError(f"--n-ctx {n_ctx} is too small for NatureLM's prompt (>= 64; 1024 is the default)")

    src = open_llama_dir(Path(llama_dir))
    vocab = src.vocab.with_pad()
    naturelm = open_naturelm_language_side(Path(naturelm_dir), src.hparams, len(vocab.tokens))
    if lora_mode == "adapter" and not naturelm.lora_keys:
        raise CheckpointError(f"{naturelm_dir}: --lora adapter, but the checkpoint has no LoRA")
    mode = lora_mode if naturelm.lora_keys else "none"
    token_ids = {
        "bos": vocab.id_of(PROMPT.bos, src.directory / "tokenizer.json"),
        "stop": [vocab.id_of(t, src.directory / "tokenizer.json") for t in PROMPT.stop_tokens],
        "yes": _single_token(src, "Yes"),
        "no": _single_token(src, "No"),
        "pad": vocab.ids[PAD_TOKEN],
    }

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".llm-work-", dir=work_dir or out_dir))
    try:
        files: dict[str, Path] = {}
        f16 = (out_dir if "F16" in types else work) / model_file("F16")
        merge_scale = merging_alpha if mode == "merge" else None
        write_model_gguf(src, f16, "F16", naturelm, merge_scale, chunk_bytes, progress)
        if "F16" in types:
            files["F16"] = f16
        if "F32" in types:
            files["F32"] = out_dir / model_file("F32")
            write_model_gguf(src, files["F32"], "F32", naturelm, merge_scale, chunk_bytes, progress)
        adapter = None
        if mode == "adapter":
            adapter = out_dir / ADAPTER_FILE
            write_lora_adapter_gguf(src, naturelm, adapter, progress)
        quants = [t for t in types if t in QUANT_FTYPES]
        if quants:
            from tqdm import tqdm

            for qtype in tqdm(quants, desc="quantize", disable=not progress, leave=False):
                files[qtype] = out_dir / model_file(qtype)
                quantize_gguf(f16, files[qtype], qtype, threads)

        llm = {
            "n_embd": src.hparams.n_embd,
            "n_vocab": len(vocab.tokens),
            "n_layer": src.hparams.n_layer,
            "n_ctx": int(n_ctx),
            "n_ctx_train": src.hparams.n_ctx_train,
            "prompt": PROMPT.to_dict(),
            "token_ids": token_ids,
            # how the reference turns answer tokens into text (transformers' decode of this tokenizer)
            "text": {"skip_special_tokens": True, "clean_up_tokenization_spaces": vocab.clean_up_spaces},
            "models": {t: {"file": files[t].name, "bytes": files[t].stat().st_size, "quality": None} for t in types},
            "default_model": types[0],
            "lora": {
                "mode": mode,
                "merging_alpha": float(merging_alpha),
                "adapter_file": adapter.name if adapter else None,
                "alpha": naturelm.lora_alpha if naturelm.lora_keys else None,
                "rank": naturelm.lora_rank if naturelm.lora_keys else None,
            },
        }
        others = [t for t in types if t != "F16"]
        if quality and others:
            from quantize.quality import build_probe, compare

            probe = build_probe(f16, llm, adapter, clips=quality_clips, n_threads=threads or None, progress=progress)
            for t in others:
                report = compare(probe, files[t], llm, adapter, n_threads=threads or None, progress=progress)
                llm["models"][t]["quality"] = report
                logger.info("%s vs F16: KL mean %.3g max %.3g, top-1 agreement %.3f over %d positions; |dP(Yes)| "
                            "max %.3g, yes/no decisions %.0f%%, label top-1 %.0f%%, answers %.0f%% of tokens", t,
                            report["kl_mean"], report["kl_max"], report["top1_agreement"], report["positions"],
                            report["yes_no_abs_dp_max"], 100 * report["yes_no_decision_agreement"],
                            100 * report["label_top1_agreement"], 100 * report["answer_token_agreement"])

        tools = _tool_versions()
        llama_hash = src.sha256()
        naturelm_hash = naturelm.sha256()
        llm["source"] = {"llama_sha256": llama_hash["sha256"], "naturelm_sha256": naturelm_hash}
        llm["tools"] = tools
        bundle_files = [files[t].name for t in types] + ([adapter.name] if adapter else [])
        update_manifest(out_dir, "llm", llm, files=bundle_files, tools=tools,
                        source={"llama": llama_hash, "naturelm": {"sha256": naturelm_hash}})
        return llm
    finally:
        shutil.rmtree(work, ignore_errors=True)
