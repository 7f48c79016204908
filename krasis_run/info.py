"""`krasis-inspect ART [--verify] [--json]`: what an artifact holds, from its header, without loading weights.

The same summary feeds the model card that krasis-compile writes beside an artifact and the memory
figures the `krasis` launcher shows.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

import typer

from .console import run_app
from .format import (
    SECTION_BLOB,
    SECTION_DENSE,
    SECTION_EXPERTS_CPU,
    SECTION_EXPERTS_GPU,
    SECTION_GLOBAL,
    KrsError,
)

SECTION_LABELS = {
    SECTION_BLOB: "tokenizer blob",
    SECTION_GLOBAL: "embeddings + head",
    SECTION_DENSE: "dense (attention, norms, routers)",
    SECTION_EXPERTS_GPU: "experts, GPU tiles",
    SECTION_EXPERTS_CPU: "experts, CPU blocks",
}


@dataclass
class Summary:
    path: str
    file_size: int
    format_version: int
    architecture: str
    supported: bool
    compiler: dict
    source: dict
    layers: int
    moe_layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    experts: int
    experts_per_token: int
    vocab_size: int
    context_length: int
    quant: dict
    sections: dict[str, int] = field(default_factory=dict)  # section -> bytes
    header_bytes: int = 0
    tokenizer: dict = field(default_factory=dict)
    ram_decode: int = 0  # bytes the CPU decode maps (everything but the GPU tiles)
    vram_dense: int = 0  # dense weights as the GPU prefill holds them (bf16 matrices, f32 vectors)
    vram_expert_layer: int = 0  # one layer's GPU expert tiles
    vram_all_experts: int = 0
    chat_template: bool = False

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def summarize(artifact) -> Summary:
    """Everything below comes from the (already validated) header and chunk table."""
    from .models import MODELS

    h = artifact.header
    config = h.get("config") or {}
    config = {**config, **(config.get("text_config") or {})}  # multimodal hub configs nest the text model's
    sections: dict[str, int] = {}
    for chunk in artifact.chunks.values():
        sections[chunk.section] = sections.get(chunk.section, 0) + chunk.length
    expert_layers = {c.layer: c.length for c in artifact.chunks.values() if c.section == SECTION_EXPERTS_GPU}
    vram_dense = 0
    for name, spec in h.get("tensors", {}).items():
        section = artifact.chunks[spec["chunk"]].section
        if section in (SECTION_EXPERTS_CPU, SECTION_EXPERTS_GPU) or name == "embed":
            continue
        numel = 1
        for d in spec.get("shape", []):
            numel *= d
        vram_dense += numel * (4 if spec.get("codec") == "f32" or name.endswith(".router") else 2)
    blob = (h.get("blobs") or {}).get("tokenizer.json", {})
    tok = h.get("tokenizer") or {}
    experts = config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts") or 0
    moe_layers = len({c.layer for c in artifact.chunks.values()
                      if c.section in (SECTION_EXPERTS_CPU, SECTION_EXPERTS_GPU)})
    return Summary(
        path=str(artifact.path), file_size=artifact.file_size, format_version=artifact.version,
        architecture=str(h.get("architecture")), supported=h.get("architecture") in MODELS,
        compiler=h.get("compiler") or {}, source=h.get("source") or {},
        layers=int(config.get("num_hidden_layers", 0)), moe_layers=moe_layers,
        hidden_size=int(config.get("hidden_size", 0)), attention_heads=int(config.get("num_attention_heads", 0)),
        kv_heads=int(config.get("num_key_value_heads", 0)), experts=int(experts),
        experts_per_token=int(config.get("num_experts_per_tok", 0)), vocab_size=int(config.get("vocab_size", 0)),
        context_length=int(config.get("max_position_embeddings", 0)), quant=h.get("quant") or {},
        sections=sections, header_bytes=artifact.data_start,
        tokenizer={"compression": blob.get("compression"), "stored_bytes": blob.get("length"),
                   "raw_bytes": blob.get("raw_length")},
        ram_decode=sum(n for s, n in sections.items() if s != SECTION_EXPERTS_GPU),
        vram_dense=vram_dense, vram_expert_layer=max(expert_layers.values(), default=0),
        vram_all_experts=sum(expert_layers.values()), chat_template=bool(tok.get("chat_template")),
    )


def source_text(source: dict) -> str:
    if source.get("kind") == "hub":
        return f"{source.get('repo_id')} (Hub, revision {source.get('revision')}, commit {source.get('commit')})"
    if source.get("kind") == "folder":
        return f"{source.get('path')} (local folder)"
    return "unknown"


def render(s: Summary) -> str:
    q = s.quant
    err = q.get("rel_l2_error") or {}
    lines = [
        f"{s.path}: {size(s.file_size)}, krs format version {s.format_version}, "
        f"compiled by {s.compiler.get('name', '?')} {s.compiler.get('version', '?')}",
        f"architecture  {s.architecture}" + ("" if s.supported else "  (not supported by this krasis)"),
        f"model         {s.layers} layers ({s.moe_layers} MoE), hidden {s.hidden_size}, "
        f"{s.attention_heads}/{s.kv_heads} attention/KV heads, {s.experts} experts (top-{s.experts_per_token}), "
        f"vocab {s.vocab_size}, context {s.context_length}",
        f"quantization  experts {q.get('experts')}, dense {q.get('dense')}, q4 groups of {q.get('q4_group', 32)}, "
        f"rounding {q.get('rounding')}; "
        f"rel. L2 error experts {err.get('experts')}, dense {err.get('dense')}",
        f"source        {source_text(s.source)}",
        "sections",
        f"  {'header':36s} {size(s.header_bytes):>12s}",
    ]
    for section, label in SECTION_LABELS.items():
        if section in s.sections:
            share = 100 * s.sections[section] / max(s.file_size, 1)
            lines.append(f"  {label:36s} {size(s.sections[section]):>12s}  {share:5.1f}%")
    t = s.tokenizer
    if t.get("raw_bytes"):
        lines.append(f"tokenizer     {size(t['raw_bytes'])} stored as {size(t.get('stored_bytes') or 0)} "
                     f"({t.get('compression')}); chat template {'yes' if s.chat_template else 'no'}")
    lines.append(f"memory        RAM to decode at full speed ~{size(s.ram_decode)} (mapped, page cache)")
    if s.vram_all_experts:
        lines.append(f"              GPU prefill (optional): dense {size(s.vram_dense)} bf16 + "
                     f"{size(s.vram_expert_layer)} per expert layer resident "
                     f"({size(s.vram_all_experts)} for all {s.moe_layers})")
    return "\n".join(lines)


def unsupported_message(s: Summary) -> str:
    from .models import MODELS

    by = s.compiler.get("version")
    return (f"artifact is for architecture {s.architecture!r}, which this krasis does not support "
            f"(supported: {', '.join(sorted(MODELS))})" + (f"; it was compiled by krasis {by}: upgrade krasis to "
                                                          f"at least {by}" if by else ""))


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(help="Print what a .krs artifact holds (architecture, layers, experts, quantization, section sizes, "
                  "source, format version, memory it needs) from its header; --verify checks every chunk.")
def inspect_cmd(
    artifact: str = typer.Argument(..., help="A .krs artifact, or hf://ORG/REPO/FILE.krs."),
    verify: bool = typer.Option(False, "--verify", help="Check every chunk's CRC32 (reads the whole file)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    from .artifact import Artifact
    from .hub import resolve_artifact

    art = Artifact(resolve_artifact(artifact))
    s = summarize(art)
    print(s.as_json() if as_json else render(s), flush=True)
    if verify:
        art.verify(progress=sys.stderr.isatty())
        print(f"verify        all {len(art.chunks)} chunks match their CRC32", flush=True)
    if not s.supported:
        raise KrsError(unsupported_message(s))


def main() -> None:
    run_app(app, "krasis-inspect")
