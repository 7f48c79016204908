"""The .krs container: constants of formats/KRS.md and the preamble/header (de)serialisation.

Both the compiler (writer) and the runtime (reader) import this module; nothing else defines
a magic number, an alignment or a field name of the format.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"KRASIS\x00\x1a"
FORMAT_VERSION = 2  # the newest this krasis reads and writes; 2 adds q4 groups of 64 (quant.q4_group)
ALIGN = 4096  # every chunk starts on a page boundary so a layer range can be mapped/DMA'd as is
PART_ALIGN = 64  # parts inside a chunk start on a cache line (SIMD loads)
PREAMBLE = struct.Struct("<8sIIQII")  # magic, version, flags, header_len, header_crc32, reserved
PREAMBLE_SIZE = PREAMBLE.size  # 32 bytes
MAX_HEADER_BYTES = 256 << 20  # refuse absurd header lengths before reading them

# Expert codecs and their groupings (formats/KRS.md, "Codecs").
Q4_GROUP = 32  # the default q4 group, and the activation group of the integer kernels
Q4_GROUPS = (32, 64)  # q4 columns per scale/zero (quant.q4_group): 5.0 or 4.5 bits a weight
Q4_OFFSET = 8  # w = (q - 8) * scale + zero
Q8_MAX = 127  # w = q * scale, q in [-127, 127]
CPU_BLOCK_ROWS = 64  # Q4 CPU blocks: 64 output rows, nibble d pairs row d with row d + 32
CODECS = ("q4", "q8", "bf16")
DENSE_CODECS = ("q8", "bf16", "q4")  # q4 dense: rows layout, needs every K % 32 == 0

# Chunk sections, in the order they appear inside a layer.
SECTION_DENSE = "dense"
SECTION_EXPERTS_GPU = "experts_gpu"
SECTION_EXPERTS_CPU = "experts_cpu"
SECTION_GLOBAL = "global"
SECTION_BLOB = "blob"

NUMPY_DTYPES = {"u8": "uint8", "i8": "int8", "bf16": "uint16", "f32": "float32", "i32": "int32"}
DTYPE_SIZES = {"u8": 1, "i8": 1, "bf16": 2, "f32": 4, "i32": 4}


def version_needed(header: dict) -> int:
    """The oldest format version that can read this header: an artifact with q4 groups of 32 stays version 1, so
    a krasis that predates quant.q4_group still reads it, and refuses ("upgrade krasis") one it would misread."""
    return 1 if (header.get("quant") or {}).get("q4_group", Q4_GROUP) == Q4_GROUP else 2


class KrsError(Exception):
    """A damaged, truncated or unsupported artifact. The message is one line meant for the user."""


def align_up(n: int, alignment: int = ALIGN) -> int:
    return (n + alignment - 1) // alignment * alignment


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def crc_hex(value: int) -> str:
    return f"{value:08x}"  # fixed width so the header length doesn't change when checksums are filled in


@dataclass(frozen=True)
class Preamble:
    version: int
    header_len: int
    header_crc32: int

    def pack(self) -> bytes:
        return PREAMBLE.pack(MAGIC, self.version, 0, self.header_len, self.header_crc32, 0)

    @classmethod
    def unpack(cls, raw: bytes, file_size: int) -> Preamble:
        if len(raw) < PREAMBLE_SIZE:
            raise KrsError(f"not a .krs artifact: file is {len(raw)} bytes, shorter than the preamble")
        magic, version, _flags, header_len, header_crc, _ = PREAMBLE.unpack_from(raw)
        if magic != MAGIC:
            raise KrsError("not a .krs artifact: bad magic bytes")
        if version > FORMAT_VERSION:
            raise KrsError(
                f"artifact has format version {version}; this krasis reads up to version "
                f"{FORMAT_VERSION}: upgrade krasis"
            )
        if version < 1:
            raise KrsError(f"artifact has invalid format version {version}")
        if header_len == 0 or header_len > MAX_HEADER_BYTES or PREAMBLE_SIZE + header_len > file_size:
            raise KrsError(
                f"truncated or corrupt artifact: header length {header_len} does not fit "
                f"in a file of {file_size} bytes"
            )
        return cls(version, header_len, header_crc)


def encode_header(header: dict, reserve: int | None = None) -> bytes:
    """JSON header, space-padded to `reserve` bytes (JSON ignores trailing whitespace)."""
    raw = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    if reserve is not None:
        if len(raw) > reserve:
            raise ValueError(f"header grew from {reserve} to {len(raw)} bytes")
        raw = raw.ljust(reserve, b" ")
    return raw


def decode_header(raw: bytes, expected_crc: int) -> dict:
    if crc32(raw) != expected_crc:
        raise KrsError("corrupt artifact: header checksum mismatch")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KrsError("corrupt artifact: header is not valid JSON") from e
    if not isinstance(header, dict):
        raise KrsError("corrupt artifact: header is not a JSON object")
    return header


def data_start(header_len: int) -> int:
    return align_up(PREAMBLE_SIZE + header_len)
