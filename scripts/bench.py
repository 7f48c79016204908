"""GPU streaming prefill and hybrid decode on a full model shape (Qwen3-30B-A3B by default; --shape
qwen3-coder-next or deepseek-v2-lite). Run on the GPU host.

    python3 scripts/bench.py [--shape S] [--layers 48] [--prompts 4096,16384,32768] [--budgets 16,whole]
                             [--sections gpu,cpu] [--decode-budgets 16,whole] [--scale-to N]

--layers below the shape's count writes a contiguous block of its first layers (where the whole model would not fit
the host's disk); --scale-to N then also reports each time scaled to N layers (time per layer constant).

Writes a synthetic artifact straight from random quantized tiles (no BF16 checkpoint: it would not
fit the host's disk), then for every prompt length and GPU budget measures prefill tok/s, TTFT,
PCIe GB/s achieved, the share of the copy hidden under compute and peak VRAM, each next to its floor
(bytes streamed / measured pinned PCIe rate, GEMM FLOPs / measured GEMM rate, attention FLOPs /
measured attention rate). Decode: 64 tokens after a 4K-token prompt, 3 runs, for each placement
(`cpu`: all on the host; `experts_in_ram`: every expert on the CPU, the rest on the GPU; `budget`: the
planner's split; `all_gpu`), beside the bound CPU bytes / host read GB/s + GPU bytes / HBM GB/s.
A JSON record goes to bench/results/<date>-<device>[tag].json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import krasis_run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/ as a package, from a checkout
from scripts.synthetic_artifact import recorded_layers, write_synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
def median_ms(fn, repeat: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure_ceilings(rt) -> dict:
    """Pinned (registered mapping) host->device GB/s on a real layer, bf16 GEMM TFLOP/s, attention TFLOP/s."""
    streamer = rt.prefill_engine.streamer
    layer = streamer.streamed[0] if streamer.streamed else streamer.layers[0]
    host = torch.empty_like(streamer.host[layer]).pin_memory()  # pinned, as the streamed (registered) layers are
    dev = torch.empty_like(host, device="cuda")
    copy_ms = median_ms(lambda: dev.copy_(host, non_blocking=True))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gemm_ms = median_ms(lambda: a @ a)
    t = 8192
    q = torch.randn(1, 32, t, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, t, 128, device="cuda", dtype=torch.bfloat16)
    attn_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True))
    return dict(pcie_gb_s=host.numel() / copy_ms / 1e6, gemm_tflops=2 * 8192**3 / gemm_ms / 1e9,
                attention_tflops=2 * t * t * 32 * 128 / attn_ms / 1e9)


def floors(rt, prompt: int, bytes_streamed: int, ceil: dict) -> dict:
    """Copy, GEMM and attention floors of one prefill: the dense matrices (all but the embeddings and lm_head) and
    k routed experts per MoE layer per token; causal attention on the layers that attend over a cache (the
    linear-attention layers' delta rule is not counted)."""
    a, header = rt.args, rt.artifact.header
    dense = 0
    for name, spec in header["tensors"].items():
        section = rt.artifact.chunks[spec["chunk"]].section
        if section in ("experts_gpu", "experts_cpu") or name in ("embed", "lm_head") or len(spec["shape"]) != 2:
            continue
        dense += spec["shape"][0] * spec["shape"][1]
    moe_layers = sum(a.is_sparse(i) for i in range(a.num_hidden_layers))
    flops = 2 * prompt * (dense + moe_layers * a.num_experts_per_tok * 3 * a.moe_intermediate_size * a.hidden_size)
    qk = getattr(a, "qk_nope_head_dim", 0) + getattr(a, "qk_rope_head_dim", 0) or a.head_dim
    v = getattr(a, "v_head_dim", 0) or a.head_dim
    attn = prompt * prompt * a.num_attention_heads * (qk + v) * sum(rt.model.cache_layout.kv_layers)  # causal half
    return dict(copy_s=bytes_streamed / ceil["pcie_gb_s"] / 1e9, gemm_s=flops / ceil["gemm_tflops"] / 1e12,
                attention_s=attn / ceil["attention_tflops"] / 1e12)


def run_prefill(rt, prompt: int, repeat: int = 2) -> dict:
    ids = torch.randint(0, rt.args.vocab_size, (prompt,), generator=torch.Generator().manual_seed(prompt)).tolist()
    engine = rt.prefill_engine
    best = None
    for _ in range(repeat):
        torch.cuda.reset_peak_memory_stats()
        cache = rt.engine.new_cache(prompt + 1)
        start = time.perf_counter()
        logits = engine.prefill(ids, cache)
        int(torch.argmax(logits))  # the first token exists: TTFT
        ttft = time.perf_counter() - start
        stats = engine.stats
        row = dict(prompt_tokens=prompt, ttft_s=ttft, prefill_tok_s=prompt / ttft, bytes_streamed=stats.bytes_streamed,
                   copy_s=stats.copy_seconds, peak_vram_gib=torch.cuda.max_memory_allocated() / 2**30,
                   pcie_gbps=stats.bytes_streamed / stats.copy_seconds / 1e9 if stats.copy_seconds else 0.0)
        # the planner's workspace must bound what the prefill allocates beyond the weights and stream buffers
        plan = rt.placement.vram_plan
        weights = sum(plan.get(k, 0) for k in ("dense", "stream_buffers", "resident_experts"))
        row.update(workspace_planned_gib=plan.get("workspace", 0) / 2**30,
                   workspace_used_gib=row["peak_vram_gib"] - weights / 2**30)
        if best is None or row["ttft_s"] < best["ttft_s"]:
            best = row
    return best


def profile(rt, prompt: int) -> None:
    """Top GPU kernels of one prefill, to see where the time over the floor goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ids = torch.randint(0, rt.args.vocab_size, (prompt,), generator=torch.Generator().manual_seed(7)).tolist()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        rt.prefill_engine.prefill(ids, rt.engine.new_cache(prompt + 1))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=60), flush=True)


DECODE_PROMPT = 4096


def source_hash() -> str:
    """sha256 (16 hex digits) of the runtime's sources: names the code that ran whatever git says."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((ROOT / "krasis_run").rglob("*")):
        if path.suffix in (".py", ".c", ".inc") and "_build" not in path.parts:
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def decode_speed(rt, runs: int = 3, tokens: int = 64) -> list[float]:
    """Decode tok/s of `tokens` greedy tokens after a DECODE_PROMPT-token GPU prefill, `runs` times."""
    ids = torch.randint(0, rt.args.vocab_size, (DECODE_PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    # warm-up, as llama-bench's: on a fresh machine the first decode step compiles the Triton kernels (3-5 s; their
    # disk cache serves every later process), which is no part of a decode speed
    list(rt.generate(ids[:16], max_new_tokens=4, stop_token_ids=set()))
    speeds = []
    for _ in range(runs):
        if hasattr(rt.engine, "gpu_step_log"):
            rt.engine.gpu_step_log = []  # the GPU's own time of each replayed step (CUDA events)
        out = list(rt.generate(ids, max_new_tokens=tokens + 1, stop_token_ids=set()))
        speeds.append(rt.timings.decode_tok_s())
        log = sorted(getattr(rt.engine, "step_log", []))
        if log:  # where a run's time goes beyond its steady step: the first step, the slowest
            first = rt.engine.step_log[0]
            gpu = sorted(getattr(rt.engine, "gpu_step_log", None) or [0])
            print(f"  decode steps (ms): first {1e3 * first:.2f}, median {1e3 * log[len(log) // 2]:.3f}, "
                  f"min {1e3 * log[0]:.3f}, max of the rest {1e3 * max(rt.engine.step_log[1:] or [0]):.2f}, "
                  f"sum {1e3 * sum(log):.1f}; GPU median {1e3 * gpu[len(gpu) // 2]:.3f}, min {1e3 * gpu[0]:.3f}; "
                  f"tokens {1e3 / speeds[-1]:.3f} ms each (first {out[:4]}, distinct {len(set(out))})", flush=True)
    return speeds


def routing_spread(rt) -> dict:
    """How the last prefill spread its picks per layer: experts picked at least once, and the share of the picks
    that went to the most-picked quarter of the experts (0.25 = uniform). Hot experts pay off when it is high."""
    counts = [c.float() for c in rt.prefill_engine.ops.routing_counts.values()]
    if not counts:
        return {}
    quarter = counts[0].numel() // 4
    top = [float(c.sort(descending=True).values[:quarter].sum() / c.sum()) for c in counts]
    picked = sum(int((c > 0).sum()) for c in counts) / len(counts)
    return dict(experts_picked=picked, top_quarter_share=sum(top) / len(top))


def profile_decode(rt, steps: int = 8) -> None:
    """GPU kernels of `steps` decode steps (after capture and warm-up), averaged per call: where a step's time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ids = torch.randint(0, rt.args.vocab_size, (DECODE_PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    cache = rt.engine.new_cache(DECODE_PROMPT + steps + 8)
    token = int(torch.argmax(rt.engine.prefill(ids, cache)))
    for _ in range(3):
        rt.engine.decode(token, cache)
    start = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            rt.engine.decode(token, cache)
    wall = (time.perf_counter() - start) / steps
    print(f"profile: {wall * 1e3:.2f} ms a step (profiler on)", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70), flush=True)


def hbm_gb_s() -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second."""
    a = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / median_ms(lambda: b.copy_(a)) / 1e6


def host_read_gb_s() -> float:
    from scripts.bench_decode import read_bandwidth

    return read_bandwidth(torch.get_num_threads())


def decode_bytes(rt, mode: str) -> dict[str, float]:
    """Bytes one decode step reads on each side: weights, plus the K/V of the DECODE_PROMPT context."""
    from krasis_run.planner import _dense_vram
    from scripts.bench_decode import bytes_per_token

    kv = rt.model.cache_layout.bytes(DECODE_PROMPT)  # K and V of the prompt (or states), read once per step
    if mode == "cpu":
        return dict(cpu=bytes_per_token(rt.artifact) + kv, gpu=0.0)
    experts = rt.engine.expert_bytes_per_token(measured=True)
    return dict(cpu=experts["cpu"], gpu=experts["gpu"] + _dense_vram(rt.artifact) + kv)


def run_decode(path: Path, budgets: list[str], runs: int, bandwidth: dict, modes: set[str] | None = None,
               remote_shares: tuple[float, ...] = (0.4,), profile_modes: tuple[str, ...] = (),
               context: int = 0) -> list[dict]:
    """The decode placements of issue 5: all on the CPU, every expert in RAM, the budget's, all on the GPU. `context`:
    the KV cache (and prefill workspace) reserved, default the prompt and its answer."""
    from krasis_run.engine import CpuEngine

    rows = []
    context = context or DECODE_PROMPT + 128
    for gib in budgets:
        cases = [("cpu", None, 0.0), ("experts_in_ram", 0, 0.0)]
        cases += [("experts_in_ram_pcie", 0, share) for share in remote_shares]
        cases += [("budget_layers", None, 0.0)] + [("budget", None, share) for share in remote_shares]
        for mode, cap, share in cases if gib != "whole" else [("all_gpu", None, 0.0)]:
            if modes and mode not in modes:
                continue
            budget = None if gib == "whole" else f"{gib}GiB"
            # budget_layers: whole expert layers only; budget: plus the last prompt's hottest experts in the VRAM
            # the prefill workspace leaves idle during decode
            # experts_in_ram_pcie: every expert still in RAM, but the GPU computes ~40% of the picks by reading
            # those experts over PCIe (zero-copy) while the CPU computes the rest; budget does the same for the
            # picks its hot experts miss
            rt = krasis_run.load(path, device="cuda", gpu_budget=budget, context=context, max_resident_layers=cap,
                                 hot_experts=mode == "budget", remote_share=share)
            if mode == "cpu":  # GPU prefill into a pinned host cache, then the CPU engine decodes
                rt.engine = CpuEngine(rt.model)
                rt.engine.pin_cache = True
            elif rt.engine.mode != mode.removesuffix("_layers").removesuffix("_pcie"):
                print(f"decode {mode}: the planner chose {rt.engine.mode} at {gib} GiB; skipped", flush=True)
                rt.close()
                continue
            speeds = decode_speed(rt, runs)
            split = {}
            if mode != "cpu":  # per token: host waiting for the GPU's part, CPU experts, the whole step (ms)
                t = rt.engine.timing
                keys = ("gpu_wait_s", "cpu_experts_s", "step_s")
                split = {k: round(1e3 * t[k] / max(1, t["steps"]), 3) for k in keys}
                split["cpu_picks"] = round(t["cpu_picks"] / max(1, t["steps"]), 1)  # expert reads a token, CPU
            nbytes = decode_bytes(rt, mode)
            bound_s = nbytes["cpu"] / bandwidth["host_read_gb_s"] / 1e9 + nbytes["gpu"] / bandwidth["hbm_gb_s"] / 1e9
            row = dict(gpu_budget_gib=None if gib == "whole" else float(gib), mode=mode, remote_share=share,
                       context=context,
                       decode_tok_s=sorted(speeds)[len(speeds) // 2], runs=speeds,
                       resident_layers=len(rt.placement.resident_layers), cpu_bytes_per_token=nbytes["cpu"],
                       gpu_bytes_per_token=nbytes["gpu"], bound_tok_s=1 / bound_s, ms_per_token=split,
                       hot_experts=getattr(rt.engine, "hot_stats", {}), routing=routing_spread(rt),
                       first_step_setup=getattr(rt.engine, "setup", {}),
                       one_graph_step=getattr(rt.engine, "flags", None) is not None)
            rows.append(row)
            print(f"decode {mode:>14} (remote {share}) budget {gib:>5}: {row['decode_tok_s']:6.1f} tok/s "
                  f"{[round(v) for v in speeds]} "
                  f"(bound {row['bound_tok_s']:.0f} tok/s = {row['decode_tok_s'] * bound_s:.0%}; CPU "
                  f"{nbytes['cpu'] / 1e6:.0f} MB + GPU {nbytes['gpu'] / 1e6:.0f} MB per token, "
                  f"{row['resident_layers']} layers resident, hot {row['hot_experts']}, routing {row['routing']}, "
                  f"one graph a step {row['one_graph_step']}, first step setup {row['first_step_setup']}) "
                  f"ms/token {split}", flush=True)
            if mode in profile_modes:
                profile_decode(rt)
            rt.close()
            del rt
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=["qwen3-30b-a3b", "qwen3-coder-next",
                                                                  "deepseek-v2-lite"])
    ap.add_argument("--layers", type=int, default=0, help="the first N layers of the shape (default: all)")
    ap.add_argument("--scale-to", type=int, default=0, help="also report times scaled to this many layers")
    ap.add_argument("--max-resident", type=int, default=None, help="cap on the expert layers kept in VRAM")
    ap.add_argument("--quant", default="q4")
    ap.add_argument("--dense-quant", default="q8", help="the CPU copy's dense codec in the synthetic artifact")
    ap.add_argument("--routers", choices=["per_layer", "shared"], default="per_layer",
                    help="synthetic routers: one random router per layer, or one for all (runs up to 23)")
    ap.add_argument("--sections", default="gpu,cpu")
    ap.add_argument("--prompts", default="4096,16384,32768")
    ap.add_argument("--budgets", default="16,whole", help="GiB values and/or 'whole'")
    ap.add_argument("--artifact", type=Path, default=Path("/tmp/krasis-bench.krs"))
    ap.add_argument("--decode-runs", type=int, default=3)
    ap.add_argument("--decode-budgets", default="16,whole", help="GiB values and/or 'whole' ('' skips decode)")
    ap.add_argument("--remote-shares", default="0.3", help="remote_share values for the modes that use it")
    ap.add_argument("--decode-modes", default="", help="only these (cpu,experts_in_ram,budget_layers,budget,all_gpu)")
    ap.add_argument("--prefill-context", choices=["prompt", "max"], default="prompt",
                    help="KV cache reserved per prefill run: prompt + 64 tokens, or the longest prompt's")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--profile", type=int, default=0, help="also profile one prefill of this many tokens")
    ap.add_argument("--profile-decode", default="", help="decode modes whose steps to profile (kernel table)")
    ap.add_argument("--decode-context", type=int, default=0,
                    help="KV cache reserved for decode (default: the 4K prompt + 128; krasis-run's own default: 32768)")
    ap.add_argument("--attention", default="", help="PROGRAMS,BLOCK,WARPS of decode attention (default: decode_gpu's)")
    ap.add_argument("--dense-gpu", choices=["q8", "bf16"], default="q8",
                    help="dense matrices in VRAM as stored (q8 rows) or dequantized to bf16 (the layout before)")
    ap.add_argument("--linear-q8", default="",
                    help="BLOCK_N,BLOCK_K,WARPS,ACC2D of the q8 GEMV (default: decode_gpu's)")
    args = ap.parse_args()
    import krasis_run.planner
    from krasis_run.kernels import decode_gpu

    krasis_run.planner.GPU_Q8_DENSE = args.dense_gpu == "q8"
    if args.attention:
        decode_gpu.ATTN_PROGRAMS, decode_gpu.ATTN_BLOCK, decode_gpu.ATTN_WARPS = map(int, args.attention.split(","))
    if args.linear_q8:
        bn, bk, warps, acc2d = map(int, args.linear_q8.split(","))
        decode_gpu.LINEAR_Q8_BLOCK_N, decode_gpu.LINEAR_Q8_BLOCK_K, decode_gpu.LINEAR_Q8_WARPS = bn, bk, warps
        decode_gpu.LINEAR_Q8_ACC2D = bool(acc2d)

    sections = tuple(args.sections.split(","))
    full_layers = 48 if args.shape == "qwen3-30b-a3b" else recorded_layers(args.shape)
    args.layers = args.layers or full_layers
    scale = (args.scale_to or args.layers) / args.layers  # time of the whole model over the time measured
    if not args.artifact.exists():
        start = time.perf_counter()
        write_synthetic(args.artifact, args.layers, args.quant, sections, args.dense_quant, args.routers, args.shape)
        print(f"wrote {args.artifact} ({args.artifact.stat().st_size / 1e9:.1f} GB) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    device = torch.cuda.get_device_name()
    record = dict(device=device, date=datetime.date.today().isoformat(),
                  shape=args.shape, layers_measured=args.layers, scaled_to_layers=args.scale_to or args.layers,
                  quant=args.quant, routers=args.routers, dense_gpu=args.dense_gpu,
                  linear_q8=[decode_gpu.LINEAR_Q8_BLOCK_N, decode_gpu.LINEAR_Q8_BLOCK_K, decode_gpu.LINEAR_Q8_WARPS,
                             decode_gpu.LINEAR_Q8_ACC2D],
                  attention=[decode_gpu.ATTN_PROGRAMS, decode_gpu.ATTN_BLOCK, decode_gpu.ATTN_WARPS],
                  sections=list(sections), torch=torch.__version__, results=[])
    record["commit"] = os.environ.get("KRASIS_COMMIT")  # the GPU host gets a tree without git history
    if not record["commit"]:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        record["commit"] = git.stdout.strip() or None
    record["source_hash"] = source_hash()  # what ran, where the commit above can be stale (a copied tree)
    ceil = None
    prompts = [int(p) for p in args.prompts.split(",")] if args.prompts else []
    for budget in args.budgets.split(",") if prompts else []:
        gib = None if budget == "whole" else float(budget)
        # the KV cache (and workspace) are reserved for `context` tokens: the prompt and its answer, as a
        # user would set --context; --prefill-context max reserves for the longest prompt in every run
        contexts = [p + 64 for p in prompts] if args.prefill_context == "prompt" else [max(prompts) + 64] * len(prompts)
        rt = None
        for prompt, context in zip(prompts, contexts, strict=True):
            if rt is None or rt.placement.context != context:
                if rt is not None:
                    rt.close()
                    del rt
                    gc.collect()
                    torch.cuda.empty_cache()
                rt = krasis_run.load(args.artifact, device="cuda", gpu_budget=None if gib is None else f"{gib}GiB",
                                     context=context, max_resident_layers=args.max_resident)
                record.setdefault("model_shape", rt.artifact.header["config"])
                plan = rt.placement
                print(f"budget {budget}, context {context}: {len(plan.resident_layers)}/{args.layers} expert layers "
                      f"resident, plan {({k: round(v / 2**30, 2) for k, v in plan.vram_plan.items()})} GiB", flush=True)
                if ceil is None:
                    ceil = measure_ceilings(rt)
                    record["ceilings"] = ceil
                    print(f"ceilings: {ceil}", flush=True)
                run_prefill(rt, 1024, repeat=1)  # warm-up: Triton compile, allocator
            row = run_prefill(rt, prompt)
            row.update(gpu_budget_gib=gib if gib is not None else round(plan.gpu_budget / 2**30, 1), context=context,
                       resident_layers=len(plan.resident_layers), expert_layers=len(rt.prefill_engine.streamer.layers),
                       floors=floors(rt, prompt, row["bytes_streamed"], ceil),
                       prefill_tok_s_scaled=row["prefill_tok_s"] / scale)
            record["results"].append(row)
            f = row["floors"]
            floor_s = max(f["copy_s"], f["gemm_s"] + f["attention_s"])
            print(f"{prompt:6d} tok, budget {budget:>5}: {row['prefill_tok_s']:8.0f} tok/s, TTFT {row['ttft_s']:.3f} s "
                  f"(floor {floor_s:.3f} s = {floor_s / row['ttft_s']:.0%}: copy {f['copy_s']:.3f}, "
                  f"gemm {f['gemm_s']:.3f}, attention {f['attention_s']:.3f}), "
                  f"streamed {row['bytes_streamed'] / 1e9:.1f} GB at {row['pcie_gbps']:.1f} GB/s, "
                  f"peak VRAM {row['peak_vram_gib']:.1f} GiB (workspace used {row['workspace_used_gib']:.2f} of "
                  f"{row['workspace_planned_gib']:.2f} planned)"
                  + (f"; scaled to {args.scale_to} layers: {row['prefill_tok_s_scaled']:.0f} tok/s"
                     if scale != 1 else ""), flush=True)
        if args.profile and budget == args.budgets.split(",")[-1]:
            profile(rt, args.profile)
        rt.close()
        del rt
        gc.collect()
        torch.cuda.empty_cache()
    if args.decode_budgets:
        bandwidth = dict(host_read_gb_s=host_read_gb_s(), hbm_gb_s=hbm_gb_s())
        record["bandwidth"] = bandwidth
        print(f"bandwidth: {bandwidth}", flush=True)
        modes = set(args.decode_modes.split(",")) if args.decode_modes else None
        shares = tuple(float(v) for v in args.remote_shares.split(","))
        record["decode"] = run_decode(args.artifact, args.decode_budgets.split(","), args.decode_runs, bandwidth, modes,
                                      shares, tuple(args.profile_decode.split(",")) if args.profile_decode else (),
                                      args.decode_context)
        for row in record["decode"]:
            row["decode_tok_s_scaled"] = row["decode_tok_s"] / scale
            if scale != 1:
                print(f"decode {row['mode']} scaled to {args.scale_to} layers: {row['decode_tok_s_scaled']:.1f} tok/s")
        cpu = [r for r in record["decode"] if r["mode"] == "cpu"]
        if cpu:
            record["decode_tok_s"], record["decode_runs"] = cpu[0]["decode_tok_s"], cpu[0]["runs"]
    whole = {r["prompt_tokens"]: r["ttft_s"] for r in record["results"] if r["resident_layers"] == r["expert_layers"]}
    for r in record["results"]:
        if r["prompt_tokens"] in whole and r["copy_s"]:
            hidden = (r["copy_s"] + whole[r["prompt_tokens"]] - r["ttft_s"]) / r["copy_s"]
            r["copy_hidden_share"] = max(0.0, min(1.0, hidden))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{record['date']}-{device.replace(' ', '_')}{args.tag}.json"
    (args.out / name).write_text(json.dumps(record, indent=1))
    print(json.dumps(record["results"]))


if __name__ == "__main__":
    main()
