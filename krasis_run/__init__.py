"""krasis runtime: memory-map a .krs artifact and generate text."""

from .format import KrsError
from .runtime import Runtime, load

__all__ = ["KrsError", "Runtime", "load"]
