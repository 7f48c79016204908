"""The q8 rows kernel (one row at a time with a software prefetch that stops at the last row) against the
scalar path on every instruction path this CPU runs: group counts odd and even, a partial last group, odd row
counts, row ranges split over 1 and 2 threads, dense calls and the MoE calls that read expert rows."""

from __future__ import annotations

import pytest
import torch

from krasis_run.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels cannot be built here")


def q8_matrix(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    return q, scale


def on(isa: str, threads: int, fn):
    lib = native.load()
    before_isa, before_threads = native.isa(), native.threads()
    native.set_isa(isa)
    lib.krs_set_threads(threads)
    try:
        return fn()
    finally:
        native.set_isa(before_isa)
        lib.krs_set_threads(before_threads)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,k", [(1, 32), (3, 64), (5, 96), (17, 2048), (31, 768), (9, 50), (4, 7), (257, 160)])
def test_q8_linear_equals_scalar(isa, threads, n, k):
    q, scale = q8_matrix(n, k, seed=n * 1000 + k)
    g = torch.Generator().manual_seed(k)
    for m in (1, 3):
        x = torch.randn(m, k, generator=g)
        want = on("scalar", 1, lambda x=x: native.linear("q8", x, n, q, scale))
        got = on(isa, threads, lambda x=x: native.linear("q8", x, n, q, scale))
        # integer dot products per group are exact; only the float sums over groups run in another order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("threads", [1, 2])
def test_q8_moe_equals_scalar(isa, threads):
    """Expert rows in the kernel's CPU-block form: gate_up [2I, H] then down [H, I], q8 rows with a bf16 scale
    per row; 5 experts, tokens sharing some, one skipped slot."""
    h, i, e, k = 256, 96, 5, 3
    mats = [(q8_matrix(2 * i, h, 10 + x), q8_matrix(h, i, 20 + x)) for x in range(e)]
    ptrs = torch.tensor([[gu[0].data_ptr(), gu[1].data_ptr(), dn[0].data_ptr(), dn[1].data_ptr()]
                         for gu, dn in mats], dtype=torch.int64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, h, generator=g)
    ids = torch.tensor([[4, 0, 2], [2, 4, -1], [1, 3, 0]], dtype=torch.int32)
    wts = torch.rand(3, k, generator=g)
    want = on("scalar", 1, lambda: native.moe("q8", x, ids, wts, ptrs, h, i, e))
    got = on(isa, threads, lambda: native.moe("q8", x, ids, wts, ptrs, h, i, e))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
