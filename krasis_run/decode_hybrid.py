"""Hybrid decode: one token at a time with the GPU in the loop for what it holds.

Attention (over a KV cache that stays in VRAM where the GPU prefill wrote it), the dense projections,
the router, the lm_head and the routed experts held in VRAM run on the GPU; the experts left in RAM
run on the CPU through the native MoE kernel, in place in the mapping. For a layer with CPU experts
only the normed hidden state and its routing (a few KB) cross PCIe, through pinned buffers, and the
CPU's sum comes back the same way.

The step is the architecture's own `Model.forward` on one token, run with ops that place each piece.
On CUDA it is captured once into CUDA graphs: one graph per stretch of GPU work between two CPU
expert calls, so a step is a few graph launches instead of ~30 kernel launches per layer; the CPU
experts of a layer run while the GPU computes its resident experts of the same layer. On the CPU
(device="cpu") the same code runs eagerly, which is the path CI tests.

One sequence at a time: the engine owns one KV cache of `context` tokens and every `new_cache`
hands out that storage again.
"""

from __future__ import annotations

import sys
import time

import torch

from .artifact import Artifact
from .cache import KVCache
from .format import SECTION_EXPERTS_GPU, KrsError
from .host_flags import StreamFlags
from .host_flags import available as stream_flags_available
from .kernels import decode_gpu
from .kernels.decode_glue import RMS_MAX_BLOCK, add_rms_norm, norm_rope_store_decode, route_decode, router_decode
from .kernels.decode_gpu import decode_attention, int8_groups, linear_q8, moe_decode, next_pow2
from .prefill_gpu import ExpertHandle, GpuOps, GpuPrefillEngine, Q8Rows, part_views

SERVE_TIMEOUT_S = 60.0  # the CPU waits this long for the GPU to hand over a layer before it gives up


class LayerExperts:
    """Where one MoE layer's experts are for decode: tiles in VRAM by slot, and/or CPU blocks in the mapping."""

    def __init__(self, layer: int, experts: int, device: torch.device, tiles: dict | None, cpu_blocks,
                 resident: list[int]):
        self.layer, self.experts, self.device, self.cpu_blocks = layer, experts, device, cpu_blocks
        self.whole_layer = tiles is not None  # resident for prefill too; otherwise hot experts may come and go
        self.place(resident, tiles)

        self.remote_tiles: dict | None = None  # every expert's tiles in pinned host memory, read over PCIe

    def place(self, resident: list[int], tiles: dict | None, remote: list[int] | None = None) -> bool:
        """Experts `resident` (in slot order) are in VRAM in `tiles`; `remote` ones are computed by the GPU
        straight from host memory (zero-copy reads over PCIe of remote_tiles); the others on the CPU. The slot maps
        are rewritten in place, so a captured step reads the new placement; returns whether what the step launches
        changed (other tiles, or a side of the layer switched on or off): then it must be captured again."""
        slot = torch.full((self.experts,), -1, dtype=torch.int32)
        slot[resident] = torch.arange(len(resident), dtype=torch.int32)
        remote = list(remote or [])
        remote_slot = torch.full((self.experts,), -1, dtype=torch.int32)
        remote_slot[remote] = torch.tensor(remote, dtype=torch.int32)  # remote_tiles hold all experts
        gpu_takes = (slot >= 0) | (remote_slot >= 0)  # slots the CPU skips
        in_vram = bool(resident) and tiles is not None
        on_gpu = in_vram or bool(remote)
        on_cpu = (len(resident) if in_vram else 0) + len(remote) < self.experts
        before = getattr(self, "shape", None)
        self.shape = (id(tiles) if in_vram else None, bool(remote), on_gpu, on_cpu)
        if before is None:
            self.slot, self.remote_slot, self.gpu_takes = (t.to(self.device) for t in (slot, remote_slot, gpu_takes))
        else:
            self.slot.copy_(slot)
            self.remote_slot.copy_(remote_slot)
            self.gpu_takes.copy_(gpu_takes)
        self.resident, self.tiles, self.remote = list(resident), tiles, remote
        self.on_gpu, self.on_cpu = on_gpu, on_cpu
        return self.shape != before


class _CudaArray:
    """__cuda_array_interface__ over a device address: how torch wraps memory it did not allocate."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


def device_alias(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA uint8 tensor over registered host memory: with unified addressing the GPU reads those pages at
    the host address, over PCIe (zero-copy). Raises where torch or the system does not allow it."""
    return torch.as_tensor(_CudaArray(host.data_ptr(), host.numel() * host.element_size()), device=device)


class HostStage:
    """Pinned buffers for one layer's crossing: what the CPU experts read and what they give back."""

    def __init__(self, hidden: int, k: int, pinned: bool):
        self.x = torch.empty(1, hidden, dtype=torch.float32, pin_memory=pinned)
        self.ids = torch.empty(1, k, dtype=torch.int32, pin_memory=pinned)
        self.weights = torch.empty(1, k, dtype=torch.float32, pin_memory=pinned)
        self.out = torch.zeros(1, hidden, dtype=torch.float32, pin_memory=pinned)


class DecodeCache:
    """The model's view of the KV cache during a decode step: the position is a device tensor, so one
    captured step serves every position; attention masks by length instead of slicing."""

    def __init__(self, cache: KVCache, length: torch.Tensor):
        self.cache, self.length = cache, length
        self._valid: torch.Tensor | None = None  # the step's mask, made once for all its layers

    def update(self, layer: int, start, k: torch.Tensor, v: torch.Tensor):
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys.index_copy_(0, start, k.to(keys.dtype))
        values.index_copy_(0, start, v.to(values.dtype))
        return keys, values

    def valid_keys(self, capacity: int) -> torch.Tensor:
        """[1, capacity] True at the positions this step attends to (for a model that attends on its own)."""
        if self._valid is None or self._valid.shape[1] != capacity:
            self._valid = (torch.arange(capacity, device=self.length.device) < self.length)[None]
        return self._valid

    def get_state(self, layer: int):
        return self.cache.get_state(layer)

    def set_state(self, layer: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        self.cache.set_state(layer, conv, state)  # in place: the captured step reads and writes the same tensors

    def advance(self, length) -> None:
        pass  # the engine advances the real cache on the host


class HybridOps(GpuOps):
    """GpuOps for a one-token step: split-K attention over the whole cache masked by length, experts split
    between GPU and CPU. Projections as in prefill: bf16 activations, float32-grade (hi + lo) for bf16 artifacts."""

    def __init__(self, engine: HybridDecodeEngine, device: torch.device, codec: str, exact: bool, cpu_ops):
        super().__init__(device, codec, "rows", exact)
        self.engine, self.cpu_ops = engine, cpu_ops
        self.staged: int | None = None  # the layer whose CPU inputs the router kernel just wrote to its stage
        self._int8_memo: tuple | None = None  # (x, its int8 groups) of the last add_rms_norm or attention
        self.has_q8 = False  # q8 matrices on the GPU (the engine sets it)
        self.moe_norms: set[int] = set()  # ids of the norm weights whose output goes to a layer's experts
        # the router kernel's tickets, one per layer (so no two launches can share one), always left at zero
        self.tickets = torch.zeros(engine.args.num_hidden_layers, dtype=torch.int32, device=device)

    def select_experts(self, x: torch.Tensor, router: torch.Tensor, k: int, renormalize: bool,
                       handle: ExpertHandle) -> tuple[torch.Tensor, torch.Tensor]:
        """Router projection + top k in one kernel; for a layer with CPU experts it also writes what the CPU reads
        (x, its ids, the weights) straight into that layer's pinned stage, so no copies follow."""
        self.staged = None
        if not x.is_cuda or x.shape[0] != 1:
            return self.route(self.linear(x, router), k, renormalize)
        e = self.engine
        layer = e.layers[handle.layer]
        stage = e.stage_views.get(handle.layer) if layer.on_cpu else None
        ticket = self.tickets[handle.layer:handle.layer + 1]
        ids, weights = router_decode(x, router, k, renormalize, ticket, stage, layer.gpu_takes)
        if stage is not None:
            self.staged = handle.layer
        return ids, weights

    # One fused kernel instead of ~5 torch ops (the norms come fused from GpuOps): in a graph every tiny kernel
    # still costs a few us.
    def route(self, logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return route_decode(logits.float(), k, renormalize)

    def attention_inputs(self, layer: int, q, k, v, q_weight, k_weight, eps: float, cos, sin, cache, start_pos):
        """q/k norm + rotary and the K/V cache write in one kernel (one token, bf16); the model's three steps else."""
        if self.exact or not q.is_cuda or not isinstance(cache, DecodeCache) or not isinstance(start_pos, torch.Tensor):
            q = self.norm_rope(q, q_weight, eps, cos, sin)
            keys, values = cache.update(layer, start_pos, self.norm_rope(k, k_weight, eps, cos, sin), v)
            return q, keys, values
        keys, values = cache.cache.keys[layer], cache.cache.values[layer]
        return norm_rope_store_decode(q, k, v, q_weight, k_weight, eps, cos, sin, keys, values, start_pos), keys, values

    def _int8_inputs(self) -> bool:
        """Whether the q8 GEMVs read int8 inputs (decode_gpu.Q8_INT8, q8 matrices on the GPU, Triton)."""
        return self.has_q8 and decode_gpu.Q8_INT8 and not self.exact and decode_gpu._kernels() is not None

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Where an int8 reader follows, the norm's kernel also writes the normed row's int8 groups: this layer's
        q4 GPU experts (Q4G_INT8; a quantize kernel fewer a layer) or the q|k|v GEMV of the next layer (Q8_INT8;
        the lm_head takes a view of the final norm's output, see _int8_groups_of)."""
        h = x.shape[-1]
        fits = (x.is_cuda and not self.exact and x.shape[0] == 1 and x.dtype == torch.float32 and x.is_contiguous()
                and h % 32 == 0 and next_pow2(h) <= RMS_MAX_BLOCK and decode_gpu._kernels() is not None)
        if fits and (self._int8_inputs() or (id(weight) in self.moe_norms and self.codec == "q4" and decode_gpu.Q4G_INT8
                                             and any(layer.on_gpu for layer in self.engine.layers.values()))):
            x_int8 = int8_groups(1, h, x.device)
            y = add_rms_norm(x, delta, weight, eps, x_int8=x_int8)
            self._int8_memo = (y, x_int8)
            return y
        return super().add_rms_norm(x, delta, weight, eps)

    def _int8_groups_of(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The int8 groups written with x itself. The lm_head takes a view (h[-1:]) and so keeps float inputs: on
        int8 ones (matched by address) a 30B-A3B step was ~10 us faster, but the tiny model's free-running greedy
        tokens then left the CPU runtime's after a few steps (the teacher-forced test's bounds held; whether only a
        near tie flipped was not established), so the lm_head stays as it was verified."""
        memo = self._int8_memo
        return memo[1] if memo is not None and memo[0] is x else None

    def linear(self, x: torch.Tensor, w: torch.Tensor | Q8Rows) -> torch.Tensor:
        """A q8 GEMV of one token whose input came with its int8 groups reads those (Q8_INT8)."""
        if isinstance(w, Q8Rows) and x.is_cuda and x.shape[0] == 1 and self._int8_inputs():
            x_int8 = self._int8_groups_of(x)
            if x_int8 is not None:
                return linear_q8(x, w.q, w.scale, x_int8=x_int8)
        return super().linear(x, w)

    def embed(self, tokens: torch.Tensor, table) -> torch.Tensor:
        # The host stages the token's embedding row before each step (the table stays in the mapping);
        # the step's first copy brings it over, which a CUDA graph can replay.
        return self.engine.embed_dev.copy_(self.engine.embed_host, non_blocking=True).float()

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start_pos) -> torch.Tensor:
        # the valid length (start_pos + 1) is computed once per step by the engine, not once per layer; the output
        # is stored in bf16 (what o_proj takes) unless the artifact is bf16 (exact), and with Q8_INT8 also as the
        # int8 groups the o_proj GEMV reads
        heads, dim = q.shape[1], q.shape[2]
        out = torch.empty(1, heads * dim, dtype=torch.float32 if self.exact else torch.bfloat16, device=q.device)
        x_int8 = None
        if q.is_cuda and self._int8_inputs() and dim % 32 == 0 and dim & (dim - 1) == 0:
            x_int8 = int8_groups(1, heads * dim, q.device)
            self._int8_memo = (out, x_int8)
        decode_attention(q[0], keys, values, self.engine.length_dev, out=out.view(-1), x_int8=x_int8)
        return out

    def experts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                handle: ExpertHandle) -> torch.Tensor:
        e = self.engine
        layer = e.layers[handle.layer]
        y = None
        if layer.on_cpu:
            if self.staged != handle.layer:  # else the router kernel has written the stage already
                stage = e.stages[handle.layer]
                ids = topk_ids.to(torch.int32)
                if layer.on_gpu:  # the CPU skips the slots the GPU computes (id -1)
                    ids = torch.where(layer.gpu_takes[topk_ids], torch.full_like(ids, -1), ids)
                stage.x.copy_(x, non_blocking=True)
                stage.ids.copy_(ids, non_blocking=True)
                stage.weights.copy_(topk_weights.float(), non_blocking=True)
            self.staged = None
            e.hand_to_cpu(handle.layer, gpu_share=layer.on_gpu)  # the CPU starts once these have arrived
        memo = self._int8_memo
        x_int8 = memo[1] if memo is not None and memo[0] is x else None  # written by the norm before
        if layer.resident and layer.tiles is not None:
            y = moe_decode(x, topk_ids, topk_weights.float(), layer.slot, self.codec,
                           layer.tiles["gate_up"], layer.tiles["down"], x_int8=x_int8)
        if layer.remote:
            y_remote = moe_decode(x, topk_ids, topk_weights.float(), layer.remote_slot, self.codec,
                                  layer.remote_tiles["gate_up"], layer.remote_tiles["down"], x_int8=x_int8)
            y = y_remote if y is None else y + y_remote
        if layer.on_cpu:
            e.join_cpu(handle.layer, gpu_share=layer.on_gpu)
            y_cpu = e.stage_out_dev[handle.layer].copy_(e.stages[handle.layer].out, non_blocking=True)
            y = y_cpu if y is None else y + y_cpu
        return y


class HybridDecodeEngine:
    """decode(token, cache) with the GPU in the loop; prefill goes to the GPU prefill engine."""

    def __init__(self, arch, args, artifact: Artifact, prefill: GpuPrefillEngine, cpu_ops, cpu_weights: dict,
                 context: int, gpu_experts: bool = True, graphs: bool = True, hot_bytes: int = 0,
                 remote_share: float = 0.0, prefill_hot_room=None):
        self.args, self.prefill_engine, self.context = args, prefill, context
        self.device = device = prefill.device
        self.cuda = device.type == "cuda"
        self.cpu_ops = cpu_ops
        a = args
        self.kv = KVCache.for_layout(prefill.model.cache_layout, context, device=device)
        for t in self.kv.keys + self.kv.values:  # a step attends over the whole storage masked by length: 0 * nan = nan
            t.zero_()
        codec = artifact.header["quant"]["experts"]
        streamer = prefill.streamer
        self.layers: dict[int, LayerExperts] = {}
        for i in streamer.layers:
            tiles = None
            if gpu_experts and i in streamer.resident and streamer.sources[i].layout == "rows" and \
                    prefill.section == SECTION_EXPERTS_GPU:
                tiles = part_views(streamer.resident[i], streamer.sources[i])
            resident = list(range(a.num_experts)) if tiles is not None else []
            self.layers[i] = LayerExperts(i, a.num_experts, device, tiles, cpu_weights[f"layers.{i}.experts"],
                                          resident)
        self.stages = {i: HostStage(a.hidden_size, a.num_experts_per_tok, self.cuda)
                       for i, layer in self.layers.items() if layer.on_cpu}
        self.stage_out_dev = {i: torch.empty(1, a.hidden_size, device=device) for i in self.stages}
        self.stage_views = self._stage_views() if self.cuda else {}
        self.embed_table = cpu_weights["embed"].parts["w"]
        self.embed_host = torch.empty(1, a.hidden_size, dtype=self.embed_table.dtype, pin_memory=self.cuda)
        self.embed_dev = torch.empty(1, a.hidden_size, dtype=self.embed_table.dtype, device=device)
        self.pos_host = torch.zeros(1, dtype=torch.long, pin_memory=self.cuda)
        self.pos_dev = torch.zeros(1, dtype=torch.long, device=device)
        self.token_dev = torch.zeros(1, dtype=torch.long, device=device)
        self.length_dev = torch.ones(1, dtype=torch.int32, device=device)  # positions attention reads this step
        self.logits_host = torch.empty(a.vocab_size, dtype=torch.float32, pin_memory=self.cuda)
        self.ops = HybridOps(self, device, codec, prefill.ops.exact, cpu_ops)
        self.model = arch.Model(args, prefill.model.w, self.ops)
        self.ops.has_q8 = any(isinstance(t, Q8Rows) for t in prefill.model.w.values())
        self.ops.moe_norms = {id(prefill.model.w[n["mlp_norm"]]) for n in getattr(self.model, "layer_names", [])
                              if "experts" in n and n.get("mlp_norm") in prefill.model.w}
        self.use_graphs = graphs and self.cuda
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.plan: list[tuple] | None = None  # the captured step: graphs, events and CPU expert calls in order
        # One graph for the whole step where the driver lets a graph set and wait on host flags: the CPU then
        # serves every CPU layer in one native call, spinning on each layer's flag (no launch or event wait
        # per layer); else one graph per stretch of GPU work, the host waiting on an event between them.
        self.flags: StreamFlags | None = None
        if self.use_graphs and self.stages and getattr(cpu_ops, "native", None) is not None \
                and stream_flags_available(device):
            self.flags = StreamFlags(2 * a.num_hidden_layers)  # per layer: ready (GPU -> CPU), done (CPU -> GPU)
        self.serve_layers: list[int] = []  # CPU layers of the captured step, in order
        self.serve_stats = torch.zeros(3, dtype=torch.float64)
        self.capturing = False
        self.epoch = 0  # which new_cache() owns the KV storage now
        self.captures = 0  # after the first, the kernels are compiled: captures again skip the warm-up steps
        self.pending: dict[int, object] = {}  # layer -> event after its stage copies (eager CUDA)
        self.timing = dict(steps=0, step_s=0.0, gpu_wait_s=0.0, cpu_experts_s=0.0, cpu_picks=0)  # where time goes
        self.step_log: list[float] = []  # seconds of each decode call of the current sequence (capture included)
        # a list (a benchmark sets it): the GPU's seconds of each replayed step too (CUDA events), to tell GPU time
        # from host time
        self.gpu_step_log: list[float] | None = None
        # Hot experts: VRAM the prefill workspace needs only while prefilling holds, during decode, the experts
        # the last prompt routed to most (of the layers not resident), loaded after each prefill.
        self.hot_bytes = hot_bytes if gpu_experts and prefill.section == SECTION_EXPERTS_GPU else 0
        self.hot_pending = False
        self.hot_stats: dict = {}
        prefill.listeners.append(self)
        # prefill_hot_room(tokens): VRAM free for hot experts while a prompt that long prefills (the workspace it
        # does not need); the hot experts are then taken from the stream buffer as each layer passes, per layer
        self.prefill_hot_room = prefill_hot_room if self.hot_bytes else None
        self.hot_quota = 0  # experts a streamed layer keeps during this prefill
        self.hot_tiles: dict[int, dict] = {}  # layer -> its hot buffer (hot_capacity experts) kept during prefill
        self.hot_capacity = 0
        self.hot_index: dict[int, torch.Tensor] = {}  # layer -> the experts keep_hot copied (device), this prefill
        self.hot_kept = False  # the last prefill kept hot experts (the first decode step then loads none)
        prefill.ops.streamed_hooks.append(self.keep_hot)
        # Remote experts: of the picks left to the CPU, about `remote_share` go to the GPU instead, which reads
        # those experts' tiles from host memory over PCIe (the registered mapping) while the CPU reads the rest:
        # two memory systems on one layer's experts. Needs the GPU tiles in registered, device-mapped memory.
        # Hot experts are gathered from these device views of the mapping by one kernel per part of a layer.
        self.remote_share = remote_share if gpu_experts and prefill.section == SECTION_EXPERTS_GPU else 0.0
        if (self.remote_share or self.hot_bytes) and not self._map_remote_tiles():
            self.remote_share = 0.0
        self.setup = dict(hot_load_s=0.0, capture_s=0.0)  # one-off costs of the last sequence's first step

    # ---------------------------------------------------------------- placement summary
    @property
    def mode(self) -> str:
        gpu = [layer.on_gpu for layer in self.layers.values()]
        if all(gpu) and not any(layer.on_cpu for layer in self.layers.values()):
            return "all_gpu"
        return "budget" if any(gpu) else "experts_in_ram"

    def expert_bytes_per_token(self, measured: bool = False) -> dict[str, float]:
        """Bytes of routed experts read per token on each side: expected for experts picked uniformly, or
        (measured) as the decode steps so far picked them."""
        a, out = self.args, {"cpu": 0.0, "gpu": 0.0}
        if measured and self.timing["steps"]:
            per_expert = max(layer.cpu_blocks.length for layer in self.layers.values()) / a.num_experts
            picks = a.num_experts_per_tok * len(self.layers)
            cpu = self.timing["cpu_picks"] / self.timing["steps"]
            return {"cpu": cpu * per_expert, "gpu": (picks - cpu) * per_expert}
        for layer in self.layers.values():
            per_expert = layer.cpu_blocks.length / a.num_experts
            share = len(layer.resident) / a.num_experts if layer.on_gpu else 0.0
            out["gpu"] += a.num_experts_per_tok * share * per_expert
            out["cpu"] += a.num_experts_per_tok * (1 - share) * per_expert
        return out

    # ---------------------------------------------------------------- cache
    def new_cache(self, capacity: int = 256) -> KVCache:
        if capacity > self.context:
            raise KrsError(f"{capacity} tokens do not fit the GPU KV cache of {self.context} tokens (--context)")
        self.epoch += 1  # the storage is this engine's one cache: the sequence before loses it
        self.step_log = []
        cache = KVCache.over(self.kv)
        cache.epoch = self.epoch
        return cache

    def prefill(self, tokens: list[int], cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        return self.prefill_engine.prefill(tokens, cache, all_logits)

    def before_prefill(self, tokens: int) -> None:
        streamed = [i for i, layer in self.layers.items() if not layer.whole_layer]
        room = min(self.hot_bytes, self.prefill_hot_room(tokens)) if self.prefill_hot_room and streamed else 0
        quota = min(self.args.num_experts, int(room // (self._bytes_per_expert() * len(streamed)))) if room else 0
        # the buffers (and with them the captured step) stay for prompts whose room holds them and not twice them
        if not (self.hot_tiles and self.hot_capacity <= quota < 2 * self.hot_capacity):
            if self.hot_bytes:
                self._drop_hot()  # the prefill workspace needs that VRAM back
            if quota:
                self._make_hot_buffers(streamed, quota)
        self.hot_quota = self.hot_capacity if self.hot_tiles else 0
        self.hot_index = {}

    def _make_hot_buffers(self, streamed: list[int], quota: int) -> None:
        """A buffer of `quota` experts' tiles per streamed layer, made before the prefill (not between its layers'
        large temporaries)."""
        streamer = self.prefill_engine.streamer
        for i in streamed:
            parts = part_views(streamer.host[i], streamer.sources[i])
            self.hot_tiles[i] = {m: {p: torch.empty((quota, *t.shape[1:]), dtype=t.dtype, device=self.device)
                                     for p, t in ps.items()} for m, ps in parts.items()}
        self.hot_capacity = quota

    def after_prefill(self) -> None:
        kept = {}
        for i, index in self.hot_index.items():  # the host learns the choices only now: no sync per layer
            experts, layer = index.tolist(), self.layers[i]
            hot = set(experts)  # the remote experts stay as they were (placed again below), less the hot ones
            if layer.place(experts, self.hot_tiles[i], [e for e in layer.remote if e not in hot]):
                self.plan = None  # a new buffer (or a side of the layer switched): capture again
            kept[i] = experts
        if kept:
            self.hot_stats = self._hot_stats(kept)
        # else placed by the next decode step, from this prefill's routing
        self.hot_kept = bool(kept)
        self.hot_pending = bool(self.hot_bytes) or bool(self.remote_share)
        self.setup = dict(hot_load_s=0.0, capture_s=0.0)  # this sequence's own (none where the graph is kept)

    def keep_hot(self, layer: int, parts: dict[str, dict[str, torch.Tensor]], counts: torch.Tensor) -> None:
        """A streamed layer's experts are in VRAM, after its routing: copy its hot_quota most-picked ones out of the
        stream buffer (before the next layer's copy reuses it) into the layer's hot buffer, chosen on the device."""
        if not self.hot_quota or layer not in self.hot_tiles:
            return
        index = torch.topk(counts, self.hot_quota).indices.sort().values  # slot j holds expert index[j]
        buffer = self.hot_tiles[layer]
        for m, ps in parts.items():
            for p, t in ps.items():
                torch.index_select(t, 0, index, out=buffer[m][p])
        self.hot_index[layer] = index

    def _bytes_per_expert(self) -> float:
        streamer = self.prefill_engine.streamer
        return max(streamer.sources[i].length for i in self.layers) / self.args.num_experts

    def _hot_stats(self, chosen: dict[int, list[int]]) -> dict:
        counts = self.prefill_engine.ops.routing_counts
        streamed = [i for i, layer in self.layers.items() if not layer.whole_layer and i in counts]
        total = sum(float(counts[i].sum()) for i in streamed)
        held = sum(float(counts[i][experts].sum()) for i, experts in chosen.items() if experts)
        picked = sum(len(v) for v in chosen.values())
        return dict(experts=picked, bytes=picked * self._bytes_per_expert(), layers=len(chosen),
                    prefill_pick_share=held / total if total else 0.0)

    def _stage_views(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Device views of each stage's x, ids and weights (pinned, so mapped at the same address): the router kernel
        writes the CPU's inputs there directly. Empty (the engine copies instead) where the GPU cannot map them."""
        views = {}
        try:
            for i, stage in self.stages.items():
                views[i] = tuple(device_alias(t, self.device).view(t.dtype).view(t.shape)
                                 for t in (stage.x, stage.ids, stage.weights))
        except (RuntimeError, TypeError):
            return {}
        return views

    def _map_remote_tiles(self) -> bool:
        """Device views of the streamed layers' tiles in the (registered) mapping, checked to read the same bytes
        as the host; False (remote experts off, hot experts copied expert by expert) where this system cannot
        address registered memory this way."""
        streamer = self.prefill_engine.streamer
        registered = set(streamer.registered)
        try:
            for i, layer in self.layers.items():
                host = streamer.host[i]
                if layer.whole_layer or (self.cuda and host.data_ptr() not in registered):
                    continue
                alias = device_alias(host, self.device) if self.cuda else host  # on the CPU: the mapping itself
                if not torch.equal(alias[:4096].cpu(), host[:4096]):
                    raise RuntimeError("the device reads other bytes at the host address")
                layer.remote_tiles = part_views(alias, streamer.sources[i])
        except (RuntimeError, TypeError) as e:
            for layer in self.layers.values():
                layer.remote_tiles = None
            print(f"krasis: remote experts off, hot experts copied one by one (the GPU cannot read the mapping in "
                  f"place: {e})", file=sys.stderr)
            return False
        return True

    # ---------------------------------------------------------------- hot experts
    def _drop_hot(self) -> None:
        for layer in self.layers.values():
            if not layer.whole_layer and layer.place([], None, layer.remote):
                self.plan = None  # the graphs address the dropped tiles: capture again with the new placement
        self.hot_tiles, self.hot_capacity = {}, 0

    def _load_hot(self) -> None:
        """The most-picked experts of the last prefill, over all layers not resident, up to hot_bytes of VRAM:
        copied from the mapping (registered for streaming, so at full PCIe speed) into per-layer stacks."""
        streamer, counts = self.prefill_engine.streamer, self.prefill_engine.ops.routing_counts
        picks = []  # (count, layer, expert)
        for i, layer in self.layers.items():
            if not layer.whole_layer and i in counts:
                picks += [(c, i, e) for e, c in enumerate(counts[i].tolist()) if c > 0]
        if not picks:
            return
        self.plan = None  # the graphs address the tiles and slot maps replaced below (also if this fails half way)
        per_expert = self._bytes_per_expert()
        picks.sort(key=lambda p: -p[0])
        chosen: dict[int, list[int]] = {}
        for _, i, e in picks[: int(self.hot_bytes // per_expert)]:
            chosen.setdefault(i, []).append(e)
        for i, experts in chosen.items():
            experts.sort()
            mapped = self.layers[i].remote_tiles
            if mapped is not None:  # one gather kernel per part, reading the mapping over PCIe
                index = torch.tensor(experts, device=self.device)
                tiles = {m: {p: t.index_select(0, index) for p, t in parts.items()} for m, parts in mapped.items()}
            else:  # one copy per expert and part
                host = part_views(streamer.host[i], streamer.sources[i])
                tiles = {m: {p: torch.empty((len(experts), *t.shape[1:]), dtype=t.dtype, device=self.device)
                             for p, t in parts.items()} for m, parts in host.items()}
                for m, parts in host.items():
                    for p, t in parts.items():
                        for slot, e in enumerate(experts):
                            tiles[m][p][slot].copy_(t[e], non_blocking=True)
            self.layers[i].place(experts, tiles, self.layers[i].remote)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.hot_stats = self._hot_stats(chosen)
        self.plan = None

    def _place_remote(self) -> None:
        """Per layer with remote tiles: the most-picked experts (of the last prefill) not in VRAM, until they
        hold `remote_share` of that layer's picks not in VRAM."""
        counts = self.prefill_engine.ops.routing_counts
        for i, layer in self.layers.items():
            if layer.remote_tiles is None or i not in counts:
                continue
            c = counts[i].tolist()
            held = set(layer.resident) if layer.tiles is not None else set()
            free = sorted((e for e in range(len(c)) if e not in held and c[e] > 0), key=lambda e: -c[e])
            target, taken, remote = self.remote_share * sum(c[e] for e in free), 0, []
            for e in free:
                if taken >= target:
                    break
                remote.append(e)
                taken += c[e]
            if layer.place(layer.resident if layer.tiles is not None else [], layer.tiles, remote):
                self.plan = None  # a side of the layer switched on or off: capture again

    # ---------------------------------------------------------------- the CPU side of a layer
    def hand_to_cpu(self, layer: int, gpu_share: bool) -> None:
        if not self.cuda:
            return
        if self.capturing and self.flags is not None:  # the stage copies before it land first (write barrier)
            self.flags.set(torch.cuda.current_stream(self.device), 2 * layer, 1)
            self.serve_layers.append(layer)
        elif self.capturing:  # close this graph: the host waits for it before the CPU experts run
            self._end_graph()
            event = torch.cuda.Event()
            self.plan.append(("record", event))
            self.pending[layer] = event
            if gpu_share:
                self._begin_graph()  # the GPU's share of the layer, launched before the host waits
        else:
            event = torch.cuda.Event()
            event.record()
            self.pending[layer] = event

    def join_cpu(self, layer: int, gpu_share: bool) -> None:
        if self.capturing and self.flags is not None:  # wait for the CPU's sum, then re-arm the flag
            stream = torch.cuda.current_stream(self.device)
            self.flags.wait(stream, 2 * layer + 1, 1)
            self.flags.set(stream, 2 * layer + 1, 0)
        elif self.capturing:
            if gpu_share:
                self._end_graph()
            self.plan.append(("cpu", layer, self.pending.pop(layer)))
            self._begin_graph()
        else:
            event = self.pending.pop(layer, None)
            self._cpu_experts(layer, event)

    def _cpu_experts(self, layer: int, event) -> None:
        started = time.perf_counter()
        if event is not None:
            event.synchronize()
        waited = time.perf_counter()
        stage = self.stages[layer]
        picks = int((stage.ids >= 0).sum())
        self.timing["cpu_picks"] += picks  # experts the CPU read: the measured split, not the uniform estimate
        if picks:  # straight into the pinned buffer the next graph copies to the GPU
            self.cpu_ops.experts(stage.x, stage.ids, stage.weights, self.layers[layer].cpu_blocks, out=stage.out)
        else:
            stage.out.zero_()
        self.timing["gpu_wait_s"] += waited - started  # the host waiting for the GPU's part of the layer
        self.timing["cpu_experts_s"] += time.perf_counter() - waited

    def _serve_table(self) -> torch.Tensor:
        rows = []
        for i in self.serve_layers:
            stage = self.stages[i]
            experts = self.cpu_ops._native_expert_table(self.layers[i].cpu_blocks)
            rows.append([self.flags.address(2 * i), self.flags.address(2 * i + 1), stage.x.data_ptr(),
                         stage.ids.data_ptr(), stage.weights.data_ptr(), stage.out.data_ptr(), experts.data_ptr()])
        return torch.tensor(rows, dtype=torch.int64)

    def _serve(self, table: torch.Tensor) -> None:
        """The CPU layers of one step, while the step's graph runs: one native call for all of them."""
        blocks = self.layers[self.serve_layers[0]].cpu_blocks
        hidden, width = blocks.matrices["down"]
        stats = self.serve_stats.zero_()
        try:
            self.cpu_ops.native.moe_serve(blocks.codec, hidden, width, blocks.experts, self.args.num_experts_per_tok,
                                          table, SERVE_TIMEOUT_S, stats, group=self.cpu_ops._native_experts(blocks)[1])
        except TimeoutError as e:
            raise KrsError(f"decode step failed: {e}") from e
        finally:
            wait, work, picks = stats.tolist()
            self.timing["gpu_wait_s"] += wait
            self.timing["cpu_experts_s"] += work
            self.timing["cpu_picks"] += int(picks)

    # ---------------------------------------------------------------- CUDA graphs
    def _begin_graph(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.graph.capture_begin(pool=self.pool)

    def _end_graph(self) -> None:
        self.graph.capture_end()
        self.plan.append(("graph", self.graph))

    def _step(self) -> None:
        """The GPU step as issued eagerly (or recorded, while capturing): logits land in logits_host."""
        self.length_dev.copy_(self.pos_dev + 1)
        logits = self.model.forward(self.token_dev, DecodeCache(self.kv, self.length_dev), self.pos_dev)
        self.logits_host.copy_(logits.view(-1), non_blocking=True)

    def _capture(self) -> None:
        linear_layers = sum(not kv for kv in self.kv.kv_layers)
        if len(self.kv.states) != linear_layers:  # a state first made during capture would restart from zero at every
            raise KrsError("decode needs a prefill first: the recurrent layers have no state to carry")  # replay
        self.pool = torch.cuda.graph_pool_handle()
        self.plan = []
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            # the warm-up steps run for real: a recurrent layer's state would advance twice, so it is put back after
            # (K/V written at `pos` are overwritten by the replay)
            warmups = 2 if self.captures == 0 else 0  # outside capture: compilation, cuBLAS
            saved = [(c.clone(), s.clone()) for c, s in self.kv.states.values()] if warmups else None
            for _ in range(warmups):
                self.pos_dev.copy_(self.pos_host, non_blocking=True)
                self._step()
            if saved is not None:
                for (conv, state), (conv0, state0) in zip(self.kv.states.values(), saved, strict=True):
                    conv.copy_(conv0)
                    state.copy_(state0)
            self.stream.synchronize()
            self.capturing = True
            self.serve_layers = []
            try:
                self._begin_graph()
                self.pos_dev.copy_(self.pos_host, non_blocking=True)
                self._step()
                self._end_graph()
                if self.serve_layers:
                    self.plan.append(("serve", self._serve_table()))
                self.captures += 1
            except BaseException:
                # a half-captured plan would replay part of a step: end any open capture, keep no plan
                try:
                    self.graph.capture_end()
                except RuntimeError:
                    pass
                self.plan = None
                raise
            finally:
                self.capturing = False
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def _replay(self) -> None:
        ok = False
        events = None
        if self.gpu_step_log is not None:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            events[0].record(self.stream)
        try:
            with torch.cuda.stream(self.stream):
                for item in self.plan:
                    if item[0] == "graph":
                        item[1].replay()
                    elif item[0] == "record":
                        item[1].record(self.stream)
                    elif item[0] == "serve":
                        self._serve(item[1])
                    else:
                        self._cpu_experts(item[1], item[2])
            if events is not None:
                events[1].record(self.stream)
            ok = True
        finally:  # also when a CPU step raises: nothing launched may still run into the next prefill
            if not ok and self.flags is not None:
                # cut short before the native call released the layers (an exception between the replay and the
                # serve call): release them from here, or the graph would wait on them forever
                for i in self.serve_layers:
                    self.flags.release(2 * i + 1)
            self.stream.synchronize()
            if not ok and self.flags is not None:
                self.flags.reset()  # a step cut short may have left a flag set
        if events is not None:
            self.gpu_step_log.append(events[0].elapsed_time(events[1]) / 1e3)

    # ---------------------------------------------------------------- decode
    @torch.inference_mode()
    def decode(self, token: int, cache: KVCache) -> torch.Tensor:
        called = started = time.perf_counter()
        if getattr(cache, "epoch", self.epoch) != self.epoch:
            raise KrsError("another sequence has taken the GPU KV cache since this one started: the GPU engine "
                           "holds one sequence at a time")
        pos = cache.length
        if pos >= self.context:
            raise KrsError(f"the GPU KV cache holds {self.context} tokens (--context)")
        if self.hot_pending:
            self.hot_pending = False
            placing = time.perf_counter()
            if self.hot_bytes and not self.hot_kept:
                self._load_hot()
            if self.remote_share:
                self._place_remote()
            self.setup["hot_load_s"] = time.perf_counter() - placing
        self.embed_host.copy_(self.embed_table[token:token + 1])
        self.pos_host.fill_(pos)
        if self.use_graphs:
            if self.plan is None:
                capturing = time.perf_counter()
                self._capture()  # the warm-up steps wrote K/V at `pos` too; the replay overwrites them
                self.setup["capture_s"] = time.perf_counter() - capturing
                self.timing = dict.fromkeys(self.timing, 0)
                started = time.perf_counter()  # capture is a one-off: count the steps from here
            self._replay()
        else:
            self.pos_dev.copy_(self.pos_host)
            self._step()
            if self.cuda:
                torch.cuda.synchronize(self.device)
        cache.advance(pos + 1)
        # a pageable copy for the caller: clone() of the pinned buffer would allocate pinned memory again
        logits = torch.empty(self.logits_host.shape, dtype=self.logits_host.dtype)
        logits.copy_(self.logits_host)
        ended = time.perf_counter()
        self.timing["steps"] += 1
        self.timing["step_s"] += ended - started
        self.step_log.append(ended - called)
        return logits

    def close(self) -> None:
        self.plan = None
