"""Native dense-rows kernels alone (krs_linear) at the 30B-A3B decode shapes, on a many-core host.

    PYTHONPATH=. python scripts/bench_native_linear.py [--layers 48] [--threads 16,8] [--codecs q4,q8]

Per layer q_proj [4096, 2048], k_proj and v_proj [512, 2048], o_proj [2048, 4096], then the lm_head [151936, 2048]:
one decode step's dense matrices as the CPU path calls them (one krs_linear each). The weights are random quantized
parts in a file mapping (page cache, 4 KB pages: as the artifact is read) and, for comparison, in anonymous memory
(transparent huge pages where the kernel gives them). Prints ms a step, GB/s per matrix kind, and the read probe
(the native threads streaming 2 GiB) beside them, so each figure is a fraction of what this host's memory gives.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from krasis_run.kernels import native

SHAPES = {"q_proj": (4096, 2048), "k_proj": (512, 2048), "v_proj": (512, 2048), "o_proj": (2048, 4096)}
LM_HEAD = (151936, 2048)


def part_shapes(codec: str, n: int, k: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    if codec == "q4":
        return [(torch.uint8, (n, k // 2)), (torch.bfloat16, (n, k // 32)), (torch.bfloat16, (n, k // 32))]
    return [(torch.int8, (n, k)), (torch.bfloat16, (n,))]


def random_part(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return (0.001 + 0.01 * torch.rand(shape)).bfloat16()
    return torch.randint(-127 if dtype == torch.int8 else 0, 128 if dtype == torch.int8 else 256, shape, dtype=dtype)


def build(codec: str, layers: int, path: str | None) -> list[tuple[str, int, int, list[torch.Tensor]]]:
    """[(kind, n, k, parts)] in call order; the parts laid out one after another in a file mapping (path) or in
    anonymous memory (None). Random bytes are generated once per matrix kind and repeated (they are read, not used)."""
    matrices = [(kind, *SHAPES[kind]) for _ in range(layers) for kind in SHAPES] + [("lm_head", *LM_HEAD)]
    specs = [(kind, n, k, part_shapes(codec, n, k)) for kind, n, k in matrices]
    nbytes = [sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for d, s in parts)
              for _, _, _, parts in specs]
    total = sum((b + 4095) // 4096 * 4096 for b in nbytes)  # each matrix on its own pages, as the artifact's
    if path:
        with open(path, "wb") as f:
            f.truncate(total)
        buf = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
    else:
        buf = torch.empty(total, dtype=torch.uint8)
    samples = {}
    out, off = [], 0
    for kind, n, k, parts in specs:
        views = []
        for i, (dtype, shape) in enumerate(parts):
            numel = torch.Size(shape).numel()
            width = torch.empty(0, dtype=dtype).element_size()
            view = buf[off:off + numel * width].view(dtype).view(shape)
            if (kind, i) not in samples:
                samples[(kind, i)] = random_part(dtype, shape)
            view.copy_(samples[(kind, i)])
            views.append(view)
            off += numel * width
        off = (off + 4095) // 4096 * 4096
        out.append((kind, n, k, views))
    return out


def calls(matrices, stack_qkv: bool) -> list[tuple[str, list]]:
    """(kind, [(n, k, parts)]) per call: q, k and v as one call (krs_linear_multi) where stack_qkv, as the CPU path
    reads a layer's RowsStack."""
    out, i = [], 0
    while i < len(matrices):
        kind, n, k, parts = matrices[i]
        if stack_qkv and kind == "q_proj":
            out.append(("qkv", [m[1:] for m in matrices[i:i + 3]]))
            i += 3
        else:
            out.append((kind, [(n, k, parts)]))
            i += 1
    return out


def step(codec: str, plan, xs: dict[int, torch.Tensor], outs, per_kind: dict[str, float] | None) -> None:
    for (kind, group), y in zip(plan, outs, strict=True):
        k = group[0][1]
        start = time.perf_counter()
        if len(group) == 1:
            native.linear(codec, xs[k], group[0][0], *group[0][2], out=y)
        else:
            native.linear_multi(codec, xs[k], [parts for _, _, parts in group], out=y)
        if per_kind is not None:
            per_kind[kind] = per_kind.get(kind, 0.0) + time.perf_counter() - start


def bench(codec: str, matrices, threads: int, steps: int, stack_qkv: bool) -> dict:
    native.set_threads(threads)
    plan = calls(matrices, stack_qkv)
    xs = {k: torch.randn(1, k) for k in {k for _, _, k, _ in matrices}}
    outs = [torch.empty(1, sum(n for n, _, _ in group)) for _, group in plan]
    step(codec, plan, xs, outs, None)  # page in, warm the threads
    totals, kinds = [], []
    for _ in range(steps):
        per_kind: dict[str, float] = {}
        start = time.perf_counter()
        step(codec, plan, xs, outs, per_kind)
        totals.append(time.perf_counter() - start)
        kinds.append(per_kind)
    bytes_of: dict[str, int] = {}
    for kind, group in plan:
        nbytes = sum(p.numel() * p.element_size() for _, _, ps in group for p in ps)
        bytes_of[kind] = bytes_of.get(kind, 0) + nbytes
    t = statistics.median(totals)
    total = sum(bytes_of.values())
    row = {"codec": codec, "threads": threads, "stack_qkv": stack_qkv, "step_ms": t * 1e3, "MB": total / 1e6,
           "GB/s": total / t / 1e9}
    for kind, nb in bytes_of.items():
        tk = statistics.median(k[kind] for k in kinds)
        row[f"{kind}_ms"], row[f"{kind}_GB/s"] = tk * 1e3, nb / tk / 1e9
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--threads", default="16,8")
    ap.add_argument("--codecs", default="q4,q8")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--memory", default="file,anon", help="file (page-cache mapping, as the artifact) and/or anon")
    ap.add_argument("--stack", default="0,1", help="0: q, k, v a call each; 1: one call for the three")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from scripts.bench_decode import read_bandwidth

    print(f"native isa {native.isa()}, {os.cpu_count()} CPUs", flush=True)
    rows = []
    for codec in args.codecs.split(","):
        for memory in args.memory.split(","):
            with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
                matrices = build(codec, args.layers, os.path.join(tmp, "w.bin") if memory == "file" else None)
                for threads, stack in [(t, st) for t in map(int, args.threads.split(","))
                                       for st in map(int, args.stack.split(","))]:
                    probe = read_bandwidth(threads)
                    row = dict(bench(codec, matrices, threads, args.steps, bool(stack)), memory=memory,
                               probe_GB_s=probe)
                    rows.append(row)
                    kinds = ", ".join(f"{k} {row[f'{k}_GB/s']:.0f}" for k in (*SHAPES, "qkv", "lm_head")
                                      if f"{k}_GB/s" in row)
                    print(f"{codec} {memory:4s} {threads:2d} threads{' qkv' if stack else ''}: "
                          f"{row['step_ms']:6.2f} ms a step, {row['MB']:.0f} MB, {row['GB/s']:.1f} GB/s = "
                          f"{row['GB/s'] / probe:.0%} of the {probe:.1f} GB/s probe; GB/s by kind: {kinds}", flush=True)
                del matrices
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
