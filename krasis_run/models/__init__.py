"""One module per architecture; the registry maps the HF architecture name to it."""

from . import deepseek_v2, deepseek_v3, qwen3_moe

MODELS = {m.ARCHITECTURE: m for m in (qwen3_moe, deepseek_v2, deepseek_v3)}
