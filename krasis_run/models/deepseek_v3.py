"""DeepSeek-V3 (DeepseekV3ForCausalLM: DeepSeek-V3, R1 and checkpoints of that shape): DeepSeek-V2's multi-head
latent attention, shared experts and dense first layers (krasis_run.models.deepseek_v2, which this file extends),
with V3's router and rotary layout.

Router, as transformers' DeepseekV3TopkRouter: sigmoid scores; the choice adds a per-expert correction bias
(e_score_correction_bias, a learned load-balancing offset that only steers which experts are picked); the best
topk_group of n_group groups by the sum of each group's two best biased scores; the top k inside them; weights are
the unbiased scores of the picked experts, renormalized when norm_topk_prob, times routed_scaling_factor.
RoPE: interleaved pairs when rope_interleave (the default), rotate-half otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import deepseek_v2 as v2
from .base import ConfigError, apply_rope

ARCHITECTURE = "DeepseekV3ForCausalLM"


@dataclass
class ModelArgs(v2.ModelArgs):
    # transformers' DeepseekV3Config defaults where a config leaves a field out
    norm_topk_prob: bool = True
    rope_interleave: bool = True
    topk_method: str = "noaux_tc"
    routed_scaling_factor: float = 2.5
    n_group: int = 8
    topk_group: int = 4
    n_shared_experts: int = 1
    first_k_dense_replace: int = 3

    def check_routing(self) -> None:
        if self.n_routed_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ConfigError("n_routed_experts must be a multiple of n_group, and 1 <= topk_group <= n_group")
        if self.n_routed_experts // self.n_group < 2:
            raise ConfigError("DeepSeek-V3 routing scores each group by its two best experts: groups of 2 or more")


cache_layout = v2.cache_layout
DIRECT_MATRICES = v2.DIRECT_MATRICES
prefill_bytes_per_token = v2.prefill_bytes_per_token


def layer_tensor_names(args: ModelArgs, layer: int) -> dict[str, str]:
    names = v2.layer_tensor_names(args, layer)
    if args.is_sparse(layer):
        names["router_bias"] = f"layers.{layer}.router_bias"
    return names


class Model(v2.Model):
    tensor_names = staticmethod(layer_tensor_names)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.args.rope_interleave:
            return super().rotate(x, cos, sin)
        return apply_rope(x.float(), cos, sin)

    def route(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, n = self.args, self.layer_names[i]
        scores = torch.sigmoid(self.ops.linear(x, self.w[n["router"]]).float())
        bias = self.w[n["router_bias"]]
        choice = scores + (bias if isinstance(bias, torch.Tensor) else bias.parts["w"]).float()
        groups = choice.view(-1, a.n_group, a.n_routed_experts // a.n_group)
        best = groups.topk(2, dim=-1).values.sum(-1).topk(a.topk_group, dim=-1).indices
        keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
        choice = groups.masked_fill(~keep[..., None], float("-inf")).view(-1, a.n_routed_experts)
        ids = choice.topk(a.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, ids)
        if a.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * a.routed_scaling_factor
