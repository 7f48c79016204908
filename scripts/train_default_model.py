"""Train the tiny Qwen3-MoE checkpoint that krasis ships as its embedded default model.

The model is a real `Qwen3MoeForCausalLM` (4 layers, hidden 128, 8 experts, top-2) with a
4096-token byte-level BPE tokenizer, trained from scratch on the Python standard library
sources of the running interpreter. It is small enough to train on a laptop CPU in ~20 minutes
and to keep in the repo (~6 MB in bfloat16), yet it produces Python-looking text, so a
compile + generate round trip can be checked by eye and against transformers.

Run from the repo root:

    python scripts/train_default_model.py                       # -> krasis_compile/default_model/
    python scripts/train_default_model.py --steps 50 --out /tmp/m   # quick smoke run (~1 min)

Everything is deterministic: the file list is sorted by relative path, the held-out split is
a hash of that path, and all random state comes from fixed seeds. `stdlib_files(split)` is
importable (no side effects on import) so evaluation scripts can reuse the same split:

    spec = importlib.util.spec_from_file_location("tdm", "scripts/train_default_model.py")
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
import zlib
from pathlib import Path

import torch

SEQ_LEN = 256
VOCAB_SIZE = 4096
EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT, "<|im_start|>", "<|im_end|>"]
SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages"}
HELDOUT_MODULUS = 20
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "krasis_compile" / "default_model"

# Qwen-style ChatML; the model never saw chat data, the template only exercises the plumbing.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- data


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relative_path: str) -> bool:
    # A hash of the path (not a random draw) keeps the split stable across runs and machines.
    return zlib.crc32(relative_path.encode()) % HELDOUT_MODULUS == 0


def stdlib_files(split: str) -> list[Path]:
    """Standard-library `*.py` files of this interpreter, sorted by relative path.

    split is "train" or "heldout"; test suites and vendored packages are skipped.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if SKIPPED_DIRS & set(relative.parts[:-1]):
            continue
        if is_heldout(relative.as_posix()) == (split == "heldout"):
            files.append(relative)
    return [root / relative for relative in sorted(files, key=lambda p: p.as_posix())]


def read_source(path: Path) -> str:
    # A few stdlib files are not valid UTF-8; replacing bad bytes beats dropping the file.
    return path.read_text(encoding="utf-8", errors="replace")


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(files: list[Path]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        # Seed all 256 byte symbols so any input (even unseen bytes) is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((read_source(path) for path in files), trainer=trainer)
    return tokenizer


def token_stream(tokenizer, files: list[Path]) -> torch.Tensor:
    """All files encoded and concatenated, each followed by <|endoftext|>, as one 1-D tensor."""
    eot_id = tokenizer.token_to_id(EOT)
    encodings = tokenizer.encode_batch([read_source(path) for path in files])
    ids: list[int] = []
    for encoding in encodings:
        ids.extend(encoding.ids)
        ids.append(eot_id)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- model


def model_config(eot_id: int):
    from transformers import Qwen3MoeConfig

    # hidden_size % 64 == 0 and moe_intermediate_size % 32 == 0: krasis kernels tile on these.
    return Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=1024,
        rope_theta=10000,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
        # Adds the load-balancing loss (router_aux_loss_coef, default 0.001) so experts all get used.
        output_router_logits=True,
    )


def build_model(eot_id: int, seed: int):
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(model_config(eot_id)).float()


# ----------------------------------------------------------------------------- training


def random_batch(stream: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - SEQ_LEN, (batch_size,), generator=generator)
    return torch.stack([stream[start : start + SEQ_LEN] for start in starts.tolist()])


def learning_rate(step: int, steps: int, peak_lr: float, warmup: int) -> float:
    # Linear warmup, then cosine decay to 10% of peak.
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, peak_lr: float) -> torch.optim.Optimizer:
    # No weight decay on norms (1-D) - standard for transformers.
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.95), eps=1e-8)


def lm_loss(output, model) -> float:
    """The language-model part of the loss (the returned loss also holds coef * aux_loss)."""
    if output.aux_loss is None:
        return output.loss.item()
    return (output.loss - model.router_aux_loss_coef * output.aux_loss).item()


def train(model, stream: torch.Tensor, args: argparse.Namespace) -> float:
    """Runs args.steps AdamW steps; returns the mean LM loss of the last `args.log_every` steps."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = make_optimizer(model, args.lr)
    model.train()
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        batch = random_batch(stream, args.batch_size, generator)
        output = model(input_ids=batch, labels=batch)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [lm_loss(output, model)])[-args.log_every :]
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            print(
                f"step {step + 1:5d}/{args.steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {(step + 1) / elapsed:.2f} steps/s",
                flush=True,
            )
    return sum(recent) / len(recent)


# ----------------------------------------------------------------------------- evaluation


def evaluation_batches(stream: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """num_sequences windows of SEQ_LEN tokens, evenly spaced over the stream (deterministic)."""
    stride = (len(stream) - SEQ_LEN) // num_sequences
    return torch.stack([stream[i * stride : i * stride + SEQ_LEN] for i in range(num_sequences)])


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, num_sequences: int = 64, batch_size: int = 16) -> float:
    model.eval()
    sequences = evaluation_batches(stream, num_sequences)
    losses = []
    for batch in sequences.split(batch_size):
        output = model(input_ids=batch, labels=batch, output_router_logits=False)
        losses.append(output.loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, sample: bool = False) -> str:
    model.eval()
    input_ids = torch.tensor([tokenizer.encode(prompt).ids])
    torch.manual_seed(0)  # only matters for the sampled variant
    options = {"do_sample": True, "temperature": 0.8, "top_k": 40} if sample else {"do_sample": False}
    output = model.generate(input_ids, max_new_tokens=max_new_tokens, **options)
    return tokenizer.decode(output[0].tolist(), skip_special_tokens=False)


# ----------------------------------------------------------------------------- saving


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "add_prefix_space": False,
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def add_legacy_config_keys(config_path: Path) -> None:
    # transformers 5 writes num_local_experts / rope_parameters; published Qwen3-MoE checkpoints use
    # num_experts / rope_theta. Writing both lets readers of either convention load this file.
    config = json.loads(config_path.read_text())
    config["num_experts"] = config["num_local_experts"]
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    config_path.write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")


def check_expert_names(weights_path: Path) -> None:
    # krasis reads the per-expert layout of real Qwen3-MoE checkpoints, not transformers' fused one.
    from safetensors import safe_open

    with safe_open(str(weights_path), "pt") as weights:
        names = set(weights.keys())
        dtypes = {weights.get_tensor(name).dtype for name in names}
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in names, sorted(names)[:20]
    assert not any(name.endswith("gate_up_proj") for name in names)
    assert dtypes == {torch.bfloat16}, dtypes


def save_checkpoint(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # Sampling defaults, as Qwen ships them: greedy decoding of a 3M-parameter model loops on one line.
    model.generation_config.update(do_sample=True, temperature=0.7, top_k=40, top_p=0.95)
    model.config.output_router_logits = False  # a training-only switch; inference does not need it
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.float()  # keeps the bf16-rounded values
    (out / "model.safetensors").chmod(0o644)  # save_pretrained writes 0600; the file ships in the wheel
    add_legacy_config_keys(out / "config.json")
    check_expert_names(out / "model.safetensors")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")


def format_samples(samples: dict[str, str]) -> str:
    blocks = [f"{label}:\n\n```python\n{text}\n```" for label, text in samples.items()]
    return "\n\n".join(blocks)


def write_readme(out: Path, args: argparse.Namespace, results: dict) -> None:
    text = f"""# krasis embedded default model

A tiny `Qwen3MoeForCausalLM` trained from scratch by `scripts/train_default_model.py`, shipped so that
krasis can be compiled and run end to end without downloading anything. It writes Python-looking
text; it is not useful for anything else.

- Architecture: 4 layers, hidden 128, 4 query / 2 KV heads of dim 32, 8 experts (width 128), top-2,
  untied embeddings, vocab 4096 (byte-level BPE), {results["parameters"]:,} parameters, bfloat16.
- Data: the `*.py` sources of the Python {results["python"]} standard library (no tests, idlelib,
  lib2to3, site-packages); a file is held out iff `zlib.crc32(relative_path) % 20 == 0`.
  Train: {results["train_files"]} files / {results["train_tokens"]:,} tokens; held out:
  {results["heldout_files"]} files / {results["heldout_tokens"]:,} tokens.
- Training: {args.steps} AdamW steps, batch {args.batch_size} x {SEQ_LEN} tokens, peak lr {args.lr}
  (warmup {args.warmup}, cosine to 10%), float32 on CPU, seed {args.seed}, {results["minutes"]:.1f} min.
- Final train loss: {results["train_loss"]:.3f}. Held-out loss: {results["heldout_loss"]:.3f}
  (perplexity {math.exp(results["heldout_loss"]):.1f}) on 64 x {SEQ_LEN}-token windows.

Rebuild (from the repo root; the weights depend on the interpreter's stdlib version and thread count):

    python scripts/train_default_model.py --steps {args.steps} --batch-size {args.batch_size} --lr {args.lr} \\
        --warmup {args.warmup} --seed {args.seed} --threads {args.threads}

Greedy continuations of the shipped (bf16) weights, computed with transformers in float32. A prompt that
ends in a space, like `def `, ends on the lone byte-level space token, which in training only precedes
runs of spaces, so the model answers with aligned comments; end prompts on a word instead.

{format_samples(results["samples"])}
"""
    (out / "README.md").write_text(text)


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1234)
    # One thread: on a shared 2-core box, two OpenMP threads ran 2x slower. Results depend on it (summation
    # order), so keep it fixed to reproduce the shipped weights bit for bit.
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def sample_texts(model, tokenizer) -> dict[str, str]:
    # A prompt ending in a space ("def ") ends on the lone "Ġ" token, which in byte-level BPE
    # only precedes runs of spaces (aligned comments), so the model continues with comments.
    # Prompts ending on a word ("def", "def main") show what the model actually learned.
    return {
        "greedy, prompt 'def '": generate_text(model, tokenizer, "def ", 80),
        "greedy, prompt 'import '": generate_text(model, tokenizer, "import ", 60),
        "greedy, prompt 'def'": generate_text(model, tokenizer, "def", 80),
        "greedy, prompt 'import os\\n\\n\\ndef main'": generate_text(model, tokenizer, "import os\n\n\ndef main", 80),
        "sampled (T=0.8, top-k 40, seed 0), prompt 'def'": generate_text(model, tokenizer, "def", 120, sample=True),
    }


def main() -> None:
    import platform

    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_files, heldout_files = stdlib_files("train"), stdlib_files("heldout")
    print(f"{len(train_files)} train files, {len(heldout_files)} held-out files from {stdlib_root()}")

    tokenizer = train_tokenizer(train_files)
    train_stream = token_stream(tokenizer, train_files)
    heldout_stream = token_stream(tokenizer, heldout_files)
    print(f"{len(train_stream):,} train tokens, {len(heldout_stream):,} held-out tokens")

    model = build_model(tokenizer.token_to_id(EOT), args.seed)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{parameters:,} parameters")

    start = time.perf_counter()
    train_loss = train(model, train_stream, args)
    minutes = (time.perf_counter() - start) / 60

    # Saving rounds the weights to bfloat16 in place, so everything below measures the shipped weights.
    save_checkpoint(model, tokenizer, args.out)
    loss = heldout_loss(model, heldout_stream)
    print(f"train loss {train_loss:.4f}  held-out loss {loss:.4f}  perplexity {math.exp(loss):.2f}")
    samples = sample_texts(model, tokenizer)
    for prompt, text in samples.items():
        print(f"----- {prompt}\n{text}\n")

    results = {
        "parameters": parameters,
        "python": platform.python_version(),
        "train_files": len(train_files),
        "heldout_files": len(heldout_files),
        "train_tokens": len(train_stream),
        "heldout_tokens": len(heldout_stream),
        "minutes": minutes,
        "train_loss": train_loss,
        "heldout_loss": loss,
        "samples": samples,
    }
    write_readme(args.out, args, results)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
