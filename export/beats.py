"""BEATs audio encoder (Chen et al. 2022) as NatureLM-audio uses it, written for export.

Parameter names follow BEATs.py / backbone.py so that the release's `beats.*` keys load as they are (except the
weight-normed positional convolution, which the checkpoint loader folds into a plain `weight`, see checkpoint.py).
Mathematically identical to the reference in float32; two reference details are expressed more plainly:
- the reference scales q by 1/32, subtracts the row max and multiplies by 32 again before softmax: a shift that softmax
  ignores, so this is plain scaled dot-product attention;
- the relative position bias is computed once (layer 0's embedding, shared by every layer in the reference) and each
  layer applies its own gate (gru_rel_pos) to it.
Only the inference path (no dropout, no layer drop, no padding mask: clips are always padded to 10 s) is kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from export.naturelm_config import BeatsConfig


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5-style bidirectional log buckets of (key - query), as BEATs' MultiheadAttention._relative_positions_bucket."""
    context = torch.arange(length, dtype=torch.long)[:, None]
    memory = torch.arange(length, dtype=torch.long)[None, :]
    rel = memory - context
    half = num_buckets // 2
    buckets = (rel > 0).to(torch.long) * half
    rel = rel.abs()
    max_exact = half // 2
    is_small = rel < max_exact
    # clamp to 1 before log: the value is unused where is_small, but log(0) would make -inf -> garbage long
    large = max_exact + (
        torch.log(rel.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).to(torch.long)
    large = torch.minimum(large, torch.full_like(large, half - 1))
    return buckets + torch.where(is_small, rel, large)


class BeatsSelfAttention(nn.Module):
    def __init__(self, cfg: BeatsConfig, has_bias_table: bool):
        super().__init__()
        d = cfg.encoder_embed_dim
        self.num_heads = cfg.encoder_attention_heads
        self.head_dim = d // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, self.num_heads)
        self.grep_linear = nn.Linear(self.head_dim, 8)
        self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D); position_bias: (H, T, T), ungated."""
        b, t, d = x.shape
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(x).view(b, t, h, hd).transpose(1, 2)  # (B, H, T, hd), unscaled
        k = self.k_proj(x).view(b, t, h, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, h, hd).transpose(1, 2)
        # gated relative position (gru_rel_pos): the gate reads the unscaled query of each head
        gates = torch.sigmoid(self.grep_linear(q).view(b, h, t, 2, 4).sum(-1))
        gate_a, gate_b = gates[..., 0:1], gates[..., 1:2]
        gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0  # (B, H, T, 1)
        scores = torch.matmul(q * self.scaling, k.transpose(-1, -2)) + gate * position_bias.unsqueeze(0)
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, d)
        return self.out_proj(out)


class BeatsLayer(nn.Module):
    """Post-norm transformer layer with DeepNorm residual scaling (alpha = (2N)^(1/4))."""

    def __init__(self, cfg: BeatsConfig, has_bias_table: bool):
        super().__init__()
        d = cfg.encoder_embed_dim
        self.self_attn = BeatsSelfAttention(cfg, has_bias_table)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.alpha = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, position_bias))
        y = self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as BEATs' get_activation_fn("gelu")
        return self.final_layer_norm(x * self.alpha + y)


class BeatsEncoder(nn.Module):
    def __init__(self, cfg: BeatsConfig):
        super().__init__()
        d = cfg.encoder_embed_dim
        self.cfg = cfg
        # pos_conv.0 is the (weight-norm folded) Conv1d; .1 SamePad and .2 GELU have no parameters.
        self.pos_conv = nn.Sequential(
            nn.Conv1d(d, d, kernel_size=cfg.conv_pos, padding=cfg.conv_pos // 2, groups=cfg.conv_pos_groups)
        )
        self.layer_norm = nn.LayerNorm(d)
        # The reference builds a bias table in every layer and then ties them all to layer 0's; only layer 0's is
        # a parameter here (the loader checks that any other copies in a file are identical).
        self.layers = nn.ModuleList([BeatsLayer(cfg, has_bias_table=(i == 0)) for i in range(cfg.encoder_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.pos_conv(x.transpose(1, 2))
        if self.cfg.conv_pos % 2 == 0:  # SamePad: an even kernel with padding k//2 yields one extra frame
            conv = conv[:, :, :-1]
        x = self.layer_norm(x + F.gelu(conv).transpose(1, 2))
        t = x.shape[1]
        buckets = relative_position_buckets(t, self.cfg.num_buckets, self.cfg.max_distance)
        position_bias = self.layers[0].self_attn.relative_attention_bias(buckets).permute(2, 0, 1)  # (H, T, T)
        for layer in self.layers:
            x = layer(x, position_bias)
        return x


class Beats(nn.Module):
    """fbank (B, frames, mel) normalised -> (B, tokens, encoder_embed_dim); tokens are time-major (t * 8 + f)."""

    def __init__(self, cfg: BeatsConfig):
        super().__init__()
        p = cfg.input_patch_size
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=p, stride=p, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        if cfg.embed_dim != cfg.encoder_embed_dim:
            self.post_extract_proj = nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
        else:
            self.post_extract_proj = None
        self.encoder = BeatsEncoder(cfg)
        # The AudioSet head of the fine-tuned checkpoint: loaded so that the file has no unexpected keys, never used.
        if cfg.finetuned_model:
            self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(fbank.unsqueeze(1))  # (B, E, T/16, F/16)
        x = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)  # (B, tokens, E), time-major
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return self.encoder(x)
