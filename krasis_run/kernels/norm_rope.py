"""Fused per-head RMSNorm + rotary embedding for GPU prefill (Triton). Its torch reference is
krasis_run.models.base.norm_rope, which the engine falls back to and the tests compare with.

At 32K prompt tokens the unfused torch version runs ~10 elementwise passes over a 512 MB float32
query tensor per layer; this kernel reads it once and writes bf16 once.
"""

from __future__ import annotations

import functools

import torch

ROWS = 16  # (token, head) rows per program


@functools.cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, heads, x_token, eps, HALF: tl.constexpr,
                         ROWS: tl.constexpr):
        # ROWS (token, head) rows of head_dim = 2 * HALF per program: one row per program left most of the
        # program's threads idle and ran at ~1/3 of memory bandwidth on the H200 at 32K tokens
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask = (rows < n_rows)[:, None]
        token = (rows // heads).to(tl.int64)[:, None]
        base = rows.to(tl.int64)[:, None] * 2 * HALF
        xbase = token * x_token + (rows % heads).to(tl.int64)[:, None] * 2 * HALF  # x may be a slice of q|k|v
        offs = tl.arange(0, HALF)[None, :]
        x1 = tl.load(x_ptr + xbase + offs, mask=rmask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + xbase + HALF + offs, mask=rmask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        y1 = x1 * inv * tl.load(w_ptr + offs).to(tl.float32)
        y2 = x2 * inv * tl.load(w_ptr + HALF + offs).to(tl.float32)
        c1 = tl.load(cos_ptr + token * 2 * HALF + offs, mask=rmask, other=0.0)
        c2 = tl.load(cos_ptr + token * 2 * HALF + HALF + offs, mask=rmask, other=0.0)
        s1 = tl.load(sin_ptr + token * 2 * HALF + offs, mask=rmask, other=0.0)
        s2 = tl.load(sin_ptr + token * 2 * HALF + HALF + offs, mask=rmask, other=0.0)
        tl.store(out_ptr + base + offs, (y1 * c1 - y2 * s1).to(tl.bfloat16), mask=rmask)
        tl.store(out_ptr + base + HALF + offs, (y2 * c2 + y1 * s2).to(tl.bfloat16), mask=rmask)

    def run(x, weight, eps, cos, sin):
        t, heads, dim = x.shape
        out = torch.empty(t, heads, dim, dtype=torch.bfloat16, device=x.device)
        n_rows = t * heads
        if x.stride(2) != 1 or x.stride(1) != dim:  # rows of heads must be dense; tokens may be strided
            x = x.contiguous()
        norm_rope_kernel[(triton.cdiv(n_rows, ROWS),)](x, weight.contiguous(), cos.float().contiguous(),
                                                       sin.float().contiguous(), out, n_rows, heads, x.stride(0),
                                                       eps, HALF=dim // 2, ROWS=ROWS)
        return out

    return run


def fused_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                    sin: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor | None:
    """bf16 [T, heads, head_dim] from a CUDA x; None where the kernel can't run (no Triton, odd head_dim, CPU).
    use_triton=True runs it on any tensors (CPU ones under TRITON_INTERPRET=1, as the tests do)."""
    dim = x.shape[-1]
    kernel = _kernel() if (x.is_cuda if use_triton is None else use_triton) and dim & (dim - 1) == 0 else None
    return None if kernel is None else kernel(x, weight, eps, cos, sin)
