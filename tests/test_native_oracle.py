"""End to end with the native kernels on each instruction path: logits against transformers within
tests/test_oracle.py's bounds, greedy tokens unchanged, decode equal to a full recompute."""

from __future__ import annotations

import pytest
from fixtures import prompt_ids, stepwise_logits
from test_oracle import BOUNDS, clear_greedy_prompt, rel_l2

import krasis_run
from krasis_run.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels cannot be built here")


@pytest.mark.parametrize("quant,dense_quant,bound", BOUNDS + [("q4", "q4", 0.2)])
def test_native_logits_match_transformers(tiny, isa, quant, dense_quant, bound):
    rt = krasis_run.load(tiny.artifact(quant, dense_quant), kernel="native", threads=2)
    assert rt.ops.describe().startswith(f"native ({isa}")
    ids = prompt_ids(rt.args.vocab_size, 64)
    err = rel_l2(rt.logits(ids), tiny.reference_logits(ids).numpy())
    print(f"{tiny.layout} experts={quant} dense={dense_quant} native {isa}: rel L2 {err:.4g} (bound {bound})")
    assert err <= bound


def test_native_greedy_tokens_match_transformers(tiny, isa):
    rt = krasis_run.load(tiny.artifact("bf16", "bf16"), kernel="native", threads=2)
    ids, want = clear_greedy_prompt(tiny.model, rt.args.vocab_size, 20)
    assert list(rt.generate(ids, max_new_tokens=20, stop_token_ids=set())) == want


@pytest.mark.parametrize("quant,dense_quant", [("q4", "q8"), ("q8", "q8"), ("q4", "q4")])
def test_native_decode_equals_full_recompute(tiny, isa, quant, dense_quant):
    rt = krasis_run.load(tiny.artifact(quant, dense_quant), kernel="native", threads=2)
    ids = prompt_ids(rt.args.vocab_size, 20, seed=4)
    incremental, full = stepwise_logits(rt, ids)
    assert rel_l2(incremental, full) < 5e-3


@pytest.mark.parametrize("kernel", ["torch", "reference"])
def test_dense_q4_on_the_torch_paths(tiny, kernel):
    rt = krasis_run.load(tiny.artifact("q4", "q4"), kernel=kernel, threads=1)
    assert rt.artifact.header["quant"]["dense"] == "q4"
    ids = prompt_ids(rt.args.vocab_size, 32)
    err = rel_l2(rt.logits(ids), tiny.reference_logits(ids).numpy())
    print(f"{tiny.layout} experts=q4 dense=q4 kernel={kernel}: rel L2 {err:.4g} (bound 0.2)")
    assert err <= 0.2
