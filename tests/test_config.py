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
    assert old.num_experts == 8 and old.rope_theta == 1e6 and old.head_dim == 16


@pytest.mark.parametrize("config,message", [
    (dict(BASE, num_experts=8), "rope_theta"),
    (dict(BASE, num_experts=8, rope_theta=1e4, rope_scaling={"rope_type": "yarn", "factor": 4}), "yarn"),
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
