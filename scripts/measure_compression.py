"""Does zstd pay on a .krs artifact? Ratio and decompression speed of each kind of data in it.

    python scripts/measure_compression.py                    # compiles the embedded default model (q4/q8)
    python scripts/measure_compression.py ART.krs [...] --json out.json

Groups the bytes of every tensor part by (section, codec, part): Q4 nibbles and their bf16 scales/zeros
(GPU tiles and CPU blocks), Q8 int8 values and scales, bf16 tensors (embeddings, routers), f32 norms;
plus the tokenizer (raw JSON and as stored), the JSON header, and the whole file (the transfer form).
Each group is compressed with zstd at levels 3 and 19; decompression runs single-threaded and is
compared with copying the same bytes out of the page cache (what the mmapped runtime does instead).
"""

from __future__ import annotations

import argparse
import json
import mmap
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from krasis_run.artifact import Artifact  # noqa: E402
from krasis_run.format import PREAMBLE_SIZE  # noqa: E402

LEVELS = (3, 19)


def groups(art: Artifact, mm) -> dict[str, bytearray]:
    out: dict[str, bytearray] = {}
    for name, spec in art.header["tensors"].items():
        section = art.chunks[spec["chunk"]].section
        codec = spec["codec"]
        kind = "embed" if name == "embed" else "router" if name.endswith(".router") else "lm_head" \
            if name == "lm_head" else "matrix" if len(spec.get("shape", [])) > 1 or spec.get("experts") else "vector"
        bases = [spec["offset"] + e * spec["expert_stride"] for e in range(spec["experts"])] \
            if spec.get("experts") else [spec["offset"]]
        for part, p in spec["parts"].items():
            size = {"u8": 1, "i8": 1, "bf16": 2, "f32": 4, "i32": 4}[p["dtype"]]
            for d in p["shape"]:
                size *= d
            key = f"{section} {kind} {codec}.{part} ({p['dtype']})"
            buf = out.setdefault(key, bytearray())
            for base in bases:
                buf += mm[base + p["offset"]: base + p["offset"] + size]
    return out


def measure(data: bytes, level: int) -> dict:
    c = zstandard.ZstdCompressor(level=level)
    started = time.perf_counter()
    packed = c.compress(data)
    compress_s = time.perf_counter() - started
    d = zstandard.ZstdDecompressor()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        d.decompress(packed, max_output_size=len(data))
        best = min(best, time.perf_counter() - started)
    return {"level": level, "stored": len(packed), "ratio": len(data) / max(len(packed), 1),
            "compress_MBps": len(data) / compress_s / 1e6, "decompress_MBps": len(data) / best / 1e6}


def copy_speed(data: bytes) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        bytearray(data)
        best = min(best, time.perf_counter() - started)
    return len(data) / best / 1e6


def report(path: Path) -> dict:
    art = Artifact(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        rows = {k: bytes(v) for k, v in sorted(groups(art, mm).items())}
        header_len = int.from_bytes(mm[16:24], "little")
        rows["header JSON"] = bytes(mm[PREAMBLE_SIZE:PREAMBLE_SIZE + header_len]).rstrip(b" ")
        blob = art.header["blobs"]["tokenizer.json"]
        rows["tokenizer.json (raw)"] = art.blob("tokenizer.json")
        stored = bytes(mm[blob["offset"]:blob["offset"] + blob["length"]])
        rows[f"tokenizer.json (as stored: {blob['compression']})"] = stored
        rows["whole file (transfer form)"] = bytes(mm[:])
    result = {"artifact": str(path), "file_size": art.file_size, "quant": art.header["quant"], "groups": {}}
    for key, data in rows.items():
        if not data:
            continue
        entry = {"bytes": len(data), "copy_MBps": copy_speed(data)}
        entry["zstd"] = [measure(data, level) for level in LEVELS]
        result["groups"][key] = entry
    return result


def table(result: dict) -> str:
    lines = [f"{result['artifact']} ({result['file_size'] / 2**20:.2f} MiB, experts {result['quant']['experts']}, "
             f"dense {result['quant']['dense']})",
             "| data | bytes | zstd-3 ratio | zstd-19 ratio | zstd-3 decompress MB/s | page-cache copy MB/s |",
             "|---|---|---|---|---|---|"]
    for key, g in result["groups"].items():
        z3, z19 = g["zstd"]
        lines.append(f"| {key} | {g['bytes']:,} | {z3['ratio']:.3f} | {z19['ratio']:.3f} | "
                     f"{z3['decompress_MBps']:.0f} | {g['copy_MBps']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="*", type=Path)
    parser.add_argument("--json", type=Path, help="Write the raw numbers here.")
    args = parser.parse_args()
    paths = list(args.artifacts)
    tmp = None
    if not paths:
        tmp = tempfile.TemporaryDirectory()
        model = Path(__file__).resolve().parents[1] / "krasis_compile" / "default_model"
        for quant, dense in (("q4", "q8"), ("q8", "bf16")):
            out = Path(tmp.name) / f"default-{quant}-{dense}.krs"
            subprocess.run([sys.executable, "-c", "from krasis_compile.cli import main; main()", str(model), "-o",
                            str(out), "--quant", quant, "--dense-quant", dense, "-q", "--no-model-card"], check=True)
            paths.append(out)
    results = [report(p) for p in paths]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"machine": platform.machine(), "python": platform.python_version(), "zstandard": zstandard.__version__,
            "commit": commit, "date": time.strftime("%Y-%m-%d")}
    for r in results:
        print(table(r) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
