"""Native attention decode alone (krs_attention): one token over a bf16 KV cache of growing length.

    PYTHONPATH=. python scripts/bench_native_attention.py [--threads 2] [--contexts 64,512,2048,8192]
        [--heads 32 --kv-heads 4 --head-dim 128] [--json out.json]

Per context length: microseconds a call, once with the cache warm (the same call repeated) and once cold (after
streaming 256 MB through the caches, as a decode step meets each layer's cache after ~1 GB of other weights), next
to two ceilings: the KV bytes over this host's read probe (the native threads streaming 1 GiB) and the
floating-point work over the fp32 rate torch's own matrix multiply reaches here on as many threads (a 2048^3 GEMM,
best of 5: near the vector units' peak). A decode step runs this once a layer.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from krasis_run.kernels import native
from scripts.bench_decode import read_bandwidth


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_gflops(threads: int) -> float:
    """fp32 GFLOP/s of torch.mm at 2048^3 on `threads` threads, best of 5."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    return 2 * 2048**3 / timed(lambda: torch.mm(a, b), 5) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="64,512,2048,8192")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    native.set_threads(args.threads)
    lib = native.load()
    probe = read_bandwidth(args.threads, 1.0)
    gflops = gemm_gflops(args.threads)
    flush = torch.ones(64 << 20, dtype=torch.float32)
    nq, nkv, hd = args.heads, args.kv_heads, args.head_dim
    print(f"{native.isa()}, {args.threads} threads, read probe {probe:.1f} GB/s, fp32 GEMM {gflops:.0f} GFLOP/s, "
          f"{nq}/{nkv} heads of {hd}")
    rows = []
    for s in (int(c) for c in args.contexts.split(",")):
        q = torch.randn(1, nq, hd)
        keys = torch.randn(s, nkv, hd).to(torch.bfloat16)
        values = torch.randn(s, nkv, hd).to(torch.bfloat16)
        out = torch.empty(1, nq * hd)

        def call(q=q, keys=keys, values=values, s=s, out=out):
            lib.krs_attention(q.data_ptr(), 1, nq, nkv, hd, keys.data_ptr(), values.data_ptr(), s - 1, out.data_ptr())

        call()
        warm = timed(call, 20)
        cold = float("inf")
        for _ in range(5):
            flush.sum()
            cold = min(cold, timed(call, 1))
        kv_bytes = 2 * s * nkv * hd * 2
        flops = 2 * 2 * s * nq * hd  # q.k and p.v, a multiply and an add each
        row = dict(context=s, warm_us=warm * 1e6, cold_us=cold * 1e6, kv_bytes=kv_bytes,
                   read_bound_us=kv_bytes / probe / 1e3, compute_bound_us=flops / gflops / 1e3,
                   gflops_warm=flops / warm / 1e9)
        rows.append(row)
        print(f"context {s:6d}: warm {row['warm_us']:8.1f} us ({row['gflops_warm']:.1f} GFLOP/s), cold "
              f"{row['cold_us']:8.1f} us; KV {kv_bytes / 1e6:.2f} MB, read bound {row['read_bound_us']:.0f} us, "
              f"compute bound {row['compute_bound_us']:.0f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(isa=native.isa(), threads=args.threads, read_gb_s=probe, gemm_gflops=gflops, heads=nq,
                           kv_heads=nkv, head_dim=hd, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
