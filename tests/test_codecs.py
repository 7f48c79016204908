"""Codec packing, the scale search, and the CPU kernels against the float32 reference."""

from __future__ import annotations

import pytest
import torch

from krasis_compile.quantize import quantize_q4, quantize_q8
from krasis_run.codecs import (
    deinterleave_gate_up,
    dequant_parts,
    encode_parts,
    interleave_gate_up,
    pack_q4_blocks,
    pack_q4_rows,
    split_gate_up_output,
    unpack_q4_blocks,
    unpack_q4_rows,
)
from krasis_run.kernels.cpu import CpuOps, torch_int4_reads_cpu_blocks


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_nibble_packing_round_trips():
    q = torch.randint(0, 16, (128, 96), dtype=torch.uint8)
    assert torch.equal(unpack_q4_rows(pack_q4_rows(q)), q)
    assert torch.equal(unpack_q4_blocks(pack_q4_blocks(q)), q)
    packed = pack_q4_blocks(q)
    assert packed.shape == (2, 96, 32)
    assert packed[1, 5, 3] == q[64 + 3, 5] | (q[64 + 32 + 3, 5] << 4)  # the byte formula of formats/KRS.md


def test_gate_up_interleave_pairs_outputs():
    i, k = 96, 8
    gate_up = torch.randn(2 * i, k)
    rows = interleave_gate_up(gate_up)
    assert torch.equal(deinterleave_gate_up(rows), gate_up)
    x = torch.randn(3, k)
    gate, up = split_gate_up_output(x @ rows.T)
    assert torch.allclose(gate, x @ gate_up[:i].T) and torch.allclose(up, x @ gate_up[i:].T)


def test_refit_beats_min_max():
    w = torch.randn(256, 512) * torch.rand(256, 1)  # rows of different scale, like real weights
    w[0, 3] = 8.0  # an outlier
    searched, plain = quantize_q4(w, "refit"), quantize_q4(w, "minmax")
    err_searched = rel(dequant_parts("q4", "rows", encode_parts("q4", "rows", searched)), w)
    err_plain = rel(dequant_parts("q4", "rows", encode_parts("q4", "rows", plain)), w)
    print(f"q4 rel L2: min/max {err_plain:.4f}, refit {err_searched:.4f}")
    assert err_searched < 0.95 * err_plain
    assert err_searched < 0.1
    err8 = rel(dequant_parts("q8", "rows", encode_parts("q8", "rows", quantize_q8(w))), w)
    assert err8 < 0.01


@pytest.mark.parametrize("codec", ["q4", "q8", "bf16"])
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernels_match_reference(codec, m, threads):
    torch.set_num_threads(threads)
    n, k = 192, 96  # odd multiples: not a power of two, rows not a multiple of 128
    w = torch.randn(n, k) / k**0.5
    parts = encode_parts(codec, "cpu_blocks", {**_quantized(codec, w)})
    x = torch.randn(m, k)
    want = CpuOps("reference").matmul(x, codec, "cpu_blocks", parts)
    got = CpuOps("torch").matmul(x, codec, "cpu_blocks", parts)
    assert rel(got, want) < 5e-3
    torch.set_num_threads(1)


def _quantized(codec, w):
    if codec == "q4":
        return quantize_q4(w)
    if codec == "q8":
        return quantize_q8(w)
    return {"w": w}


def test_int4_probe_agrees_with_cpu_capability():
    """Where torch's packed int4 layout is the artifact's (AVX-512 builds), the kernel reads it in place."""
    capability = torch.backends.cpu.get_cpu_capability()
    in_place = torch_int4_reads_cpu_blocks()
    print(f"cpu capability {capability}: q4 in place = {in_place}")
    if capability == "AVX2":
        assert not in_place  # torch packs 32-row blocks here: the probe must notice
