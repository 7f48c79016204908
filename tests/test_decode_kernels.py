"""GPU decode kernels (krasis_run/kernels/decode_gpu.py) and the two prefill Triton kernels, on the CPU.

The torch references are checked against float64 math written here from formats/KRS.md §5. The Triton
kernels (class InterpretedKernels) run under the Triton interpreter against the references and that math.
The interpreter has to be chosen before triton is first imported (triton.language's own helpers, tl.zeros,
tl.sum..., are @triton.jit functions decorated at import), and switching it on in this process would also
turn the GPU tests of other modules into interpreted ones; so test_triton_kernels_under_interpreter runs
the class in a child pytest with TRITON_INTERPRET=1 and fails with the child's report.
"""

from __future__ import annotations

import math

import pytest
import torch
from fixtures import run_interpreted

from krasis_run.codecs import dequant_parts, pack_q4_rows
from krasis_run.kernels import decode_gpu, dequant, norm_rope
from krasis_run.kernels.decode_gpu import (
    decode_attention,
    decode_attention_torch,
    linear_q8,
    linear_q8_torch,
    moe_decode,
    moe_decode_torch,
)

pytest.importorskip("triton")  # a test dependency (pyproject [test]); only a bare install skips


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


# ---------------------------------------------------------------- routed experts: data and plain math


def random_tiles(codec: str, slots: int, n: int, k: int, gen: torch.Generator, group: int = 32
                 ) -> dict[str, torch.Tensor]:
    """Stacked GPU "rows" parts [slots, n, k] of random quantized values (q4: a scale and zero per `group` columns)."""
    if codec == "q4":
        q = torch.randint(0, 16, (slots, n, k), generator=gen, dtype=torch.uint8)
        groups = (slots, n, k // group)
        scale = 0.005 + 0.02 * torch.rand(groups, generator=gen)
        zero = 0.01 * torch.randn(groups, generator=gen)
        return {"q": pack_q4_rows(q), "scale": scale.bfloat16(), "zero": zero.bfloat16()}
    if codec == "q8":
        q = torch.randint(-127, 128, (slots, n, k), generator=gen, dtype=torch.int8)
        return {"q": q, "scale": (0.0005 + 0.002 * torch.rand(slots, n, generator=gen)).bfloat16()}
    return {"w": (0.08 * torch.randn(slots, n, k, generator=gen)).bfloat16()}


def plain_weights(codec: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """float64 [S, N, K] by hand from KRS.md §5 (not through krasis_run.codecs)."""
    if codec == "bf16":
        return parts["w"].double()
    if codec == "q8":
        return parts["q"].double() * parts["scale"].double()[..., None]
    packed = parts["q"].long()
    q = torch.empty(*packed.shape[:-1], 2 * packed.shape[-1], dtype=torch.float64)
    q[..., 0::2] = packed & 15  # even column in the low nibble
    q[..., 1::2] = packed >> 4
    group = q.shape[-1] // parts["scale"].shape[-1]
    scale = parts["scale"].double().repeat_interleave(group, dim=-1)
    zero = parts["zero"].double().repeat_interleave(group, dim=-1)
    return (q - 8) * scale + zero


def plain_moe(x, ids, weights, slot_of, codec, gate_up, down) -> torch.Tensor:
    w1, w2 = plain_weights(codec, gate_up), plain_weights(codec, down)
    inter = w2.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for m in range(x.shape[0]):
        for j in range(ids.shape[1]):
            slot = int(slot_of[int(ids[m, j])])
            if slot < 0:
                continue
            h = w1[slot] @ x[m].double()
            gate, up = h[:inter], h[inter:]
            act = gate / (1 + torch.exp(-gate)) * up
            out[m] += float(weights[m, j]) * (w2[slot] @ act)
    return out


# (M, k, H, I, experts, resident): H and I multiples of 32, not of the tile sizes
MOE_CASES = [(1, 8, 96, 64, 16, 10), (3, 2, 160, 96, 12, 12), (3, 5, 96, 96, 20, 7), (2, 4, 64, 32, 8, 0)]


def moe_inputs(codec: str, case, seed: int, group: int = 32):
    m, k, h, inter, experts, resident = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, h, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(m)])
    held = torch.randperm(experts, generator=gen)[:resident]
    slot_of = torch.full((experts,), -1, dtype=torch.int32)
    slot_of[held] = torch.randperm(resident, generator=gen).int()  # slots in no particular expert order
    if 0 < resident < experts:
        ids[0, 0] = int((slot_of < 0).nonzero()[0])  # at least one chosen expert is not held here
    ids = ids.int() if seed % 2 else ids  # both index dtypes
    weights = torch.softmax(torch.randn(m, k, generator=gen), dim=-1)
    slots = max(resident, 1) if resident else 3  # all non-resident: tiles exist but none is mapped
    gate_up = random_tiles(codec, slots, 2 * inter, h, gen, group)
    down = random_tiles(codec, slots, h, inter, gen, group)
    if resident == 0:
        slot_of.fill_(-1)
    return x, ids, weights, slot_of, codec, gate_up, down


def seed_of(codec: str, case) -> int:
    return 10 * MOE_CASES.index(case) + 2 * ["q4", "q8", "bf16"].index(codec)  # fixed; even and odd both occur


@pytest.mark.parametrize("codec", ["q4", "q8", "bf16"])
@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_reference_matches_plain_math(codec, case):
    args = moe_inputs(codec, case, seed=seed_of(codec, case))
    got = moe_decode_torch(*args)
    want = plain_moe(*args)
    assert got.dtype == torch.float32 and got.shape == args[0].shape
    if case[5] == 0:
        assert torch.equal(got, torch.zeros_like(got))
    else:
        assert rel_l2(got, want) < 1e-5


def test_moe_reference_writes_out_and_uses_stored_dequant():
    args = moe_inputs("q4", MOE_CASES[0], seed=3)
    out = torch.full_like(args[0], float("nan"))
    assert moe_decode_torch(*args, out=out) is out
    w = dequant_parts("q4", "rows", args[5])  # the codec agrees with the hand-written dequant
    assert torch.allclose(w.double(), plain_weights("q4", args[5]), atol=1e-6)
    assert rel_l2(out, plain_moe(*args)) < 1e-5


def test_moe_reference_without_resident_slots():
    x, ids, weights, slot_of, codec, gate_up, down = moe_inputs("q8", MOE_CASES[0], seed=5)
    empty_gu = {name: t[:0] for name, t in gate_up.items()}
    empty_dn = {name: t[:0] for name, t in down.items()}
    got = moe_decode(x, ids, weights, torch.full_like(slot_of, -1), codec, empty_gu, empty_dn)
    assert torch.equal(got, torch.zeros_like(x))


# ---------------------------------------------------------------- attention


def plain_attention(q, k_cache, v_cache, length: int) -> torch.Tensor:
    heads, dim = q.shape
    group = heads // k_cache.shape[1]
    out = torch.empty(heads, dim, dtype=torch.float64)
    for h in range(heads):
        k = k_cache[:length, h // group].double()
        v = v_cache[:length, h // group].double()
        s = k @ q[h].double() / math.sqrt(dim)
        p = torch.exp(s - s.max())
        out[h] = (p / p.sum()) @ v
    return out.reshape(-1)


# (H, KVH, D, capacity, length, q dtype): GQA ratios 1 and 4, length 1 and capacity, capacity not a block multiple
ATTN_CASES = [
    (4, 4, 32, 200, 1, torch.float32),
    (8, 2, 32, 100, 100, torch.float32),
    (8, 2, 64, 150, 77, torch.bfloat16),
    (4, 1, 32, 300, 300, torch.float32),
    (2, 2, 16, 70, 65, torch.float32),
]


def attention_inputs(case, seed: int):
    heads, kv_heads, dim, capacity, length, dtype = case
    gen = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(heads, dim, generator=gen)).to(dtype)
    k_cache = torch.randn(capacity, kv_heads, dim, generator=gen).bfloat16()
    v_cache = torch.randn(capacity, kv_heads, dim, generator=gen).bfloat16()
    k_cache[length:] = float("nan")  # positions past the end must not be read (nor leak through 0 * nan)
    v_cache[length:] = float("nan")
    return q, k_cache, v_cache, torch.tensor([length], dtype=torch.int32)


@pytest.mark.parametrize("case", ATTN_CASES)
def test_attention_reference_matches_plain_math(case):
    q, k_cache, v_cache, length = attention_inputs(case, seed=case[3])
    got = decode_attention_torch(q, k_cache, v_cache, length)
    assert got.dtype == torch.float32 and got.shape == (q.numel(),)
    assert rel_l2(got, plain_attention(q, k_cache, v_cache, case[4])) < 1e-5


# ---------------------------------------------------------------- q8 dense GEMV: data and plain math


def q8_rows(n: int, k: int, m: int, seed: int, x_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = (0.001 + 0.01 * torch.rand(n, generator=gen)).bfloat16()
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    return x, q, scale


def plain_linear_q8(x, q, scale) -> torch.Tensor:
    """float64 sum_k q[n, k] * scale[n] * x[m, k] (codecs: w = q * scale)"""
    return x.double() @ (q.double() * scale.double()[:, None]).T


@pytest.mark.parametrize("n, k, m", [(40, 96, 1), (7, 2048, 3)])
def test_linear_q8_reference_matches_plain_math(n, k, m):
    x, q, scale = q8_rows(n, k, m, seed=n)
    got = linear_q8_torch(x, q, scale)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert rel_l2(got, plain_linear_q8(x, q, scale)) < 4e-3  # the bf16 output
    out = torch.empty(m, n, dtype=torch.bfloat16)
    assert linear_q8(x, q, scale, out=out) is out and torch.equal(out, got)  # CPU tensors: the reference


# ---------------------------------------------------------------- Triton kernels, under the interpreter


def test_triton_kernels_under_interpreter():
    """Runs class InterpretedKernels in a child pytest with TRITON_INTERPRET=1 (see the module docstring)."""
    run_interpreted(__file__, "InterpretedKernels")


class InterpretedKernels:
    """Collected only by the child run above (python_classes=InterpretedKernels), where the interpreter is on."""

    @pytest.fixture(autouse=True)
    def _interpreter_on(self):
        from triton import knobs

        assert knobs.runtime.interpret, "run through test_triton_kernels_under_interpreter (TRITON_INTERPRET=1)"

    @pytest.fixture(autouse=True)
    def _float_q4_inputs(self, monkeypatch):
        # the float q4 kernels, held to 1e-5 below; the int8-input gate_up (Q4G_INT8) has its own tests
        monkeypatch.setattr(decode_gpu, "Q4G_INT8", False)

    def test_quantize_x_packs_int8_groups(self):
        """quantize_x_kernel: per 32-column group int8 = round(x * 127 / amax), the words holding columns
        (0, 2, 4, 6) then (1, 3, 5, 7) of each 8, the scale amax / 127, the int8 sum and the float sum."""
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(3, 160, generator=gen) * torch.rand(3, 160, generator=gen) * 4
        x[1, 32:64] = 0  # an all-zero group: scale 0, values 0
        ng = 5
        xq = torch.empty(3, ng * 8, dtype=torch.int32)
        dx, sx, fs = torch.empty(3, ng), torch.empty(3, ng, dtype=torch.int32), torch.empty(3, ng)
        decode_gpu._kernels()["quantize_x"][(3,)](x, xq, dx, sx, fs, 160, GP=8, PDL=False)
        bytes_ = xq.view(torch.int8).view(3, ng, 4, 2, 4)  # [row, group, word of 8 columns, even/odd, byte]
        got = bytes_.permute(0, 1, 2, 4, 3).reshape(3, 160)  # byte i of the even word: column 2i of the 8
        groups = x.view(3, ng, 32)
        amax = groups.abs().amax(-1)
        want = torch.where(amax[..., None] > 0, torch.floor(groups * (127 / amax[..., None]) + 0.5), 0).clamp(-127, 127)
        assert torch.equal(got.float(), want.view(3, 160))
        assert torch.allclose(dx, amax / 127) and torch.equal(sx, want.sum(-1).int())
        assert torch.allclose(fs, groups.sum(-1), atol=1e-5)

    @pytest.mark.parametrize("case", MOE_CASES)
    def test_moe_triton_q4_int8_inputs(self, monkeypatch, case):
        """Q4G_INT8: x quantized per group, integer dot products (the dp4a math in plain Triton here): within the
        int8 rounding of the float result; all-non-resident calls give zeros; quantize runs first."""
        monkeypatch.setattr(decode_gpu, "Q4G_INT8", True)
        for name in ("Q4G_BLOCK_N", "Q4G_DOWN_BLOCK_N"):
            monkeypatch.setattr(decode_gpu, name, 64)
        args = moe_inputs("q4", case, seed=seed_of("q4", case) + 5)
        got = moe_decode(*args, use_triton=True)
        if case[5] == 0:
            assert torch.equal(got, torch.zeros_like(got))
        else:
            assert rel_l2(got, plain_moe(*args)) < 1e-2
        _, launches = decode_gpu.moe_decode_launches(*args)
        assert [name for name, _ in launches][:2] == ["quantize", "gate_up"]

    def test_moe_triton_q4_int8_partial_steps(self, monkeypatch):
        """H = 160 (5 groups) in steps of 2 groups, I = 96, partial row blocks, one chosen expert not resident."""
        for name, value in {"Q4G_INT8": True, "Q4G_BLOCK_N": 64, "Q4G_DOWN_BLOCK_N": 64, "Q4G_GROUPS": 2}.items():
            monkeypatch.setattr(decode_gpu, name, value)
        args = moe_inputs("q4", (3, 3, 160, 96, 6, 5), seed=17)
        assert rel_l2(moe_decode(*args, use_triton=True), plain_moe(*args)) < 1e-2

    @pytest.mark.parametrize("codec", ["q4", "q8", "bf16"])
    @pytest.mark.parametrize("case", MOE_CASES)
    def test_moe_triton_matches_reference(self, monkeypatch, codec, case):
        # 64-row tiles: the interpreter's cost is per program and per op, not per element (q4: the grouped kernels)
        for name in ("MOE_BLOCK_N", "DOWN_BLOCK_N", "Q4G_BLOCK_N", "Q4G_DOWN_BLOCK_N"):
            monkeypatch.setattr(decode_gpu, name, 64)
        args = moe_inputs(codec, case, seed=seed_of(codec, case) + 1)
        got = moe_decode(*args, use_triton=True)
        want = moe_decode_torch(*args)
        if case[5] == 0:
            assert torch.equal(got, torch.zeros_like(got))
        else:
            assert rel_l2(got, want) < 1e-5
            assert rel_l2(got, plain_moe(*args)) < 1e-5

    @pytest.mark.parametrize("codec", ["q4", "q8"])
    def test_moe_triton_production_tiles(self, codec):
        args = moe_inputs(codec, MOE_CASES[0], seed=21)
        assert rel_l2(moe_decode(*args, use_triton=True), plain_moe(*args)) < 1e-5

    @pytest.mark.parametrize("case", [MOE_CASES[0], MOE_CASES[2]])
    def test_moe_triton_q4_bytes_kernels(self, monkeypatch, case):
        """The per-byte q4 kernels (Q4_KERNEL = "bytes"), kept for the sweep: M=1 and 3, non-resident experts."""
        for name, value in (("Q4_KERNEL", "bytes"), ("MOE_BLOCK_N", 64), ("DOWN_BLOCK_N", 64)):
            monkeypatch.setattr(decode_gpu, name, value)
        args = moe_inputs("q4", case, seed=31)
        assert rel_l2(moe_decode(*args, use_triton=True), plain_moe(*args)) < 1e-5

    @pytest.mark.parametrize("codec", ["q4", "q4-bytes", "q8", "bf16"])
    def test_moe_triton_partial_tiles(self, monkeypatch, codec):
        """Tiles that don't divide H or I: several loop steps, the last one partial, and partial row blocks.
        Grouped q4: 5 and 3 groups in steps of 2, and the k=3 experts of a down program in blocks of 2."""
        tiles = {"MOE_BLOCK_N": 64, "DOWN_BLOCK_N": 64, "GATE_UP_BLOCK_K": 128, "DOWN_BLOCK_K": 64, "Q4G_BLOCK_N": 64,
                 "Q4G_DOWN_BLOCK_N": 64, "Q4G_GROUPS": 2, "Q4G_DOWN_GROUPS": 2, "Q4G_DOWN_EXPERTS": 2}
        for name, value in tiles.items():
            monkeypatch.setattr(decode_gpu, name, value)
        if codec == "q4-bytes":
            monkeypatch.setattr(decode_gpu, "Q4_KERNEL", "bytes")
            codec = "q4"
        args = moe_inputs(codec, (3, 3, 160, 96, 6, 5), seed=11)
        out = torch.full_like(args[0], float("nan"))
        assert moe_decode(*args, out=out, use_triton=True) is out
        assert rel_l2(out, plain_moe(*args)) < 1e-5

    @pytest.mark.parametrize("kernel", ["int8", "float", "float-steps", "bytes"])
    def test_moe_triton_q4_groups_of_64(self, monkeypatch, kernel):
        """q4 tiles with a scale and zero per 64 columns (SUB = 2): H = 192 is 3 weight groups (6 of the kernels' 32-
        column groups: a partial step of 8, or 3 steps of 2), I = 128 is 2; one chosen expert is not resident."""
        tiles = {"Q4G_INT8": kernel == "int8", "Q4G_BLOCK_N": 64, "Q4G_DOWN_BLOCK_N": 64, "MOE_BLOCK_N": 64,
                 "DOWN_BLOCK_N": 64, "GATE_UP_BLOCK_K": 128, "DOWN_BLOCK_K": 64}
        if kernel == "float-steps":
            tiles.update(Q4G_GROUPS=2, Q4G_DOWN_GROUPS=2, Q4G_DOWN_UNROLL=2, Q4G_DOWN_EXPERTS=2)
        if kernel == "bytes":
            tiles["Q4_KERNEL"] = "bytes"
        for name, value in tiles.items():
            monkeypatch.setattr(decode_gpu, name, value)
        args = moe_inputs("q4", (3, 3, 192, 128, 6, 5), seed=19, group=64)
        assert args[5]["scale"].shape[-1] == 3 and args[6]["scale"].shape[-1] == 2
        want = plain_moe(*args)
        assert rel_l2(moe_decode_torch(*args), want) < 1e-5
        assert rel_l2(moe_decode(*args, use_triton=True), want) < (1e-2 if kernel == "int8" else 1e-5)

    def test_q4_rows_triton_groups_of_64(self):
        gen = torch.Generator().manual_seed(1)
        parts = random_tiles("q4", 3, 40, 192, gen, group=64)
        got = dequant.q4_rows(parts["q"], parts["scale"], parts["zero"], use_triton=True)
        assert torch.allclose(got.float(), dequant.q4_rows_torch(**parts).float(), rtol=1 / 128, atol=0)
        assert torch.allclose(got.double(), plain_weights("q4", parts), rtol=1 / 128, atol=1e-6)

    @pytest.mark.parametrize("variant", ["unroll", "stages", "atomic", "atomic-1", "all-experts"])
    def test_moe_triton_q4_grouped_variants(self, monkeypatch, variant):
        """The grouped q4 kernels' selectable variants (the sweep's), with partial steps: H = 160 is 5 groups, I = 96
        is 3, k = 3; one chosen expert is not resident. Launched one by one through moe_decode_launches too."""
        tiles = {"Q4G_BLOCK_N": 64, "Q4G_DOWN_BLOCK_N": 64, "Q4G_GROUPS": 2, "Q4G_DOWN_GROUPS": 2}
        tiles.update({
            "unroll": {"Q4G_UNROLL": 2, "Q4G_DOWN_UNROLL": 3, "Q4G_ALIGNED": True},  # 5 groups in steps of 2 x 2
            "stages": {"Q4G_STAGES": 3, "Q4G_DOWN_STAGES": 2, "Q4G_ALIGNED": True},
            "atomic": {"Q4G_DOWN_ATOMIC": True, "Q4G_DOWN_EXPERTS": 2, "Q4G_DOWN_UNROLL": 2, "Q4G_ALIGNED": True},
            "atomic-1": {"Q4G_DOWN_ATOMIC": True, "Q4G_BLOCK_N": 32},  # 3 x 3 x 3 programs zero the 3 x 160 output
            "all-experts": {"Q4G_DOWN_EXPERTS": 8, "Q4G_DOWN_BLOCK_N": 32},  # k = 3 in one program: no partials
        }[variant])
        for name, value in tiles.items():
            monkeypatch.setattr(decode_gpu, name, value)
        args = moe_inputs("q4", (3, 3, 160, 96, 6, 5), seed=13)
        want = plain_moe(*args)
        out = torch.full_like(args[0], float("nan"))  # the atomic variants zero it in the gate_up kernel
        assert moe_decode(*args, out=out, use_triton=True) is out
        assert rel_l2(out, want) < 1e-5
        out.fill_(float("nan"))
        y, launches = decode_gpu.moe_decode_launches(*args, out=out)
        partials = decode_gpu.Q4G_DOWN_EXPERTS < 3 and not decode_gpu.Q4G_DOWN_ATOMIC  # k = 3 here
        names = ["gate_up", "down"] + (["sum"] if partials else [])
        assert y is out and [name for name, _ in launches] == names
        for _, launch in launches:
            launch()
        assert rel_l2(out, want) < 1e-5

    @pytest.mark.parametrize("case", ATTN_CASES)
    def test_attention_triton_matches_reference(self, case):
        q, k_cache, v_cache, length = attention_inputs(case, seed=case[3] + 1)
        out = torch.full((q.numel(),), float("nan"))
        assert decode_attention(q, k_cache, v_cache, length, out=out, use_triton=True) is out
        assert rel_l2(out, decode_attention_torch(q, k_cache, v_cache, length)) < 1e-5
        assert rel_l2(out, plain_attention(q, k_cache, v_cache, case[4])) < 1e-5

    @pytest.mark.parametrize("length", [1, 17, 299])
    def test_attention_triton_splits_of_several_blocks(self, monkeypatch, length):
        """Small blocks, few programs: each split loops over several blocks; some splits are past the end."""
        monkeypatch.setattr(decode_gpu, "ATTN_BLOCK", 16)
        monkeypatch.setattr(decode_gpu, "ATTN_PROGRAMS", 6)
        q, k_cache, v_cache, len_t = attention_inputs((8, 2, 32, 300, length, torch.float32), seed=length)
        assert decode_gpu.attention_splits(300, 2) == 3
        parts, ml = decode_gpu.attention_workspace(8, 32, 300, 2, "cpu")
        parts.fill_(float("nan"))  # stale partials of splits past the end must not be read
        ml.fill_(float("nan"))
        got = decode_attention(q, k_cache, v_cache, len_t, workspace=(parts, ml), use_triton=True)
        assert rel_l2(got, plain_attention(q, k_cache, v_cache, length)) < 1e-5

    def test_attention_length_is_read_from_the_device_tensor(self):
        """One set of launches serves every length (as a replayed CUDA graph does): only the tensor's value changes."""
        q, k_cache, v_cache, length = attention_inputs((4, 2, 32, 96, 96, torch.float32), seed=7)
        out = torch.empty(q.numel())
        for n in (96, 40, 1):
            length.fill_(n)
            decode_attention(q, k_cache, v_cache, length, out=out, use_triton=True)
            assert rel_l2(out, plain_attention(q, k_cache, v_cache, n)) < 1e-5

    @pytest.mark.parametrize("acc2d", [True, False])
    @pytest.mark.parametrize("n, k, m, x_dtype", [(37, 96, 1, torch.float32), (9, 160, 2, torch.bfloat16)])
    def test_linear_q8_triton_matches_reference(self, monkeypatch, n, k, m, x_dtype, acc2d):
        # tiles smaller than the matrix and a last column step past K: every mask taken
        monkeypatch.setattr(decode_gpu, "LINEAR_Q8_ACC2D", acc2d)
        monkeypatch.setattr(decode_gpu, "LINEAR_Q8_BLOCK_N", 8)
        monkeypatch.setattr(decode_gpu, "LINEAR_Q8_BLOCK_K", 64)
        x, q, scale = q8_rows(n, k, m, seed=k, x_dtype=x_dtype)
        got = linear_q8(x, q, scale, use_triton=True)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        # 1 bf16 ulp: the interpreter rounds float32 -> bf16 towards zero, torch to nearest even
        assert torch.allclose(got.float(), linear_q8_torch(x, q, scale).float(), rtol=1 / 128, atol=1e-6)
        assert rel_l2(got, plain_linear_q8(x, q, scale)) < 4e-3

    @pytest.mark.parametrize("n, k, m", [(37, 160, 1), (9, 96, 2)])
    def test_linear_q8_int8_inputs(self, monkeypatch, n, k, m):
        """x as int8 groups (quantize_x's): the dp4a kernel (its integer math in plain Triton here) equals the
        reference on the dequantized groups, every mask taken (rows past N, a last group step past K), and stays
        within the int8 rounding of the float product; negative weights and inputs exercise the signed bytes."""
        monkeypatch.setattr(decode_gpu, "LINEAR_Q8I_BLOCK_N", 8)
        monkeypatch.setattr(decode_gpu, "LINEAR_Q8I_GROUPS", 2)
        x, q, scale = q8_rows(n, k, m, seed=k + m)
        groups = decode_gpu.int8_groups(m, k, "cpu")
        decode_gpu._kernels()["quantize_x"][(m,)](x, *groups, k, GP=decode_gpu.next_pow2(k // 32), PDL=False)
        assert rel_l2(decode_gpu.int8_groups_dequant(groups), x) < 1e-2
        got = linear_q8(x, q, scale, use_triton=True, x_int8=groups)
        want = linear_q8(x, q, scale, use_triton=False, x_int8=groups)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        assert torch.allclose(got.float(), want.float(), rtol=1 / 128, atol=1e-6)  # 1 bf16 ulp (interpreter rounding)
        assert rel_l2(got, plain_linear_q8(x, q, scale)) < 1e-2

    def test_attention_writes_int8_groups(self):
        """x_int8: the combine also writes the output's int8 groups (of the bf16 row it stores), what quantize_x
        gives on that row; the output itself is unchanged."""
        q, k_cache, v_cache, length = attention_inputs((8, 2, 32, 40, 29, torch.float32), seed=11)
        want = torch.empty(q.numel(), dtype=torch.bfloat16)
        decode_attention(q, k_cache, v_cache, length, out=want, use_triton=True)
        groups = decode_gpu.int8_groups(1, q.numel(), "cpu")
        got = torch.empty_like(want)
        decode_attention(q, k_cache, v_cache, length, out=got, use_triton=True, x_int8=groups)
        assert torch.equal(got, want)
        ref = decode_gpu.int8_groups(1, q.numel(), "cpu")
        decode_gpu._kernels()["quantize_x"][(1,)](want, *ref, q.numel(), GP=8, PDL=False)
        assert all(torch.equal(a, b) for a, b in zip(groups, ref, strict=True))

    def test_add_rms_norm_quantize_equals_norm_then_quantize(self):
        """The norm writing int8 groups too (x_int8) gives the same bf16 row as without, and the same groups as
        quantize_x on it; moe_decode given those groups (x_int8) gives what it computes quantizing x itself."""
        from krasis_run.kernels.decode_glue import add_rms_norm

        gen = torch.Generator().manual_seed(3)
        h = 96  # not a power of two: the padded groups are masked
        x = torch.randn(1, h, generator=gen)
        delta = torch.randn(1, h, generator=gen).bfloat16()
        w = 1 + 0.1 * torch.randn(h, generator=gen)
        x_glue = x.clone()
        want = add_rms_norm(x_glue, delta, w, 1e-6, use_triton=True)
        groups = decode_gpu.int8_groups(1, h, "cpu")
        got = add_rms_norm(x, delta, w, 1e-6, use_triton=True, x_int8=groups)
        assert torch.equal(got, want) and torch.equal(x, x_glue)  # the residual updated in place alike
        ref = decode_gpu.int8_groups(1, h, "cpu")
        decode_gpu._kernels()["quantize_x"][(1,)](want, *ref, h, GP=4, PDL=False)
        assert all(torch.equal(a, b) for a, b in zip(groups, ref, strict=True))
        x_moe, ids, weights, slot_of, codec, gate_up, down = moe_inputs("q4", (1, 2, h, 64, 4, 3), seed=4)
        plain = moe_decode(got, ids, weights, slot_of, codec, gate_up, down, use_triton=True)
        fused = moe_decode(got, ids, weights, slot_of, codec, gate_up, down, use_triton=True, x_int8=groups)
        assert torch.equal(plain, fused)

    # the prefill kernels (kernels/dequant.py, kernels/norm_rope.py)

    def test_q4_rows_triton_matches_reference(self):
        gen = torch.Generator().manual_seed(0)
        parts = random_tiles("q4", 3, 40, 96, gen)
        got = dequant.q4_rows(parts["q"], parts["scale"], parts["zero"], use_triton=True)
        want = dequant.q4_rows_torch(parts["q"], parts["scale"], parts["zero"])
        # 1 bf16 ulp: the interpreter rounds float32 -> bf16 towards zero, CUDA (and torch) to nearest even
        assert torch.allclose(got.float(), want.float(), rtol=1 / 128, atol=0)
        assert torch.allclose(got.double(), plain_weights("q4", parts), rtol=1 / 128, atol=1e-6)  # bf16 output

    def test_fused_norm_rope_triton_matches_reference(self):
        from krasis_run.models.base import norm_rope as norm_rope_torch
        from krasis_run.models.base import rope_cos_sin, rope_inv_freq

        gen = torch.Generator().manual_seed(0)
        x = torch.randn(5, 3, 64, generator=gen)
        w = 1 + 0.2 * torch.randn(64, generator=gen)
        cos, sin = rope_cos_sin(rope_inv_freq(64, 1e6), torch.arange(7, 12))
        got = norm_rope.fused_norm_rope(x, w, 1e-6, cos, sin, use_triton=True)
        assert got.dtype == torch.bfloat16 and got.shape == x.shape
        assert rel_l2(got.float(), norm_rope_torch(x, w, 1e-6, cos, sin)) < 4e-3  # bf16 output rounding
        assert norm_rope.fused_norm_rope(x, w, 1e-6, cos, sin) is None  # CPU tensors: the engine uses torch
        qkv = torch.randn(5, 3 * 64 + 2 * 64, generator=gen)  # q as a slice of a stacked q|k|v projection
        q = qkv[:, :192].view(5, 3, 64)
        got = norm_rope.fused_norm_rope(q, w, 1e-6, cos, sin, use_triton=True)
        assert rel_l2(got.float(), norm_rope_torch(q.contiguous(), w, 1e-6, cos, sin)) < 4e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU host)")
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("n, k, m", [(5120, 2048, 1), (2048, 4096, 1), (151936, 2048, 1), (1000, 2048, 4)])
def test_cuda_linear_q8_at_30b_shapes(n, k, m, int8):
    """The compiled q8 GEMV at the 30B-A3B q|k|v, o_proj and lm_head shapes (and a few rows at once); int8: with
    x's int8 groups (dp4a), equal to the reference on the dequantized groups."""
    x, q, scale = q8_rows(n, k, m, seed=n)
    groups = None
    if int8:
        groups = decode_gpu.int8_groups(m, k, "cuda")
        decode_gpu._kernels()["quantize_x"][(m,)](x.cuda(), *groups, k, GP=decode_gpu.next_pow2(k // 32), PDL=False)
    got = linear_q8(x.cuda(), q.cuda(), scale.cuda(), x_int8=groups)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert rel_l2(got.cpu(), plain_linear_q8(x, q, scale)) < (1e-2 if int8 else 4e-3)
    if int8:
        want = linear_q8(x, q, scale, x_int8=tuple(t.cpu() for t in groups)).float()
        # 1 bf16 ulp, or less than 1e-3 of the largest output where a sum of 2048 products cancels (order differs)
        assert torch.allclose(got.cpu().float(), want, rtol=1 / 128, atol=1e-3 * float(want.abs().max()))


def test_linear_q8_refuses_mismatched_int8_groups():
    x, q, scale = q8_rows(8, 96, 1, seed=0)
    with pytest.raises(ValueError, match="int8_groups"):
        linear_q8(x, q, scale, x_int8=decode_gpu.int8_groups(1, 64, "cpu"))
    with pytest.raises(ValueError, match="int8_groups"):
        decode_attention(torch.randn(4, 32), torch.zeros(8, 2, 32).bfloat16(), torch.zeros(8, 2, 32).bfloat16(),
                         torch.tensor([3], dtype=torch.int32), x_int8=decode_gpu.int8_groups(1, 128, "cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU host)")
@pytest.mark.parametrize("int8", [True, False])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("group", [32, 64])
def test_cuda_moe_q4_at_30b_shapes(monkeypatch, int8, m, group):
    """The compiled q4 kernels (dp4a with Q4G_INT8) at the 30B-A3B expert shape, some chosen experts not resident."""
    monkeypatch.setattr(decode_gpu, "Q4G_INT8", int8)
    x, ids, weights, slot_of, codec, gate_up, down = moe_inputs("q4", (m, 8, 2048, 768, 16, 12), seed=m, group=group)
    want = plain_moe(x, ids, weights, slot_of, codec, gate_up, down)
    cuda = [t.cuda() for t in (x, ids, weights, slot_of)]
    got = moe_decode(*cuda, codec, {k: v.cuda() for k, v in gate_up.items()}, {k: v.cuda() for k, v in down.items()})
    assert rel_l2(got.cpu(), want) < (1e-2 if int8 else 1e-5)
