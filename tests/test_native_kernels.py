"""Native CPU kernels (krasis_run/kernels/native) against float32 references, on every instruction
path this CPU can run, odd shapes, one thread and several."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from krasis_compile.layout import cpu_block_parts
from krasis_compile.quantize import quantize
from krasis_run.codecs import dequant_q4, dequant_q8, encode_parts
from krasis_run.kernels import native
from krasis_run.kernels.attention import causal_attention

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels cannot be built here")



def quant_x(x: torch.Tensor) -> torch.Tensor:
    """The kernels' activation rounding: int8 per group of 32, scale amax/127 -> dequantized float64."""
    m, k = x.shape
    kp = (k + 31) // 32 * 32
    g = F.pad(x.double(), (0, kp - k)).view(m, kp // 32, 32)
    amax = g.abs().amax(-1, keepdim=True)
    q = torch.where(amax > 0, torch.round(g * (127 / amax.clamp_min(1e-30))), torch.zeros_like(g))
    return (q * amax / 127).view(m, kp)[:, :k]


def split_codec(name: str) -> tuple[str, int]:
    """Test parameter -> (codec, q4 group): "q4g64" is q4 with a scale and zero per 64 columns."""
    return ("q4", 64) if name == "q4g64" else (name, 32)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


class Ref:
    """Float64 weights a quantized matrix decodes to, split as the kernels compute them: the q4 zero
    term (zero * sum of x per group) takes the exact activations, the rest the int8-rounded ones."""

    def __init__(self, codec: str, w: torch.Tensor, group: int = 32):
        self.qz = {k: v for k, v in quantize(codec, w, group=group).items() if k != "sq_err"}
        self.zero = torch.zeros(w.shape, dtype=torch.float64)
        if codec == "q4":
            self.w = dequant_q4(self.qz["q"], self.qz["scale"], self.qz["zero"]).double()
            self.zero = self.qz["zero"].double().repeat_interleave(group, dim=-1)
        elif codec == "q8":
            self.w = dequant_q8(self.qz["q"], self.qz["scale"]).double()
        else:
            self.w = self.qz["w"].double()

    def __getitem__(self, e: int) -> Ref:
        r = object.__new__(Ref)
        r.w, r.zero = self.w[e], self.zero[e]
        return r

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() @ self.w.T

    def as_kernels(self, x: torch.Tensor) -> torch.Tensor:
        return quant_x(x) @ (self.w - self.zero).T + x.double() @ self.zero.T


SHAPES = [(1, 32), (7, 64), (37, 288), (100, 96), (130, 2048), (515, 160)]


@pytest.mark.parametrize("name", ["q8", "q4", "q4g64", "bf16", "f32"])
@pytest.mark.parametrize("threads", [1, 3])
def test_linear_matches_reference(isa, name, threads):
    native.load().krs_set_threads(threads)
    codec, group = split_codec(name)
    g = torch.Generator().manual_seed(1)
    for n, k in SHAPES + [(33, 50), (9, 7), (11, 576)]:
        if codec == "q4" and k % group:
            continue
        w = torch.randn(n, k, generator=g)
        for m in (1, 3):
            x = torch.randn(m, k, generator=g) * 2
            x[0, 0] = 40.0  # an outlier, as real activations have
            if codec == "f32":
                got = native.linear("f32", x, n, w)
                assert rel(got, x.double() @ w.double().T) < 1e-5
                continue
            ref = Ref(codec, w, group)
            parts = encode_parts(codec, "rows", ref.qz)
            names = {"q8": ("q", "scale"), "q4": ("q", "scale", "zero"), "bf16": ("w",)}[codec]
            got = native.linear(codec, x, n, *[parts[p] for p in names])
            exact = ref.exact(x)
            if codec == "bf16":
                assert rel(got, exact) < 1e-5, (n, k, m)
            else:
                assert rel(got, ref.as_kernels(x)) < 2e-5, (n, k, m)  # the same math, float order aside
                assert rel(got, exact) < 2e-2, (n, k, m)  # what int8 activations cost


@pytest.mark.parametrize("name", ["q8", "q4", "q4g64", "bf16", "f32"])
@pytest.mark.parametrize("threads", [1, 3])
def test_linear_multi_equals_one_call_per_matrix(isa, name, threads):
    """Several matrices in one call (a layer's q, k and v): each output equals that matrix's own call, bit for bit (one
    quantization of x, rows computed alike whatever chunk they fall in), with rows not a multiple of any chunk."""
    native.load().krs_set_threads(threads)
    codec, group = split_codec(name)
    g = torch.Generator().manual_seed(2)
    k = 192
    names = {"q8": ("q", "scale"), "q4": ("q", "scale", "zero"), "bf16": ("w",), "f32": ("w",)}[codec]
    matrices = []
    for n in (300, 36, 7):
        w = torch.randn(n, k, generator=g)
        if codec == "f32":
            matrices.append([w])
        else:
            quantized = quantize(codec, w, group=group)
            parts = encode_parts(codec, "rows", {k_: v for k_, v in quantized.items() if k_ != "sq_err"})
            matrices.append([parts[p] for p in names])
    for m in (1, 3):
        x = torch.randn(m, k, generator=g)
        got = native.linear_multi(codec, x, matrices)
        want = torch.cat([native.linear(codec, x, ws[0].shape[0], *ws) for ws in matrices], dim=-1)
        assert got.shape == (m, 343) and torch.equal(got, want)


def test_stacked_qkv_runs_as_one_call(tiny):
    """The CPU weights hold each layer's q, k and v as one RowsStack (in place, no copy), which the native kernels take
    in one call; the logits equal, bit for bit, those of the same model with q, k and v as three matrices."""
    import numpy as np

    import krasis_run
    from krasis_run.artifact import RowsStack

    stacked = krasis_run.load(tiny.artifact("q4", "q8"), threads=1)
    names = [name for name in stacked.model.w if name.endswith("qkv_proj")]
    assert len(names) == stacked.args.num_hidden_layers
    assert all(isinstance(stacked.model.w[n], RowsStack) for n in names)
    assert not any(name.endswith((".q_proj", ".k_proj", ".v_proj")) for name in stacked.model.w)
    calls = []
    lib = native.load()
    def multi(*args):
        calls.append(args[4])
        return lib.krs_linear_multi(*args)

    stacked.ops._lib = type("Spy", (), {"__getattr__": lambda self, name: getattr(lib, name),
                                        "krs_linear_multi": staticmethod(multi)})()
    ids = list(range(3, 40))
    got = stacked.logits(ids)
    assert calls == [3] * stacked.args.num_hidden_layers  # one call of three matrices a layer
    three = krasis_run.load(tiny.artifact("q4", "q8"), threads=1)
    for name in names:
        for role, view in zip(("q_proj", "k_proj", "v_proj"), three.model.w.pop(name).views, strict=True):
            three.model.w[name[: -len("qkv_proj")] + role] = view
    assert np.array_equal(got, three.logits(ids))


def expert_blocks(codec: str, e: int, h: int, i: int, seed: int, group: int = 32):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(e, 2 * i, h, generator=g) * h**-0.5
    down = torch.randn(e, h, i, generator=g) * i**-0.5
    ref_gu, ref_dn = Ref(codec, gate_up, group), Ref(codec, down, group)
    blocks = [cpu_block_parts(codec, ref_gu.qz, ref_dn.qz, x) for x in range(e)]
    names = {"q4": ("q", "scale_zero"), "q8": ("q", "scale"), "bf16": ("w", "w")}[codec]
    ptrs = torch.tensor([[b[f"gate_up.{names[0]}"].data_ptr(), b[f"gate_up.{names[1]}"].data_ptr(),
                          b[f"down.{names[0]}"].data_ptr(), b[f"down.{names[1]}"].data_ptr()] for b in blocks],
                        dtype=torch.int64)
    return blocks, ptrs, ref_gu, ref_dn


def moe_reference(x, ids, wts, ref_gu, ref_dn, quantized: bool):
    i = ref_gu.w.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for m in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[m, j])
            if e < 0:  # a slot the caller computes elsewhere (hybrid decode): skipped
                continue
            mm = Ref.as_kernels if quantized else Ref.exact
            gu = mm(ref_gu[e], x[m:m + 1])[0]
            hid = (F.silu(gu[:i]) * gu[i:])[None].float()
            out[m] += float(wts[m, j]) * mm(ref_dn[e], hid)[0]
    return out


@pytest.mark.parametrize("name", ["q4", "q4g64", "q8", "bf16"])
@pytest.mark.parametrize("threads", [1, 4])
def test_moe_matches_reference(isa, name, threads):
    native.load().krs_set_threads(threads)
    codec, group = split_codec(name)
    for h, i, e, k, m in [(64, 32, 8, 2, 1), (128, 96, 6, 3, 5), (192, 64, 16, 8, 2), (256, 192, 8, 4, 3)]:
        if i % group:
            continue
        blocks, ptrs, ref_gu, ref_dn = expert_blocks(codec, e, h, i, seed=h + i, group=group)
        g = torch.Generator().manual_seed(e)
        x = torch.randn(m, h, generator=g)
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(m)]).to(torch.int32)
        if m > 1:
            ids[1] = ids[0]  # tokens sharing experts
        wts = torch.rand(m, k, generator=g)
        got = native.moe(codec, x, ids, wts, ptrs, h, i, e, group=group)
        exact = moe_reference(x, ids, wts, ref_gu, ref_dn, quantized=False)
        if codec == "bf16":
            assert rel(got, exact) < 1e-5
        else:
            assert rel(got, moe_reference(x, ids, wts, ref_gu, ref_dn, quantized=True)) < 1e-3
            assert rel(got, exact) < 3e-2


@pytest.mark.parametrize("codec", ["q4", "q8", "bf16"])
@pytest.mark.parametrize("threads", [1, 3])
def test_moe_skips_negative_ids(isa, codec, threads):
    """-1 marks a slot a hybrid engine runs on the GPU: the result is the sum over the kept slots alone,
    its expert is never read (a null pointer row would crash if it were), all -1 gives zeros."""
    native.load().krs_set_threads(threads)
    for h, i, e, k, m in [(64, 32, 8, 2, 1), (128, 96, 6, 3, 5), (192, 64, 16, 8, 3), (128, 64, 128, 8, 1)]:
        blocks, ptrs, ref_gu, ref_dn = expert_blocks(codec, e, h, i, seed=h + i + 1)
        g = torch.Generator().manual_seed(e + k)
        x = torch.randn(m, h, generator=g)
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(m)]).to(torch.int32)
        wts = torch.rand(m, k, generator=g)
        skip = torch.rand(m, k, generator=g) < 0.5
        skip[0, 0], skip[-1, -1] = True, False  # at least one skipped and one kept slot
        skipped_experts = set(ids[skip].tolist()) - set(ids[~skip].tolist())
        ids = ids.masked_fill(skip, -1)
        ptrs_used = ptrs.clone()
        ptrs_used[sorted(skipped_experts)] = 0  # a skipped expert's block must not be touched
        got = native.moe(codec, x, ids, wts, ptrs_used, h, i, e)
        want = moe_reference(x, ids, wts, ref_gu, ref_dn, quantized=codec != "bf16")
        assert rel(got, want) < (1e-5 if codec == "bf16" else 1e-3), (h, i, e, k, m)
        out = torch.full((m, h), float("nan"))
        assert native.moe(codec, x, ids, wts, ptrs_used, h, i, e, out=out) is out
        assert torch.equal(out, got)
        none = torch.full((m, k), -1, dtype=torch.int32)
        assert torch.equal(native.moe(codec, x, none, wts, torch.zeros_like(ptrs), h, i, e), torch.zeros(m, h))


def test_kernels_write_into_out():
    """out= (the hybrid engine's pinned buffers): same values as a fresh result, the buffer returned, and a
    buffer of the wrong shape or dtype refused before the kernel writes through its pointer."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 64, generator=g), torch.randn(48, 64, generator=g)
    out = torch.empty(2, 48)
    assert native.linear("f32", x, 48, w, out=out) is out and torch.equal(out, native.linear("f32", x, 48, w))
    q = torch.randn(1, 4, 16, generator=g)
    kv = torch.randn(3, 2, 16, generator=g).to(torch.bfloat16)
    out = torch.empty(1, 64)
    assert native.attention(q, kv, kv, 2, out=out) is out and torch.equal(out, native.attention(q, kv, kv, 2))
    for bad in (torch.empty(2, 47), torch.empty(2, 48, dtype=torch.float64), torch.empty(48, 2).T):
        with pytest.raises(ValueError):
            native.linear("f32", x, 48, w, out=bad)


def test_moe_rejects_bad_expert_ids():
    blocks, ptrs, *_ = expert_blocks("q8", 4, 64, 32, seed=0)
    with pytest.raises(RuntimeError):
        native.moe("q8", torch.randn(1, 64), torch.tensor([[0, 4]], dtype=torch.int32), torch.ones(1, 2), ptrs,
                   64, 32, 4)


@pytest.mark.parametrize("threads", [1, 3])
def test_attention_matches_reference(isa, threads):
    native.load().krs_set_threads(threads)
    g = torch.Generator().manual_seed(3)
    # groups of 8 heads (one vector's lanes) and partial groups (12 = 8 + 4, 3, 1), head sizes that are not a
    # multiple of the vector width (20: the portable kernel), caches long enough to be split in parts (with
    # several query tokens whose causal limits end in different parts), and a single key
    cases = [(4, 2, 16, 0, 1), (8, 2, 128, 37, 1), (6, 3, 64, 5, 4), (4, 4, 32, 0, 3), (32, 4, 128, 900, 1),
             (24, 2, 64, 766, 5), (6, 2, 20, 300, 2), (16, 16, 8, 1030, 1), (8, 1, 128, 0, 1)]
    for nq, nkv, hd, start, t in cases:
        s = start + t
        q = torch.randn(t, nq, hd, generator=g)
        keys = torch.randn(s, nkv, hd, generator=g).to(torch.bfloat16)
        values = torch.randn(s, nkv, hd, generator=g).to(torch.bfloat16)
        got = native.attention(q, keys, values, start)
        assert rel(got, causal_attention(q, keys, values, start)) < 1e-5


def test_isa_env_forces_a_path():
    code = "from krasis_run.kernels import native; print(native.isa())"
    env = dict(os.environ, KRASIS_CPU_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"
    env["KRASIS_CPU_ISA"] = "sse9"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "KRASIS_CPU_ISA" in bad.stderr


def test_build_is_keyed_by_source(tmp_path, monkeypatch):
    from krasis_run.kernels.native import build

    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    path = build.build(tmp_path)
    assert path.parent == tmp_path and build.source_hash() in path.name and build.find_library() == path


def _serve_layers(codec: str, layers: int, h: int, i: int, e: int, k: int, group: int = 32):
    """Per layer: pinned-like buffers (x, ids, weights, out), its expert table, flags, and the expected sum."""
    flags = torch.zeros(2 * layers * 16, dtype=torch.int32)
    rows, want, keep = [], [], [flags]
    for layer in range(layers):
        blocks, ptrs, ref_gu, ref_dn = expert_blocks(codec, e, h, i, seed=layer, group=group)
        g = torch.Generator().manual_seed(100 + layer)
        x = torch.randn(1, h, generator=g)
        ids = torch.randperm(e, generator=g)[:k].to(torch.int32)[None]
        ids[0, 0] = -1  # a slot the GPU computes
        wts = torch.rand(1, k, generator=g)
        out = torch.full((1, h), float("nan"))
        keep += [blocks, ptrs, x, ids, wts, out]
        rows.append([flags.data_ptr() + 128 * layer, flags.data_ptr() + 128 * layer + 64, x.data_ptr(),
                     ids.data_ptr(), wts.data_ptr(), out.data_ptr(), ptrs.data_ptr()])
        want.append(native.moe(codec, x, ids, wts, ptrs, h, i, e, group=group))
    return torch.tensor(rows, dtype=torch.int64), flags, want, keep


@pytest.mark.parametrize("name", ["q4", "q4g64", "q8"])
def test_moe_serve_follows_the_flags(name):
    """The CPU side of a one-graph decode step: each layer runs only once its ready flag is set (here by a
    thread standing in for the GPU, layer by layer, checking done before setting the next), clears ready,
    and sets done with that layer's experts in out; the stats count the blocks read."""
    import threading
    import time

    h, i, e, k, layers = 128, 64, 16, 4, 3
    codec, group = split_codec(name)
    table, flags, want, keep = _serve_layers(codec, layers, h, i, e, k, group)
    outs = keep[6::6]
    order = []

    def gpu() -> None:
        for layer in range(layers):
            time.sleep(0.02)
            assert flags[32 * layer + 16] == 0 and torch.isnan(outs[layer]).all()  # not run before ready
            flags[32 * layer] = 1
            while int(flags[32 * layer + 16]) != 1:
                time.sleep(0.001)
            order.append((layer, int(flags[32 * layer])))

    stats = torch.zeros(3, dtype=torch.float64)
    thread = threading.Thread(target=gpu)
    thread.start()
    native.moe_serve(codec, h, i, e, k, table, 10.0, stats, group=group)
    thread.join()
    assert order == [(0, 0), (1, 0), (2, 0)]  # ready cleared by the CPU, done set, in layer order
    for got, expected in zip(outs, want, strict=True):
        assert torch.equal(got, expected)
    assert stats[2] == layers * (k - 1) and stats[0] > 0.04 and stats[1] > 0


def test_moe_serve_times_out_and_releases_every_layer():
    """No ready flag within the timeout: TimeoutError, and every layer's done set with out zeroed, so a graph
    waiting on them cannot hang."""
    h, i, e, k, layers = 64, 32, 8, 2, 2
    table, flags, _, keep = _serve_layers("q8", layers, h, i, e, k)
    stats = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(TimeoutError):
        native.moe_serve("q8", h, i, e, k, table, 0.05, stats)
    assert [int(flags[32 * layer + 16]) for layer in range(layers)] == [1, 1]
    assert all(torch.equal(out, torch.zeros(1, h)) for out in keep[6::6])


@pytest.mark.parametrize("threads", [1, 3, 7])
@pytest.mark.parametrize("words", [1, 15, 17, 1001, 4099])
def test_read_probe_reads_every_word(isa, threads, words):
    """The bandwidth probe's per-thread shares cover the buffer exactly once: its XOR is the XOR of every word."""
    import functools

    native.set_threads(threads)
    w = torch.randint(-2**62, 2**62, (words,), dtype=torch.int64, generator=torch.Generator().manual_seed(words))
    want = functools.reduce(lambda a, b: a ^ b, w.tolist()) & (2**64 - 1)
    assert native.load().krs_read_probe(w.data_ptr(), words * 8) == want
