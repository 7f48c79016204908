"""GPU streaming prefill: the whole prompt goes through one layer at a time while the next layers'
experts stream from the mapped artifact into VRAM, the copy hidden under the current layer's compute.

Each expert layer crosses PCIe at most once per prefill, however long the prompt: all prompt tokens
pass through a layer before the next layer's weights are needed (tokens are chunked inside a layer only
to bound activation memory: the expert step in planner.expert_token_chunk slices, and optionally the attention half,
`token_chunk`). Dense weights and as many whole expert layers as the budget allows stay resident. K/V go into
the cache the caller hands in: the hybrid decode engine's, in VRAM, or a pinned CPU cache (copied as each
layer finishes) when the CPU engine decodes.

The same code runs on the CPU (device="cpu", no streams, torch reference dequant, a loop instead
of the grouped GEMM): that is the path CI tests.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .artifact import Artifact
from .codecs import TORCH_DTYPES, dequant_parts
from .format import SECTION_EXPERTS_CPU, SECTION_EXPERTS_GPU
from .kernels.activation import silu_mul
from .kernels.decode_glue import add_rms_norm, rms_norm_decode, route_decode
from .kernels.decode_gpu import linear_q8
from .kernels.dequant import dequant_experts
from .kernels.moe_combine import moe_combine
from .kernels.norm_rope import fused_norm_rope
from .kernels.reference import norm_rope, rms_norm
from .planner import (
    DEQUANT_KEPT,
    DEQUANT_SLICE_BYTES,
    EXPERT_TOKEN_CHUNK,
    expert_token_chunk,
    gpu_keeps_quantized,
    stack_qkv,
)

HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly
GEMV_ROWS = 4  # inputs of at most this many rows (decode steps) read a q8 matrix as stored; longer ones dequantize it


@dataclass
class Q8Rows:
    """A dense q8 matrix as the artifact stores it, in VRAM: int8 rows q [N, K] and a bf16 scale per row (w = q *
    scale), half the bytes of bf16. A decode step reads it as is (kernels.decode_gpu.linear_q8); a prompt's GEMM
    takes it dequantized to bf16 DEQUANT_SLICE_BYTES at a time (each weight the bf16 rounding of q * scale, as a
    whole-matrix dequant gives). `codec`, `layout` and `parts` read as an artifact view's do (codecs.dequant_parts)."""

    q: torch.Tensor
    scale: torch.Tensor
    codec = "q8"
    layout = "rows"

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        return {"q": self.q, "scale": self.scale}

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def rows_bf16(self, start: int, end: int) -> torch.Tensor:
        return self.q[start:end] * self.scale[start:end, None]  # int8 * bf16 -> bf16, the product in float32


@dataclass
class LayerSource:
    """Where one layer's experts lie in the file: one contiguous chunk, parts addressed inside it."""

    layer: int
    offset: int
    length: int
    layout: str
    parts: dict[str, tuple[int, str, list[int], int]]  # name -> (offset in chunk, dtype, shape, expert stride)


def expert_sources(artifact: Artifact, section: str) -> dict[int, LayerSource]:
    sources = {}
    for name, spec in artifact.header["tensors"].items():
        chunk = artifact.chunks[spec["chunk"]]
        if chunk.section != section:
            continue
        src = sources.setdefault(chunk.layer, LayerSource(chunk.layer, chunk.offset, chunk.length, spec["layout"], {}))
        base = spec["offset"] - chunk.offset
        for part, p in spec["parts"].items():
            if spec.get("experts"):  # CPU blocks: the same part in every expert, expert_stride apart
                shape = [spec["experts"], *p["shape"]]
                src.parts[part] = (base + p["offset"], p["dtype"], shape, spec["expert_stride"])
            else:
                matrix = "gate_up" if name.endswith("gate_up") else "down"
                src.parts[f"{matrix}.{part}"] = (base + p["offset"], p["dtype"], p["shape"], 0)
    return sources


def part_views(buffer: torch.Tensor, src: LayerSource) -> dict[str, dict[str, torch.Tensor]]:
    """Typed views of the parts inside a layer's bytes (host mapping or device buffer), per matrix."""
    out: dict[str, dict[str, torch.Tensor]] = {"gate_up": {}, "down": {}}
    for name, (offset, dtype, shape, stride) in src.parts.items():
        matrix, part = name.split(".", 1)
        dt = TORCH_DTYPES[dtype]
        if stride:  # [E, ...] with a byte stride between experts
            e, *inner = shape
            nbytes = torch.Size(inner).numel() * dt.itemsize
            rows = buffer[offset:offset + (e - 1) * stride + nbytes]
            view = rows.as_strided((e, nbytes), (stride, 1)).view(dt) if e > 1 else rows.view(1, nbytes).view(dt)
            out[matrix][part] = view.reshape(e, *inner)
        else:
            nbytes = torch.Size(shape).numel() * dt.itemsize
            out[matrix][part] = buffer[offset:offset + nbytes].view(dt).view(shape)
    return out


class ExpertStreamer:
    """Resident layers live in VRAM; the others cycle through `depth` device buffers on a copy stream."""

    def __init__(self, artifact: Artifact, section: str, device: torch.device, resident: set[int], depth: int = 2):
        self.device, self.sources = device, expert_sources(artifact, section)
        self.layers = sorted(self.sources)
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.host = {i: self._host_view(artifact, s) for i, s in self.sources.items()}
        self.registered: list[int] = []
        self.resident = {i: self.host[i].to(device) for i in sorted(resident & set(self.layers))}
        streamed = [i for i in self.layers if i not in self.resident]
        size = max((self.sources[i].length for i in streamed), default=0)
        self.buffers = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(min(depth, len(streamed)))]
        self.streamed = streamed
        if self.cuda and streamed:
            self._register(streamed)
        self.ready: dict[int, tuple[torch.Tensor, object]] = {}
        self.free_events: list[object] = [None] * len(self.buffers)
        self.bytes_copied = 0
        self.copy_events: list[tuple] = []  # (start, done) CUDA events of this prefill's copies

    @staticmethod
    def _host_view(artifact: Artifact, src: LayerSource) -> torch.Tensor:
        return torch.frombuffer(artifact._mm, dtype=torch.uint8, count=src.length, offset=src.offset)

    def _register(self, layers: list[int]) -> None:
        """Pin the streamed ranges of the mapping in place, so copies run at full PCIe speed with no staging."""
        cudart = torch.cuda.cudart()
        failed = False
        for i in layers:
            view = self.host[i]
            if int(cudart.cudaHostRegister(view.data_ptr(), view.numel(), HOST_REGISTER_READ_ONLY)) == 0:
                self.registered.append(view.data_ptr())
            else:  # not pinnable (RLIMIT_MEMLOCK, unsupported mapping): pageable copies still work, slower
                failed = True
        if failed:
            _clear_cuda_error(self.device)

    def close(self) -> None:
        """Unpin before the mapping can go away (the views in self.host keep it mapped until then)."""
        if self.registered:
            cudart = torch.cuda.cudart()
            for ptr in self.registered:
                cudart.cudaHostUnregister(ptr)
            self.registered = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass

    def _issue(self, slot: int) -> None:
        """Start copying the slot-th streamed layer into buffer slot % depth once that buffer is free."""
        if slot >= len(self.streamed):
            return
        layer, b = self.streamed[slot], slot % len(self.buffers)
        src, buf = self.host[layer], self.buffers[b][: self.sources[layer].length]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if self.free_events[b] is not None:
                    self.copy_stream.wait_event(self.free_events[b])
                start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                buf.copy_(src, non_blocking=True)
                done.record()
            self.ready[layer] = (buf, (start, done))
        else:
            buf.copy_(src)
            self.ready[layer] = (buf, None)
        self.bytes_copied += src.numel()

    def begin(self) -> None:
        self.ready.clear()
        self.free_events = [None] * len(self.buffers)
        self.bytes_copied, self.copy_events = 0, []
        for slot in range(len(self.buffers)):
            self._issue(slot)

    def get(self, layer: int) -> dict[str, dict[str, torch.Tensor]]:
        if layer in self.resident:
            return part_views(self.resident[layer], self.sources[layer])
        buf, events = self.ready[layer]
        if events is not None:
            torch.cuda.current_stream(self.device).wait_event(events[1])
            self.copy_events.append(events)
        return part_views(buf, self.sources[layer])

    def release(self, layer: int) -> None:
        """The layer's buffer may be overwritten once the compute issued so far is done."""
        if layer in self.resident:
            return
        slot = self.streamed.index(layer)
        b = slot % len(self.buffers)
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.free_events[b] = event
        self.ready.pop(layer, None)
        self._issue(slot + len(self.buffers))

    def copy_time(self) -> float:
        """Seconds the copy engine spent (sum of the copies), valid after synchronize."""
        return sum(s.elapsed_time(e) for s, e in self.copy_events) / 1e3


def _clear_cuda_error(device: torch.device) -> None:
    """A failed runtime call leaves its error pending; torch would report it at its next kernel launch.
    The first launch check surfaces it, and that clears it."""
    try:
        torch.zeros(1, device=device).add_(1)
        torch.cuda.synchronize(device)
    except RuntimeError:
        pass


@dataclass
class ExpertHandle:
    streamer: ExpertStreamer
    layer: int


@dataclass
class PrefillStats:
    tokens: int = 0
    seconds: float = 0.0
    bytes_streamed: int = 0
    copy_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


@functools.cache
def _mm_out_float32() -> bool:
    """Whether this torch multiplies bf16 matrices into a float32 result (torch.mm's out_dtype, CUDA)."""
    try:
        x = torch.ones(16, 16, dtype=torch.bfloat16, device="cuda")
        return torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


class GpuOps:
    """The kernels interface of krasis_run.kernels.cpu.CpuOps, for weights and activations on `device`."""

    def __init__(self, device: torch.device, codec: str, layout: str, exact: bool):
        self.device, self.codec, self.layout, self.exact = device, codec, layout, exact
        self.grouped_mm = device.type == "cuda" and hasattr(torch, "_grouped_mm")
        self._embed_rows: torch.Tensor | None = None  # pinned host rows of the last prompt's embeddings
        self.routing_counts: dict[int, torch.Tensor] = {}  # layer -> picks per expert in the last prefill
        # tokens per grouped-GEMM pass: bounds the [T*k, 2I] intermediate (planner.py sizes it); the engine sets it
        # from the model's experts and top k
        self.expert_chunk = EXPERT_TOKEN_CHUNK
        # called as hook(layer, parts, counts) while a streamed layer's experts are in VRAM, after its routing: the
        # decode engine keeps its hot experts from there (a copy in VRAM instead of a second trip over PCIe)
        self.streamed_hooks: list = []
        self._bf16_memo: tuple | None = None  # (x, bf16 copy) of the last activation converted (x kept alive)
        self._dequantized: dict[int, tuple[Q8Rows, torch.Tensor]] = {}  # id -> (q8 matrix, bf16), oldest first

    def _bf16(self, x: torch.Tensor) -> torch.Tensor:
        """x in bf16, converted once: the q/k/v projections share one normed input. By identity: the model never
        writes into a tensor it passes to ops (inference tensors have no version counter to check)."""
        if x.dtype == torch.bfloat16:
            return x
        memo = self._bf16_memo
        if memo is not None and memo[0] is x:
            return memo[1]
        xb = x.to(torch.bfloat16)
        self._bf16_memo = (x, xb)
        return xb

    def embed(self, tokens: torch.Tensor, table) -> torch.Tensor:
        """The prompt's rows gathered on the host (the table stays in the mapping), into a pinned buffer kept
        between prefills: a pageable 128 MB copy at 32K tokens ran at ~8 GB/s, pinned at PCIe speed."""
        w = table.parts["w"]
        if self.device.type != "cuda":
            return w[tokens].to(self.device).float()
        if self._embed_rows is None or self._embed_rows.shape[0] < tokens.shape[0]:
            self._embed_rows = torch.empty(tokens.shape[0], w.shape[1], dtype=w.dtype, pin_memory=True)
        rows = torch.index_select(w, 0, tokens, out=self._embed_rows[: tokens.shape[0]])
        return rows.to(self.device, non_blocking=True).float()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """One Triton pass straight to bf16 (what every consumer of a normed input takes, the float32 router
        aside): at 32K tokens the torch version's five kernels and the bf16 conversion after it moved ~2 GB a
        norm. Exact (bf16) artifacts keep the float32 reference."""
        if self.exact or not x.is_cuda:
            return rms_norm(x, weight, eps)
        return rms_norm_decode(x.float(), weight, eps, out_dtype=torch.bfloat16)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x += delta in place, then the norm (one pass on CUDA; x is the model's own residual stream)."""
        if self.exact or not x.is_cuda:
            x += delta
            return self.rms_norm(x, weight, eps)
        return add_rms_norm(x, delta, weight, eps, out_dtype=torch.bfloat16)

    def linear(self, x: torch.Tensor, w: torch.Tensor | Q8Rows) -> torch.Tensor:
        if isinstance(w, Q8Rows):
            if x.is_cuda and x.shape[0] <= GEMV_ROWS:
                return linear_q8(x, w.q, w.scale)
            return self._linear_dequant(self._bf16(x), w)
        if w.dtype == torch.float32:  # the router: routing decisions in float32, as in the reference
            return self._router_logits(x, w)
        xb = self._bf16(x)
        if self.exact:  # bf16 weights: keep float32-grade activations (hi + lo), as the CPU path does
            m = x.shape[0]
            y = F.linear(torch.cat([xb, (x - xb.float()).to(torch.bfloat16)]), w).float()
            return y[:m] + y[m:]
        # Projections stay bf16: the residual stream (float32) promotes on addition, norms upcast on entry.
        # Converting every [T, 4096] output to float32 and back cost more than the GEMMs at 32K tokens.
        return F.linear(xb, w)

    def route(self, logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax and top k, one Triton program a token on CUDA (torch's softmax + topk took 0.8 ms a layer for
        32K tokens of 512 experts); the reference in torch elsewhere. Equal up to exact ties."""
        return route_decode(logits, k, renormalize)

    def _router_logits(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w^T in float32. A bf16 x (the normed stream of a prompt) takes w as hi + lo bf16 halves in one GEMM
        with float32 output: within ~2^-17 of the float32 product (w's rounding left over) at bf16 GEMM speed (the
        float32 GEMM took 1.4 ms a layer at 32K tokens on Qwen3-Coder-Next's 512 experts)."""
        if self.exact or not x.is_cuda or x.dtype != torch.bfloat16 or x.dim() != 2 or not _mm_out_float32():
            return F.linear(x.float(), w)
        hi = w.to(torch.bfloat16)
        both = torch.mm(x, torch.cat([hi, (w - hi.float()).to(torch.bfloat16)]).t(), out_dtype=torch.float32)
        return both[:, :w.shape[0]] + both[:, w.shape[0]:]

    def _linear_dequant(self, xb: torch.Tensor, w: Q8Rows) -> torch.Tensor:
        n, k = w.shape
        rows = max(1, DEQUANT_SLICE_BYTES // (2 * k))
        if n <= rows:
            return F.linear(xb, self._dequantized_whole(w))
        out = torch.empty(xb.shape[0], n, dtype=torch.bfloat16, device=xb.device)
        for start in range(0, n, rows):
            out[:, start:start + rows] = F.linear(xb, w.rows_bf16(start, start + rows))
        return out

    def _dequantized_whole(self, w: Q8Rows) -> torch.Tensor:
        """w in bf16, kept for the next DEQUANT_KEPT - 1 other matrices: a layer run in token slices (Qwen3-Next's
        linear attention, 8K tokens at a time) reads its projections once per slice, and dequantizing them anew
        each time was ~3/4 of the dequant work of a 32K prompt (planner._dense_vram counts what is kept)."""
        held = self._dequantized.pop(id(w), None)
        if held is None or held[0] is not w:
            held = (w, w.rows_bf16(0, w.shape[0]))
        self._dequantized[id(w)] = held  # the most recent last
        while len(self._dequantized) > DEQUANT_KEPT:
            del self._dequantized[next(iter(self._dequantized))]
        return held[1]

    def norm_rope(self, x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
        fused = None if self.exact else fused_norm_rope(x, weight, eps, cos, sin)  # exact: float32 throughout
        return fused if fused is not None else norm_rope(x, weight, eps, cos, sin)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
        self._bf16_memo = None  # the projections of this input are done
        t, heads, dim = q.shape
        qh = q.transpose(0, 1).unsqueeze(0).to(torch.bfloat16)
        kh = k.transpose(0, 1).unsqueeze(0).to(torch.bfloat16)
        vh = v.transpose(0, 1).unsqueeze(0).to(torch.bfloat16)
        if k.shape[0] == t:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
        else:  # a chunk of queries at the last t of the k.shape[0] positions: causal aligned to the lower right
            bias = causal_lower_right(t, k.shape[0])  # flash attention on CUDA, a materialized mask on the CPU
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, enable_gqa=True)
        out = out.squeeze(0).transpose(0, 1).reshape(t, heads * dim)
        return out.float() if self.exact else out

    def experts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                handle: ExpertHandle) -> torch.Tensor:
        parts = handle.streamer.get(handle.layer)
        gate_up, down = dequant_experts(self.codec, self.layout, parts["gate_up"], parts["down"])
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # x may come in bf16 from the norm
        x_bf16 = self._bf16(x)  # once per layer, shared by every token chunk
        k = topk_ids.shape[1]
        chunk = self.expert_chunk
        for start in range(0, x.shape[0], chunk):
            ids = topk_ids[start:start + chunk]
            weights = topk_weights[start:start + chunk]
            flat = ids.flatten()
            order = torch.argsort(flat, stable=True)
            inv = torch.empty_like(order)  # inverse permutation: row of the sorted y for each (token, slot)
            inv[order] = torch.arange(order.numel(), device=order.device)
            xs = x_bf16[order // k + start]
            # rows per expert by a scatter-add: bincount waits for the device to size its output, which stalled
            # the host 8 times a layer at 32K tokens and let the GPU's queue run dry
            counts = torch.zeros(gate_up.shape[0], dtype=flat.dtype, device=flat.device).scatter_add_(
                0, flat, torch.ones_like(flat))
            seen = self.routing_counts.get(handle.layer)  # how often each expert was picked: decode's hot experts
            self.routing_counts[handle.layer] = counts if seen is None else seen + counts
            h = self._grouped(xs, gate_up, counts)
            y = self._grouped(silu_mul(h), down, counts)  # bf16 like the GEMM outputs: no fp32 copies
            # each token gathers its k rows of y through inv and sums them weighted, straight into out (one
            # Triton pass on CUDA; index_select + bmm elsewhere, as the scatter + bmm computed before)
            moe_combine(y, inv, weights, out[start:start + ids.shape[0]])
            del xs, h, y  # free before the next chunk allocates its own (planner._workspace counts one)
        if handle.layer not in handle.streamer.resident:
            for hook in self.streamed_hooks:
                hook(handle.layer, parts, self.routing_counts[handle.layer])
        handle.streamer.release(handle.layer)
        self._bf16_memo = None
        return out

    def _grouped(self, xs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows of xs grouped by expert (counts[e] rows for expert e) @ w[e]^T, one launch where possible."""
        if self.grouped_mm:
            offs = torch.cumsum(counts, 0).to(torch.int32)
            return torch._grouped_mm(xs, w.transpose(1, 2), offs=offs)
        out = torch.empty(xs.shape[0], w.shape[1], dtype=xs.dtype, device=xs.device)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                out[start:start + n] = xs[start:start + n] @ w[e].T
                start += n
        return out


class CacheWriter:
    """The prefill side of the KV cache: attention reads K/V on the device; copies go into the cache (VRAM or host)."""

    def __init__(self, cache, device: torch.device):
        self.cache, self.device = cache, device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pending: list[tuple[int, object, torch.Tensor]] = []  # (layer, copy done, source kept alive)
        self.layer_kv: tuple | None = None  # (layer, end, keys, values) on the device: the layer's tokens so far

    def _release_copied(self, layer: int) -> None:
        """Drop the copy sources of layers before layer - 1: the compute stream waits for their copies (long done
        by now), so their memory can be reused at once; this bounds the pending K/V to two layers."""
        keep = []
        for entry in self.pending:
            if entry[0] < layer - 1:
                torch.cuda.current_stream(self.device).wait_event(entry[1])
            else:
                keep.append(entry)
        self.pending = keep

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[0]
        self.cache.reserve(end)
        if self.cuda:
            self._release_copied(layer)
        for store, new in ((self.cache.keys, k), (self.cache.values, v)):
            src = new.to(store[layer].dtype)
            if self.cuda:
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.stream):
                    store[layer][start:end].copy_(src, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record()
                self.pending.append((layer, done, src))  # keep alive until the copy is done
            else:
                store[layer][start:end] = src
        held = self.layer_kv
        if held is not None and held[0] == layer and held[1] == start:  # a later token chunk of the same layer
            keys, values = torch.cat([held[2], k.to(held[2].dtype)]), torch.cat([held[3], v.to(held[3].dtype)])
        elif start == 0:
            keys, values = k, v
        else:  # after an earlier prefill: its K/V are in the host cache (copies finished)
            past_k = self.cache.keys[layer][:start].to(self.device)
            past_v = self.cache.values[layer][:start].to(self.device)
            keys, values = torch.cat([past_k.to(k.dtype), k]), torch.cat([past_v.to(v.dtype), v])
        self.layer_kv = (layer, end, keys, values)  # replaces the previous layer's: one layer's K/V on the device
        return keys, values

    @property
    def states(self) -> dict:
        return self.cache.states

    @property
    def length(self) -> int:
        return self.cache.length

    def get_state(self, layer: int):
        """A linear-attention layer's state on the device (from an earlier prefill or decode, wherever it is kept)."""
        held = self.cache.get_state(layer)
        return None if held is None else tuple(t.to(self.device) for t in held)

    def set_state(self, layer: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        self.cache.set_state(layer, conv, state)  # into the cache's own tensors: VRAM for the hybrid engine

    def advance(self, length: int) -> None:
        self.cache.advance(length)

    def finish(self) -> None:
        if self.cuda:
            self.stream.synchronize()
        self.pending.clear()
        self.layer_kv = None


def place_gpu_weights(artifact: Artifact, device: torch.device, streamer: ExpertStreamer,
                      direct: tuple[str, ...] = ()) -> dict:
    """Dense weights into VRAM: q8 matrices as stored (Q8Rows, planner.gpu_keeps_quantized), other matrices and the
    `direct` ones (name suffixes the architecture reads as matrices itself) dequantized once to bf16, norms and
    routers float32; experts by handle."""
    weights = {}
    for name, spec in artifact.header["tensors"].items():
        section = artifact.chunks[spec["chunk"]].section
        if section in (SECTION_EXPERTS_CPU, SECTION_EXPERTS_GPU):
            continue
        view = artifact.tensor(name)
        if name == "embed":
            weights[name] = view  # rows gathered on the host, only the prompt's tokens cross PCIe
        elif view.codec == "f32" or name.endswith(".router"):
            weights[name] = view.parts["w"].to(device).float()
        elif gpu_keeps_quantized(name, view.codec, direct) and view.parts["q"].dim() == 2:
            weights[name] = Q8Rows(view.parts["q"].to(device), view.parts["scale"].to(device))
        else:
            w = dequant_parts(view.codec, view.layout, {k: v.to(device) for k, v in view.parts.items()})
            weights[name] = w.to(torch.bfloat16)
    for layer in streamer.layers:
        weights[f"layers.{layer}.experts"] = ExpertHandle(streamer, layer)
    return stack_qkv(weights, concat_rows)


def concat_rows(parts: list) -> torch.Tensor | Q8Rows | None:
    """q, k and v as one matrix in VRAM (all bf16 or all Q8Rows), for planner.stack_qkv; None for anything else."""
    if all(isinstance(p, Q8Rows) for p in parts):
        return Q8Rows(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))
    if all(isinstance(p, torch.Tensor) and p.dtype == torch.bfloat16 for p in parts):
        return torch.cat(parts)
    return None


class GpuPrefillEngine:
    """prefill(tokens, cache) on `device`; decode continues from the same cache (decode_hybrid or the CPU engine)."""

    token_chunk = None  # attention over this many tokens at a time (ATTENTION_TOKEN_CHUNK), or the whole prompt

    def __init__(self, arch, args, artifact: Artifact, device: str | torch.device, resident_layers: set[int],
                 section: str):
        self.device = torch.device(device)
        self.args, self.section = args, section
        self.streamer = ExpertStreamer(artifact, section, self.device, resident_layers)
        codec = artifact.header["quant"]["experts"]
        layout = "rows" if section == SECTION_EXPERTS_GPU else "cpu_blocks"
        exact = codec == "bf16" and artifact.header["quant"]["dense"] == "bf16"
        self.ops = GpuOps(self.device, codec, layout, exact)
        self.ops.expert_chunk = expert_token_chunk(args.num_experts, args.num_experts_per_tok)
        weights = place_gpu_weights(artifact, self.device, self.streamer, getattr(arch, "DIRECT_MATRICES", ()))
        self.model = arch.Model(args, weights, self.ops)
        self.stats = PrefillStats()
        # objects with before_prefill(tokens) / after_prefill(): the decode engine's hot experts
        self.listeners: list = []

    @torch.inference_mode()
    def prefill(self, tokens: list[int], cache, all_logits: bool = False) -> torch.Tensor:
        started = time.perf_counter()
        for listener in self.listeners:
            listener.before_prefill(cache.length + len(tokens))  # attention reads every position so far
        writer = CacheWriter(cache, self.device)
        self.ops.routing_counts = {}
        self.streamer.begin()
        logits = self.model.forward(torch.tensor(tokens, dtype=torch.long), writer, cache.length,
                                    all_logits=all_logits, token_chunk=self.token_chunk)
        logits = logits.float().cpu()
        writer.finish()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats = PrefillStats(len(tokens), time.perf_counter() - started, self.streamer.bytes_copied,
                                  self.streamer.copy_time() if self.device.type == "cuda" else 0.0)
        for listener in self.listeners:
            listener.after_prefill()
        return logits if all_logits else logits[-1]
