"""DeepSeek-V3 checkpoint -> artifact tensors: DeepSeek-V2's mapping plus each MoE layer's router correction bias."""

from __future__ import annotations

from krasis_run.models.deepseek_v3 import ARCHITECTURE, ModelArgs, layer_tensor_names

from ..checkpoint import Checkpoint
from ..layout import Group, TensorSpec
from . import deepseek_v2

__all__ = ["ARCHITECTURE", "ModelArgs", "groups"]


def groups(ckpt: Checkpoint, args: ModelArgs) -> list[Group]:
    out = deepseek_v2.groups(ckpt, args)
    for group in out:
        if group.layer is not None and args.is_sparse(group.layer):
            name = f"model.layers.{group.layer}.mlp.gate.e_score_correction_bias"
            bias = TensorSpec.from_checkpoint(ckpt, name, [args.n_routed_experts])
            group.tensors.append(bias.named(layer_tensor_names(args, group.layer)["router_bias"], "norm"))
    return out
