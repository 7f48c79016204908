"""Qwen3.5-MoE (Qwen3_5MoeForCausalLM; on the hub Qwen3_5MoeForConditionalGeneration, of which the text model runs
here: Qwen3.5-35B-A3B): Qwen3-Next's hybrid of Gated DeltaNet and gated full attention (krasis_run.models.qwen3_next,
which this file extends) with the linear-attention input projections split: in_proj_qkv (q|k|v in plain order),
in_proj_z, in_proj_b, in_proj_a. A hub config keeps the text model's under text_config. Its multimodal rotary
positions are the plain partial rotary for text, where the three position streams are equal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import qwen3_next

ARCHITECTURE = "Qwen3_5MoeForCausalLM"
ARCHITECTURES = (ARCHITECTURE, "Qwen3_5MoeForConditionalGeneration")  # the hub's, with a vision tower skipped

cache_layout = qwen3_next.cache_layout
prefill_bytes_per_token = qwen3_next.prefill_bytes_per_token


@dataclass
class ModelArgs(qwen3_next.ModelArgs):
    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelArgs:
        text = dict(config.get("text_config") or config)
        if "text_config" in config and "tie_word_embeddings" in config:  # the multimodal class ties by its own flag
            text["tie_word_embeddings"] = config["tie_word_embeddings"]
        return super().from_hf(text)


def layer_tensor_names(args: ModelArgs, layer: int) -> dict[str, str]:
    names = qwen3_next.layer_tensor_names(args, layer)
    if not args.is_full(layer):
        p = f"layers.{layer}."
        del names["in_proj_qkvz"], names["in_proj_ba"]
        names.update({r: p + r for r in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")})
    return names


class Model(qwen3_next.Model):
    tensor_names = staticmethod(layer_tensor_names)

    def linear_inputs(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, n, w = self.args, self.layer_names[i], self.w
        t, nk, dk, dv = x.shape[0], a.linear_num_key_heads, a.linear_key_head_dim, a.linear_value_head_dim
        r = a.linear_num_value_heads // nk
        q, k, v = self.ops.linear(x, w[n["in_proj_qkv"]]).split([nk * dk, nk * dk, nk * r * dv], dim=-1)
        z = self.ops.linear(x, w[n["in_proj_z"]]).view(t, nk, r, dv)
        b, a_ = (self.ops.linear(x, w[n[p]]).view(t, nk, r) for p in ("in_proj_b", "in_proj_a"))
        return q.unflatten(-1, (nk, dk)), k.unflatten(-1, (nk, dk)), v.unflatten(-1, (nk, r, dv)), z, b, a_
