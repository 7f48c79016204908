"""The GPU engines on the DeepSeek (MLA) and Qwen3-Next / Qwen3.5 (Gated DeltaNet) families: streaming prefill and
hybrid decode against the CPU path on the same artifact. The engine code runs here on the CPU (device="cpu"); the
CUDA tests run it on the GPU host (docs/DEVICE-RUNS.md records the command and the result)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import TinyModel
from fixtures import build_deepseek_v2, build_deepseek_v3, build_qwen3_5_moe, build_qwen3_next, prompt_ids
from test_hybrid_decode import assert_same_greedy, greedy
from test_oracle import rel_l2

import krasis_run
from krasis_run.decode_hybrid import HybridDecodeEngine
from krasis_run.models import MODELS
from krasis_run.prefill_gpu import GpuPrefillEngine

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU host)")
BUILDERS = {"deepseek-v2": build_deepseek_v2, "deepseek-v3": build_deepseek_v3, "qwen3-next": build_qwen3_next,
            "qwen3.5-moe": build_qwen3_5_moe}
# quantized artifacts: the engines compute in bf16 activations where the CPU path keeps float32 (these tiny random
# models amplify rounding, see test_qwen3_next.py), so they are held to the CPU path within this
QUANT_BOUND = 0.1
TIE = 5e-2  # the engines' logits differ from the CPU path's by ~0.5% (bf16 activations): a wider gap than 1e-2


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request, tmp_path_factory) -> TinyModel:
    folder = tmp_path_factory.mktemp("models") / request.param
    return TinyModel(folder, BUILDERS[request.param](folder, "per_expert", seed=11), "per_expert")


def bf16_sensitivity(model, ids: list[int]) -> float:
    """How far transformers' own logits move when the model runs in bf16 instead of float32, on the same tokens:
    the engines compute in bf16 activations where the CPU path keeps float32, and the tiny random Qwen3-Next models
    amplify that rounding (~8%, against ~1% for DeepSeek)."""
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].float()
        got = copy.deepcopy(model).to(torch.bfloat16)(torch.tensor([ids])).logits[0].float()
    return float((got - want).norm() / want.norm())


def arch_of(rt):
    return MODELS[rt.artifact.header["architecture"]]


def prefill_engine(rt, resident: set[int], section: str = "experts_gpu", device: str = "cpu") -> GpuPrefillEngine:
    return GpuPrefillEngine(arch_of(rt), rt.args, rt.artifact, device, resident, section)


def hybrid_engine(rt, resident: set[int], device: str = "cpu", **kwargs) -> HybridDecodeEngine:
    return HybridDecodeEngine(arch_of(rt), rt.args, rt.artifact, prefill_engine(rt, resident, device=device), rt.ops,
                              rt.model.w, context=96, **kwargs)


def clear_reference(rt, n: int = 20, steps: int = 10) -> tuple[list[int], list[int], list[np.ndarray]]:
    """A prompt whose greedy continuation on the CPU path has no near-tie (top two logits within TIE) in its first
    `steps` tokens, so any other engine must give exactly those tokens: (prompt, tokens, logits)."""
    for seed in range(30):
        ids = prompt_ids(rt.args.vocab_size, n, seed=seed)
        tokens, logits = greedy(rt, rt.engine, ids, steps)
        if all(np.diff(np.sort(step)[-2:])[0] >= TIE for step in logits):
            return ids, tokens, logits
    raise AssertionError("no prompt without a near-tie in 30 seeds")


def sparse_layers(rt) -> list[int]:
    return [i for i in range(rt.args.num_hidden_layers) if rt.args.is_sparse(i)]


@pytest.mark.parametrize("quant,dense", [("bf16", "bf16"), ("q4", "q8")])
@pytest.mark.parametrize("section", ["experts_gpu", "experts_cpu"])
def test_streaming_prefill_equals_cpu_path(family, quant, dense, section):
    """bf16 artifacts: the CPU path's logits within 1e-2, or within twice the model's own bf16 sensitivity where that is
    larger (the experts' grouped GEMM takes bf16 activations)."""
    rt = krasis_run.load(family.artifact(quant, dense), threads=1, kernel="reference")
    ids = prompt_ids(rt.args.vocab_size, 40, seed=11)
    engine = prefill_engine(rt, set(sparse_layers(rt)[:1]), section)  # one layer resident, the others streamed
    got = engine.prefill(ids, rt.engine.new_cache(), all_logits=True).numpy()
    err = rel_l2(got, rt.logits(ids))
    print(f"{rt.artifact.header['architecture']} {quant}/{dense} {section}: vs CPU path {err:.4g}")
    assert err <= (max(1e-2, 2 * bf16_sensitivity(family.model, ids)) if quant == "bf16" else QUANT_BOUND)


@pytest.fixture
def float32_engine_ops(monkeypatch):
    """The engines' bf16 steps (projections, attention, the experts' grouped GEMM) made float32: what is left to
    differ from the CPU path is the engine's logic (layer wiring, caches, states, chunking), held to float32 noise."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from krasis_run.prefill_gpu import GpuOps

    def attention(self, q, k, v, start_pos):
        t, heads, dim = q.shape
        qh, kh, vh = (x.transpose(0, 1).unsqueeze(0).float() for x in (q, k, v))
        mask = None if k.shape[0] == t else causal_lower_right(t, k.shape[0])
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return out.squeeze(0).transpose(0, 1).reshape(t, heads * dim)

    def grouped(self, xs, w, counts):
        out, start = torch.empty(xs.shape[0], w.shape[1]), 0
        for e, n in enumerate(counts.tolist()):
            out[start:start + n] = xs[start:start + n].float() @ w[e].float().T
            start += n
        return out

    monkeypatch.setattr(GpuOps, "attention", attention)
    monkeypatch.setattr(GpuOps, "linear", lambda self, x, w: F.linear(x.float(), w.float()))
    monkeypatch.setattr(GpuOps, "_bf16", lambda self, x: x.float())
    monkeypatch.setattr(GpuOps, "_grouped", grouped)


@pytest.mark.parametrize("section", ["experts_gpu", "experts_cpu"])
def test_streaming_prefill_logic_equals_cpu_path_in_float32(family, float32_engine_ops, section):
    """With float32 steps the streaming prefill gives the CPU path's logits to float32 noise, in two prefills (the
    second continuing from the first's cache and recurrent states): the bf16 bounds above cannot hide a logic slip."""
    import dataclasses

    rt = krasis_run.load(family.artifact("bf16", "bf16"), threads=1, kernel="reference")
    # K/V kept in float32 on both sides (the engine attends over a prompt's own K/V unrounded, the CPU path over the
    # cache's bf16 copy, which these tiny Qwen3-Next models amplify to ~1e-4)
    rt.model.cache_layout = dataclasses.replace(rt.model.cache_layout, dtype=torch.float32)
    ids = prompt_ids(rt.args.vocab_size, 40, seed=11)
    engine = prefill_engine(rt, set(sparse_layers(rt)[:1]), section)
    cache = rt.engine.new_cache()
    got = np.concatenate([engine.prefill(ids[:25], cache, all_logits=True).numpy(),
                          engine.prefill(ids[25:], cache, all_logits=True).numpy()])
    err = rel_l2(got, rt.logits(ids))
    print(f"{rt.artifact.header['architecture']} float32 engine {section}: vs CPU path {err:.3g}")
    assert err < 1e-5


@pytest.mark.parametrize("mode", ["experts_in_ram", "budget", "all_gpu"])
def test_hybrid_decode_equals_cpu_path(family, mode):
    """Prefill on the streaming engine, then one token at a time with the model's state (KV, latent cache or
    recurrent states) where the prefill left it: the CPU path's tokens, for each placement of the experts."""
    rt = krasis_run.load(family.artifact("bf16", "bf16"), threads=1, kernel="reference")
    ids, want_tokens, want_logits = clear_reference(rt)
    layers = sparse_layers(rt)
    resident = {"experts_in_ram": set(), "budget": set(layers[:1]), "all_gpu": set(layers)}[mode]
    engine = hybrid_engine(rt, resident)
    assert engine.mode == mode
    got_tokens, got_logits = greedy(rt, engine, ids, 10)
    assert_same_greedy(got_tokens, want_tokens, want_logits, tie=TIE)
    bound = max(1e-2, 2 * bf16_sensitivity(family.model, ids))
    for got, want in zip(got_logits, want_logits, strict=True):
        assert rel_l2(got, want) < bound


def test_streaming_prefill_then_cpu_decode(family):
    """The GPU prefill hands the CPU engine its cache (a recurrent model's conv and delta-rule states too): decode
    after it equals decode after the CPU's own prefill."""
    rt = krasis_run.load(family.artifact("bf16", "bf16"), threads=1, kernel="reference")
    ids = prompt_ids(rt.args.vocab_size, 24, seed=3)
    want, _ = greedy(rt, rt.engine, ids, 8)
    engine = prefill_engine(rt, set())
    cache = rt.engine.new_cache(40)
    logits = engine.prefill(ids, cache)
    got = []
    for _ in range(8):
        got.append(int(torch.argmax(logits)))
        logits = rt.engine.decode(got[-1], cache)
    assert got == want
    if rt.artifact.header["architecture"].startswith("Qwen3"):
        assert all(t.device.type == "cpu" for pair in cache.states.values() for t in pair)


def test_mla_expanded_prefill_equals_absorbed(tmp_path):
    """A prompt on the GPU attends through per-head keys and values expanded from the latent (flash attention in
    bf16); decode and the CPU keep the absorbed form. Forced here on the CPU: the two agree."""
    folder = tmp_path / "ds"
    tiny = TinyModel(folder, build_deepseek_v2(folder, "per_expert", seed=2), "per_expert")
    rt = krasis_run.load(tiny.artifact("bf16", "bf16"), threads=1, kernel="reference")
    ids = prompt_ids(rt.args.vocab_size, 33, seed=4)
    engine = prefill_engine(rt, set())
    absorbed = engine.prefill(ids, rt.engine.new_cache(), all_logits=True).numpy()
    engine.model.expand_prefill = True
    cache = rt.engine.new_cache()
    expanded = engine.prefill(ids[:20], cache, all_logits=True).numpy()  # then a second prefill over the cache
    expanded = np.concatenate([expanded, engine.prefill(ids[20:], cache, all_logits=True).numpy()])
    err = rel_l2(expanded, absorbed)
    print(f"expanded vs absorbed MLA: {err:.4g}")
    assert err < 2e-2


@cuda
@pytest.mark.parametrize("quant,dense", [("bf16", "bf16"), ("q4", "q8")])
def test_cuda_prefill_equals_cpu_path(family, quant, dense):
    rt = krasis_run.load(family.artifact(quant, dense), threads=1, kernel="reference")
    ids = prompt_ids(rt.args.vocab_size, 300, seed=11)
    for resident in (set(), set(sparse_layers(rt))):
        got = prefill_engine(rt, resident, device="cuda").prefill(ids, rt.engine.new_cache(), all_logits=True)
        err = rel_l2(got.numpy(), rt.logits(ids))
        print(f"cuda {rt.artifact.header['architecture']} {quant}/{dense} resident={len(resident)}: vs CPU {err:.4g}")
        # bf16 attention on CUDA, float32 on the CPU
        assert err <= (max(2e-2, 2 * bf16_sensitivity(family.model, ids)) if quant == "bf16" else QUANT_BOUND)


@cuda
@pytest.mark.parametrize("mode", ["experts_in_ram", "budget", "all_gpu"])
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_hybrid_decode_equals_cpu_path(family, mode, graphs):
    rt = krasis_run.load(family.artifact("bf16", "bf16"), threads=1, kernel="reference")
    ids, want_tokens, want_logits = clear_reference(rt)
    layers = sparse_layers(rt)
    resident = {"experts_in_ram": set(), "budget": set(layers[:1]), "all_gpu": set(layers)}[mode]
    engine = hybrid_engine(rt, resident, "cuda", graphs=graphs)
    assert engine.mode == mode
    got_tokens, got_logits = greedy(rt, engine, ids, 10)
    print(f"cuda hybrid {rt.artifact.header['architecture']} {mode} graphs={graphs}: {got_tokens} vs {want_tokens}")
    assert_same_greedy(got_tokens, want_tokens, want_logits, tie=TIE)
    bound = max(2e-2, 2 * bf16_sensitivity(family.model, ids))
    for got, want in zip(got_logits, want_logits, strict=True):
        assert rel_l2(got, want) < bound


@cuda
def test_cuda_runtime_generates_like_the_cpu_runtime(family):
    """`load(device="cuda")` plans, prefills on the GPU and decodes with graphs (hot experts and the native CPU
    experts included): teacher-forced logits within twice the model's own bf16 sensitivity of the CPU runtime's
    (bf16 weights, so that the comparison is not one of two roundings to int8: the tiny Qwen3.5 model moves ~20%
    under those), and its greedy tokens on a prompt without near-ties."""
    path = family.artifact("bf16", "bf16")
    cpu = krasis_run.load(path, threads=2)
    ids, want, want_logits = clear_reference(cpu, 30, 12)
    bound = max(2e-2, 2 * bf16_sensitivity(family.model, ids))
    for layers in (0, None):
        gpu = krasis_run.load(path, device="cuda", threads=2, context=256, max_resident_layers=layers)
        cache = gpu.engine.new_cache(64)
        logits = gpu.engine.prefill(ids, cache)
        errors = []
        for token, reference in zip(want, want_logits, strict=True):
            errors.append(rel_l2(logits.numpy(), reference))
            logits = gpu.engine.decode(token, cache)
        got = list(gpu.generate(ids, max_new_tokens=12, stop_token_ids=set()))
        print(f"cuda runtime {cpu.artifact.header['architecture']} resident={layers} {gpu.engine.mode}: "
              f"errors {np.round(errors, 4).tolist()} (bound {bound:.3g}), {got} vs {want}")
        assert max(errors) < bound
        assert_same_greedy(got, want, want_logits, tie=TIE)
        gpu.close()


def test_planner_sizes_the_cache_from_the_architecture(family, monkeypatch):
    """The runtime hands the planner the architecture's cache layout (and its prefill memory per token): MLA's latent
    + rotary key in float32 per layer, or K/V on Qwen3-Next's full-attention layers only plus the fixed recurrent
    states; not K/V of num_key_value_heads x head_dim on every layer."""
    import krasis_run.runtime as runtime
    from krasis_run.planner import GIB, plan

    seen = {}

    def spy(*args, **kwargs):
        seen["layout"], seen["per_token"] = args[5], args[6]
        return plan(*args, **kwargs)

    monkeypatch.setattr(runtime, "plan", spy)
    rt = krasis_run.load(family.artifact("q4", "q8"), threads=1)
    a, layout = rt.args, seen["layout"]
    if hasattr(a, "kv_lora_rank"):
        want = a.num_hidden_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * 4 * 1000
        assert seen["per_token"](1000) > 1000  # the generic count and MLA's expanded attention
    else:
        full = sum(a.is_full(i) for i in range(a.num_hidden_layers))
        state = (a.linear_conv_kernel_dim - 1) * a.conv_dim + \
            a.linear_num_value_heads * a.linear_key_head_dim * a.linear_value_head_dim
        states = (a.num_hidden_layers - full) * 4 * state
        want = full * 2 * a.num_key_value_heads * a.head_dim * 2 * 1000 + states
        assert seen["per_token"](1000) == 40 * a.hidden_size  # measured, in place of the generic count
    assert layout.bytes(1000) == want
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (80 * GIB, 80 * GIB))
    import krasis_run.planner as planner

    workspace = planner._workspace
    monkeypatch.setattr(planner, "_workspace", lambda *args, **kwargs: seen.setdefault("sized", kwargs["per_token"])
                        and workspace(*args, **kwargs))
    placed = plan(rt.artifact, "cuda", "8GiB", context=250, cache_layout=layout, prefill_per_token=seen["per_token"])
    assert placed.vram_plan["kv_cache"] == layout.bytes(250) < want
    assert seen["sized"] is seen["per_token"]  # the workspace is sized per token by the architecture's count


def test_hybrid_workspace_is_sized_by_its_architecture():
    """On the Qwen3-Coder-Next shape the generic count (whole-prompt q/k/v on every layer) plans 10.7 GiB at 32K; the
    architecture's per-token bytes bring it to 8.0 GiB, still above the 6.4 GiB run 35 used (docs/BENCHMARKS.md)."""
    import json
    from pathlib import Path

    from krasis_run.models import qwen3_next
    from krasis_run.planner import GIB, _workspace, model_config

    shape = json.loads((Path(__file__).parent.parent / "scripts" / "shapes" / "qwen3-coder-next.json").read_text())
    config, args = model_config(shape["config"]), qwen3_next.ModelArgs.from_hf(shape["config"])
    sized = _workspace(config, 32768, per_token=lambda generic: qwen3_next.prefill_bytes_per_token(args, generic))
    assert 6.36 * GIB < sized < _workspace(config, 32768)


def test_gpu_holds_q8_matrices_as_planned(family, monkeypatch):
    """The GPU keeps q8 dense matrices as stored (int8 rows + a scale a row), except those the architecture reads as
    matrices itself (DeepSeek's kv_b_proj: bf16); what it places is what the planner counts, and a prompt's GEMM over
    them, dequantized a slice of rows at a time, equals the GEMM over the whole dequantized matrix."""
    import krasis_run.prefill_gpu as prefill_gpu
    from krasis_run.planner import _dense_vram, gpu_keeps_quantized
    from krasis_run.prefill_gpu import ExpertHandle, GpuOps, Q8Rows

    rt = krasis_run.load(family.artifact("q4", "q8"), threads=1)
    arch = arch_of(rt)
    direct = getattr(arch, "DIRECT_MATRICES", ())
    w = prefill_engine(rt, set()).model.w
    placed = 0
    for name, t in w.items():
        if isinstance(t, Q8Rows):
            assert t.q.dtype == torch.int8 and t.scale.shape == t.q.shape[:1]
            placed += t.q.numel() + 2 * t.scale.numel()
        elif isinstance(t, torch.Tensor):
            codec = rt.artifact.header["tensors"].get(name, {}).get("codec")
            assert not gpu_keeps_quantized(name, codec, direct), name  # a q8 matrix left bf16
            placed += t.numel() * t.element_size()
        else:
            assert name == "embed" or isinstance(t, ExpertHandle)
    matrices = [t for t in w.values() if isinstance(t, Q8Rows)]
    slice_bytes = min(prefill_gpu.DEQUANT_SLICE_BYTES, max(2 * t.q.numel() for t in matrices))
    kept = max(2 * t.q.numel() for t in matrices if 2 * t.q.numel() <= prefill_gpu.DEQUANT_SLICE_BYTES)
    assert _dense_vram(rt.artifact, direct) == placed + slice_bytes + prefill_gpu.DEQUANT_KEPT * kept
    if direct:
        kv_b = [t for name, t in w.items() if name.endswith(direct)]
        assert kv_b and all(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in kv_b)
    big = max(matrices, key=lambda t: t.q.numel())
    x = torch.randn(5, big.shape[1])
    ops = GpuOps(torch.device("cpu"), "q4", "rows", exact=False)
    whole = ops._linear_dequant(x.bfloat16(), big)
    assert ops._dequantized_whole(big) is ops._dequantized_whole(big)  # kept for the next slice of tokens
    others = [t for t in matrices if t is not big][:prefill_gpu.DEQUANT_KEPT]
    kept = ops._dequantized_whole(big)
    for t in others:
        ops._dequantized_whole(t)
    assert len(ops._dequantized) <= prefill_gpu.DEQUANT_KEPT
    assert (ops._dequantized_whole(big) is kept) == (len(others) < prefill_gpu.DEQUANT_KEPT)  # the oldest goes
    monkeypatch.setattr(prefill_gpu, "DEQUANT_SLICE_BYTES", 2 * big.shape[1] * 3)  # 3 rows a slice
    assert torch.equal(ops._linear_dequant(x.bfloat16(), big), whole)
    dense = (big.q.float() * big.scale.float()[:, None]).bfloat16()  # the whole-matrix dequant placement did before
    assert torch.equal(whole, torch.nn.functional.linear(x.bfloat16(), dense))
