"""Q4 / Q8 / BF16 codecs: the one definition of how stored bytes become weights (formats/KRS.md).

The compiler packs with these functions and the runtime unpacks with them; the choice of scales
(rounding, search) is the compiler's business (krasis_compile/quantize.py), not the format's.

Logical quantized values, for a matrix [..., N, K] (N output rows, K input columns):
  q4:   q uint8 in [0, 15], scale and zero bf16 per (row, group of 32 or 64 along K: the artifact's
        quant.q4_group); w = (q - 8) * scale + zero
  q8:   q int8 in [-127, 127], scale bf16 per row;  w = q * scale
  bf16: w stored as is.
"""

from __future__ import annotations

import torch

from .format import CPU_BLOCK_ROWS, DTYPE_SIZES, Q4_GROUP, Q4_GROUPS, Q4_OFFSET, KrsError

HALF_BLOCK = CPU_BLOCK_ROWS // 2
TORCH_DTYPES = {"u8": torch.uint8, "i8": torch.int8, "bf16": torch.bfloat16, "f32": torch.float32}

# ---------------------------------------------------------------- part tables


def matrix_parts(codec: str, layout: str, shape: list[int], group: int = Q4_GROUP) -> dict[str, tuple[str, list[int]]]:
    """Part name -> (dtype, shape) of one stored matrix [..., N, K]; the order is the storage order.
    `group`: q4 columns per scale/zero."""
    if codec in ("bf16", "f32"):
        return {"w": (codec, list(shape))}
    *lead, n, k = shape
    if codec == "q8":
        return {"q": ("i8", list(shape)), "scale": ("bf16", [*lead, n])}
    if codec != "q4":
        raise KrsError(f"unknown codec {codec!r}")
    if group not in Q4_GROUPS:
        raise KrsError(f"q4 groups of {group} columns are not supported (supported: {Q4_GROUPS})")
    if k % group:
        raise KrsError(f"q4 needs the input dimension to be a multiple of {group}, got {k}")
    if layout == "rows":
        groups = [*lead, n, k // group]
        return {"q": ("u8", [*lead, n, k // 2]), "scale": ("bf16", groups), "zero": ("bf16", groups)}
    if layout == "cpu_blocks":
        if lead or n % CPU_BLOCK_ROWS:
            raise KrsError(f"q4 CPU blocks need rows in multiples of {CPU_BLOCK_ROWS}, got {n}")
        return {
            "q": ("u8", [n // CPU_BLOCK_ROWS, k, HALF_BLOCK]),
            "scale_zero": ("bf16", [k // group, n, 2]),
        }
    raise KrsError(f"unknown layout {layout!r}")


def part_nbytes(dtype: str, shape: list[int]) -> int:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------- q4 nibble packing


def pack_q4_rows(q: torch.Tensor) -> torch.Tensor:
    """[..., N, K] values 0..15 -> [..., N, K/2] bytes; low nibble holds the even column."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_q4_rows(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def pack_q4_blocks(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N/64, K, 32] bytes: byte (b, k, d) = row 64b+d | row 64b+d+32 << 4.

    One 32-byte run holds column k of 64 rows, so a SIMD pass over K yields 64 outputs; with the
    gate/up interleave below the two nibbles of a byte are gate[n] and up[n] of the same n.
    """
    n, k = q.shape
    blocks = q.to(torch.uint8).reshape(n // CPU_BLOCK_ROWS, CPU_BLOCK_ROWS, k)
    lo, hi = blocks[:, :HALF_BLOCK, :], blocks[:, HALF_BLOCK:, :]
    return (lo | (hi << 4)).transpose(1, 2).contiguous()


def unpack_q4_blocks(packed: torch.Tensor) -> torch.Tensor:
    nb, k, _ = packed.shape
    lo, hi = (packed & 0xF).transpose(1, 2), (packed >> 4).transpose(1, 2)
    return torch.cat([lo, hi], dim=1).reshape(nb * CPU_BLOCK_ROWS, k)


# ---------------------------------------------------------------- gate/up interleave (CPU blocks)


def interleave_gate_up(gate_up: torch.Tensor) -> torch.Tensor:
    """Rows [gate(I); up(I)] -> blocks of 64 rows: 32 gate rows then the 32 up rows of the same outputs."""
    if gate_up.dim() == 1:  # per-row scales
        return interleave_gate_up(gate_up[:, None])[:, 0]
    two_i, k = gate_up.shape[-2:]
    i = two_i // 2
    if i % HALF_BLOCK:
        raise KrsError(f"expert width must be a multiple of {HALF_BLOCK} for CPU blocks, got {i}")
    lead = gate_up.shape[:-2]
    gate = gate_up[..., :i, :].reshape(*lead, i // HALF_BLOCK, HALF_BLOCK, k)
    up = gate_up[..., i:, :].reshape(*lead, i // HALF_BLOCK, HALF_BLOCK, k)
    return torch.stack([gate, up], dim=-3).reshape(*lead, two_i, k)


def split_gate_up_output(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs [..., 2I] of an interleaved gate_up matrix -> (gate [..., I], up [..., I])."""
    lead, two_i = y.shape[:-1], y.shape[-1]
    blocks = y.reshape(*lead, two_i // CPU_BLOCK_ROWS, 2, HALF_BLOCK)
    return blocks[..., 0, :].reshape(*lead, two_i // 2), blocks[..., 1, :].reshape(*lead, two_i // 2)


def deinterleave_gate_up(rows: torch.Tensor) -> torch.Tensor:
    """Inverse of interleave_gate_up on a [..., 2I, K] matrix."""
    gate, up = split_gate_up_output(rows.transpose(-1, -2))
    return torch.cat([gate, up], dim=-1).transpose(-1, -2)


# ---------------------------------------------------------------- reconstruction


def q4_group(k: int, groups: int) -> int:
    """Columns per q4 scale of a matrix with k columns and `groups` scales a row (its stored shapes say it)."""
    if not groups or k % groups or k // groups not in Q4_GROUPS:
        raise KrsError(f"q4 matrix of {k} columns with {groups} scales a row: not a supported grouping")
    return k // groups


def dequant_q4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q [..., N, K] values 0..15, scale/zero [..., N, K/group] -> float32 weights."""
    *lead, n, k = q.shape
    group = q4_group(k, scale.shape[-1])
    groups = q.reshape(*lead, n, k // group, group).float() - Q4_OFFSET
    w = groups * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return w.reshape(*lead, n, k)


def dequant_q8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().unsqueeze(-1)


def dequant_parts(codec: str, layout: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Stored parts of one matrix (bf16 parts as bfloat16 tensors) -> float32 weights [..., N, K]."""
    if codec in ("bf16", "f32"):
        return parts["w"].float()
    if codec == "q8":
        return dequant_q8(parts["q"], parts["scale"])
    if layout == "rows":
        return dequant_q4(unpack_q4_rows(parts["q"]), parts["scale"], parts["zero"])
    sz = parts["scale_zero"].transpose(0, 1)  # [N, K/group, 2]
    return dequant_q4(unpack_q4_blocks(parts["q"]), sz[..., 0], sz[..., 1])


def encode_parts(codec: str, layout: str, quantized: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logical quantized values (q, scale, zero, or w) -> the parts stored for `layout`."""
    if codec == "bf16":
        return {"w": quantized["w"].to(torch.bfloat16)}
    if codec == "q8":
        return {"q": quantized["q"].to(torch.int8), "scale": quantized["scale"].to(torch.bfloat16)}
    if layout == "rows":
        return {
            "q": pack_q4_rows(quantized["q"]),
            "scale": quantized["scale"].to(torch.bfloat16),
            "zero": quantized["zero"].to(torch.bfloat16),
        }
    scale_zero = torch.stack([quantized["scale"], quantized["zero"]], dim=-1).transpose(0, 1)
    return {"q": pack_q4_blocks(quantized["q"]), "scale_zero": scale_zero.to(torch.bfloat16).contiguous()}
