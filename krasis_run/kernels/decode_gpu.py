"""GPU decode kernels (one token, or a few, at a time): routed experts straight from the packed tiles, and
split-K attention over the KV cache. Each has a torch reference with the same signature, used off CUDA,
without Triton, and by the tests.

The engine captures a whole decode step in a CUDA graph, so everything here is capturable: launch grids
and output shapes come from tensor shapes only, never from tensor values, and nothing syncs with the host
(no .item(), no boolean indexing). Data-dependent work (which experts, how many cached positions) is
decided inside the kernels, from device tensors, by masks and loop bounds.

Expert tiles are the artifact's GPU "rows" layout (formats/KRS.md §5) stacked over the resident slots S:
  q4:   q uint8 [S, N, K/2] (byte j: column 2j low nibble, 2j+1 high), scale/zero bf16 [S, N, K/group]
  q8:   q int8 [S, N, K], scale bf16 [S, N]
  bf16: w bf16 [S, N, K]
with gate_up [S, 2I, H] (the I gate rows, then the I up rows) and down [S, H, I].
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from ..codecs import dequant_parts, q4_group
from ..format import Q4_GROUP

# Tile sizes: the fastest of scripts/bench_decode_kernels.py --sweep on the H200 (small tiles, many programs:
# 46.5 us per 30B-A3B layer at M=1 in a CUDA graph against 128 us for 16-row tiles and 4 warps);
# the tests shrink them to cover the masks.
MOE_BLOCK_N = 2  # output rows per program: 30B-A3B gate_up at M=1 -> 8 experts x 384 programs
GATE_UP_BLOCK_K = 512  # input columns per loop step (q4: 256 bytes of each gate and up row)
DOWN_BLOCK_N = 4
DOWN_BLOCK_K = 256  # input columns per loop step of the down kernels
MOE_WARPS = 1
DOWN_PAIRS = True  # q4 down: one program per (token, expert) pair and row block, then a sum over the k experts
# q4 kernels: "grouped" (the default) factors each 32-column group's dot product, sum_j ((q_j - 8) s + z) x_j =
# s * sum_j (q_j - 8) x_j + z * sum_j x_j, so scale, zero and the input sum are per group, and reads int32 words
# of 8 nibbles; "bytes" (the kernels above it, per-byte scale/zero gathers) stays for the sweep to compare.
Q4_KERNEL = "grouped"
Q4G_BLOCK_N = 2  # gate_up output rows per program (gate and up rows of each)
Q4G_GROUPS = 16  # 32-column groups per loop step (16 bytes of each row a group); 16: gate_up 13.0 -> 11.6 us alone
# at M=1 with groups of 64 (12.3 against 13.6 with groups of 32), --sweep-around of scripts/bench_decode_kernels.py
Q4G_UNROLL = 1  # group steps per loop iteration, unrolled (tl.static_range): more loads in flight per program
Q4G_STAGES = 0  # > 1: the gate_up loop software-pipelined this deep (tl.range num_stages); 0: a plain loop
Q4G_WARPS = 1  # gate_up
Q4G_DOWN_BLOCK_N = 2  # down output rows per program
Q4G_DOWN_GROUPS = 8
Q4G_DOWN_UNROLL = 3  # 3 with 8 groups: the 24 groups of I = 768 in one unrolled step
Q4G_DOWN_STAGES = 0
Q4G_DOWN_EXPERTS = 8  # chosen experts per down program; fewer than k: partial sums [M, k/EXPERTS, H], then a sum
Q4G_DOWN_WARPS = 2
# fewer experts a down program than k: True adds the shares into the output with float atomics (the gate_up kernel
# zeroes it first; no partials, no sum kernel) in no fixed order, so the result is not bit-reproducible run to run
Q4G_DOWN_ATOMIC = False
# True: row offsets written so the compiler can prove 16-byte alignment (one 16-byte load per group and row, where
# the measured kernels, False, make two 8-byte loads); same math. Compiled for sm_90 by Triton 3.9 here: False gives
# ld.global.v2.b32 for the tiles, True should give v4. Not yet timed on the GPU: the sweep compares the two.
Q4G_ALIGNED = True
# q4 gate_up with int8 inputs: x quantized per 32-column group (amax / 127, as the CPU kernels do) by one small kernel,
# then integer dot products of 4 nibbles x 4 int8 at a time (dp4a on CUDA; the same math in plain Triton under the
# interpreter). The float kernel spent ~5 ALU ops a weight (nibble extraction, int->float, fma) and was bound by them
# at ~1 TB/s (15.5 us a 30B-A3B layer, run 25); this does 5 integer ops per 8 weights.
Q4G_INT8 = True
# q8 dense GEMV (linear_q8): output rows per program, input columns per loop step, warps, 2D accumulator; the fastest
# of scripts/bench_decode_kernels.py --linear-only on the H200, timed as a step issues them (48 layers' q|k|v and
# o_proj in one graph: 12.5 us a layer against 16.6 for cuBLAS on bf16; lm_head 102.7 us against 153.2, session 5);
# the tests shrink them to cover the masks
LINEAR_Q8_BLOCK_N = 4
LINEAR_Q8_BLOCK_K = 2048
LINEAR_Q8_WARPS = 4
LINEAR_Q8_ACC2D = False
# q8 GEMV with int8 inputs (linear_q8i_kernel, where the norm or the attention before has written x's int8 groups):
# the float kernel converts every int8 weight to float (a quarter-rate instruction) and ran the 30B-A3B q|k|v at
# 7.5 us a matrix even from L2; dp4a does 4 weights an instruction. The fastest tiles of scripts/bench_decode_kernels.py
# --linear-int8 on an H100 (48 layers in one graph, L2 flushed): q|k|v + o_proj 11.3 us a layer against 12.9 with
# float inputs, lm_head 111.9 against 125.9 us. KRASIS_DECODE_Q8_INT8=0: float inputs
Q8_INT8 = os.environ.get("KRASIS_DECODE_Q8_INT8", "1") != "0"
LINEAR_Q8I_BLOCK_N = 4
LINEAR_Q8I_GROUPS = 64  # 32-column groups a loop step: 2,048 columns
LINEAR_Q8I_WARPS = 4
# split-K decode attention: cached positions per loop step, target programs (KVH x splits), warps; the fastest of
# scripts/bench_decode_kernels.py --attention-only on the H200 (48 layers in one graph, 4K of 4224 positions: 9.0 us a
# layer against 10.1 with 256 programs, session 5)
ATTN_BLOCK = 64
ATTN_PROGRAMS = 512
ATTN_WARPS = 4


# Programmatic dependent launch: each decode kernel is launched while the one before it finishes, and waits in its
# first instruction (gdc_wait) until that one is done; in a CUDA graph a dependent launch then costs 0.3-0.4 us less
# (scripts/bench_launch_gaps.py on the H200: 1.26 -> 0.99 us a kernel at 132 programs, 1.69 -> 1.31 at 512), ~768
# launches a 48-layer step (30B-A3B all on the GPU: 336 / 354 tok/s against 319 / 339 without, alternating on one
# H200, docs/BENCHMARKS.md run 57). Hopper or newer, a Triton with gdc_wait; off elsewhere, under the interpreter,
# and with KRASIS_DECODE_PDL=0.
DECODE_PDL = os.environ.get("KRASIS_DECODE_PDL", "1") != "0"


@functools.cache
def _pdl_supported(device_index: int) -> bool:
    try:
        import triton.language as tl
    except ImportError:
        return False
    return (hasattr(tl.extra.cuda, "gdc_wait") and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device_index)[0] >= 9)


def pdl(t: torch.Tensor) -> dict:
    """A decode kernel's launch options for its inputs' device: PDL (the kernel's constexpr) and Triton's launch_pdl
    where the GPU and Triton have them."""
    if DECODE_PDL and t.is_cuda and _pdl_supported(t.device.index if t.device.index is not None else 0):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block(n: int, cap: int) -> int:
    """A power-of-two tile no larger than needed for n (tl.arange sizes must be powers of two)."""
    return min(cap, next_pow2(n))


# ---------------------------------------------------------------- Triton kernels (built on first use)


@functools.cache
def _kernels():
    """The jitted kernels, or None without Triton. Defined lazily so TRITON_INTERPRET is read at first use."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _q4_tile(q_ptr, s_ptr, z_ptr, qrow, srow, bcols, mask, xe, xo, SUB: tl.constexpr):
        # q4 "rows" codec (KRS.md §5): w = (q - 8) * scale + zero, one scale/zero per 32 * SUB columns.
        # qrow/srow: element offsets of each row's bytes / groups; bcols: byte columns; xe/xo: the inputs of
        # the even / odd columns, broadcastable to the tile. 16 * SUB bytes share one scale and zero.
        b = tl.load(q_ptr + qrow + bcols, mask=mask, other=0).to(tl.int32)
        s = tl.load(s_ptr + srow + bcols // (16 * SUB), mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + srow + bcols // (16 * SUB), mask=mask, other=0.0).to(tl.float32)
        lo = ((b & 15) - 8).to(tl.float32) * s + z
        hi = ((b >> 4) - 8).to(tl.float32) * s + z
        return lo * xe + hi * xo

    @triton.jit
    def gate_up_q4_kernel(x_ptr, ids_ptr, slot_ptr, q_ptr, s_ptr, z_ptr, act_ptr, TOPK, INTER, H, q_slot, s_slot,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr, PDL: tl.constexpr):
        # one (token, chosen expert) pair x BLOCK_N outputs: gate and up rows together, act = silu(gate) * up
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        pair = tl.program_id(0)
        m = pair // TOPK
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        slot = tl.load(slot_ptr + tl.load(ids_ptr + pair))
        # a non-resident expert (slot -1) loads nothing (no rows pass the mask) and writes zeros; folded into the
        # bound because the interpreter mistypes block & scalar-bool as int32
        rmask = rows < tl.where(slot >= 0, INTER, 0)
        slot = tl.maximum(slot, 0).to(tl.int64)
        hb, ng = H // 2, H // (32 * SUB)
        g_q = slot * q_slot + rows[:, None].to(tl.int64) * hb
        u_q = g_q + INTER * hb
        g_s = slot * s_slot + rows[:, None].to(tl.int64) * ng
        u_s = g_s + INTER * ng
        acc_g = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
        for k0 in range(0, hb, BLOCK_K // 2):
            bcols = k0 + tl.arange(0, BLOCK_K // 2)
            bmask = bcols < hb
            xe = tl.load(x_ptr + m * H + 2 * bcols, mask=bmask, other=0.0).to(tl.float32)[None, :]
            xo = tl.load(x_ptr + m * H + 2 * bcols + 1, mask=bmask, other=0.0).to(tl.float32)[None, :]
            mask = rmask[:, None] & bmask[None, :]
            acc_g += _q4_tile(q_ptr, s_ptr, z_ptr, g_q, g_s, bcols[None, :], mask, xe, xo, SUB)
            acc_u += _q4_tile(q_ptr, s_ptr, z_ptr, u_q, u_s, bcols[None, :], mask, xe, xo, SUB)
        g = tl.sum(acc_g, 1)
        u = tl.sum(acc_u, 1)
        act = g / (1.0 + tl.exp(-g)) * u
        tl.store(act_ptr + pair * INTER + rows, act, mask=rows < INTER)

    @triton.jit
    def _q4_nibbles(word, shifts):
        # q - 8 of the 8 nibbles of each int32 word, [..., 8], with no int->float convert (quarter rate): the bits
        # 0x4B000000 | q are the float 2^23 + q, exactly, and subtracting 2^23 + 8 is exact too
        nib = (tl.expand_dims(word, -1) >> shifts) & 15
        return (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0

    @triton.jit
    def _q4_group_step(q_ptr, s_ptr, z_ptr, qoff, soff, mask, x_ptr, xoff, xmask):
        # grouped q4: sum_j ((q_j - 8) s + z) x_j = s * sum_j (q_j - 8) x_j + z * sum_j x_j over the 32 columns
        # of a group, kept as [..., G, 8] partials (summed once, at the end: no cross-lane sums in the loop).
        # qoff/soff: word/group offsets of each row's groups [..., G]; xoff [..., G] the groups' first inputs.
        # Word w of a group holds columns 8w..8w+7, column 8w+s in bits 4s..4s+3 (little-endian bytes, the even
        # column in the low nibble), so each word meets 8 contiguous inputs.
        words = tl.load(q_ptr + tl.expand_dims(qoff, -1) + tl.arange(0, 4), mask=tl.expand_dims(mask, -1), other=0)
        even, odd = tl.split(tl.reshape(words, words.shape[:-1] + [2, 2]))  # split takes the last axis: w & 1
        w0, w2 = tl.split(even)
        w1, w3 = tl.split(odd)
        shifts = 4 * tl.arange(0, 8)
        cols = tl.expand_dims(xoff, -1) + tl.arange(0, 8)
        xm = tl.expand_dims(xmask, -1)
        x = tl.load(x_ptr + cols, mask=xm, other=0.0).to(tl.float32)
        dot = _q4_nibbles(w0, shifts) * x
        xsum = x
        x = tl.load(x_ptr + cols + 8, mask=xm, other=0.0).to(tl.float32)
        dot += _q4_nibbles(w1, shifts) * x
        xsum += x
        x = tl.load(x_ptr + cols + 16, mask=xm, other=0.0).to(tl.float32)
        dot += _q4_nibbles(w2, shifts) * x
        xsum += x
        x = tl.load(x_ptr + cols + 24, mask=xm, other=0.0).to(tl.float32)
        dot += _q4_nibbles(w3, shifts) * x
        xsum += x
        scale = tl.expand_dims(tl.load(s_ptr + soff, mask=mask, other=0.0).to(tl.float32), -1)
        zero = tl.expand_dims(tl.load(z_ptr + soff, mask=mask, other=0.0).to(tl.float32), -1)
        return scale * dot + zero * xsum

    @triton.jit
    def _dp4a(a, b, c, DP4A: tl.constexpr, A_SIGNED: tl.constexpr):
        # c + sum over the 4 bytes of a (unsigned, or signed with A_SIGNED) times those of b (signed), per int32 lane
        if DP4A:
            if A_SIGNED:
                return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            else:
                return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                                 dtype=tl.int32, is_pure=True, pack=1)
        else:
            for i in tl.static_range(4):
                if A_SIGNED:
                    c += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
                else:
                    c += ((a >> (8 * i)) & 255) * ((b << (24 - 8 * i)) >> 24)
            return c

    @triton.jit
    def _even_odd_bytes(a, b, PRMT: tl.constexpr):
        # the bytes of 8 consecutive int8 columns (a: 0-3, b: 4-7) regrouped as the int8 input groups hold x:
        # (columns 0, 2, 4, 6), (columns 1, 3, 5, 7); one byte permute each on CUDA
        if PRMT:
            even = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x6420;", "=r,r,r", [a, b], dtype=tl.int32,
                                             is_pure=True, pack=1)
            odd = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7531;", "=r,r,r", [a, b], dtype=tl.int32,
                                            is_pure=True, pack=1)
        else:
            even = (a & 255) | ((a >> 8) & 0xFF00) | ((b & 255) << 16) | ((b >> 16) & 255) << 24
            odd = ((a >> 8) & 255) | ((a >> 16) & 0xFF00) | (((b >> 8) & 255) << 16) | ((b >> 24) & 255) << 24
        return even, odd

    @triton.jit
    def _quantize_store(x, row, ng, xq_ptr, dx_ptr, sx_ptr, fs_ptr, GP: tl.constexpr):
        # x [GP, 4, 8] float32: the columns of each 32-column group, zero past the row. Per group int8 values (scale
        # amax / 127), packed as int32 words [groups, 4, 2]: for each 8 columns the even ones (0, 2, 4, 6) then the
        # odd ones, the order the q4 words' low and high nibbles meet them; with the scale, the sum of the int8
        # values and the float sum of the group
        g = tl.arange(0, GP)
        gmask = g < ng
        amax = tl.max(tl.max(tl.abs(x), 2), 1)
        inv = tl.where(amax > 0, 127.0 / amax, 0.0)
        q = tl.floor(x * inv[:, None, None] + 0.5)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int32)
        qe, qo = tl.split(tl.reshape(q, [GP, 4, 4, 2]))  # even, odd columns of each 8
        shifts = 8 * tl.arange(0, 4)[None, None, :]
        we = tl.sum((qe & 255) << shifts, 2)
        wo = tl.sum((qo & 255) << shifts, 2)
        words = tl.join(we, wo)  # [GP, 4, 2]
        woff = (g * 8)[:, None, None] + (tl.arange(0, 4) * 2)[None, :, None] + tl.arange(0, 2)[None, None, :]
        tl.store(xq_ptr + row * ng * 8 + woff, words, mask=gmask[:, None, None])
        tl.store(dx_ptr + row * ng + g, amax / 127.0, mask=gmask)
        tl.store(sx_ptr + row * ng + g, tl.sum(tl.sum(q, 2), 1), mask=gmask)
        tl.store(fs_ptr + row * ng + g, tl.sum(tl.sum(x, 2), 1), mask=gmask)

    @triton.jit
    def quantize_x_kernel(x_ptr, xq_ptr, dx_ptr, sx_ptr, fs_ptr, H, GP: tl.constexpr, PDL: tl.constexpr):
        # one row of x into the int8 groups the q4 gate_up reads (_quantize_store)
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        ng = H // 32
        g = tl.arange(0, GP)
        cols = (g * 32)[:, None, None] + (tl.arange(0, 4) * 8)[None, :, None] + tl.arange(0, 8)[None, None, :]
        x = tl.load(x_ptr + row * H + cols, mask=(g < ng)[:, None, None], other=0.0).to(tl.float32)
        _quantize_store(x, row, ng, xq_ptr, dx_ptr, sx_ptr, fs_ptr, GP)

    @triton.jit
    def gate_up_q4i_kernel(xq_ptr, dx_ptr, sx_ptr, fs_ptr, ids_ptr, slot_ptr, q_ptr, s_ptr, z_ptr, act_ptr, TOPK,
                           INTER, H, q_slot, s_slot, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                           DP4A: tl.constexpr, SUB: tl.constexpr, PDL: tl.constexpr):
        # gate_up_q4g_kernel's grid and tiles with int8 inputs (Q4G_INT8): per row and group
        #   s * dx * (sum_j q_j xq_j - 8 sum_j xq_j) + z * sum_j x_j
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        pair = tl.program_id(0)
        m = pair // TOPK
        r = tl.arange(0, 2 * BLOCK_N)
        rows = tl.program_id(1) * BLOCK_N + r % BLOCK_N
        slot = tl.load(slot_ptr + tl.load(ids_ptr + pair))
        rmask = rows < tl.where(slot >= 0, INTER, 0)
        slot = tl.maximum(slot, 0).to(tl.int64)
        rows_gu = (rows + (r // BLOCK_N) * INTER).to(tl.int64)
        ng = H // 32
        qrow = (slot * q_slot + rows_gu * (ng * 4))[:, None, None]
        srow = (slot * s_slot + rows_gu * (ng // SUB))[:, None]  # a scale and zero per SUB groups of 32
        xrow = m.to(tl.int64) * ng
        acc = tl.zeros([2 * BLOCK_N, GROUPS], dtype=tl.float32)
        w4 = tl.arange(0, 4)
        for g0 in range(0, ng, GROUPS):
            groups = g0 + tl.arange(0, GROUPS)
            gmask = groups < ng
            mask = rmask[:, None] & gmask[None, :]
            words = tl.load(q_ptr + qrow + (groups * 4)[None, :, None] + w4[None, None, :], mask=mask[:, :, None],
                            other=0)
            xw = tl.load(xq_ptr + (xrow + groups)[:, None, None] * 8 + (w4 * 2)[None, :, None]
                         + tl.arange(0, 2)[None, None, :], mask=gmask[:, None, None], other=0)
            xe, xo = tl.split(xw)
            lo = words & 0x0F0F0F0F
            hi = (words >> 4) & 0x0F0F0F0F
            dot = _dp4a(lo, tl.broadcast_to(xe[None, :, :], lo.shape), tl.zeros(lo.shape, dtype=tl.int32), DP4A,
                        False)
            dot = tl.sum(_dp4a(hi, tl.broadcast_to(xo[None, :, :], hi.shape), dot, DP4A, False), 2)
            dx = tl.load(dx_ptr + xrow + groups, mask=gmask, other=0.0)
            sx = tl.load(sx_ptr + xrow + groups, mask=gmask, other=0)
            fs = tl.load(fs_ptr + xrow + groups, mask=gmask, other=0.0)
            scale = tl.load(s_ptr + srow + groups[None, :] // SUB, mask=mask, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + srow + groups[None, :] // SUB, mask=mask, other=0.0).to(tl.float32)
            acc += scale * ((dot - 8 * sx[None, :]).to(tl.float32) * dx[None, :]) + zero * fs[None, :]
        gu = tl.sum(acc, 1)
        g, u = tl.split(tl.trans(tl.reshape(gu, [2, BLOCK_N])))
        act = g / (1.0 + tl.exp(-g)) * u
        out_rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(act_ptr + pair * INTER + out_rows, act, mask=out_rows < INTER)

    @triton.jit
    def _gate_up_q4g_steps(acc, g0, ng, q_ptr, s_ptr, z_ptr, qrow, srow, rmask, x_ptr, xbase, GROUPS: tl.constexpr,
                           UNROLL: tl.constexpr, SUB: tl.constexpr):
        # UNROLL group steps of gate_up_q4g_kernel, unrolled: their loads are independent, so all can be in flight
        for u in tl.static_range(UNROLL):
            groups = g0 + u * GROUPS + tl.arange(0, GROUPS)
            gmask = groups < ng
            acc += _q4_group_step(q_ptr, s_ptr, z_ptr, qrow + groups[None, :] * 4, srow + groups[None, :] // SUB,
                                  rmask[:, None] & gmask[None, :], x_ptr, (xbase + groups * 32)[None, :],
                                  gmask[None, :])
        return acc

    @triton.jit
    def gate_up_q4g_kernel(x_ptr, ids_ptr, slot_ptr, q_ptr, s_ptr, z_ptr, act_ptr, y_ptr, TOPK, INTER, H, q_slot,
                           s_slot, MH, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, UNROLL: tl.constexpr,
                           STAGES: tl.constexpr, ZERO_BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
                           SUB: tl.constexpr, PDL: tl.constexpr):
        # grouped q4 (Q4_KERNEL): the grid of gate_up_q4_kernel; q_ptr is the tiles as int32 words, q_slot in words.
        # The BLOCK_N gate rows and their BLOCK_N up rows form one tile of 2 * BLOCK_N rows sharing each input load.
        # A loop step covers UNROLL x GROUPS groups; STAGES > 1 software-pipelines the loop (tl.range num_stages:
        # the next steps' loads are issued before this step's math). ZERO_BLOCK > 0: the programs also zero the
        # output y [M*H] (MH elements, ZERO_BLOCK each), for a down kernel that accumulates with atomics.
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        pair = tl.program_id(0)
        m = pair // TOPK
        r = tl.arange(0, 2 * BLOCK_N)
        rows = tl.program_id(1) * BLOCK_N + r % BLOCK_N
        slot = tl.load(slot_ptr + tl.load(ids_ptr + pair))
        rmask = rows < tl.where(slot >= 0, INTER, 0)  # not resident: loads nothing, writes zeros
        slot = tl.maximum(slot, 0).to(tl.int64)
        rows_gu = (rows + (r // BLOCK_N) * INTER).to(tl.int64)  # gate rows, then up rows
        ng = H // 32
        # ALIGNED: a row's words as ng * 4, which the compiler knows is a multiple of 4 (16 bytes), so each group's
        # 4 words load as one 16-byte vector; H // 8 is only known even (8-byte loads), the first measured kernel
        qrow = (slot * q_slot + rows_gu * (ng * 4 if ALIGNED else H // 8))[:, None]
        srow = (slot * s_slot + rows_gu * (ng // SUB))[:, None]
        acc = tl.zeros([2 * BLOCK_N, GROUPS, 8], dtype=tl.float32)
        if STAGES > 1:
            for g0 in tl.range(0, ng, GROUPS * UNROLL, num_stages=STAGES):
                acc = _gate_up_q4g_steps(acc, g0, ng, q_ptr, s_ptr, z_ptr, qrow, srow, rmask, x_ptr, m * H, GROUPS,
                                         UNROLL, SUB)
        else:
            for g0 in range(0, ng, GROUPS * UNROLL):
                acc = _gate_up_q4g_steps(acc, g0, ng, q_ptr, s_ptr, z_ptr, qrow, srow, rmask, x_ptr, m * H, GROUPS,
                                         UNROLL, SUB)
        gu = tl.sum(tl.sum(acc, 2), 1)
        g, u = tl.split(tl.trans(tl.reshape(gu, [2, BLOCK_N])))
        act = g / (1.0 + tl.exp(-g)) * u
        out_rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(act_ptr + pair * INTER + out_rows, act, mask=out_rows < INTER)
        if ZERO_BLOCK > 0:
            p = pair * tl.num_programs(1) + tl.program_id(1)
            zoff = p * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
            tl.store(y_ptr + zoff, tl.zeros([ZERO_BLOCK], dtype=tl.float32), mask=zoff < MH)

    @triton.jit
    def _down_q4g_steps(acc, g0, ng, q_ptr, s_ptr, z_ptr, qrow, srow, tmask, act_ptr, pair, jmask, INTER,
                        GROUPS: tl.constexpr, UNROLL: tl.constexpr, SUB: tl.constexpr):
        # UNROLL group steps of down_q4g_kernel, unrolled (as _gate_up_q4g_steps)
        for u in tl.static_range(UNROLL):
            groups = g0 + u * GROUPS + tl.arange(0, GROUPS)
            gmask = groups < ng
            # each expert's act inputs, shared by its BLOCK_N rows: [EXPERTS, 1, G]
            xoff = (pair * INTER)[:, None, None] + groups[None, None, :] * 32
            xmask = jmask[:, None, None] & gmask[None, None, :]
            acc += _q4_group_step(q_ptr, s_ptr, z_ptr, qrow + groups[None, None, :] * 4,
                                  srow + groups[None, None, :] // SUB,
                                  tmask[:, :, None] & gmask[None, None, :], act_ptr, xoff, xmask)
        return acc

    @triton.jit
    def down_q4g_kernel(act_ptr, ids_ptr, w_ptr, slot_ptr, q_ptr, s_ptr, z_ptr, part_ptr, TOPK, NJ, INTER, H, q_slot,
                        s_slot, EXPERTS: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                        UNROLL: tl.constexpr, STAGES: tl.constexpr, ATOMIC: tl.constexpr, ALIGNED: tl.constexpr,
                        SUB: tl.constexpr, PDL: tl.constexpr):
        # grouped q4 down: program (token m, block jb of EXPERTS chosen experts) x BLOCK_N output rows -> the
        # weighted sum over those experts in part [M, NJ, H] (NJ = cdiv(k, EXPERTS); NJ = 1: part is the output).
        # ATOMIC: part is the output [M, H], zeroed beforehand, and each program adds its sum into it with
        # tl.atomic_add (the NJ shares of a row arrive in no fixed order: float sums not bit-reproducible).
        # UNROLL / STAGES: as in gate_up_q4g_kernel (I = 768 is 24 groups: GROUPS 8 x UNROLL 3 is one step).
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        m = tl.program_id(0) // NJ
        j = (tl.program_id(0) % NJ) * EXPERTS + tl.arange(0, EXPERTS)
        jmask = j < TOPK
        pair = m * TOPK + j
        slot = tl.load(slot_ptr + tl.load(ids_ptr + pair, mask=jmask, other=0), mask=jmask, other=-1)
        w = tl.where(slot >= 0, tl.load(w_ptr + pair, mask=jmask, other=0.0), 0.0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        tmask = (slot >= 0)[:, None] & (rows < H)[None, :]  # [EXPERTS, BLOCK_N]
        slot = tl.maximum(slot, 0).to(tl.int64)
        ng = INTER // 32
        qrow = ((slot * q_slot)[:, None] + rows[None, :].to(tl.int64) * (ng * 4 if ALIGNED else INTER // 8))[:, :, None]
        srow = ((slot * s_slot)[:, None] + rows[None, :].to(tl.int64) * (ng // SUB))[:, :, None]
        acc = tl.zeros([EXPERTS, BLOCK_N, GROUPS, 8], dtype=tl.float32)
        if STAGES > 1:
            for g0 in tl.range(0, ng, GROUPS * UNROLL, num_stages=STAGES):
                acc = _down_q4g_steps(acc, g0, ng, q_ptr, s_ptr, z_ptr, qrow, srow, tmask, act_ptr, pair, jmask,
                                      INTER, GROUPS, UNROLL, SUB)
        else:
            for g0 in range(0, ng, GROUPS * UNROLL):
                acc = _down_q4g_steps(acc, g0, ng, q_ptr, s_ptr, z_ptr, qrow, srow, tmask, act_ptr, pair, jmask,
                                      INTER, GROUPS, UNROLL, SUB)
        out = tl.sum(tl.sum(tl.sum(acc, 3), 2) * w[:, None], 0)
        if ATOMIC:
            tl.atomic_add(part_ptr + m * H + rows, out, mask=rows < H, sem="relaxed")
        else:
            tl.store(part_ptr + tl.program_id(0) * H + rows, out, mask=rows < H)

    @triton.jit
    def gate_up_dense_kernel(x_ptr, ids_ptr, slot_ptr, q_ptr, s_ptr, act_ptr, TOPK, INTER, H, q_slot,
                             HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        # q8 (int8 rows, one scale per row) or bf16 (HAS_SCALE=False), same grid as the q4 kernel
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        pair = tl.program_id(0)
        m = pair // TOPK
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        slot = tl.load(slot_ptr + tl.load(ids_ptr + pair))
        rmask = rows < tl.where(slot >= 0, INTER, 0)
        slot = tl.maximum(slot, 0).to(tl.int64)
        g_q = slot * q_slot + rows[:, None].to(tl.int64) * H
        u_q = g_q + INTER * H
        acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < H
            x = tl.load(x_ptr + m * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            mask = rmask[:, None] & cmask[None, :]
            acc_g += tl.load(q_ptr + g_q + cols[None, :], mask=mask, other=0).to(tl.float32) * x
            acc_u += tl.load(q_ptr + u_q + cols[None, :], mask=mask, other=0).to(tl.float32) * x
        g = tl.sum(acc_g, 1)
        u = tl.sum(acc_u, 1)
        if HAS_SCALE:
            srow = slot * (2 * INTER) + rows
            g *= tl.load(s_ptr + srow, mask=rmask, other=0.0).to(tl.float32)
            u *= tl.load(s_ptr + srow + INTER, mask=rmask, other=0.0).to(tl.float32)
        act = g / (1.0 + tl.exp(-g)) * u
        tl.store(act_ptr + pair * INTER + rows, act, mask=rows < INTER)

    @triton.jit
    def _expert_slots(ids_ptr, w_ptr, slot_ptr, m, TOPK, KP: tl.constexpr):
        # the k experts of token m: clamped slots, residency, and routing weights (0 where not resident)
        j = tl.arange(0, KP)
        jmask = j < TOPK
        e = tl.load(ids_ptr + m * TOPK + j, mask=jmask, other=0)
        slot = tl.load(slot_ptr + e, mask=jmask, other=-1)
        resident = jmask & (slot >= 0)
        w = tl.load(w_ptr + m * TOPK + j, mask=jmask, other=0.0)
        return j, jmask, tl.maximum(slot, 0).to(tl.int64), resident, tl.where(resident, w, 0.0)

    @triton.jit
    def down_q4_kernel(act_ptr, ids_ptr, w_ptr, slot_ptr, q_ptr, s_ptr, z_ptr, out_ptr, TOPK, INTER, H, q_slot,
                       s_slot, KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr,
                       PDL: tl.constexpr):
        # one token x BLOCK_N output rows; the rows of all k experts load together (more bytes in flight)
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        m = tl.program_id(0)
        j, jmask, slot, resident, w = _expert_slots(ids_ptr, w_ptr, slot_ptr, m, TOPK, KP)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < H
        ib, ng = INTER // 2, INTER // (32 * SUB)
        qrow = (slot * q_slot)[:, None, None] + rows[None, :, None].to(tl.int64) * ib
        srow = (slot * s_slot)[:, None, None] + rows[None, :, None].to(tl.int64) * ng
        tmask = resident[:, None] & rmask[None, :]
        arow = (m * TOPK + j)[:, None] * INTER
        acc = tl.zeros([KP, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, ib, BLOCK_K // 2):
            bcols = k0 + tl.arange(0, BLOCK_K // 2)
            bmask = bcols < ib
            amask = jmask[:, None] & bmask[None, :]
            ae = tl.load(act_ptr + arow + 2 * bcols[None, :], mask=amask, other=0.0)[:, None, :]
            ao = tl.load(act_ptr + arow + 2 * bcols[None, :] + 1, mask=amask, other=0.0)[:, None, :]
            mask = tmask[:, :, None] & bmask[None, None, :]
            acc += tl.sum(_q4_tile(q_ptr, s_ptr, z_ptr, qrow, srow, bcols[None, None, :], mask, ae, ao, SUB), 2)
        tl.store(out_ptr + m * H + rows, tl.sum(acc * w[:, None], 0), mask=rmask)

    @triton.jit
    def down_q4_pairs_kernel(act_ptr, ids_ptr, w_ptr, slot_ptr, q_ptr, s_ptr, z_ptr, part_ptr, TOPK, INTER, H, q_slot,
                             s_slot, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr,
                             PDL: tl.constexpr):
        # one (token, chosen expert) pair x BLOCK_N output rows -> its weighted share in part [M*k, H]: k times the
        # programs of one program per row block, each streaming one expert's rows in short 2D tiles (the 3D tiles
        # of down_q4_kernel spill registers); a sum over k then gives the output, in a fixed order
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        pair = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        slot = tl.load(slot_ptr + tl.load(ids_ptr + pair))
        rmask = rows < tl.where(slot >= 0, H, 0)  # not resident: loads nothing, stores zeros
        w = tl.load(w_ptr + pair)
        slot = tl.maximum(slot, 0).to(tl.int64)
        ib, ng = INTER // 2, INTER // (32 * SUB)
        qrow = slot * q_slot + rows[:, None].to(tl.int64) * ib
        srow = slot * s_slot + rows[:, None].to(tl.int64) * ng
        acc = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
        for k0 in range(0, ib, BLOCK_K // 2):
            bcols = k0 + tl.arange(0, BLOCK_K // 2)
            bmask = bcols < ib
            ae = tl.load(act_ptr + pair * INTER + 2 * bcols, mask=bmask, other=0.0)[None, :]
            ao = tl.load(act_ptr + pair * INTER + 2 * bcols + 1, mask=bmask, other=0.0)[None, :]
            acc += _q4_tile(q_ptr, s_ptr, z_ptr, qrow, srow, bcols[None, :], rmask[:, None] & bmask[None, :], ae, ao,
                            SUB)
        tl.store(part_ptr + pair * H + rows, tl.sum(acc, 1) * w, mask=rows < H)

    @triton.jit
    def down_dense_kernel(act_ptr, ids_ptr, w_ptr, slot_ptr, q_ptr, s_ptr, out_ptr, TOPK, INTER, H, q_slot,
                          HAS_SCALE: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PDL: tl.constexpr):
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        m = tl.program_id(0)
        j, jmask, slot, resident, w = _expert_slots(ids_ptr, w_ptr, slot_ptr, m, TOPK, KP)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < H
        qrow = (slot * q_slot)[:, None, None] + rows[None, :, None].to(tl.int64) * INTER
        tmask = resident[:, None] & rmask[None, :]
        arow = (m * TOPK + j)[:, None] * INTER
        acc = tl.zeros([KP, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, INTER, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < INTER
            a = tl.load(act_ptr + arow + cols[None, :], mask=jmask[:, None] & cmask[None, :], other=0.0)
            mask = tmask[:, :, None] & cmask[None, None, :]
            q = tl.load(q_ptr + qrow + cols[None, None, :], mask=mask, other=0).to(tl.float32)
            acc += tl.sum(q * a[:, None, :], 2)
        if HAS_SCALE:
            acc *= tl.load(s_ptr + (slot * H)[:, None] + rows[None, :], mask=tmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * H + rows, tl.sum(acc * w[:, None], 0), mask=rmask)

    @triton.jit
    def linear_q8_kernel(x_ptr, q_ptr, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         ACC2D: tl.constexpr, PDL: tl.constexpr):
        # y[m, rows] = scale[rows] * sum_k q[rows, k] x[m, k] in float32, stored bf16 (as F.linear on bf16 gives);
        # one input row m per program_id(1): the int8 rows come from L2 again for a second one. ACC2D: a [rows,
        # columns] accumulator summed once at the end; else each step's products are summed as they come (fewer
        # registers, so longer steps: more bytes in flight per program)
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        m = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        qrow = rows[:, None].to(tl.int64) * K
        if ACC2D:
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                cmask = cols < K
                x = tl.load(x_ptr + m * K + cols, mask=cmask, other=0.0).to(tl.float32)
                w = tl.load(q_ptr + qrow + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0)
                acc += w.to(tl.float32) * x[None, :]
            y = tl.sum(acc, 1)
        else:
            y = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                cmask = cols < K
                x = tl.load(x_ptr + m * K + cols, mask=cmask, other=0.0).to(tl.float32)
                w = tl.load(q_ptr + qrow + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0)
                y += tl.sum(w.to(tl.float32) * x[None, :], 1)
        y = y * tl.load(s_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * N + rows, y.to(tl.bfloat16), mask=rmask)

    @triton.jit
    def linear_q8i_kernel(xq_ptr, dx_ptr, q_ptr, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                          DP4A: tl.constexpr, PDL: tl.constexpr):
        # linear_q8_kernel with x in int8 groups (quantize_x_kernel's layout): per row and 32-column group
        # dx * sum_j q_j xq_j, from int32 words of 4 weights; the weight bytes regrouped to meet x's even / odd words
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        m = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        ng = K // 32
        qrow = (rows.to(tl.int64) * (K // 4))[:, None, None, None]
        acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
        for g0 in range(0, ng, GROUPS):
            groups = g0 + tl.arange(0, GROUPS)
            gmask = groups < ng
            # words [group, 8 columns, 2]: the 8 words of a group in order, as pairs (columns 0-3, 4-7)
            woff = (groups * 8)[:, None, None] + (tl.arange(0, 4) * 2)[None, :, None] + tl.arange(0, 2)[None, None, :]
            a, b = tl.split(tl.load(q_ptr + qrow + woff[None], other=0,
                                    mask=(rmask[:, None] & gmask[None, :])[:, :, None, None]))
            xe, xo = tl.split(tl.load(xq_ptr + m * ng * 8 + woff, mask=gmask[:, None, None], other=0))
            even, odd = _even_odd_bytes(a, b, DP4A)
            dot = _dp4a(even, tl.broadcast_to(xe[None], a.shape), tl.zeros(a.shape, dtype=tl.int32), DP4A, True)
            dot = tl.sum(_dp4a(odd, tl.broadcast_to(xo[None], a.shape), dot, DP4A, True), 2)
            acc += dot.to(tl.float32) * tl.load(dx_ptr + m * ng + groups, mask=gmask, other=0.0)[None, :]
        y = tl.sum(acc, 1) * tl.load(s_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * N + rows, y.to(tl.bfloat16), mask=rmask)

    @triton.jit
    def _split_bounds(len_ptr, NSPLIT, BLOCK: tl.constexpr):
        # every split covers the same whole number of blocks, sized from the device-side length
        length = tl.load(len_ptr)
        per = tl.cdiv(tl.cdiv(length, NSPLIT), BLOCK) * BLOCK
        return length, per

    @triton.jit
    def attn_split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, o_ptr, ml_ptr, qk_scale, kv_pos, kv_head, G, NSPLIT,
                          D: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # one kv head x one split of the cached positions, all G query heads of that kv head at once so K and V
        # are read once; online softmax in base 2; writes unnormalised partials (acc, max, sum) per query head
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        kvh = tl.program_id(0)
        split = tl.program_id(1)
        length, per = _split_bounds(len_ptr, NSPLIT, BLOCK)
        lo = split * per
        hi = tl.minimum(lo + per, length)
        g = tl.arange(0, GP)
        heads = kvh * G + g
        d = tl.arange(0, D)
        q = tl.load(q_ptr + heads[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0).to(tl.float32)
        q = q * qk_scale
        m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, D], dtype=tl.float32)
        for start in range(lo, hi, BLOCK):
            pos = start + tl.arange(0, BLOCK)
            pmask = pos < hi
            off = pos[:, None].to(tl.int64) * kv_pos + kvh * kv_head + d[None, :]
            k = tl.load(k_ptr + off, mask=pmask[:, None], other=0.0).to(tl.float32)
            v = tl.load(v_ptr + off, mask=pmask[:, None], other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="tf32")
            s = tl.where(pmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="tf32")
            m_i = m_new
        keep = g < tl.where(lo < length, G, 0)  # splits past the end write nothing; the combine skips them
        part = heads * NSPLIT + split
        tl.store(o_ptr + part[:, None] * D + d[None, :], acc, mask=keep[:, None])
        tl.store(ml_ptr + part * 2, m_i, mask=keep)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=keep)

    @triton.jit
    def attn_combine_kernel(o_ptr, ml_ptr, len_ptr, out_ptr, NSPLIT, xq_ptr, dx_ptr, sx_ptr, fs_ptr, D: tl.constexpr,
                            SP: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr):
        # QUANT: the head's output (as stored) also into the int8 groups the o_proj GEMV reads (_quantize_store)
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        h = tl.program_id(0)
        length, per = _split_bounds(len_ptr, NSPLIT, BLOCK)
        s = tl.arange(0, SP)
        smask = s < tl.cdiv(length, per)  # split 0 always holds position 0, so the max below is finite
        part = h * NSPLIT + s
        m = tl.load(ml_ptr + part * 2, mask=smask, other=float("-inf"))
        lsum = tl.load(ml_ptr + part * 2 + 1, mask=smask, other=0.0)
        w = tl.where(smask, tl.exp2(m - tl.max(m, 0)), 0.0)
        d = tl.arange(0, D)
        o = tl.load(o_ptr + part[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        y = (tl.sum(o * w[:, None], 0) / tl.sum(w * lsum, 0)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + h * D + d, y)
        if QUANT:  # the row's groups D / 32 at a time: head h holds groups h * D / 32 ...
            _quantize_store(tl.reshape(y.to(tl.float32), [D // 32, 4, 8]), h, D // 32, xq_ptr, dx_ptr, sx_ptr, fs_ptr,
                            D // 32)

    # The interpreter re-executes a kernel's source in its module's globals, without the closure, so the kernels
    # find their @triton.jit helpers there (the compiler looks in both).
    globals().update(_q4_tile=_q4_tile, _expert_slots=_expert_slots, _split_bounds=_split_bounds,
                     _q4_nibbles=_q4_nibbles, _q4_group_step=_q4_group_step, _gate_up_q4g_steps=_gate_up_q4g_steps,
                     _down_q4g_steps=_down_q4g_steps, _dp4a=_dp4a, _quantize_store=_quantize_store,
                     _even_odd_bytes=_even_odd_bytes)
    return {
        "cdiv": triton.cdiv,
        "gate_up_q4": gate_up_q4_kernel,
        "gate_up_dense": gate_up_dense_kernel,
        "down_q4": down_q4_kernel,
        "down_q4_pairs": down_q4_pairs_kernel,
        "gate_up_q4g": gate_up_q4g_kernel,
        "quantize_x": quantize_x_kernel,
        "_quantize_store": _quantize_store,
        "gate_up_q4i": gate_up_q4i_kernel,
        "down_q4g": down_q4g_kernel,
        "down_dense": down_dense_kernel,
        "attn_split": attn_split_kernel,
        "attn_combine": attn_combine_kernel,
        "linear_q8": linear_q8_kernel,
        "linear_q8i": linear_q8i_kernel,
    }


def _triton_ok(t: torch.Tensor, use_triton: bool | None) -> bool:
    return (t.is_cuda if use_triton is None else use_triton) and _kernels() is not None


# ---------------------------------------------------------------- routed experts


def _stacked_shape(codec: str, parts: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(slots, rows N, input columns K) of stacked parts."""
    if codec == "q4":
        s, n, kb = parts["q"].shape
        return s, n, 2 * kb
    return tuple((parts["w"] if codec == "bf16" else parts["q"]).shape)


def moe_decode_torch(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     slot_of_expert: torch.Tensor, codec: str, gate_up: dict[str, torch.Tensor],
                     down: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: dequantize only the chosen experts' tiles (float32), mask non-resident ones. float32 [M, H]."""
    m, h = x.shape
    slots = slot_of_expert.long()[topk_ids.long()]  # [M, k]
    resident = slots >= 0
    y = torch.zeros(m, h, dtype=torch.float32, device=x.device)
    if _stacked_shape(codec, gate_up)[0] > 0:  # a shape, not a value: no sync
        idx = slots.clamp(min=0)
        w1 = dequant_parts(codec, "rows", {name: t[idx] for name, t in gate_up.items()})  # [M, k, 2I, H]
        gu = torch.einsum("mjnh,mh->mjn", w1, x.float())
        gate, up = gu.chunk(2, dim=-1)
        act = F.silu(gate) * up
        w2 = dequant_parts(codec, "rows", {name: t[idx] for name, t in down.items()})  # [M, k, H, I]
        per_expert = torch.einsum("mjhi,mji->mjh", w2, act)
        weights = torch.where(resident, topk_weights.float(), 0.0)
        y = torch.where(resident[..., None], per_expert * weights[..., None], 0.0).sum(1)
    if out is None:
        return y
    return out.copy_(y)


def moe_decode(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, slot_of_expert: torch.Tensor,
               codec: str, gate_up: dict[str, torch.Tensor], down: dict[str, torch.Tensor],
               out: torch.Tensor | None = None, *, use_triton: bool | None = None,
               x_int8: tuple | None = None) -> torch.Tensor:
    """sum_j w[m,j] * down_e(silu(gate_e(x[m])) * up_e(x[m])) over the resident chosen experts: float32 [M, H].

    Triton (CUDA tensors, or use_triton=True under TRITON_INTERPRET) reads the packed tiles directly: one kernel
    for gate/up + silu into act [M, k, I], one for down and the weighted sum over the k experts (q4: with a sum
    of partials after it where a down program covers fewer than k experts, unless Q4G_DOWN_ATOMIC). `x_int8`: x
    already in the int8 groups of Q4G_INT8 (decode_glue.add_rms_norm wrote them with x), for q4 to skip its own.
    """
    if not _triton_ok(x, use_triton) or _stacked_shape(codec, gate_up)[0] == 0:
        return moe_decode_torch(x, topk_ids, topk_weights, slot_of_expert, codec, gate_up, down, out)
    y, launches = moe_decode_launches(x, topk_ids, topk_weights, slot_of_expert, codec, gate_up, down, out, x_int8)
    for _, launch in launches:
        launch()
    return y


def moe_decode_launches(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        slot_of_expert: torch.Tensor, codec: str, gate_up: dict[str, torch.Tensor],
                        down: dict[str, torch.Tensor], out: torch.Tensor | None = None, x_int8: tuple | None = None
                        ) -> tuple[torch.Tensor, list[tuple[str, object]]]:
    """moe_decode's Triton path as (y, [(name, launch)]): its buffers allocated, nothing launched yet; calling the
    launches in order computes y. Lets the benchmark time each kernel alone (each in its own CUDA graph). Names:
    "quantize" (q4 with int8 inputs), "gate_up", "down", and "sum" (the partials' sum, where there is one)."""
    kern = _kernels()
    m, h = x.shape
    topk = topk_ids.shape[1]
    inter = _stacked_shape(codec, down)[2]
    x = (x if x.dtype in (torch.float32, torch.bfloat16) else x.float()).contiguous()  # the kernels upcast bf16
    ids = topk_ids.contiguous()
    weights = topk_weights.float().contiguous()
    slot_of = slot_of_expert.contiguous()
    act = torch.empty(m, topk, inter, dtype=torch.float32, device=x.device)
    y = out if out is not None else torch.empty(m, h, dtype=torch.float32, device=x.device)
    gu = {name: t.contiguous() for name, t in gate_up.items()}
    dn = {name: t.contiguous() for name, t in down.items()}
    if codec == "q4":
        q4 = _q4_grouped_launches if Q4_KERNEL == "grouped" else _q4_bytes_launches
        if q4 is _q4_grouped_launches:
            return y, q4(kern, x, ids, weights, slot_of, gu, dn, act, y, x_int8)
        return y, q4(kern, x, ids, weights, slot_of, gu, dn, act, y)
    grid_a = (m * topk, kern["cdiv"](inter, MOE_BLOCK_N))
    grid_b = (m, kern["cdiv"](h, DOWN_BLOCK_N))
    kp = next_pow2(topk)
    key = "w" if codec == "bf16" else "q"
    has_scale = codec == "q8"
    bk_a, bk_b = _block(h, GATE_UP_BLOCK_K // 2), _block(inter, DOWN_BLOCK_K // 2)  # 1-2 bytes/weight, not 1/2

    def gate_up_launch():
        kern["gate_up_dense"][grid_a](x, ids, slot_of, gu[key], gu.get("scale", gu[key]), act, topk, inter, h,
                                      gu[key].stride(0), HAS_SCALE=has_scale, BLOCK_N=MOE_BLOCK_N, BLOCK_K=bk_a,
                                      **pdl(x))

    def down_launch():
        kern["down_dense"][grid_b](act, ids, weights, slot_of, dn[key], dn.get("scale", dn[key]), y, topk, inter, h,
                                   dn[key].stride(0), HAS_SCALE=has_scale, KP=kp, BLOCK_N=DOWN_BLOCK_N, BLOCK_K=bk_b,
                                   **pdl(x))

    return y, [("gate_up", gate_up_launch), ("down", down_launch)]


def _sub(k: int, scale: torch.Tensor) -> int:
    """32-column groups per scale of stacked q4 tiles with k columns (the kernels' SUB)."""
    return q4_group(k, scale.shape[-1]) // Q4_GROUP


def _q4_bytes_launches(kern, x, ids, weights, slot_of, gu, dn, act, y) -> list:
    """q4 through the per-byte kernels (Q4_KERNEL = "bytes")."""
    m, h = x.shape
    topk, inter = act.shape[1:]
    sub_a, sub_b = _sub(h, gu["scale"]), _sub(inter, dn["scale"])
    bk_a, bk_b = _block(h, GATE_UP_BLOCK_K), _block(inter, DOWN_BLOCK_K)

    def gate_up_launch():
        kern["gate_up_q4"][(m * topk, kern["cdiv"](inter, MOE_BLOCK_N))](
            x, ids, slot_of, gu["q"], gu["scale"], gu["zero"], act, topk, inter, h, gu["q"].stride(0),
            gu["scale"].stride(0), BLOCK_N=MOE_BLOCK_N, BLOCK_K=bk_a, SUB=sub_a, num_warps=MOE_WARPS, **pdl(x))

    if DOWN_PAIRS:
        part = torch.empty(m, topk, h, dtype=torch.float32, device=x.device)

        def down_launch():
            kern["down_q4_pairs"][(m * topk, kern["cdiv"](h, DOWN_BLOCK_N))](
                act, ids, weights, slot_of, dn["q"], dn["scale"], dn["zero"], part, topk, inter, h,
                dn["q"].stride(0), dn["scale"].stride(0), BLOCK_N=DOWN_BLOCK_N, BLOCK_K=bk_b, SUB=sub_b,
                num_warps=MOE_WARPS, **pdl(x))

        return [("gate_up", gate_up_launch), ("down", down_launch), ("sum", lambda: torch.sum(part, 1, out=y))]

    def down_launch():
        kern["down_q4"][(m, kern["cdiv"](h, DOWN_BLOCK_N))](
            act, ids, weights, slot_of, dn["q"], dn["scale"], dn["zero"], y, topk, inter, h, dn["q"].stride(0),
            dn["scale"].stride(0), KP=next_pow2(topk), BLOCK_N=DOWN_BLOCK_N, BLOCK_K=bk_b, SUB=sub_b,
            num_warps=MOE_WARPS, **pdl(x))

    return [("gate_up", gate_up_launch), ("down", down_launch)]


def _q4_grouped_launches(kern, x, ids, weights, slot_of, gu, dn, act, y, x_int8=None) -> list:
    """q4 through the group-factored kernels (Q4_KERNEL = "grouped"): the tiles read as int32 words (rows of
    K/2 bytes, K a multiple of 32, so every row and group starts on a word). The kernels work in groups of 32
    columns and read a scale and zero per SUB of them (groups of 64: SUB = 2)."""
    m, h = x.shape
    topk, inter = act.shape[1:]
    gu_q, dn_q = gu["q"].view(torch.int32), dn["q"].view(torch.int32)
    sub_a, sub_b = _sub(h, gu["scale"]), _sub(inter, dn["scale"])
    groups_a, groups_b = _block(h // 32, Q4G_GROUPS), _block(inter // 32, Q4G_DOWN_GROUPS)
    unroll_a = max(1, min(Q4G_UNROLL, -(-(h // 32) // groups_a)))  # no more unrolled steps than the row has
    unroll_b = max(1, min(Q4G_DOWN_UNROLL, -(-(inter // 32) // groups_b)))
    experts = _block(topk, Q4G_DOWN_EXPERTS)
    nj = -(-topk // experts)
    atomic = Q4G_DOWN_ATOMIC and nj > 1
    grid_a = (m * topk, kern["cdiv"](inter, Q4G_BLOCK_N))
    zero_block = next_pow2(-(-m * h // (grid_a[0] * grid_a[1]))) if atomic else 0

    if Q4G_INT8 and not zero_block:  # the atomic down needs the float gate_up's zeroing of y
        launches = _q4_int8_gate_up_launches(kern, x, ids, slot_of, gu_q, gu, act, grid_a, groups_a, x_int8)
    else:
        def gate_up_launch():
            kern["gate_up_q4g"][grid_a](
                x, ids, slot_of, gu_q, gu["scale"], gu["zero"], act, y, topk, inter, h, gu_q.stride(0),
                gu["scale"].stride(0), m * h, BLOCK_N=Q4G_BLOCK_N, GROUPS=groups_a, UNROLL=unroll_a,
                STAGES=Q4G_STAGES, ZERO_BLOCK=zero_block, ALIGNED=Q4G_ALIGNED, SUB=sub_a, num_warps=Q4G_WARPS, **pdl(x))

        launches = [("gate_up", gate_up_launch)]

    # one expert block, or atomics: the programs write the output directly; else partial sums, then their sum
    part = y.view(m, 1, h) if nj == 1 or atomic else torch.empty(m, nj, h, dtype=torch.float32, device=x.device)

    def down_launch():
        kern["down_q4g"][(m * nj, kern["cdiv"](h, Q4G_DOWN_BLOCK_N))](
            act, ids, weights, slot_of, dn_q, dn["scale"], dn["zero"], part, topk, nj, inter, h, dn_q.stride(0),
            dn["scale"].stride(0), EXPERTS=experts, BLOCK_N=Q4G_DOWN_BLOCK_N, GROUPS=groups_b, UNROLL=unroll_b,
            STAGES=Q4G_DOWN_STAGES, ATOMIC=atomic, ALIGNED=Q4G_ALIGNED, SUB=sub_b, num_warps=Q4G_DOWN_WARPS, **pdl(x))

    launches.append(("down", down_launch))
    if nj > 1 and not atomic:
        launches.append(("sum", lambda: torch.sum(part, 1, out=y)))
    return launches


def int8_groups(m: int, h: int, device) -> tuple[torch.Tensor, ...]:
    """Buffers of Q4G_INT8's quantized input rows: int32 words [M, H/4], scale, int8 sum and float sum [M, H/32]."""
    ng = h // 32
    return (torch.empty(m, ng * 8, dtype=torch.int32, device=device), torch.empty(m, ng, dtype=torch.float32,
            device=device), torch.empty(m, ng, dtype=torch.int32, device=device),
            torch.empty(m, ng, dtype=torch.float32, device=device))


def _q4_int8_gate_up_launches(kern, x, ids, slot_of, gu_q, gu, act, grid_a, groups_a, x_int8=None) -> list:
    """Q4G_INT8: x quantized per group of 32 (words, scales, int8 sums, float sums), then gate_up with integer dot
    products (dp4a on CUDA; the interpreter runs the same integer math without the instruction). `x_int8`: those
    groups already written (decode_glue.add_rms_norm with x_int8): no quantize launch."""
    m, h = x.shape
    topk, inter = act.shape[1:]
    ng = h // 32
    xq = x_int8 if x_int8 is not None else int8_groups(m, h, x.device)

    def quantize():
        kern["quantize_x"][(m,)](x, *xq, h, GP=next_pow2(ng), num_warps=4, **pdl(x))

    def gate_up():
        kern["gate_up_q4i"][grid_a](*xq, ids, slot_of, gu_q, gu["scale"], gu["zero"], act, topk, inter, h,
                                    gu_q.stride(0), gu["scale"].stride(0), BLOCK_N=Q4G_BLOCK_N, GROUPS=groups_a,
                                    DP4A=x.is_cuda, SUB=_sub(h, gu["scale"]), num_warps=Q4G_WARPS, **pdl(x))

    return ([] if x_int8 is not None else [("quantize", quantize)]) + [("gate_up", gate_up)]


# ---------------------------------------------------------------- attention


# ---------------------------------------------------------------- dense projections


def linear_q8_torch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference: x [M, K] times the q8 rows (int8 q [N, K], bf16 scale [N]) in float32 -> bf16 [M, N]."""
    return ((x.float() @ q.float().T) * scale.float()).to(torch.bfloat16)


def int8_groups_dequant(x_int8: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The float32 row [M, H] that int8 groups (int8_groups' buffers, as quantize_x_kernel fills them) stand for."""
    words, scale = x_int8[:2]
    m, ng = scale.shape
    values = words.view(torch.int8).view(m, ng, 4, 2, 4).permute(0, 1, 2, 4, 3)  # byte i of the even word: column 2i
    return (values.reshape(m, ng, 32).float() * scale[..., None]).reshape(m, ng * 32)


def linear_q8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None, *,
              use_triton: bool | None = None, x_int8: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """x [M, K] (float32 or bf16; M a few) times q8 rows read as stored (half the bytes of bf16 weights, which is
    what a one-token GEMV costs): bf16 [M, N]. Triton on CUDA tensors (or use_triton=True under the interpreter).

    x_int8: x's int8 groups (int8_groups(M, K), written by the norm or the attention before; K a multiple of 32),
    which the product then takes instead of x: integer dot products, 4 weights an instruction (dp4a), where
    converting each int8 weight to float bound the float kernel (Q8_INT8)."""
    m, k = x.shape
    if x_int8 is not None and (k % 32 or [tuple(t.shape) for t in x_int8[:2]] != [(m, k // 4), (m, k // 32)]
                               or not all(t.is_contiguous() for t in x_int8[:2])):
        raise ValueError(f"x_int8 must be int8_groups({m}, {k}) of x [{m}, {k}] with {k} a multiple of 32")
    if not _triton_ok(x, use_triton):
        y = linear_q8_torch(x if x_int8 is None else int8_groups_dequant(x_int8), q, scale)
        return y if out is None else out.copy_(y)
    kern = _kernels()
    n = q.shape[0]
    y = out if out is not None else torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    if x_int8 is not None:
        kern["linear_q8i"][(kern["cdiv"](n, LINEAR_Q8I_BLOCK_N), m)](
            x_int8[0], x_int8[1], q.contiguous().view(torch.int32), scale.contiguous(), y, n, k,
            BLOCK_N=LINEAR_Q8I_BLOCK_N, GROUPS=_block(k // 32, LINEAR_Q8I_GROUPS), DP4A=x.is_cuda,
            num_warps=LINEAR_Q8I_WARPS, **pdl(x))
        return y
    x = (x if x.dtype in (torch.float32, torch.bfloat16) else x.float()).contiguous()
    kern["linear_q8"][(kern["cdiv"](n, LINEAR_Q8_BLOCK_N), m)](
        x, q.contiguous(), scale.contiguous(), y, n, k, BLOCK_N=LINEAR_Q8_BLOCK_N,
        BLOCK_K=_block(k, LINEAR_Q8_BLOCK_K), ACC2D=LINEAR_Q8_ACC2D, num_warps=LINEAR_Q8_WARPS, **pdl(x))
    return y


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: q [H, D], caches [capacity, KVH, D], length int [1] on the device -> float32 [H*D]."""
    heads, dim = q.shape
    capacity, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    valid = torch.arange(capacity, device=q.device) < length.to(q.device)  # mask by a device tensor: no sync
    k = k_cache.float().repeat_interleave(group, dim=1)  # [capacity, H, D]
    v = torch.where(valid[:, None, None], v_cache.float(), 0.0).repeat_interleave(group, dim=1)  # 0 * stale nan
    scores = torch.einsum("hd,chd->hc", q.float(), k) / math.sqrt(dim)
    probs = torch.softmax(scores.masked_fill(~valid[None, :], float("-inf")), dim=-1)
    o = torch.einsum("hc,chd->hd", probs, v).reshape(heads * dim)
    return o if out is None else out.copy_(o)


def attention_splits(capacity: int, kv_heads: int) -> int:
    """Splits of the cache per kv head: about ATTN_PROGRAMS programs in all, never more than blocks in capacity."""
    return max(1, min(-(-capacity // ATTN_BLOCK), ATTN_PROGRAMS // kv_heads))


def attention_workspace(heads: int, dim: int, capacity: int, kv_heads: int,
                        device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The split kernel's partials: (acc [H, splits, D], (max, sum) [H, splits, 2]), float32, never zeroed."""
    nsplit = attention_splits(capacity, kv_heads)
    return (torch.empty(heads, nsplit, dim, dtype=torch.float32, device=device),
            torch.empty(heads, nsplit, 2, dtype=torch.float32, device=device))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                     out: torch.Tensor | None = None, *, workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
                     use_triton: bool | None = None, x_int8: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Attention of one query token over cached positions < length (scale 1/sqrt(D), fp32 softmax): float32 [H*D].

    q [H, D] float32 or bf16; k_cache/v_cache bf16 [capacity, KVH, D] (query head h reads kv head h // (H/KVH));
    length int32 [1] on the device. Split-K: the grid (KVH, splits) depends on capacity only; each split covers
    cdiv(length, splits) positions rounded up to whole blocks, so all splits work at any length, and the splits
    past the end do nothing. A combine kernel then merges the partials of each query head. `workspace`
    (attention_workspace) lets a caller allocate the partials once; D must be a power of two for Triton.
    x_int8 (int8_groups(1, H*D), D a multiple of 32, Triton only): the combine also writes the output's int8
    groups there (quantized as stored in out's dtype), what the o_proj GEMV then reads (linear_q8(x_int8=...)).
    """
    heads, dim = q.shape
    triton_ok = _triton_ok(q, use_triton) and not dim & (dim - 1)
    if x_int8 is not None and (not triton_ok or dim % 32 or [t.numel() for t in x_int8] != [heads * dim // 4]
                               + 3 * [heads * dim // 32] or not all(t.is_contiguous() for t in x_int8)):
        raise ValueError("decode_attention writes int8 groups on the Triton path only, into int8_groups(1, H*D), "
                         "D a multiple of 32")
    if not triton_ok:
        return decode_attention_torch(q, k_cache, v_cache, length, out)
    kern = _kernels()
    heads, dim = q.shape
    capacity, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    parts, ml = workspace or attention_workspace(heads, dim, capacity, kv_heads, q.device)
    nsplit = parts.shape[1]
    y = out if out is not None else torch.empty(heads * dim, dtype=torch.float32, device=q.device)
    qk_scale = 1.4426950408889634 / math.sqrt(dim)  # log2(e) / sqrt(D): the softmax runs in base 2
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    kern["attn_split"][(kv_heads, nsplit)](q.contiguous(), k_cache, v_cache, length, parts, ml, qk_scale,
                                           k_cache.stride(0), k_cache.stride(1), group, nsplit, D=dim,
                                           GP=max(16, next_pow2(group)), BLOCK=ATTN_BLOCK, num_warps=ATTN_WARPS,
                                           **pdl(q))
    quant = x_int8 if x_int8 is not None else (y,) * 4  # unused pointers where QUANT is off
    kern["attn_combine"][(heads,)](parts, ml, length, y, nsplit, *quant, D=dim, SP=next_pow2(nsplit),
                                   BLOCK=ATTN_BLOCK, QUANT=x_int8 is not None, **pdl(q))
    return y

