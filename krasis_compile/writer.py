"""Streaming, checksummed, atomic writer of a planned artifact.

Phases: plan (offsets and header size fixed) -> open (disk space reserved in a temporary file beside
the output) -> write parts strictly in file order (CRCs computed on the fly, no read-back) -> finish
(header with checksums, fsync, rename). Anything else, including an exception or SIGTERM, removes
the temporary file, so a killed compile never leaves a file at the output path.
"""

from __future__ import annotations

import errno
import os
import shutil
import zlib
from pathlib import Path

import torch

from krasis_run.codecs import part_nbytes
from krasis_run.format import (
    PREAMBLE_SIZE,
    Preamble,
    crc32,
    crc_hex,
    data_start,
    encode_header,
    version_needed,
)

from .checkpoint import CompileError
from .layout import PlannedChunk, PlannedTensor, assign_offsets

ZEROS = bytes(1 << 20)
CRC_PLACEHOLDER = "0" * 8


def _as_buffer(data) -> memoryview:
    if isinstance(data, torch.Tensor):
        return memoryview(data.contiguous().view(torch.uint8).numpy()).cast("B")
    return memoryview(data).cast("B")


class ArtifactWriter:
    def __init__(self, out: Path, header: dict, chunks: list[PlannedChunk]):
        self.out, self.header, self.chunks = Path(out), header, chunks
        self.tensors: dict[str, PlannedTensor] = {t.name: t for c in chunks for t in c.tensors}
        self.chunk_of = {c.name: c for c in chunks}
        self.crc_chunk: dict[str, str] = {c.name: CRC_PLACEHOLDER for c in chunks}
        self.crc_tensor: dict[str, str] = {n: CRC_PLACEHOLDER for n in self.tensors}
        self.reserve = 0
        while True:  # header length fixes the data start, which fixes the offsets in the header
            self.data_start = data_start(self.reserve)
            self.file_size = assign_offsets(chunks, self.data_start)
            size = len(self._encoded_header(None))
            if size <= self.reserve:
                break
            self.reserve = size + 1024
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        self._file = None
        self._pos = 0
        self._chunk: PlannedChunk | None = None
        self._tensor: PlannedTensor | None = None
        self._chunk_crc = self._tensor_crc = 0
        self._written: set[tuple] = set()
        self.finished = False

    # ------------------------------------------------------------ header

    def _encoded_header(self, reserve: int | None) -> bytes:
        header = dict(self.header, format="krs", format_version=version_needed(self.header))
        header["chunks"] = [
            {"name": c.name, "section": c.section, "layer": c.layer, "offset": c.offset,
             "length": c.length, "crc32": self.crc_chunk[c.name]}
            for c in self.chunks
        ]
        header["tensors"], header["blobs"] = {}, dict(header.get("blobs", {}))
        for name, t in self.tensors.items():
            if t.codec == "blob":
                header["blobs"][name].update(chunk=t.chunk, offset=t.offset, length=t.length)
            else:
                header["tensors"][name] = dict(t.header_entry(), crc32=self.crc_tensor[name])
        return encode_header(header, reserve)

    # ------------------------------------------------------------ open / write / finish

    def __enter__(self) -> ArtifactWriter:
        parent = self.out.parent
        if not parent.is_dir():
            raise CompileError(f"output folder does not exist: {parent}")
        free = shutil.disk_usage(parent).free
        if free < self.file_size:
            raise CompileError(
                f"out of disk space: the artifact needs {self.file_size / 1e9:.2f} GB, "
                f"{parent} has {free / 1e9:.2f} GB free"
            )
        try:
            self._file = open(self.tmp, "wb")
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._file.fileno(), 0, self.file_size)
            self._file.seek(self.data_start)
        except OSError as e:
            self._discard()
            raise self._os_error(e) from e
        except BaseException:  # SIGTERM/Ctrl-C before the with-block owns the file
            self._discard()
            raise
        self._pos = self.data_start
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.finished:
            self._discard()

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)

    def _os_error(self, e: OSError) -> CompileError:
        if e.errno == errno.ENOSPC:
            return CompileError(f"out of disk space while writing {self.out}")
        return CompileError(f"cannot write {self.tmp}: {e.strerror or e}")

    def _emit(self, data, in_chunk: bool, in_tensor: bool) -> None:
        buf = _as_buffer(data)
        if in_chunk:
            self._chunk_crc = zlib.crc32(buf, self._chunk_crc)
        if in_tensor:
            self._tensor_crc = zlib.crc32(buf, self._tensor_crc)
        try:
            self._file.write(buf)
        except OSError as e:
            raise self._os_error(e) from e
        self._pos += len(buf)

    def _pad_to(self, target: int, in_chunk: bool, in_tensor: bool) -> None:
        while self._pos < target:
            self._emit(ZEROS[: min(len(ZEROS), target - self._pos)], in_chunk, in_tensor)

    def _close_tensor(self) -> None:
        if self._tensor is not None:
            self._pad_to(self._tensor.offset + self._tensor.length, True, True)
            self.crc_tensor[self._tensor.name] = crc_hex(self._tensor_crc & 0xFFFFFFFF)
            self._tensor = None

    def _close_chunk(self) -> None:
        self._close_tensor()
        if self._chunk is not None:
            self._pad_to(self._chunk.offset + self._chunk.length, True, False)
            self.crc_chunk[self._chunk.name] = crc_hex(self._chunk_crc & 0xFFFFFFFF)
            self._chunk = None

    def write(self, tensor: str, part: str | None, data, expert: int | None = None) -> None:
        """Write one part (a blob when part is None) at its planned place; parts must come in file order."""
        t = self.tensors[tensor]
        target, expected = t.offset, t.length
        if part is not None:
            spec = t.parts[part]
            target += spec["offset"] + (expert or 0) * t.expert_stride
            expected = part_nbytes(spec["dtype"], spec["shape"])
        buf = _as_buffer(data)
        if len(buf) != expected:
            raise CompileError(f"internal: {tensor}.{part} is {len(buf)} bytes, planned {expected}")
        if target < self._pos:
            raise CompileError(f"internal: {tensor}.{part} written out of file order")
        chunk = self.chunk_of[t.chunk]
        if chunk is not self._chunk:
            self._close_chunk()
            self._pad_to(chunk.offset, False, False)
            self._chunk, self._chunk_crc = chunk, 0
        if t is not self._tensor:
            self._close_tensor()
            self._pad_to(t.offset, True, False)
            self._tensor, self._tensor_crc = t, 0
        self._pad_to(target, True, True)
        self._emit(buf, True, True)
        self._written.add((tensor, part, expert))

    def finish(self) -> int:
        self._close_chunk()
        missing = [t.name for t in self.tensors.values() if not any(w[0] == t.name for w in self._written)]
        if missing:
            raise CompileError(f"internal: tensors never written: {missing[:5]}")
        self._pad_to(self.file_size, False, False)
        raw = self._encoded_header(self.reserve)
        preamble = Preamble(version_needed(self.header), len(raw), crc32(raw)).pack()
        try:
            self._file.seek(0)
            self._file.write(preamble)
            self._file.write(raw)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self.tmp, self.out)
        except OSError as e:
            raise self._os_error(e) from e
        self.finished = True
        assert PREAMBLE_SIZE + len(raw) <= self.data_start
        return self.file_size
