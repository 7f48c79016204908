"""Pieces every architecture shares: config parsing helpers, rotary frequencies and tables; the torch reference math
(RMSNorm, rotary, routing) lives in kernels/reference.py beside the fused kernels it checks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..format import KrsError
from ..kernels.reference import apply_rope, norm_rope, rms_norm, rope_cos_sin, route  # noqa: F401 (the models' names)


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


ROPE_TYPES = ("default", "linear", "yarn")


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Rotary settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older configs),
    merged into one dict with rope_type and rope_theta always present."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta"))
    if params["rope_theta"] is None:
        raise ConfigError("model config has no rope_theta (nor rope_parameters.rope_theta)")
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_type"] not in ROPE_TYPES:
        raise ConfigError(f"rope type {params['rope_type']!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    return params


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_frequencies(params: dict[str, Any], head_dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale, as transformers computes them for default, linear and YaRN."""
    base, dim = float(params["rope_theta"]), head_dim
    inv_freq = rope_inv_freq(dim, base)
    if params["rope_type"] == "linear":
        return inv_freq / params["factor"], 1.0
    if params["rope_type"] != "yarn":
        return inv_freq, 1.0
    original = params.get("original_max_position_embeddings") or max_positions
    factor = params.get("factor") or max_positions / original

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
                     else get_mscale(factor))

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001), 0, 1)
    extrapolation = 1 - ramp  # high-frequency dimensions keep their frequency, low ones are interpolated
    return inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation, float(attention)


class Rotary:
    """cos/sin of positions start_pos.. for one rotary width: rows of a table kept per device (grown by doubling) for
    an int start, so a decode step costs a slice instead of ~8 small ops; computed for a device-tensor start (a
    captured decode step then serves every position)."""

    def __init__(self, inv_freq: torch.Tensor, scale: float):
        self.inv_freq, self.scale = inv_freq, scale
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, start_pos, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(start_pos, torch.Tensor):
            return rope_cos_sin(self._inv_freq(device), torch.arange(count, device=device) + start_pos, self.scale)
        end = start_pos + count
        table = self._tables.get(device)
        if table is None or table[0].shape[0] < end:
            size = max(end, 2 * table[0].shape[0] if table is not None else 256)
            table = rope_cos_sin(self._inv_freq(device), torch.arange(size, device=device), self.scale)
            self._tables[device] = table
        return table[0][start_pos:end], table[1][start_pos:end]

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        if self.inv_freq.device != device:  # moved once: a copy from the host cannot be captured in a graph
            self.inv_freq = self.inv_freq.to(device)
        return self.inv_freq


