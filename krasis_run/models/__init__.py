"""One module per architecture; the registry maps the HF architecture name to it."""

from . import deepseek_v2, deepseek_v3, qwen3_5_moe, qwen3_moe, qwen3_next

MODELS = {name: m for m in (qwen3_moe, qwen3_next, qwen3_5_moe, deepseek_v2, deepseek_v3)
          for name in getattr(m, "ARCHITECTURES", (m.ARCHITECTURE,))}
