"""DeepSeek-V2 checkpoint -> artifact tensors: all name mapping for this family (MLA, shared experts)."""

from __future__ import annotations

from krasis_run.models.deepseek_v2 import ARCHITECTURE, ModelArgs, layer_tensor_names

from ..checkpoint import Checkpoint
from ..layout import Group, TensorSpec
from .common import dense_mlp, embed_group, expert_source, fused_mlp, head_group, layer_group

__all__ = ["ARCHITECTURE", "ModelArgs", "groups"]


def groups(ckpt: Checkpoint, args: ModelArgs) -> list[Group]:
    """The artifact's tensors in file order: embeddings, then layer by layer, then the head."""
    h, heads, r = args.hidden_size, args.num_attention_heads, args.kv_lora_rank
    qk = args.qk_nope_head_dim + args.qk_rope_head_dim

    def src(name: str, shape: list[int]):
        return TensorSpec.from_checkpoint(ckpt, name, shape)

    out = [embed_group(ckpt, "model.embed_tokens.weight", args.vocab_size, h)]
    for layer in range(args.num_hidden_layers):
        n = layer_tensor_names(args, layer)
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        dense = [src(p + "input_layernorm.weight", [h]).named(n["attn_norm"], "norm")]
        if args.q_lora_rank:
            dense += [src(a + "q_a_proj.weight", [args.q_lora_rank, h]).named(n["q_a_proj"], "matrix"),
                      src(a + "q_a_layernorm.weight", [args.q_lora_rank]).named(n["q_a_norm"], "norm"),
                      src(a + "q_b_proj.weight", [heads * qk, args.q_lora_rank]).named(n["q_b_proj"], "matrix")]
        else:
            dense.append(src(a + "q_proj.weight", [heads * qk, h]).named(n["q_proj"], "matrix"))
        dense += [
            src(a + "kv_a_proj_with_mqa.weight", [r + args.qk_rope_head_dim, h]).named(n["kv_a_proj"], "matrix"),
            src(a + "kv_a_layernorm.weight", [r]).named(n["kv_a_norm"], "norm"),
            src(a + "kv_b_proj.weight", [heads * (args.qk_nope_head_dim + args.v_head_dim), r]).named(
                n["kv_b_proj"], "matrix"),
            src(a + "o_proj.weight", [h, heads * args.v_head_dim]).named(n["o_proj"], "matrix"),
            src(p + "post_attention_layernorm.weight", [h]).named(n["mlp_norm"], "norm"),
        ]
        experts = None
        if args.is_sparse(layer):
            dense.append(src(p + "mlp.gate.weight", [args.n_routed_experts, h]).named(n["router"], "router"))
            if args.n_shared_experts:
                shared = args.n_shared_experts * args.moe_intermediate_size
                dense.append(TensorSpec(n["shared_gate_up"], "matrix", [2 * shared, h],
                                        fused_mlp(ckpt, p + "mlp.shared_experts", shared, h)))
                dense.append(src(p + "mlp.shared_experts.down_proj.weight", [h, shared]).named(n["shared_down"],
                                                                                               "matrix"))
            experts = expert_source(ckpt, p + "mlp.experts", args.n_routed_experts, h, args.moe_intermediate_size)
        else:
            dense += dense_mlp(ckpt, p + "mlp", n, args.intermediate_size, h)
        out.append(layer_group(layer, dense, experts, n))
    out.append(head_group(ckpt, "model.", args.vocab_size, h, args.tie_word_embeddings))
    return out
