"""How much a quantization changes the model's next-token distribution, measured against the F16 GGUF.

The probe: a fixed set of NatureLM questions asked about a few seeded random "audio" windows (Gaussian rows at the
scale of the token embeddings, since the real encoder is not part of this step), through the device's own engine.
At each probe the reference (F16) answers greedily; the candidate is then teacher-forced along the reference's answer,
so both are compared at the same positions: the first answer token and each one after. Per position: the KL divergence
KL(P_f16 || P_quant) (nats) and whether the top-1 tokens agree. Everything is seeded: the same bundle inputs give the
same report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.cpu import cpu_info

logger = logging.getLogger(__name__)

#: Questions from NatureLM's model card and BEANS-Zero tasks (MODEL.md).
PROBE_QUESTIONS = (
    "What is the common name for the focal species in the audio? Answer:",
    "Caption the audio.",
    "What are the common names for the species in the audio, if any?",
    "Is there a American Crow in the audio? Answer Yes or No.",
    "What is the life stage of the focal species in the audio?",
    "What is the call type of the focal species in the audio?",
    "What is the family of the focal species in the audio?",
    "How many individuals are vocalizing?",
)


@dataclass
class Probe:
    audio: list[np.ndarray]
    questions: tuple[str, ...]
    continuations: list[list[int]]  # per (clip, question): the reference's greedy answer tokens
    logits: list[np.ndarray]  # per (clip, question): [len(continuation) + 1, n_vocab] reference logits
    audio_std: float
    seed: int


def _embedding_rms(gguf_path: Path, rows: int = 4096, seed: int = 0) -> float:
    """RMS of a sample of token-embedding rows of an F16/F32 GGUF (memory-mapped; only the sampled rows are read)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            data = np.asarray(t.data)
            if data.dtype not in (np.float16, np.float32):
                break
            idx = np.random.default_rng(seed).choice(data.shape[0], size=min(rows, data.shape[0]), replace=False)
            sample = data[np.sort(idx)].astype(np.float64)
            return float(np.sqrt(np.mean(sample ** 2)))
    raise ValueError(f"{gguf_path}: no float token_embd.weight to take the embedding scale from")


def _open(path: Path, llm: Mapping, adapter: Path | None, n_threads: int | None):
    from edge.llm import EngineOptions, LlmEngine

    return LlmEngine(path, llm, adapter_path=adapter, model_type=Path(path).name,
                     options=EngineOptions(n_threads=n_threads or None))


def build_probe(reference: Path, llm: Mapping, adapter: Path | None = None, clips: int = 2, audio_rows: int = 29,
                continuation: int = 8, questions: Sequence[str] = PROBE_QUESTIONS, seed: int = 0,
                n_threads: int | None = None, progress: bool = False) -> Probe:
    from tqdm import tqdm

    from edge.llm import Prompt

    std = _embedding_rms(reference, seed=seed)
    rng = np.random.default_rng(seed)
    audio = [(rng.standard_normal((audio_rows, int(llm["n_embd"]))) * std).astype(np.float32) for _ in range(clips)]
    conts, logits = [], []
    bar = tqdm(total=clips * len(questions), desc=f"quality probe ({Path(reference).name})", disable=not progress,
               leave=False)
    with _open(reference, llm, adapter, n_threads) as engine, bar:
        for clip in audio:
            engine.set_audio(clip)
            for q in questions:
                ans = engine.ask(Prompt(id="probe", kind="open", question=q, max_new_tokens=continuation))
                conts.append(list(ans.token_ids))
                logits.append(engine.answer_logits(q, ans.token_ids))
                bar.update(1)
    return Probe(audio, tuple(questions), conts, logits, std, seed)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def compare(probe: Probe, candidate: Path, llm: Mapping, adapter: Path | None = None,
            n_threads: int | None = None, reference_name: str = "F16", progress: bool = False) -> dict:
    """KL divergence and top-1 agreement of `candidate` against the probe's reference, position by position."""
    from tqdm import tqdm

    kls, agree = [], []
    bar = tqdm(total=len(probe.logits), desc=f"quality ({Path(candidate).name})", disable=not progress, leave=False)
    with _open(candidate, llm, adapter, n_threads) as engine, bar:
        i = 0
        for clip in probe.audio:
            engine.set_audio(clip)
            for q in probe.questions:
                ref = probe.logits[i]
                got = engine.answer_logits(q, probe.continuations[i])
                lp, lq = _log_softmax(ref), _log_softmax(got)
                kls.extend(np.sum(np.exp(lp) * (lp - lq), axis=-1).tolist())
                agree.extend((ref.argmax(axis=-1) == got.argmax(axis=-1)).tolist())
                i += 1
                bar.update(1)
    kl = np.maximum(np.asarray(kls), 0.0)  # rounding can leave -1e-12
    return {
        "reference": reference_name,
        "positions": int(kl.size),
        "prompts": len(probe.logits),
        "kl_mean": float(kl.mean()),
        "kl_p95": float(np.percentile(kl, 95)),
        "kl_max": float(kl.max()),
        "top1_agreement": float(np.mean(agree)),
        # llama.cpp's quantized dot products take CPU-specific paths too: say which this figure came from.
        "cpu": cpu_info(),
        "probe": {
            "clips": len(probe.audio),
            "audio_rows": int(probe.audio[0].shape[0]),
            "audio_std": probe.audio_std,
            "questions": len(probe.questions),
            "continuation_tokens": max((len(c) for c in probe.continuations), default=0),
            "seed": probe.seed,
        },
    }

