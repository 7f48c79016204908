"""Time the chunked gated delta rule (kernels/linear_attention.py) at Qwen3-Coder-Next's linear-attention shape
(32 value heads, key/value dim 128) on the GPU: ms per layer and what 36 such layers cost a prompt, next to the
floor of its reads and writes at the measured HBM copy rate."""

from __future__ import annotations

import argparse
import functools
import time

import torch

from krasis_run.kernels import linear_attention
from krasis_run.kernels.linear_attention import gated_delta_chunked


def case(t: int, heads: int, dk: int, dv: int, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(t, heads, dk, device=device, generator=g), dim=-1) / dk**0.5
    k = torch.nn.functional.normalize(torch.randn(t, heads, dk, device=device, generator=g), dim=-1)
    v = torch.randn(t, heads, dv, device=device, generator=g)
    log_decay = -torch.rand(t, heads, device=device, generator=g) * 0.5
    beta = torch.rand(t, heads, device=device, generator=g)
    return q, k, v, log_decay, beta, torch.zeros(heads, dk, dv, device=device)


def timed(fn, repeat: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", default="4096,8192")
    ap.add_argument("--variants", default="torch:64,triton:64:64,triton:64:32,triton:128:32",
                    help="path:chunk[:value block] to time")
    ap.add_argument("--layers", type=int, default=36)
    args = ap.parse_args()
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    copy_s = timed(lambda: x.clone())
    hbm = 2 * x.numel() / copy_s / 1e9
    for t in map(int, args.tokens.split(",")):
        inputs = case(t, 32, 128, 128, "cuda")
        floor = sum(a.numel() * a.element_size() for a in inputs) * 2 / (hbm * 1e9)  # read inputs, write out
        for variant in args.variants.split(","):
            path, chunk, *block = variant.split(":")
            chunk = int(chunk)
            linear_attention.BLOCK_V = int(block[0]) if block else linear_attention.BLOCK_V
            s = timed(functools.partial(gated_delta_chunked, *inputs, chunk=chunk, use_triton=path == "triton"))
            carry = linear_attention.delta_chunks
            linear_attention.delta_chunks = lambda *a, **k: None  # what is left: the batched, state-free part
            batched = timed(functools.partial(gated_delta_chunked, *inputs, chunk=chunk))
            linear_attention.delta_chunks = carry
            print(f"  of which batched (state-free) work {batched * 1e3:.2f} ms")
            print(f"T={t} {variant}: {s * 1e3:.2f} ms/layer, {args.layers} layers {s * args.layers:.3f} s "
                  f"({t / (s * args.layers):.0f} tok/s for linear attention alone); floor {floor * 1e3:.3f} ms/layer "
                  f"at {hbm:.0f} GB/s")


if __name__ == "__main__":
    main()
