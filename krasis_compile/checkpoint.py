"""Find a Hugging Face checkpoint (folder or Hub repo id) and read its safetensors lazily."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from krasis_run.format import KrsError

HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.jinja", "*.txt", "*.model"]
SUPPORTED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CompileError(KrsError):
    """A problem with the input checkpoint or the output path; the message is for the user."""


@dataclass(frozen=True)
class Source:
    folder: Path
    description: dict  # recorded in the artifact header


def resolve(model: str, revision: str | None = None) -> Source:
    """A local folder, or a Hub repo id fetched (only weights, json and tokenizer files) into the cache."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return Source(folder, {"kind": "folder", "path": str(folder.resolve()), "revision": revision})
    if folder.exists():
        raise CompileError(f"{model} is not a folder: give a checkpoint folder or a Hub repo id")
    if not HUB_ID.match(model):
        raise CompileError(f"model folder not found: {model}")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        path = snapshot_download(model, revision=revision, allow_patterns=HUB_PATTERNS)
    except LocalEntryNotFoundError as e:
        raise CompileError(f"{model} is not a local folder and is not in the Hub cache (offline?)") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CompileError(f"cannot fetch {model} from the Hub: {str(e).splitlines()[0]}") from e
    sha = Path(path).name
    return Source(Path(path), {"kind": "hub", "repo_id": model, "revision": revision or "main", "commit": sha})


def read_json(folder: Path, name: str, required: bool = True) -> dict:
    path = folder / name
    if not path.is_file():
        if required:
            raise CompileError(f"{folder} has no {name}")
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompileError(f"{path} is not valid JSON: {e}") from e


class Checkpoint:
    """Tensor name -> (shard, shape, dtype) from the shard headers; data read on demand through mmap."""

    def __init__(self, folder: Path):
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise CompileError(f"{folder} has no .safetensors files")
        self._handles = {}
        self.index: dict[str, Path] = {}
        self.bytes_read = 0
        for shard in shards:
            try:
                handle = safe_open(str(shard), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CompileError(f"{shard.name} is not a readable safetensors file: {e}") from e
            self._handles[shard] = handle
            for name in handle.keys():
                self.index[name] = shard

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def names(self) -> list[str]:
        return list(self.index)

    def shape(self, name: str) -> list[int]:
        return list(self._handles[self.index[name]].get_slice(name).get_shape())

    def get(self, name: str, shape: list[int] | None = None) -> torch.Tensor:
        if name not in self.index:
            raise CompileError(f"checkpoint is missing tensor {name}")
        sl = self._handles[self.index[name]].get_slice(name)
        dtype = sl.get_dtype()
        if dtype not in SUPPORTED_DTYPES:
            raise CompileError(f"tensor {name} has unsupported dtype {dtype} (need BF16, F16 or F32)")
        if shape is not None and list(sl.get_shape()) != list(shape):
            raise CompileError(f"tensor {name} has shape {list(sl.get_shape())}, expected {list(shape)}")
        t = sl[:]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a stacked tensor, reading only those bytes."""
        sl = self._handles[self.index[name]].get_slice(name)
        if sl.get_dtype() not in SUPPORTED_DTYPES:
            raise CompileError(f"tensor {name} has unsupported dtype {sl.get_dtype()} (need BF16, F16 or F32)")
        t = sl[start:stop]
        self.bytes_read += t.numel() * t.element_size()
        return t
