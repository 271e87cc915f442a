"""The window-level Q-Former of NatureLM-audio: a 2-layer BERT whose only input is the learned query token.

Names follow the reference's Qformer.py (BLIP-2's BertModel) under `audio_Qformer.bert.`: the word and position
embeddings, the text feed-forward (`intermediate`, `output`) and the LM head are removed in NatureLM, so only the
query path is built. Every layer has cross-attention (cross_attention_freq = 1) to the 17 BEATs tokens of a window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from export.naturelm_config import QFormerConfig


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(context)), self._heads(self.value(context))
        # The attention masks of the reference are all ones here (no padding inside a window): adding 0 is omitted.
        scores = torch.matmul(q, k.transpose(-1, -2)) / (self.head_dim**0.5)
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        b, h, t, d = out.shape
        return out.transpose(1, 2).reshape(b, t, h * d)


class BertSublayerOutput(nn.Module):
    """dense -> (dropout) -> LayerNorm(residual + x): BertSelfOutput and BertOutput share this shape."""

    def __init__(self, in_width: int, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)  # the reference's attribute is literally `self`
        self.output = BertSublayerOutput(cfg.hidden_size, cfg)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, context), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # BERT's "gelu" is the exact erf form


class BertLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, audio_width: int):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size)
        self.crossattention = BertAttention(cfg, audio_width)
        self.intermediate_query = BertIntermediate(cfg)
        self.output_query = BertSublayerOutput(cfg.intermediate_size, cfg)

    def forward(self, query: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        x = self.attention(query, query)
        x = self.crossattention(x, audio)
        return self.output_query(self.intermediate_query(x), x)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class BertEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig, audio_width: int):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg, audio_width) for _ in range(cfg.num_hidden_layers)])


class BertModel(nn.Module):
    def __init__(self, cfg: QFormerConfig, audio_width: int):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg, audio_width)

    def forward(self, query_embeds: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        x = self.embeddings.LayerNorm(query_embeds)  # no word/position embeddings: queries only
        for layer in self.encoder.layer:
            x = layer(x, audio)
        return x


class QFormer(nn.Module):
    """Container so that parameter names read `audio_Qformer.bert.*` as in the release."""

    def __init__(self, cfg: QFormerConfig, audio_width: int):
        super().__init__()
        self.bert = BertModel(cfg, audio_width)
