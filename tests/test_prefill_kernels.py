"""GPU prefill kernels on the CPU: the expert combine and the q4 CPU-block dequant, each against its torch
reference, the Triton versions under the Triton interpreter (TRITON_INTERPRET=1, set before the kernel is
defined: each test builds a fresh one)."""

from __future__ import annotations

import pytest
import torch

from krasis_run.kernels import dequant, moe_combine


def assert_within_one_ulp(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 tensors equal but for the last bit: the interpreter rounds float32 -> bf16 differently from the GPU
    (where test_gpu_prefill's CUDA tests check the dequant bit for bit)."""
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    ulps = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
    assert int(ulps.max()) <= 1 and float((ulps == 0).float().mean()) > 0.5


@pytest.fixture
def interpret(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def combine_case(tokens=37, k=4, hidden=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(tokens * k, hidden, generator=g).to(torch.bfloat16)
    order = torch.randperm(tokens * k, generator=g)  # y[r] belongs to (token, slot) order[r]
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    weights = torch.rand(tokens, k, generator=g).to(torch.bfloat16).float()  # exact in bf16: only the sum rounds
    return y, order, inv, weights


def test_combine_torch_equals_scatter_and_bmm():
    y, order, inv, weights = combine_case()
    unsorted = torch.empty_like(y)
    unsorted[order] = y  # the engine's previous combine
    want = torch.bmm(weights.unsqueeze(1).to(y.dtype), unsorted.view(weights.shape[0], -1, y.shape[1])).squeeze(1)
    out = torch.empty(weights.shape[0], y.shape[1])
    got = moe_combine.moe_combine(y, inv, weights, out)
    assert got is out and torch.equal(got, want.float())
    assert torch.equal(moe_combine.moe_combine(y, inv, weights), want)  # without out: y's dtype


def test_combine_triton_interpreted(interpret):
    kernel = moe_combine._triton_combine.__wrapped__()
    y, _, inv, weights = combine_case(tokens=9, k=8, hidden=384, seed=1)
    want = moe_combine.moe_combine_torch(y, inv, weights, torch.empty(9, 384))
    big = torch.full((12, 384), 7.0)  # rows of a larger output, as the engine writes one token chunk of it
    got = kernel(y, inv, weights, big[2:11])
    exact = (weights.to(torch.bfloat16).float().unsqueeze(-1) * y.float()[inv].view(9, 8, 384)).sum(1)
    for result in (got, want):  # each within one bf16 rounding of the float32 sum (the interpreter truncates)
        assert bool(((result - exact).abs() <= 2**-7 * exact.abs() + 1e-5).all())
    assert torch.equal(big[:2], torch.full((2, 384), 7.0)) and torch.equal(big[11:], torch.full((1, 384), 7.0))


def strided_blocks(experts=3, rows=128, cols=96, pad=40, seed=2, device="cpu", group=32):
    """q and scale_zero as part_views makes them: per expert [q bytes | scale_zero | padding], expert_stride apart."""
    g = torch.Generator().manual_seed(seed)
    q_bytes = rows // 64 * cols * 32
    sz_bytes = cols // group * rows * 2 * 2
    stride = q_bytes + sz_bytes + pad
    buf = torch.randint(0, 256, (experts * stride,), dtype=torch.uint8, generator=g)
    sz = (torch.rand(experts, cols // group, rows, 2, generator=g) * 0.1 - 0.02).to(torch.bfloat16)
    for e in range(experts):
        buf[e * stride + q_bytes:e * stride + q_bytes + sz_bytes] = sz[e].flatten().view(torch.uint8)
    buf = buf.to(device)
    q = buf.as_strided((experts, rows // 64, cols, 32), (stride, cols * 32, 32, 1))
    scale_zero = buf[q_bytes:].as_strided((experts, sz_bytes), (stride, 1)).view(torch.bfloat16)
    return q, scale_zero.reshape(experts, cols // group, rows, 2)


@pytest.mark.parametrize("deinterleave", [False, True])
@pytest.mark.parametrize("group", [32, 64])
def test_q4_blocks_triton_interpreted(interpret, deinterleave, group):
    kernel = dequant._triton_q4_blocks.__wrapped__()
    q, scale_zero = strided_blocks(cols=192, group=group)
    assert not q.is_contiguous()  # the kernel reads the strided views in place
    want = dequant._q4_blocks(q, scale_zero)
    if deinterleave:
        want = dequant._deinterleave_rows(want)
    assert_within_one_ulp(kernel(q, scale_zero, deinterleave), want)
    assert torch.equal(dequant.q4_blocks(q, scale_zero, deinterleave, use_triton=False), want)


def test_q4_blocks_in_dequant_experts_matches_reference(interpret, monkeypatch):
    """dequant_experts with use_triton=True on CPU blocks: the kernel's output equals the torch path's."""
    monkeypatch.setattr(dequant, "_triton_q4_blocks", dequant._triton_q4_blocks.__wrapped__)
    gq, gsz = strided_blocks(rows=128, cols=64, seed=3)  # gate_up [E, 2I=128, H=64]
    dq, dsz = strided_blocks(rows=64, cols=64, seed=4)  # down [E, H=64, I=64]
    gate_up, down = {"q": gq, "scale_zero": gsz}, {"q": dq, "scale_zero": dsz}
    want = dequant.dequant_experts("q4", "cpu_blocks", gate_up, down, use_triton=False)
    got = dequant.dequant_experts("q4", "cpu_blocks", gate_up, down, use_triton=True)
    assert_within_one_ulp(got[0], want[0])
    assert_within_one_ulp(got[1], want[1])


def test_silu_mul_triton_interpreted(interpret):
    from krasis_run.kernels import activation

    kernel = activation._triton_silu_mul.__wrapped__()
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(5, 2 * 1100, generator=g) * 3).to(torch.bfloat16)  # 1100: two column blocks, the last partial
    got = kernel(h)
    gate, up = h.float().chunk(2, dim=-1)
    exact = gate * torch.sigmoid(gate) * up
    assert got.shape == (5, 1100) and got.dtype == torch.bfloat16
    assert bool(((got.float() - exact).abs() <= 2**-7 * exact.abs() + 1e-6).all())  # one bf16 rounding
    torch_ref = activation.silu_mul(h)  # the CPU path: torch in bf16, two roundings
    assert bool(((torch_ref.float() - exact).abs() <= 2**-6 * exact.abs() + 1e-2).all())
