"""What a dependent kernel launch costs inside a CUDA graph, with and without programmatic dependent launch (PDL).

    PYTHONPATH=. python3 scripts/bench_launch_gaps.py [--kernels 768] [--programs 132,512,2048]

A decode step is ~16 small kernels a layer, each waiting for the one before: 768 for 48 layers, where the step's
kernels read ~3 GB in ~0.7 ms of HBM time but the step takes ~3 ms. This chains `--kernels` copies of a tiny kernel
(y = x + 1 over 4 KB a program, each reading what the one before wrote) into one CUDA graph and reports the
microseconds per kernel: plain launches, and launches with Triton's `launch_pdl` (the next kernel starts while the
one before finishes; `gdc_wait` in the kernel holds its loads until the producer's writes are visible). The final
values are checked (each element must have been incremented once per kernel), so a PDL race would show.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
import triton.language as tl


@triton.jit
def add_one_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()  # the producer's writes are visible after this
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask)
    if EARLY:
        tl.extra.cuda.gdc_launch_dependents()  # let the next kernel's programs start being scheduled now
    tl.store(y_ptr + offs, v + 1.0, mask=mask)


def chain_us(kernels: int, programs: int, pdl: bool, early: bool, iters: int = 20) -> tuple[float, bool]:
    block = 1024
    n = programs * block
    a = torch.zeros(n, device="cuda")
    b = torch.zeros(n, device="cuda")
    opts = dict(BLOCK=block, PDL=pdl, EARLY=early, num_warps=4)
    if pdl:
        opts["launch_pdl"] = True

    def step() -> None:
        for i in range(kernels):
            src, dst = (a, b) if i % 2 == 0 else (b, a)
            add_one_kernel[(programs,)](src, dst, n, **opts)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
    times = []
    for _ in range(iters):
        a.zero_()
        b.zero_()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / kernels)
    last = b if kernels % 2 else a
    ok = bool(torch.all(last == kernels))
    return statistics.median(times), ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", type=int, default=768)
    ap.add_argument("--programs", default="132,512,2048")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for programs in [int(p) for p in args.programs.split(",")]:
        moved = 2 * programs * 4096  # bytes read and written by one kernel
        row = []
        for name, pdl, early in (("plain", False, False), ("pdl", True, False), ("pdl+early", True, True)):
            try:
                us, ok = chain_us(args.kernels, programs, pdl, early)
                row.append(f"{name} {us:.2f} us{'' if ok else ' WRONG'}")
            except Exception as e:  # an older Triton without launch_pdl
                row.append(f"{name} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
        print(f"{programs:5d} programs ({moved / 1e6:.2f} MB a kernel, {args.kernels} kernels a graph): "
              + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
