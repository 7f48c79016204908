"""The KV cache: mutable run state, kept apart from the read-only mapped weights."""

from __future__ import annotations

import torch

from .format import KrsError


class KVCache:
    """Per layer K and V as [capacity, kv_heads, head_dim]; grows by doubling; `length` tokens are valid."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int = 256,
                 dtype: torch.dtype = torch.bfloat16, pin_memory: bool = False, device: torch.device | str = "cpu"):
        self.shape, self.dtype, self.pin_memory = (kv_heads, head_dim), dtype, pin_memory
        self.device = torch.device(device)
        self.keys = [self._alloc(capacity) for _ in range(layers)]
        self.values = [self._alloc(capacity) for _ in range(layers)]
        self.length = 0

    def _alloc(self, capacity: int) -> torch.Tensor:
        # pinned when a GPU prefill fills it: device-to-host copies then run async at full PCIe speed
        if self.device.type != "cpu":
            return torch.empty(capacity, *self.shape, dtype=self.dtype, device=self.device)
        return torch.empty(capacity, *self.shape, dtype=self.dtype, pin_memory=self.pin_memory)

    @classmethod
    def over(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> KVCache:
        """An empty cache on existing storage (a decode engine's fixed buffers, which CUDA graphs address)."""
        cache = cls.__new__(cls)
        cache.shape, cache.dtype, cache.pin_memory = tuple(keys[0].shape[1:]), keys[0].dtype, False
        cache.device, cache.keys, cache.values, cache.length = keys[0].device, list(keys), list(values), 0
        return cache

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[0]

    def reserve(self, tokens: int) -> None:
        if tokens <= self.capacity:
            return
        if self.device.type != "cpu":
            raise KrsError(f"{tokens} tokens do not fit the device KV cache of {self.capacity}")
        capacity = max(tokens, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = self._alloc(capacity)
                new[: self.length] = old[: self.length]
                store[i] = new

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [T, kv_heads, head_dim] at positions start..; return all keys/values up to them."""
        end = start + k.shape[0]
        self.reserve(end)
        self.keys[layer][start:end] = k
        self.values[layer][start:end] = v
        return self.keys[layer][:end], self.values[layer][:end]

    def advance(self, length: int) -> None:
        self.length = length

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)
