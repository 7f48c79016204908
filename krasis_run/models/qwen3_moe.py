"""Qwen3-MoE (Qwen3MoeForCausalLM: Qwen3-30B-A3B, Qwen3-Coder-30B-A3B, Qwen3-235B-A22B).

The config dataclass mirrors the HF config; the layer math runs on float32 activations and calls
the kernels only through `ops` (dense matmuls, the routed experts), so the same code serves every
placement of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..cache import CacheLayout
from .base import (
    ConfigError,
    Rotary,
    from_hf_fields,
    norm_rope,
    rms_norm,
    rope_frequencies,
    rope_parameters,
    route,
)

ARCHITECTURE = "Qwen3MoeForCausalLM"


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    intermediate_size: int = 0
    head_dim: int = 0
    norm_topk_prob: bool = False
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    attention_bias: bool = False
    hidden_act: str = "silu"
    rope: dict = field(default_factory=dict)  # merged rope_parameters / rope_theta + rope_scaling

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelArgs:
        args = from_hf_fields(cls, config, aliases={"num_local_experts": "num_experts"})
        args.rope = rope_parameters(config)
        if args.hidden_act != "silu":
            raise ConfigError(f"hidden_act {args.hidden_act!r} is not supported (only 'silu')")
        if not args.head_dim:
            args.head_dim = args.hidden_size // args.num_attention_heads
        if args.num_attention_heads % args.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        return args

    def is_sparse(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


def layer_tensor_names(args: ModelArgs, layer: int) -> dict[str, str]:
    """Role -> artifact tensor name for one decoder layer (the compiler writes exactly these)."""
    p = f"layers.{layer}."
    names = {r: p + r for r in ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
    names["mlp_norm"] = p + "mlp_norm"
    names["qkv_proj"] = p + "qkv_proj"  # not in the artifact: q/k/v stacked by an engine that places them so
    if args.attention_bias:
        names.update({f"{r}_bias": p + f"{r}_bias" for r in ("q_proj", "k_proj", "v_proj", "o_proj")})
    if args.is_sparse(layer):
        names.update(router=p + "router", experts_gpu_gate_up=p + "experts.gate_up",
                     experts_gpu_down=p + "experts.down", experts_cpu=p + "experts_cpu",
                     experts=p + "experts")  # the engine's handle on this layer's experts, either layout
    else:
        names.update(mlp_gate_up=p + "mlp.gate_up", mlp_down=p + "mlp.down")
    return names


def cache_layout(args: ModelArgs) -> CacheLayout:
    return CacheLayout(args.num_key_value_heads, args.head_dim, args.head_dim, (True,) * args.num_hidden_layers)


class Model:
    """Forward pass over `weights` (artifact tensor name -> weight object) using `ops` for the matmuls."""

    def __init__(self, args: ModelArgs, weights, ops):
        self.args, self.w, self.ops = args, weights, ops
        self.cache_layout = cache_layout(args)
        self.rope = Rotary(*rope_frequencies(args.rope, args.head_dim, args.max_position_embeddings))
        self.layer_names = [layer_tensor_names(args, i) for i in range(args.num_hidden_layers)]
        self.norm_rope = getattr(ops, "norm_rope", norm_rope)  # an engine may fuse the per-head norm and rotary
        self.rms_norm = getattr(ops, "rms_norm", rms_norm)  # ... and bring its own norm and router top-k
        self.route = getattr(ops, "route", route)
        self.add_rms_norm = getattr(ops, "add_rms_norm", None)  # x += delta in place, then the norm, fused
        self.attention_inputs = getattr(ops, "attention_inputs", None)
        self.select_experts = getattr(ops, "select_experts", None)
        self.decode_layers = getattr(ops, "decode_layers", None)  # a one-token step of every layer in one call
        self._step_layers: list[dict] | None = None
        self.step_dims = (args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                          args.num_experts, args.moe_intermediate_size, args.num_experts_per_tok,
                          int(args.norm_topk_prob))  # what ops.decode_layers needs of the shapes

    def attention(self, i: int, x: torch.Tensor, cache, start_pos: int, cos, sin) -> torch.Tensor:
        a, n, w = self.args, self.layer_names[i], self.w
        t = x.shape[0]

        def proj(role: str) -> torch.Tensor:
            y = self.ops.linear(x, w[n[role]])
            return y + w[n[role + "_bias"]] if a.attention_bias else y

        if n["qkv_proj"] in w:  # an engine may hold q/k/v as one matrix: one GEMM (GEMV in decode) for three
            sizes = [a.num_attention_heads * a.head_dim] + 2 * [a.num_key_value_heads * a.head_dim]
            q, k, v = self.ops.linear(x, w[n["qkv_proj"]]).split(sizes, dim=-1)
        else:
            q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        q = q.view(t, a.num_attention_heads, a.head_dim)
        k = k.view(t, a.num_key_value_heads, a.head_dim)
        v = v.view(t, a.num_key_value_heads, a.head_dim)
        if self.attention_inputs is not None:  # q/k norm + rotary and the cache write, fused by the engine
            q, keys, values = self.attention_inputs(i, q, k, v, w[n["q_norm"]], w[n["k_norm"]], a.rms_norm_eps, cos,
                                                    sin, cache, start_pos)
        else:
            q = self.norm_rope(q, w[n["q_norm"]], a.rms_norm_eps, cos, sin)
            k = self.norm_rope(k, w[n["k_norm"]], a.rms_norm_eps, cos, sin)
            keys, values = cache.update(i, start_pos, k, v)
        out = self.ops.linear(self.ops.attention(q, keys, values, start_pos), w[n["o_proj"]])
        return out + w[n["o_proj_bias"]] if a.attention_bias else out

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        a, n, w = self.args, self.layer_names[i], self.w
        if not a.is_sparse(i):
            gate, up = self.ops.linear(x, w[n["mlp_gate_up"]]).chunk(2, dim=-1)
            return self.ops.linear(F.silu(gate) * up, w[n["mlp_down"]])
        if self.select_experts is not None:  # router projection and top k, fused by the engine
            topk_ids, topk_weights = self.select_experts(x, w[n["router"]], a.num_experts_per_tok, a.norm_topk_prob,
                                                         w[n["experts"]])
        else:
            topk_ids, topk_weights = self.route(self.ops.linear(x, w[n["router"]]), a.num_experts_per_tok,
                                                a.norm_topk_prob)
        return self.ops.experts(x, topk_ids, topk_weights, w[n["experts"]])

    def attention_chunks(self, i: int, x: torch.Tensor, cache, start_pos: int, cos, sin, chunk: int) -> torch.Tensor:
        """The attention half of layer i added into x in place, `chunk` tokens at a time: each chunk's queries
        attend to every key so far (cache.update returns the layer's earlier chunks with the new one)."""
        n, eps = self.layer_names[i], self.args.rms_norm_eps
        for s in range(0, x.shape[0], chunk):
            xs = x[s:s + chunk]
            xs.add_(self.attention(i, self.rms_norm(xs, self.w[n["attn_norm"]], eps), cache, start_pos + s,
                                   cos[s:s + chunk], sin[s:s + chunk]))
        return x

    def forward(self, tokens: torch.Tensor, cache, start_pos: int, all_logits: bool = False,
                token_chunk: int | None = None) -> torch.Tensor:
        """tokens [T] at positions start_pos.. -> logits [T, vocab] (or [1, vocab] for the last token).

        token_chunk: run the attention half of each layer over at most this many tokens at a time, so that only
        the residual stream [T, H] and the layer's K/V stay whole (the residual adds then happen in place). The
        MLP half still takes all T tokens in one call, so every layer sees the whole prompt before the next
        layer's weights are needed. The results are those of the unchunked pass."""
        a, w = self.args, self.w
        x = self.ops.embed(tokens, w["embed"])
        cos, sin = self.rope(start_pos, tokens.shape[0], x.device)
        if tokens.shape[0] == 1 and self.decode_layers is not None and self.step_layers() is not None:
            h = self.rms_norm(x, w[self.layer_names[0]["attn_norm"]], a.rms_norm_eps)
            if self.decode_layers(self._step_layers, x, h, cache, start_pos, cos, sin, self.step_dims, a.rms_norm_eps):
                cache.advance(start_pos + 1)
                return self.ops.linear(h, w["lm_head"])
        chunked = token_chunk is not None and token_chunk < tokens.shape[0]
        if chunked:
            x = x.clone()  # updated in place below: never write into what ops.embed returned
        if chunked:
            for i, n in enumerate(self.layer_names):
                x = self.attention_chunks(i, x, cache, start_pos, cos, sin, token_chunk)
                x += self.mlp(i, self.rms_norm(x, w[n["mlp_norm"]], a.rms_norm_eps))
            h = self.rms_norm(x if all_logits else x[-1:], w["norm"], a.rms_norm_eps)
        else:
            # each residual add goes with the norm after it: an engine may fuse the pair (ops.add_rms_norm)
            norms = [w[n[r]] for n in self.layer_names for r in ("attn_norm", "mlp_norm")][1:] + [w["norm"]]
            h = self.rms_norm(x, w[self.layer_names[0]["attn_norm"]], a.rms_norm_eps)
            for i in range(len(self.layer_names)):
                x, h = self._add_norm(x, self.attention(i, h, cache, start_pos, cos, sin), norms[2 * i])
                x, h = self._add_norm(x, self.mlp(i, h), norms[2 * i + 1])
            h = h if all_logits else h[-1:]
        cache.advance(start_pos + tokens.shape[0])
        return self.ops.linear(h, w["lm_head"])

    def step_layers(self) -> list[dict] | None:
        """Per layer the weights of forward's one-token loop by role, for ops.decode_layers (which runs that loop
        in one call); None where a layer has what that call does not do (biases, a dense MLP, separate q/k/v)."""
        if self._step_layers is None:
            a, w = self.args, self.w
            norms = [w[n["attn_norm"]] for n in self.layer_names[1:]] + [w["norm"]]
            fits = not a.attention_bias and all(a.is_sparse(i) and n["qkv_proj"] in w
                                                for i, n in enumerate(self.layer_names))
            self._step_layers = [
                dict(qkv_proj=w[n["qkv_proj"]], q_norm=w[n["q_norm"]], k_norm=w[n["k_norm"]], o_proj=w[n["o_proj"]],
                     mlp_norm=w[n["mlp_norm"]], router=w[n["router"]], experts=w[n["experts"]], next_norm=norm)
                for n, norm in zip(self.layer_names, norms, strict=True)
            ] if fits else []
        return self._step_layers or None

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor, weight) -> tuple[torch.Tensor, torch.Tensor]:
        if self.add_rms_norm is not None:
            return x, self.add_rms_norm(x, delta, weight, self.args.rms_norm_eps)  # x updated in place
        x = x + delta
        return x, self.rms_norm(x, weight, self.args.rms_norm_eps)
