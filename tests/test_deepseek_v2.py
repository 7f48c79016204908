"""DeepSeek-V2 (MLA, shared experts, a dense first layer, yarn rope) against transformers' DeepseekV2ForCausalLM on
the same bf16 weights, every parameter perturbed, both expert layouts; the CPU path (the GPU engines:
test_family_engines.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TinyModel
from fixtures import build_deepseek_v2, prompt_ids, stepwise_logits
from test_oracle import BOUNDS, clear_greedy_prompt, rel_l2

import krasis_run


@pytest.fixture(scope="module", params=["per_expert", "stacked"])
def deepseek(request, tmp_path_factory) -> TinyModel:
    folder = tmp_path_factory.mktemp("models") / f"deepseek-v2-{request.param}"
    model = build_deepseek_v2(folder, request.param, seed=3 if request.param == "per_expert" else 4)
    return TinyModel(folder, model, request.param)


@pytest.mark.parametrize("quant,dense_quant,bound", BOUNDS)
@pytest.mark.parametrize("kernel", ["native", "reference"])
def test_logits_match_transformers(deepseek, quant, dense_quant, bound, kernel):
    rt = krasis_run.load(deepseek.artifact(quant, dense_quant), kernel=kernel, threads=1)
    ids = prompt_ids(rt.args.vocab_size, 48)
    err = rel_l2(rt.logits(ids), deepseek.reference_logits(ids).numpy())
    print(f"deepseek-v2 {deepseek.layout} experts={quant} dense={dense_quant} kernel={kernel}: rel L2 {err:.4g}")
    assert err <= bound


def test_greedy_tokens_match_transformers(deepseek):
    rt = krasis_run.load(deepseek.artifact("bf16", "bf16"), threads=1)
    ids, want = clear_greedy_prompt(deepseek.model, rt.args.vocab_size, 20)
    assert list(rt.generate(ids, max_new_tokens=20, stop_token_ids=set())) == want


def test_latent_cache_decode_equals_full_recompute(deepseek):
    """Decode reads the compressed cache (latent + rotary key per token, no per-head K/V) and gives what a full
    recompute of the same positions gives. The reference kernels (float32 activations): the native ones round
    activations to int8, where a last-bit difference between the decode and prefill attention kernels can flip a
    rounding and move these tiny models' logits by ~1%."""
    rt = krasis_run.load(deepseek.artifact("q4", "q8"), threads=1, kernel="reference")
    a = rt.args
    cache = rt.engine.new_cache(64)
    assert cache.keys[0].shape[1:] == (1, a.kv_lora_rank + a.qk_rope_head_dim) and cache.values[0].shape[1:] == (1, 0)
    assert cache.keys[0].dtype == torch.float32  # read whole by every layer each step: stored as it is used
    incremental, full = stepwise_logits(rt, prompt_ids(a.vocab_size, 20, seed=4))
    assert rel_l2(incremental, full) < 5e-3
    top2 = np.sort(full, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    assert (incremental.argmax(-1) == full.argmax(-1))[clear].all()


@pytest.mark.parametrize("variant", [
    dict(q_lora_rank=24),  # DeepSeek-V2 (not Lite): queries through a low-rank projection and its norm
    dict(topk_method="group_limited_greedy", n_group=4, topk_group=2),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, first_k_dense_replace=0, n_shared_experts=0),
])
def test_variants_match_transformers(tmp_path, variant):
    folder = tmp_path / "deepseek"
    tiny = TinyModel(folder, build_deepseek_v2(folder, "per_expert", seed=5, **variant), "per_expert")
    rt = krasis_run.load(tiny.artifact("bf16", "bf16"), threads=1)
    ids = prompt_ids(rt.args.vocab_size, 40, seed=2)
    assert rel_l2(rt.logits(ids), tiny.reference_logits(ids).numpy()) <= 1e-2


def test_both_expert_layouts_are_written_and_fp8_is_refused(deepseek, tmp_path):
    """GPU tiles and CPU blocks, as for every family; an FP8 release is refused in one line rather than half read."""
    import json
    import shutil

    from krasis_compile.checkpoint import CompileError
    from krasis_compile.compile import compile_model

    header = krasis_run.load(deepseek.artifact("q4", "q8"), threads=1).artifact.header
    assert sorted(header["sections"]) == ["cpu", "gpu"]
    folder = tmp_path / "fp8"
    shutil.copytree(deepseek.folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompileError, match="already quantized"):
        compile_model(str(folder), tmp_path / "x.krs", progress=False)
