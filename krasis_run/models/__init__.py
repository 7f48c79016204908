"""One module per architecture; the registry maps the HF architecture name to it."""

from . import deepseek_v2, deepseek_v3, qwen3_moe, qwen3_next

MODELS = {m.ARCHITECTURE: m for m in (qwen3_moe, qwen3_next, deepseek_v2, deepseek_v3)}
