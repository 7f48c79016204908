"""The KV cache: mutable run state, kept apart from the read-only mapped weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .format import KrsError

_kv_store = None  # native.kv_store_rows once the native library is loaded


def _native_kv_store():
    """native.kv_store_rows when the native kernels are already loaded (a CpuOps loaded them), else None: the
    cache never builds or loads the library itself. A decode step's CPU cache write is then one C call per
    layer, k and v rounded to bf16 in place, instead of two slice assignments (a conversion and a copy each)."""
    global _kv_store
    if _kv_store is None:
        from .kernels import native

        if native._LOADED:
            _kv_store = native.kv_store_rows
    return _kv_store


@dataclass(frozen=True)
class CacheLayout:
    """What a sequence keeps per layer, as the architecture file defines it (the engines and the planner size the
    cache from this alone): K [kv_heads, key_dim] and V [kv_heads, value_dim] per token on the layers that attend
    over a cache (kv_layers), and a fixed-size state on the others (linear attention: state_bytes in all)."""

    kv_heads: int
    key_dim: int
    value_dim: int
    kv_layers: tuple[bool, ...]
    dtype: torch.dtype = torch.bfloat16
    state_bytes: int = 0

    def bytes(self, tokens: int) -> int:
        per_token = self.kv_heads * (self.key_dim + self.value_dim) * self.dtype.itemsize
        return sum(self.kv_layers) * per_token * tokens + self.state_bytes


class KVCache:
    """Per layer K as [capacity, kv_heads, head_dim] and V as [capacity, kv_heads, value_dim] (value_dim defaults to
    head_dim; an MLA model caches one latent "head" as K and no V: value_dim 0); grows by doubling; `length` tokens
    are valid."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int = 256,
                 dtype: torch.dtype = torch.bfloat16, pin_memory: bool = False, device: torch.device | str = "cpu",
                 value_dim: int | None = None, kv_layers: list[bool] | None = None):
        self.shape, self.dtype, self.pin_memory = (kv_heads, head_dim), dtype, pin_memory
        self.value_shape = (kv_heads, head_dim if value_dim is None else value_dim)
        self.device = torch.device(device)
        # kv_layers: which layers attend over a KV cache (a hybrid model's linear-attention layers keep a fixed-size
        # state instead, in `states`); the others get empty K/V of no heads
        self.kv_layers = kv_layers or [True] * layers
        self.keys = [self._alloc(capacity, self._shape(i, self.shape)) for i in range(layers)]
        self.values = [self._alloc(capacity, self._shape(i, self.value_shape)) for i in range(layers)]
        self.states: dict[int, object] = {}  # per layer, what a recurrent (linear-attention) layer carries on
        self.length = 0

    def _shape(self, layer: int, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape if self.kv_layers[layer] else (0, shape[1])

    def _alloc(self, capacity: int, shape: tuple[int, ...]) -> torch.Tensor:
        # pinned when a GPU prefill fills it: device-to-host copies then run async at full PCIe speed
        if self.device.type != "cpu":
            return torch.empty(capacity, *shape, dtype=self.dtype, device=self.device)
        return torch.empty(capacity, *shape, dtype=self.dtype, pin_memory=self.pin_memory)

    @classmethod
    def for_layout(cls, layout: CacheLayout, capacity: int, **kwargs) -> KVCache:
        return cls(len(layout.kv_layers), layout.kv_heads, layout.key_dim, capacity, dtype=layout.dtype,
                   value_dim=layout.value_dim, kv_layers=list(layout.kv_layers), **kwargs)

    @classmethod
    def over(cls, storage: KVCache) -> KVCache:
        """An empty cache on another's storage (a decode engine's fixed buffers, which CUDA graphs address): the same
        K/V tensors and the same state tensors, zeroed, which a new sequence overwrites in place."""
        cache = cls.__new__(cls)
        cache.__dict__.update(storage.__dict__)
        cache.keys, cache.values, cache.pin_memory, cache.length = list(storage.keys), list(storage.values), False, 0
        with torch.inference_mode():  # the states were made by a prefill, in inference mode
            for conv, state in storage.states.values():
                conv.zero_()
                state.zero_()
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
        for store, shape in ((self.keys, self.shape), (self.values, self.value_shape)):
            for i, old in enumerate(store):
                new = self._alloc(capacity, self._shape(i, shape))
                new[: self.length] = old[: self.length]
                store[i] = new

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [T, kv_heads, head_dim] at positions start..; return all keys/values up to them."""
        end = start + k.shape[0]
        self.reserve(end)
        keys, values = self.keys[layer], self.values[layer]
        store = _native_kv_store() if self.device.type == "cpu" else None
        if store is None or not store(k, v, keys, values, start):
            keys[start:end] = k
            values[start:end] = v
        return keys[:end], values[:end]

    def get_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(conv state, recurrent state) of a linear-attention layer, None before its first token."""
        return self.states.get(layer)

    def set_state(self, layer: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        """Written into the tensors already held where there are some (their addresses stay: a captured decode step
        reads them), else kept as copies on this cache's device."""
        held = self.states.get(layer)
        if held is not None:
            held[0].copy_(conv, non_blocking=True)
            held[1].copy_(state, non_blocking=True)
        else:
            self.states[layer] = (conv.to(self.device, copy=True), state.to(self.device, copy=True))

    def advance(self, length: int) -> None:
        self.length = length

    def truncate(self, length: int) -> None:
        if self.states and length < self.length:
            raise KrsError("a recurrent layer's state cannot be rewound: start a new cache")
        self.length = min(self.length, length)
