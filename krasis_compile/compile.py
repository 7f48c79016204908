"""The compile pipeline: resolve -> read config -> map names -> plan layout -> quantize and write, layer by layer."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from krasis_run.codecs import encode_parts
from krasis_run.format import CODECS, DENSE_CODECS, Q4_GROUP, Q4_GROUPS

from . import __version__
from .checkpoint import Checkpoint, CompileError, read_json, resolve
from .layout import KIND_CODEC, Group, PlannedChunk, cpu_block_parts, plan_chunks
from .models import deepseek_v2, deepseek_v3, qwen3_5_moe, qwen3_moe, qwen3_next
from .quantize import ROUNDINGS, quantize
from .writer import ArtifactWriter

ARCHITECTURES = {name: m for m in (qwen3_moe, qwen3_next, qwen3_5_moe, deepseek_v2, deepseek_v3)
                 for name in getattr(m, "ARCHITECTURES", (m.ARCHITECTURE,))}
EXPERT_SLICE_BYTES = 64 << 20  # bf16 experts loaded per step; quantize() works on smaller pieces
ERROR_PLACEHOLDER = f"{0.0:.6e}"


@dataclass
class ErrorStats:
    """Relative L2 quantization error over all tensors of one kind: sqrt(sum err^2 / sum w^2)."""

    sq_err: dict[str, float] = field(default_factory=dict)
    sq_norm: dict[str, float] = field(default_factory=dict)

    def add(self, kind: str, original: torch.Tensor, sq_err: torch.Tensor) -> None:
        self.sq_err[kind] = self.sq_err.get(kind, 0.0) + float(sq_err)
        self.sq_norm[kind] = self.sq_norm.get(kind, 0.0) + float(original.float().square().sum())

    def relative(self) -> dict[str, str]:
        return {k: f"{math.sqrt(self.sq_err[k] / max(self.sq_norm[k], 1e-30)):.6e}" for k in self.sq_err}


@dataclass
class CompileReport:
    out: Path
    file_size: int
    bytes_read: int
    seconds: float
    peak_rss: int
    quant_error: dict[str, str]


def _tokenizer_files(folder: Path) -> tuple[bytes, dict, str | None]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CompileError(f"{folder} has no tokenizer.json (only fast tokenizers are supported)")
    tok_config = read_json(folder, "tokenizer_config.json", required=False)
    template = tok_config.pop("chat_template", None)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text()
    tok_config.pop("added_tokens_decoder", None)  # already in tokenizer.json
    return path.read_bytes(), tok_config, template


def _compress(data: bytes) -> tuple[bytes, str]:
    try:
        import zstandard
    except ImportError:
        return data, "none"
    return zstandard.ZstdCompressor(level=10).compress(data), "zstd"


def _write_dense(w: ArtifactWriter, group: Group, chunk: PlannedChunk, dense_codec: str, stats: ErrorStats,
                 rounding: str, q4_group: int) -> None:
    for spec, planned in zip(group.tensors, chunk.tensors, strict=True):
        weight = spec.load()
        codec = KIND_CODEC.get(spec.kind, dense_codec)
        if codec == "f32":
            encoded = {"w": weight.float()}
        else:
            quantized = quantize(codec, weight, rounding, q4_group)
            if spec.kind == "matrix":
                stats.add("dense", weight, quantized["sq_err"])
            encoded = encode_parts(codec, "rows", quantized)
        for part in planned.parts:
            w.write(planned.name, part, encoded[part])


def _write_experts(w: ArtifactWriter, group: Group, codec: str, sections: tuple[str, ...], stats: ErrorStats,
                   rounding: str, q4_group: int) -> None:
    src = group.experts
    per_expert = 2 * (math.prod(src.gate_up_shape) + math.prod(src.down_shape))
    step = max(1, EXPERT_SLICE_BYTES // per_expert)
    gpu_gate_up: list[dict] = []
    gpu_down: list[dict] = []
    cpu_blocks: list[dict] = []
    for start in range(0, src.count, step):
        gate_up, down = src.load(start, min(start + step, src.count))
        q_gate_up, q_down = quantize(codec, gate_up, rounding, q4_group), quantize(codec, down, rounding, q4_group)
        stats.add("experts", gate_up, q_gate_up["sq_err"])
        stats.add("experts", down, q_down["sq_err"])
        if "gpu" in sections:
            gpu_gate_up.append(encode_parts(codec, "rows", {k: v for k, v in q_gate_up.items() if k != "sq_err"}))
            gpu_down.append(encode_parts(codec, "rows", {k: v for k, v in q_down.items() if k != "sq_err"}))
        if "cpu" in sections:
            cpu_blocks += [cpu_block_parts(codec, q_gate_up, q_down, e) for e in range(gate_up.shape[0])]
        del gate_up, down, q_gate_up, q_down
    if "gpu" in sections:
        for name, slices in ((group.gpu_gate_up, gpu_gate_up), (group.gpu_down, gpu_down)):
            for part in w.tensors[name].parts:
                w.write(name, part, torch.cat([s[part] for s in slices]))
    if "cpu" in sections:
        planned = w.tensors[group.cpu_blocks]
        for e, parts in enumerate(cpu_blocks):
            for part in planned.parts:
                w.write(group.cpu_blocks, part, parts[part], expert=e)


def compile_model(model: str, out: str | Path, quant: str = "q4", dense_quant: str = "q8",
                  sections: tuple[str, ...] = ("gpu", "cpu"), revision: str | None = None,
                  progress: bool = True, rounding: str = "refit", q4_group: int = Q4_GROUP) -> CompileReport:
    if quant not in CODECS:
        raise CompileError(f"--quant must be one of {', '.join(CODECS)}, not {quant!r}")
    if dense_quant not in DENSE_CODECS:
        raise CompileError(f"--dense-quant must be one of {', '.join(DENSE_CODECS)}, not {dense_quant!r}")
    if rounding not in ROUNDINGS:
        raise CompileError(f"--rounding must be one of {', '.join(ROUNDINGS)}, not {rounding!r}")
    if q4_group not in Q4_GROUPS:
        raise CompileError(f"--q4-group must be one of {', '.join(map(str, Q4_GROUPS))}, not {q4_group}")
    if not sections or set(sections) - {"gpu", "cpu"}:
        raise CompileError("--sections takes gpu, cpu or gpu,cpu")
    started = time.perf_counter()
    source = resolve(model, revision)
    config = read_json(source.folder, "config.json")
    architecture = (config.get("architectures") or [None])[0]
    arch = ARCHITECTURES.get(architecture)
    if arch is None:
        raise CompileError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    quantized = (config.get("quantization_config") or {}).get("quant_method")
    if quantized:
        raise CompileError(f"checkpoint is already quantized ({quantized}): krasis-compile takes the BF16 release")
    args = arch.ModelArgs.from_hf(config)
    tokenizer_json, tokenizer_config, chat_template = _tokenizer_files(source.folder)
    ckpt = Checkpoint(source.folder)
    groups = arch.groups(ckpt, args)
    blob, compression = _compress(tokenizer_json)
    chunks = plan_chunks(groups, quant, dense_quant, sections, {"tokenizer.json": len(blob)}, q4_group)
    stats = ErrorStats()
    header = {
        "architecture": architecture,
        "config": config,
        "generation_config": read_json(source.folder, "generation_config.json", required=False),
        "tokenizer": {"blob": "tokenizer.json", "config": tokenizer_config, "chat_template": chat_template},
        "quant": {
            "experts": quant, "dense": dense_quant, "rounding": rounding, "q4_group": q4_group,
            "rel_l2_error": {"experts": ERROR_PLACEHOLDER, "dense": ERROR_PLACEHOLDER},
        },
        "sections": list(sections),
        "source": source.description,
        "compiler": {"name": "krasis-compile", "version": __version__},
        "blobs": {"tokenizer.json": {"compression": compression, "raw_length": len(tokenizer_json)}},
    }
    chunk_of = {c.name: c for c in chunks}
    with ArtifactWriter(Path(out), header, chunks) as w:
        w.write("tokenizer.json", None, blob)
        for group in tqdm(groups, desc="compile", unit="layer", disable=not progress):
            dense_chunk = chunk_of[group.name if group.layer is None else f"{group.name}.dense"]
            _write_dense(w, group, dense_chunk, dense_quant, stats, rounding, q4_group)
            if group.experts is not None:
                _write_experts(w, group, quant, sections, stats, rounding, q4_group)
        header["quant"]["rel_l2_error"].update(stats.relative())
        size = w.finish()
    return CompileReport(
        out=Path(out), file_size=size, bytes_read=ckpt.bytes_read, seconds=time.perf_counter() - started,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, quant_error=stats.relative(),
    )
