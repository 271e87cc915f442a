"""The end-to-end PyTorch reference of NatureLM-audio: the oracle every parity test compares against.

waveform -> reference_waveform (mono, 16 kHz, 10 s, clamp) -> Kaldi fbank -> BEATs -> ln_audio -> window Q-Former
-> projection -> spliced between the prompt's text pieces into LlamaForCausalLM (LoRA merged at `merging_alpha`)
-> logits / greedy tokens. Plain and close to the reference's semantics, in float32, not fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export.checkpoint import load_audio_model, open_checkpoint
from export.fbank import kaldi_fbank, normalize_fbank, reference_waveform
from export.reference_llm import ReferenceLLM


class ReferencePipeline:
    def __init__(self, naturelm_dir: Path, llama_dir: Path, merging_alpha: float = 1.0):
        self.checkpoint = open_checkpoint(naturelm_dir)
        self.audio = load_audio_model(self.checkpoint)
        cfg = self.checkpoint.config
        self.llm = ReferenceLLM(
            llama_dir,
            lora=self.checkpoint.lora() if cfg.lora else None,
            lora_alpha=cfg.lora_alpha,
            lora_rank=cfg.lora_rank,
            merging_alpha=merging_alpha,
            resized_rows=self.checkpoint.resized_rows() or None,
        )

    @torch.no_grad()
    def features(self, audio: np.ndarray, sample_rate: int) -> torch.Tensor:
        """Normalised fbank (1, frames, mel) of one clip."""
        wav = reference_waveform(audio, sample_rate)
        return normalize_fbank(kaldi_fbank(wav))

    @torch.no_grad()
    def audio_embeddings(self, audio: np.ndarray, sample_rate: int) -> torch.Tensor:
        """(n_audio, llm width) embeddings of one clip."""
        return self.audio(self.features(audio, sample_rate))[0]

    @torch.no_grad()
    def generate(self, audio: np.ndarray, sample_rate: int, question: str, max_new_tokens: int = 64) -> list[int]:
        return self.llm.generate(self.audio_embeddings(audio, sample_rate), question, max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def answer(self, audio: np.ndarray, sample_rate: int, question: str, max_new_tokens: int = 64) -> str:
        ids = self.generate(audio, sample_rate, question, max_new_tokens)
        return self.llm.decode([i for i in ids if i not in self.llm.stop_ids])

    @torch.no_grad()
    def yes_no_score(self, audio: np.ndarray, sample_rate: int, question: str) -> float:
        return self.llm.yes_no_score(self.audio_embeddings(audio, sample_rate), question)
