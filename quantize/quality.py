"""How much a quantization changes the model's next-token distribution, measured against the F16 GGUF.

The probe: a fixed set of NatureLM questions asked about a few seeded random "audio" windows (Gaussian rows at the
scale of the token embeddings, since the real encoder is not part of this step), through the device's own engine.
At each probe the reference (F16) answers greedily; the candidate is then teacher-forced along the reference's answer,
so both are compared at the same positions: the first answer token and each one after. Per position: the KL divergence
KL(P_f16 || P_quant) (nats) and whether the top-1 tokens agree. Everything is seeded: the same bundle inputs give the
same report.

Next to them, what a user sees (the figures tests/test_shipped_parity.py bounds end to end against the PyTorch
reference): for the yes/no questions, how often the decision (P(Yes) >= 0.5) agrees and |P(Yes) - P(Yes)_f16|; for a
label question over a fixed label set, how often the top-1 label agrees; for every question, the candidate's own
answer (decoded as the device decodes it: 2 beams, as upstream) against the reference's: the share of the reference's tokens reproduced before the first difference,
and how many answers are identical.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
#: Yes/no questions of the probe (P(Yes) compared) and the label question with its labels (top-1 compared).
PROBE_YES_NO = ("Is there a American Crow in the audio? Answer Yes or No.",
                "Is there a Gray Wolf in the audio? Answer Yes or No.")
PROBE_LABEL_QUESTION = PROBE_QUESTIONS[0]
PROBE_LABELS = ("American Crow", "Common Raven", "Blue Jay", "Song Sparrow", "Barn Owl", "Gray Wolf")


@dataclass
class Probe:
    audio: list[np.ndarray]
    questions: tuple[str, ...]
    continuations: list[list[int]]  # per (clip, question): the reference's answer tokens (the device's 2 beams)
    logits: list[np.ndarray]  # per (clip, question): [len(continuation) + 1, n_vocab] reference logits
    audio_std: float
    seed: int
    p_yes: list[float] = field(default_factory=list)  # per (clip, PROBE_YES_NO question): the reference's P(Yes)
    label_top1: list[str] = field(default_factory=list)  # per clip: the reference's top label of PROBE_LABELS


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
    conts, logits, p_yes, top1 = [], [], [], []
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
            p_yes.extend(engine.ask(Prompt(id="probe", kind="yes_no", question=q)).score for q in PROBE_YES_NO)
            top1.append(engine.ask(Prompt(id="probe", kind="label", question=PROBE_LABEL_QUESTION,
                                          labels=PROBE_LABELS)).text)
    return Probe(audio, tuple(questions), conts, logits, std, seed, p_yes, top1)


def _prefix_share(got, want) -> float:
    """Share of the reference's answer tokens the candidate reproduces before the first difference."""
    if not want:
        return 1.0 if not got else 0.0
    n = 0
    for a, b in zip(got, want):
        if a != b:
            break
        n += 1
    return n / len(want)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def compare(probe: Probe, candidate: Path, llm: Mapping, adapter: Path | None = None,
            n_threads: int | None = None, reference_name: str = "F16", progress: bool = False) -> dict:
    """KL divergence and top-1 agreement of `candidate` against the probe's reference, position by position."""
    from tqdm import tqdm

    from edge.llm import Prompt

    kls, agree, shares, same, p_yes, top1 = [], [], [], [], [], []
    continuation = max((len(c) for c in probe.continuations), default=0)
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
                # Its own answer, decoded as the device decodes it (2 beams), against the reference's.
                own = engine.ask(Prompt(id="probe", kind="open", question=q, max_new_tokens=max(continuation, 1)))
                shares.append(_prefix_share(list(own.token_ids), probe.continuations[i]))
                same.append(list(own.token_ids) == list(probe.continuations[i]))
                i += 1
                bar.update(1)
            if probe.p_yes:
                p_yes.extend(engine.ask(Prompt(id="probe", kind="yes_no", question=q)).score for q in PROBE_YES_NO)
                top1.append(engine.ask(Prompt(id="probe", kind="label", question=PROBE_LABEL_QUESTION,
                                              labels=PROBE_LABELS)).text)
    kl = np.maximum(np.asarray(kls), 0.0)  # rounding can leave -1e-12
    user = {}
    if probe.p_yes:
        ref_p, got_p = np.asarray(probe.p_yes), np.asarray(p_yes)
        dp = np.abs(got_p - ref_p)
        user = {
            "yes_no_prompts": int(dp.size),
            "yes_no_decision_agreement": float(np.mean((got_p >= 0.5) == (ref_p >= 0.5))),
            "yes_no_abs_dp_mean": float(dp.mean()),
            "yes_no_abs_dp_max": float(dp.max()),
            "label_prompts": len(top1),
            "label_top1_agreement": float(np.mean([a == b for a, b in zip(top1, probe.label_top1)])),
        }
    return {
        "reference": reference_name,
        "positions": int(kl.size),
        "prompts": len(probe.logits),
        "kl_mean": float(kl.mean()),
        "kl_p95": float(np.percentile(kl, 95)),
        "kl_max": float(kl.max()),
        "top1_agreement": float(np.mean(agree)),
        **user,
        "answer_token_agreement": float(np.mean(shares)),
        "answers_identical": float(np.mean(same)),
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

