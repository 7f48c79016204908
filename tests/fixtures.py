"""Tiny Qwen3-MoE checkpoints built with transformers' own classes, every parameter perturbed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("textwrap.py", "json/__init__.py", "colorsys.py")]
    texts.append("Grüße, naïve café — 日本語のテキスト。 emoji 🙂🚀 and ünïcödé text.")
    return texts


def make_tokenizer(folder: Path, vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "chat_template": CHAT_TEMPLATE, "model_max_length": 512,
    }))
    return tok


def tiny_config(**overrides):
    from transformers import Qwen3MoeConfig

    base = dict(
        vocab_size=400, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    base.update(overrides)
    return Qwen3MoeConfig(**base)


def make_model(config, seed: int = 0):
    """A Qwen3MoeForCausalLM whose every parameter (norms included) is randomly perturbed, rounded to bf16.

    Shaped like a trained model where it matters for error bounds: unit-scale embeddings carry the
    residual stream and each block adds a smaller update (o_proj / down_proj at half scale), so a
    0.5% weight error doesn't turn into a different model, while dropping any one norm still moves
    the logits by several percent.
    """
    from transformers import Qwen3MoeForCausalLM

    return perturbed(Qwen3MoeForCausalLM, config, seed)


def perturbed(model_class, config, seed: int = 0):
    """A model_class(config) perturbed as make_model describes (every parameter, norms included, bf16 values); the
    seed is set before the model is built, so its values depend on the seed alone."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms (and biases): around 1, different per channel
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                scale = 0.5 if ("o_proj" in name or "down_proj" in name) else 1.0
                p.copy_(torch.randn_like(p) * scale / p.shape[-1] ** 0.5)
            p.copy_(p.to(torch.bfloat16).float())  # the checkpoint stores bf16: oracle runs on the same values
    return model


def save_checkpoint(model, folder: Path, expert_layout: str = "per_expert") -> Path:
    """Save as bf16 safetensors with experts per-expert (hub style) or stacked (gate_up_proj/down_proj)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)  # config.json, generation_config.json, weights
    if expert_layout == "stacked":
        for f in folder.glob("*.safetensors"):
            f.unlink()
        tensors = {n: p.detach().to(torch.bfloat16).contiguous() for n, p in model.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        from safetensors.torch import load_file

        for f in folder.glob("*.safetensors"):
            tensors = {n: t.to(torch.bfloat16).contiguous() for n, t in load_file(str(f)).items()}
            save_file(tensors, str(f), metadata={"format": "pt"})
    return folder


def tiny_deepseek_v2_config(**overrides):
    """A tiny DeepSeek-V2(-Lite) shape: MLA without q_lora, a dense first layer, shared experts, yarn rope."""
    from transformers import DeepseekV2Config

    base = dict(
        vocab_size=400, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=3,
        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16,
        qk_nope_head_dim=16, topk_method="greedy", routed_scaling_factor=1.5, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32, "beta_slow": 1,
                         "original_max_position_embeddings": 128, "mscale": 0.707, "mscale_all_dim": 0.707},
    )
    base.update(overrides)
    return DeepseekV2Config(**base)


def build_deepseek_v2(folder: Path, expert_layout: str = "per_expert", seed: int = 0, **overrides):
    from transformers import DeepseekV2ForCausalLM

    config = tiny_deepseek_v2_config(**overrides)
    model = perturbed(DeepseekV2ForCausalLM, config, seed)
    save_checkpoint(model, folder, expert_layout)
    make_tokenizer(folder, config.vocab_size)
    return model


def build_deepseek_v3(folder: Path, expert_layout: str = "per_expert", seed: int = 0, **overrides):
    """A tiny DeepSeek-V3 shape (q_lora, grouped sigmoid routing with its correction bias, which is a buffer, not a
    parameter: set here to random bf16 values too)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    base = dict(
        vocab_size=400, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=24, qk_rope_head_dim=8,
        v_head_dim=16, qk_nope_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    base.update(overrides)
    config = DeepseekV3Config(**base)
    model = perturbed(DeepseekV3ForCausalLM, config, seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_((0.1 * torch.randn_like(buf)).to(torch.bfloat16).float())

    save_checkpoint(model, folder, expert_layout)
    make_tokenizer(folder, config.vocab_size)
    return model


def build_qwen3_next(folder: Path, expert_layout: str = "per_expert", seed: int = 0, **overrides):
    """A tiny Qwen3-Next: 3 Gated DeltaNet layers and 1 gated full-attention layer, partial rotary, grouped value
    heads (4 value heads per 2 key heads), routed experts plus a gated shared expert."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    base = dict(
        vocab_size=400, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
        partial_rotary_factor=0.5, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    base.update(overrides)
    config = Qwen3NextConfig(**base)
    model = perturbed(Qwen3NextForCausalLM, config, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Qwen3-Next's norms scale by 1 + w (zero-centred weights): perturbed around 0, as trained ones are, or
            # every norm would double the activations; the gated norm inside linear attention scales by w itself
            if name.endswith("norm.weight") and "linear_attn" not in name:
                p.copy_((0.2 * torch.randn_like(p)).to(torch.bfloat16).float())
    save_checkpoint(model, folder, expert_layout)
    make_tokenizer(folder, config.vocab_size)
    return model


def build_qwen3_5_moe(folder: Path, expert_layout: str = "per_expert", seed: int = 0, hub: bool = False, **overrides):
    """A tiny Qwen3.5-MoE, Qwen3-Next's shape with split linear-attention projections: the text model
    (Qwen3_5MoeForCausalLM), or with hub=True the hub's Qwen3_5MoeForConditionalGeneration (a tiny vision tower, the
    text model under model.language_model.)."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

    base = dict(
        vocab_size=400, hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        num_experts_per_tok=2, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "mrope_section": [2, 1, 1]},
    )
    base.update(overrides)
    if hub:
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2)
        model_class, config = Qwen3_5MoeForConditionalGeneration, Qwen3_5MoeConfig(text_config=base,
                                                                                   vision_config=vision)
    else:
        model_class, config = Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig(**base)
    model = perturbed(model_class, config, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # zero-centred norms, as for Qwen3-Next
            if name.endswith("norm.weight") and "linear_attn" not in name and "visual" not in name:
                p.copy_((0.2 * torch.randn_like(p)).to(torch.bfloat16).float())
    save_checkpoint(model, folder, expert_layout)
    make_tokenizer(folder, 400)
    return model


def build(folder: Path, expert_layout: str = "per_expert", seed: int = 0, **overrides):
    config = tiny_config(**overrides)
    model = make_model(config, seed)
    save_checkpoint(model, folder, expert_layout)
    make_tokenizer(folder, config.vocab_size)
    return model


def prompt_ids(vocab: int, n: int = 48, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def stepwise_logits(rt, ids: list[int], steps: int = 12):
    """Greedy decode through the KV cache, and the same positions recomputed in one pass: (cached, full)."""
    cache = rt.engine.new_cache()
    step_logits = [rt.engine.prefill(ids, cache)]
    tokens = list(ids)
    for _ in range(steps):
        tokens.append(int(torch.argmax(step_logits[-1])))
        step_logits.append(rt.engine.decode(tokens[-1], cache))
    return torch.stack(step_logits).numpy(), rt.logits(tokens)[len(ids) - 1:]


def stop_process(proc) -> None:
    """SIGINT, then kill if it doesn't exit in 30 s."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def run_interpreted(test_file: str, class_name: str, timeout: int = 600) -> None:
    """Run `class_name` of `test_file` in a child pytest with TRITON_INTERPRET=1: Triton reads the variable when
    it is first imported (its own tl.* helpers are jitted then), and turning it on here would make the CUDA tests
    of other modules run interpreted. The class is collected only there (python_classes=class_name)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", f"python_classes={class_name}",
           f"{test_file}::{class_name}"]
    proc = subprocess.run(cmd, env=env, cwd=Path(test_file).parents[1], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
