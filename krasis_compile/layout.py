"""Where every byte goes: chunks, tensors and parts with their offsets, decided before any weight is read.

Sizes depend only on shapes and codecs, so the whole layout (and the header) is known up front:
the writer can then stream layer by layer and the disk-space check is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from krasis_run.codecs import encode_parts, interleave_gate_up, matrix_parts, part_nbytes
from krasis_run.format import (
    ALIGN,
    PART_ALIGN,
    Q4_GROUP,
    SECTION_BLOB,
    SECTION_DENSE,
    SECTION_EXPERTS_CPU,
    SECTION_EXPERTS_GPU,
    SECTION_GLOBAL,
    align_up,
)

from .checkpoint import Checkpoint, CompileError

KIND_CODEC = {"norm": "f32", "embed": "bf16", "router": "bf16"}  # "matrix" -> dense codec


@dataclass
class TensorSpec:
    """One non-expert tensor: its artifact name, kind (norm/embed/router/matrix), shape and loader."""

    name: str
    kind: str
    shape: list[int]
    load: Callable[[], torch.Tensor]

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, source: str, shape: list[int]) -> TensorSpec:
        if source not in ckpt:
            raise CompileError(f"checkpoint is missing tensor {source}")
        if ckpt.shape(source) != shape:
            raise CompileError(f"tensor {source} has shape {ckpt.shape(source)}, expected {shape}")
        return cls(source, "", shape, lambda: ckpt.get(source, shape))

    def named(self, name: str, kind: str) -> TensorSpec:
        return replace(self, name=name, kind=kind)


@dataclass
class ExpertSource:
    """A layer's routed experts: count, gate_up [2I, H] and down [H, I] shapes, and a slice loader."""

    count: int
    gate_up_shape: list[int]
    down_shape: list[int]
    load: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Group:
    """What one model section contributes: dense tensors, and for MoE layers the routed experts."""

    name: str
    layer: int | None
    tensors: list[TensorSpec]
    experts: ExpertSource | None = None
    gpu_gate_up: str = ""
    gpu_down: str = ""
    cpu_blocks: str = ""


@dataclass
class PlannedTensor:
    name: str
    codec: str
    layout: str
    shape: list[int]
    chunk: str
    offset: int = 0
    length: int = 0
    parts: dict[str, dict] = field(default_factory=dict)
    experts: int = 0
    expert_stride: int = 0
    matrices: dict[str, list[int]] = field(default_factory=dict)

    def header_entry(self) -> dict:
        entry = {k: getattr(self, k) for k in ("codec", "layout", "shape", "chunk", "offset", "length", "parts")}
        if self.experts:
            entry.update(experts=self.experts, expert_stride=self.expert_stride, matrices=self.matrices)
        return entry


@dataclass
class PlannedChunk:
    name: str
    section: str
    layer: int | None
    tensors: list[PlannedTensor]
    offset: int = 0
    length: int = 0


def _place_parts(table: dict[str, tuple[str, list[int]]]) -> tuple[dict[str, dict], int]:
    parts, cursor = {}, 0
    for name, (dtype, shape) in table.items():
        cursor = align_up(cursor, PART_ALIGN)
        parts[name] = {"offset": cursor, "dtype": dtype, "shape": shape}
        cursor += part_nbytes(dtype, shape)
    return parts, cursor


def plan_tensor(name: str, codec: str, layout: str, shape: list[int], chunk: str,
                group: int = Q4_GROUP) -> PlannedTensor:
    t = PlannedTensor(name, codec, layout, shape, chunk)
    t.parts, t.length = _place_parts(matrix_parts(codec, layout, shape, group))
    return t


def plan_cpu_blocks(name: str, codec: str, experts: ExpertSource, chunk: str, group: int = Q4_GROUP) -> PlannedTensor:
    """Per expert contiguous: gate_up parts then down parts, each expert starting on a page."""
    t = PlannedTensor(name, codec, "cpu_blocks", [experts.count], chunk, experts=experts.count)
    t.matrices = {"gate_up": experts.gate_up_shape, "down": experts.down_shape}
    table = {}
    for matrix, shape in t.matrices.items():
        for part, spec in matrix_parts(codec, "cpu_blocks", shape, group).items():
            table[f"{matrix}.{part}"] = spec
    t.parts, size = _place_parts(table)
    t.expert_stride = align_up(size, ALIGN)
    t.length = t.expert_stride * experts.count
    return t


def plan_chunks(groups: list[Group], expert_codec: str, dense_codec: str, sections: tuple[str, ...],
                blob_sizes: dict[str, int], q4_group: int = Q4_GROUP) -> list[PlannedChunk]:
    chunks = []
    if blob_sizes:
        blobs = [PlannedTensor(n, "blob", "raw", [size], "blobs", length=size) for n, size in blob_sizes.items()]
        chunks.append(PlannedChunk("blobs", SECTION_BLOB, None, blobs))
    for g in groups:
        section = SECTION_GLOBAL if g.layer is None else SECTION_DENSE
        chunk = g.name if g.layer is None else f"{g.name}.dense"
        dense = [
            plan_tensor(t.name, KIND_CODEC.get(t.kind, dense_codec), "rows", t.shape, chunk, q4_group)
            for t in g.tensors
        ]
        chunks.append(PlannedChunk(chunk, section, g.layer, dense))
        if g.experts is None:
            continue
        e = g.experts
        if "gpu" in sections:
            chunk = f"{g.name}.experts_gpu"
            chunks.append(PlannedChunk(chunk, SECTION_EXPERTS_GPU, g.layer, [
                plan_tensor(g.gpu_gate_up, expert_codec, "rows", [e.count, *e.gate_up_shape], chunk, q4_group),
                plan_tensor(g.gpu_down, expert_codec, "rows", [e.count, *e.down_shape], chunk, q4_group),
            ]))
        if "cpu" in sections:
            chunk = f"{g.name}.experts_cpu"
            chunks.append(PlannedChunk(chunk, SECTION_EXPERTS_CPU, g.layer, [
                plan_cpu_blocks(g.cpu_blocks, expert_codec, e, chunk, q4_group)
            ]))
    return chunks


def assign_offsets(chunks: list[PlannedChunk], data_start: int) -> int:
    """Give every chunk and tensor its absolute offset; returns the file size."""
    cursor = data_start
    for chunk in chunks:
        chunk.offset = cursor = align_up(cursor, ALIGN)
        for t in chunk.tensors:
            t.offset = cursor = align_up(cursor, PART_ALIGN)
            cursor += t.length
        chunk.length = cursor - chunk.offset
    return cursor


def cpu_block_parts(codec: str, quantized_gate_up: dict, quantized_down: dict, e: int) -> dict[str, torch.Tensor]:
    """Expert e's CPU block: gate/up rows interleaved, then packed in the CPU layout."""
    gate_up = {k: interleave_gate_up(v[e]) for k, v in quantized_gate_up.items() if k != "sq_err"}
    down = {k: v[e] for k, v in quantized_down.items() if k != "sq_err"}
    parts = {f"gate_up.{k}": v for k, v in encode_parts(codec, "cpu_blocks", gate_up).items()}
    parts.update({f"down.{k}": v for k, v in encode_parts(codec, "cpu_blocks", down).items()})
    return parts
