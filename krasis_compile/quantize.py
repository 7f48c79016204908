"""Choosing quantized values: per-group scale search for q4, per-row absmax search for q8.

Scales are rounded to bf16 *before* the integers are chosen, so the stored scale is the one the
integers were fitted to. The search tries shrinking the clipping range and keeps, per group, the
candidate with the least squared error (docs/BENCHMARKS.md has the error it saves against plain
min/max rounding).
"""

from __future__ import annotations

import torch

from krasis_run.format import Q4_GROUP, Q4_OFFSET, Q8_MAX

Q4_CLIP_RATIOS = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79)
Q8_CLIP_RATIOS = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _q4_candidate(groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    scale = _bf16(((hi - lo) / 15).clamp_min(1e-10))
    zero = _bf16(lo + Q4_OFFSET * scale)
    q = torch.clamp(torch.round((groups - zero.unsqueeze(-1)) / scale.unsqueeze(-1)) + Q4_OFFSET, 0, 15)
    err = ((q - Q4_OFFSET) * scale.unsqueeze(-1) + zero.unsqueeze(-1) - groups).square().sum(-1)
    return q, scale, zero, err


def quantize_q4(w: torch.Tensor, search: bool = True) -> dict[str, torch.Tensor]:
    """w [..., N, K] -> q uint8 [..., N, K], scale/zero bf16 [..., N, K/32] (asymmetric, groups of 32)."""
    *lead, n, k = w.shape
    groups = w.float().reshape(*lead, n, k // Q4_GROUP, Q4_GROUP)
    wmin, wmax = groups.amin(-1), groups.amax(-1)
    best_q, best_scale, best_zero, best_err = _q4_candidate(groups, wmin, wmax)
    for ratio in Q4_CLIP_RATIOS[1:] if search else ():
        q, scale, zero, err = _q4_candidate(groups, wmin * ratio, wmax * ratio)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_q = torch.where(better.unsqueeze(-1), q, best_q)
    return {
        "q": best_q.to(torch.uint8).reshape(*lead, n, k),
        "scale": best_scale.to(torch.bfloat16),
        "zero": best_zero.to(torch.bfloat16),
        "sq_err": best_err.sum(),
    }


def quantize_q8(w: torch.Tensor, search: bool = True) -> dict[str, torch.Tensor]:
    """w [..., N, K] -> q int8 [..., N, K], scale bf16 [..., N] (symmetric, per row)."""
    w = w.float()
    absmax = w.abs().amax(-1)
    best_q = best_scale = best_err = None
    for ratio in Q8_CLIP_RATIOS if search else Q8_CLIP_RATIOS[:1]:
        scale = _bf16((absmax * ratio / Q8_MAX).clamp_min(1e-10))
        q = torch.clamp(torch.round(w / scale.unsqueeze(-1)), -Q8_MAX, Q8_MAX)
        err = (q * scale.unsqueeze(-1) - w).square().sum(-1)
        if best_err is None:
            best_q, best_scale, best_err = q, scale, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_q = torch.where(better.unsqueeze(-1), q, best_q)
    return {"q": best_q.to(torch.int8), "scale": best_scale.to(torch.bfloat16), "sq_err": best_err.sum()}


def quantize(codec: str, w: torch.Tensor, search: bool = True) -> dict[str, torch.Tensor]:
    if codec == "q4":
        return quantize_q4(w, search)
    if codec == "q8":
        return quantize_q8(w, search)
    stored = w.to(torch.bfloat16)
    return {"w": stored, "sq_err": (stored.float() - w.float()).square().sum()}
