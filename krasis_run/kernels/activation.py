"""SwiGLU activation of the expert (and dense MLP) gate/up GEMM output: silu(gate) * up in one pass.

h [R, 2I] holds each row's I gate columns then its I up columns (the engines' gate_up layout after
de-interleaving). In torch that is three kernels over the [R, 2I] tensor (the two halves, silu, the
product); the Triton kernel reads h once and writes [R, I], computing in float32. The torch reference
is used on the CPU and where Triton is missing.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

BLOCK = 1024  # output columns per program


@functools.cache
def _triton_silu_mul():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def silu_mul_kernel(h_ptr, out_ptr, inter, h_stride, out_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(h_ptr + row * h_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * h_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
        act = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + row * out_stride + cols, act.to(out_ptr.dtype.element_ty), mask=mask)

    def run(h: torch.Tensor) -> torch.Tensor:
        rows, two_i = h.shape
        inter = two_i // 2
        out = torch.empty(rows, inter, dtype=h.dtype, device=h.device)
        if rows:
            h = h if h.stride(-1) == 1 else h.contiguous()
            silu_mul_kernel[(rows, triton.cdiv(inter, BLOCK))](h, out, inter, h.stride(0), out.stride(0), BLOCK=BLOCK)
        return out

    return run


def silu_mul_torch(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(h: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """h [R, 2I] (gate columns, then up) -> silu(gate) * up [R, I] in h's dtype."""
    kernel = _triton_silu_mul() if (h.is_cuda if use_triton is None else use_triton) else None
    return kernel(h) if kernel is not None else silu_mul_torch(h)
