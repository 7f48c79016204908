"""Sharing: the model card krasis-compile writes, and krasis-inspect's summary, verification and refusals."""

from __future__ import annotations

import json
import sys
import zlib

import pytest
from typer.testing import CliRunner

from krasis_compile.cli import app as compile_app
from krasis_compile.model_card import MARKER, write_model_card
from krasis_run.format import PREAMBLE_SIZE
from krasis_run.info import main as inspect_main


def inspect(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["krasis-inspect", *args])
    code = 0
    try:
        inspect_main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def rewrite_header(src, dst, old: bytes, new: bytes) -> None:
    """Same-length edit of the JSON header, with the header CRC fixed so only the edit is seen."""
    data = bytearray(src.read_bytes())
    header_len = int.from_bytes(data[16:24], "little")
    header = data[PREAMBLE_SIZE:PREAMBLE_SIZE + header_len]
    assert len(old) == len(new) and header.count(old) == 1
    header = header.replace(old, new)
    data[PREAMBLE_SIZE:PREAMBLE_SIZE + header_len] = header
    data[24:28] = (zlib.crc32(header) & 0xFFFFFFFF).to_bytes(4, "little")
    dst.write_bytes(bytes(data))


def test_compile_writes_model_card(tiny_per_expert, tmp_path):
    out = tmp_path / "tiny.krs"
    result = CliRunner().invoke(compile_app, [str(tiny_per_expert.folder), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: krasis\n") and MARKER in card
    for needle in ("Qwen3MoeForCausalLM", "routed experts `q4`", "dense matrices `q8`", "krs format version 1",
                   "experts, CPU blocks", "experts, GPU tiles", "tokenizer blob", "**RAM**", "**VRAM**",
                   str(tiny_per_expert.folder.resolve()), "hf upload ORG/REPO tiny.krs README.md",
                   "krasis-run hf://ORG/REPO/tiny.krs"):
        assert needle in card, needle
    # a README.md the user wrote is never replaced; a krasis one is
    (tmp_path / "README.md").write_text("# my notes\n")
    assert write_model_card(out) == tmp_path / "tiny.README.md"
    assert (tmp_path / "README.md").read_text() == "# my notes\n"
    (tmp_path / "README.md").write_text(card)
    assert write_model_card(out) == tmp_path / "README.md"
    no_card = tmp_path / "other"
    no_card.mkdir()
    result = CliRunner().invoke(compile_app, [str(tiny_per_expert.folder), "-o", str(no_card / "x.krs"), "-q",
                                              "--no-model-card", "--quant", "q8"])
    assert result.exit_code == 0 and not (no_card / "README.md").exists()


def test_hub_source_card(tiny_per_expert, tmp_path):
    from krasis_compile.model_card import render_card
    from krasis_run.artifact import Artifact
    from krasis_run.info import summarize

    s = summarize(Artifact(tiny_per_expert.artifact("q4", "q8")))
    s.source = {"kind": "hub", "repo_id": "Qwen/Qwen3-30B-A3B", "revision": "main", "commit": "abc123"}
    card = render_card(s, "qwen3-30b-a3b.krs")
    assert "base_model: Qwen/Qwen3-30B-A3B" in card and "commit `abc123`" in card
    assert "# Qwen3-30B-A3B for krasis" in card


def test_inspect_summary_and_verify(tiny_per_expert, capsys, monkeypatch):
    art = str(tiny_per_expert.artifact("q4", "q8"))
    code, out, _ = inspect(capsys, monkeypatch, art, "--verify")
    assert code == 0
    for needle in ("krs format version 1", "Qwen3MoeForCausalLM", "3 layers (3 MoE)", "8 experts (top-2)",
                   "experts q4, dense q8", "experts, CPU blocks", "experts, GPU tiles", "tokenizer", "zstd",
                   "(local folder)", "RAM to decode", "chunks match their CRC32"):
        assert needle in out, needle
    code, out, _ = inspect(capsys, monkeypatch, art, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["experts"] == 8 and summary["quant"]["experts"] == "q4"
    assert sum(summary["sections"].values()) + summary["header_bytes"] <= summary["file_size"]


def test_inspect_verify_names_the_damaged_chunk(tiny_per_expert, tmp_path, capsys, monkeypatch):
    from krasis_run.artifact import Artifact

    src = tiny_per_expert.artifact("q4", "q8")
    chunk = Artifact(src).chunks["layers.1.experts_cpu"]
    data = bytearray(src.read_bytes())
    data[chunk.offset + 100] ^= 0xFF
    bad = tmp_path / "bad.krs"
    bad.write_bytes(bytes(data))
    code, out, _ = inspect(capsys, monkeypatch, str(bad))
    assert code == 0  # the header is intact: the summary does not read the data
    code, _, err = inspect(capsys, monkeypatch, str(bad), "--verify")
    assert code == 2 and err.strip() == "krasis-inspect: error: corrupt artifact: chunk 'layers.1.experts_cpu' " \
                                        "fails its checksum"


def test_inspect_refuses_newer_format_in_one_line(tiny_per_expert, tmp_path, capsys, monkeypatch):
    data = bytearray(tiny_per_expert.artifact("q4", "q8").read_bytes())
    data[8:12] = (7).to_bytes(4, "little")
    art = tmp_path / "v7.krs"
    art.write_bytes(bytes(data))
    code, out, err = inspect(capsys, monkeypatch, str(art))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "format version 7" in err and "upgrade krasis" in err


@pytest.mark.parametrize("tool", ["inspect", "run"])
def test_unknown_architecture_is_refused_in_one_line(tiny_per_expert, tmp_path, capsys, monkeypatch, tool):
    art = tmp_path / "future-arch.krs"
    rewrite_header(tiny_per_expert.artifact("q4", "q8"), art, b'"architecture":"Qwen3MoeForCausalLM"',
                   b'"architecture":"Qwen9MoeForCausalLM"')
    if tool == "inspect":
        code, out, err = inspect(capsys, monkeypatch, str(art))
        assert "Qwen9MoeForCausalLM  (not supported by this krasis)" in out
    else:
        from krasis_run.cli import main as run_main

        monkeypatch.setattr(sys, "argv", ["krasis-run", str(art), "--serve"])
        with pytest.raises(SystemExit) as e:
            run_main()
        code, err = e.value.code, capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "Qwen9MoeForCausalLM" in err and "Qwen3MoeForCausalLM" in err
