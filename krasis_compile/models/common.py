"""Checkpoint pieces several architectures share: routed experts in either layout, fused dense MLPs."""

from __future__ import annotations

import torch

from ..checkpoint import Checkpoint, CompileError
from ..layout import ExpertSource, Group, TensorSpec

__all__ = ["dense_mlp", "embed_group", "expert_source", "fused_mlp", "head_group", "layer_group"]


def expert_source(ckpt: Checkpoint, prefix: str, e: int, h: int, i: int) -> ExpertSource:
    """The routed experts under `prefix` (e.g. model.layers.3.mlp.experts), e experts of width i over hidden h:
    per-expert names (hub checkpoints) or stacked gate_up_proj [E, 2I, H] / down_proj [E, H, I] (either orientation)."""
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


def fused_mlp(ckpt: Checkpoint, prefix: str, inter: int, hidden: int):
    """Loader of a dense SiLU MLP's gate and up projections under `prefix`, stacked as one [2 * inter, hidden]."""
    for proj in ("gate_proj", "up_proj"):
        TensorSpec.from_checkpoint(ckpt, f"{prefix}.{proj}.weight", [inter, hidden])  # shape check now, load later

    def load() -> torch.Tensor:
        gate = ckpt.get(f"{prefix}.gate_proj.weight", [inter, hidden])
        up = ckpt.get(f"{prefix}.up_proj.weight", [inter, hidden])
        return torch.cat([gate, up], dim=0)

    return load


def dense_mlp(ckpt: Checkpoint, prefix: str, names: dict[str, str], inter: int, hidden: int) -> list[TensorSpec]:
    """A dense SiLU MLP under `prefix` (gate and up stacked as one matrix, then down) as names' mlp_gate_up/mlp_down."""
    return [TensorSpec(names["mlp_gate_up"], "matrix", [2 * inter, hidden], fused_mlp(ckpt, prefix, inter, hidden)),
            TensorSpec.from_checkpoint(ckpt, f"{prefix}.down_proj.weight", [hidden, inter]).named(names["mlp_down"],
                                                                                                   "matrix")]


def embed_group(ckpt: Checkpoint, name: str, vocab: int, hidden: int) -> Group:
    return Group("embed", None, [TensorSpec.from_checkpoint(ckpt, name, [vocab, hidden]).named("embed", "embed")])


def layer_group(layer: int, dense: list[TensorSpec], experts: ExpertSource | None, names: dict[str, str]) -> Group:
    """One decoder layer's group: its dense tensors and, for a MoE layer, its experts under names' expert roles."""
    return Group(f"layers.{layer}", layer, dense, experts, names.get("experts_gpu_gate_up", ""),
                 names.get("experts_gpu_down", ""), names.get("experts_cpu", ""))


def head_group(ckpt: Checkpoint, prefix: str, vocab: int, hidden: int, tied: bool) -> Group:
    """The final norm and the lm_head (the embeddings again when tied), for a text model under `prefix`."""
    head = prefix + "embed_tokens.weight" if tied else "lm_head.weight"
    norm = TensorSpec.from_checkpoint(ckpt, prefix + "norm.weight", [hidden]).named("norm", "norm")
    lm_head = TensorSpec.from_checkpoint(ckpt, head, [vocab, hidden]).named("lm_head", "matrix")
    return Group("head", None, [norm, lm_head])
