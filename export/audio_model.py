"""The audio side of NatureLM-audio: BEATs -> ln_audio -> window-level Q-Former -> projection to the LLM width.

`NatureLMAudio.forward` takes the *normalised* fbank (the fbank itself stays outside: complex FFT does not export to
ONNX well, and the device computes it in numpy) and returns one embedding per 17-token window.
"""

from __future__ import annotations

import torch
from torch import nn

from export.beats import Beats
from export.naturelm_config import NatureLMConfig
from export.qformer import QFormer


class NatureLMAudio(nn.Module):
    def __init__(self, cfg: NatureLMConfig, llm_width: int):
        super().__init__()
        self.cfg = cfg
        width = cfg.beats.encoder_embed_dim
        self.beats = Beats(cfg.beats)
        self.ln_audio = nn.LayerNorm(width)
        self.audio_Qformer = QFormer(cfg.qformer, audio_width=width)
        self.audio_query_tokens = nn.Parameter(torch.zeros(1, cfg.num_audio_query_token, cfg.qformer.hidden_size))
        self.audio_llama_proj = nn.Linear(cfg.qformer.hidden_size, llm_width)

    def windows(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B * L, kernel, C): the reference's F.unfold with kernel = stride over time, written as
        slicing; trailing tokens that do not fill a window are dropped, as unfold drops them."""
        b, t, c = tokens.shape
        k, s = self.cfg.window_kernel, self.cfg.window_stride
        n = (t - k) // s + 1
        if s == k:
            return tokens[:, : n * k].reshape(b * n, k, c)
        idx = torch.arange(n)[:, None] * s + torch.arange(k)[None, :]
        return tokens[:, idx].reshape(b * n, k, c)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        b = fbank.shape[0]
        audio = self.ln_audio(self.beats(fbank))
        windows = self.windows(audio)
        query = self.audio_query_tokens.expand(windows.shape[0], -1, -1)
        out = self.audio_Qformer.bert(query, windows)  # (B * L, 1, H)
        return self.audio_llama_proj(out).reshape(b, -1, self.audio_llama_proj.out_features)
