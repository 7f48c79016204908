"""Fused per-head RMSNorm + rotary embedding for GPU prefill (Triton). Its torch reference is
krasis_run.models.base.norm_rope, which the engine falls back to and the tests compare with.

At 32K prompt tokens the unfused torch version runs ~10 elementwise passes over a 512 MB float32
query tensor per layer; this kernel reads it once and writes bf16 once.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, heads, eps, HALF: tl.constexpr):
        row = tl.program_id(0)  # one (token, head) row of head_dim = 2 * HALF
        token = row // heads
        offs = tl.arange(0, HALF)
        x1 = tl.load(x_ptr + row * 2 * HALF + offs).to(tl.float32)
        x2 = tl.load(x_ptr + row * 2 * HALF + HALF + offs).to(tl.float32)
        inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * HALF) + eps)
        y1 = x1 * inv * tl.load(w_ptr + offs).to(tl.float32)
        y2 = x2 * inv * tl.load(w_ptr + HALF + offs).to(tl.float32)
        c1 = tl.load(cos_ptr + token * 2 * HALF + offs)
        c2 = tl.load(cos_ptr + token * 2 * HALF + HALF + offs)
        s1 = tl.load(sin_ptr + token * 2 * HALF + offs)
        s2 = tl.load(sin_ptr + token * 2 * HALF + HALF + offs)
        tl.store(out_ptr + row * 2 * HALF + offs, (y1 * c1 - y2 * s1).to(tl.bfloat16))
        tl.store(out_ptr + row * 2 * HALF + HALF + offs, (y2 * c2 + y1 * s2).to(tl.bfloat16))

    def run(x, weight, eps, cos, sin):
        t, heads, dim = x.shape
        out = torch.empty(t, heads, dim, dtype=torch.bfloat16, device=x.device)
        norm_rope_kernel[(t * heads,)](x.contiguous(), weight.contiguous(), cos.float().contiguous(),
                                       sin.float().contiguous(), out, heads, eps, HALF=dim // 2)
        return out

    return run


def fused_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                    sin: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor | None:
    """bf16 [T, heads, head_dim] from a CUDA x; None where the kernel can't run (no Triton, odd head_dim, CPU).
    use_triton=True runs it on any tensors (CPU ones under TRITON_INTERPRET=1, as the tests do)."""
    dim = x.shape[-1]
    kernel = _kernel() if (x.is_cuda if use_triton is None else use_triton) and dim & (dim - 1) == 0 else None
    return None if kernel is None else kernel(x, weight, eps, cos, sin)
