"""One module per architecture; the registry maps the HF architecture name to it."""

from . import qwen3_moe

MODELS = {qwen3_moe.ARCHITECTURE: qwen3_moe}
