"""What lives where, decided once from the artifact header, the machine and the GPU budget.

Decode runs on the CPU from the CPU expert blocks, in place in the mapping. Prefill runs on the GPU
when there is one: dense weights resident (bf16), as many whole expert layers resident as the budget
leaves room for after the streaming buffers and the prefill workspace, the rest streamed per prefill.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from .artifact import Artifact
from .format import SECTION_EXPERTS_CPU, SECTION_EXPERTS_GPU, KrsError

GIB = 1 << 30
SAFETY_MARGIN = GIB  # left free on the card for the CUDA context, allocator slack, other users
WORKSPACE_TOKENS = 32768  # the prefill workspace is sized for a prompt this long
STREAM_DEPTH = 2


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


def _dense_vram(artifact: Artifact) -> int:
    """Dense weights as the GPU holds them: matrices bf16, norms and routers float32 (embeddings stay host)."""
    total = 0
    for name, spec in artifact.header["tensors"].items():
        if artifact.chunks[spec["chunk"]].section in (SECTION_EXPERTS_CPU, SECTION_EXPERTS_GPU) or name == "embed":
            continue
        numel = torch.Size(spec["shape"]).numel()
        total += numel * (4 if spec["codec"] == "f32" or name.endswith(".router") else 2)
    return total


def _workspace(config: dict, tokens: int) -> int:
    """Peak prefill memory beyond the weights at `tokens` prompt tokens: one layer's experts dequantized to
    bf16, the expert step's token chunk, and the attention-side activations, whose per-token size was
    calibrated against torch.cuda.max_memory_allocated on the 30B-A3B shape (docs/BENCHMARKS.md)."""
    h = config["hidden_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    e = config.get("num_experts") or config.get("num_local_experts") or 0
    inter = config.get("moe_intermediate_size", 0)
    experts_bf16 = e * 3 * inter * h * 2
    per_token = h * 4 * 6 + (heads + 2 * kv) * hd * 4 * 5 + heads * hd * 6  # fp32 residual/norm/rope temporaries
    expert_chunk = min(tokens, 4096) * config.get("num_experts_per_tok", 1) * (3 * inter + 3 * h) * 2
    return experts_bf16 + tokens * per_token + expert_chunk


def plan(artifact: Artifact, device: str = "auto", gpu_budget: str | int | None = None) -> Placement:
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
    dense = _dense_vram(artifact)
    stream = STREAM_DEPTH * max(layers.values(), default=0)
    workspace = _workspace(artifact.header["config"], WORKSPACE_TOKENS)
    room = budget - dense - workspace
    if room < 0:
        raise KrsError(f"--gpu-budget {budget / GIB:.1f} GiB is too small: dense weights and the prefill workspace "
                       f"need {(dense + workspace) / GIB:.1f} GiB (use --device cpu)")
    count = len(layers) if room >= sum(layers.values()) else max(0, int((room - stream) // max(layers.values())))
    order = sorted(layers)
    resident = frozenset(order[round(i * len(order) / count)] for i in range(count)) if count else frozenset()
    vram = dict(dense=dense, workspace=workspace, stream_buffers=0 if count == len(layers) else stream,
                resident_experts=sum(layers[i] for i in resident))
    return Placement("cuda", "cpu", SECTION_EXPERTS_CPU, mapped, section, budget, resident, vram)


def place_weights(artifact: Artifact, placement: Placement) -> dict:
    """Artifact tensor name -> what the engines consume: views for matrices, float tensors for small vectors."""
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
        elif name.endswith(".router"):
            weights[name] = view.parts["w"].float()  # routing decisions in float32, as in the reference
        else:
            weights[name] = view
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
