"""The chunked gated delta rule (krasis_run/kernels/linear_attention.py) against its token-by-token reference, and
the reference against the rule written out in float64 here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from krasis_run.kernels.linear_attention import gated_delta_chunked, gated_delta_recurrent


def inputs(t: int, heads: int, dk: int, dv: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(t, heads, dk, generator=g), dim=-1) / dk**0.5
    k = F.normalize(torch.randn(t, heads, dk, generator=g), dim=-1)
    v = torch.randn(t, heads, dv, generator=g)
    log_decay = -3 * torch.rand(t, heads, generator=g)
    beta = torch.rand(t, heads, generator=g)
    return q, k, v, log_decay, beta, torch.randn(heads, dk, dv, generator=g)


def test_reference_is_the_rule():
    q, k, v, log_decay, beta, state = inputs(9, 2, 4, 3, seed=0)
    s = state.double()
    want = []
    for t in range(9):
        for h in range(2):
            s[h] = torch.exp(log_decay[t, h].double()) * s[h]
            u = beta[t, h].double() * (v[t, h].double() - s[h].T @ k[t, h].double())
            s[h] = s[h] + torch.outer(k[t, h].double(), u)
        want.append(torch.einsum("hkv,hk->hv", s, q[t].double()))
    out, final = gated_delta_recurrent(q, k, v, log_decay, beta, state)
    assert torch.allclose(out.double(), torch.stack(want), atol=1e-5) and torch.allclose(final.double(), s, atol=1e-5)


@pytest.mark.parametrize("t,chunk", [(1, 64), (63, 64), (64, 64), (150, 64), (37, 8), (20, 1)])
def test_chunked_equals_recurrent(t, chunk):
    args = inputs(t, 3, 16, 8, seed=t + chunk)
    out, state = gated_delta_chunked(*args, chunk=chunk)
    want_out, want_state = gated_delta_recurrent(*args)
    assert torch.allclose(out, want_out, rtol=1e-4, atol=1e-5)
    assert torch.allclose(state, want_state, rtol=1e-4, atol=1e-5)


def test_chunks_carry_the_state():
    """Two calls over the halves of a sequence give one call's outputs and final state (prefill in pieces)."""
    q, k, v, log_decay, beta, state = inputs(100, 2, 8, 8, seed=5)
    whole, final = gated_delta_chunked(q, k, v, log_decay, beta, state)
    first, mid = gated_delta_chunked(q[:45], k[:45], v[:45], log_decay[:45], beta[:45], state)
    second, end = gated_delta_chunked(q[45:], k[45:], v[45:], log_decay[45:], beta[45:], mid)
    assert torch.allclose(torch.cat([first, second]), whole, atol=1e-5) and torch.allclose(end, final, atol=1e-5)
