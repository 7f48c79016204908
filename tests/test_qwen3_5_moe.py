"""Qwen3.5-MoE (Qwen3-Next's hybrid with split linear-attention projections) against transformers'
Qwen3_5MoeForCausalLM, and the hub layout (Qwen3_5MoeForConditionalGeneration: a vision tower, the text model under
model.language_model., its config under text_config) against that class on text; every parameter perturbed."""

from __future__ import annotations

import pytest
from conftest import TinyModel
from fixtures import build_qwen3_5_moe, prompt_ids
from test_oracle import clear_greedy_prompt, rel_l2
from test_qwen3_next import int8_rows_error

import krasis_run


@pytest.fixture(scope="module", params=["per_expert", "stacked"])
def qwen35(request, tmp_path_factory) -> TinyModel:
    folder = tmp_path_factory.mktemp("models") / f"qwen3.5-{request.param}"
    return TinyModel(folder, build_qwen3_5_moe(folder, request.param, seed=3), request.param)


@pytest.fixture(scope="module")
def qwen35_hub(tmp_path_factory) -> TinyModel:
    folder = tmp_path_factory.mktemp("models") / "qwen3.5-hub"
    return TinyModel(folder, build_qwen3_5_moe(folder, "per_expert", seed=5, hub=True), "per_expert")


@pytest.mark.parametrize("quant,dense_quant", [("bf16", "bf16"), ("q8", "q8"), ("q4", "q8")])
def test_logits_match_transformers(qwen35, quant, dense_quant):
    """The bounds of tests/test_qwen3_next.py (q8 against transformers' own per-row int8 sensitivity)."""
    rt = krasis_run.load(qwen35.artifact(quant, dense_quant), threads=1)
    ids = prompt_ids(rt.args.vocab_size, 48)
    err = rel_l2(rt.logits(ids), qwen35.reference_logits(ids).numpy())
    print(f"qwen3.5 {qwen35.layout} experts={quant} dense={dense_quant}: rel L2 {err:.4g}")
    if quant == "bf16":
        assert err <= 1e-2
    elif quant == "q8":
        assert err <= 2 * int8_rows_error(qwen35.model, ids)
    else:
        assert err <= 0.2


def test_greedy_tokens_match_transformers(qwen35):
    rt = krasis_run.load(qwen35.artifact("bf16", "bf16"), threads=1)
    ids, want = clear_greedy_prompt(qwen35.model, rt.args.vocab_size, 20)
    assert list(rt.generate(ids, max_new_tokens=20, stop_token_ids=set())) == want


def test_hub_checkpoint_compiles_the_text_model(qwen35_hub):
    """ConditionalGeneration: the text model is compiled from model.language_model., the vision tower left out, and
    text logits and greedy tokens match transformers' multimodal class."""
    rt = krasis_run.load(qwen35_hub.artifact("bf16", "bf16"), threads=1)
    assert rt.artifact.header["architecture"] == "Qwen3_5MoeForConditionalGeneration"
    assert not [n for n in rt.artifact.header["tensors"] if "visual" in n]
    ids = prompt_ids(rt.args.vocab_size, 48)
    assert rel_l2(rt.logits(ids), qwen35_hub.reference_logits(ids).numpy()) <= 1e-2
    ids, want = clear_greedy_prompt(qwen35_hub.model, rt.args.vocab_size, 20)
    assert list(rt.generate(ids, max_new_tokens=20, stop_token_ids=set())) == want


def test_inspect_reads_the_nested_text_config(qwen35_hub):
    from krasis_run.artifact import Artifact
    from krasis_run.info import summarize

    s = summarize(Artifact(qwen35_hub.artifact("bf16", "bf16")))
    assert (s.layers, s.hidden_size, s.experts, s.experts_per_token, s.vocab_size) == (4, 64, 8, 2, 400)
    assert s.supported
