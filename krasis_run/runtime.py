"""`krasis_run.load(path)`: open, validate, plan, place weights, and expose logits / generate / tokenizer."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .artifact import Artifact
from .engine import CpuEngine
from .format import SECTION_DENSE, SECTION_GLOBAL, KrsError
from .kernels.cpu import CpuOps
from .models import MODELS
from .planner import place_weights, plan, prefill_workspace, set_threads
from .sampling import sample
from .tokenizer import Tokenizer

HOT_MARGIN = 512 << 20
# of the expert picks decode would leave to the CPU, the share the GPU takes by reading those experts from host
# memory over PCIe (~55 GB/s) while the CPU reads the rest (~65-95 GB/s): about PCIe / (PCIe + CPU)
REMOTE_SHARE = 0.3  # H200 host, run 23: 0.3 -> 47.9 tok/s, 0.45 -> 45.1 (the GPU's share then outlasts the CPU's)


@dataclass
class Timings:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


def _proc_bytes(path: str, key: str) -> int:
    """The "key: N kB" line of a /proc file in bytes, 0 if unknown."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resident_bytes(kind: str = "VmRSS") -> int:
    """Resident memory from /proc: VmRSS (all), RssAnon (heap: copies) or RssFile (mapped file pages)."""
    return _proc_bytes("/proc/self/status", kind)


def available_memory() -> int:
    """MemAvailable (what can be had without swapping, page cache included), 0 if unknown."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")


class Runtime:
    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 verify: bool = False, kernel: str | None = None, progress: bool = False,
                 gpu_budget: str | int | None = None, context: int | None = None,
                 max_resident_layers: int | None = None, graphs: bool = True, hot_experts: bool = True,
                 remote_share: float = REMOTE_SHARE, prefault: bool = True):
        self.artifact = Artifact(path)
        if verify:
            self.artifact.verify(progress=progress)
        header = self.artifact.header
        arch = MODELS.get(header.get("architecture"))
        if arch is None:
            raise KrsError(
                f"artifact is for architecture {header.get('architecture')!r}, which this krasis does not "
                f"support (supported: {', '.join(sorted(MODELS))})"
            )
        self.threads = set_threads(threads)
        self.args = arch.ModelArgs.from_hf(header["config"])
        per_token = getattr(arch, "prefill_bytes_per_token", None)
        per_token = None if per_token is None else lambda generic, f=per_token: f(self.args, generic)
        self.placement = plan(self.artifact, device, gpu_budget, context, max_resident_layers,
                              arch.cache_layout(self.args), per_token, getattr(arch, "DIRECT_MATRICES", ()))
        self.ops = CpuOps(kernel)
        weights = place_weights(self.artifact, self.placement, routers_in_place=self.ops.kernel == "native")
        self.model = arch.Model(self.args, weights, self.ops)
        self.engine = CpuEngine(self.model)  # decode (and prefill without a GPU)
        self.prefill_engine = self.engine
        if self.placement.prefill_device == "cuda":
            from .decode_hybrid import HybridDecodeEngine
            from .prefill_gpu import GpuPrefillEngine  # only GPU users pay for its imports

            self.prefill_engine = GpuPrefillEngine(arch, self.args, self.artifact, "cuda",
                                                   set(self.placement.resident_layers), self.placement.prefill_section)
            # decode keeps the GPU in the loop: the KV cache stays in VRAM where the prefill writes it
            vram = self.placement.vram_plan
            # during decode the prefill workspace is idle: hot experts of the streamed layers use it (a margin
            # stays for the decode step's own buffers and graphs)
            hot = max(0, vram["workspace"] - HOT_MARGIN) if hot_experts and vram["stream_buffers"] else 0

            def hot_room(tokens: int) -> int:  # what a prompt this long leaves of the workspace: hot experts kept
                need = prefill_workspace(header["config"], tokens, header["quant"]["experts"], per_token)
                return max(0, vram["workspace"] - need - HOT_MARGIN)  # as the layers stream by

            self.engine = HybridDecodeEngine(arch, self.args, self.artifact, self.prefill_engine, self.ops,
                                             self.model.w, self.placement.context, graphs=graphs, hot_bytes=hot,
                                             remote_share=remote_share, prefill_hot_room=hot_room)
        tok = header.get("tokenizer", {})
        self.tokenizer = Tokenizer(self.artifact.blob("tokenizer.json"), tok.get("config", {}),
                                   tok.get("chat_template"), header.get("generation_config"))
        self.generation_config = header.get("generation_config") or {}
        self.timings = Timings()
        self.prefaulted = self._prefault() if prefault else 0

    def _prefault(self) -> int:
        """Map the sections the CPU reads in decode now, where they fit the memory available (bytes mapped, or 0).
        All on the CPU: dense weights and the CPU experts; with the GPU decoding: the CPU experts, unless every expert
        layer is in VRAM."""
        p = self.placement
        if p.decode_device == "cpu":
            sections = {SECTION_DENSE, SECTION_GLOBAL, p.expert_section}
        else:
            expert_layers = {c.layer for c in self.artifact.chunks.values() if c.section == p.expert_section}
            sections = {p.expert_section} if expert_layers - set(p.resident_layers) else set()
        need = sum(c.length for c in self.artifact.chunks.values() if c.section in sections)
        if not need or need > available_memory():
            return 0
        return self.artifact.prefault(sections)

    def close(self) -> None:
        """Release pinned ranges and the mapping now rather than at garbage collection."""
        if hasattr(self.engine, "close"):
            self.engine.close()
        streamer = getattr(self.prefill_engine, "streamer", None)
        if streamer is not None:
            streamer.close()
        self.artifact.close()

    @property
    def context_length(self) -> int:
        return min(self.args.max_position_embeddings, self.placement.context or self.args.max_position_embeddings)

    def _check_tokens(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise KrsError("empty prompt")
        if min(token_ids) < 0 or max(token_ids) >= self.args.vocab_size:
            raise KrsError(f"token ids must be in [0, {self.args.vocab_size})")

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Float32 logits [T, vocab] for every position of one prefill pass from an empty cache."""
        self._check_tokens(token_ids)
        cache = self.engine.new_cache(len(token_ids))
        return self.prefill_engine.prefill(list(token_ids), cache, all_logits=True).float().numpy()

    def generate(self, token_ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop_token_ids: set[int] | None = None,
                 logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[int]:
        """Yield new token ids; stops at an EOS/stop token (not yielded), max_new_tokens or the context end.

        `logits_processor` (e.g. the server's presence/frequency penalties) maps each step's [vocab] logits
        before sampling. Closing the generator (or dropping it) stops generation after the current step.
        """
        self._check_tokens(token_ids)
        stops = self.tokenizer.eos_token_ids if stop_token_ids is None else stop_token_ids
        limit = min(max_new_tokens, self.context_length - len(token_ids))
        if limit < 0:
            raise KrsError(f"prompt has {len(token_ids)} tokens; the context holds {self.context_length}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.timings = t = Timings(prompt_tokens=len(token_ids))
        cache = self.engine.new_cache(len(token_ids) + limit)
        started = time.perf_counter()
        logits = self.prefill_engine.prefill(list(token_ids), cache)
        t.prefill_seconds = time.perf_counter() - started
        for step in range(limit):
            if logits_processor is not None:
                logits = logits_processor(logits)
            token = sample(logits, temperature, top_k, top_p, generator)
            if token in stops:
                return
            yield token
            if step + 1 == limit:
                return
            started = time.perf_counter()
            logits = self.engine.decode(token, cache)
            t.decode_seconds += time.perf_counter() - started
            t.decode_tokens += 1


def load(path: str | os.PathLike, device: str = "cpu", **kwargs) -> Runtime:
    return Runtime(path, device=device, **kwargs)
