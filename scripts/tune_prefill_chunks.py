"""Prefill of the Qwen3-Coder-Next 16-layer block at 32K tokens, every expert layer streamed, for several token
chunkings of the expert step (planner.expert_token_chunk: tokens per grouped GEMM pass) and of the linear-attention
layers (LINEAR_TOKEN_SLICE). Run on the GPU host: python3 scripts/tune_prefill_chunks.py [artifact]."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import krasis_run  # noqa: E402
import krasis_run.models.qwen3_next as qwen3_next  # noqa: E402
import krasis_run.planner as planner  # noqa: E402
import krasis_run.prefill_gpu as prefill_gpu  # noqa: E402
from scripts.bench import run_prefill  # noqa: E402
from scripts.synthetic_artifact import write_synthetic  # noqa: E402


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/qcn.krs")
    if not path.exists():
        write_synthetic(path, 16, "q4", ("gpu", "cpu"), "q8", shape="qwen3-coder-next")
    for expert_chunk, linear_slice in ((4096, 8192), (16384, 8192), (4096, 32768), (16384, 32768)):
        def fixed(experts: int, top_k: int, chunk: int = expert_chunk) -> int:
            return chunk

        prefill_gpu.expert_token_chunk = planner.expert_token_chunk = fixed
        qwen3_next.LINEAR_TOKEN_SLICE = linear_slice
        rt = krasis_run.load(path, device="cuda", gpu_budget="40GiB", context=32832, max_resident_layers=0)
        run_prefill(rt, 1024, repeat=1)
        row = run_prefill(rt, 32768)
        print(f"expert chunk {expert_chunk}, linear slice {linear_slice}: {row['prefill_tok_s']:.0f} tok/s (block), "
              f"TTFT {row['ttft_s']:.3f} s, peak VRAM {row['peak_vram_gib']:.1f} GiB", flush=True)
        rt.close()
        del rt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
