"""Time one Gated DeltaNet layer after its input projections (kernels/linear_attention.gated_delta_layer: conv,
norms, the rule, the gated norm) at Qwen3-Coder-Next's linear-attention shape (16 key / 32 value heads of 128) on the
GPU, in torch and in the fused Triton kernels: ms per layer, what --layers such layers cost a prompt, their agreement,
the fused kernels' split and a few tile settings, next to the floor of the layer's reads and writes at the measured
HBM copy rate."""

from __future__ import annotations

import argparse
import functools
import time

import torch

from krasis_run.kernels import linear_attention
from krasis_run.kernels.linear_attention import gated_delta_layer


def layer_case(t: int, nk: int = 16, r: int = 2, dk: int = 128, dv: int = 128, kernel: int = 4):
    """A layer's inputs as the model hands them over: views of one bf16 grouped projection and of b|a."""
    g = torch.Generator(device="cuda").manual_seed(1)
    conv_dim = 2 * nk * dk + nk * r * dv

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, device="cuda", generator=g)

    q, k, v, z = rand(t, nk, 2 * dk + 2 * r * dv).bfloat16().split([dk, dk, r * dv, r * dv], dim=-1)
    b, a = rand(t, nk, 2 * r).bfloat16().split([r, r], dim=-1)
    return (q, k, v.unflatten(-1, (r, dv)), z.unflatten(-1, (r, dv)), b, a, rand(kernel, conv_dim, scale=0.5),
            rand(kernel - 1, conv_dim), rand(nk * r), rand(nk * r), 1 + rand(dv, scale=0.1),
            rand(nk * r, dk, dv, scale=0.1))


def bench_layer(tokens: list[int], layers: int, hbm: float) -> None:
    for t in tokens:
        case = layer_case(t)
        run = {path: functools.partial(gated_delta_layer, *case, eps=1e-6, l2_eps=1e-6, use_triton=path == "fused")
               for path in ("torch", "fused")}
        (y0, _, s0), (y1, _, s1) = run["torch"](), run["fused"]()
        err = float((y1.float() - y0.float()).norm() / y0.float().norm())
        state_err = float((s1 - s0).norm() / s0.norm())
        io = sum(x.numel() * x.element_size() for x in case[:6]) + y1.numel() * y1.element_size()
        times = {path: timed(fn) for path, fn in run.items()}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run["fused"]()
            torch.cuda.synchronize()
        split = {e.key: e.device_time_total / 1e3 for e in prof.key_averages()}
        print(f"layer T={t}: torch {times['torch'] * 1e3:.2f} ms, fused {times['fused'] * 1e3:.2f} ms "
              f"({times['torch'] / times['fused']:.1f}x; {layers} layers {times['fused'] * layers:.3f} s); "
              f"fused vs torch rel L2: out {err:.2e}, state {state_err:.2e}; floor (projections in, y out) "
              f"{io / hbm / 1e6:.3f} ms at {hbm:.0f} GB/s")
        print("  fused kernels (ms): " + ", ".join(f"{k[:40]} {v:.2f}" for k, v in sorted(split.items(),
                                                                                         key=lambda kv: -kv[1])[:6]))
        defaults = {name: getattr(linear_attention, name) for name in ("BLOCK_V", "STATES_WARPS", "OUTPUT_WARPS")}
        for values in [(32, 4, 8), (64, 8, 8), (64, 4, 8), (32, 8, 4), (128, 8, 8)]:
            for name, value in zip(defaults, values, strict=True):
                setattr(linear_attention, name, value)
            print(f"  BLOCK_V, STATES_WARPS, OUTPUT_WARPS = {values}: fused {timed(run['fused']) * 1e3:.2f} ms")
        for name, value in defaults.items():
            setattr(linear_attention, name, value)


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
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--layers", type=int, default=36)
    args = ap.parse_args()
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    copy_s = timed(lambda: x.clone())
    hbm = 2 * x.numel() / copy_s / 1e9
    bench_layer([int(t) for t in args.tokens.split(",")], args.layers, hbm)


if __name__ == "__main__":
    main()
