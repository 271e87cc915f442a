"""The export's BEATs attention against a line-by-line transcription of the reference's arithmetic.

The export writes attention as plain scaled dot-product + gated bias; the reference (backbone.py MultiheadAttention)
works in (T, B, C) layout, scales q by 1/32, subtracts the row max, multiplies by 32 and computes buckets with log(0)
masked by `where`. This checks that the plain form is the same function on the tiny weights.
"""

from __future__ import annotations

import math

import torch

from export.beats import BeatsSelfAttention, relative_position_buckets
from export.naturelm_config import BeatsConfig


def _reference_buckets(length, num_buckets, max_distance):
    context = torch.arange(length, dtype=torch.long)[:, None]
    memory = torch.arange(length, dtype=torch.long)[None, :]
    rel = memory - context
    num_buckets //= 2
    buckets = (rel > 0).to(torch.long) * num_buckets
    rel = torch.abs(rel)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    large = max_exact + (
        torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, rel, large)


def _reference_attention(m: BeatsSelfAttention, x_tbc: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
    tgt_len, bsz, embed_dim = x_tbc.shape
    h, hd = m.num_heads, m.head_dim
    q = m.q_proj(x_tbc)
    k = m.k_proj(x_tbc)
    v = m.v_proj(x_tbc)
    q = q * m.scaling
    alpha = 32
    q = q * (1 / alpha)
    q = q.contiguous().view(tgt_len, bsz * h, hd).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * h, hd).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * h, hd).transpose(0, 1)
    w = torch.bmm(q, k.transpose(1, 2))
    w = (w - w.max(dim=-1, keepdim=True)[0]) * alpha
    query_layer = q.view(bsz, h, tgt_len, hd) * alpha / m.scaling
    gate_a, gate_b = torch.sigmoid(
        m.grep_linear(query_layer).view(bsz, h, tgt_len, 2, 4).sum(-1, keepdim=False)
    ).chunk(2, dim=-1)
    gate_a_1 = gate_a * (gate_b * m.grep_a - 1.0) + 2.0
    pb = position_bias.unsqueeze(0).repeat(bsz, 1, 1, 1).view(bsz * h, tgt_len, tgt_len)
    w = w + (gate_a_1.view(bsz * h, tgt_len, 1) * pb).view(w.size())
    p = torch.softmax(w, dim=-1)
    attn = torch.bmm(p, v).transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
    return m.out_proj(attn)


def test_buckets_match_reference():
    for n in (1, 5, 100, 496):
        assert torch.equal(relative_position_buckets(n, 320, 800), _reference_buckets(n, 320, 800))


def test_attention_matches_reference_arithmetic():
    torch.manual_seed(0)
    cfg = BeatsConfig(encoder_embed_dim=64, encoder_attention_heads=4)
    m = BeatsSelfAttention(cfg, has_bias_table=True).eval()
    with torch.no_grad():
        m.grep_a.copy_(1 + 0.3 * torch.randn_like(m.grep_a))
        x = torch.randn(2, 40, 64)
        bias = m.relative_attention_bias(relative_position_buckets(40, 320, 800)).permute(2, 0, 1) * 3
        ours = m(x, bias)
        ref = _reference_attention(m, x.transpose(0, 1), bias).transpose(0, 1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
