"""Pieces every architecture shares: config parsing helpers, RMSNorm, rotary embedding, attention."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from ..format import KrsError


class ConfigError(KrsError):
    """The model config lacks a field or has a value this version does not support."""


def from_hf_fields(cls, config: dict[str, Any], aliases: dict[str, str] | None = None):
    """Build a config dataclass from an HF config dict: HF field names verbatim, unknown keys ignored."""
    values = dict(config)
    for alias, name in (aliases or {}).items():
        if name not in values and alias in values:
            values[name] = values[alias]
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name in values and values[field.name] is not None:
            kwargs[field.name] = values[field.name]
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"model config is missing required field {field.name!r}")
    return cls(**kwargs)


def rope_theta_and_type(config: dict[str, Any]) -> tuple[float, str]:
    """Read rotary settings from either `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ConfigError("model config has no rope_theta (nor rope_parameters.rope_theta)")
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), rope_type


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; rotate-half (NeoX) convention as in the HF Qwen/Llama code."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


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
