"""Qwen3-MoE checkpoint -> artifact tensors: all name mapping and weight surgery for this family."""

from __future__ import annotations

from krasis_run.models.qwen3_moe import ARCHITECTURE, ModelArgs, layer_tensor_names

from ..checkpoint import Checkpoint
from ..layout import Group, TensorSpec
from .common import dense_mlp, embed_group, expert_source, head_group, layer_group

__all__ = ["ARCHITECTURE", "ModelArgs", "groups"]


def groups(ckpt: Checkpoint, args: ModelArgs) -> list[Group]:
    """The artifact's tensors in file order: embeddings, then layer by layer, then the head."""
    h, hd = args.hidden_size, args.head_dim
    q_out, kv_out = args.num_attention_heads * hd, args.num_key_value_heads * hd

    def src(name: str, shape: list[int]):
        return TensorSpec.from_checkpoint(ckpt, name, shape)

    out = [embed_group(ckpt, "model.embed_tokens.weight", args.vocab_size, h)]
    for layer in range(args.num_hidden_layers):
        n = layer_tensor_names(args, layer)
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        dense = [
            src(p + "input_layernorm.weight", [h]).named(n["attn_norm"], "norm"),
            src(a + "q_proj.weight", [q_out, h]).named(n["q_proj"], "matrix"),
            src(a + "k_proj.weight", [kv_out, h]).named(n["k_proj"], "matrix"),
            src(a + "v_proj.weight", [kv_out, h]).named(n["v_proj"], "matrix"),
            src(a + "o_proj.weight", [h, q_out]).named(n["o_proj"], "matrix"),
            src(a + "q_norm.weight", [hd]).named(n["q_norm"], "norm"),
            src(a + "k_norm.weight", [hd]).named(n["k_norm"], "norm"),
            src(p + "post_attention_layernorm.weight", [h]).named(n["mlp_norm"], "norm"),
        ]
        if args.attention_bias:
            for role, size in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out), ("o_proj", h)):
                dense.append(src(a + f"{role}.bias", [size]).named(n[role + "_bias"], "norm"))
        experts = None
        if args.is_sparse(layer):
            dense.append(src(p + "mlp.gate.weight", [args.num_experts, h]).named(n["router"], "router"))
            experts = expert_source(ckpt, f"{p}mlp.experts", args.num_experts, h, args.moe_intermediate_size)
        else:
            dense += dense_mlp(ckpt, p + "mlp", n, args.intermediate_size, h)
        out.append(layer_group(layer, dense, experts, n))
    out.append(head_group(ckpt, "model.", args.vocab_size, h, args.tie_word_embeddings))
    return out
