"""CPU matmuls over the artifact's bytes in place: the seam between the model code and the kernels.

Three implementations of the same interface:
  - "native" (default where it builds): krasis_run/kernels/native, C + OpenMP; one call per MoE layer
    for the selected experts, one per dense projection, one for attention decode, reading the mapped
    bytes in place with int8-quantized activations for q4/q8 weights (prefill too, so decode and
    prefill compute the same numbers); attention of more than NATIVE_MAX_ROWS queries uses torch's;
  - "torch": torch's packed CPU kernels straight on the mapped bytes (`_weight_int8pack_mm`; and
    `_weight_int4pack_mm_for_cpu` where this torch build's packed layout equals the artifact's CPU
    block layout, which a probe checks at start-up; otherwise q4 experts are dequantized per use);
  - "reference": dequantize to float32 with krasis_run.codecs and multiply; the oracle for tests.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..artifact import RowsStack
from ..codecs import dequant_parts, pack_q4_blocks, q4_group, split_gate_up_output
from ..format import Q4_GROUP
from .attention import causal_attention
from .reference import norm_rope, rms_norm, route

KERNEL_ENV = "KRASIS_KERNEL"  # "native" (default; "torch" if it cannot be built), "torch" or "reference"
NATIVE_MAX_ROWS = int(os.environ.get("KRASIS_NATIVE_MAX_ROWS", "16"))  # longer queries: torch's attention
_warned = False


def _native():
    """The native kernel module if it builds and loads here, else None (with one warning on stderr)."""
    global _warned
    from . import native

    try:
        native.load()
        return native
    except native.NativeUnavailable as e:
        if not _warned:
            _warned = True
            import sys

            print(f"krasis: native CPU kernels unavailable ({e}); using torch kernels", file=sys.stderr)
        return None


@functools.cache
def torch_int4_reads_cpu_blocks() -> bool:
    """True when torch's int4 CPU kernel consumes our q4 CPU blocks unchanged (and computes the same values)."""
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    matmul = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if convert is None or matmul is None:
        return False
    g = torch.Generator().manual_seed(0)
    n, k = 128, 64
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    try:
        if not torch.equal(convert(q, 1).view(torch.uint8).flatten(), pack_q4_blocks(q).flatten()):
            return False
        scale_zero = (torch.rand(k // Q4_GROUP, n, 2, generator=g) * 0.1).to(torch.bfloat16)
        x = torch.randn(3, k, generator=g).to(torch.bfloat16)
        got = matmul(x, pack_q4_blocks(q).view(n, k // 2), Q4_GROUP, scale_zero).float()
    except RuntimeError:
        return False
    parts = {"q": pack_q4_blocks(q), "scale_zero": scale_zero}
    want = x.float() @ dequant_parts("q4", "cpu_blocks", parts).T
    return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))


@dataclass
class _DecodePlan:
    """krs_decode_layers' arguments for one list of layers: the int64 table [L, fields] (its last two columns the
    layers' K/V cache addresses, refreshed when the cache or its storage changes) and the int32 dims."""
    table: torch.Tensor
    dims: torch.Tensor
    cache: object = None
    keys_ptr: int = 0


_ROWS_PARTS = {"q8": ("q", "scale"), "q4": ("q", "scale", "zero"), "bf16": ("w",), "f32": ("w",)}


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"native {what} failed (code {rc})")


def _f32(*tensors: torch.Tensor) -> bool:
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
            return False
    return True


def blocks_group(blocks) -> int:
    """Columns per scale/zero of a q4 CPU-block tensor (its down part's shapes say it); Q4_GROUP otherwise."""
    if blocks.codec != "q4":
        return Q4_GROUP
    width = blocks.matrices["down"][1]
    return q4_group(width, blocks.expert(0, "down")["scale_zero"].shape[0])


class CpuOps:
    """embed / linear / experts on float32 activations; weights are artifact TensorViews (or float tensors)."""

    def __init__(self, kernel: str | None = None):
        requested = kernel or os.environ.get(KERNEL_ENV) or "auto"
        if requested not in ("auto", "native", "torch", "reference"):
            raise ValueError(f"unknown kernel {requested!r} (native, torch or reference)")
        self.native = self._lib = None
        if requested in ("auto", "native"):
            if requested == "native":
                from . import native

                native.load()  # raises NativeUnavailable with the reason
            self.native = _native()
            if self.native is not None:
                self.native.set_threads(torch.get_num_threads())
                # The decode hot path calls the library itself, not through native's wrappers: at ~15 calls a layer
                # their frames and checks were ~4 us of each call's ~8 (dev VM). Attributes are looked up per call
                # (bench_decode --glue swaps some functions on this object).
                self._lib = self.native.load()
        self.kernel = "native" if self.native is not None else ("torch" if requested == "auto" else requested)
        if self.native is None:
            self.decode_layers = None  # the model looks the hook up: without the library it has none to call
        self.int4_in_place = self.kernel in ("torch", "native") and torch_int4_reads_cpu_blocks()
        self._expert_ptrs: dict[int, tuple[object, torch.Tensor, int]] = {}
        # weight -> (weight, native.linear arguments, (codec id, K, N, part addresses) for the direct call)
        self._native_rows: dict[int, tuple[object, tuple | None, tuple | None]] = {}
        self._decode_plans: dict[int, tuple[list, _DecodePlan | None]] = {}  # decode_layers' tables, per layer list

    def describe(self) -> str:
        if self.kernel == "reference":
            return "reference (float32 dequant)"
        if self.kernel == "native":
            return f"native ({self.native.isa()}, {self.native.threads()} threads)"
        return "torch packed" + (" (q4 in place)" if self.int4_in_place else " (q4 dequantized per use)")

    def embed(self, tokens: torch.Tensor, table) -> torch.Tensor:
        w = table.parts["w"]
        if tokens.dim() == 1:  # index_select: the same rows with less set-up than advanced indexing
            return w.index_select(0, tokens).float()
        return w[tokens].float()

    def matmul(self, x: torch.Tensor, codec: str, layout: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """x [M, K] float32 @ W[N, K]^T -> [M, N] float32."""
        if self.native is not None and layout == "rows":
            ws = [parts[p] for p in _ROWS_PARTS[codec]]
            return self.native.linear(codec, x.float().contiguous(), ws[0].shape[0], *ws)
        q4_dequant = codec == "q4" and (not self.int4_in_place or layout == "rows")
        if self.kernel == "reference" or codec == "f32" or q4_dequant:
            return F.linear(x, dequant_parts(codec, layout, parts))
        # The packed kernels take bf16 activations. For bf16 weights (the exact mode) rounding x to
        # bf16 would be the largest error left (~1% in the logits), so x goes in as two bf16 rows,
        # hi + lo, summed after: float32-grade activations for the same weight bytes. Quantized
        # weights carry larger errors of their own, and the second row costs ~35% of GEMV speed.
        m = x.shape[0]
        xb = x.to(torch.bfloat16)
        if codec == "bf16":
            y = F.linear(torch.cat([xb, (x - xb.float()).to(torch.bfloat16)]), parts["w"])
        elif codec == "q8":
            y = torch.ops.aten._weight_int8pack_mm(xb, parts["q"], parts["scale"])
        elif codec == "q4" and layout == "cpu_blocks":  # torch's own 64-row blocks (AVX-512 builds)
            q = parts["q"]
            packed = q.view(q.shape[0] * q.shape[2] * 2, q.shape[1] // 2)
            group = q4_group(q.shape[1], parts["scale_zero"].shape[0])
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group, parts["scale_zero"])
        else:
            raise ValueError(f"no CPU kernel for {codec} in the {layout} layout")
        y = y.float()
        return y[:m] + y[m:] if y.shape[0] > m else y

    def _native_rows_entry(self, w) -> tuple:
        """(w, (codec, rows, *parts) for native.linear or None, (codec id, K, N, *part addresses) or None), cached
        per artifact view: native.linear takes `w` as stored when the arguments are not None."""
        cached = self._native_rows.get(id(w))
        if cached is not None and cached[0] is w:
            return cached
        args = direct = None
        if w.layout == "rows" and w.codec in _ROWS_PARTS:
            ws = [w.parts[p] for p in _ROWS_PARTS[w.codec]]
            args = (w.codec, ws[0].shape[0], *ws)
            q = ws[0]
            if q.dim() == 2 and q.is_contiguous():
                k = q.shape[1] * (2 if w.codec == "q4" else 1)  # q4 rows: two weights a byte
                ptrs = [p.data_ptr() for p in ws] + [None] * (3 - len(ws))
                group = q4_group(k, ws[1].shape[-1]) if w.codec == "q4" else Q4_GROUP
                direct = (self.native.codec_id(w.codec, group), k, q.shape[0], *ptrs)
        entry = self._native_rows[id(w)] = (w, args, direct)
        return entry

    def linear(self, x: torch.Tensor, w) -> torch.Tensor:
        if isinstance(w, RowsStack):
            return self._linear_stack(x, w)
        if self.native is not None:
            if isinstance(w, torch.Tensor):  # plain tensors are checked per call: a cache would keep them alive
                args = ("f32", w.shape[0], w) if w.dim() == 2 and _f32(w) else None
                direct = None
            else:
                _, args, direct = self._native_rows_entry(w)
            if direct is not None and x.dim() == 2 and x.shape[1] == direct[1] and _f32(x):
                y = torch.empty((x.shape[0], direct[2]), dtype=torch.float32)
                _check(self._lib.krs_linear(direct[0], x.data_ptr(), x.shape[0], direct[1], direct[2], direct[3],
                                            direct[4], direct[5], y.data_ptr()), "linear")
                return y
            if args is not None:
                if x.dtype != torch.float32 or not x.is_contiguous():
                    x = x.float().contiguous()
                return self.native.linear(args[0], x, *args[1:])
        if isinstance(w, torch.Tensor):
            return F.linear(x, w)
        return self.matmul(x, w.codec, w.layout, w.parts)

    def _linear_stack(self, x: torch.Tensor, w: RowsStack) -> torch.Tensor:
        """Several matrices against one x, outputs side by side: one native call (krs_linear_multi), else one each."""
        if self.native is not None and x.dim() == 2 and _f32(x):
            direct = self._native_stack_entry(w)
            if direct is not None and x.shape[1] == direct[1]:
                y = torch.empty((x.shape[0], direct[2]), dtype=torch.float32)
                _check(self._lib.krs_linear_multi(direct[0], x.data_ptr(), x.shape[0], direct[1], direct[3], direct[4],
                                                  direct[5], y.data_ptr()), "linear_multi")
                return y
        return torch.cat([self.linear(x, v) for v in w.views], dim=-1)

    def _native_stack_entry(self, w: RowsStack) -> tuple | None:
        """(codec id, K, total rows, count, rows per matrix, part addresses) for krs_linear_multi, cached per stack;
        None unless every matrix is a rows view of one codec and K the native call reads in place."""
        cached = self._native_rows.get(id(w))
        if cached is None or cached[0] is not w:
            entries = [self._native_rows_entry(v)[2] for v in w.views]
            direct = None
            if all(e is not None for e in entries) and len({e[:2] for e in entries}) == 1:
                rows = (ctypes.c_int * len(entries))(*[e[2] for e in entries])
                parts = (ctypes.c_void_p * (3 * len(entries)))(*[p for e in entries for p in e[3:]])
                direct = (entries[0][0], entries[0][1], sum(rows), len(entries), rows, parts)
            cached = self._native_rows[id(w)] = (w, None, direct)
        return cached[2]

    # The small steps between the matmuls (the model picks these up as optional hooks): one native call
    # each where the tensors are already float32 and contiguous (as the native matmuls return them),
    # else the torch reference. At T=1 each replaces 5-10 torch ops per use.
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self.native is not None and x.dim() == 2 and _f32(x, weight) and weight.shape == x.shape[-1:]:
            y = torch.empty_like(x)  # contiguous, as x is; half the cost of torch.empty(shape, dtype=...)
            _check(self._lib.krs_rms_norm(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, y.data_ptr()),
                   "rms_norm")
            return y
        return rms_norm(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x += delta in place, then RMSNorm(x) * weight: the residual add and the next norm in one call (the model
        pairs them), one pass over the row instead of an add, a norm and a new tensor from each."""
        if (self.native is not None and _f32(x, delta, weight) and x.dim() == 2 and delta.shape == x.shape
                and weight.shape == x.shape[-1:]):
            y = torch.empty_like(x)
            _check(self._lib.krs_add_rms_norm(x.data_ptr(), delta.data_ptr(), x.shape[0], x.shape[1],
                                              weight.data_ptr(), eps, y.data_ptr()), "add_rms_norm")
            return y
        x += delta
        return self.rms_norm(x, weight, eps)

    def norm_rope(self, x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.is_cpu and not x.is_contiguous():
            x = x.contiguous()  # a prompt's q or k as columns of a stacked q|k|v projection
        if (self.native is not None and _f32(x, weight, cos, sin) and x.dim() == 3 and weight.shape == x.shape[-1:]
                and cos.shape == sin.shape == (x.shape[0], x.shape[2])):
            y = torch.empty_like(x)
            _check(self._lib.krs_norm_rope(x.data_ptr(), x.shape[0], x.shape[1], x.shape[2], weight.data_ptr(), eps,
                                           cos.data_ptr(), sin.data_ptr(), y.data_ptr()), "norm_rope")
            return y
        return norm_rope(x, weight, eps, cos, sin)

    def route(self, logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.native is not None and _f32(logits) and logits.dim() == 2 and k <= min(64, logits.shape[1]):
            t, e = logits.shape
            ids, wts = torch.empty((t, k), dtype=torch.int32), torch.empty((t, k), dtype=torch.float32)
            _check(self._lib.krs_route(logits.data_ptr(), t, e, k, int(renormalize), ids.data_ptr(), wts.data_ptr()),
                   "route")
            return ids, wts
        return route(logits, k, renormalize)

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Causal attention of q [T, H, D] over the cache's keys/values [S, KVH, D] -> [T, H*D] float32."""
        if (self.native is not None and q.shape[0] <= NATIVE_MAX_ROWS and keys.dtype == torch.bfloat16
                and keys.is_contiguous() and values.is_contiguous() and keys.shape[0] == start_pos + q.shape[0]):
            if not _f32(q):
                q = q.float().contiguous()
            t, nq, hd = q.shape
            y = torch.empty((t, nq * hd), dtype=torch.float32)
            _check(self._lib.krs_attention(q.data_ptr(), t, nq, keys.shape[1], hd, keys.data_ptr(), values.data_ptr(),
                                           start_pos, y.data_ptr()), "attention")
            return y
        return causal_attention(q, keys, values, start_pos)

    def decode_layers(self, layers: list[dict], x: torch.Tensor, h: torch.Tensor, cache, pos: int, cos: torch.Tensor,
                      sin: torch.Tensor, dims: tuple[int, ...], eps: float) -> bool:
        """One token through every layer in one native call (krs_decode_layers): per layer the role -> weight dicts
        the model hands over (attn_norm is not used: h enters normed; qkv_proj, q_norm, k_norm, o_proj, mlp_norm,
        router, experts, next_norm), x [1, H] the residual stream (updated in place), h [1, H] the first layer's
        normed input, replaced by the last norm's output; dims = (H, heads, kv heads, head dim, experts, expert
        width, top k, renormalize). The same kernel calls in the same order as the model's own loop, without the
        Python between them. False (nothing done) where a weight or tensor is not what that call reads."""
        if not (_f32(x, h, cos, sin) and x.shape == h.shape == (1, dims[0])):
            return False
        if cache.device.type != "cpu" or cache.dtype != torch.bfloat16 or cos.shape != (1, dims[3]):
            return False
        plan = self._decode_plan(layers, dims)
        if plan is None:
            return False
        cache.reserve(pos + 1)
        if plan.cache is not cache or plan.keys_ptr != cache.keys[0].data_ptr():  # a new cache, or it grew
            for i in range(len(layers)):
                plan.table[i, -2], plan.table[i, -1] = cache.keys[i].data_ptr(), cache.values[i].data_ptr()
            plan.cache, plan.keys_ptr = cache, cache.keys[0].data_ptr()
        _check(self._lib.krs_decode_layers(plan.table.data_ptr(), len(layers), plan.dims.data_ptr(), eps, pos,
                                           cos.data_ptr(), sin.data_ptr(), x.data_ptr(), h.data_ptr()), "decode_layers")
        return True

    def _decode_plan(self, layers: list[dict], dims: tuple[int, ...]) -> _DecodePlan | None:
        """krs_decode_layers' table for `layers`, cached per list; None when some layer cannot be run by it."""
        cached = self._decode_plans.get(id(layers))
        if cached is not None and cached[0] is layers:
            return cached[1]
        plan = None
        rows = [self._decode_row(layer, dims) for layer in layers]
        if all(r is not None for r in rows):
            table = torch.tensor(rows, dtype=torch.int64)
            if table.shape[1] == self._lib.krs_decode_fields():
                plan = _DecodePlan(table, torch.tensor(dims, dtype=torch.int32))
        self._decode_plans[id(layers)] = (layers, plan)
        return plan

    def _decode_row(self, layer: dict, dims: tuple[int, ...]) -> list[int] | None:
        """One layer's krs_decode_layers fields (the order of krasis_native.c's DL_* enum), or None."""
        hidden, heads, kv_heads, head_dim, experts, width = dims[:6]
        qkv, o_proj, router, blocks = layer["qkv_proj"], layer["o_proj"], layer["router"], layer["experts"]
        if not isinstance(qkv, RowsStack) or isinstance(o_proj, torch.Tensor) or not hasattr(blocks, "expert"):
            return None
        qkv_direct = self._native_stack_entry(qkv)
        o_direct = self._native_rows_entry(o_proj)[2]
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        if (qkv_direct is None or list(qkv_direct[4]) != sizes or qkv_direct[1] != hidden or o_direct is None
                or o_direct[1:3] != (heads * head_dim, hidden)):
            return None
        router_direct = None if isinstance(router, torch.Tensor) else self._native_rows_entry(router)[2]
        if router_direct is None or router_direct[1:3] != (hidden, experts) or router.codec not in ("bf16", "f32"):
            return None  # read in place as one part (runtime.py places routers so for the native kernels)
        if blocks.codec not in ("q4", "q8", "bf16") or tuple(blocks.matrices["down"]) != (hidden, width) \
                or blocks.experts != experts:
            return None
        table, group = self._native_experts(blocks)
        norms = [layer[r] for r in ("q_norm", "k_norm", "mlp_norm", "next_norm")]
        if not all(_f32(n) for n in norms):
            return None
        q_norm, k_norm, mlp_norm, next_norm = (n.data_ptr() for n in norms)
        parts = [p or 0 for p in qkv_direct[5]]
        return [qkv_direct[0], *parts, q_norm, k_norm, o_direct[0], *(p or 0 for p in o_direct[3:6]), mlp_norm,
                router_direct[0], router_direct[3], self.native.codec_id(blocks.codec, group), table.data_ptr(),
                next_norm, 0, 0]

    def _native_expert_table(self, blocks) -> torch.Tensor:
        """[E, 4] int64 addresses of each expert's gate_up and down parts (cached per tensor)."""
        return self._native_experts(blocks)[0]

    def _native_experts(self, blocks) -> tuple[torch.Tensor, int]:
        """(_native_expert_table, blocks_group), cached per tensor: a decode step asks for them in every layer."""
        cached = self._expert_ptrs.get(id(blocks))
        if cached is not None and cached[0] is blocks:
            return cached[1:]
        names = {"q4": ("q", "scale_zero"), "q8": ("q", "scale"), "bf16": ("w", "w")}[blocks.codec]
        rows = []
        for e in range(blocks.experts):
            gate_up, down = blocks.expert(e, "gate_up"), blocks.expert(e, "down")
            rows.append([gate_up[names[0]].data_ptr(), gate_up[names[1]].data_ptr(),
                         down[names[0]].data_ptr(), down[names[1]].data_ptr()])
        table = torch.tensor(rows, dtype=torch.int64)
        self._expert_ptrs[id(blocks)] = (blocks, table, blocks_group(blocks))
        return self._expert_ptrs[id(blocks)][1:]

    def experts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, blocks,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Routed experts from the CPU blocks: tokens grouped by expert, only selected experts are read.
        An id < 0 skips its slot (adds nothing, nothing is read: a hybrid engine marks the experts it runs on
        the GPU with -1); an id >= the expert count raises. `out` (float32 [T, H] contiguous, e.g. a pinned
        buffer) receives the result instead of a new tensor."""
        if self.native is not None:
            hidden, width = blocks.matrices["down"]
            if not _f32(x):
                x = x.float().contiguous()
            if topk_ids.dtype != torch.int32 or not topk_ids.is_contiguous():
                topk_ids = topk_ids.to(torch.int32).contiguous()
            if not _f32(topk_weights):
                topk_weights = topk_weights.float().contiguous()
            table, group = self._native_experts(blocks)
            return self.native.moe(blocks.codec, x, topk_ids, topk_weights, table, hidden, width, blocks.experts,
                                   out=out, group=group)
        t, k = topk_ids.shape
        flat_ids = topk_ids.flatten().long()
        if t and int(flat_ids.max()) >= blocks.experts:
            raise ValueError(f"expert id {int(flat_ids.max())} out of range ({blocks.experts} experts)")
        kept = (flat_ids >= 0).nonzero().flatten()
        order = kept[torch.argsort(flat_ids[kept], stable=True)]
        counts = torch.bincount(flat_ids[kept], minlength=blocks.experts).tolist()
        y_all = torch.zeros_like(x) if out is None else out.zero_()
        start = 0
        for e, count in enumerate(counts):
            if not count:
                continue
            slots = order[start:start + count]
            start += count
            rows = slots // k
            gate_up = self.matmul(x[rows], blocks.codec, "cpu_blocks", blocks.expert(e, "gate_up"))
            gate, up = split_gate_up_output(gate_up)
            y = self.matmul(F.silu(gate) * up, blocks.codec, "cpu_blocks", blocks.expert(e, "down"))
            y_all.index_add_(0, rows, (y * topk_weights.flatten()[slots, None]).to(y_all.dtype))
        return y_all
