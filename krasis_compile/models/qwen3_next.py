"""Qwen3-Next checkpoint -> artifact tensors: all name mapping for this family (Gated DeltaNet and gated full
attention layers, routed experts with a gated shared expert)."""

from __future__ import annotations

from krasis_run.models.qwen3_next import ARCHITECTURE, ModelArgs, layer_tensor_names

from ..checkpoint import Checkpoint
from ..layout import Group, TensorSpec
from .common import dense_mlp, embed_group, expert_source, fused_mlp, head_group, layer_group

__all__ = ["ARCHITECTURE", "ModelArgs", "groups"]


def _conv_weight(ckpt: Checkpoint, name: str, channels: int, kernel: int):
    def load():
        return ckpt.get(name, [channels, 1, kernel]).reshape(channels, kernel)

    return load


def groups(ckpt: Checkpoint, args: ModelArgs, prefix: str = "model.", split_projections: bool = False,
           names=layer_tensor_names) -> list[Group]:
    """The artifact's tensors in file order: embeddings, then layer by layer, then the head. prefix: where the text
    model's tensors are (Qwen3.5 hub checkpoints: model.language_model.); split_projections: Qwen3.5's in_proj_qkv,
    in_proj_z, in_proj_b and in_proj_a instead of Qwen3-Next's in_proj_qkvz and in_proj_ba."""
    h, hd = args.hidden_size, args.head_dim
    nk, nv, dk, dv = args.linear_num_key_heads, args.linear_num_value_heads, args.linear_key_head_dim, \
        args.linear_value_head_dim

    def src(name: str, shape: list[int]):
        return TensorSpec.from_checkpoint(ckpt, name, shape)

    out = [embed_group(ckpt, prefix + "embed_tokens.weight", args.vocab_size, h)]
    for layer in range(args.num_hidden_layers):
        n = names(args, layer)
        p = f"{prefix}layers.{layer}."
        dense = [src(p + "input_layernorm.weight", [h]).named(n["attn_norm"], "norm"),
                 src(p + "post_attention_layernorm.weight", [h]).named(n["mlp_norm"], "norm")]
        if args.is_full(layer):
            a = p + "self_attn."
            heads, kv = args.num_attention_heads, args.num_key_value_heads
            dense += [src(a + "q_proj.weight", [2 * heads * hd, h]).named(n["q_proj"], "matrix"),
                      src(a + "k_proj.weight", [kv * hd, h]).named(n["k_proj"], "matrix"),
                      src(a + "v_proj.weight", [kv * hd, h]).named(n["v_proj"], "matrix"),
                      src(a + "o_proj.weight", [h, heads * hd]).named(n["o_proj"], "matrix"),
                      src(a + "q_norm.weight", [hd]).named(n["q_norm"], "norm"),
                      src(a + "k_norm.weight", [hd]).named(n["k_norm"], "norm")]
        else:
            a = p + "linear_attn."
            conv = a + "conv1d.weight"
            src(conv, [args.conv_dim, 1, args.linear_conv_kernel_dim])  # shape check now, load later
            if split_projections:
                dense += [src(a + "in_proj_qkv.weight", [2 * nk * dk + nv * dv, h]).named(n["in_proj_qkv"], "matrix"),
                          src(a + "in_proj_z.weight", [nv * dv, h]).named(n["in_proj_z"], "matrix"),
                          src(a + "in_proj_b.weight", [nv, h]).named(n["in_proj_b"], "matrix"),
                          src(a + "in_proj_a.weight", [nv, h]).named(n["in_proj_a"], "matrix")]
            else:
                dense += [src(a + "in_proj_qkvz.weight", [2 * nk * dk + 2 * nv * dv, h]).named(n["in_proj_qkvz"],
                                                                                             "matrix"),
                          src(a + "in_proj_ba.weight", [2 * nv, h]).named(n["in_proj_ba"], "matrix")]
            dense += [TensorSpec(n["conv1d"], "norm", [args.conv_dim, args.linear_conv_kernel_dim],
                                 _conv_weight(ckpt, conv, args.conv_dim, args.linear_conv_kernel_dim)),
                      src(a + "dt_bias", [nv]).named(n["dt_bias"], "norm"),
                      src(a + "A_log", [nv]).named(n["A_log"], "norm"),
                      src(a + "norm.weight", [dv]).named(n["linear_norm"], "norm"),
                      src(a + "out_proj.weight", [h, nv * dv]).named(n["out_proj"], "matrix")]
        experts = None
        if args.is_sparse(layer):
            dense.append(src(p + "mlp.gate.weight", [args.num_experts, h]).named(n["router"], "router"))
            if args.shared_expert_intermediate_size:
                s = args.shared_expert_intermediate_size
                dense += [TensorSpec(n["shared_gate_up"], "matrix", [2 * s, h], fused_mlp(ckpt, p + "mlp.shared_expert",
                                                                                         s, h)),
                          src(p + "mlp.shared_expert.down_proj.weight", [h, s]).named(n["shared_down"], "matrix"),
                          src(p + "mlp.shared_expert_gate.weight", [1, h]).named(n["shared_gate"], "router")]
            experts = expert_source(ckpt, p + "mlp.experts", args.num_experts, h, args.moe_intermediate_size)
        else:
            dense += dense_mlp(ckpt, p + "mlp", n, args.intermediate_size, h)
        out.append(layer_group(layer, dense, experts, n))
    out.append(head_group(ckpt, prefix, args.vocab_size, h, args.tie_word_embeddings))
    return out
