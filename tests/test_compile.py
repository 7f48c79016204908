"""krasis-compile: inputs it accepts, errors it gives, and what a killed compile leaves behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fixtures
import pytest
import torch
from safetensors.torch import load_file, save_file

import krasis_run
from krasis_compile.checkpoint import CompileError
from krasis_compile.compile import compile_model


def compile_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    code = "from krasis_compile.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("krasis-compile: error:") or lines[-1].startswith("Usage") or "Error" in lines[-1]
    for needle in needles:
        assert needle in result.stderr, result.stderr


def edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    tensors = load_file(str(weights))
    edit(tensors)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return dst


def test_cli_compiles_and_reports(tiny_per_expert, tmp_path):
    out = tmp_path / "m.krs"
    result = compile_cli(str(tiny_per_expert.folder), "-o", str(out), "--quant", "q8", "-q")
    assert result.returncode == 0, result.stderr
    assert "GB/s" in result.stderr and "peak RSS" in result.stderr
    assert krasis_run.load(out).artifact.header["quant"]["experts"] == "q8"


def test_missing_folder(tmp_path):
    one_line_error(compile_cli(str(tmp_path / "nope"), "-o", str(tmp_path / "x.krs")), "not found")


def test_bad_codec(tiny_per_expert, tmp_path):
    one_line_error(compile_cli(str(tiny_per_expert.folder), "-o", str(tmp_path / "x.krs"), "--quant", "q5"), "q5")
    one_line_error(compile_cli(str(tiny_per_expert.folder), "-o", str(tmp_path / "x.krs"), "--dense-quant", "q5"),
                   "--dense-quant")


def test_unsupported_architecture_lists_supported(tiny_per_expert, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_per_expert.folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    one_line_error(compile_cli(str(folder), "-o", str(tmp_path / "x.krs")), "LlamaForCausalLM", "Qwen3MoeForCausalLM")


def test_missing_tensor_is_named(tiny_per_expert, tmp_path):
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    folder = edit_checkpoint(tiny_per_expert.folder, tmp_path / "missing", lambda t: t.pop(name))
    out = tmp_path / "x.krs"
    one_line_error(compile_cli(str(folder), "-o", str(out)), name)
    assert not out.exists()


def test_misshaped_tensor_is_named(tiny_per_expert, tmp_path):
    name = "model.layers.2.self_attn.k_proj.weight"

    def edit(t):
        t[name] = t[name][:16]

    folder = edit_checkpoint(tiny_per_expert.folder, tmp_path / "shape", edit)
    one_line_error(compile_cli(str(folder), "-o", str(tmp_path / "x.krs")), name, "[16, 64]", "expected [32, 64]")


def test_unsupported_dtype_is_named(tiny_per_expert, tmp_path):
    name = "model.layers.0.self_attn.q_norm.weight"

    def edit(t):
        t[name] = t[name].to(torch.int32)

    folder = edit_checkpoint(tiny_per_expert.folder, tmp_path / "dtype", edit)
    one_line_error(compile_cli(str(folder), "-o", str(tmp_path / "x.krs")), name, "I32")


def test_out_of_disk_space(tiny_per_expert, tmp_path, monkeypatch):
    import krasis_compile.writer as writer

    monkeypatch.setattr(writer.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**6, 10**6 - 10, 10))
    out = tmp_path / "x.krs"
    with pytest.raises(CompileError, match="out of disk space"):
        compile_model(str(tiny_per_expert.folder), out, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unwritable_output_folder(tiny_per_expert, tmp_path):
    one_line_error(compile_cli(str(tiny_per_expert.folder), "-o", str(tmp_path / "no" / "x.krs")),
                   "output folder does not exist")


@pytest.fixture(scope="module")
def bigger_checkpoint(tmp_path_factory) -> Path:
    """Big enough (~50 MB) that a compile is still running when the test kills it."""
    folder = tmp_path_factory.mktemp("bigger") / "model"
    fixtures.build(folder, "per_expert", hidden_size=256, moe_intermediate_size=512, num_experts=32,
                   num_hidden_layers=6, intermediate_size=256)
    return folder


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_compile_leaves_nothing_at_output(bigger_checkpoint, tmp_path, sig):
    folder = bigger_checkpoint
    out = tmp_path / "out.krs"
    code = "from krasis_compile.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), "-o", str(out), "-q"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.krs.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "compile finished before it could be killed: make the model bigger"
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not out.exists()
    if sig == signal.SIGTERM:  # a catchable signal also removes the temporary file
        assert not list(tmp_path.glob(".out.krs.tmp-*"))


def test_stacked_and_per_expert_checkpoints_compile_alike(tmp_path):
    """The same model saved in both expert layouts gives byte-identical expert data."""
    model = fixtures.make_model(fixtures.tiny_config(), seed=7)
    arts = []
    for layout in ("per_expert", "stacked"):
        folder = tmp_path / layout
        fixtures.save_checkpoint(model, folder, layout)
        fixtures.make_tokenizer(folder)
        arts.append(compile_model(str(folder), tmp_path / f"{layout}.krs", progress=False).out)
    a, b = (krasis_run.load(p).artifact for p in arts)
    for name in ("layers.0.experts.gate_up", "layers.2.experts.down", "layers.1.q_proj"):
        for part, view in a.tensor(name).parts.items():
            assert torch.equal(view, b.tensor(name).parts[part])


def test_hub_repo_id_offline_from_cache(tiny_per_expert, tmp_path):
    """A repo id resolves from the local Hub cache with the network off."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--krasis-test--tiny-moe"
    shutil.copytree(tiny_per_expert.folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "hub.krs"
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    result = compile_cli("krasis-test/tiny-moe", "-o", str(out), "-q", env=env)
    assert result.returncode == 0, result.stderr
    source = krasis_run.load(out).artifact.header["source"]
    assert source == {"kind": "hub", "repo_id": "krasis-test/tiny-moe", "revision": "main", "commit": commit}
    one_line_error(compile_cli("krasis-test/not-cached", "-o", str(out), env=env), "not in the Hub cache")
