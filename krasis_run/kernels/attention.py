"""Causal GQA attention over a KV cache: the float32 CPU reference used by prefill and decode."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """q [T, H, D] at positions start_pos.., k/v [S, KVH, D] for positions 0..S-1 -> [T, H*D] (float32)."""
    t, n_heads, head_dim = q.shape
    s, n_kv = k.shape[0], k.shape[1]
    qh = q.transpose(0, 1).unsqueeze(0).float()
    kh = k.transpose(0, 1).unsqueeze(0).float()
    vh = v.transpose(0, 1).unsqueeze(0).float()
    if n_kv != n_heads:  # GQA: every KV head serves n_heads // n_kv query heads
        kh = kh.repeat_interleave(n_heads // n_kv, dim=1)
        vh = vh.repeat_interleave(n_heads // n_kv, dim=1)
    if t == 1:
        out = F.scaled_dot_product_attention(qh, kh, vh)
    elif start_pos == 0 and s == t:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    else:
        rows = torch.arange(start_pos, start_pos + t)[:, None]
        mask = torch.arange(s)[None, :] <= rows
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return out.squeeze(0).transpose(0, 1).reshape(t, n_heads * head_dim)
