"""Qwen3.5-MoE checkpoint -> artifact tensors: Qwen3-Next's mapping with the split linear-attention projections; a
hub (ConditionalGeneration) checkpoint's text model sits under model.language_model., and its vision tower and
multi-token-prediction tensors are not read."""

from __future__ import annotations

from krasis_run.models.qwen3_5_moe import ARCHITECTURE, ARCHITECTURES, ModelArgs, layer_tensor_names

from ..checkpoint import Checkpoint
from ..layout import Group
from . import qwen3_next

__all__ = ["ARCHITECTURE", "ARCHITECTURES", "ModelArgs", "groups"]


def groups(ckpt: Checkpoint, args: ModelArgs) -> list[Group]:
    prefix = "model.language_model." if "model.language_model.embed_tokens.weight" in ckpt else "model."
    return qwen3_next.groups(ckpt, args, prefix, split_projections=True, names=layer_tensor_names)
