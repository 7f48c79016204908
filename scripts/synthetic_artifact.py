"""A synthetic artifact of a full model shape, written straight from random quantized parts (no BF16 checkpoint: 48
layers of one would not fit the GPU host's disk). Qwen3-30B-A3B by default; with `shape`, one of the shapes in
scripts/shapes/ (Qwen3-Coder-Next, DeepSeek-V2-Lite): their tensor names and shapes as transformers' classes hold them
(recorded once from a meta-device model: the GPU host has no transformers), laid out by the compiler's own family
module. Used by scripts/bench.py (GPU prefill and hybrid decode) and scripts/bench_decode.py --synthetic (CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from krasis_compile.layout import ExpertSource, Group, TensorSpec, plan_chunks
from krasis_compile.writer import ArtifactWriter
from krasis_run.models.qwen3_moe import ModelArgs, layer_tensor_names

SHAPES = Path(__file__).resolve().parent / "shapes"

SHAPE = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
             moe_intermediate_size=768, intermediate_size=6144, rope_theta=1e6, rms_norm_eps=1e-6,
             norm_topk_prob=True, max_position_embeddings=40960, tie_word_embeddings=False)


def split_quant(name: str) -> tuple[str, int]:
    """A benchmark's expert codec name -> (codec, q4 group): "q4g64" is q4 with a scale and zero per 64 columns
    (krasis-compile --q4-group 64), "q4" per 32."""
    return ("q4", 64) if name == "q4g64" else (name, 32)


EMBED_SCALE = 1e5  # with per-layer routers: every layer then routes each token its own way, near uniformly


class ShapeCheckpoint:
    """A checkpoint of names and shapes only (what a family's compile module checks while it lists the tensors):
    layer i's tensors are those of the recorded layer of the same role (`template(i)`); nothing is ever read."""

    def __init__(self, tensors: dict[str, list[int]], template):
        self.tensors, self.template = tensors, template

    def _recorded(self, name: str) -> str:
        return re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{self.template(int(m.group(1)))}.", name, count=1)

    def __contains__(self, name: str) -> bool:
        return self._recorded(name) in self.tensors

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[self._recorded(name)])


def recorded_layers(shape: str) -> int:
    return json.loads((SHAPES / f"{shape}.json").read_text())["config"]["num_hidden_layers"]


def family_shape(shape: str, layers: int) -> tuple[dict, object, dict]:
    """(config cut to `layers`, the compiler's module, recorded tensor shapes) for a shape in scripts/shapes/."""
    from krasis_compile.compile import ARCHITECTURES

    recorded = json.loads((SHAPES / f"{shape}.json").read_text())
    config = dict(recorded["config"], num_hidden_layers=layers)
    return config, ARCHITECTURES[config["architectures"][0]], recorded["tensors"]


def family_groups(shape: str, layers: int) -> tuple[dict, list[Group]]:
    config, arch, tensors = family_shape(shape, layers)
    args = arch.ModelArgs.from_hf(config)
    if config["model_type"] == "qwen3_next":  # the recorded layers 0-3: three linear-attention, one full
        def template(i: int) -> int:
            return i % config["full_attention_interval"]
    else:  # DeepSeek: the recorded dense layer 0 and MoE layer 1
        def template(i: int) -> int:
            return 0 if i < config["first_k_dense_replace"] else 1
    return config, arch.groups(ShapeCheckpoint(tensors, template), args)


def qwen3_30b_groups(layers: int) -> list[Group]:
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
    return groups


def write_synthetic(out: Path, layers: int, quant: str, sections: tuple[str, ...], dense_codec: str = "q8",
                    routers: str = "per_layer", shape: str = "qwen3-30b-a3b") -> None:
    """Random but well-scaled quantized parts: weights ~ +-0.04, norms 1, so activations stay finite. Every layer
    shares one random tensor per part (writing 48 distinct layers would take minutes), except the routers with
    routers="per_layer": one random router per layer, so each layer routes its own way (with one shared router
    a 4K prompt picked only ~31 of the 128 experts of a layer, which flatters hot experts)."""
    from tokenizers import Tokenizer, models

    if shape == "qwen3-30b-a3b":
        config, groups = dict(SHAPE, num_hidden_layers=layers), qwen3_30b_groups(layers)
    else:
        config, groups = family_groups(shape, layers)
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).to_str().encode()
    quant, q4_group = split_quant(quant)  # q4g64: every q4 matrix (experts and q4 dense) in groups of 64
    chunks = plan_chunks(groups, quant, dense_codec, sections, {"tokenizer.json": len(tokenizer)}, q4_group)
    header = {"architecture": config["architectures"][0], "config": config, "generation_config": {},
              "tokenizer": {"blob": "tokenizer.json", "config": {}, "chat_template": None},
              "quant": {"experts": quant, "dense": dense_codec, "rounding": "synthetic", "rel_l2_error": {},
                        "q4_group": q4_group},
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
