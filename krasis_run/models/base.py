"""Pieces every architecture shares: config parsing helpers, RMSNorm, rotary embedding, attention."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

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


def norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Per-head RMSNorm then rotary embedding (Qwen3's q_norm / k_norm), x [T, heads, head_dim]."""
    return apply_rope(rms_norm(x, weight, eps), cos, sin)


def route(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE router: softmax over the experts, the top k -> (ids [T, k], weights [T, k]), optionally renormalized."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights
