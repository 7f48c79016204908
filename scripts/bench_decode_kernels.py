"""GPU decode kernels (krasis_run/kernels/decode_gpu.py) at Qwen3-30B-A3B shapes, on a CUDA machine.

    PYTHONPATH=. python scripts/bench_decode_kernels.py [--iters 50] [--codec q4,q8] [--json out.json]

moe_decode: H=2048, I=768, 128 resident experts, top-8, M=1 (and M=4); decode_attention: 32 query / 4 KV
heads of 128, capacity 40960, lengths 4096 and 32768. Each kernel is timed with CUDA events (median of
--iters), with L2 flushed before every run and the chosen experts changing between runs, so the bytes
really come from HBM. Prints time, bytes read, achieved GB/s and that as a fraction of this GPU's measured
device-to-device copy bandwidth (read + write, the practical ceiling), the torch reference's time, and
checks both outputs against the reference; then replays each in a CUDA graph with new inputs (expert ids,
length) to check that what the engine captures stays correct.

--linear-only: the q8 dense GEMV (linear_q8) at the q|k|v, o_proj and lm_head shapes against cuBLAS on bf16 weights,
for each tile shape of LINEAR_CONFIGS (also part of the default run). --linear-int8: the same GEMV given x's int8
groups (the engine's decode path) against float inputs, for each tile shape of LINEAR_Q8I_CONFIGS.

--sweep (or --sweep-only, without the rest) times q4 moe_decode at M=1 in a CUDA graph for each of SWEEP_CONFIGS
(the grouped q4 kernels' variants), whole and kernel by kernel (gate_up, down, the sum of partials), each kernel
alone in its own graph after an L2 flush.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from krasis_run.kernels.decode_glue import rms_norm_decode, route_decode
from krasis_run.kernels.decode_gpu import decode_attention, decode_attention_torch, moe_decode, moe_decode_torch
from krasis_run.models.base import rms_norm, route

HIDDEN, INTER, EXPERTS, TOPK = 2048, 768, 128, 8
HEADS, KV_HEADS, HEAD_DIM, CAPACITY = 32, 4, 128, 40960
FLUSH_BYTES = 256 << 20  # larger than any H100/H200 L2


def moe_bound(codec: str) -> float:
    """Relative L2 allowed against the float reference: q4 with int8 inputs (decode_gpu.Q4G_INT8) rounds x."""
    from krasis_run.kernels import decode_gpu

    return 1e-2 if codec == "q4" and decode_gpu.Q4G_INT8 else 1e-4


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s counting the bytes read and written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = time_it(lambda i: dst.copy_(src), 10, flush=None)
    return 2 * src.numel() / statistics.median(times) / 1e9


def time_it(fn, iters: int, flush: torch.Tensor | None) -> list[float]:
    """Seconds per call of fn(i), each call alone between two events, after an L2 flush."""
    fn(0)
    times = []
    for i in range(iters):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


Q4_GROUP = 32  # --q4-group: the columns that share a q4 scale and zero in the random tiles


def random_parts(codec: str, n: int, k: int) -> dict[str, torch.Tensor]:
    dev = "cuda"
    if codec == "q4":
        g = (EXPERTS, n, k // Q4_GROUP)
        return {"q": torch.randint(0, 256, (EXPERTS, n, k // 2), dtype=torch.uint8, device=dev),
                "scale": (0.01 * torch.rand(g, device=dev)).bfloat16(),
                "zero": (0.01 * torch.randn(g, device=dev)).bfloat16()}
    if codec == "q8":
        return {"q": torch.randint(-127, 128, (EXPERTS, n, k), dtype=torch.int8, device=dev),
                "scale": (0.001 * torch.rand(EXPERTS, n, device=dev)).bfloat16()}
    return {"w": (0.05 * torch.randn(EXPERTS, n, k, device=dev)).bfloat16()}


def expert_bytes(parts: dict[str, torch.Tensor]) -> int:
    """Bytes of one expert's slice of all parts."""
    return sum(t[0].numel() * t.element_size() for t in parts.values())


def report(name: str, seconds: list[float], nbytes: int, ceiling: float, ref_seconds: float, err: float) -> dict:
    t = statistics.median(seconds)
    row = {"kernel": name, "us": t * 1e6, "MB": nbytes / 1e6, "GB/s": nbytes / t / 1e9,
           "of_copy_bw": nbytes / t / 1e9 / ceiling, "torch_ref_us": ref_seconds * 1e6, "rel_l2_vs_ref": err}
    print(f"{name:34s} {row['us']:9.1f} us {row['MB']:8.1f} MB {row['GB/s']:8.0f} GB/s "
          f"({100 * row['of_copy_bw']:5.1f}% of copy)  torch ref {row['torch_ref_us']:9.1f} us  rel L2 {err:.1e}")
    return row


def bench_moe(codec: str, m: int, iters: int, flush: torch.Tensor, ceiling: float) -> dict:
    gate_up, down = random_parts(codec, 2 * INTER, HIDDEN), random_parts(codec, HIDDEN, INTER)
    slot_of = torch.randperm(EXPERTS, device="cuda").int()  # all resident, in shuffled slots
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.stack([torch.stack([torch.randperm(EXPERTS, device="cuda", generator=gen)[:TOPK] for _ in range(m)])
                       for _ in range(iters)]).int()  # new experts every run: no help from L2
    weights = torch.softmax(torch.randn(iters, m, TOPK, device="cuda"), -1)
    x = torch.randn(m, HIDDEN, device="cuda")
    out = torch.empty(m, HIDDEN, device="cuda")
    per_expert = expert_bytes(gate_up) + expert_bytes(down)
    nbytes = sum(per_expert * len(set(ids[i].flatten().tolist())) for i in range(iters)) // iters
    times = time_it(lambda i: moe_decode(x, ids[i], weights[i], slot_of, codec, gate_up, down, out=out), iters, flush)
    ref_times = time_it(lambda i: moe_decode_torch(x, ids[i], weights[i], slot_of, codec, gate_up, down), 5, flush)
    err = rel_l2(moe_decode(x, ids[0], weights[0], slot_of, codec, gate_up, down),
                 moe_decode_torch(x, ids[0], weights[0], slot_of, codec, gate_up, down))
    assert err < moe_bound(codec), err
    check_moe_graph(x, ids, weights, slot_of, codec, gate_up, down)
    return report(f"moe_decode {codec} M={m}", times, nbytes, ceiling, statistics.median(ref_times), err)


def check_moe_graph(x, ids, weights, slot_of, codec, gate_up, down) -> None:
    """Capture once, replay with other experts (and one non-resident), compare with the reference."""
    ids_buf, w_buf, out = ids[0].clone(), weights[0].clone(), torch.empty_like(x)
    moe_decode(x, ids_buf, w_buf, slot_of, codec, gate_up, down, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_decode(x, ids_buf, w_buf, slot_of, codec, gate_up, down, out=out)
    held = slot_of.clone()
    held[ids[1][0, 0]] = -1
    slot_of.copy_(held)
    for i in (1, 2):
        ids_buf.copy_(ids[i])
        w_buf.copy_(weights[i])
        graph.replay()
        err = rel_l2(out, moe_decode_torch(x, ids_buf, w_buf, slot_of, codec, gate_up, down))
        assert err < moe_bound(codec), f"graph replay {i}: rel L2 {err}"


def graph_time(fn, iters: int, flush: torch.Tensor) -> float:
    """Median seconds of one CUDA-graph replay of fn (one launch: the kernels' own time, no Python)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return statistics.median(time_it(lambda i: graph.replay(), iters, flush))


# the grouped q4 kernels' constants as decode_gpu has them (the measured default: 30.5 us on the H200); every sweep
# row starts from these, so each row sets them all
Q4G_BASE = dict(Q4_KERNEL="grouped", Q4G_ALIGNED=False, Q4G_BLOCK_N=2, Q4G_GROUPS=8, Q4G_UNROLL=1, Q4G_STAGES=0,
                Q4G_WARPS=1, Q4G_DOWN_BLOCK_N=4, Q4G_DOWN_GROUPS=8, Q4G_DOWN_UNROLL=1, Q4G_DOWN_STAGES=0,
                Q4G_DOWN_EXPERTS=1, Q4G_DOWN_WARPS=1, Q4G_DOWN_ATOMIC=False)
_A = dict(Q4G_ALIGNED=True)
# short names: gate_up rows (row pairs) / groups a step / unrolled steps / pipeline stages / warps; D* for down,
# DE the experts of a down program, AT the atomic down (no partials, no sum kernel)
_GU = dict(BN="Q4G_BLOCK_N", G="Q4G_GROUPS", U="Q4G_UNROLL", S="Q4G_STAGES", W="Q4G_WARPS", DBN="Q4G_DOWN_BLOCK_N",
           DG="Q4G_DOWN_GROUPS", DU="Q4G_DOWN_UNROLL", DS="Q4G_DOWN_STAGES", DE="Q4G_DOWN_EXPERTS",
           DW="Q4G_DOWN_WARPS", AT="Q4G_DOWN_ATOMIC")


def _q4g(**short) -> dict:
    """An aligned grouped config from short names (see _GU) over Q4G_BASE."""
    return {**Q4G_BASE, **_A, **{_GU[k]: v for k, v in short.items()}}


SWEEP_CONFIGS = [
    dict(Q4_KERNEL="bytes", DOWN_PAIRS=True, MOE_BLOCK_N=2, GATE_UP_BLOCK_K=512, DOWN_BLOCK_N=4, DOWN_BLOCK_K=256,
         MOE_WARPS=1),  # the per-byte kernels' best (46.6 us)
    dict(Q4G_BASE),  # the default (30.5 us): 8-byte tile loads
    _q4g(),  # the same with 16-byte tile loads
    # gate_up: more bytes in flight per program (unrolled group steps, more row pairs, pipelined loop)
    _q4g(U=2), _q4g(U=4), _q4g(U=8), _q4g(BN=4, U=4), _q4g(BN=4, U=8, W=2), _q4g(BN=8, U=8, W=4), _q4g(G=16, U=4),
    _q4g(S=3), _q4g(BN=4, S=4), _q4g(U=2, S=3),
    # down (I = 768: 24 groups): all 24 groups in one unrolled step, more rows and warps a program
    _q4g(DU=3), _q4g(DBN=16, DU=3, DW=2), _q4g(DBN=32, DU=3, DW=4), _q4g(DBN=64, DW=4), _q4g(DBN=16, DG=32, DW=2),
    _q4g(DBN=8, DG=4, DS=3),
    # down with atomics into the output (no partials, no sum kernel), or all k experts a program (no sum either)
    _q4g(AT=True), _q4g(AT=True, DBN=16, DU=3, DW=2), _q4g(AT=True, DE=2, DBN=16, DU=3, DW=4),
    _q4g(AT=True, DE=4, DBN=8, DU=3, DW=4), _q4g(DE=8, DBN=4, DU=3, DW=4), _q4g(DE=8, DBN=2, DU=3, DW=2),
    # combined guesses
    _q4g(U=8, AT=True, DBN=16, DU=3, DW=2), _q4g(BN=4, U=4, AT=True, DBN=32, DU=3, DW=4),
]


# --sweep-around: the engine's defaults (int8 gate_up, 8 experts a down program, 2 rows) and single-step changes
AROUND = dict(Q4G_BASE, Q4G_ALIGNED=True, Q4G_BLOCK_N=2, Q4G_DOWN_BLOCK_N=2, Q4G_DOWN_UNROLL=3, Q4G_DOWN_EXPERTS=8,
              Q4G_DOWN_WARPS=2)
AROUND_CONFIGS = [AROUND] + [dict(AROUND, **change) for change in (
    dict(Q4G_BLOCK_N=1), dict(Q4G_BLOCK_N=4), dict(Q4G_WARPS=2), dict(Q4G_GROUPS=4), dict(Q4G_GROUPS=16),
    dict(Q4G_DOWN_BLOCK_N=1), dict(Q4G_DOWN_BLOCK_N=4), dict(Q4G_DOWN_BLOCK_N=4, Q4G_DOWN_WARPS=4),
    dict(Q4G_DOWN_WARPS=1), dict(Q4G_DOWN_WARPS=4), dict(Q4G_DOWN_EXPERTS=4),
    dict(Q4G_DOWN_EXPERTS=4, Q4G_DOWN_WARPS=1),
    dict(Q4G_DOWN_GROUPS=4, Q4G_DOWN_UNROLL=6), dict(Q4G_DOWN_GROUPS=16, Q4G_DOWN_UNROLL=2),
    dict(Q4G_DOWN_GROUPS=32, Q4G_DOWN_UNROLL=1))]


def sweep_moe(iters: int, flush: torch.Tensor, ceiling: float, configs: list[dict] | None = None) -> list[dict]:
    """q4 moe_decode at M=1 in a CUDA graph for each of SWEEP_CONFIGS: the engine's real per-layer cost, then each
    of its kernels alone (gate_up, down, and the sum of partials where there is one), each in its own graph with L2
    flushed, to show where the time goes."""
    gate_up, down = random_parts("q4", 2 * INTER, HIDDEN), random_parts("q4", HIDDEN, INTER)
    slot_of = torch.arange(EXPERTS, device="cuda").int()
    ids = torch.randperm(EXPERTS, device="cuda")[None, :TOPK].int()
    weights = torch.softmax(torch.randn(1, TOPK, device="cuda"), -1)
    x = torch.randn(1, HIDDEN, device="cuda").bfloat16()  # the engine passes bf16 (normed) inputs
    out = torch.empty(1, HIDDEN, device="cuda")
    want = moe_decode_torch(x, ids, weights, slot_of, "q4", gate_up, down)
    rows = [sweep_row(cfg, x, ids, weights, slot_of, gate_up, down, out, want, iters, flush, ceiling)
            for cfg in configs or SWEEP_CONFIGS]
    rows = [row for row in rows if row is not None]
    print_sweep_summary(rows)
    return rows


def print_sweep_summary(rows: list[dict]) -> None:
    print("sweep, fastest first (us: whole in one graph | gate_up | down | sum, each alone in a graph):")
    for row in sorted(rows, key=lambda r: r["us"]):
        print(f"  {row['us']:6.1f} | {row['us_gate_up']:6.1f} | {row['us_down']:6.1f} | {row.get('us_sum', 0):5.1f}"
              f"  {row['name']}")
    for part in ("gate_up", "down"):
        best = min(rows, key=lambda r: r[f"us_{part}"])
        print(f"fastest {part} alone: {best[f'us_{part}']:.1f} us ({best[f'gb_s_{part}']:.0f} GB/s)  {best['name']}")


def config_name(cfg: dict) -> str:
    """The constants where cfg differs from Q4G_BASE (all of them for the per-byte kernels)."""
    if cfg.get("Q4_KERNEL") == "bytes":
        return " ".join(f"{k}={v}" for k, v in cfg.items())
    return " ".join(f"{k.removeprefix('Q4G_')}={v}" for k, v in cfg.items() if Q4G_BASE.get(k) != v) or "default"


def sweep_row(cfg, x, ids, weights, slot_of, gate_up, down, out, want, iters, flush, ceiling) -> dict | None:
    """Set cfg's decode_gpu constants, check against the reference, time the config in a graph, then each of its
    kernels alone in its own graph (moe_decode_launches)."""
    from krasis_run.kernels import decode_gpu as dg

    bytes_of = {"gate_up": TOPK * expert_bytes(gate_up), "down": TOPK * expert_bytes(down), "sum": 0, "quantize": 0}
    nbytes = bytes_of["gate_up"] + bytes_of["down"]
    name = config_name(cfg)
    for k, v in cfg.items():
        setattr(dg, k, v)
    try:
        err = rel_l2(moe_decode(x, ids, weights, slot_of, "q4", gate_up, down), want)
        t = graph_time(lambda: moe_decode(x, ids, weights, slot_of, "q4", gate_up, down, out=out), iters, flush)
        _, launches = dg.moe_decode_launches(x, ids, weights, slot_of, "q4", gate_up, down, out=out)
        for _, launch in launches:  # the down kernel alone then reads a real act
            launch()
        alone = {part: graph_time(launch, iters, flush) for part, launch in launches}
    except Exception as e:  # a tile shape this Triton cannot compile
        print(f"sweep {name}: failed {type(e).__name__}: {str(e)[:160]}")
        return None
    row = dict(cfg, name=name, us=t * 1e6, gb_s=nbytes / t / 1e9, err=err)
    parts = []
    for part, seconds in alone.items():
        row[f"us_{part}"] = seconds * 1e6
        if bytes_of[part]:
            row[f"gb_s_{part}"] = bytes_of[part] / seconds / 1e9
            parts.append(f"{part} {seconds * 1e6:5.1f} us {row[f'gb_s_{part}']:5.0f} GB/s")
        else:
            parts.append(f"{part} {seconds * 1e6:4.1f} us")
    print(f"sweep {name}: {t * 1e6:6.1f} us in a graph, {nbytes / t / 1e9:5.0f} GB/s "
          f"({nbytes / t / 1e9 / ceiling * 2:.0%} of read bandwidth), rel L2 {err:.1e}; alone: {', '.join(parts)}",
          flush=True)
    assert err < moe_bound("q4"), f"sweep {name}: rel L2 {err}"
    return row


def bench_attention(length: int, iters: int, flush: torch.Tensor, ceiling: float) -> dict:
    q = torch.randn(HEADS, HEAD_DIM, device="cuda")
    k_cache = torch.randn(CAPACITY, KV_HEADS, HEAD_DIM, device="cuda").bfloat16()
    v_cache = torch.randn(CAPACITY, KV_HEADS, HEAD_DIM, device="cuda").bfloat16()
    len_t = torch.tensor([length], dtype=torch.int32, device="cuda")
    out = torch.empty(HEADS * HEAD_DIM, device="cuda")
    nbytes = 2 * length * KV_HEADS * HEAD_DIM * 2
    times = time_it(lambda i: decode_attention(q, k_cache, v_cache, len_t, out=out), iters, flush)
    ref_times = time_it(lambda i: decode_attention_torch(q, k_cache, v_cache, len_t), 5, flush)
    err = rel_l2(decode_attention(q, k_cache, v_cache, len_t), decode_attention_torch(q, k_cache, v_cache, len_t))
    assert err < 3e-3, err  # tf32 dot products
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k_cache, v_cache, len_t, out=out)
    for n in (1, length // 3 + 7, CAPACITY):
        len_t.fill_(n)
        graph.replay()
        graph_err = rel_l2(out, decode_attention_torch(q, k_cache, v_cache, len_t))
        assert graph_err < 3e-3, f"graph replay at length {n}: rel L2 {graph_err}"
    return report(f"decode_attention len={length}", times, nbytes, ceiling, statistics.median(ref_times), err)


# dense projections a 30B-A3B decode step reads (q|k|v stacked and o_proj in each of 48 layers, then the lm_head),
# and tile shapes of linear_q8 to try: (output rows per program, input columns per step, warps, 2D accumulator)
LINEAR_LAYERS = 48
LINEAR_SHAPES = {"qkv": (5120, 2048), "o_proj": (2048, 4096), "lm_head": (151936, 2048)}
LINEAR_CONFIGS = [(bn, bk, w, acc2d) for bn in (1, 2, 4, 8, 16) for bk in (512, 1024, 2048) for w in (2, 4, 8)
                  for acc2d in (True, False) if bn * bk <= 16384 and (acc2d or bn * bk >= 2048)]


def linear_inputs() -> tuple:
    """Random q8 matrices of LINEAR_SHAPES (q|k|v and o_proj for each of LINEAR_LAYERS layers, one lm_head), the
    inputs x [1, 2048] and [1, 4096], bf16 outputs, and the bytes a layer and the lm_head read."""
    def matrix(n: int, k: int):
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        return q, (0.001 + 0.01 * torch.rand(n, device="cuda")).bfloat16()

    layers = [(matrix(*LINEAR_SHAPES["qkv"]), matrix(*LINEAR_SHAPES["o_proj"])) for _ in range(LINEAR_LAYERS)]
    head = matrix(*LINEAR_SHAPES["lm_head"])
    x2k, x4k = torch.randn(1, 2048, device="cuda"), torch.randn(1, 4096, device="cuda")
    outs = [torch.empty(1, n, dtype=torch.bfloat16, device="cuda") for n, _ in LINEAR_SHAPES.values()]
    layer_bytes = sum(n * k + 2 * n for name, (n, k) in LINEAR_SHAPES.items() if name != "lm_head")
    return layers, head, x2k, x4k, outs, layer_bytes, head[0].numel() + 2 * head[0].shape[0]


def bench_linear(iters: int, flush: torch.Tensor, ceiling: float) -> list[dict]:
    """linear_q8 (int8 rows read as stored) against cuBLAS on the bf16 weights it replaces, as a decode step issues
    them: the q|k|v and o_proj of LINEAR_LAYERS layers (distinct matrices, so nothing stays in L2) back to back in one
    CUDA graph, and the lm_head in its own; for each tile shape of LINEAR_CONFIGS, checked against the reference."""
    from krasis_run.kernels import decode_gpu
    from krasis_run.kernels.decode_gpu import linear_q8, linear_q8_torch

    layers, head, x2k, x4k, outs, layer_bytes, head_bytes = linear_inputs()

    def layers_q8():
        for (q, s), (qo, so) in layers:
            linear_q8(x2k, q, s, out=outs[0])
            linear_q8(x4k, qo, so, out=outs[1])

    def head_q8():
        linear_q8(x2k, *head, out=outs[2])

    dense = [((q.float() * s.float()[:, None]).bfloat16(), (qo.float() * so.float()[:, None]).bfloat16())
             for (q, s), (qo, so) in layers[:8]]  # bf16 copies of 8 layers (48 would need 1.9 GB more): cycled
    head_bf16 = (head[0].float() * head[1].float()[:, None]).bfloat16()
    x2b, x4b = x2k.bfloat16(), x4k.bfloat16()

    def layers_bf16():
        for i in range(LINEAR_LAYERS):
            w, wo = dense[i % len(dense)]
            torch.nn.functional.linear(x2b, w)
            torch.nn.functional.linear(x4b, wo)

    t_layers_bf16 = graph_time(layers_bf16, iters, flush) / LINEAR_LAYERS
    t_head_bf16 = graph_time(lambda: torch.nn.functional.linear(x2b, head_bf16), iters, flush)
    read = ceiling / 2 * 1e9  # bytes a second a kernel can read: half the copy rate (read + write)
    print(f"linear: per layer (q|k|v + o_proj, {layer_bytes / 1e6:.1f} MB q8) floor {layer_bytes / read * 1e6:.1f} us, "
          f"cuBLAS bf16 (twice the bytes) {t_layers_bf16 * 1e6:.1f} us; lm_head floor {head_bytes / read * 1e6:.1f} "
          f"us, cuBLAS bf16 {t_head_bf16 * 1e6:.1f} us", flush=True)
    base = (decode_gpu.LINEAR_Q8_BLOCK_N, decode_gpu.LINEAR_Q8_BLOCK_K, decode_gpu.LINEAR_Q8_WARPS,
            decode_gpu.LINEAR_Q8_ACC2D)
    want = [linear_q8_torch(x2k, *layers[0][0]), linear_q8_torch(x4k, *layers[0][1]), linear_q8_torch(x2k, *head)]
    rows = []
    for cfg in LINEAR_CONFIGS:
        (decode_gpu.LINEAR_Q8_BLOCK_N, decode_gpu.LINEAR_Q8_BLOCK_K, decode_gpu.LINEAR_Q8_WARPS,
         decode_gpu.LINEAR_Q8_ACC2D) = cfg
        try:
            t_layers = graph_time(layers_q8, iters, flush) / LINEAR_LAYERS
            t_head = graph_time(head_q8, iters, flush)
        except Exception as e:  # a tile this Triton cannot compile
            print(f"  {cfg}: failed {type(e).__name__}")
            continue
        got = [linear_q8(x2k, *layers[0][0]), linear_q8(x4k, *layers[0][1]), linear_q8(x2k, *head)]
        err = max(rel_l2(g, w) for g, w in zip(got, want, strict=True))
        assert err < 4e-3, (cfg, err)
        rows.append({"kernel": "linear_q8", "block_n": cfg[0], "block_k": cfg[1], "warps": cfg[2], "acc2d": cfg[3],
                     "layer_us": t_layers * 1e6, "lm_head_us": t_head * 1e6,
                     "step_us": (LINEAR_LAYERS * t_layers + t_head) * 1e6,
                     "cublas_bf16_layer_us": t_layers_bf16 * 1e6, "cublas_bf16_lm_head_us": t_head_bf16 * 1e6,
                     "rel_l2": err})
    (decode_gpu.LINEAR_Q8_BLOCK_N, decode_gpu.LINEAR_Q8_BLOCK_K, decode_gpu.LINEAR_Q8_WARPS,
     decode_gpu.LINEAR_Q8_ACC2D) = base
    for r in sorted(rows, key=lambda r: r["step_us"])[:8]:
        print(f"  BN={r['block_n']} BK={r['block_k']} W={r['warps']} acc2d={r['acc2d']:d}: layer {r['layer_us']:.1f} "
              f"us ({layer_bytes / r['layer_us'] / 1e3:.0f} GB/s), lm_head {r['lm_head_us']:.1f} us "
              f"({head_bytes / r['lm_head_us'] / 1e3:.0f} GB/s), step {r['step_us']:.0f} us "
              f"(cuBLAS bf16 {LINEAR_LAYERS * t_layers_bf16 * 1e6 + t_head_bf16 * 1e6:.0f})", flush=True)
    if rows:
        best = min(rows, key=lambda r: r["step_us"])
        print(f"best_linear_q8 {best['block_n']},{best['block_k']},{best['warps']},{int(best['acc2d'])}")
    return rows


# linear_q8 with int8 input groups (the norm or the attention writes them): (rows a program, groups a step, warps)
LINEAR_Q8I_CONFIGS = [(bn, g, w) for bn in (1, 2, 4, 8) for g in (16, 32, 64) for w in (1, 2, 4)]


def bench_linear_int8(iters: int, flush: torch.Tensor, ceiling: float) -> list[dict]:
    """linear_q8 given x's int8 groups (dp4a) against the float-input kernel at the engine's tiles, as bench_linear
    times them (48 layers' q|k|v and o_proj in one graph, the lm_head in its own), for each of LINEAR_Q8I_CONFIGS;
    each checked against the reference on the dequantized groups."""
    from krasis_run.kernels import decode_gpu
    from krasis_run.kernels.decode_gpu import int8_groups, int8_groups_dequant, linear_q8, linear_q8_torch

    def groups_of(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        g = int8_groups(1, x.shape[1], "cuda")
        decode_gpu._kernels()["quantize_x"][(1,)](x, *g, x.shape[1], GP=decode_gpu.next_pow2(x.shape[1] // 32),
                                                  PDL=False)
        return g

    layers, head, x2k, x4k, outs, layer_bytes, head_bytes = linear_inputs()
    g2k, g4k = groups_of(x2k), groups_of(x4k)

    def timed(int8: bool) -> tuple[float, float]:
        a, b = (g2k, g4k) if int8 else (None, None)

        def layers_q8():
            for (q, s), (qo, so) in layers:
                linear_q8(x2k, q, s, out=outs[0], x_int8=a)
                linear_q8(x4k, qo, so, out=outs[1], x_int8=b)

        return (graph_time(layers_q8, iters, flush) / LINEAR_LAYERS,
                graph_time(lambda: linear_q8(x2k, *head, out=outs[2], x_int8=a), iters, flush))

    t_float = timed(False)
    want = [linear_q8_torch(int8_groups_dequant(g), *w) for g, w in ((g2k, layers[0][0]), (g4k, layers[0][1]),
                                                                       (g2k, head))]
    base = (decode_gpu.LINEAR_Q8I_BLOCK_N, decode_gpu.LINEAR_Q8I_GROUPS, decode_gpu.LINEAR_Q8I_WARPS)
    rows = []
    for cfg in LINEAR_Q8I_CONFIGS:
        decode_gpu.LINEAR_Q8I_BLOCK_N, decode_gpu.LINEAR_Q8I_GROUPS, decode_gpu.LINEAR_Q8I_WARPS = cfg
        try:
            t_layer, t_head = timed(True)
        except Exception as e:  # a tile this Triton cannot compile
            print(f"  {cfg}: failed {type(e).__name__}")
            continue
        got = [linear_q8(x2k, *layers[0][0], x_int8=g2k), linear_q8(x4k, *layers[0][1], x_int8=g4k),
               linear_q8(x2k, *head, x_int8=g2k)]
        err = max(rel_l2(g, w) for g, w in zip(got, want, strict=True))
        assert err < 4e-3, (cfg, err)
        rows.append({"kernel": "linear_q8i", "block_n": cfg[0], "groups": cfg[1], "warps": cfg[2],
                     "layer_us": t_layer * 1e6, "lm_head_us": t_head * 1e6,
                     "step_us": (LINEAR_LAYERS * t_layer + t_head) * 1e6, "float_layer_us": t_float[0] * 1e6,
                     "float_lm_head_us": t_float[1] * 1e6, "rel_l2": err})
    decode_gpu.LINEAR_Q8I_BLOCK_N, decode_gpu.LINEAR_Q8I_GROUPS, decode_gpu.LINEAR_Q8I_WARPS = base
    read = ceiling / 2 * 1e9  # bytes a second a kernel can read: half the copy rate (read + write)
    print(f"floor (bytes / read rate): layer {layer_bytes / read * 1e6:.1f} us, "
          f"lm_head {head_bytes / read * 1e6:.1f} us")
    print(f"linear_q8 float inputs (engine tiles): layer {t_float[0] * 1e6:.1f} us "
          f"({layer_bytes / t_float[0] / 1e9:.0f} GB/s), lm_head {t_float[1] * 1e6:.1f} us "
          f"({head_bytes / t_float[1] / 1e9:.0f} GB/s), step {(LINEAR_LAYERS * t_float[0] + t_float[1]) * 1e6:.0f} us")
    for r in sorted(rows, key=lambda r: r["step_us"])[:8]:
        print(f"  int8 BN={r['block_n']} G={r['groups']} W={r['warps']}: layer {r['layer_us']:.1f} us "
              f"({layer_bytes / r['layer_us'] / 1e3:.0f} GB/s), lm_head {r['lm_head_us']:.1f} us "
              f"({head_bytes / r['lm_head_us'] / 1e3:.0f} GB/s), step {r['step_us']:.0f} us", flush=True)
    if rows:
        best = min(rows, key=lambda r: r["step_us"])
        print(f"best_linear_q8i {best['block_n']},{best['groups']},{best['warps']}")
    return rows


ATTN_CONFIGS = [(p, b, w) for p in (64, 128, 256, 512) for b in (32, 64, 128) for w in (2, 4, 8)]


def sweep_attention(iters: int, flush: torch.Tensor, length: int = 4096, capacity: int = 4224) -> list[dict]:
    """decode_attention as a decode step issues it: LINEAR_LAYERS layers' caches (distinct, so nothing stays in L2)
    back to back in one CUDA graph, at each (programs, block, warps) of ATTN_CONFIGS, checked against the reference."""
    from krasis_run.kernels import decode_gpu

    caches = [(torch.randn(capacity, KV_HEADS, HEAD_DIM, device="cuda").bfloat16(),
               torch.randn(capacity, KV_HEADS, HEAD_DIM, device="cuda").bfloat16()) for _ in range(LINEAR_LAYERS)]
    q = torch.randn(HEADS, HEAD_DIM, device="cuda")
    len_t = torch.tensor([length], dtype=torch.int32, device="cuda")
    out = torch.empty(HEADS * HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    want = decode_attention_torch(q, *caches[0], len_t)
    nbytes = 2 * length * KV_HEADS * HEAD_DIM * 2
    base = (decode_gpu.ATTN_PROGRAMS, decode_gpu.ATTN_BLOCK, decode_gpu.ATTN_WARPS)
    rows = []
    for cfg in ATTN_CONFIGS:
        decode_gpu.ATTN_PROGRAMS, decode_gpu.ATTN_BLOCK, decode_gpu.ATTN_WARPS = cfg

        def step():
            for k, v in caches:
                decode_attention(q, k, v, len_t, out=out)

        try:
            t = graph_time(step, iters, flush) / LINEAR_LAYERS
        except Exception as e:
            print(f"  attention {cfg}: failed {type(e).__name__}")
            continue
        err = rel_l2(decode_attention(q, *caches[0], len_t), want)
        assert err < 3e-3, (cfg, err)
        rows.append({"kernel": "decode_attention", "programs": cfg[0], "block": cfg[1], "warps": cfg[2],
                     "layer_us": t * 1e6, "GB/s": nbytes / t / 1e9, "rel_l2": err})
    decode_gpu.ATTN_PROGRAMS, decode_gpu.ATTN_BLOCK, decode_gpu.ATTN_WARPS = base
    for r in sorted(rows, key=lambda r: r["layer_us"])[:6]:
        print(f"  attention programs={r['programs']} block={r['block']} warps={r['warps']}: {r['layer_us']:.1f} us a "
              f"layer ({r['GB/s']:.0f} GB/s) at length {length}", flush=True)
    if rows:
        best = min(rows, key=lambda r: r["layer_us"])
        print(f"best_attention {best['programs']},{best['block']},{best['warps']}")
    return rows


GLUE_REPS = 48  # one call per layer of a 48-layer model, all in one graph: per-call cost as the engine sees it


def graph_per_call(fn, iters: int) -> tuple[float, torch.cuda.CUDAGraph]:
    """Median seconds per fn() call when GLUE_REPS calls are captured in one CUDA graph and replayed; the graph."""
    fn()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GLUE_REPS):
            fn()
    return statistics.median(time_it(lambda i: graph.replay(), iters, flush=None)) / GLUE_REPS, graph


def bench_glue_shape(m: int, h: int, e: int, k: int, iters: int) -> list[dict]:
    """rms_norm_decode and route_decode vs their torch references, all in CUDA graphs; then a replay of the
    kernels' graphs with new inputs must match the references."""
    x, w = torch.randn(m, h, device="cuda"), 1 + 0.1 * torch.randn(h, device="cuda")
    normed = torch.empty(m, h, dtype=torch.bfloat16, device="cuda")
    logits = torch.randn(m, e, device="cuda")
    ids, weights = torch.empty(m, k, dtype=torch.int64, device="cuda"), torch.empty(m, k, device="cuda")
    t_norm, g_norm = graph_per_call(lambda: rms_norm_decode(x, w, 1e-6, out=normed), iters)
    t_route, g_route = graph_per_call(lambda: route_decode(logits, k, True, ids, weights), iters)
    t_norm_ref, _ = graph_per_call(lambda: rms_norm(x, w, 1e-6).to(torch.bfloat16), iters)
    t_route_ref, _ = graph_per_call(lambda: route(logits, k, True), iters)
    x.copy_(torch.randn_like(x))
    logits.copy_(torch.randn_like(logits))
    g_norm.replay()
    g_route.replay()
    assert torch.allclose(normed.float(), rms_norm(x, w, 1e-6).bfloat16().float(), rtol=1 / 128, atol=1e-5)
    want_ids, want_w = route(logits, k, True)
    assert torch.equal(ids, want_ids) and torch.allclose(weights, want_w, rtol=1e-5)
    rows = []
    for name, t, t_ref in (("rms_norm_decode", t_norm, t_norm_ref), ("route_decode", t_route, t_route_ref)):
        row = {"kernel": f"{name} M={m} H={h} E={e} k={k}", "us": t * 1e6, "torch_ref_us": t_ref * 1e6}
        print(f"{row['kernel']:40s} {row['us']:7.2f} us a call in a graph, torch ref {row['torch_ref_us']:7.2f} us")
        rows.append(row)
    return rows


def bench_glue(iters: int) -> list[dict]:
    """kernels/decode_glue.py at 30B-A3B shapes (M=1 and 4) and at a wider model's (H=4096, 512 experts, top-10)."""
    shapes = ((1, HIDDEN, EXPERTS, TOPK), (4, HIDDEN, EXPERTS, TOPK), (1, 4096, 512, 10))
    return [row for shape in shapes for row in bench_glue_shape(*shape, iters)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--codec", default="q4", help="comma-separated: q4,q8,bf16")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--sweep", action="store_true", help="also time q4 moe_decode tile shapes in a CUDA graph")
    ap.add_argument("--sweep-only", action="store_true", help="only the sweep (--sweep without the other benchmarks)")
    ap.add_argument("--linear-only", action="store_true",
                    help="only the q8 dense GEMV against cuBLAS bf16, and the attention tile sweep")
    ap.add_argument("--attention-only", action="store_true", help="only the attention tile sweep")
    ap.add_argument("--linear-int8", action="store_true",
                    help="only the q8 GEMV with int8 input groups against float inputs, over LINEAR_Q8I_CONFIGS")
    ap.add_argument("--sweep-around", action="store_true",
                    help="only the sweep, of the engine's q4 defaults and single-step changes to them")
    ap.add_argument("--q4-group", type=int, default=32, choices=(32, 64), help="q4 columns per scale and zero")
    args = ap.parse_args()
    global Q4_GROUP
    Q4_GROUP = args.q4_group
    torch.manual_seed(0)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    ceiling = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {ceiling:.0f} GB/s (read + write)")
    rows = []
    if args.attention_only:
        rows += sweep_attention(args.iters, flush)
        args.codec, args.sweep_only = "", True
    elif args.linear_int8:
        rows += bench_linear_int8(args.iters, flush, ceiling)
        args.codec, args.sweep_only = "", True
    elif args.linear_only:
        rows += bench_linear(args.iters, flush, ceiling) + sweep_attention(args.iters, flush)
        args.codec, args.sweep_only = "", True
    elif args.sweep_around:
        rows += sweep_moe(args.iters, flush, ceiling, AROUND_CONFIGS)
        args.codec, args.sweep_only = "", True
    elif args.sweep_only:
        rows += sweep_moe(args.iters, flush, ceiling)
        args.codec, args.sweep = "", False
    for codec in filter(None, args.codec.split(",")):
        for m in (1, 4):
            rows.append(bench_moe(codec, m, args.iters, flush, ceiling))
    for length in () if args.sweep_only else (4096, 32768):
        rows.append(bench_attention(length, args.iters, flush, ceiling))
        q = torch.randn(HEADS, HEAD_DIM, device="cuda")
        kv = torch.randn(CAPACITY, KV_HEADS, HEAD_DIM, device="cuda").bfloat16()
        len_t = torch.tensor([length], dtype=torch.int32, device="cuda")
        t = graph_time(lambda q=q, kv=kv, n=len_t: decode_attention(q, kv, kv, n), args.iters, flush)
        print(f"decode_attention len={length} in a graph: {t * 1e6:.1f} us", flush=True)
    if args.sweep:
        rows += sweep_moe(args.iters, flush, ceiling)
    if not args.sweep_only:
        rows += bench_linear(args.iters, flush, ceiling)
        rows += bench_glue(args.iters)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GB/s": ceiling, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
