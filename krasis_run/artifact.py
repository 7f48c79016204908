"""Open a .krs artifact: map it read-only, validate every range in the header, hand out zero-copy views.

Nothing in the file is executed or unpickled: the header is JSON, the data is raw little-endian
arrays whose every offset and length is checked against the file size before a view is made.
"""

from __future__ import annotations

import mmap
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .codecs import TORCH_DTYPES, matrix_parts, part_nbytes
from .format import (
    ALIGN,
    DTYPE_SIZES,
    PART_ALIGN,
    PREAMBLE_SIZE,
    Q4_GROUP,
    KrsError,
    Preamble,
    crc_hex,
    data_start,
    decode_header,
    version_needed,
)

VERIFY_PIECE = 64 << 20
MADV_POPULATE_READ = 22  # Linux 5.14+: fault the pages in now, as a first read of each would (not in mmap's names)


@dataclass(frozen=True)
class Chunk:
    name: str
    section: str
    layer: int | None
    offset: int
    length: int
    crc32: str


@dataclass
class TensorView:
    """One stored tensor: its codec, logical shape and the parts as zero-copy torch views."""

    name: str
    codec: str
    layout: str
    shape: list[int]
    chunk: str
    offset: int
    length: int
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    experts: int = 0  # >0: a strided block of per-expert parts (CPU layout)
    expert_parts: list[dict[str, torch.Tensor]] = field(default_factory=list)
    matrices: dict[str, list[int]] = field(default_factory=dict)

    def expert(self, e: int, matrix: str) -> dict[str, torch.Tensor]:
        prefix = matrix + "."
        return {k[len(prefix):]: v for k, v in self.expert_parts[e].items() if k.startswith(prefix)}


@dataclass(frozen=True)
class RowsStack:
    """Dense matrices of one codec and input width read as one, their outputs side by side (a layer's q, k and v
    projections): the CPU kernels take them in one call, each matrix in place in the mapping (no concatenated copy)."""

    views: tuple[TensorView, ...]

    @property
    def codec(self) -> str:
        return self.views[0].codec

    @property
    def layout(self) -> str:
        return self.views[0].layout

    @property
    def shape(self) -> list[int]:
        return [sum(v.shape[0] for v in self.views), self.views[0].shape[1]]

    @staticmethod
    def of(views: list) -> RowsStack | None:
        """The stack of `views`, or None where they cannot be read as one (other codecs, layouts or widths)."""
        if not all(isinstance(v, TensorView) and not v.experts and len(v.shape) == 2 for v in views):
            return None
        if len({(v.codec, v.layout, v.shape[1]) for v in views}) != 1 or views[0].layout != "rows":
            return None
        return RowsStack(tuple(views))


def _check_int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise KrsError(f"corrupt artifact: {what} is not a non-negative integer")
    return value


def _check_shape(shape: Any, what: str) -> list[int]:
    if not isinstance(shape, list) or not shape:
        raise KrsError(f"corrupt artifact: {what} has no valid shape")
    return [_check_int(d, f"{what} shape") for d in shape]


class Artifact:
    """A mapped .krs file. `header` is the parsed JSON; `tensor(name)` returns a validated view."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise KrsError(f"artifact not found: {self.path}")
        self._file = open(self.path, "rb")
        self.file_size = os.fstat(self._file.fileno()).st_size
        preamble = Preamble.unpack(self._file.read(PREAMBLE_SIZE), self.file_size)
        self.version = preamble.version
        self.header = decode_header(self._file.read(preamble.header_len), preamble.header_crc32)
        self.data_start = data_start(preamble.header_len)
        if self.header.get("format_version") != self.version:
            raise KrsError("corrupt artifact: header and preamble disagree on the format version")
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.q4_group = (self.header.get("quant") or {}).get("q4_group", Q4_GROUP)  # columns per q4 scale
            if self.version < version_needed(self.header):
                raise KrsError(f"corrupt artifact: q4 groups of {self.q4_group} need format version 2, "
                               f"the file says {self.version}")
            self.chunks = self._validate_chunks()
            self._tensor_specs = self._validate_tensors()
            self._validate_blobs()
        except (AttributeError, KeyError, TypeError, ValueError) as e:  # a field of the wrong JSON type
            raise KrsError(f"corrupt artifact: malformed header entry ({type(e).__name__}: {e})") from e
        self._views: dict[str, TensorView] = {}

    # ------------------------------------------------------------ validation

    def _validate_chunks(self) -> dict[str, Chunk]:
        if self.header.get("format") != "krs":
            raise KrsError("corrupt artifact: header does not describe a krs artifact")
        raw = self.header.get("chunks")
        if not isinstance(raw, list):
            raise KrsError("corrupt artifact: header has no chunk list")
        chunks: dict[str, Chunk] = {}
        previous_end = self.data_start
        for entry in raw:
            name = str(entry.get("name"))
            offset = _check_int(entry.get("offset"), f"chunk {name!r} offset")
            length = _check_int(entry.get("length"), f"chunk {name!r} length")
            if offset % ALIGN or offset < previous_end:
                raise KrsError(f"corrupt artifact: chunk {name!r} is misplaced (offset {offset})")
            if offset + length > self.file_size:
                raise KrsError(
                    f"truncated artifact: chunk {name!r} ends at byte {offset + length} "
                    f"but the file has {self.file_size} bytes"
                )
            if name in chunks:
                raise KrsError(f"corrupt artifact: chunk {name!r} appears twice")
            chunks[name] = Chunk(
                name, str(entry.get("section")), entry.get("layer"), offset, length, str(entry.get("crc32"))
            )
            previous_end = offset + length
        return chunks

    def _validate_tensors(self) -> dict[str, dict]:
        raw = self.header.get("tensors")
        if not isinstance(raw, dict):
            raise KrsError("corrupt artifact: header has no tensor index")
        for name, spec in raw.items():
            chunk = self.chunks.get(spec.get("chunk"))
            if chunk is None:
                raise KrsError(f"corrupt artifact: tensor {name!r} names an unknown chunk")
            offset = _check_int(spec.get("offset"), f"tensor {name!r} offset")
            length = _check_int(spec.get("length"), f"tensor {name!r} length")
            if offset % PART_ALIGN or spec.get("expert_stride", 0) % PART_ALIGN:
                raise KrsError(f"corrupt artifact: tensor {name!r} is not aligned to {PART_ALIGN} bytes")
            if offset < chunk.offset or offset + length > chunk.offset + chunk.length:
                raise KrsError(f"corrupt artifact: tensor {name!r} lies outside its chunk {chunk.name!r}")
            span = length
            experts = _check_int(spec.get("experts", 0), f"tensor {name!r} experts")
            if experts:
                span = _check_int(spec.get("expert_stride"), f"tensor {name!r} expert_stride")
                if experts * span > length:
                    raise KrsError(f"corrupt artifact: tensor {name!r} experts overrun the tensor")
            self._check_parts(name, spec, span)
        return raw

    def _validate_blobs(self) -> None:
        for name, spec in (self.header.get("blobs") or {}).items():
            chunk = self.chunks.get(spec.get("chunk"))
            offset, length = _check_int(spec.get("offset"), name), _check_int(spec.get("length"), name)
            if chunk is None or offset < chunk.offset or offset + length > chunk.offset + chunk.length:
                raise KrsError(f"corrupt artifact: blob {name!r} lies outside its chunk")
            if spec.get("compression") not in ("zstd", "none"):
                raise KrsError(f"corrupt artifact: blob {name!r} has unknown compression")

    def _check_parts(self, name: str, spec: dict, span: int) -> None:
        """Every part inside the tensor (or one expert's span), sizes as the codec says."""
        parts = spec.get("parts")
        if not isinstance(parts, dict) or not parts:
            raise KrsError(f"corrupt artifact: tensor {name!r} has no parts")
        if spec.get("experts"):
            expected = {}
            for matrix, shape in spec.get("matrices", {}).items():
                shape = _check_shape(shape, name)
                for part, ds in matrix_parts(spec["codec"], spec["layout"], shape, self.q4_group).items():
                    expected[f"{matrix}.{part}"] = ds
        else:
            expected = matrix_parts(spec.get("codec"), spec.get("layout"), _check_shape(spec.get("shape"), name),
                                    self.q4_group)
        if set(expected) != set(parts):
            raise KrsError(f"corrupt artifact: tensor {name!r} parts {sorted(parts)} do not match its codec")
        for part, (dtype, shape) in expected.items():
            entry = parts[part]
            rel = _check_int(entry.get("offset"), f"tensor {name!r} part {part!r} offset")
            if entry.get("dtype") != dtype or entry.get("shape") != shape:
                raise KrsError(f"corrupt artifact: tensor {name!r} part {part!r} has the wrong dtype or shape")
            if rel % DTYPE_SIZES[dtype] or rel + part_nbytes(dtype, shape) > span:
                raise KrsError(f"corrupt artifact: tensor {name!r} part {part!r} overruns the tensor")

    # ------------------------------------------------------------ views

    def _view(self, offset: int, dtype: str, shape: list[int]) -> torch.Tensor:
        count = part_nbytes(dtype, shape) // DTYPE_SIZES[dtype]
        if count == 0:
            return torch.empty(shape, dtype=TORCH_DTYPES[dtype])
        with warnings.catch_warnings():  # the mapping is read-only by design; torch warns about that
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._mm, dtype=TORCH_DTYPES[dtype], count=count, offset=offset)
        return flat.view(shape)

    def has_tensor(self, name: str) -> bool:
        return name in self._tensor_specs

    def tensor(self, name: str) -> TensorView:
        if name in self._views:
            return self._views[name]
        spec = self._tensor_specs.get(name)
        if spec is None:
            raise KrsError(f"artifact has no tensor {name!r}")
        view = TensorView(
            name=name, codec=spec["codec"], layout=spec["layout"], shape=spec.get("shape", []),
            chunk=spec["chunk"], offset=spec["offset"], length=spec["length"],
            experts=spec.get("experts", 0), matrices=spec.get("matrices", {}),
        )
        if view.experts:
            stride = spec["expert_stride"]
            for e in range(view.experts):
                base = spec["offset"] + e * stride
                view.expert_parts.append(
                    {p: self._view(base + s["offset"], s["dtype"], s["shape"]) for p, s in spec["parts"].items()}
                )
        else:
            view.parts = {
                p: self._view(spec["offset"] + s["offset"], s["dtype"], s["shape"]) for p, s in spec["parts"].items()
            }
        self._views[name] = view
        return view

    def blob(self, name: str) -> bytes:
        spec = (self.header.get("blobs") or {}).get(name)
        if spec is None:
            raise KrsError(f"artifact has no {name!r}")
        data = bytes(self._mm[spec["offset"]:spec["offset"] + spec["length"]])  # range checked at open
        if spec.get("compression") == "zstd":
            try:
                import zstandard  # lazily: only artifacts with compressed blobs need it
            except ImportError as e:
                raise KrsError(f"this artifact's {name} is zstd-compressed: pip install zstandard") from e
            try:
                data = zstandard.ZstdDecompressor().decompress(data, max_output_size=spec.get("raw_length", 0))
            except zstandard.ZstdError as e:
                raise KrsError(f"corrupt artifact: {name} does not decompress ({e})") from e
        if len(data) != spec.get("raw_length", len(data)):
            raise KrsError(f"corrupt artifact: {name} has {len(data)} bytes, the header says {spec['raw_length']}")
        return data

    def prefault(self, sections: set[str]) -> int:
        """Map the chunks of `sections` into this process now (reading in what the page cache lacks), as llama.cpp's
        MAP_POPULATE does: decode then takes no page fault on the first read of each expert's pages (a token of a
        30B-A3B model first-touches ~1 GB of them while the experts warm up). Falls back to read-ahead
        (MADV_WILLNEED) where the kernel has no MADV_POPULATE_READ. Returns the bytes of those chunks."""
        total = 0
        for chunk in self.chunks.values():
            if chunk.section not in sections or not chunk.length:
                continue
            try:
                self._mm.madvise(MADV_POPULATE_READ, chunk.offset, chunk.length)
            except (OSError, ValueError):
                if hasattr(mmap, "MADV_WILLNEED"):
                    self._mm.madvise(mmap.MADV_WILLNEED, chunk.offset, chunk.length)
            total += chunk.length
        return total

    # ------------------------------------------------------------ checksums

    def verify(self, progress: bool = True) -> None:
        """Check every chunk's CRC32; raise KrsError naming the first chunk that does not match."""
        total = sum(c.length for c in self.chunks.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
            for chunk in self.chunks.values():
                crc = 0
                for start in range(chunk.offset, chunk.offset + chunk.length, VERIFY_PIECE):
                    end = min(start + VERIFY_PIECE, chunk.offset + chunk.length)
                    crc = zlib.crc32(self._mm[start:end], crc)
                    bar.update(end - start)
                if crc_hex(crc & 0xFFFFFFFF) != chunk.crc32:
                    raise KrsError(f"corrupt artifact: chunk {chunk.name!r} fails its checksum")

    def close(self) -> None:
        self._views.clear()
        try:
            self._mm.close()
        except BufferError:
            pass  # views still alive elsewhere keep the mapping; it goes with them
        self._file.close()
