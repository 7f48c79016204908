"""Qwen3-MoE checkpoint -> artifact tensors: all name mapping and weight surgery for this family."""

from __future__ import annotations

import torch

from krasis_run.models.qwen3_moe import ARCHITECTURE, ModelArgs, layer_tensor_names

from ..checkpoint import Checkpoint, CompileError
from ..layout import ExpertSource, Group, TensorSpec

__all__ = ["ARCHITECTURE", "ModelArgs", "groups"]


def _expert_source(ckpt: Checkpoint, args: ModelArgs, layer: int) -> ExpertSource:
    """Per-expert names (hub checkpoints) or stacked gate_up_proj [E, 2I, H] / down_proj [E, H, I]."""
    e, h, i = args.num_experts, args.hidden_size, args.moe_intermediate_size
    prefix = f"model.layers.{layer}.mlp.experts"
    stacked_gate_up, stacked_down = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
    if stacked_gate_up in ckpt:
        if stacked_down not in ckpt:
            raise CompileError(f"checkpoint is missing tensor {stacked_down}")
        gate_up_shape, down_shape = ckpt.shape(stacked_gate_up), ckpt.shape(stacked_down)
        transposed = gate_up_shape == [e, h, 2 * i] and down_shape == [e, i, h] and h != 2 * i
        if not transposed and (gate_up_shape != [e, 2 * i, h] or down_shape != [e, h, i]):
            raise CompileError(
                f"{stacked_gate_up} {gate_up_shape} / {stacked_down} {down_shape} do not match "
                f"{e} experts of width {i} over hidden size {h}"
            )

        def load_stacked(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            gate_up = ckpt.get_rows(stacked_gate_up, start, stop)
            down = ckpt.get_rows(stacked_down, start, stop)
            if transposed:
                gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
            return gate_up, down

        return ExpertSource(e, [2 * i, h], [h, i], load_stacked)

    def load_per_expert(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = [], []
        for x in range(start, stop):
            p = f"{prefix}.{x}"
            gate = ckpt.get(f"{p}.gate_proj.weight", [i, h])
            up = ckpt.get(f"{p}.up_proj.weight", [i, h])
            gate_up.append(torch.cat([gate, up], dim=0))
            down.append(ckpt.get(f"{p}.down_proj.weight", [h, i]))
        return torch.stack(gate_up), torch.stack(down)

    for x in range(e):  # fail before writing anything, not half way through the layer
        for proj, shape in (("gate_proj", [i, h]), ("up_proj", [i, h]), ("down_proj", [h, i])):
            name = f"{prefix}.{x}.{proj}.weight"
            if name not in ckpt:
                raise CompileError(f"checkpoint is missing tensor {name}")
            if ckpt.shape(name) != shape:
                raise CompileError(f"tensor {name} has shape {ckpt.shape(name)}, expected {shape}")
    return ExpertSource(e, [2 * i, h], [h, i], load_per_expert)


def _fused_mlp(ckpt: Checkpoint, prefix: str, inter: int, hidden: int):
    def load() -> torch.Tensor:
        gate = ckpt.get(f"{prefix}.gate_proj.weight", [inter, hidden])
        up = ckpt.get(f"{prefix}.up_proj.weight", [inter, hidden])
        return torch.cat([gate, up], dim=0)

    return load


def groups(ckpt: Checkpoint, args: ModelArgs) -> list[Group]:
    """The artifact's tensors in file order: embeddings, then layer by layer, then the head."""
    h, hd = args.hidden_size, args.head_dim
    q_out, kv_out = args.num_attention_heads * hd, args.num_key_value_heads * hd

    def src(name: str, shape: list[int]):
        return TensorSpec.from_checkpoint(ckpt, name, shape)

    out = [Group("embed", None, [src("model.embed_tokens.weight", [args.vocab_size, h]).named("embed", "embed")])]
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
            experts = _expert_source(ckpt, args, layer)
        else:
            inter = args.intermediate_size
            for proj in ("gate_proj", "up_proj"):
                src(p + f"mlp.{proj}.weight", [inter, h])  # shape check now, load later
            dense.append(TensorSpec(n["mlp_gate_up"], "matrix", [2 * inter, h], _fused_mlp(ckpt, p + "mlp", inter, h)))
            dense.append(src(p + "mlp.down_proj.weight", [h, inter]).named(n["mlp_down"], "matrix"))
        out.append(Group(f"layers.{layer}", layer, dense, experts, n.get("experts_gpu_gate_up", ""),
                         n.get("experts_gpu_down", ""), n.get("experts_cpu", "")))
    head = "model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"
    out.append(Group("head", None, [
        src("model.norm.weight", [h]).named("norm", "norm"),
        src(head, [args.vocab_size, h]).named("lm_head", "matrix"),
    ]))
    return out
