"""Config parsing across HF config generations, and the runtime's import boundary."""

from __future__ import annotations

import subprocess
import sys

import pytest

from krasis_run.models.base import ConfigError
from krasis_run.models.qwen3_moe import ModelArgs

BASE = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            moe_intermediate_size=32, num_experts_per_tok=2)


def test_transformers4_and_5_spellings_agree():
    old = ModelArgs.from_hf(dict(BASE, num_experts=8, rope_theta=1e6, rope_scaling=None, unknown_key=1))
    new = ModelArgs.from_hf(dict(BASE, num_local_experts=8,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert old == new
    assert old.num_experts == 8 and old.rope["rope_theta"] == 1e6 and old.head_dim == 16


@pytest.mark.parametrize("config,message", [
    (dict(BASE, num_experts=8), "rope_theta"),
    (dict(BASE, num_experts=8, rope_theta=1e4, rope_scaling={"rope_type": "longrope", "factor": 4}), "longrope"),
    ({k: v for k, v in dict(BASE, num_experts=8, rope_theta=1e4).items() if k != "hidden_size"}, "hidden_size"),
])
def test_bad_configs_are_named(config, message):
    with pytest.raises(ConfigError, match=message):
        ModelArgs.from_hf(config)


def test_runtime_imports_neither_compiler_nor_transformers():
    code = ("import sys, krasis_run, krasis_run.cli, krasis_run.runtime; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('krasis_compile', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "beta_fast": 16, "mscale": 0.8,
     "mscale_all_dim": 0.6},
    {"rope_type": "linear", "factor": 2.0},
])
def test_scaled_rope_matches_transformers(tmp_path, rope):
    """Long-context rope settings (Qwen3 model cards add YaRN for 128K) against transformers' own model:
    cos/sin at every position up to 4x the original context, and the logits of a compiled artifact."""
    import fixtures
    import numpy as np
    import torch

    import krasis_run
    from krasis_compile.compile import compile_model
    from krasis_run.models.base import rope_cos_sin, rope_frequencies, rope_parameters

    config = fixtures.tiny_config(rope_parameters={"rope_theta": 10000.0, **rope})
    model = fixtures.make_model(config, seed=3)
    positions = torch.arange(0, 400)
    with torch.no_grad():
        want_cos, want_sin = model.model.rotary_emb(torch.zeros(1, 400, 64), positions[None])
    inv_freq, scale = rope_frequencies(rope_parameters(config.to_dict()), 16, config.max_position_embeddings)
    cos, sin = rope_cos_sin(inv_freq, positions, scale)
    assert torch.allclose(cos, want_cos[0], atol=1e-5) and torch.allclose(sin, want_sin[0], atol=1e-5)

    fixtures.save_checkpoint(model, tmp_path / "m")
    fixtures.make_tokenizer(tmp_path / "m")
    compile_model(str(tmp_path / "m"), tmp_path / "m.krs", quant="bf16", dense_quant="bf16", progress=False)
    ids = fixtures.prompt_ids(400, 32, seed=1)  # the wiring; cos/sin above cover the long positions
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = krasis_run.load(tmp_path / "m.krs", threads=1).logits(ids)
    assert float(np.linalg.norm(got - want) / np.linalg.norm(want)) < 1e-2
