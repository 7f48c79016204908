"""Dequantize a layer's stacked experts to bf16 on the device that holds them.

`dequant_experts` takes the parts of either expert layout (GPU tiles "rows" [E, N, ...] or CPU blocks
viewed with a leading expert dim) and returns gate_up [E, 2I, H] (gate rows first) and down
[E, H, I] in bf16. On CUDA the q4 tiles and the q4 CPU blocks go through Triton kernels (the blocks'
one also undoes the gate/up interleave by where it writes each row); everywhere else (and as the
reference the tests compare them with) through torch.
"""

from __future__ import annotations

import functools

import torch

from ..codecs import HALF_BLOCK, q4_group
from ..format import CPU_BLOCK_ROWS, Q4_OFFSET

BLOCK = 1024  # packed bytes per Triton program


@functools.cache
def _triton_q4_rows():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def q4_rows_kernel(q_ptr, scale_ptr, zero_ptr, out_ptr, n_bytes, BLOCK: tl.constexpr, GROUP_BYTES: tl.constexpr):
        # byte j holds columns 2j (low nibble) and 2j+1; a group of 32 or 64 columns = GROUP_BYTES bytes shares a
        # scale/zero (rows hold whole groups, so the flat byte index over group bytes is the flat group index)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        byte = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
        group = offs // GROUP_BYTES
        scale = tl.load(scale_ptr + group, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + group, mask=mask, other=0.0).to(tl.float32)
        lo = ((byte & 15) - 8).to(tl.float32) * scale + zero
        hi = ((byte >> 4) - 8).to(tl.float32) * scale + zero
        tl.store(out_ptr + 2 * offs, lo.to(tl.bfloat16), mask=mask)
        tl.store(out_ptr + 2 * offs + 1, hi.to(tl.bfloat16), mask=mask)

    def run(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        out = torch.empty(*q.shape[:-1], q.shape[-1] * 2, dtype=torch.bfloat16, device=q.device)
        n = q.numel()
        group = q4_group(2 * q.shape[-1], scale.shape[-1])
        q4_rows_kernel[(triton.cdiv(n, BLOCK),)](q.contiguous(), scale.contiguous(), zero.contiguous(), out, n,
                                                 BLOCK=BLOCK, GROUP_BYTES=group // 2)
        return out

    return run


def q4_rows_torch(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Reference: packed [..., N, K/2] + scale/zero [..., N, K/group] -> bf16 [..., N, K]."""
    lo = (q & 0xF).to(torch.bfloat16) - Q4_OFFSET
    hi = (q >> 4).to(torch.bfloat16) - Q4_OFFSET
    vals = torch.stack([lo, hi], dim=-1).flatten(-2)  # [..., N, K], exact small integers in bf16
    *lead, n, k = vals.shape
    group = q4_group(k, scale.shape[-1])
    groups = vals.view(*lead, n, k // group, group).float()
    out = groups * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return out.view(*lead, n, k).to(torch.bfloat16)


def q4_rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    kernel = _triton_q4_rows() if (q.is_cuda if use_triton is None else use_triton) else None
    return kernel(q, scale, zero) if kernel is not None else q4_rows_torch(q, scale, zero)


EXPERT_SLICE = 16  # experts dequantized per step: float32 temporaries stay ~1/8 of a 128-expert layer


def _q4_blocks(q: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    """CPU blocks with an expert dim: q [E, N/64, K, 32], scale_zero [E, K/group, N, 2] -> bf16 [E, N, K]."""
    e, nb, k, _ = q.shape
    if e > EXPERT_SLICE:
        out = torch.empty(e, nb * CPU_BLOCK_ROWS, k, dtype=torch.bfloat16, device=q.device)
        for start in range(0, e, EXPERT_SLICE):
            out[start:start + EXPERT_SLICE] = _q4_blocks(q[start:start + EXPERT_SLICE],
                                                         scale_zero[start:start + EXPERT_SLICE])
        return out
    lo, hi = (q & 0xF).transpose(2, 3), (q >> 4).transpose(2, 3)  # [E, NB, 32, K]
    vals = torch.cat([lo, hi], dim=2).reshape(e, nb * CPU_BLOCK_ROWS, k).to(torch.bfloat16) - Q4_OFFSET
    sz = scale_zero.transpose(1, 2).float()  # [E, N, K/group, 2]
    group = q4_group(k, scale_zero.shape[1])
    groups = vals.view(e, -1, k // group, group).float()
    out = groups * sz[..., 0].unsqueeze(-1) + sz[..., 1].unsqueeze(-1)
    return out.view(e, -1, k).to(torch.bfloat16)


BLOCK_COLS = 64  # input columns per Triton program of the CPU-block kernel


@functools.cache
def _triton_q4_blocks():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def q4_blocks_kernel(q_ptr, sz_ptr, out_ptr, q_expert_stride, sz_expert_stride, n_blocks, rows, cols,
                         DEINTERLEAVE: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr):
        # q [E, NB, K, 32] bytes: byte b of column c in block nb holds row nb*64 + b (low nibble) and
        # nb*64 + 32 + b (high nibble); scale_zero [E, K/GROUP, N, 2] bf16 (scale, zero) per row and GROUP columns.
        # Experts lie q_expert_stride / sz_expert_stride elements apart (strided views of the layer's bytes).
        pid = tl.program_id(0)  # one (expert, 64-row block); program_id(1) picks BLOCK_COLS columns
        e = pid // n_blocks
        nb = pid % n_blocks
        c = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)[:, None]  # [BLOCK_COLS, 1]
        b = tl.arange(0, 32)[None, :]  # [1, 32]
        mask = (c < cols) & (b < 32)
        q_base = q_ptr + e.to(tl.int64) * q_expert_stride + nb.to(tl.int64) * cols * 32
        byte = tl.load(q_base + c * 32 + b, mask=mask, other=0).to(tl.int32)
        sz_base = sz_ptr + e.to(tl.int64) * sz_expert_stride + (c // GROUP) * rows * 2
        row_lo = nb * 64 + b
        row_hi = row_lo + 32
        s_lo = tl.load(sz_base + row_lo * 2, mask=mask, other=0.0).to(tl.float32)
        z_lo = tl.load(sz_base + row_lo * 2 + 1, mask=mask, other=0.0).to(tl.float32)
        s_hi = tl.load(sz_base + row_hi * 2, mask=mask, other=0.0).to(tl.float32)
        z_hi = tl.load(sz_base + row_hi * 2 + 1, mask=mask, other=0.0).to(tl.float32)
        lo = ((byte & 15) - 8).to(tl.float32) * s_lo + z_lo
        hi = ((byte >> 4) - 8).to(tl.float32) * s_hi + z_hi
        if DEINTERLEAVE:  # gate_up: each block is 32 gate rows (low nibbles) then 32 up rows (high nibbles)
            out_lo = nb * 32 + b
            out_hi = rows // 2 + nb * 32 + b
        else:
            out_lo = row_lo
            out_hi = row_hi
        out_base = out_ptr + e.to(tl.int64) * rows * cols
        tl.store(out_base + out_lo * cols + c, lo.to(tl.bfloat16), mask=mask)
        tl.store(out_base + out_hi * cols + c, hi.to(tl.bfloat16), mask=mask)

    def run(q: torch.Tensor, scale_zero: torch.Tensor, deinterleave: bool) -> torch.Tensor:
        e, nb, k, _ = q.shape
        if not (q[0].is_contiguous() and scale_zero[0].is_contiguous()):  # inner layout as written; else copy
            q, scale_zero = q.contiguous(), scale_zero.contiguous()
        rows = nb * CPU_BLOCK_ROWS
        out = torch.empty(e, rows, k, dtype=torch.bfloat16, device=q.device)
        q4_blocks_kernel[(e * nb, triton.cdiv(k, BLOCK_COLS))](q, scale_zero, out, q.stride(0), scale_zero.stride(0),
                                                                nb, rows, k, DEINTERLEAVE=deinterleave,
                                                                BLOCK_COLS=BLOCK_COLS,
                                                                GROUP=q4_group(k, scale_zero.shape[1]))
        return out

    return run


def q4_blocks(q: torch.Tensor, scale_zero: torch.Tensor, deinterleave: bool,
              use_triton: bool | None = None) -> torch.Tensor:
    """CPU blocks q [E, N/64, K, 32], scale_zero [E, K/group, N, 2] (strided per expert is fine) -> bf16 [E, N, K],
    with gate rows first when `deinterleave` (the gate_up matrix)."""
    kernel = _triton_q4_blocks() if (q.is_cuda if use_triton is None else use_triton) else None
    if kernel is not None:
        return kernel(q, scale_zero, deinterleave)
    w = _q4_blocks(q, scale_zero)
    return _deinterleave_rows(w) if deinterleave else w


def _deinterleave_rows(w: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ...] in 64-row blocks of (32 gate, 32 up) -> [E, 2I, ...] with all gate rows first."""
    e, two_i = w.shape[:2]
    blocks = w.reshape(e, two_i // CPU_BLOCK_ROWS, 2, HALF_BLOCK, *w.shape[2:])
    return torch.cat([blocks[:, :, 0], blocks[:, :, 1]], dim=1).reshape(w.shape)


def dequant_experts(codec: str, layout: str, gate_up: dict[str, torch.Tensor], down: dict[str, torch.Tensor],
                    use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Parts of both matrices of all experts -> (gate_up [E, 2I, H], down [E, H, I]) in bf16."""
    out = []
    for matrix, parts in (("gate_up", gate_up), ("down", down)):
        if codec == "bf16":
            w = parts["w"]
        elif codec == "q8":
            w = (parts["q"].to(torch.bfloat16) * parts["scale"].unsqueeze(-1)).to(torch.bfloat16)
        elif layout == "rows":
            w = q4_rows(parts["q"], parts["scale"], parts["zero"], use_triton)
        else:  # q4 CPU blocks: the de-interleave happens inside
            out.append(q4_blocks(parts["q"], parts["scale_zero"], matrix == "gate_up", use_triton))
            continue
        if layout == "cpu_blocks" and matrix == "gate_up":
            w = _deinterleave_rows(w)
        out.append(w)
    return out[0], out[1]
