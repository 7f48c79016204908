"""CPU matmuls over the artifact's bytes in place: the one seam a native decode kernel will replace.

Two implementations of the same interface:
  - "torch": torch's packed CPU kernels straight on the mapped bytes (`_weight_int8pack_mm`; and
    `_weight_int4pack_mm_for_cpu` where this torch build's packed layout equals the artifact's CPU
    block layout, which a probe checks at start-up; otherwise q4 experts are dequantized per use);
  - "reference": dequantize to float32 with krasis_run.codecs and multiply; the oracle for tests.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ..codecs import dequant_parts, pack_q4_blocks, split_gate_up_output
from ..format import Q4_GROUP
from .attention import causal_attention

KERNEL_ENV = "KRASIS_KERNEL"  # "torch" (default) or "reference"


@functools.cache
def torch_int4_reads_cpu_blocks() -> bool:
    """True when torch's int4 CPU kernel consumes our q4 CPU blocks unchanged (and computes the same values)."""
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    matmul = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if convert is None or matmul is None:
        return False
    g = torch.Generator().manual_seed(0)
    n, k = 128, 64
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    try:
        if not torch.equal(convert(q, 1).view(torch.uint8).flatten(), pack_q4_blocks(q).flatten()):
            return False
        scale_zero = (torch.rand(k // Q4_GROUP, n, 2, generator=g) * 0.1).to(torch.bfloat16)
        x = torch.randn(3, k, generator=g).to(torch.bfloat16)
        got = matmul(x, pack_q4_blocks(q).view(n, k // 2), Q4_GROUP, scale_zero).float()
    except RuntimeError:
        return False
    parts = {"q": pack_q4_blocks(q), "scale_zero": scale_zero}
    want = x.float() @ dequant_parts("q4", "cpu_blocks", parts).T
    return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))


class CpuOps:
    """embed / linear / experts on float32 activations; weights are artifact TensorViews (or float tensors)."""

    def __init__(self, kernel: str | None = None):
        self.kernel = kernel or os.environ.get(KERNEL_ENV, "torch")
        if self.kernel not in ("torch", "reference"):
            raise ValueError(f"unknown kernel {self.kernel!r} (torch or reference)")
        self.int4_in_place = self.kernel == "torch" and torch_int4_reads_cpu_blocks()

    def describe(self) -> str:
        if self.kernel == "reference":
            return "reference (float32 dequant)"
        return "torch packed" + (" (q4 in place)" if self.int4_in_place else " (q4 dequantized per use)")

    def embed(self, tokens: torch.Tensor, table) -> torch.Tensor:
        return table.parts["w"][tokens].float()

    def matmul(self, x: torch.Tensor, codec: str, layout: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """x [M, K] float32 @ W[N, K]^T -> [M, N] float32."""
        if self.kernel == "reference" or codec == "f32" or (codec == "q4" and not self.int4_in_place):
            return F.linear(x, dequant_parts(codec, layout, parts))
        # The packed kernels take bf16 activations. For bf16 weights (the exact mode) rounding x to
        # bf16 would be the largest error left (~1% in the logits), so x goes in as two bf16 rows,
        # hi + lo, summed after: float32-grade activations for the same weight bytes. Quantized
        # weights carry larger errors of their own, and the second row costs ~35% of GEMV speed.
        m = x.shape[0]
        xb = x.to(torch.bfloat16)
        if codec == "bf16":
            y = F.linear(torch.cat([xb, (x - xb.float()).to(torch.bfloat16)]), parts["w"])
        elif codec == "q8":
            y = torch.ops.aten._weight_int8pack_mm(xb, parts["q"], parts["scale"])
        elif codec == "q4" and layout == "cpu_blocks":
            q = parts["q"]
            packed = q.view(q.shape[0] * q.shape[2] * 2, q.shape[1] // 2)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, Q4_GROUP, parts["scale_zero"])
        else:
            raise ValueError(f"no CPU kernel for {codec} in the {layout} layout")
        y = y.float()
        return y[:m] + y[m:] if y.shape[0] > m else y

    def linear(self, x: torch.Tensor, w) -> torch.Tensor:
        if isinstance(w, torch.Tensor):
            return F.linear(x, w)
        return self.matmul(x, w.codec, w.layout, w.parts)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
        return causal_attention(q, k, v, start_pos)

    def experts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, blocks) -> torch.Tensor:
        """Routed experts from the CPU blocks: tokens grouped by expert, only selected experts are read."""
        t, k = topk_ids.shape
        flat_ids = topk_ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=blocks.experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts):
            if not count:
                continue
            slots = order[start:start + count]
            start += count
            rows = slots // k
            gate_up = self.matmul(x[rows], blocks.codec, "cpu_blocks", blocks.expert(e, "gate_up"))
            gate, up = split_gate_up_output(gate_up)
            y = self.matmul(F.silu(gate) * up, blocks.codec, "cpu_blocks", blocks.expert(e, "down"))
            out.index_add_(0, rows, y * topk_weights.flatten()[slots, None])
        return out
