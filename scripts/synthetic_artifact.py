"""A synthetic artifact of the full Qwen3-30B-A3B shape, written straight from random quantized parts (no BF16
checkpoint: 48 layers of one would not fit the GPU host's disk). Used by scripts/bench.py (GPU prefill and hybrid
decode) and scripts/bench_decode.py --synthetic (CPU decode)."""

from __future__ import annotations

from pathlib import Path

import torch

from krasis_compile.layout import ExpertSource, Group, TensorSpec, plan_chunks
from krasis_compile.writer import ArtifactWriter
from krasis_run.models.qwen3_moe import ModelArgs, layer_tensor_names

SHAPE = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
             moe_intermediate_size=768, intermediate_size=6144, rope_theta=1e6, rms_norm_eps=1e-6,
             norm_topk_prob=True, max_position_embeddings=40960, tie_word_embeddings=False)


EMBED_SCALE = 1e5  # with per-layer routers: every layer then routes each token its own way, near uniformly


def write_synthetic(out: Path, layers: int, quant: str, sections: tuple[str, ...], dense_codec: str = "q8",
                    routers: str = "per_layer") -> None:
    """Random but well-scaled quantized parts: weights ~ +-0.04, norms 1, so activations stay finite. Every layer
    shares one random tensor per part (writing 48 distinct layers would take minutes), except the routers with
    routers="per_layer": one random router per layer, so each layer routes its own way (with one shared router
    a 4K prompt picked only ~31 of the 128 experts of a layer, which flatters hot experts)."""
    from tokenizers import Tokenizer, models

    config = dict(SHAPE, num_hidden_layers=layers)
    args = ModelArgs.from_hf(config)
    h, hd, e, i = args.hidden_size, args.head_dim, args.num_experts, args.moe_intermediate_size
    groups = [Group("embed", None, [TensorSpec("embed", "embed", [args.vocab_size, h], None)])]
    for layer in range(layers):
        n = layer_tensor_names(args, layer)
        dense = [TensorSpec(n[r], "norm", [h], None) for r in ("attn_norm", "mlp_norm")]
        dense += [TensorSpec(n[r], "norm", [hd], None) for r in ("q_norm", "k_norm")]
        dense += [TensorSpec(n["q_proj"], "matrix", [32 * hd, h], None),
                  TensorSpec(n["k_proj"], "matrix", [4 * hd, h], None),
                  TensorSpec(n["v_proj"], "matrix", [4 * hd, h], None),
                  TensorSpec(n["o_proj"], "matrix", [h, 32 * hd], None),
                  TensorSpec(n["router"], "router", [e, h], None)]
        groups.append(Group(f"layers.{layer}", layer, dense, ExpertSource(e, [2 * i, h], [h, i], None),
                            n["experts_gpu_gate_up"], n["experts_gpu_down"], n["experts_cpu"]))
    groups.append(Group("head", None, [TensorSpec("norm", "norm", [h], None),
                                       TensorSpec("lm_head", "matrix", [args.vocab_size, h], None)]))
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).to_str().encode()
    chunks = plan_chunks(groups, quant, dense_codec, sections, {"tokenizer.json": len(tokenizer)})
    header = {"architecture": SHAPE["architectures"][0], "config": config, "generation_config": {},
              "tokenizer": {"blob": "tokenizer.json", "config": {}, "chat_template": None},
              "quant": {"experts": quant, "dense": dense_codec, "rounding": "synthetic", "rel_l2_error": {}},
              "sections": list(sections), "source": {"kind": "synthetic"}, "compiler": {"name": "scripts/bench.py"},
              "blobs": {"tokenizer.json": {"compression": "none", "raw_length": len(tokenizer)}}}
    g = torch.Generator().manual_seed(0)
    cache: dict[tuple, torch.Tensor] = {}  # one random tensor per (part, shape), reused by every layer

    def part_data(name: str, dtype: str, shape: list[int]) -> torch.Tensor:
        key = (name, dtype, tuple(shape))
        if key not in cache:
            count = torch.Size(shape).numel()
            if dtype == "f32":
                cache[key] = torch.ones(count)
            elif dtype == "u8":
                cache[key] = torch.randint(0, 256, (count,), dtype=torch.uint8, generator=g)
            elif dtype == "i8":
                cache[key] = torch.randint(-127, 128, (count,), dtype=torch.int8, generator=g)
            elif "zero" in name:
                cache[key] = (torch.randn(count, generator=g) * 0.002).to(torch.bfloat16)
            elif "scale" in name:
                cache[key] = (0.002 + torch.rand(count, generator=g) * 0.004).to(torch.bfloat16)
            else:
                cache[key] = (torch.randn(count, generator=g) * 0.02).to(torch.bfloat16)
        return cache[key]

    with ArtifactWriter(out, header, chunks) as w:
        for chunk in chunks:
            for t in chunk.tensors:
                if t.codec == "blob":
                    w.write(t.name, None, tokenizer)
                    continue
                if routers == "per_layer" and t.name.endswith(".router"):
                    layer_gen = torch.Generator().manual_seed(1000 + int(t.name.split(".")[1]))
                    for part, spec in t.parts.items():
                        w.write(t.name, part, (torch.randn(spec["shape"], generator=layer_gen) * 0.02).to(
                            torch.bfloat16).flatten())
                    continue
                if routers == "per_layer" and t.name == "embed":
                    # token rows large enough to stay the larger part of the residual stream through 48 layers of
                    # random weights; at the other parts' scale the layers' common (attention-averaged) output
                    # swamps them after a few layers and every token routes alike
                    for part, spec in t.parts.items():
                        w.write(t.name, part, (torch.randn(spec["shape"], generator=g) * EMBED_SCALE).to(
                            torch.bfloat16).flatten())
                    continue
                for expert in range(t.experts or 1):
                    for part, spec in t.parts.items():
                        kind = part.split(".")[-1] if not t.name.endswith((".router", "embed")) else "w"
                        w.write(t.name, part, part_data(kind, spec["dtype"], spec["shape"]),
                                expert=expert if t.experts else None)
        w.finish()
