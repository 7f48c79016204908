"""Expert combine for GPU prefill: each token sums its k expert outputs, weighted by the router.

The grouped expert GEMMs produce y [T*k, H] with rows sorted by expert; `inv` maps each (token, slot)
pair t*k + j to its row in y (the inverse of the sort permutation). Then

    out[t] = sum_j w[t, j] * y[inv[t*k + j]]

The Triton kernel reads each needed row of y once (a gather, no scatter into a [T*k, H] temporary),
accumulates in float32 and writes the combined row straight into `out` (the float32 expert output
of the engine): one pass instead of index_put + bmm + a bf16 -> float32 copy. The weights are
rounded to y's dtype first and the sum to y's dtype last, as the torch reference (index_select + bmm,
used on the CPU and where Triton is missing) does, so both agree to the order of the float32 sum.
"""

from __future__ import annotations

import functools

import torch

BLOCK_H = 256  # hidden columns per Triton program


@functools.cache
def _triton_combine():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def combine_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, hidden, y_stride, out_stride, K: tl.constexpr,
                       BLOCK_H: tl.constexpr):
        t = tl.program_id(0)  # one token; program_id(1) picks its block of hidden columns
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = cols < hidden
        acc = tl.full([BLOCK_H], 0.0, tl.float32)  # (tl.full, not tl.zeros: a builtin, so it also interprets)
        for j in tl.static_range(K):
            row = tl.load(inv_ptr + t * K + j).to(tl.int64)
            w = tl.load(w_ptr + t * K + j).to(y_ptr.dtype.element_ty).to(tl.float32)
            acc += w * tl.load(y_ptr + row * y_stride + cols, mask=mask, other=0.0).to(tl.float32)
        acc = acc.to(y_ptr.dtype.element_ty)  # the reference's bmm result is in y's dtype
        tl.store(out_ptr + t.to(tl.int64) * out_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    def run(y: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        t, k = weights.shape
        hidden = y.shape[1]
        combine_kernel[(t, triton.cdiv(hidden, BLOCK_H))](y, inv.contiguous(), weights.contiguous(), out, hidden,
                                                          y.stride(0), out.stride(0), K=k, BLOCK_H=BLOCK_H)
        return out

    return run


def moe_combine_torch(y: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Reference: gather the rows back to token order, then one [1, k] @ [k, H] per token."""
    t, k = weights.shape
    gathered = y.index_select(0, inv).view(t, k, y.shape[-1])
    out.copy_(torch.bmm(weights.unsqueeze(1).to(y.dtype), gathered).squeeze(1))
    return out


def moe_combine(y: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None,
                use_triton: bool | None = None) -> torch.Tensor:
    """y [T*k, H] (rows in any order), inv [T*k] (row of y for token t's j-th expert at t*k + j), weights [T, k]
    -> out [T, H] (y's dtype unless `out` is given; `out` must have unit column stride)."""
    if out is None:
        out = torch.empty(weights.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
    kernel = _triton_combine() if (y.is_cuda if use_triton is None else use_triton) else None
    if kernel is None or y.stride(1) != 1 or out.stride(1) != 1:
        return moe_combine_torch(y, inv, weights, out)
    return kernel(y, inv, weights, out)
