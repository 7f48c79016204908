"""Per-layer decode glue fused into one Triton kernel each: RMSNorm (x -> normalized, cast), the MoE router
(logits -> softmax -> top k -> optional renormalization), and the attention inputs (q/k per-head RMSNorm +
rotary, k and v written to the KV cache row). In a captured decode step every launch costs ~3 us
even inside a CUDA graph, and the torch versions of these two issue several kernels each (square, mean,
rsqrt, two muls, cast; softmax, topk, sum, div), 48 layers over.

Both are graph-capturable: the grid is one program per row (M rows, from the shape), outputs can be caller
provided static buffers (`out`, `ids_out`/`weights_out`), and nothing reads a value back to the host.
Each has a torch reference in krasis_run.models.base (rms_norm, route) that it must equal; it falls back to
that off CUDA or without Triton, and use_triton=True forces the kernel (CPU tensors under TRITON_INTERPRET=1,
as the tests do).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .decode_gpu import next_pow2, pdl
from .reference import norm_rope, rms_norm, route

# Rows up to this many columns are held in registers in one pass (x read once); wider rows loop over blocks
# of this size twice (sum of squares, then scale and store). 8192 covers every hidden size we run.
RMS_MAX_BLOCK = 8192


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
    def rms_norm_kernel(x_ptr, w_ptr, out_ptr, H, x_row, out_row, eps, BLOCK: tl.constexpr,
                        ONE_PASS: tl.constexpr, PDL: tl.constexpr):
        # one row: x * rsqrt(mean(x^2) + eps) * w in float32 (the reference's order of operations), then the cast
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        x_ptr += row * x_row
        out_ptr += row * out_row
        cols = tl.arange(0, BLOCK)
        if ONE_PASS:
            mask = cols < H
            x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + cols, (x * r * w).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, H, BLOCK):
                x = tl.load(x_ptr + start + cols, mask=start + cols < H, other=0.0).to(tl.float32)
                acc += x * x
            r = tl.rsqrt(tl.sum(acc, 0) / H + eps)
            for start in range(0, H, BLOCK):  # the second read of the row mostly hits L1/L2
                mask = start + cols < H
                x = tl.load(x_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(out_ptr + start + cols, (x * r * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def route_kernel(logits_ptr, ids_ptr, w_ptr, E, l_row, ids_row, w_row, K: tl.constexpr,
                     RENORM: tl.constexpr, BLOCK_E: tl.constexpr, KP: tl.constexpr, PDL: tl.constexpr):
        # one token: softmax over the E experts in float32, then K rounds of (max with its index, record, mask out)
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_E)
        emask = cols < E
        logits = tl.load(logits_ptr + row * l_row + cols, mask=emask, other=float("-inf")).to(tl.float32)
        top_ids, top_w = _top_k(logits, cols, emask, K, RENORM, KP)
        slots = tl.arange(0, KP)
        kmask = slots < K
        tl.store(ids_ptr + row * ids_row + slots, top_ids.to(ids_ptr.dtype.element_ty), mask=kmask)
        tl.store(w_ptr + row * w_row + slots, top_w, mask=kmask)

    @triton.jit
    def router_kernel(x_ptr, w_ptr, logits_ptr, ticket_ptr, ids_ptr, wts_ptr, take_ptr, xs_ptr, ids_s_ptr, wts_s_ptr,
                      H, E, K: tl.constexpr, RENORM: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_E: tl.constexpr, KP: tl.constexpr, STAGE: tl.constexpr, PDL: tl.constexpr):
        # one token: ROWS router rows (logits) a program; the last program to finish (a ticket: an atomic counter
        # it re-arms) takes the top k of all E logits, as route_kernel. STAGE: it also hands the CPU its share of
        # the layer (into pinned host memory the GPU writes over PCIe): x in float32, the ids with those the GPU
        # takes (take_ptr[id] != 0) as -1, and the weights.
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask = rows < E
        acc = tl.zeros([ROWS, BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hcols = h0 + tl.arange(0, BLOCK_H)
            hmask = hcols < H
            x = tl.load(x_ptr + hcols, mask=hmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * H + hcols[None, :],
                        mask=rmask[:, None] & hmask[None, :], other=0.0).to(tl.float32)
            acc += w * x[None, :]
        tl.store(logits_ptr + rows, tl.sum(acc, 1), mask=rmask)
        tl.debug_barrier()  # every thread's logits stored before the release below
        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            ecols = tl.arange(0, BLOCK_E)
            emask = ecols < E
            # from L2 (.cg): the other programs' logits, written from other SMs
            logits = tl.load(logits_ptr + ecols, mask=emask, other=float("-inf"), cache_modifier=".cg")
            top_ids, top_w = _top_k(logits, ecols, emask, K, RENORM, KP)
            slots = tl.arange(0, KP)
            kmask = slots < K
            tl.store(ids_ptr + slots, top_ids.to(ids_ptr.dtype.element_ty), mask=kmask)
            tl.store(wts_ptr + slots, top_w, mask=kmask)
            if STAGE:
                take = tl.load(take_ptr + top_ids, mask=kmask, other=0)
                tl.store(ids_s_ptr + slots, tl.where(take != 0, -1, top_ids), mask=kmask)
                tl.store(wts_s_ptr + slots, top_w, mask=kmask)
                for x0 in range(0, H, BLOCK_H):
                    xcols = x0 + tl.arange(0, BLOCK_H)
                    xmask = xcols < H
                    tl.store(xs_ptr + xcols, tl.load(x_ptr + xcols, mask=xmask, other=0.0).to(tl.float32), mask=xmask)
            tl.atomic_xchg(ticket_ptr, 0)  # re-armed for the next call

    @triton.jit
    def _top_k(logits, cols, emask, K: tl.constexpr, RENORM: tl.constexpr, KP: tl.constexpr):
        p = tl.exp(logits - tl.max(logits, 0))  # padding lanes: exp(-inf) = 0
        # probabilities are >= 0, so -1 marks padding and already-chosen lanes: never picked while a real one is left
        probs = tl.where(emask, p / tl.sum(p, 0), -1.0)
        slots = tl.arange(0, KP)
        top_w = tl.zeros([KP], dtype=tl.float32)
        top_ids = tl.zeros([KP], dtype=tl.int32)
        for j in tl.static_range(K):
            # ties go to the lowest index, as torch.topk on CUDA usually does
            best_w, best = tl.max(probs, 0, return_indices=True, return_indices_tie_break_left=True)
            top_w = tl.where(slots == j, best_w, top_w)
            top_ids = tl.where(slots == j, best, top_ids)
            probs = tl.where(cols == best, -1.0, probs)
        if RENORM:
            top_w = top_w / tl.sum(top_w, 0)  # slots >= K hold 0
        return top_ids, top_w

    @triton.jit
    def add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, H, x_row, d_row, out_row, eps, xq_ptr, dx_ptr, sx_ptr,
                            fs_ptr, BLOCK: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr):
        # one row: the residual add x += delta (in place, float32), then RMSNorm of the sum into out; QUANT: also
        # the int8 groups of that output (decode_gpu's quantize_x_kernel's), which the MoE's gate_up then reads
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(x_ptr + row * x_row + cols, mask=mask, other=0.0).to(tl.float32)
        x += tl.load(d_ptr + row * d_row + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + row * x_row + cols, x, mask=mask)
        r = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x * r * w).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * out_row + cols, y, mask=mask)
        if QUANT:
            _quantize_store(tl.reshape(y.to(tl.float32), [BLOCK // 32, 4, 8]), row, H // 32, xq_ptr, dx_ptr, sx_ptr,
                            fs_ptr, BLOCK // 32)

    @triton.jit
    def norm_rope_store_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_out_ptr, keys_ptr,
                               values_ptr, pos_ptr, NQ, NKV, eps, HALF: tl.constexpr, PDL: tl.constexpr):
        # one head per program: q heads -> q_out; k heads -> the cache row at pos (both normed and rotated as in
        # the prefill's norm_rope kernel); v heads copied to that row
        if PDL:  # launched early (programmatic dependent launch): wait until the kernel before is done
            tl.extra.cuda.gdc_wait()
        h = tl.program_id(0)
        row = tl.load(pos_ptr).to(tl.int64) * NKV
        if h < NQ + NKV:
            if h < NQ:
                src, w_ptr, dst = q_ptr + h * 2 * HALF, qw_ptr, q_out_ptr + h * 2 * HALF
            else:
                src, w_ptr, dst = k_ptr + (h - NQ) * 2 * HALF, kw_ptr, keys_ptr + (row + h - NQ) * 2 * HALF
            cols = tl.arange(0, HALF)
            x1 = tl.load(src + cols).to(tl.float32)
            x2 = tl.load(src + HALF + cols).to(tl.float32)
            inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * HALF) + eps)
            y1 = x1 * inv * tl.load(w_ptr + cols).to(tl.float32)
            y2 = x2 * inv * tl.load(w_ptr + HALF + cols).to(tl.float32)
            c1, c2 = tl.load(cos_ptr + cols), tl.load(cos_ptr + HALF + cols)
            s1, s2 = tl.load(sin_ptr + cols), tl.load(sin_ptr + HALF + cols)
            tl.store(dst + cols, (y1 * c1 - y2 * s1).to(tl.bfloat16))
            tl.store(dst + HALF + cols, (y2 * c2 + y1 * s2).to(tl.bfloat16))
        else:
            full = tl.arange(0, 2 * HALF)
            v = tl.load(v_ptr + (h - NQ - NKV) * 2 * HALF + full)
            tl.store(values_ptr + (row + h - NQ - NKV) * 2 * HALF + full, v.to(tl.bfloat16))

    # the interpreter runs a kernel's source in this module's globals, without the closure: the helper goes there
    from .decode_gpu import _kernels as gpu_kernels

    _quantize_store = gpu_kernels()["_quantize_store"]  # the q4 MoE's input groups, defined beside their reader
    globals().update(_top_k=_top_k, _quantize_store=_quantize_store)
    return {"rms_norm": rms_norm_kernel, "route": route_kernel, "add_rms_norm": add_rms_norm_kernel,
            "norm_rope_store": norm_rope_store_kernel, "router": router_kernel}


def _triton_ok(t: torch.Tensor, use_triton: bool | None) -> bool:
    return (t.is_cuda if use_triton is None else use_triton) and _kernels() is not None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (a row-strided view, e.g. a slice of a static buffer, passes through uncopied)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_out(name: str, out: torch.Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> None:
    # shapes and dtypes only: checking them reads no device value, so it is safe during graph capture
    if tuple(out.shape) != shape or out.dtype not in dtypes or out.stride(-1) != 1:
        raise ValueError(f"{name} must be {' or '.join(map(str, dtypes))} {list(shape)} with unit column stride, "
                         f"got {out.dtype} {list(out.shape)} strides {out.stride()}")


# ---------------------------------------------------------------- RMSNorm


def rms_norm_decode(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype = torch.bfloat16,
                    out: torch.Tensor | None = None, *, use_triton: bool | None = None) -> torch.Tensor:
    """x [M, H] (float32) -> x * rsqrt(mean(x^2) + eps) * weight in out_dtype (bf16 or float32), into `out` if
    given (its dtype must be out_dtype). Equals krasis_run.models.base.rms_norm(x, weight, eps).to(out_dtype).

    One program per row; rows up to RMS_MAX_BLOCK wide are normalized from registers in one pass.
    """
    m, h = x.shape
    if out is not None:
        _check_out("out", out, (m, h), (out_dtype,))
    if not _triton_ok(x, use_triton):
        y = rms_norm(x, weight, eps).to(out_dtype)
        return y if out is None else out.copy_(y)
    y = out if out is not None else torch.empty(m, h, dtype=out_dtype, device=x.device)
    x = _rows(x)
    block = next_pow2(h)
    one_pass = block <= RMS_MAX_BLOCK
    block = min(block, RMS_MAX_BLOCK)
    # ~16 columns a thread: 4 warps at H=2048, 16 at 8192 (a guess; scripts/bench_decode_kernels.py times it)
    warps = max(1, min(16, block // 512))
    _kernels()["rms_norm"][(m,)](x, weight.contiguous(), y, h, x.stride(0), y.stride(0), eps, BLOCK=block,
                                 ONE_PASS=one_pass, num_warps=warps, **pdl(x))
    return y


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 out_dtype: torch.dtype = torch.bfloat16, *, use_triton: bool | None = None,
                 x_int8: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """The residual add and the next norm in one pass: x [M, H] float32 += delta (in place), returns
    rms_norm(x, weight, eps) in out_dtype. Two kernels fewer per add than torch (add, then the norm). `x_int8`
    (decode_gpu.int8_groups; bf16 output, H a multiple of 32, Triton only): the kernel also writes the output's
    int8 groups there, what decode_gpu.moe_decode(x_int8=...) reads instead of quantizing them itself."""
    m, h = x.shape
    if not _triton_ok(x, use_triton) or next_pow2(h) > RMS_MAX_BLOCK or x.stride(-1) != 1 or x.dtype != torch.float32:
        if x_int8 is not None:
            raise ValueError("add_rms_norm writes int8 groups on the Triton path only")
        x += delta
        return rms_norm(x, weight, eps).to(out_dtype)
    if x_int8 is not None and (out_dtype != torch.bfloat16 or h % 32 or [t.numel() for t in x_int8] != [m * h // 4]
                               + 3 * [m * h // 32] or not all(t.is_contiguous() for t in x_int8)):
        raise ValueError("int8 groups are written from a bf16 output with H a multiple of 32, into int8_groups(M, H)")
    y = torch.empty(m, h, dtype=out_dtype, device=x.device)
    delta = _rows(delta)
    block = next_pow2(h)
    quant = x_int8 if x_int8 is not None else (y,) * 4  # unused pointers where QUANT is off
    _kernels()["add_rms_norm"][(m,)](x, delta, weight.contiguous(), y, h, x.stride(0), delta.stride(0), y.stride(0),
                                     eps, *quant, BLOCK=block, QUANT=x_int8 is not None,
                                     num_warps=max(1, min(16, block // 512)), **pdl(x))
    return y


# ---------------------------------------------------------------- router


def route_decode(logits: torch.Tensor, k: int, renormalize: bool, ids_out: torch.Tensor | None = None,
                 weights_out: torch.Tensor | None = None, *,
                 use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE router for a few tokens: logits [M, E] -> (ids [M, k], weights float32 [M, k]), the k most probable
    experts of each token in descending order of softmax probability (fp32), optionally renormalized to sum 1.
    Equals krasis_run.models.base.route(logits, k, renormalize) up to exact ties, which this kernel breaks
    towards the lower expert id (as torch.topk on CUDA usually does).

    ids are int64 by default: that is what route (torch.topk) returns, and what torch indexing downstream expects
    without a conversion kernel. A provided ids_out may also be int32 (the kernel stores in its dtype).
    """
    m, e = logits.shape
    if not 1 <= k <= e:
        raise ValueError(f"top-k of {k} out of {e} experts")
    if ids_out is not None:
        _check_out("ids_out", ids_out, (m, k), (torch.int64, torch.int32))
    if weights_out is not None:
        _check_out("weights_out", weights_out, (m, k), (torch.float32,))
    if not _triton_ok(logits, use_triton):
        ids, weights = route(logits, k, renormalize)
        return (ids if ids_out is None else ids_out.copy_(ids),
                weights if weights_out is None else weights_out.copy_(weights))
    ids = ids_out if ids_out is not None else torch.empty(m, k, dtype=torch.int64, device=logits.device)
    weights = weights_out if weights_out is not None else torch.empty(m, k, dtype=torch.float32, device=logits.device)
    logits = _rows(logits)
    block_e = next_pow2(e)
    # few warps: the k rounds are k cross-lane reductions in a row, and each extra warp adds a shared-memory step
    warps = max(1, min(4, block_e // 256))
    _kernels()["route"][(m,)](logits, ids, weights, e, logits.stride(0), ids.stride(0), weights.stride(0), K=k,
                              RENORM=bool(renormalize), BLOCK_E=block_e, KP=next_pow2(k), num_warps=warps,
                              **pdl(logits))
    return ids, weights


# ---------------------------------------------------------------- attention inputs


def norm_rope_store_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                           k_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                           values: torch.Tensor, pos: torch.Tensor, *, use_triton: bool | None = None) -> torch.Tensor:
    """One token's attention inputs in one kernel instead of ~4 (two norm + rotary passes, two cache writes):
    q [1, NQ, D] and k [1, NKV, D] per-head RMSNorm + rotary (models.base.norm_rope), the rotated k and v [1, NKV,
    D] written to row `pos` (a device int64 [1]: a captured step serves every position) of keys/values [capacity,
    NKV, D] -> the rotated q in bf16. cos/sin [1, D] float32 are that position's rotary rows."""
    t, nq, d = q.shape
    nkv = k.shape[1]
    fits = (t == 1 and d & (d - 1) == 0 and d >= 32 and keys.is_contiguous() and values.is_contiguous()
            and keys.shape[1:] == values.shape[1:] == (nkv, d) and cos.shape == sin.shape == (1, d)
            and keys.dtype == values.dtype == q.dtype == k.dtype == torch.bfloat16 and q_weight.dtype == k_weight.dtype
            and all(x.stride(-1) == 1 and x.stride(-2) == d for x in (q, k, v))
            and cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous())
    if not (fits and _triton_ok(q, use_triton)):
        q_out = norm_rope(q, q_weight, eps, cos, sin).to(torch.bfloat16)
        keys.index_copy_(0, pos, norm_rope(k, k_weight, eps, cos, sin).to(keys.dtype))
        values.index_copy_(0, pos, v.to(values.dtype))
        return q_out
    q_out = torch.empty(1, nq, d, dtype=torch.bfloat16, device=q.device)
    _kernels()["norm_rope_store"][(nq + 2 * nkv,)](q, k, v, q_weight.contiguous(), k_weight.contiguous(), cos, sin,
                                                   q_out, keys, values, pos, nq, nkv, eps, HALF=d // 2, num_warps=1,
                                                   **pdl(q))
    return q_out


# ---------------------------------------------------------------- router projection + top k


# one router row a program, read in one step (E = 128, H = 2048: 128 programs of 8 KB, two warps): 4 rows a program
# in steps of 512 columns measured 8.6 us a call on the H200 (run 25), as slow as the four kernels it replaced
ROUTER_ROWS = 1
ROUTER_MAX_BLOCK = 4096
ROUTER_WARPS = 2


def router_decode(x: torch.Tensor, weight: torch.Tensor, k: int, renormalize: bool, ticket: torch.Tensor,
                  stage: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  take: torch.Tensor | None = None, *,
                  use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token's routing in one kernel instead of four (x to float32, the projection's two cuBLAS kernels, top k):
    x [1, H] (bf16 or float32) and the router weight [E, H] -> route(x @ weight.T in float32, k, renormalize):
    ids int64 [1, k], weights float32 [1, k]. `ticket` is an int32 [1] zero the kernel uses and leaves at zero.

    stage = (x_out float32 [1, H], ids_out int32 [1, k], weights_out float32 [1, k]) also hands a CPU its share of
    the layer: x, the ids with those where take[id] (bool [E]) is set replaced by -1 (the GPU computes those),
    and the weights; for a GPU engine these are device views of pinned host memory, written over PCIe."""
    m, h = x.shape
    e = weight.shape[0]
    if m != 1 or weight.shape[1] != h or not 1 <= k <= e:
        raise ValueError(f"router_decode takes one token [1, {weight.shape[1]}] and top-k <= {e}, got {list(x.shape)}")
    if stage is not None and (take is None or take.shape != (e,)):
        raise ValueError(f"staging the CPU's inputs needs take, a bool tensor of the {e} experts")
    if not _triton_ok(x, use_triton):
        ids, weights = route(F.linear(x.float(), weight.float()), k, renormalize)
        if stage is not None:
            stage[0].copy_(x.float())
            stage[1].copy_(torch.where(take[ids], -1, ids).to(stage[1].dtype))
            stage[2].copy_(weights)
        return ids, weights
    ids = torch.empty(1, k, dtype=torch.int64, device=x.device)
    weights = torch.empty(1, k, dtype=torch.float32, device=x.device)
    logits = torch.empty(e, dtype=torch.float32, device=x.device)
    xs, ids_s, wts_s = stage if stage is not None else (weights, ids, weights)  # unused without STAGE
    take = take if take is not None else ids
    _kernels()["router"][(-(-e // ROUTER_ROWS),)](
        _rows(x), weight.contiguous(), logits, ticket, ids, weights, take, xs, ids_s, wts_s, h, e, K=k,
        RENORM=bool(renormalize), ROWS=ROUTER_ROWS, BLOCK_H=min(ROUTER_MAX_BLOCK, next_pow2(h)), BLOCK_E=next_pow2(e),
        KP=next_pow2(k), STAGE=stage is not None, num_warps=ROUTER_WARPS, **pdl(x))
    return ids, weights
