"""GPU streaming prefill. The engine code runs here on the CPU (device="cpu"); the CUDA tests run it on
the GPU host (docs/BENCHMARKS.md records the command and the result)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures import prompt_ids

import krasis_run
from krasis_run.kernels.dequant import dequant_experts, q4_rows, q4_rows_torch
from krasis_run.models import qwen3_moe
from krasis_run.planner import parse_size
from krasis_run.prefill_gpu import GpuPrefillEngine, expert_sources, part_views

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU host)")
BOUNDS = {("bf16", "bf16"): 1e-2, ("q8", "q8"): 3e-2, ("q4", "q8"): 0.2}


def rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cpu_streaming_engine(rt, resident: set[int], section: str) -> GpuPrefillEngine:
    return GpuPrefillEngine(qwen3_moe, rt.args, rt.artifact, "cpu", resident, section)


@pytest.mark.parametrize("quant,dense", list(BOUNDS))
@pytest.mark.parametrize("section", ["experts_gpu", "experts_cpu"])
def test_streaming_engine_matches_transformers_and_cpu_path(tiny, quant, dense, section):
    rt = krasis_run.load(tiny.artifact(quant, dense), threads=1)
    ids = prompt_ids(rt.args.vocab_size, 40, seed=11)
    engine = cpu_streaming_engine(rt, {1}, section)  # layer 1 resident, layers 0 and 2 streamed
    got = engine.prefill(ids, rt.engine.new_cache(), all_logits=True).numpy()
    vs_hf = rel_l2(got, tiny.reference_logits(ids).numpy())
    vs_cpu = rel_l2(got, rt.logits(ids))
    print(f"{tiny.layout} {quant}/{dense} {section}: vs transformers {vs_hf:.4g}, vs CPU path {vs_cpu:.4g}")
    assert vs_hf <= BOUNDS[(quant, dense)]
    assert engine.stats.bytes_streamed == sum(c.length for c in rt.artifact.chunks.values()
                                              if c.section == section and c.layer != 1)


def test_decode_after_streaming_prefill_equals_decode_after_cpu_prefill(tiny_per_expert):
    rt = krasis_run.load(tiny_per_expert.artifact("bf16", "bf16"), threads=1)
    ids = prompt_ids(rt.args.vocab_size, 24, seed=12)
    cpu_tokens = list(rt.generate(ids, max_new_tokens=16, stop_token_ids=set()))
    rt.prefill_engine = cpu_streaming_engine(rt, set(), "experts_gpu")
    assert list(rt.generate(ids, max_new_tokens=16, stop_token_ids=set())) == cpu_tokens


def test_dequant_layouts_agree(tiny_per_expert):
    """Both expert layouts of a layer dequantize to the same bf16 weights."""
    rt = krasis_run.load(tiny_per_expert.artifact("q4", "q8"), threads=1)
    out = []
    for section in ("experts_gpu", "experts_cpu"):
        src = expert_sources(rt.artifact, section)[2]
        host = torch.frombuffer(rt.artifact._mm, dtype=torch.uint8, count=src.length, offset=src.offset)
        views = part_views(host, src)
        out.append(dequant_experts("q4", src.layout, views["gate_up"], views["down"]))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_expert_token_chunk_gives_each_expert_enough_rows():
    """4096 tokens a grouped-GEMM pass where that gives each expert ~256 rows (30B-A3B: 128 experts, top 8), more
    where experts are many and picks few (Qwen3-Coder-Next: 512, top 10), never fewer (DeepSeek-V2-Lite: 64, top 6)."""
    from krasis_run.planner import expert_token_chunk

    assert expert_token_chunk(128, 8) == 4096
    assert expert_token_chunk(512, 10) == 16384
    assert expert_token_chunk(64, 6) == 4096


def test_parse_size():
    assert parse_size("16GiB") == 16 << 30
    assert parse_size("16G") == 16 * 10**9
    assert parse_size("512MiB") == 512 << 20
    assert parse_size(1234) == 1234
    with pytest.raises(krasis_run.KrsError, match="cannot read size"):
        parse_size("sixteen")


def _random_q4(shape, device):
    q = torch.randint(0, 256, (*shape[:-1], shape[-1] // 2), dtype=torch.uint8, device=device)
    scale = (torch.rand(*shape[:-1], shape[-1] // 32, device=device) * 0.1).to(torch.bfloat16)
    zero = (torch.randn(*shape[:-1], shape[-1] // 32, device=device) * 0.1).to(torch.bfloat16)
    return q, scale, zero


def tight_budget(path) -> int:
    """Room for the dense weights, the workspace, the stream buffers and exactly one resident expert layer."""
    from krasis_run.artifact import Artifact
    from krasis_run.planner import DEFAULT_CONTEXT, _dense_vram, _layer_bytes, _workspace, kv_cache_bytes

    art = Artifact(path)
    config = art.header["config"]
    context = min(DEFAULT_CONTEXT, config["max_position_embeddings"])  # what load() reserves by default
    layers = _layer_bytes(art, "experts_gpu")
    workspace = _workspace(config, context, art.header["quant"]["experts"]) + kv_cache_bytes(config, context)
    return _dense_vram(art) + workspace + int(2.9 * max(layers.values()))


@cuda
def test_triton_dequant_matches_torch_reference():
    q, scale, zero = _random_q4((3, 192, 256), "cuda")
    assert torch.equal(q4_rows(q, scale, zero, use_triton=True), q4_rows_torch(q, scale, zero))


@cuda
def test_router_logits_of_a_bf16_input_match_float32():
    """The prefill's router GEMM (w as hi + lo bf16 halves, float32 output) against the float32 product."""
    from krasis_run.prefill_gpu import GpuOps

    ops = GpuOps(torch.device("cuda"), "q4", "rows", exact=False)
    x = torch.randn(4096, 2048, device="cuda").bfloat16()
    w = torch.randn(512, 2048, device="cuda") / 45
    want = torch.nn.functional.linear(x.double(), w.double())
    err = float((ops.linear(x, w).double() - want).norm() / want.norm())
    print(f"router logits, hi + lo bf16 against float64: rel L2 {err:.3g}")
    assert err < 1e-5


@cuda
def test_fused_norm_rope_matches_reference():
    from krasis_run.kernels.norm_rope import fused_norm_rope
    from krasis_run.models.base import norm_rope, rope_cos_sin, rope_inv_freq

    x = torch.randn(300, 8, 128, device="cuda")
    w = 1 + 0.2 * torch.randn(128, device="cuda")
    cos, sin = rope_cos_sin(rope_inv_freq(128, 1e6).cuda(), torch.arange(5, 305, device="cuda"))
    got = fused_norm_rope(x, w, 1e-6, cos, sin).float()
    want = norm_rope(x, w, 1e-6, cos, sin)
    assert float((got - want).norm() / want.norm()) < 4e-3  # bf16 output rounding


@cuda
@pytest.mark.parametrize("quant,dense", list(BOUNDS))
@pytest.mark.parametrize("budget", ["tight", "whole"])
def test_cuda_prefill_matches_transformers_and_cpu_path(tiny, quant, dense, budget):
    path = tiny.artifact(quant, dense)
    cpu = krasis_run.load(path, device="cpu", threads=1)
    rt = krasis_run.load(path, device="cuda", threads=1, gpu_budget=tight_budget(path) if budget == "tight" else None)
    resident = rt.placement.resident_layers
    assert len(resident) == (0 if budget == "tight" else 3)  # tight: every expert layer streams
    ids = prompt_ids(rt.args.vocab_size, 40, seed=13)
    got = rt.logits(ids)
    vs_hf = rel_l2(got, tiny.reference_logits(ids).numpy())
    vs_cpu = rel_l2(got, cpu.logits(ids))
    print(f"cuda {tiny.layout} {quant}/{dense} budget={budget} resident={sorted(resident)}: "
          f"vs transformers {vs_hf:.4g}, vs CPU path {vs_cpu:.4g}")
    assert vs_hf <= BOUNDS[(quant, dense)]


@cuda
def test_cuda_prefill_then_cpu_decode_equals_cpu(tiny_per_expert):
    path = tiny_per_expert.artifact("bf16", "bf16")
    cpu = krasis_run.load(path, device="cpu", threads=1)
    gpu = krasis_run.load(path, device="cuda", threads=1, gpu_budget=tight_budget(path))
    ids = prompt_ids(cpu.args.vocab_size, 24, seed=12)
    want = list(cpu.generate(ids, max_new_tokens=16, stop_token_ids=set()))
    assert list(gpu.generate(ids, max_new_tokens=16, stop_token_ids=set())) == want



@pytest.mark.parametrize("quant,dense", [("bf16", "bf16"), ("q4", "q8")])
def test_chunked_attention_prefill_equals_unchunked(tiny, quant, dense):
    """Attention in token chunks (each chunk's queries over the layer's keys so far) changes nothing, on the
    engine's CPU path: the same logits and the same K/V in the cache."""
    rt = krasis_run.load(tiny.artifact(quant, dense), threads=1)
    ids = prompt_ids(rt.args.vocab_size, 40, seed=14)
    engine = cpu_streaming_engine(rt, {1}, "experts_gpu")
    results = {}
    for chunk in (None, 16, 7):
        engine.token_chunk = chunk
        cache = rt.engine.new_cache()
        results[chunk] = (engine.prefill(ids, cache, all_logits=True), cache)
        assert cache.length == len(ids)
    want, want_cache = results[None]
    got, cache = results[16]  # torch's CPU attention kernel rounds alike for 16-row blocks: bit for bit
    assert torch.equal(got, want)
    for layer in range(rt.args.num_hidden_layers):
        assert torch.equal(cache.keys[layer][:len(ids)], want_cache.keys[layer][:len(ids)])
        assert torch.equal(cache.values[layer][:len(ids)], want_cache.values[layer][:len(ids)])
    # other lengths: the CPU SDPA kernel's bf16 output differs in the last bit (causal over 7 rows vs over 40
    # gives different roundings), which the tiny random model amplifies; a wrong mask or stale key is O(1)
    assert rel_l2(results[7][0].numpy(), want.numpy()) < 5e-2  # measured 3e-3 to 3e-2


def test_chunked_attention_after_earlier_prefill(tiny_per_expert):
    """A second prefill (start_pos > 0) in chunks: earlier chunks of a layer come from the writer, older tokens
    from the host cache."""
    rt = krasis_run.load(tiny_per_expert.artifact("bf16", "bf16"), threads=1)
    ids = prompt_ids(rt.args.vocab_size, 48, seed=15)
    engine = cpu_streaming_engine(rt, set(), "experts_gpu")
    out = {}
    for chunk in (None, 16):
        engine.token_chunk = chunk
        cache = rt.engine.new_cache()
        out[chunk] = torch.cat([engine.prefill(ids[:16], cache, all_logits=True),
                                engine.prefill(ids[16:], cache, all_logits=True)]).numpy()
        assert cache.length == len(ids)
    assert np.array_equal(out[16], out[None])  # 16-row chunks: bit for bit, as above
    assert rel_l2(out[16], rt.logits(ids)) < 2e-2  # against the CPU engine (its own 2048-token chunks)


@cuda
@pytest.mark.parametrize("deinterleave", [False, True])
@pytest.mark.parametrize("group", [32, 64])
def test_triton_q4_blocks_match_torch_reference(deinterleave, group):
    from test_prefill_kernels import strided_blocks

    from krasis_run.kernels.dequant import q4_blocks

    q, scale_zero = strided_blocks(experts=5, rows=256, cols=192, device="cuda", group=group)  # strided, as streamed
    want = q4_blocks(q, scale_zero, deinterleave, use_triton=False)
    assert torch.equal(q4_blocks(q, scale_zero, deinterleave, use_triton=True), want)


@cuda
def test_triton_combine_matches_torch_reference():
    from test_prefill_kernels import combine_case

    from krasis_run.kernels.moe_combine import moe_combine

    y, _, inv, weights = (t.cuda() for t in combine_case(tokens=1000, k=8, hidden=2048, seed=5))
    want = moe_combine(y, inv, weights, torch.empty(1000, 2048, device="cuda"), use_triton=False)
    got = moe_combine(y, inv, weights, torch.empty(1000, 2048, device="cuda"), use_triton=True)
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-5)  # one bf16 rounding apart at most


@cuda
def test_chunked_attention_on_cuda_matches_whole_prompt():
    """Lower-right causal attention of query chunks over the keys so far = the whole prompt's causal attention,
    and flash attention runs it (only flash allowed: the math fallback would need [heads, chunk, keys] floats)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from krasis_run.prefill_gpu import GpuOps

    ops = GpuOps(torch.device("cuda"), "q4", "rows", exact=False)
    t, g = 1536, torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(t, h, 128, device="cuda", generator=g).to(torch.bfloat16) for h in (32, 4, 4))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        whole = ops.attention(q, k, v, 0).float()
        chunks = [ops.attention(q[s:s + 512], k[:s + 512], v[:s + 512], s) for s in range(0, t, 512)]
    chunks = torch.cat(chunks).float()
    assert float((chunks - whole).norm() / whole.norm()) < 1e-2


@cuda
def test_cuda_chunked_prefill_matches_unchunked(tiny):
    """On the GPU: side-stream K/V copies released two layers later, lower-right causal chunks, same cache."""
    path = tiny.artifact("q4", "q8")
    rt = krasis_run.load(path, device="cuda", threads=1, gpu_budget=tight_budget(path))
    ids = prompt_ids(rt.args.vocab_size, 40, seed=16)
    engine = rt.prefill_engine
    out = {}
    for chunk in (None, 16):
        engine.token_chunk = chunk
        cache = rt.engine.new_cache()
        out[chunk] = (engine.prefill(ids, cache, all_logits=True).numpy(), cache)
    assert rel_l2(out[16][0], out[None][0]) < 2e-2
    for layer in range(rt.args.num_hidden_layers):
        a, b = out[16][1].keys[layer][:40].float(), out[None][1].keys[layer][:40].float()
        assert float((a - b).norm() / b.norm()) < 2e-2


@cuda
def test_fused_prefill_kernels_match_torch():
    """The fused RMSNorm (to bf16) and silu(gate) * up the CUDA prefill uses, against torch on the same inputs."""
    from krasis_run.kernels.activation import silu_mul, silu_mul_torch
    from krasis_run.kernels.decode_glue import rms_norm_decode
    from krasis_run.models.base import rms_norm

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3000, 2048, device="cuda", generator=g)
    w = torch.rand(2048, device="cuda", generator=g) + 0.5
    got, want = rms_norm_decode(x, w, 1e-6), rms_norm(x, w, 1e-6)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want, rtol=2**-7, atol=1e-6)
    h = torch.randn(3000, 1536, device="cuda", generator=g).to(torch.bfloat16)
    exact = silu_mul_torch(h.float())
    assert torch.allclose(silu_mul(h).float(), exact, rtol=2**-7, atol=1e-6)
