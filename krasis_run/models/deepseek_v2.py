"""DeepSeek-V2 (DeepseekV2ForCausalLM: DeepSeek-V2-Lite, DeepSeek-V2): multi-head latent attention (MLA) and a
MoE with shared experts.

The KV cache holds what MLA compresses each token to, not per-head K/V: the normed latent (kv_lora_rank) and the
rotary key (qk_rope_head_dim), one "head" of kv_lora_rank + qk_rope_head_dim per token (~18x less than per-head
K/V for V2-Lite). Attention runs in the absorbed form: the key half of kv_b_proj is folded into the queries and
the value half applied after the softmax, so the latent is never expanded per position.

Routing follows transformers' DeepseekV2TopkRouter: softmax over the routed experts, the top k (greedy, or
group-limited greedy), weights times routed_scaling_factor, never renormalized; the shared experts add a dense
SiLU MLP of width n_shared_experts * moe_intermediate_size. The first `first_k_dense_replace` layers are dense.
RoPE rotates interleaved pairs (complex form) of the rotary dims only.

A prompt on the GPU attends in the expanded form instead: the latent of every position through kv_b into per-head
keys and values, one flash-attention call (the absorbed form's 576-wide heads fit no fused kernel, and SDPA would
hold [heads, T, S] scores in float32). Decode (one query) and the CPU always use the absorbed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..cache import CacheLayout
from ..codecs import dequant_parts
from .base import ConfigError, Rotary, from_hf_fields, rms_norm, rope_frequencies, rope_parameters

ARCHITECTURE = "DeepseekV2ForCausalLM"
# kv_b_proj is read as a matrix, not only through ops.linear: absorbed attention takes per-head views of it (the
# GPU keeps it bf16, not as q8 rows)
DIRECT_MATRICES = ("kv_b_proj",)
LATENT_NORM_EPS = 1e-6  # transformers builds kv_a_layernorm / q_a_layernorm with the default eps, not rms_norm_eps


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    n_shared_experts: int = 2  # transformers' defaults where a config leaves a field out
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    rope: dict = field(default_factory=dict)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelArgs:
        args = from_hf_fields(cls, config, aliases={"num_local_experts": "n_routed_experts"})
        args.rope = rope_parameters(config)
        if args.hidden_act != "silu":
            raise ConfigError(f"hidden_act {args.hidden_act!r} is not supported (only 'silu')")
        if args.attention_bias or args.mlp_bias:
            raise ConfigError("attention_bias / mlp_bias are not supported for DeepSeek models")
        args.check_routing()
        return args

    def check_routing(self) -> None:
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"topk_method {self.topk_method!r} is not supported (greedy, group_limited_greedy)")
        if self.topk_method == "group_limited_greedy" and self.n_routed_experts % self.n_group:
            raise ConfigError("n_routed_experts must be a multiple of n_group")

    @property
    def num_experts(self) -> int:  # the name the engines and the planner use
        return self.n_routed_experts

    def is_sparse(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and self.n_routed_experts > 0


def layer_tensor_names(args: ModelArgs, layer: int) -> dict[str, str]:
    """Role -> artifact tensor name for one decoder layer (the compiler writes exactly these)."""
    p = f"layers.{layer}."
    roles = ["attn_norm", "mlp_norm", "kv_a_proj", "kv_a_norm", "kv_b_proj", "o_proj"]
    roles += ["q_a_proj", "q_a_norm", "q_b_proj"] if args.q_lora_rank else ["q_proj"]
    names = {r: p + r for r in roles}
    if args.is_sparse(layer):
        names.update(router=p + "router", experts_gpu_gate_up=p + "experts.gate_up",
                     experts_gpu_down=p + "experts.down", experts_cpu=p + "experts_cpu", experts=p + "experts")
        if args.n_shared_experts:
            names.update(shared_gate_up=p + "shared.gate_up", shared_down=p + "shared.down")
    else:
        names.update(mlp_gate_up=p + "mlp.gate_up", mlp_down=p + "mlp.down")
    return names


def cache_layout(args: ModelArgs) -> CacheLayout:
    """One latent + rotary key per token and layer, no values; float32: ~9x smaller than per-head K/V even so, and
    every layer reads it whole each decode step, which in bf16 meant converting the whole cache at every step."""
    return CacheLayout(1, args.kv_lora_rank + args.qk_rope_head_dim, 0, (True,) * args.num_hidden_layers,
                       torch.float32)


def prefill_bytes_per_token(args: ModelArgs, generic: int) -> int:
    """GPU prefill memory per prompt token: the planner's generic count plus the expanded attention's per-head keys
    and values through kv_b, keys, zero-padded values, queries and output (bf16, the key width). Measured on the
    V2-Lite shape: 1.80 / 3.92 / 7.79 GiB used of 2.46 / 4.83 / 8.13 planned at 4K / 16K / 32K."""
    qk = args.qk_nope_head_dim + args.qk_rope_head_dim
    return generic + args.num_attention_heads * (2 * (args.qk_nope_head_dim + args.v_head_dim) + 4 * 2 * qk)


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]: pairs (x[2i], x[2i+1]) rotated by angle i (transformers' complex-number form); cos/sin
    [T, d/2] (already times the rope scale)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)


class Model:
    """Forward pass over `weights` (artifact tensor name -> weight object) using `ops` for the matmuls and experts."""

    tensor_names = staticmethod(layer_tensor_names)
    expand_prefill: bool | None = None  # the expanded form for a prompt: None = on CUDA (a test forces either)

    def __init__(self, args: ModelArgs, weights, ops):
        self.args, self.w, self.ops = args, weights, ops
        a = args
        self.rope = Rotary(*rope_frequencies(a.rope, a.qk_rope_head_dim, a.max_position_embeddings))
        self.cache_layout = cache_layout(a)
        self.scaling = (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5
        mscale_all_dim = a.rope.get("mscale_all_dim") if a.rope["rope_type"] != "default" else None
        if mscale_all_dim and a.rope.get("factor", 1.0) > 1:  # yarn: transformers' yarn_apply_mscale
            self.scaling *= (0.1 * mscale_all_dim * math.log(a.rope["factor"]) + 1.0) ** 2
        self.layer_names = [self.tensor_names(a, i) for i in range(a.num_hidden_layers)]
        self.rms_norm = getattr(ops, "rms_norm", rms_norm)
        self._absorbed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _kv_b(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head into its key half [heads, nope, r] and value half [heads, v, r]: on the GPU views
        of the bf16 weight in VRAM (no second copy, which for V3 would be ~3.8 GiB the plan does not hold); on the
        CPU dequantized once per layer to float32."""
        if i not in self._absorbed:
            a, w = self.args, self.w[self.layer_names[i]["kv_b_proj"]]
            dense = w if isinstance(w, torch.Tensor) else dequant_parts(w.codec, w.layout, w.parts)
            dense = dense if dense.is_cuda else dense.float()
            per_head = dense.view(a.num_attention_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)
            w_k, w_v = per_head[:, :a.qk_nope_head_dim], per_head[:, a.qk_nope_head_dim:]
            self._absorbed[i] = (w_k, w_v) if dense.is_cuda else (w_k.contiguous(), w_v.contiguous())
        return self._absorbed[i]

    def attention(self, i: int, x: torch.Tensor, cache, start_pos: int, cos, sin) -> torch.Tensor:
        a, n, w = self.args, self.layer_names[i], self.w
        t, r = x.shape[0], a.kv_lora_rank
        if a.q_lora_rank:
            q_latent = self.ops.linear(x, w[n["q_a_proj"]]).float().contiguous()
            q = self.ops.linear(self.rms_norm(q_latent, w[n["q_a_norm"]], LATENT_NORM_EPS), w[n["q_b_proj"]])
        else:
            q = self.ops.linear(x, w[n["q_proj"]])
        q = q.float().view(t, a.num_attention_heads, a.qk_nope_head_dim + a.qk_rope_head_dim)
        q_nope, q_rot = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.ops.linear(x, w[n["kv_a_proj"]]).float().split([r, a.qk_rope_head_dim], dim=-1)
        latent = self.rms_norm(latent.contiguous(), w[n["kv_a_norm"]], LATENT_NORM_EPS).float()
        q_rot = self.rotate(q_rot, cos, sin)
        k_rot = self.rotate(k_rot[:, None, :], cos, sin)[:, 0]
        entry = torch.cat([latent, k_rot], dim=-1)[:, None, :].contiguous()  # [T, 1, r + rope]
        keys, _ = cache.update(i, start_pos, entry, entry[..., :0])
        keys = keys[:, 0]  # [S, r + rope]: one key "head" every query head attends to
        expand = self.expand_prefill if self.expand_prefill is not None else keys.is_cuda
        if expand and t > 1:
            out = self._attend_expanded(i, q_nope, q_rot, keys)
        else:
            out = self._attend_absorbed(i, q_nope, q_rot, keys, cache)
        return self.ops.linear(out, w[n["o_proj"]])

    def _attend_absorbed(self, i: int, q_nope, q_rot, keys: torch.Tensor, cache) -> torch.Tensor:
        t, r = q_nope.shape[0], self.args.kv_lora_rank
        w_k, w_v = self._kv_b(i)
        q_latent = torch.einsum("thd,hdr->thr", q_nope.to(w_k.dtype), w_k).float()  # kv_b's key half into the queries
        query = torch.cat([q_latent, q_rot], dim=-1).transpose(0, 1)[None]  # [1, heads, T, r + rope]
        keys = keys.float()
        valid = getattr(cache, "valid_keys", None)  # a captured decode step: the whole storage, masked by length
        valid = valid(keys.shape[0]) if valid is not None else None
        if t == 1:  # one query (decode): two products over the cache; SDPA would copy the one key head per head
            scores = (query[0, :, 0] @ keys.T) * self.scaling  # [heads, S]
            if valid is not None:
                scores = scores.masked_fill(~valid, float("-inf"))
            out_latent = (torch.softmax(scores, dim=-1) @ keys[:, :r])[None, :, None]
        else:  # as attention with one KV head whose values are the latent: never [heads, T, S] scores whole
            mask = valid if valid is not None else None if keys.shape[0] == t else causal_lower_right(t, keys.shape[0])
            out_latent = F.scaled_dot_product_attention(query, keys[None, None], keys[None, None, :, :r],
                                                        attn_mask=mask, is_causal=mask is None, scale=self.scaling,
                                                        enable_gqa=True)
        out = torch.einsum("thr,hvr->thv", out_latent[0].transpose(0, 1).to(w_v.dtype), w_v)
        return out.float().reshape(t, -1).contiguous()

    def _attend_expanded(self, i: int, q_nope, q_rot, keys: torch.Tensor) -> torch.Tensor:
        """Per-head keys and values of every position from the latent (one GEMM through kv_b), then causal attention
        in bf16 with the values zero-padded to the key width, so one flash kernel takes all three."""
        a = self.args
        t, s, heads = q_nope.shape[0], keys.shape[0], a.num_attention_heads
        nope, dv, r = a.qk_nope_head_dim, a.v_head_dim, a.kv_lora_rank
        kv = self.ops.linear(keys[:, :r], self.w[self.layer_names[i]["kv_b_proj"]]).view(s, heads, nope + dv)
        k_nope, value = kv.to(torch.bfloat16).split([nope, dv], dim=-1)
        k_rot = keys[:, None, r:].to(torch.bfloat16).expand(s, heads, a.qk_rope_head_dim)
        key = torch.cat([k_nope, k_rot], dim=-1)
        query = torch.cat([q_nope, q_rot], dim=-1).to(torch.bfloat16)
        value = F.pad(value, (0, key.shape[-1] - dv))
        mask = None if s == t else causal_lower_right(t, s)
        out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], key.transpose(0, 1)[None],
                                             value.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                                             scale=self.scaling)
        return out[0, :, :, :dv].transpose(0, 1).reshape(t, heads * dv)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE of the rotary dims x [T, heads, d]; cos/sin [T, d] as cat(freqs, freqs) times the scale."""
        half = x.shape[-1] // 2
        return rope_interleaved(x, cos[:, :half], sin[:, :half])

    def route(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.args
        scores = torch.softmax(self.ops.linear(x, self.w[self.layer_names[i]["router"]]).float(), dim=-1)
        if a.topk_method == "group_limited_greedy":
            groups = scores.view(-1, a.n_group, a.n_routed_experts // a.n_group)
            best = groups.amax(-1).topk(a.topk_group, dim=-1).indices
            keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
            scores = (groups * keep[..., None]).view(-1, a.n_routed_experts)
        weights, ids = torch.topk(scores, a.num_experts_per_tok, dim=-1)
        return ids, weights * a.routed_scaling_factor

    def _dense_mlp(self, x: torch.Tensor, gate_up, down) -> torch.Tensor:
        gate, up = self.ops.linear(x, gate_up).float().chunk(2, dim=-1)
        return self.ops.linear(F.silu(gate) * up, down).float()

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        n, w = self.layer_names[i], self.w
        if not self.args.is_sparse(i):
            return self._dense_mlp(x, w[n["mlp_gate_up"]], w[n["mlp_down"]])
        ids, weights = self.route(i, x)
        y = self.ops.experts(x, ids, weights, w[n["experts"]]).float()
        if "shared_gate_up" in n:
            y = y + self._dense_mlp(x, w[n["shared_gate_up"]], w[n["shared_down"]])
        return y

    def forward(self, tokens: torch.Tensor, cache, start_pos: int, all_logits: bool = False,
                token_chunk: int | None = None) -> torch.Tensor:
        """tokens [T] at positions start_pos.. -> logits [T, vocab] (or [1, vocab] for the last token)."""
        a, w = self.args, self.w
        x = self.ops.embed(tokens, w["embed"]).float()
        cos, sin = self.rope(start_pos, tokens.shape[0], x.device)
        for i, n in enumerate(self.layer_names):
            x = x + self.attention(i, self.rms_norm(x, w[n["attn_norm"]], a.rms_norm_eps), cache, start_pos, cos, sin)
            x = x + self.mlp(i, self.rms_norm(x, w[n["mlp_norm"]], a.rms_norm_eps))
        cache.advance(start_pos + tokens.shape[0])
        h = self.rms_norm(x if all_logits else x[-1:], w["norm"], a.rms_norm_eps)
        return self.ops.linear(h, w["lm_head"])
