"""The native per-layer steps between the matmuls (RMSNorm, residual add + RMSNorm, q/k norm + rotary, router
top-k, the bf16 KV-cache write) against the torch references in krasis_run.models.base, on every instruction
path this CPU runs, odd shapes, one thread and two, and through CpuOps / KVCache (which fall back to torch for
tensors the kernels cannot take)."""

from __future__ import annotations

import pytest
import torch

from krasis_run.cache import KVCache
from krasis_run.kernels import native
from krasis_run.kernels.cpu import CpuOps
from krasis_run.models.base import norm_rope, rms_norm, rope_cos_sin, rope_inv_freq, route

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels cannot be built here")


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 2e-6) -> bool:
    return float((got - want).abs().max()) <= tol * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("threads", [1, 2])
def test_rms_norm_matches_reference(isa, threads):
    native.load().krs_set_threads(threads)
    g = torch.Generator().manual_seed(0)
    for t, n in [(1, 2048), (1, 7), (3, 33), (5, 128), (70, 1000), (300, 256)]:
        x = torch.randn(t, n, generator=g) * 3
        w = torch.randn(n, generator=g)
        assert close(native.rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6)), (t, n)
        y = x.clone()
        native.rms_norm(y, w, 1e-5, out=y)  # in place
        assert close(y, rms_norm(x, w, 1e-5)), (t, n)
    zero = torch.zeros(2, 64)
    assert torch.equal(native.rms_norm(zero, torch.ones(64), 1e-6), zero)


@pytest.mark.parametrize("threads", [1, 2])
def test_norm_rope_matches_reference(isa, threads):
    native.load().krs_set_threads(threads)
    g = torch.Generator().manual_seed(1)
    for t, h, d, start in [(1, 32, 128, 0), (1, 4, 128, 1000), (3, 5, 6, 7), (17, 3, 64, 2), (64, 32, 128, 100)]:
        x = torch.randn(t, h, d, generator=g) * 2
        w = torch.rand(d, generator=g) + 0.5
        cos, sin = rope_cos_sin(rope_inv_freq(d, 1e6), torch.arange(start, start + t))
        assert close(native.norm_rope(x, w, 1e-6, cos, sin), norm_rope(x, w, 1e-6, cos, sin)), (t, h, d)


@pytest.mark.parametrize("threads", [1, 2])
def test_route_matches_reference(isa, threads):
    native.load().krs_set_threads(threads)
    g = torch.Generator().manual_seed(2)
    for t, e, k in [(1, 128, 8), (1, 8, 8), (4, 60, 4), (9, 5, 1), (33, 128, 8), (2, 3, 2)]:
        logits = torch.randn(t, e, generator=g) * 4
        for renorm in (True, False):
            ids, wts = native.route(logits, k, renorm)
            want_ids, want_wts = route(logits, k, renorm)
            assert ids.dtype == torch.int32 and wts.dtype == torch.float32
            assert torch.equal(ids.long(), want_ids), (t, e, k)
            assert close(wts, want_wts), (t, e, k)


def test_cpu_ops_hooks_use_native_and_fall_back():
    ops = CpuOps("native")
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 48, generator=g), torch.randn(48, generator=g)
    assert close(ops.rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6))
    # inputs the native kernel does not take go to torch: bf16, strided, 1-d
    assert close(ops.rms_norm(x.to(torch.bfloat16), w, 1e-6), rms_norm(x.to(torch.bfloat16), w, 1e-6))
    xt = torch.randn(48, 2, generator=g).T
    assert close(ops.rms_norm(xt, w, 1e-6), rms_norm(xt, w, 1e-6))
    assert close(ops.rms_norm(x[0], w, 1e-6), rms_norm(x[0], w, 1e-6))
    q = torch.randn(2, 3, 16, generator=g)
    cos, sin = rope_cos_sin(rope_inv_freq(16, 1e4), torch.arange(5, 7))
    qn = torch.rand(16, generator=g)
    assert close(ops.norm_rope(q, qn, 1e-6, cos, sin), norm_rope(q, qn, 1e-6, cos, sin))
    logits = torch.randn(3, 16, generator=g)
    ids, wts = ops.route(logits, 4, True)
    want_ids, want_wts = route(logits, 4, True)
    assert torch.equal(ids.long(), want_ids) and close(wts, want_wts)
    ids, _ = ops.route(logits.double(), 4, False)  # not float32: the torch path
    assert torch.equal(ids, route(logits.double(), 4, False)[0])


@pytest.mark.parametrize("quant", ["q4", "q8", "bf16"])
def test_cpu_ops_experts_skip_negative_ids(tiny_per_expert, isa, quant):
    """CpuOps.experts on every path (native, torch, reference): an id of -1 skips its slot, which equals
    the same slot kept with weight 0; all -1 gives zeros; out= is filled and returned."""
    import krasis_run

    rt = krasis_run.load(tiny_per_expert.artifact(quant, "q8"), kernel="reference", threads=1)
    a = rt.args
    blocks = rt.model.w[rt.model.layer_names[0]["experts"]]
    g = torch.Generator().manual_seed(4)
    t, k = 5, a.num_experts_per_tok
    x = torch.randn(t, a.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(a.num_experts, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    wts = torch.rand(t, k, generator=g)
    skip = torch.rand(t, k, generator=g) < 0.4
    skip[0, 0], skip[-1, -1] = True, False
    zero_wts = wts.masked_fill(skip, 0.0)
    for kernel in ("native", "torch", "reference"):
        ops = CpuOps(kernel)
        want = ops.experts(x, ids, zero_wts, blocks)
        got = ops.experts(x, ids.masked_fill(skip, -1), wts, blocks)
        assert close(got, want, 1e-5), kernel
        assert torch.equal(ops.experts(x, torch.full_like(ids, -1), wts, blocks), torch.zeros_like(x)), kernel
        out = torch.full_like(x, float("nan"))
        assert ops.experts(x, ids.masked_fill(skip, -1), wts, blocks, out=out) is out and close(out, want, 1e-5)
        with pytest.raises((RuntimeError, ValueError)):
            ops.experts(x, ids.masked_fill(skip, a.num_experts), wts, blocks)


@pytest.mark.parametrize("threads", [1, 2])
def test_add_rms_norm_matches_reference(isa, threads):
    native.load().krs_set_threads(threads)
    g = torch.Generator().manual_seed(5)
    for t, n in [(1, 2048), (1, 7), (3, 33), (70, 1000), (300, 256)]:
        x, d = torch.randn(t, n, generator=g) * 3, torch.randn(t, n, generator=g)
        w = torch.randn(n, generator=g)
        want_x = x + d
        got = native.add_rms_norm(x, d, w, 1e-6)
        assert torch.equal(x, want_x), (t, n)  # the sum stays in x, bit for bit torch's
        assert close(got, rms_norm(want_x, w, 1e-6)), (t, n)
        out = torch.empty(t, n)
        assert native.add_rms_norm(x, d, w, 1e-5, out=out) is out and close(out, rms_norm(want_x + d, w, 1e-5))


def test_cpu_ops_add_rms_norm_native_and_fallback():
    ops = CpuOps("native")
    g = torch.Generator().manual_seed(6)
    w = torch.randn(64, generator=g)
    for x, d in [(torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)),  # native
                 (torch.randn(64, 2, generator=g).T, torch.randn(2, 64, generator=g)),  # strided x: torch
                 (torch.randn(2, 64, generator=g).double(), torch.randn(2, 64, generator=g).double())]:
        want_x = x + d
        got = ops.add_rms_norm(x, d, w, 1e-6)
        assert torch.equal(x, want_x) and close(got, rms_norm(want_x, w, 1e-6))


def test_kv_store_rows_rounds_like_torch():
    g = torch.Generator().manual_seed(7)
    k = torch.randn(3, 4, 16, generator=g) * torch.logspace(-40, 38, 64).view(1, 4, 16)  # subnormal .. huge
    k[0, 0, :6] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 3.4e38, 1.00390625])  # 3.4e38 -> inf
    v = torch.randn(3, 4, 16, generator=g)
    v[1, 1, 1] = 1 + 2**-8 * 3  # ties, to even both ways
    v[1, 1, 2] = 1 + 2**-8
    keys, values = torch.zeros(8, 4, 16, dtype=torch.bfloat16), torch.zeros(8, 4, 16, dtype=torch.bfloat16)
    assert native.kv_store_rows(k, v, keys, values, 4)
    assert torch.equal(keys[4:7].view(torch.int16), k.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(values[4:7].view(torch.int16), v.to(torch.bfloat16).view(torch.int16))
    assert not keys[:4].any() and not keys[7:].any() and not values[:4].any() and not values[7:].any()
    # what the kernel cannot take is refused, nothing written
    for args in [(k, v, keys, values, 6), (k.double(), v, keys, values, 0), (k, v, keys.float(), values, 0),
                 (k.transpose(0, 1).contiguous().transpose(0, 1), v, keys, values, 0),
                 (k, v, torch.zeros(8, 4, 32, dtype=torch.bfloat16)[:, :, :16], values, 0),
                 (k[:, :2], v[:, :2], keys, values, 0), (k, v, keys, values, -1)]:
        before = keys.clone()
        assert not native.kv_store_rows(*args) and torch.equal(keys, before)


def test_kv_cache_update_native_equals_torch():
    """KVCache.update takes the native write once the library is loaded (CpuOps loads it); the bytes equal torch's
    slice assignment, also across a growth of the cache and for bf16 inputs (the torch path)."""
    native.load()
    g = torch.Generator().manual_seed(8)
    a, b = KVCache(2, 4, 16, capacity=4), KVCache(2, 4, 16, capacity=4)
    pos = 0
    for t, dtype in [(3, torch.float32), (1, torch.float32), (1, torch.bfloat16), (5, torch.float32)]:
        k, v = torch.randn(t, 4, 16, generator=g).to(dtype), torch.randn(t, 4, 16, generator=g).to(dtype)
        for layer in range(2):
            ka, va = a.update(layer, pos, k, v)
            b.keys[layer][pos:pos + t] = k  # the torch reference
            b.values[layer][pos:pos + t] = v
            assert ka.shape[0] == va.shape[0] == pos + t
            assert torch.equal(ka, b.keys[layer][:pos + t]) and torch.equal(va, b.values[layer][:pos + t])
        pos += t
        a.advance(pos)
        b.advance(pos)
        b.reserve(pos + 5)
    over = KVCache.over(a)  # a's storage, empty: what a decode engine hands each new sequence
    assert over.length == 0 and over.keys[0] is a.keys[0]
    k = torch.randn(1, 4, 16, generator=g)
    ko, _ = over.update(0, 2, k, k)
    assert torch.equal(ko[2], k[0].to(torch.bfloat16)) and torch.equal(ko[:2], b.keys[0][:2])


@pytest.mark.parametrize("quant,dense_quant,threads", [("q4", "q8", 2), ("q8", "q4", 3), ("bf16", "bf16", 1)])
def test_decode_layers_equals_the_model_loop(tiny_per_expert, isa, quant, dense_quant, threads):
    """A decode step as one native call (krs_decode_layers) makes the model loop's kernel calls in its order on its
    inputs: bit-equal logits step after step, across the KV cache growing (new addresses) and a second cache; its one
    parallel region with teams of 1, 2 and 3 threads (3 on this 2-core machine: waiters yield their core)."""
    import krasis_run

    rt = krasis_run.load(tiny_per_expert.artifact(quant, dense_quant), kernel="native", threads=threads)
    fused = rt.model.decode_layers
    taken = []
    rt.model.decode_layers = lambda *a: taken.append(fused(*a)) or taken[-1]

    def steps(hook) -> list[torch.Tensor]:
        rt.model.decode_layers = hook
        cache = rt.engine.new_cache(capacity=4)  # grows (doubles) twice below
        logits = [rt.engine.prefill([3, 1, 4], cache)]
        for _ in range(12):
            logits.append(rt.engine.decode(int(logits[-1].argmax()), cache))
        return logits

    hook = rt.model.decode_layers
    want = steps(None)
    clock = torch.zeros(len(native.DECODE_STAGES), dtype=torch.float64)
    for timed in (False, True):  # the stage clock (a benchmark's) changes nothing it times
        native.decode_stages(clock if timed else None)
        try:
            got = steps(hook)
        finally:
            native.decode_stages(None)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert taken == [True] * 24
    assert (clock > 0).all() and clock.sum() < 60
    stopped = clock.clone()
    steps(hook)
    assert torch.equal(clock, stopped)


def test_decode_layers_declines_what_it_does_not_run(tmp_path):
    """A model with a dense-MLP layer has no fused step (the model loop runs: tokens as the reference kernels give);
    tensors the call cannot take are refused before anything is written."""
    import fixtures

    import krasis_run
    from krasis_compile.compile import compile_model

    folder = tmp_path / "dense-layer"
    fixtures.build(folder, "per_expert", seed=5, mlp_only_layers=[1])
    out = tmp_path / "dense-layer.krs"
    compile_model(str(folder), out, quant="bf16", dense_quant="bf16", progress=False)
    rt = krasis_run.load(out, kernel="native", threads=2)
    assert rt.model.step_layers() is None
    ref = krasis_run.load(out, kernel="reference", threads=1)
    assert ref.model.decode_layers is None
    ids = [5, 9, 2, 7]
    assert list(rt.generate(ids, max_new_tokens=6, stop_token_ids=set())) == \
        list(ref.generate(ids, max_new_tokens=6, stop_token_ids=set()))
    ops, a, dims = rt.ops, rt.args, rt.model.step_dims
    cache = rt.engine.new_cache()
    x = torch.randn(1, a.hidden_size)
    cos, sin = torch.ones(1, a.head_dim), torch.zeros(1, a.head_dim)
    before = x.clone()
    assert not ops.decode_layers([], x.double(), x.clone(), cache, 0, cos, sin, dims, 1e-6)
    assert not ops.decode_layers([], x, x[:, :-1], cache, 0, cos, sin, dims, 1e-6)
    assert torch.equal(x, before)


def test_stage_profile_accounts_for_the_step(tiny_per_expert):
    """bench_decode's stage clock: every stage of the one-call step timed, the stages and the rest summing to the
    step, and each weight-reading stage's bytes counted (together less than a token's, which adds the lm_head)."""
    import krasis_run
    from scripts.bench_decode import bytes_per_token, stage_profile

    path = tiny_per_expert.artifact("q4", "q8")
    r = stage_profile(path, threads=2, steps=6, prompt=4)
    assert set(r["stage_ms"]) == {*native.DECODE_STAGES, "rest"}
    assert all(r["stage_ms"][name] > 0 for name in native.DECODE_STAGES)
    assert sum(r["stage_ms"].values()) == pytest.approx(r["step_ms"])
    assert set(r["stage_bytes"]) == {"qkv", "o_proj", "router", "moe"} and min(r["stage_bytes"].values()) > 0
    assert sum(r["stage_bytes"].values()) < bytes_per_token(krasis_run.load(path, kernel="native").artifact)
