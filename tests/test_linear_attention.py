"""The chunked gated delta rule (krasis_run/kernels/linear_attention.py) against its token-by-token reference, and
the reference against the rule written out in float64 here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fixtures import run_interpreted

from krasis_run.kernels.linear_attention import gated_delta_chunked, gated_delta_layer, gated_delta_recurrent


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU host)")
def test_cuda_chunked_rule_equals_recurrent():
    """The torch rule on the GPU (the fused layer's reference there) at Qwen3-Coder-Next's head shape."""
    q, k, v, log_decay, beta, state = (t.cuda() for t in inputs(300, 4, 128, 128, seed=5))
    want, want_state = gated_delta_recurrent(q, k, v, log_decay, beta, state)
    got, got_state = gated_delta_chunked(q, k, v, log_decay, beta, state)
    err = float((got - want).norm() / want.norm())
    print(f"cuda chunked vs recurrent: rel L2 {err:.3g}")
    assert err < 5e-3
    assert float((got_state - want_state).norm() / want_state.norm()) < 5e-3


def layer_case(t: int, nk: int, r: int, dk: int, dv: int, seed: int, dtype=torch.float32):
    """A Gated DeltaNet layer's inputs as the model hands them over: views of one grouped projection (Qwen3-Next's
    per-key-head q|k|v|z) and of b|a, with a conv state and a recurrent state held from earlier tokens."""
    g = torch.Generator().manual_seed(seed)
    kernel, conv_dim = 4, 2 * nk * dk + nk * r * dv
    qkvz = torch.randn(t, nk, 2 * dk + 2 * r * dv, generator=g).to(dtype)
    q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], dim=-1)
    b, a = torch.randn(t, nk, 2 * r, generator=g).to(dtype).split([r, r], dim=-1)
    taps = 0.5 * torch.randn(kernel, conv_dim, generator=g)
    conv_state = torch.randn(kernel - 1, conv_dim, generator=g)
    a_log, dt_bias = torch.randn(nk * r, generator=g), torch.randn(nk * r, generator=g)
    norm_weight = 1 + 0.1 * torch.randn(dv, generator=g)
    state = 0.1 * torch.randn(nk * r, dk, dv, generator=g)
    return (q, k, v.unflatten(-1, (r, dv)), z.unflatten(-1, (r, dv)), b, a, taps, conv_state, a_log, dt_bias,
            norm_weight, state)


def test_fused_layer_under_interpreter():
    """Runs class InterpretedLayer in a child pytest with TRITON_INTERPRET=1: the layer's kernels call Triton's own
    jitted helpers (sigmoid, cumsum), which the interpreter patches only when it is on before triton's import."""
    pytest.importorskip("triton")
    run_interpreted(__file__, "InterpretedLayer", timeout=600)


class InterpretedLayer:
    """Collected only by the child run above (python_classes=InterpretedLayer), where the interpreter is on."""

    @pytest.fixture(autouse=True)
    def _interpreter_on(self):
        from triton import knobs

        assert knobs.runtime.interpret, "run through test_fused_layer_under_interpreter (TRITON_INTERPRET=1)"

    @pytest.mark.parametrize("t,dtype", [(45, torch.float32), (2, torch.float32), (33, torch.bfloat16)])
    def test_fused_layer_equals_torch_layer(self, t, dtype):
        """The whole layer in four Triton kernels (CUDA's path) against the torch layer: a length that is no
        multiple of the chunk, a held conv state longer than the prompt (t=2), bf16 projections read in place."""
        case = layer_case(t, nk=2, r=2, dk=16, dv=32, seed=t, dtype=dtype)
        want = gated_delta_layer(*case, eps=1e-6, l2_eps=1e-6, chunk=16, use_triton=False)
        got = gated_delta_layer(*case, eps=1e-6, l2_eps=1e-6, chunk=16, use_triton=True)
        assert got[0].dtype == dtype
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        for name, x, y in zip(("out", "conv state", "state"), got, want, strict=True):
            torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU host)")
@pytest.mark.parametrize("t", [300, 8192])
def test_cuda_fused_layer_equals_torch_layer(t):
    """The fused layer (tf32 tensor-core products) against the torch layer on the GPU at Qwen3-Coder-Next's shape
    (16 key heads, 32 value heads of 128), bf16 projections as the prefill hands them over."""
    case = [x.cuda() for x in layer_case(t, nk=16, r=2, dk=128, dv=128, seed=t, dtype=torch.bfloat16)]
    want_y, want_conv, want_state = gated_delta_layer(*case, eps=1e-6, l2_eps=1e-6, use_triton=False)
    got_y, got_conv, got_state = gated_delta_layer(*case, eps=1e-6, l2_eps=1e-6, use_triton=True)
    out_err = float((got_y.float() - want_y.float()).norm() / want_y.float().norm())
    state_err = float((got_state - want_state).norm() / want_state.norm())
    print(f"cuda fused layer vs torch, {t} tokens: out {out_err:.3g}, state {state_err:.3g}")
    assert out_err < 1e-2 and state_err < 5e-3
    assert torch.equal(got_conv, want_conv)
