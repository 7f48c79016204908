"""The .krs container: layout promises of formats/KRS.md, zero-copy views, and damaged files."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from fixtures import prompt_ids

import krasis_run
from krasis_run.artifact import Artifact
from krasis_run.codecs import deinterleave_gate_up, dequant_parts
from krasis_run.format import ALIGN, MAGIC, PREAMBLE, PREAMBLE_SIZE, KrsError, crc32


def rewrite_header(src, dst, edit) -> None:
    """Copy an artifact with its JSON header edited (checksum recomputed, data offsets kept)."""
    shutil.copy(src, dst)
    with open(dst, "r+b") as f:
        magic, version, flags, header_len, _, reserved = PREAMBLE.unpack(f.read(PREAMBLE_SIZE))
        header = json.loads(f.read(header_len))
        edit(header)
        raw = json.dumps(header, separators=(",", ":")).encode().ljust(header_len, b" ")
        assert len(raw) == header_len
        f.seek(0)
        f.write(PREAMBLE.pack(magic, version, flags, header_len, crc32(raw), reserved) + raw)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    code = "from krasis_run.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_header_is_self_contained(tiny_per_expert):
    art = Artifact(tiny_per_expert.artifact("q4", "q8"))
    h = art.header
    assert h["architecture"] == "Qwen3MoeForCausalLM"
    assert h["config"]["num_hidden_layers"] == 3
    assert h["quant"]["experts"] == "q4" and h["quant"]["dense"] == "q8"
    assert "<|im_start|>" in h["tokenizer"]["chat_template"]
    assert h["source"]["kind"] == "folder"
    assert json.loads(art.blob("tokenizer.json"))["model"]["type"] == "BPE"
    for name, spec in h["tensors"].items():
        assert {"codec", "shape", "offset", "length", "crc32"} <= set(spec), name


def test_chunks_are_aligned_and_layer_ordered(tiny_per_expert):
    art = Artifact(tiny_per_expert.artifact("q4", "q8"))
    chunks = list(art.chunks.values())
    assert all(c.offset % ALIGN == 0 for c in chunks)
    layer_chunks = [(c.layer, c.section) for c in chunks if c.layer is not None]
    expected = [(i, s) for i in range(3) for s in ("dense", "experts_gpu", "experts_cpu")]
    assert layer_chunks == expected
    # one contiguous range holds all of a layer's experts in the GPU layout
    gpu = art.chunks["layers.1.experts_gpu"]
    for name in ("layers.1.experts.gate_up", "layers.1.experts.down"):
        t = art.tensor(name)
        assert gpu.offset <= t.offset and t.offset + t.length <= gpu.offset + gpu.length
        assert t.shape[0] == 8
    # CPU blocks: each expert contiguous, page aligned
    cpu = art.tensor("layers.1.experts_cpu")
    stride = art.header["tensors"]["layers.1.experts_cpu"]["expert_stride"]
    assert stride % ALIGN == 0 and cpu.length == 8 * stride


@pytest.mark.parametrize("quant", ["q4", "q8", "bf16"])
def test_gpu_tiles_and_cpu_blocks_hold_the_same_weights(tiny_per_expert, quant):
    art = Artifact(tiny_per_expert.artifact(quant, "q8"))
    gpu_gate_up = art.tensor("layers.2.experts.gate_up")
    gpu_down = art.tensor("layers.2.experts.down")
    cpu = art.tensor("layers.2.experts_cpu")
    all_gate_up = dequant_parts(quant, "rows", gpu_gate_up.parts)
    all_down = dequant_parts(quant, "rows", gpu_down.parts)
    for e in range(8):
        gate_up = deinterleave_gate_up(dequant_parts(quant, "cpu_blocks", cpu.expert(e, "gate_up")))
        assert torch.equal(gate_up, all_gate_up[e])
        assert torch.equal(dequant_parts(quant, "cpu_blocks", cpu.expert(e, "down")), all_down[e])


def test_weights_are_views_of_the_mapping(tiny_per_expert):
    rt = krasis_run.load(tiny_per_expert.artifact("q4", "q8"), threads=1)
    mapping = np.frombuffer(rt.artifact._mm, dtype=np.uint8)
    lo, hi = mapping.ctypes.data, mapping.ctypes.data + mapping.size
    experts = rt.artifact.tensor("layers.0.experts_cpu")
    for e in range(experts.experts):
        for part in experts.expert_parts[e].values():
            assert lo <= part.data_ptr() < hi
    assert lo <= rt.artifact.tensor("layers.0.q_proj").parts["q"].data_ptr() < hi


def test_verify_names_the_corrupt_chunk(tiny_per_expert, tmp_path):
    src = tiny_per_expert.artifact("q4", "q8")
    art = Artifact(src)
    chunk = art.chunks["layers.1.experts_cpu"]
    bad = tmp_path / "bad.krs"
    shutil.copy(src, bad)
    with open(bad, "r+b") as f:
        f.seek(chunk.offset + chunk.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(KrsError, match="layers.1.experts_cpu"):
        krasis_run.load(bad, verify=True)
    result = run_cli(str(bad), "--prompt", "hi", "--verify", "-n", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("krasis-run: error: corrupt artifact: chunk")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_truncated_artifact_is_refused_without_verify(tiny_per_expert, tmp_path):
    src = tiny_per_expert.artifact("q4", "q8")
    data = src.read_bytes()
    for keep in (len(data) - 5000, PREAMBLE_SIZE + 10, 10):
        cut = tmp_path / f"cut{keep}.krs"
        cut.write_bytes(data[:keep])
        with pytest.raises(KrsError, match="truncated|shorter|header length"):
            Artifact(cut)
    result = run_cli(str(tmp_path / f"cut{len(data) - 5000}.krs"), "--prompt", "hi")
    assert result.returncode == 2 and "truncated artifact: chunk" in result.stderr
    assert "Traceback" not in result.stderr


def test_damaged_preamble_and_header(tiny_per_expert, tmp_path):
    data = bytearray(tiny_per_expert.artifact("q4", "q8").read_bytes())
    cases = {
        "magic": (0, b"GGUF", "bad magic"),
        "header": (PREAMBLE_SIZE + 40, b"\x00", "header checksum"),
        "version": (len(MAGIC), struct.pack("<I", 99), "format version 99"),
    }
    for name, (offset, patch, message) in cases.items():
        bad = bytearray(data)
        bad[offset:offset + len(patch)] = patch
        path = tmp_path / f"{name}.krs"
        path.write_bytes(bytes(bad))
        with pytest.raises(KrsError, match=message):
            Artifact(path)


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["chunks"][1].update(length=1 << 40), "truncated artifact"),
    (lambda h: h["chunks"][1].update(offset=h["chunks"][1]["offset"] + 1), "misplaced"),
    (lambda h: next(iter(h["tensors"].values())).update(offset=0), "outside its chunk"),
    (lambda h: h["tensors"]["layers.0.experts_cpu"].update(expert_stride=1 << 30), "overrun"),
    (lambda h: h["tensors"]["layers.0.q_proj"]["parts"]["q"].update(shape=[4096, 4096]), "wrong dtype or shape"),
    (lambda h: h["tensors"]["layers.0.q_proj"].update(codec="q4"), "do not match its codec"),
    (lambda h: h["tensors"]["layers.0.q_proj"]["parts"]["q"].update(offset=-8), "non-negative"),
    (lambda h: h["tensors"]["layers.0.q_proj"].update(offset=h["tensors"]["layers.0.q_proj"]["offset"] + 2),
     "not aligned"),
    (lambda h: h["chunks"].__setitem__(2, "oops"), "malformed header entry"),
    (lambda h: h["tensors"]["layers.0.q_proj"].update(chunk=["x"]), "malformed header entry"),
    (lambda h: h["tensors"]["layers.0.q_proj"].update(parts=[1, 2]), "malformed header entry|no parts"),
    (lambda h: h["blobs"]["tokenizer.json"].update(length=1 << 40), "blob"),
    (lambda h: h.update(format_version=2), "disagree"),
])
def test_hostile_header_ranges_are_refused(tiny_per_expert, tmp_path, edit, message):
    bad = tmp_path / "hostile.krs"
    rewrite_header(tiny_per_expert.artifact("q4", "q8"), bad, edit)
    with pytest.raises(KrsError, match=message):
        Artifact(bad)


def test_unknown_architecture_is_refused(tiny_per_expert, tmp_path):
    bad = tmp_path / "arch.krs"
    rewrite_header(tiny_per_expert.artifact("q4", "q8"), bad, lambda h: h.update(architecture="FancyNet"))
    supported = "DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, Qwen3MoeForCausalLM"
    with pytest.raises(KrsError, match=f"FancyNet.*supported: {supported}"):
        krasis_run.load(bad)


def test_logits_api_shape_and_dtype(tiny_per_expert):
    rt = krasis_run.load(tiny_per_expert.artifact("q4", "q8"), threads=1)
    logits = rt.logits(prompt_ids(400, 9))
    assert logits.shape == (9, 400) and logits.dtype == np.float32
    with pytest.raises(KrsError, match="token ids"):
        rt.logits([0, 400])


def test_decode_weights_are_mapped_at_load(tiny_per_expert):
    """The sections CPU decode reads (dense, global, CPU experts; not the GPU tiles) are mapped into the process at
    load, as llama.cpp's MAP_POPULATE does, so a first read of an expert takes no page fault; --no-prefault skips it."""
    from krasis_run.format import SECTION_DENSE, SECTION_EXPERTS_CPU, SECTION_GLOBAL
    from krasis_run.runtime import resident_bytes

    path = tiny_per_expert.artifact("q4", "q8")
    lazy = krasis_run.load(path, threads=1, prefault=False)
    assert lazy.prefaulted == 0
    before = resident_bytes("RssFile")
    rt = krasis_run.load(path, threads=1)
    want = sum(c.length for c in rt.artifact.chunks.values()
               if c.section in (SECTION_DENSE, SECTION_GLOBAL, SECTION_EXPERTS_CPU))
    assert rt.prefaulted == want
    assert resident_bytes("RssFile") - before >= want * 0.9  # the pages are in this process now
    ids = prompt_ids(400, 12)
    assert np.array_equal(rt.logits(ids), lazy.logits(ids))
