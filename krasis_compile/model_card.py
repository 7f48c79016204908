"""The model card (README.md) krasis-compile writes beside an artifact, ready for `hf upload`."""

from __future__ import annotations

from pathlib import Path

from krasis_run.artifact import Artifact
from krasis_run.info import SECTION_LABELS, Summary, size, source_text, summarize

MARKER = "<!-- written by krasis-compile: edit freely, or delete this line to keep it from being replaced -->"


def render_card(s: Summary, filename: str) -> str:
    q = s.quant
    err = q.get("rel_l2_error") or {}
    base = s.source.get("repo_id") if s.source.get("kind") == "hub" else None
    front = ["---", "library_name: krasis", "tags:", "- krasis", "- mixture-of-experts", f"- {q.get('experts')}"]
    if base:
        front += [f"base_model: {base}", "base_model_relation: quantized"]
    front.append("---")
    rows = [f"| header | {size(s.header_bytes)} |"]
    rows += [f"| {label} | {size(s.sections[sec])} |" for sec, label in SECTION_LABELS.items() if sec in s.sections]
    revision = ""
    if s.source.get("kind") == "hub":
        revision = f" at revision `{s.source.get('revision')}` (commit `{s.source.get('commit')}`)"
    title = f"{base.split('/')[-1] if base else Path(filename).stem} for krasis"
    lines = [
        *front,
        MARKER,
        "",
        f"# {title}",
        "",
        f"`{filename}` is a krasis artifact: one memory-mapped file with the "
        f"configuration, tokenizer, chat template and every weight of a {s.architecture} model, quantized and laid "
        "out for CPU decode and optional GPU prefill streaming.",
        "",
        f"- **Source**: {source_text(s.source) if not base else f'[{base}](https://huggingface.co/{base})'}{revision}",
        f"- **Model**: {s.layers} layers ({s.moe_layers} MoE), {s.experts} experts, top-{s.experts_per_token}, "
        f"hidden {s.hidden_size}, vocab {s.vocab_size}, context {s.context_length} tokens",
        f"- **Quantization**: routed experts `{q.get('experts')}`, dense matrices `{q.get('dense')}` "
        f"(q4: a scale and zero per {q.get('q4_group', 32)} weights; rounding `{q.get('rounding')}`); relative L2 "
        f"weight error: experts {err.get('experts')}, "
        f"dense {err.get('dense')}",
        f"- **File**: {size(s.file_size)}, krs format version {s.format_version}, compiled by "
        f"{s.compiler.get('name')} {s.compiler.get('version')}: needs krasis {s.compiler.get('version')} or newer",
        f"- **RAM**: about {size(s.ram_decode)} to decode at full speed (the CPU sections, read in place from the "
        "page cache; less RAM still runs, at disk speed)",
    ]
    if s.vram_all_experts:
        lines.append(f"- **VRAM** (optional, GPU prefill): dense weights {size(s.vram_dense)} as bf16, plus "
                     f"{size(s.vram_expert_layer)} per expert layer kept resident ({size(s.vram_all_experts)} "
                     "for all); whatever does not fit is streamed, so any `--gpu-budget` above the dense "
                     "weights and the workspace works")
    lines += [
        "",
        "## Sections",
        "",
        "| section | size |",
        "|---|---|",
        *rows,
        "",
        "## Use",
        "",
        "```bash",
        "pip install krasis",
        f"krasis-run hf://ORG/REPO/{filename} --prompt \"Hello\"      # downloads into the Hub cache once",
        f"krasis-run hf://ORG/REPO/{filename} --serve --port 8000     # OpenAI-compatible API on 127.0.0.1",
        f"krasis-inspect hf://ORG/REPO/{filename} --verify             # header summary, every chunk's CRC32",
        "```",
        "",
        "## Publish",
        "",
        "```bash",
        f"hf upload ORG/REPO {filename} README.md",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(artifact: str | Path) -> Path:
    """README.md beside the artifact; an existing README.md not written by krasis is kept (then <stem>.README.md)."""
    path = Path(artifact)
    art = Artifact(path)
    try:
        text = render_card(summarize(art), path.name)
    finally:
        art.close()
    card = path.parent / "README.md"
    if card.exists() and MARKER not in card.read_text(errors="replace"):
        card = path.parent / f"{path.name.removesuffix('.krs')}.README.md"
    tmp = card.with_name(f".{card.name}.tmp")
    tmp.write_text(text)
    tmp.replace(card)
    return card
