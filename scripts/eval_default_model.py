"""Quality of each codec on the embedded default model: held-out perplexity and KL against bf16.

    python scripts/eval_default_model.py [--sequences 32] [--length 256] [--json bench/results/quality.json]

Compiles krasis_compile/default_model at bf16/bf16, q8/q8, q4/q8, q4/bf16 and q4/q4 (q4 in groups of 32 and
64), runs one prefill pass per held-out sequence (Python standard library files the training script held
out), and reports perplexity, the mean KL(bf16 || codec) of the next-token distributions, top-1 agreement with bf16,
and decode tok/s of each artifact. With transformers installed it also reports the perplexity of the
original checkpoint computed by transformers (the oracle).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import krasis_run
from krasis_compile.compile import compile_model

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "krasis_compile" / "default_model"
# (experts, dense, q4 group): q4 with a scale and zero per 32 columns (the default) or per 64 (--q4-group 64)
VARIANTS = [("bf16", "bf16", 32), ("q8", "q8", 32), ("q4", "q8", 32), ("q4", "bf16", 32), ("q4", "q8", 64),
            ("q4", "q4", 32), ("q4", "q4", 64)]


def heldout_sequences(tokenizer, count: int, length: int) -> list[list[int]]:
    spec = importlib.util.spec_from_file_location("train_default_model", ROOT / "scripts" / "train_default_model.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    ids: list[int] = []
    for path in train.stdlib_files("heldout"):
        ids += tokenizer.encode(path.read_text(errors="replace")) + list(tokenizer.eos_token_ids)[:1]
        if len(ids) >= count * length:
            break
    return [ids[i * length:(i + 1) * length] for i in range(min(count, len(ids) // length))]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def decode_speed(rt, prompt: list[int], tokens: int = 64) -> float:
    list(rt.generate(prompt, max_new_tokens=4, stop_token_ids=set()))
    list(rt.generate(prompt, max_new_tokens=tokens + 1, stop_token_ids=set()))
    return rt.timings.decode_tok_s()


def oracle_perplexity(sequences: list[list[int]]) -> float | None:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
            nll -= float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
            count += len(ids) - 1
    return float(np.exp(nll / count))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="krasis-eval-"))
    results, reference = {"sequences": args.sequences, "length": args.length, "variants": []}, None
    for quant, dense, group in VARIANTS:
        path = work / f"default-{quant}-{dense}-g{group}.krs"
        compile_model(str(MODEL), path, quant=quant, dense_quant=dense, progress=False, q4_group=group)
        rt = krasis_run.load(path, threads=args.threads)
        sequences = heldout_sequences(rt.tokenizer, args.sequences, args.length)
        logprobs = [log_softmax(rt.logits(ids)[:-1].astype(np.float64)) for ids in sequences]
        nll = -sum(lp[np.arange(len(ids) - 1), ids[1:]].sum() for lp, ids in zip(logprobs, sequences, strict=True))
        ppl = float(np.exp(nll / sum(len(s) - 1 for s in sequences)))
        row = dict(quant=quant, dense_quant=dense, q4_group=group, perplexity=ppl, size_bytes=path.stat().st_size,
                   decode_tok_s=decode_speed(rt, sequences[0][:32]))
        if reference is None:
            reference = logprobs
        else:
            kl = [(np.exp(r) * (r - q)).sum(-1) for r, q in zip(reference, logprobs, strict=True)]
            agree = [(r.argmax(-1) == q.argmax(-1)) for r, q in zip(reference, logprobs, strict=True)]
            row.update(kl_vs_bf16=float(np.concatenate(kl).mean()), top1_agreement=float(np.concatenate(agree).mean()))
        results["variants"].append(row)
        print(json.dumps(row), flush=True)
        path.unlink()
    started = time.perf_counter()
    results["oracle_perplexity"] = oracle_perplexity(sequences)
    print(f"transformers (float32) perplexity: {results['oracle_perplexity']} "
          f"({time.perf_counter() - started:.0f} s)")
    print("\n| experts | dense | q4 group | perplexity | KL vs bf16 (nats) | top-1 agreement | size | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["variants"]:
        kl = f"{r['kl_vs_bf16']:.5f}" if "kl_vs_bf16" in r else "-"
        agree = f"{r['top1_agreement']:.1%}" if "top1_agreement" in r else "-"
        print(f"| {r['quant']} | {r['dense_quant']} | {r['q4_group']} | {r['perplexity']:.3f} | {kl} | {agree} | "
              f"{r['size_bytes'] / 2**20:.1f} MiB | {r['decode_tok_s']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
