"""Qwen3-Next (Qwen3NextForCausalLM: Qwen3-Next-80B-A3B, Qwen3-Coder-Next): a hybrid of Gated DeltaNet (linear
attention) and gated full attention (layer_types, by default three linear layers to one full), and a MoE with a
shared expert behind a sigmoid gate.

- Norms are x_normed * (1 + w) (the decoder, final and q/k norms); the gated norm inside linear attention is
  x_normed * w * silu(z).
- Full attention: q_proj yields the queries and an output gate (twice as wide); per-head q/k norms; rotary on the
  first head_dim * partial_rotary_factor dims (rotate-half); output times sigmoid(gate).
- Linear attention keeps, per layer, a causal-conv state (the last kernel-1 inputs) and a recurrent state
  [value heads, key dim, value dim] in cache.states: a fixed size per sequence, whatever its length. in_proj_qkvz /
  in_proj_ba come grouped per key head (transformers' fix_query_key_value_ordering); q and k are l2-normed, q scaled
  by 1/sqrt(key dim); the gated delta rule (kernels/linear_attention.py) runs a chunk of tokens at a time in prefill,
  one step in decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..cache import CacheLayout
from ..format import KrsError
from ..kernels.linear_attention import gated_delta_layer
from .base import ConfigError, Rotary, apply_rope, from_hf_fields, rms_norm, rope_frequencies, rope_parameters
from .base import route as topk_route

ARCHITECTURE = "Qwen3NextForCausalLM"
L2NORM_EPS = 1e-6
LINEAR_TOKEN_SLICE = 8192  # prefill runs a linear-attention layer over this many tokens at a time: bounds the
# chunked rule's [heads, chunks, C, C] temporaries on a long prompt (the state carries over between slices)


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
    linear_num_value_heads: int
    linear_num_key_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    head_dim: int = 256  # transformers' default
    linear_conv_kernel_dim: int = 4
    partial_rotary_factor: float = 0.25
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    layer_types: list[str] = field(default_factory=list)
    full_attention_interval: int = 4
    attention_bias: bool = False
    hidden_act: str = "silu"
    rope: dict = field(default_factory=dict)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelArgs:
        args = from_hf_fields(cls, config)
        args.rope = rope_parameters(config)
        # transformers 5 keeps partial_rotary_factor in rope_parameters; older configs at the top level
        args.partial_rotary_factor = float(args.rope.get("partial_rotary_factor", args.partial_rotary_factor))
        if args.hidden_act != "silu" or args.attention_bias:
            raise ConfigError("only hidden_act 'silu' without attention biases is supported for Qwen3-Next")
        if not args.layer_types:
            interval = args.full_attention_interval
            args.layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                for i in range(args.num_hidden_layers)]
        if len(args.layer_types) != args.num_hidden_layers or set(args.layer_types) - {"full_attention",
                                                                                       "linear_attention"}:
            raise ConfigError("layer_types must name full_attention or linear_attention for every layer")
        if args.linear_num_value_heads % args.linear_num_key_heads:
            raise ConfigError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        return args

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_full(self, layer: int) -> bool:
        return self.layer_types[layer] == "full_attention"

    def is_sparse(self, layer: int) -> bool:
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + \
            self.linear_num_value_heads * self.linear_value_head_dim


def layer_tensor_names(args: ModelArgs, layer: int) -> dict[str, str]:
    """Role -> artifact tensor name for one decoder layer (the compiler writes exactly these)."""
    p = f"layers.{layer}."
    if args.is_full(layer):
        # qkv_proj: not in the artifact, q/k/v stacked by an engine that places them so (one GEMV for three)
        roles = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "q_norm", "k_norm"]
    else:
        roles = ["in_proj_qkvz", "in_proj_ba", "conv1d", "dt_bias", "A_log", "linear_norm", "out_proj"]
    names = {r: p + r for r in ["attn_norm", "mlp_norm", *roles]}
    if args.is_sparse(layer):
        names.update(router=p + "router", experts_gpu_gate_up=p + "experts.gate_up",
                     experts_gpu_down=p + "experts.down", experts_cpu=p + "experts_cpu", experts=p + "experts")
        if args.shared_expert_intermediate_size:
            names.update(shared_gate_up=p + "shared.gate_up", shared_down=p + "shared.down",
                         shared_gate=p + "shared.gate")
    else:
        names.update(mlp_gate_up=p + "mlp.gate_up", mlp_down=p + "mlp.down")
    return names


def cache_layout(args: ModelArgs) -> CacheLayout:
    """K/V on the full-attention layers only; the linear-attention layers keep a conv state and a float32 recurrent
    state [value heads, key dim, value dim] each, whatever the length."""
    linear = sum(not args.is_full(i) for i in range(args.num_hidden_layers))
    state = (args.linear_conv_kernel_dim - 1) * args.conv_dim + \
        args.linear_num_value_heads * args.linear_key_head_dim * args.linear_value_head_dim
    return CacheLayout(args.num_key_value_heads, args.head_dim, args.head_dim,
                       tuple(args.is_full(i) for i in range(args.num_hidden_layers)), state_bytes=4 * state * linear)


def prefill_bytes_per_token(args: ModelArgs, generic: int) -> int:
    """GPU prefill memory per prompt token, in place of the planner's generic count (which assumes every layer holds
    whole-prompt q/k/v of its attention heads: 2.1x what this hybrid used at 32K). Measured on the Qwen3-Coder-Next
    shape: 3.68 / 4.28 / 5.39 GiB at 4K / 16K / 32K over the layer's dequantized experts, 65-71 KB a token at hidden
    2048, here with 15% to spare; the linear-attention layers' temporaries are bounded by LINEAR_TOKEN_SLICE."""
    return 40 * args.hidden_size


def _tensor(w) -> torch.Tensor:
    """A small float weight (norms, conv, decay parameters) whatever its placement: a tensor or an artifact view."""
    return (w if isinstance(w, torch.Tensor) else w.parts["w"]).float()


class Model:
    """Forward pass over `weights` (artifact tensor name -> weight object) using `ops` for the matmuls and experts."""

    tensor_names = staticmethod(layer_tensor_names)

    def __init__(self, args: ModelArgs, weights, ops):
        self.args, self.w, self.ops = args, weights, ops
        self.rope = Rotary(*rope_frequencies(args.rope, args.rotary_dim, args.max_position_embeddings))
        self.layer_names = [self.tensor_names(args, i) for i in range(args.num_hidden_layers)]
        self.rms_norm = getattr(ops, "rms_norm", rms_norm)
        self.add_rms_norm = getattr(ops, "add_rms_norm", None)  # x += delta in place, then the norm, fused
        self.route = getattr(ops, "route", topk_route)  # softmax + top k, fused by the engines that can
        self.cache_layout = cache_layout(args)
        self._plus_one: dict[str, torch.Tensor] = {}
        self._taps: dict[str, torch.Tensor] = {}

    def plus_one(self, name: str) -> torch.Tensor:
        """1 + w of Qwen3-Next's RMSNorm (x_normed * (1 + w)), formed once per weight."""
        if name not in self._plus_one:
            self._plus_one[name] = (1.0 + _tensor(self.w[name])).contiguous()
        return self._plus_one[name]

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The q/k norms: float32 out, which the rotary and the cache take."""
        flat = x.float().reshape(-1, x.shape[-1]).contiguous()
        return self.rms_norm(flat, self.plus_one(name), self.args.rms_norm_eps).float().view(x.shape)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """x + delta (in place where the ops fuse the pair) and its norm in the dtype the projections take (bf16
        on a GPU prefill: no float32 copy of the normed stream, which they would convert back)."""
        if self.add_rms_norm is not None:
            return x, self.add_rms_norm(x, delta, self.plus_one(name), self.args.rms_norm_eps)
        x = x + delta
        return x, self.rms_norm(x, self.plus_one(name), self.args.rms_norm_eps)

    def full_attention(self, i: int, x: torch.Tensor, cache, start_pos: int, cos, sin) -> torch.Tensor:
        a, n = self.args, self.layer_names[i]
        t, hd, rd = x.shape[0], a.head_dim, a.rotary_dim
        if n["qkv_proj"] in self.w:
            sizes = [2 * a.num_attention_heads * hd] + 2 * [a.num_key_value_heads * hd]
            q, k, v = self.ops.linear(x, self.w[n["qkv_proj"]]).float().split(sizes, dim=-1)
        else:
            q, k, v = (self.ops.linear(x, self.w[n[r]]).float() for r in ("q_proj", "k_proj", "v_proj"))
        q, gate = q.reshape(t, a.num_attention_heads, 2 * hd).chunk(2, -1)
        q = self.norm(q, n["q_norm"])
        k = self.norm(k.reshape(t, a.num_key_value_heads, hd), n["k_norm"])
        v = v.reshape(t, a.num_key_value_heads, hd)
        q = torch.cat([apply_rope(q[..., :rd], cos, sin), q[..., rd:]], dim=-1)
        k = torch.cat([apply_rope(k[..., :rd], cos, sin), k[..., rd:]], dim=-1)
        keys, values = cache.update(i, start_pos, k.contiguous(), v.contiguous())
        out = self.ops.attention(q.contiguous(), keys, values, start_pos).float()
        return self.ops.linear(out * torch.sigmoid(gate.reshape(t, -1)), self.w[n["o_proj"]])

    def linear_inputs(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of the input projections, which Qwen3-Next groups per key head: q, k [T, nk, dk]; v, z [T, nk, r,
        dv]; b, a [T, nk, r] (value head h = key head h // r)."""
        a, n, w = self.args, self.layer_names[i], self.w
        t, nk, dk, dv = x.shape[0], a.linear_num_key_heads, a.linear_key_head_dim, a.linear_value_head_dim
        r = a.linear_num_value_heads // nk
        qkvz = self.ops.linear(x, w[n["in_proj_qkvz"]]).view(t, nk, 2 * dk + 2 * r * dv)
        q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], dim=-1)
        b, a_ = self.ops.linear(x, w[n["in_proj_ba"]]).view(t, nk, 2 * r).split([r, r], dim=-1)
        return q, k, v.unflatten(-1, (r, dv)), z.unflatten(-1, (r, dv)), b, a_

    def linear_attention(self, i: int, x: torch.Tensor, cache) -> torch.Tensor:
        if x.shape[0] <= LINEAR_TOKEN_SLICE:
            return self._linear_attention(i, x, cache)
        return torch.cat([self._linear_attention(i, x[s:s + LINEAR_TOKEN_SLICE], cache)
                          for s in range(0, x.shape[0], LINEAR_TOKEN_SLICE)])

    def _linear_attention(self, i: int, x: torch.Tensor, cache) -> torch.Tensor:
        a, n, w = self.args, self.layer_names[i], self.w
        held = cache.get_state(i)
        if held is None:
            held = (torch.zeros(a.linear_conv_kernel_dim - 1, a.conv_dim, device=x.device),
                    torch.zeros(a.linear_num_value_heads, a.linear_key_head_dim, a.linear_value_head_dim,
                                device=x.device))
        if n["conv1d"] not in self._taps:  # [kernel, conv_dim]: each tap one contiguous row
            self._taps[n["conv1d"]] = _tensor(w[n["conv1d"]]).t().contiguous()
        y, conv_state, state = gated_delta_layer(
            *self.linear_inputs(i, x), self._taps[n["conv1d"]], held[0], _tensor(w[n["A_log"]]),
            _tensor(w[n["dt_bias"]]), _tensor(w[n["linear_norm"]]), held[1], a.rms_norm_eps, L2NORM_EPS)
        cache.set_state(i, conv_state, state)
        return self.ops.linear(y, w[n["out_proj"]])

    def _dense_mlp(self, x: torch.Tensor, gate_up, down) -> torch.Tensor:
        gate, up = self.ops.linear(x, gate_up).float().chunk(2, dim=-1)
        return self.ops.linear(F.silu(gate) * up, down).float()

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        a, n, w = self.args, self.layer_names[i], self.w
        if not a.is_sparse(i):
            return self._dense_mlp(x, w[n["mlp_gate_up"]], w[n["mlp_down"]])
        ids, weights = self.route(self.ops.linear(x, w[n["router"]]), a.num_experts_per_tok, a.norm_topk_prob)
        y = self.ops.experts(x, ids, weights, w[n["experts"]]).float()
        if "shared_gate" in n:
            shared = self._dense_mlp(x, w[n["shared_gate_up"]], w[n["shared_down"]])
            y = y + torch.sigmoid(self.ops.linear(x, w[n["shared_gate"]]).float()) * shared
        return y

    def forward(self, tokens: torch.Tensor, cache, start_pos: int, all_logits: bool = False,
                token_chunk: int | None = None) -> torch.Tensor:
        """tokens [T] at positions start_pos.. -> logits [T, vocab] (or [1, vocab] for the last token)."""
        a, w = self.args, self.w
        if getattr(cache, "states", None) and isinstance(start_pos, int) and start_pos != cache.length:
            raise KrsError("a recurrent layer's state holds the tokens so far: new tokens must follow them")
        x = self.ops.embed(tokens, w["embed"]).float()
        cos, sin = self.rope(start_pos, tokens.shape[0], x.device)
        # each residual add goes with the norm after it (ops.add_rms_norm fuses the pair)
        norms = [n[r] for n in self.layer_names for r in ("attn_norm", "mlp_norm")][1:] + ["norm"]
        h = self.rms_norm(x, self.plus_one(self.layer_names[0]["attn_norm"]), a.rms_norm_eps)
        for i in range(a.num_hidden_layers):
            attention = self.full_attention(i, h, cache, start_pos, cos, sin) if a.is_full(i) else \
                self.linear_attention(i, h, cache)
            x, h = self.add_norm(x, attention, norms[2 * i])
            x, h = self.add_norm(x, self.mlp(i, h), norms[2 * i + 1])
        cache.advance(start_pos + tokens.shape[0])
        return self.ops.linear(h if all_logits else h[-1:], w["lm_head"])
