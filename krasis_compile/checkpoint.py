"""Find a Hugging Face checkpoint (folder or Hub repo id) and read its safetensors lazily."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from krasis_run.format import KrsError

HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.jinja", "*.txt", "*.model"]
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


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass(frozen=True)
class TensorEntry:
    shard: Path
    dtype: str
    shape: list[int]
    start: int  # absolute byte offset in the shard
    nbytes: int


def read_safetensors_index(shard: Path) -> dict[str, TensorEntry]:
    """The shard's JSON header: 8-byte little-endian length, then {name: {dtype, shape, data_offsets}}."""
    size = shard.stat().st_size
    with open(shard, "rb") as f:
        raw = f.read(8)
        header_len = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if header_len <= 0 or 8 + header_len > size:
            raise CompileError(f"{shard.name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CompileError(f"{shard.name} is not a safetensors file (header is not JSON)") from e
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            entry = TensorEntry(shard, info["dtype"], list(info["shape"]), 8 + header_len + begin, end - begin)
        except (KeyError, TypeError, ValueError) as e:
            raise CompileError(f"{shard.name}: tensor {name} has a malformed entry") from e
        if begin < 0 or entry.start + entry.nbytes > size:
            raise CompileError(f"{shard.name}: tensor {name} lies outside the file (truncated download?)")
        entries[name] = entry
    return entries


class Checkpoint:
    """Tensor name -> (shard, dtype, shape, range) from the shard headers; data read on demand with pread.

    Not mmap: pages of a mapping stay in the process's resident set once touched, so a mapped
    checkpoint makes peak RSS grow with the model; pread into a fresh buffer keeps it at one layer.
    """

    def __init__(self, folder: Path):
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise CompileError(f"{folder} has no .safetensors files")
        self.index: dict[str, TensorEntry] = {}
        for shard in shards:
            self.index.update(read_safetensors_index(shard))
        self._files: dict[Path, int] = {}
        self.bytes_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def names(self) -> list[str]:
        return list(self.index)

    def shape(self, name: str) -> list[int]:
        return list(self.index[name].shape)

    def _entry(self, name: str) -> TensorEntry:
        entry = self.index.get(name)
        if entry is None:
            raise CompileError(f"checkpoint is missing tensor {name}")
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise CompileError(f"tensor {name} has unsupported dtype {entry.dtype} (need BF16, F16 or F32)")
        return entry

    def _read(self, entry: TensorEntry, offset: int, nbytes: int) -> bytearray:
        fd = self._files.get(entry.shard)
        if fd is None:
            fd = self._files[entry.shard] = os.open(entry.shard, os.O_RDONLY)
        buf = bytearray(nbytes)
        view, done = memoryview(buf), 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], entry.start + offset + done)
            if n <= 0:
                raise CompileError(f"{entry.shard.name} ended early (truncated download?)")
            done += n
        self.bytes_read += nbytes
        return buf

    def get(self, name: str, shape: list[int] | None = None) -> torch.Tensor:
        entry = self._entry(name)
        if shape is not None and entry.shape != list(shape):
            raise CompileError(f"tensor {name} has shape {entry.shape}, expected {list(shape)}")
        return self.get_rows(name, 0, entry.shape[0] if entry.shape else 1)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop along the first dimension, reading only those bytes."""
        entry = self._entry(name)
        dtype = SAFETENSORS_DTYPES[entry.dtype]
        row_shape = entry.shape[1:]
        row_bytes = torch.Size(row_shape).numel() * dtype.itemsize
        if entry.nbytes != row_bytes * (entry.shape[0] if entry.shape else 1):
            raise CompileError(f"tensor {name}: byte length does not match its shape")
        buf = self._read(entry, start * row_bytes, (stop - start) * row_bytes)
        if not buf:
            return torch.empty(stop - start, *row_shape, dtype=dtype)
        tensor = torch.frombuffer(buf, dtype=dtype)
        return tensor.reshape(stop - start, *row_shape) if entry.shape else tensor.reshape(())

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
