"""Fused decode glue (krasis_run/kernels/decode_glue.py): RMSNorm, the MoE router and the attention inputs (q/k
norm + rotary + the KV cache write), on the CPU.

The torch references (krasis_run.models.base.rms_norm / route, which the wrappers fall back to) are checked
against float64 math written here; the Triton kernels (class InterpretedGlue) run under the Triton
interpreter against the references. As in tests/test_decode_kernels.py, the interpreter must be chosen
before triton is first imported, so test_glue_kernels_under_interpreter runs the class in a child pytest
with TRITON_INTERPRET=1 and fails with the child's report.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import run_interpreted

from krasis_run.kernels import decode_glue
from krasis_run.kernels.decode_glue import (
    add_rms_norm,
    norm_rope_store_decode,
    rms_norm_decode,
    route_decode,
    router_decode,
)
from krasis_run.models.base import norm_rope, rms_norm, rope_cos_sin, rope_frequencies, route

EPS = 1e-6
BF16_ULP = 1 / 128  # relative size of one bf16 ulp (7 stored mantissa bits), at most


# ---------------------------------------------------------------- data and plain float64 math


def norm_inputs(m: int, h: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(m, h, generator=gen) + 0.5
    weight = 1 + 0.3 * torch.randn(h, generator=gen)
    return x, weight


def plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps) * weight.double()


def router_logits(m: int, e: int, seed: int) -> torch.Tensor:
    """Distinct values in every row, so the top k and its order don't depend on how ties are broken."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(m, e, generator=gen)
    assert all(len(torch.unique(row)) == e for row in logits)
    return logits


def plain_route(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.double(), dim=-1)
    ids = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]
    weights = probs.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights


def assert_close_bf16(got: torch.Tensor, want: torch.Tensor, ulps: float) -> None:
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.double(), want.double(), rtol=ulps * BF16_ULP, atol=1e-6)


NORM_SHAPES = [(m, h) for m in (1, 3) for h in (64, 96, 2048)]
ROUTE_CASES = [(e, k, renorm) for e in (8, 128, 160) for k in (1, 2, 8) for renorm in (False, True)]
ROUTER_CASES = [(96, 10, 2, True), (2048, 128, 8, True), (64, 160, 8, False)]


# ---------------------------------------------------------------- the references (the CPU fallback)


@pytest.mark.parametrize("m,h", [*NORM_SHAPES, (2, 8192)])
def test_rms_norm_reference_matches_plain_math(m, h):
    x, weight = norm_inputs(m, h, seed=h + m)
    want = plain_rms_norm(x, weight, EPS)
    got = rms_norm_decode(x, weight, EPS, torch.float32)  # CPU tensors: the reference
    assert torch.equal(got, rms_norm(x, weight, EPS))
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    assert_close_bf16(rms_norm_decode(x, weight, EPS), want, ulps=0.5 + 1e-3)  # bf16 by default, round to nearest


def test_rms_norm_reference_writes_out():
    x, weight = norm_inputs(3, 96, seed=0)
    buf = torch.full((3, 200), float("nan"), dtype=torch.bfloat16)
    out = buf[:, 8:104]  # a row-strided view of a static buffer
    assert rms_norm_decode(x, weight, EPS, out=out) is out
    assert torch.equal(out, rms_norm(x, weight, EPS).bfloat16())
    assert buf[:, :8].isnan().all() and buf[:, 104:].isnan().all()


def test_rms_norm_rejects_mismatched_out():
    x, weight = norm_inputs(1, 64, seed=0)
    with pytest.raises(ValueError, match="out must be"):
        rms_norm_decode(x, weight, EPS, out=torch.empty(1, 64))  # float32 buffer, bf16 requested
    with pytest.raises(ValueError, match="out must be"):
        rms_norm_decode(x, weight, EPS, torch.float32, out=torch.empty(2, 64))


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("e,k,renorm", ROUTE_CASES)
def test_route_reference_matches_plain_math(m, e, k, renorm):
    logits = router_logits(m, e, seed=e + k + m)
    ids, weights = route_decode(logits, k, renorm)
    want_ids, want_w = plain_route(logits, k, renorm)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32 and ids.shape == (m, k)
    assert torch.equal(ids, want_ids)
    assert torch.allclose(weights.double(), want_w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_route_reference_writes_out(ids_dtype):
    logits = router_logits(3, 160, seed=1)
    ids_out = torch.full((3, 8), -1, dtype=ids_dtype)
    w_out = torch.full((3, 8), float("nan"))
    ids, weights = route_decode(logits, 8, True, ids_out, w_out)
    assert ids is ids_out and weights is w_out
    want_ids, want_w = route(logits, 8, True)
    assert torch.equal(ids.long(), want_ids) and torch.equal(weights, want_w)


def test_route_rejects_bad_arguments():
    logits = router_logits(2, 8, seed=0)
    with pytest.raises(ValueError, match="top-k"):
        route_decode(logits, 9, False)
    with pytest.raises(ValueError, match="ids_out"):
        route_decode(logits, 2, False, ids_out=torch.empty(2, 2))
    with pytest.raises(ValueError, match="weights_out"):
        route_decode(logits, 2, False, weights_out=torch.empty(2, 3))


# ---------------------------------------------------------------- Triton kernels, under the interpreter


def test_add_rms_norm_reference_adds_in_place():
    x, weight = norm_inputs(2, 64, seed=4)
    delta = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    want_x = x + delta
    got = add_rms_norm(x, delta, weight, EPS, torch.float32, use_triton=False)
    assert torch.equal(x, want_x)
    assert torch.allclose(got, plain_rms_norm(want_x, weight, EPS).float(), rtol=1e-5, atol=1e-6)


def test_glue_kernels_under_interpreter():
    """Runs class InterpretedGlue in a child pytest with TRITON_INTERPRET=1 (see the module docstring)."""
    pytest.importorskip("triton")  # a test dependency (pyproject [test]); only a bare install skips
    run_interpreted(__file__, "InterpretedGlue", timeout=300)


class InterpretedGlue:
    """Collected only by the child run above (python_classes=InterpretedGlue), where the interpreter is on."""

    @pytest.fixture(autouse=True)
    def _interpreter_on(self):
        from triton import knobs

        assert knobs.runtime.interpret, "run through test_glue_kernels_under_interpreter (TRITON_INTERPRET=1)"

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    @pytest.mark.parametrize("m,h", NORM_SHAPES)
    def test_rms_norm_triton_matches_reference(self, m, h, dtype):
        x, weight = norm_inputs(m, h, seed=h + m + 1)
        out = torch.full((m, h), float("nan"), dtype=dtype)
        assert rms_norm_decode(x, weight, EPS, dtype, out=out, use_triton=True) is out
        want = rms_norm(x, weight, EPS)
        if dtype == torch.float32:
            assert torch.allclose(out, want, rtol=1e-6, atol=1e-6)  # only the order of the sum differs
        else:
            assert_close_bf16(out, want, ulps=1)  # the interpreter rounds to bf16 towards zero, CUDA to nearest
        assert torch.equal(rms_norm_decode(x, weight, EPS, dtype, use_triton=True), out)  # and allocates without out

    @pytest.mark.parametrize("m,h", [(1, 96), (3, 2048)])
    def test_add_rms_norm_triton_matches_reference(self, m, h):
        x, weight = norm_inputs(m, h, seed=h + 7)
        delta = torch.randn(m, h, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        want_x = x + delta.float()
        got = add_rms_norm(x, delta, weight, EPS, torch.float32, use_triton=True)
        assert torch.equal(x, want_x)  # the residual stream, updated in place
        assert torch.allclose(got, plain_rms_norm(want_x, weight, EPS).float(), rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("h", [96, 2048])
    def test_rms_norm_triton_wide_rows_loop(self, monkeypatch, h):
        """Rows wider than RMS_MAX_BLOCK: two loops over blocks, the last one partial at H=96."""
        monkeypatch.setattr(decode_glue, "RMS_MAX_BLOCK", 64)
        x, weight = norm_inputs(3, h, seed=h)
        buf = torch.full((3, h + 32), float("nan"))
        out = buf[:, :h]  # a row-strided view: the kernel takes the row stride, no copy
        assert rms_norm_decode(x, weight, EPS, torch.float32, out=out, use_triton=True) is out
        assert torch.allclose(out, rms_norm(x, weight, EPS), rtol=1e-6, atol=1e-6)
        assert buf[:, h:].isnan().all()

    @pytest.mark.parametrize("m", [1, 3])
    @pytest.mark.parametrize("e,k,renorm", ROUTE_CASES)
    def test_route_triton_matches_reference(self, m, e, k, renorm):
        logits = router_logits(m, e, seed=e + k + m + 1)
        ids_out = torch.full((m, k), -1, dtype=torch.int64)
        w_out = torch.full((m, k), float("nan"))
        ids, weights = route_decode(logits, k, renorm, ids_out, w_out, use_triton=True)
        assert ids is ids_out and weights is w_out
        want_ids, want_w = route(logits, k, renorm)
        assert torch.equal(ids, want_ids)
        assert torch.allclose(weights, want_w, rtol=1e-6, atol=1e-7)

    @pytest.mark.parametrize("nq,nkv,d,pos", [(4, 2, 64, 0), (32, 4, 128, 9)])
    def test_norm_rope_store_triton_matches_reference(self, nq, nkv, d, pos):
        q, k, v, (qw, kw), cos, sin, keys, values = attention_inputs(nq, nkv, d, pos, seed=nq + pos)
        want_keys, want_values = keys.clone(), values.clone()
        want_q = norm_rope_store_decode(q, k, v, qw, kw, EPS, cos, sin, want_keys, want_values, torch.tensor([pos]),
                                        use_triton=False)
        got = norm_rope_store_decode(q, k, v, qw, kw, EPS, cos, sin, keys, values, torch.tensor([pos]),
                                     use_triton=True)
        assert got.shape == (1, nq, d)
        exact_q = norm_rope(q, qw, EPS, cos, sin)
        assert_close_bf16(got, exact_q, ulps=1)  # the interpreter rounds to bf16 towards zero, CUDA to nearest
        assert_close_bf16(keys[pos], norm_rope(k, kw, EPS, cos, sin)[0], ulps=1)
        assert torch.equal(values, want_values)  # v copied as is, no other row touched
        rows = [r for r in range(keys.shape[0]) if r != pos]
        assert torch.equal(keys[rows], want_keys[rows])
        assert (got.float() - want_q.float()).abs().max() <= 2 * BF16_ULP * want_q.float().abs().max()

    @pytest.mark.parametrize("h,e,k,renorm", ROUTER_CASES)
    def test_router_triton_matches_route(self, h, e, k, renorm):
        check_router(h, e, k, renorm, "cpu", use_triton=True)

    def test_route_triton_allocates_int64_and_fills_int32_buffers(self):
        logits = router_logits(3, 160, seed=5)[:, :128]  # a row-strided view of wider logits
        ids, weights = route_decode(logits, 8, False, use_triton=True)
        assert ids.dtype == torch.int64 and weights.dtype == torch.float32 and ids.shape == (3, 8)
        want_ids, want_w = route(logits, 8, False)
        assert torch.equal(ids, want_ids) and torch.allclose(weights, want_w, rtol=1e-6, atol=1e-7)
        ids32 = torch.full((3, 8), -1, dtype=torch.int32)
        assert route_decode(logits, 8, False, ids_out=ids32, use_triton=True)[0] is ids32
        assert torch.equal(ids32.long(), want_ids)


def router_inputs(h: int, e: int, seed: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, h, generator=g).to(torch.bfloat16)
    weight = torch.randn(e, h, generator=g) * h**-0.5 * 3
    take = torch.rand(e, generator=g) < 0.5
    return x.to(device), weight.to(device), take.to(device)


def check_router(h: int, e: int, k: int, renorm: bool, device: str, use_triton: bool | None) -> None:
    """router_decode against route(x @ W.T): same ids, weights to float32 rounding, the staged copies for the CPU,
    the ticket left at zero, and a second call (new input) as right as the first."""
    ticket = torch.zeros(1, dtype=torch.int32, device=device)
    for seed in (h + e, h + e + 1):
        x, weight, take = router_inputs(h, e, seed, device)
        stage = (torch.full((1, h), float("nan"), device=device), torch.full((1, k), 99, dtype=torch.int32,
                 device=device), torch.full((1, k), float("nan"), device=device))
        ids, weights = router_decode(x, weight, k, renorm, ticket, stage, take, use_triton=use_triton)
        want_ids, want_w = route(x.float() @ weight.T, k, renorm)
        assert ids.dtype == torch.int64 and torch.equal(ids, want_ids)
        assert torch.allclose(weights, want_w, rtol=1e-5, atol=1e-6)
        assert torch.equal(stage[0], x.float()) and torch.equal(stage[2], weights)
        assert torch.equal(stage[1].long(), torch.where(take[ids], -1, ids))
        assert int(ticket) == 0
        plain = router_decode(x, weight, k, renorm, ticket, use_triton=use_triton)
        assert torch.equal(plain[0], ids) and torch.equal(plain[1], weights)


@pytest.mark.parametrize("h,e,k,renorm", ROUTER_CASES)
def test_router_reference_matches_route(h, e, k, renorm):
    check_router(h, e, k, renorm, "cpu", use_triton=False)


def test_router_refuses_staging_without_take():
    x, weight, _ = router_inputs(64, 8, 0)
    stage = (torch.empty(1, 64), torch.empty(1, 2, dtype=torch.int32), torch.empty(1, 2))
    with pytest.raises(ValueError, match="take"):
        router_decode(x, weight, 2, True, torch.zeros(1, dtype=torch.int32), stage, use_triton=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU host)")
@pytest.mark.parametrize("h,e,k,renorm", ROUTER_CASES)
def test_router_cuda_matches_route(h, e, k, renorm):
    check_router(h, e, k, renorm, "cuda", use_triton=None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU host)")
def test_router_cuda_in_a_graph():
    """Captured once, replayed with new inputs: the ticket re-arms itself, so every replay picks right."""
    h, e, k = 2048, 128, 8
    ticket = torch.zeros(1, dtype=torch.int32, device="cuda")
    x, weight, _ = router_inputs(h, e, 0, "cuda")
    router_decode(x, weight, k, True, ticket)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, weights = router_decode(x, weight, k, True, ticket)
    for seed in range(1, 6):
        x.copy_(router_inputs(h, e, seed, "cuda")[0])
        graph.replay()
        want_ids, want_w = route(x.float() @ weight.T, k, True)
        assert torch.equal(ids, want_ids) and torch.allclose(weights, want_w, rtol=1e-5, atol=1e-6)
    assert int(ticket) == 0


def attention_inputs(nq: int, nkv: int, d: int, pos: int, seed: int):
    """q/k/v as views of one projection output (how the decode step splits q|k|v), norms, rotary rows, a cache."""
    g = torch.Generator().manual_seed(seed)
    qkv = (2 * torch.randn(1, (nq + 2 * nkv) * d, generator=g)).to(torch.bfloat16)
    q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
    q, k, v = q.view(1, nq, d), k.view(1, nkv, d), v.view(1, nkv, d)
    weights = [1 + 0.3 * torch.randn(d, generator=g) for _ in range(2)]
    inv_freq, scale = rope_frequencies({"rope_theta": 1e6, "rope_type": "default"}, d, 4096)
    cos, sin = rope_cos_sin(inv_freq, torch.tensor([pos]), scale)
    keys = torch.randn(pos + 3, nkv, d, generator=g).to(torch.bfloat16)
    return q, k, v, weights, cos, sin, keys, keys.clone() + 1


def test_norm_rope_store_reference_writes_the_cache_row():
    q, k, v, (qw, kw), cos, sin, keys, values = attention_inputs(4, 2, 64, pos=5, seed=0)
    before_k, before_v = keys.clone(), values.clone()
    got = norm_rope_store_decode(q, k, v, qw, kw, EPS, cos, sin, keys, values, torch.tensor([5]))
    assert torch.equal(got, norm_rope(q, qw, EPS, cos, sin).to(torch.bfloat16))
    assert torch.equal(keys[5], norm_rope(k, kw, EPS, cos, sin).to(torch.bfloat16)[0])
    assert torch.equal(values[5], v[0])
    others = [r for r in range(keys.shape[0]) if r != 5]
    assert torch.equal(keys[others], before_k[others]) and torch.equal(values[others], before_v[others])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU host)")
@pytest.mark.parametrize("nq,nkv,d,pos", [(32, 4, 128, 0), (32, 4, 128, 4095), (16, 2, 64, 7)])
def test_norm_rope_store_cuda_matches_reference(nq, nkv, d, pos):
    """The compiled kernel at the shapes decode runs (the tiny test models' heads are too small for it)."""
    q, k, v, weights, cos, sin, keys, values = attention_inputs(nq, nkv, d, pos, seed=3)
    q, k, v, qw, kw, cos, sin, keys, values = (t.cuda() for t in (q, k, v, *weights, cos, sin, keys, values))
    want_keys, want_values = keys.clone(), values.clone()
    pos_dev = torch.tensor([pos], device="cuda")
    want = norm_rope_store_decode(q, k, v, qw, kw, EPS, cos, sin, want_keys, want_values, pos_dev, use_triton=False)
    got = norm_rope_store_decode(q, k, v, qw, kw, EPS, cos, sin, keys, values, pos_dev)
    assert (got.float() - want.float()).abs().max() <= BF16_ULP * want.float().abs().max()
    assert (keys.float() - want_keys.float()).abs().max() <= BF16_ULP * want_keys.float().abs().max()
    assert torch.equal(values, want_values)
