"""krasis-compile: Hugging Face safetensors checkpoint -> one self-contained .krs artifact."""

__version__ = "0.1.0"
