"""What lives where, decided once from the artifact header, the machine and the GPU budget.

Without a GPU everything runs on the CPU from the mapping. With one, prefill and decode both use it:
dense weights resident (bf16), the KV cache for `context` tokens in VRAM, then as many whole expert
layers resident as the budget leaves room for after the streaming buffers and the prefill workspace;
the other layers' experts stream through VRAM during prefill and are computed on the CPU (from the
CPU expert blocks, in place in the mapping) during decode.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .artifact import Artifact, RowsStack
from .cache import CacheLayout
from .format import SECTION_EXPERTS_CPU, SECTION_EXPERTS_GPU, KrsError

GIB = 1 << 30
SAFETY_MARGIN = GIB  # left free on the card for the CUDA context, allocator slack, other users
WORKSPACE_TOKENS = 32768  # the prefill workspace is sized for a prompt this long (or the context, if shorter)
DEFAULT_CONTEXT = 32768  # tokens of KV cache reserved in VRAM unless --context says otherwise
STREAM_DEPTH = 2
ATTENTION_TOKEN_CHUNK = 4096  # GPU prefill runs each layer's attention half over this many tokens at a time
EXPERT_TOKEN_CHUNK = 4096  # ... and its expert step (prefill_gpu.py) at least this many tokens at a time,
EXPERT_ROWS = 256  # or as many as give each expert about this many rows per grouped GEMM pass
DEQUANT_SLICE_BYTES = 64 << 20  # a prompt's GEMM takes a q8 matrix dequantized to bf16 this many bytes at a time
DEQUANT_KEPT = 3  # the last few q8 matrices dequantized whole stay for the next call (a layer run in token slices)
GPU_Q8_DENSE = True  # False: every dense matrix dequantized to bf16 in VRAM (the layout before; benchmarks compare)


def expert_token_chunk(experts: int, top_k: int) -> int:
    """Tokens per grouped-GEMM pass of the prefill's expert step: 4096 on the 30B-A3B shape (128 experts, top 8: 256
    rows an expert); 16384 for Qwen3-Coder-Next's 512 experts, top 10, where 4096 tokens gave each expert 80 rows and
    the 32K prefill ran 10% slower (41.3K against 45.7K tok/s on its 16-layer block, docs/BENCHMARKS.md)."""
    want = EXPERT_ROWS * max(experts, 1) / max(top_k, 1)
    return max(EXPERT_TOKEN_CHUNK, 1 << math.ceil(math.log2(want)))


@dataclass(frozen=True)
class Placement:
    prefill_device: str
    decode_device: str
    expert_section: str  # the expert layout the CPU engine reads
    mapped_bytes: int  # bytes of the artifact the engines read through the mapping
    prefill_section: str = SECTION_EXPERTS_CPU  # the expert layout the GPU prefill streams
    gpu_budget: int = 0
    resident_layers: frozenset = field(default_factory=frozenset)
    vram_plan: dict = field(default_factory=dict)  # bytes by purpose, for the user and the benchmark
    context: int = 0  # tokens the GPU KV cache holds (0: the cache lives on the CPU)


def parse_size(text: str) -> int:
    """'16GiB', '16G', '512MiB', '1.5TB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise KrsError(f"cannot read size {text!r}: write e.g. 16GiB or 12000MiB")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    scale = (1024 if binary or unit == "" else 1000) ** "_KMGT".index(unit or "_")
    return int(value * scale)


def _layer_bytes(artifact: Artifact, section: str) -> dict[int, int]:
    return {c.layer: c.length for c in artifact.chunks.values() if c.section == section}


def gpu_keeps_quantized(name: str, codec: str, direct: tuple[str, ...] = ()) -> bool:
    """Whether the GPU holds dense matrix `name` as stored, q8 rows (one byte a weight and a bf16 scale a row), rather
    than dequantized to bf16: a one-token step reads half the bytes. `direct`: name suffixes of matrices the
    architecture reads itself rather than through ops.linear (kept bf16)."""
    return GPU_Q8_DENSE and codec == "q8" and not name.endswith(".router") and \
        not (direct and name.endswith(tuple(direct)))


def _dense_vram(artifact: Artifact, direct: tuple[str, ...] = ()) -> int:
    """Dense weights as the GPU holds them: q8 matrices as stored (gpu_keeps_quantized), other matrices bf16, norms
    and routers float32 (embeddings stay on the host); plus the bf16 slice a prompt's GEMM dequantizes a q8 matrix
    into (at most DEQUANT_SLICE_BYTES), and the DEQUANT_KEPT matrices dequantized whole that it keeps."""
    total = slice_bytes = kept_bytes = 0
    for name, spec in artifact.header["tensors"].items():
        if artifact.chunks[spec["chunk"]].section in (SECTION_EXPERTS_CPU, SECTION_EXPERTS_GPU) or name == "embed":
            continue
        shape = torch.Size(spec["shape"])
        if gpu_keeps_quantized(name, spec["codec"], direct):
            total += shape.numel() + 2 * shape[0]
            slice_bytes = max(slice_bytes, min(DEQUANT_SLICE_BYTES, 2 * shape.numel()))
            if 2 * shape.numel() <= DEQUANT_SLICE_BYTES:
                kept_bytes = max(kept_bytes, 2 * shape.numel())
        else:
            total += shape.numel() * (4 if spec["codec"] == "f32" or name.endswith(".router") else 2)
    return total + slice_bytes + DEQUANT_KEPT * kept_bytes


def _workspace(config: dict, tokens: int, codec: str = "q4", attention_chunk: int | None = None,
               per_token: Callable[[int], int] | None = None) -> int:
    """Peak GPU prefill memory beyond the weights at `tokens` prompt tokens, for the engine as configured:
    attention over the whole prompt at once (the default: flash attention runs causal only for square
    blocks, and chunks ran through a slower kernel, 16.7K against 20.2K tok/s at 32K on the H200) or in
    `attention_chunk`-token slices. Whole-prompt attention keeps the per-token constant calibrated against
    torch.cuda.max_memory_allocated on the 30B-A3B shape (docs/BENCHMARKS.md); the chunked estimate below
    was exceeded by 2.1 GiB at 32K (measured 5.65 GiB) and is kept only as the lower of the two bounds.
    `per_token(generic)`: the architecture's bytes per prompt token in place of the generic count (its own attention's
    temporaries differ: MLA's expanded keys, a hybrid's few full-attention layers)."""
    chunked = _workspace_chunked(config, tokens, codec, attention_chunk or ATTENTION_TOKEN_CHUNK)
    if attention_chunk is not None:
        return chunked + (chunked >> 1)  # the measured overshoot (+60%) covered until it is explained
    h = config["hidden_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    e = config.get("num_experts") or config.get("num_local_experts") or 0
    inter = config.get("moe_intermediate_size", 0)
    generic = h * 4 * 6 + (heads + 2 * kv) * hd * 4 * 5 + heads * hd * 6  # fp32 residual/norm/rope temporaries
    per_token = per_token(generic) if per_token is not None else generic
    top_k = config.get("num_experts_per_tok", 1)
    expert_chunk = min(tokens, expert_token_chunk(e, top_k)) * top_k * (3 * inter + 3 * h) * 2
    return max(chunked, e * 3 * inter * h * 2 + tokens * per_token + expert_chunk)


def _workspace_chunked(config: dict, tokens: int, codec: str, attention_chunk: int) -> int:
    """Peak GPU prefill memory beyond the weights and stream buffers at `tokens` prompt tokens (an upper bound
    of torch.cuda.max_memory_allocated minus them), counted from the tensors alive at the peak.

    Attention runs in ATTENTION_TOKEN_CHUNK slices (Model.forward(token_chunk=...)), so the peak is in the
    expert step (H hidden, I expert width, k experts per token, bytes):
    - per prompt token, alive through the whole step: residual x fp32 4H, its normed copy fp32 4H (the
      caller holds it), that copy in bf16 2H (one conversion a layer), the expert output fp32 4H; rope cos/sin
      fp32 2*4*head_dim; K/V bf16 of this layer held whole on the device (2*2*kv*hd) and the K/V of this and the
      previous layer kept for their copy to the host (2 * 2*2*kv*hd), bounded by CacheWriter; top-k ids int64 +
      weights fp32 12k;
    - per routed row of one expert_token_chunk (chunk tokens * k rows): int64 ids/order/inverse/arange/index
      40, gathered x bf16 2H, gate_up output bf16 4I, silu(gate) and its product with up 2I + 2I, y bf16 2H,
      and for the torch combine (no Triton) the rows gathered back to token order 2H;
    - the layer's experts dequantized to bf16 (E*3*I*H*2), plus what dequant allocates besides its output:
      nothing for q4 through the Triton kernels (both layouts), one gate_up's worth (twice, to be safe) for q8,
      and the float32 temporaries of the torch q4 reference (7 gate_ups) when Triton is missing.
    The attention half at the same T stays below that: x, cos/sin and the K/V as above, plus per chunk token
    norm temporaries 12H, bf16 projections, attention output and its copy (8*heads*hd + 8*kv*hd + 4H).
    Dense-MLP layers (if any) hold [T, 2*intermediate] bf16 and friends instead of the expert terms.
    Margin: +15% and 256 MiB for what is not counted (GEMM/sort workspaces, allocator rounding).
    The per-token constant this replaces (176 KB/token, calibrated on the H200 before attention was chunked)
    was dominated by every layer's K/V kept until the end of the prefill and whole-prompt q/k/v temporaries."""
    h = config["hidden_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    e = config.get("num_experts") or config.get("num_local_experts") or 0
    inter = config.get("moe_intermediate_size", 0)
    top_k = config.get("num_experts_per_tok", 1)
    gate_up_bf16 = e * 2 * inter * h * 2
    experts_bf16 = e * 3 * inter * h * 2
    if codec == "q4":
        experts_bf16 += 0 if importlib.util.find_spec("triton") is not None else 7 * gate_up_bf16
    elif codec == "q8":
        experts_bf16 += 2 * gate_up_bf16
    kv_token = 2 * kv * hd * 2  # K and V of one token of one layer, bf16
    whole = tokens * (4 * h + 8 * hd + 4 * kv_token)  # residual, cos/sin, this layer's K/V (+ cat), 2 layers pending
    expert_step = (tokens * (4 * h + 2 * h + 4 * h + 12 * top_k)
                   + min(tokens, expert_token_chunk(e, top_k)) * top_k * (40 + 6 * h + 8 * inter) + experts_bf16)
    dense_inter = config.get("intermediate_size", 0) if (config.get("mlp_only_layers") or
                                                         config.get("decoder_sparse_step", 1) > 1 or not e) else 0
    dense_step = tokens * (4 * h + 2 * h + 8 * dense_inter + 2 * h)
    attention_step = min(tokens, attention_chunk) * (12 * h + 8 * heads * hd + 8 * kv * hd + 4 * h)
    peak = whole + max(expert_step, dense_step, attention_step)
    return int(peak * 1.15) + (256 << 20)


def prefill_workspace(config: dict, tokens: int, codec: str, per_token: Callable[[int], int] | None = None) -> int:
    """The prefill workspace plan() counts for a prompt of `tokens` (plan reserves it for the longest one)."""
    return _workspace(model_config(config), tokens, codec, per_token=per_token)


def kv_cache_bytes(config: dict, tokens: int) -> int:
    """K and V of every layer in bf16."""
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * tokens * kv * hd * 2


def model_config(config: dict) -> dict:
    """The decoder's fields the estimates read, under one set of names: a multimodal hub config nests them in
    text_config; DeepSeek names its experts n_routed_experts and may leave out the KV heads (one per query head)."""
    config = {**config, **(config.get("text_config") or {})}
    config.setdefault("num_experts", config.get("num_local_experts") or config.get("n_routed_experts") or 0)
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    return config


def plan(artifact: Artifact, device: str = "auto", gpu_budget: str | int | None = None, context: int | None = None,
         max_resident_layers: int | None = None, cache_layout: CacheLayout | None = None,
         prefill_per_token: Callable[[int], int] | None = None, direct_matrices: tuple[str, ...] = ()) -> Placement:
    """`context`: tokens of KV cache to hold in VRAM (default: the model's, at most DEFAULT_CONTEXT);
    `max_resident_layers` caps the expert layers kept in VRAM (0 = every expert in RAM); `cache_layout` (the
    architecture's) sizes the KV cache and recurrent states, else K/V of every layer as num_key_value_heads x
    head_dim; `prefill_per_token(generic)` (the architecture's) sizes the prefill workspace per prompt token;
    `direct_matrices` (the architecture's DIRECT_MATRICES) are the dense matrices the GPU keeps in bf16."""
    if device not in ("cpu", "cuda", "auto"):
        raise KrsError(f"unknown device {device!r}: use cpu, cuda or auto")
    requested = parse_size(gpu_budget) if gpu_budget is not None else None
    sections = artifact.header.get("sections", [])
    if "cpu" not in sections:
        raise KrsError("artifact has no CPU expert blocks (compiled with --sections gpu): recompile with cpu")
    mapped = sum(c.length for c in artifact.chunks.values())
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise KrsError("--device cuda: no CUDA device is available to torch")
    if device == "cpu" or not cuda:
        return Placement("cpu", "cpu", SECTION_EXPERTS_CPU, mapped)
    section = SECTION_EXPERTS_GPU if "gpu" in sections else SECTION_EXPERTS_CPU
    free, _ = torch.cuda.mem_get_info()
    budget = requested if requested is not None else free - SAFETY_MARGIN
    layers = _layer_bytes(artifact, section)
    dense = _dense_vram(artifact, direct_matrices)
    stream = STREAM_DEPTH * max(layers.values(), default=0)
    config = model_config(artifact.header["config"])
    model_context = config.get("max_position_embeddings") or DEFAULT_CONTEXT
    context = min(context or DEFAULT_CONTEXT, model_context)
    if context < 1:
        raise KrsError("--context must be at least 1 token")
    kv = cache_layout.bytes(context) if cache_layout is not None else kv_cache_bytes(config, context)
    workspace = _workspace(config, min(context, WORKSPACE_TOKENS), artifact.header["quant"]["experts"],
                           per_token=prefill_per_token)
    room = budget - dense - workspace - kv
    if room < 0:
        raise KrsError(f"--gpu-budget {budget / GIB:.1f} GiB is too small: dense weights, the KV cache for {context} "
                       f"tokens and the prefill workspace need {(dense + kv + workspace) / GIB:.1f} GiB "
                       "(lower --context or use --device cpu)")
    if room < sum(layers.values()) and room < stream:
        raise KrsError(f"--gpu-budget {budget / GIB:.1f} GiB is too small: dense weights, the KV cache for {context} "
                       f"tokens, the prefill workspace and {STREAM_DEPTH} streaming buffers need "
                       f"{(dense + kv + workspace + stream) / GIB:.1f} GiB (lower --context or use --device cpu)")
    count = len(layers) if room >= sum(layers.values()) else max(0, int((room - stream) // max(layers.values())))
    if max_resident_layers is not None:
        count = min(count, max_resident_layers)
    order = sorted(layers)
    resident = frozenset(order[round(i * len(order) / count)] for i in range(count)) if count else frozenset()
    vram = dict(dense=dense, workspace=workspace, kv_cache=kv, stream_buffers=0 if count == len(layers) else stream,
                resident_experts=sum(layers[i] for i in resident))
    return Placement("cuda", "cuda", SECTION_EXPERTS_CPU, mapped, section, budget, resident, vram, context)


def place_weights(artifact: Artifact, placement: Placement, routers_in_place: bool = False) -> dict:
    """Artifact tensor name -> what the engines consume: views for matrices, float tensors for small vectors.
    Routers become float32 copies (routing decisions in float32, as in the reference) unless `routers_in_place`:
    the native CPU kernels read their bf16 rows in place with float32 activations and sums, the same numbers
    without the copy (torch's bf16 matmul would round the logits to bf16)."""
    weights = {}
    expert_sections = {SECTION_EXPERTS_CPU, SECTION_EXPERTS_GPU} - {placement.expert_section}
    for name, spec in artifact.header["tensors"].items():
        if artifact.chunks[spec["chunk"]].section in expert_sections:
            continue  # the other expert layout is for the other engine; never touch its pages
        view = artifact.tensor(name)
        if view.experts:  # the engines address a layer's experts by layer, whichever layout holds them
            weights[f"layers.{artifact.chunks[spec['chunk']].layer}.experts"] = view
        elif view.codec == "f32":
            weights[name] = view.parts["w"]  # norms and biases, used as they are in the mapping
        elif name.endswith(".router") and not routers_in_place:
            weights[name] = view.parts["w"].float()
        else:
            weights[name] = view
    return stack_qkv(weights, RowsStack.of)


QKV_ROLES = ("q_proj", "k_proj", "v_proj")


def stack_qkv(weights: dict, stack: Callable[[list], object | None]) -> dict:
    """`P.q_proj`, `P.k_proj`, `P.v_proj` (no biases) -> one `P.qkv_proj` = stack([q, k, v]) where that is not None:
    the model then makes one projection call for three (CPU: a RowsStack of the views in place, one native call; GPU:
    the matrices concatenated, one GEMV a decode step instead of three)."""
    for name in [n for n in weights if n.endswith(".q_proj")]:
        prefix = name[: -len("q_proj")]
        if any(prefix + r + "_bias" in weights for r in QKV_ROLES):
            continue
        stacked = stack([weights.get(prefix + r) for r in QKV_ROLES])
        if stacked is not None:
            weights[prefix + "qkv_proj"] = stacked
            for r in QKV_ROLES:
                del weights[prefix + r]
    return weights

def set_threads(threads: int | None) -> int:
    threads = threads or physical_cores()
    torch.set_num_threads(threads)
    return threads


def physical_cores() -> int:
    try:
        cores = set()
        physical = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    physical = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((physical, core))
        return max(1, len(cores))
    except OSError:
        return os.cpu_count() or 1
