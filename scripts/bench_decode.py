"""Decode speed on a synthetic model with real Qwen3-30B-A3B layer shapes, compiled by the real compiler.

    python scripts/bench_decode.py --layers 4 --quant q4,q8 [--dense-quant q8,q4] [--kernels native,torch]
                                   [--threads N] [--vocab 32000] [--glue] [--json out.json]

Writes a random BF16 checkpoint (hidden 2048, 32/4 heads of 128, 128 experts, top-8, expert width 768,
vocab 151,936 or --vocab; --layers of them), compiles it with krasis-compile in a subprocess (its input
GB/s and peak RSS are reported), then decodes greedily with each of --kernels (native: the fused C
kernels; torch: torch's packed kernels, the reference path) and prints tok/s next to the weight bytes
read per token, the effective GB/s and this machine's read bandwidth measured right before each run
(it drifts on shared machines), so the gap is a ratio. Native decode of a Qwen3-MoE runs each step's layers in
one C call (krs_decode_layers). --glue adds the time of the model's own loop of kernel calls with the
weight-reading kernels stubbed out (the per-layer work between the calls, which the one-call step does not
have), and the one-call step against that loop, alternating in one process.
Works from a checkout: PYTHONPATH=. python3 ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPE = dict(
    vocab_size=151936, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
)


def write_checkpoint(folder: Path, layers: int, vocab: int = SHAPE["vocab_size"]) -> int:
    """Random bf16 weights in hub naming, one shard per layer; returns bytes written."""
    from tokenizers import Tokenizer, models

    folder.mkdir(parents=True, exist_ok=True)
    s, g = dict(SHAPE, vocab_size=vocab), torch.Generator().manual_seed(0)
    h, hd, e, i = s["hidden_size"], s["head_dim"], s["num_experts"], s["moe_intermediate_size"]

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(torch.bfloat16)

    total = 0

    def save(tensors: dict, name: str) -> None:
        nonlocal total
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(folder / name), metadata={"format": "pt"})

    save({"model.embed_tokens.weight": rand(s["vocab_size"], h), "lm_head.weight": rand(s["vocab_size"], h),
          "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}, "model-globals.safetensors")
    for layer in range(layers):
        p = f"model.layers.{layer}."
        t = {
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rand(s["num_attention_heads"] * hd, h),
            p + "self_attn.k_proj.weight": rand(s["num_key_value_heads"] * hd, h),
            p + "self_attn.v_proj.weight": rand(s["num_key_value_heads"] * hd, h),
            p + "self_attn.o_proj.weight": rand(h, s["num_attention_heads"] * hd),
            p + "self_attn.q_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
            p + "self_attn.k_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
            p + "mlp.gate.weight": rand(e, h),
        }
        for x in range(e):
            t[p + f"mlp.experts.{x}.gate_proj.weight"] = rand(i, h)
            t[p + f"mlp.experts.{x}.up_proj.weight"] = rand(i, h)
            t[p + f"mlp.experts.{x}.down_proj.weight"] = rand(h, i)
        save(t, f"model-layer{layer:03d}.safetensors")
    config = dict(s, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_hidden_layers=layers,
                  rope_theta=1e6, rms_norm_eps=1e-6, norm_topk_prob=True, max_position_embeddings=40960,
                  tie_word_embeddings=False, torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config))
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tok.save(str(folder / "tokenizer.json"))
    return total


def compile_artifact(folder: Path, out: Path, quant: str, dense_quant: str, **options) -> dict:
    """Compile in a fresh process so its peak RSS is the compiler's alone; options go to compile_model."""
    code = (
        "import json,sys; from krasis_compile.compile import compile_model;"
        f"r = compile_model({str(folder)!r}, {str(out)!r}, quant={quant!r}, dense_quant={dense_quant!r},"
        f" **{options!r});"
        "print(json.dumps(dict(size=r.file_size, read=r.bytes_read, seconds=r.seconds, peak_rss=r.peak_rss)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["input_gb_s"] = report["read"] / report["seconds"] / 1e9
    return report


def read_bandwidth(threads: int, gib: float = 2.0, method: str = "best") -> float:
    """GB/s reading a buffer much larger than the caches with `threads` threads (best of 5 passes): "native", the
    native kernels' streaming probe; "torch", a torch float sum; "best" (the ceiling the benchmarks report), the
    higher of the two. Neither is always the machine's: torch's sum is compute-bound on small machines, and on the
    16-core GPU host it read 98 GB/s where the native probe (before it streamed through wide vectors) read 65-84."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = 0.0
    if method in ("native", "best"):
        try:
            from krasis_run.kernels import native

            native.set_threads(threads)
            best = native.read_bandwidth(x)
        except Exception:  # no compiler: torch's alone
            method = "torch"
    if method in ("torch", "best"):
        for _ in range(5):
            start = time.perf_counter()
            x.sum()
            best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def bytes_per_token(artifact) -> int:
    """Weight bytes one decode step reads: every dense matrix, norms, routers, top-k experts, lm_head."""
    header = artifact.header
    k = header["config"]["num_experts_per_tok"]
    total = 0
    for name, t in header["tensors"].items():
        section = artifact.chunks[t["chunk"]].section
        if section == "experts_gpu" or name == "embed":
            continue  # other engine's copy; one embedding row is negligible
        if section == "experts_cpu":
            total += k * sum(_nbytes(p) for p in t["parts"].values())
        else:
            total += t["length"]
    return total


def _nbytes(part: dict) -> int:
    n = {"u8": 1, "i8": 1, "bf16": 2, "f32": 4}[part["dtype"]]
    for d in part["shape"]:
        n *= d
    return n


def bench_decode(path: Path, threads: int, prompt_len: int, tokens: int, kernel: str | None = None,
                 prefault: bool = True) -> dict:
    import krasis_run
    from krasis_run.runtime import resident_bytes

    rt = krasis_run.load(path, threads=threads, kernel=kernel, prefault=prefault)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, rt.args.vocab_size, (prompt_len,), generator=g).tolist()
    list(rt.generate(prompt, max_new_tokens=4, stop_token_ids=set()))  # warm-up: page in, allocate
    list(rt.generate(prompt, max_new_tokens=tokens + 1, stop_token_ids=set()))
    t = rt.timings
    per_token = bytes_per_token(rt.artifact)
    return dict(
        decode_tok_s=t.decode_tok_s(), prefill_tok_s=t.prompt_tok_s(), bytes_per_token=per_token,
        effective_gb_s=per_token * t.decode_tok_s() / 1e9, kernels=rt.ops.describe(),
        resident_gib=resident_bytes() / 2**30, heap_gib=resident_bytes("RssAnon") / 2**30,
    )


def glue_ms(path: Path, threads: int, steps: int = 50, repeats: int = 7) -> dict:
    """The model loop's decode step with the weight-reading native kernels (dense rows, MoE, attention) replaced by
    stubs that zero their outputs: what remains is the per-token work between them (norms, rotary, routing, KV
    writes, residuals, Python and ctypes overhead), which a one-call step (krs_decode_layers) does not have. Median
    and best of `repeats` x `steps`."""
    import ctypes
    import statistics

    import krasis_run
    from krasis_run.kernels import native

    rt = krasis_run.load(path, threads=threads, kernel="native")
    rt.model.decode_layers = None  # the loop: the one-call step runs its kernels from C, out of the stubs' reach
    cache = rt.engine.new_cache()
    rt.engine.prefill(list(range(1, 33)), cache)
    lib = native.load()
    saved = {name: getattr(lib, name) for name in ("krs_linear", "krs_linear_multi", "krs_moe", "krs_attention")}

    def zero(ptr: int, floats: int) -> int:
        ctypes.memset(ptr, 0, floats * 4)
        return 0

    lib.krs_linear = lambda codec, x, m, k, n, w0, w1, w2, y: zero(y, m * n)
    lib.krs_linear_multi = lambda codec, x, m, k, count, ns, parts, y: zero(y, m * sum(ns[:count]))
    lib.krs_moe = lambda codec, x, m, h, i, e, k, ids, wts, ptrs, out: zero(out, m * h)
    lib.krs_attention = lambda q, t, nq, nkv, hd, kc, vc, start, out: zero(out, t * nq * hd)
    try:
        for _ in range(10):
            rt.engine.decode(3, cache)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                rt.engine.decode(3, cache)
            times.append((time.perf_counter() - start) / steps * 1e3)
    finally:
        for name, fn in saved.items():
            setattr(lib, name, fn)
    layers = rt.args.num_hidden_layers
    return dict(median_ms=statistics.median(times), best_ms=min(times), layers=layers)


def step_ab(path: Path, threads: int, blocks: int = 24, steps: int = 16, context: int = 200) -> dict | None:
    """Decode ms a token of the one-call step (krs_decode_layers) and of the model's loop of kernel calls, in one
    process on one cache, alternating blocks of `steps` tokens (the first 4 blocks dropped): on a shared machine
    only figures taken side by side compare. None where the model has no one-call step."""
    import statistics

    import krasis_run

    rt = krasis_run.load(path, threads=threads, kernel="native")
    fused = rt.model.decode_layers
    if fused is None or rt.model.step_layers() is None:
        return None
    cache = rt.engine.new_cache()
    rt.engine.prefill(list(range(1, 17)), cache)
    times: dict[bool, list[float]] = {True: [], False: []}
    for block in range(blocks):
        one_call = block % 2 == 0
        rt.model.decode_layers = fused if one_call else None
        if cache.length > context:
            cache.truncate(16)
        start = time.perf_counter()
        for _ in range(steps):
            rt.engine.decode(3, cache)
        if block >= 4:
            times[one_call].append((time.perf_counter() - start) / steps * 1e3)
    return dict(one_call_ms=statistics.median(times[True]), loop_ms=statistics.median(times[False]),
                blocks=blocks - 4, steps=steps)


def stage_bytes(artifact) -> dict[str, int]:
    """Weight bytes a decode step reads in each of krs_decode_layers' stages (all layers), for the GB/s beside each."""
    header = artifact.header
    k = header["config"]["num_experts_per_tok"]
    stage_of = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o_proj", "router": "router",
                "experts_cpu": "moe"}
    out = dict.fromkeys(stage_of.values(), 0)
    for name, t in header["tensors"].items():
        stage = stage_of.get(name.rsplit(".", 1)[-1])
        if stage == "moe":
            out[stage] += k * sum(_nbytes(p) for p in t["parts"].values())
        elif stage:
            out[stage] += t["length"]
    return out


def stage_profile(path: Path, threads: int, steps: int = 64, prompt: int = 16) -> dict | None:
    """ms a token in each stage of the one-call step (krs_decode_layers' clock), the whole engine step beside them
    (its remainder: the lm_head, sampling and Python), and each weight-reading stage's GB/s. None where the model has
    no one-call step."""
    import krasis_run
    from krasis_run.kernels import native

    rt = krasis_run.load(path, threads=threads, kernel="native")
    if rt.model.decode_layers is None or rt.model.step_layers() is None:
        return None
    cache = rt.engine.new_cache()
    rt.engine.prefill(list(range(1, prompt + 1)), cache)
    for _ in range(8):
        rt.engine.decode(3, cache)
    acc = torch.zeros(len(native.DECODE_STAGES), dtype=torch.float64)
    native.decode_stages(acc)
    try:
        start = time.perf_counter()
        for _ in range(steps):
            rt.engine.decode(3, cache)
        step_ms = (time.perf_counter() - start) / steps * 1e3
    finally:
        native.decode_stages(None)
    ms = {name: float(v) / steps * 1e3 for name, v in zip(native.DECODE_STAGES, acc, strict=True)}
    ms["rest"] = step_ms - sum(ms.values())
    weights = stage_bytes(rt.artifact)
    gb_s = {name: weights[name] / (ms[name] * 1e-3) / 1e9 for name in weights if ms[name] > 0}
    return dict(step_ms=step_ms, stage_ms=ms, stage_bytes=weights, stage_gb_s=gb_s, steps=steps)


def stage_line(stages: dict) -> str:
    return f"one-call step {stages['step_ms']:.2f} ms/token: " + ", ".join(
        f"{name} {ms:.2f} ms" + (f" ({stages['stage_gb_s'][name]:.1f} GB/s)" if name in stages["stage_gb_s"] else "")
        for name, ms in stages["stage_ms"].items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--quant", default="q4,q8",
                    help="comma-separated expert codecs (q4g64: q4 with a scale and zero per 64 columns, for experts "
                         "and any q4 dense matrix)")
    ap.add_argument("--dense-quant", default="q8", help="comma-separated dense codecs (q8, bf16, q4)")
    ap.add_argument("--kernels", default="native,torch", help="comma-separated CPU kernels to time")
    ap.add_argument("--vocab", type=int, default=SHAPE["vocab_size"], help="vocabulary (lm_head rows)")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens before decode")
    ap.add_argument("--tokens", type=int, default=16, help="decode tokens timed")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--synthetic", action="store_true",
                    help="write the artifact straight from random quantized parts (scripts/bench.py, CPU section only, "
                         "real vocabulary) instead of compiling a BF16 checkpoint: 48 layers then fit a 64 GB disk")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--no-prefault", action="store_true",
                    help="map the weights page by page on first use (krasis-run --no-prefault), not at load")
    ap.add_argument("--stages-only", action="store_true",
                    help="only the one-call step's stage clock (ms and GB/s a stage), for comparing settings")
    ap.add_argument("--glue", action="store_true",
                    help="also time the model loop's native decode step with the weight-reading kernels stubbed out "
                         "(the glue), and the one-call step against the loop in alternating blocks")
    args = ap.parse_args()

    from krasis_run.planner import physical_cores

    threads = args.threads or physical_cores()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="krasis-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "checkpoint"
    if not args.synthetic and not (folder / "config.json").exists():
        start = time.perf_counter()
        size = write_checkpoint(folder, args.layers, args.vocab)
        print(f"wrote {size / 1e9:.2f} GB synthetic checkpoint in {time.perf_counter() - start:.0f} s", flush=True)
    bandwidth = read_bandwidth(threads)
    results = dict(machine=platform.node(), cpu=platform.processor() or platform.machine(), threads=threads,
                   layers=args.layers, vocab=args.vocab, torch=torch.__version__, read_gb_s=bandwidth,
                   cpu_capability=torch.backends.cpu.get_cpu_capability(), runs=[])
    print(f"read bandwidth ({threads} threads): {bandwidth:.1f} GB/s", flush=True)
    if args.glue:  # both probes apart, over 4 GiB, at these threads and at every CPU
        cpus = sorted({threads, os.cpu_count() or threads})
        for method in ("native", "torch"):
            results[f"read_gb_s_{method}"] = probes = {n: read_bandwidth(n, 4.0, method) for n in cpus}
            print(f"read probe {method}, 4 GiB: " + ", ".join(f"{n} threads {v:.1f} GB/s" for n, v in probes.items()),
                  flush=True)
    for dense_quant in args.dense_quant.split(","):
        for quant in args.quant.split(","):
            out = work / f"bench-{quant}-{dense_quant}{'-synthetic' if args.synthetic else ''}.krs"
            compiled = None
            if args.synthetic and not out.exists():
                from scripts.synthetic_artifact import write_synthetic

                start = time.perf_counter()
                write_synthetic(out, args.layers, quant, ("cpu",), dense_quant)
                seconds = time.perf_counter() - start
                print(f"wrote {out.stat().st_size / 1e9:.1f} GB synthetic artifact in {seconds:.0f} s", flush=True)
            elif not out.exists():
                from scripts.synthetic_artifact import split_quant

                codec, group = split_quant(quant)
                compiled = compile_artifact(folder, out, codec, dense_quant, q4_group=group)
            if args.stages_only:
                stages = stage_profile(out, threads)
                print(f"{quant}/{dense_quant} " + (stage_line(stages) if stages else "no one-call step to clock"),
                      flush=True)
                continue
            for kernel in args.kernels.split(","):
                bandwidth = read_bandwidth(threads)  # beside each run: it drifts on shared machines
                decode = bench_decode(out, threads, args.prompt, args.tokens, kernel, not args.no_prefault)
                run = dict(quant=quant, dense_quant=dense_quant, kernel=kernel, compile=compiled, read_gb_s=bandwidth,
                           **decode)
                results["runs"].append(run)
                ceiling = bandwidth * 1e9 / decode["bytes_per_token"]
                line = (
                    f"{quant}/{dense_quant} {kernel}: decode {decode['decode_tok_s']:.2f} tok/s "
                    f"({decode['bytes_per_token'] / 1e6:.1f} MB/token, {decode['effective_gb_s']:.2f} GB/s effective "
                    f"= {decode['effective_gb_s'] / bandwidth:.1%} of {bandwidth:.1f} GB/s read bandwidth; "
                    f"ceiling {ceiling:.1f} tok/s) | prefill {decode['prefill_tok_s']:.1f} tok/s | "
                    f"kernels: {decode['kernels']} | resident {decode['resident_gib']:.2f} GiB "
                    f"(heap {decode['heap_gib']:.2f})"
                )
                if compiled:
                    line += (f" | compile {compiled['input_gb_s']:.3f} GB/s input, peak RSS "
                             f"{compiled['peak_rss'] / 2**30:.2f} GiB, artifact {compiled['size'] / 1e9:.2f} GB")
                    compiled = None
                print(line, flush=True)
                if args.glue and kernel == "native":
                    run["glue"] = glue = glue_ms(out, threads)
                    print(f"{quant}/{dense_quant} native model-loop glue (weight-reading kernels stubbed): "
                          f"{glue['median_ms']:.3f} ms/token median, {glue['best_ms']:.3f} best "
                          f"= {glue['best_ms'] / glue['layers']:.3f} ms/layer incl. per-token fixed costs",
                          flush=True)
                    run["stages"] = stages = stage_profile(out, threads)
                    if stages:
                        print(f"{quant}/{dense_quant} {stage_line(stages)} | read probe {bandwidth:.1f} GB/s",
                              flush=True)
                    run["step_ab"] = ab = step_ab(out, threads)
                    if ab:
                        print(f"{quant}/{dense_quant} one-call step {ab['one_call_ms']:.3f} ms/token against the model "
                              f"loop's {ab['loop_ms']:.3f} (medians of {ab['blocks']} alternating blocks of "
                              f"{ab['steps']} tokens): {ab['loop_ms'] / ab['one_call_ms']:.3f}x", flush=True)
            if args.workdir is None:
                out.unlink()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    if args.workdir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
