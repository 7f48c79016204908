"""Prefill and decode steps over one KV cache.

The CPU engine runs both. A GPU prefill engine fills the same cache (then hands it to decode), so
the generation loop only ever talks to `prefill` and `decode`.
"""

from __future__ import annotations

import torch

from .cache import KVCache


class CpuEngine:
    def __init__(self, model, prefill_chunk: int = 2048):
        self.model, self.args, self.prefill_chunk = model, model.args, prefill_chunk
        self.pin_cache = False

    def new_cache(self, capacity: int = 256) -> KVCache:
        return KVCache.for_layout(self.model.cache_layout, capacity, pin_memory=self.pin_cache)

    @torch.inference_mode()
    def prefill(self, tokens: list[int], cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Run `tokens` after what the cache holds; logits [T, V] (all_logits) or [V] of the last token."""
        ids = torch.tensor(tokens, dtype=torch.long)
        cache.reserve(cache.length + len(tokens))
        outputs = []
        for start in range(0, len(tokens), self.prefill_chunk):  # bounds activation memory on long prompts
            chunk = ids[start:start + self.prefill_chunk]
            last = start + self.prefill_chunk >= len(tokens)
            logits = self.model.forward(chunk, cache, cache.length, all_logits=all_logits)
            if all_logits or last:
                outputs.append(logits)
        logits = torch.cat(outputs)
        return logits if all_logits else logits[-1]

    @torch.inference_mode()
    def decode(self, token: int, cache: KVCache) -> torch.Tensor:
        return self.model.forward(torch.tensor([token]), cache, cache.length)[-1]
