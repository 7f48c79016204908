"""CPU decode side by side: llama.cpp (llama-bench) and krasis on one synthetic Qwen3-30B-A3B-shaped checkpoint.

    PYTHONPATH=. python scripts/bench_llamacpp.py --llama-cpp /tmp/llamacpp/llama_cpp_python-0.3.16/vendor/llama.cpp
        [--pydeps /tmp/llamacpp/pydeps] [--layers 4] [--vocab 32000] [--threads 2] [--tokens 64] [--rounds 3]
        [--max-busy 0.3] [--wait 120] [--workdir /tmp/krasis-vs-llamacpp] [--label dev] [--json PATH]
        [--types Q4_0] [--configs q4g64/q4g64,q4/q4] [--depth 2048]

One random BF16 checkpoint (scripts/bench_decode.py's writer: hidden 2048, 32/4 heads of 128, 128
experts, top-8, width 768) goes two ways: krasis-compile (q4/q4, q4/q8, q8/q8) and llama.cpp's own
convert_hf_to_gguf.py (--outtype bf16; the checkpoint's tokenizer is replaced by a minimal byte-level
"gpt2" vocabulary of the same size, since the converter only accepts tokenizers it knows by hash)
followed by llama-quantize (Q4_0, Q8_0). krasis compiles only the CPU section with min/max rounding
(compile_missing says why); the converter runs in process with two patches (convert_bf16). Then, round
after round (each after waiting for other processes to go quiet, --max-busy), in one process, each llama-bench
text-generation run (-p 0 -n TOKENS, after -d DEPTH tokens of context) is followed by the krasis decode runs
it is compared with (after a prompt of DEPTH tokens), every run preceded by a read-bandwidth probe
(bench_decode.read_bandwidth: the higher of the native kernels' and torch's streaming of 2 GiB), because this
machine's bandwidth drifts and only same-round ratios are meaningful.
llama.cpp needs built targets llama-bench and llama-quantize under <llama-cpp>/build/bin, and the
converter's imports (mistral_common etc.) on --pydeps or the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ is not a package: reuse bench_decode's code
import bench_decode  # noqa: E402

# (llama.cpp GGUF type, [krasis (experts, dense) codecs compared with it])
PAIRS: list[tuple[str, list[tuple[str, str]]]] = [
    # q4g64: a scale and zero per 64 columns (--q4-group 64), 4.5 bits a weight as Q4_0's 18 bytes per 32 weights
    ("Q4_0", [("q4", "q4"), ("q4", "q8"), ("q4g64", "q4g64"), ("q4g64", "q8")]),
    ("Q8_0", [("q8", "q8")]),
]


def byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, so llama.cpp's BPE vocabulary finds "\\n"."""
    keep = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def synthetic_vocab(model) -> None:
    """Replaces convert_hf_to_gguf's set_vocab: the bench checkpoint's 3-word tokenizer fails its hash check,
    and decode speed only needs a vocabulary of the right size (lm_head rows) that llama.cpp loads."""
    import gguf

    n = model.hparams["vocab_size"]
    tokens = byte_tokens() + ["<|endoftext|>"] + [f"<|x{i}|>" for i in range(n - 257)]
    types = [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (n - 257)
    w = model.gguf_writer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["\u0120 \u0120"])  # the loader requires the key; one merge is enough
    w.add_eos_token_id(256)
    w.add_add_bos_token(False)


def use_llama_python(llama_dir: Path, pydeps: Path | None) -> None:
    """The converter and gguf-py of the same llama.cpp tree as the binaries (gguf is not installed here)."""
    for p in (llama_dir, llama_dir / "gguf-py", pydeps):
        if p is not None and str(p) not in sys.path:
            sys.path.insert(0, str(p))


def convert_bf16(checkpoint: Path, out: Path) -> None:
    """convert_hf_to_gguf.py --outtype bf16, in process, with the vocabulary patched (see synthetic_vocab)."""
    import convert_hf_to_gguf as conv

    conv.Qwen3MoeModel.set_vocab = synthetic_vocab
    # the converter wants transformers < 5, whose AutoConfig dict kept config.json's keys (5 renames
    # num_experts): read the checkpoint's config.json as it is
    conv.ModelBase.load_hparams = staticmethod(lambda folder, *_: json.loads((folder / "config.json").read_text()))
    saved = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(checkpoint), "--outtype", "bf16", "--outfile", str(out)]
    try:
        conv.main()
    finally:
        sys.argv = saved


def quantize(llama_dir: Path, src: Path, out: Path, qtype: str, threads: int) -> None:
    """llama-quantize with its defaults for the type (e.g. Q4_0 keeps output.weight at Q6_K)."""
    binary = llama_dir / "build/bin/llama-quantize"
    subprocess.run([str(binary), str(src), str(out), qtype, str(threads)], check=True, capture_output=True)


def gguf_bytes_per_token(path: Path) -> tuple[int, dict[str, str]]:
    """Weight bytes one decode step reads: every tensor but token_embd (one row), and of the stacked expert
    tensors (*_exps) the top-k of n_expert slices. Also returns the type of each kind of tensor."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    n_expert = reader.fields[f"{arch}.expert_count"].contents()
    k = reader.fields[f"{arch}.expert_used_count"].contents()
    total, kinds = 0, {}
    for t in reader.tensors:
        kind = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
        kinds[kind] = t.tensor_type.name
        if t.name.startswith("token_embd"):
            continue
        total += int(t.n_bytes) * k // n_expert if "_exps" in t.name else int(t.n_bytes)
    return total, kinds


def prepare(args: argparse.Namespace) -> dict:
    """Checkpoint, GGUFs and krasis artifacts in --workdir, each made only if missing (reruns reuse them)."""
    work, llama_dir = args.workdir, args.llama_cpp
    folder = work / "checkpoint"
    if not (folder / "config.json").exists():
        bench_decode.write_checkpoint(folder, args.layers, args.vocab)
    bf16 = work / "model-bf16.gguf"
    files: dict = {"gguf": {}, "krs": {}}
    for qtype, krasis in PAIRS:
        out = work / f"model-{qtype}.gguf"
        if not out.exists():
            if not bf16.exists():
                convert_bf16(folder, bf16)
            quantize(llama_dir, bf16, out, qtype, args.threads)
        files["gguf"][qtype] = out
        files["krs"].update({(q, d): work / f"bench-{q}-{d}.krs" for q, d in krasis})
    bf16.unlink(missing_ok=True)  # 5 GB that no run reads
    compile_missing(folder, files["krs"])
    return files


def compile_missing(folder: Path, artifacts: dict[tuple[str, str], Path]) -> None:
    """krasis-compile the missing artifacts side by side (each compile is mostly one core, and a fair share of a
    loaded machine goes per process). CPU section only and min/max rounding: decode reads only the CPU expert
    blocks, and the rounding changes values, not bytes, so the timed work is the default artifact's."""
    from concurrent.futures import ThreadPoolExecutor

    from scripts.synthetic_artifact import split_quant

    todo = [(q, d, path) for (q, d), path in artifacts.items() if not path.exists()]
    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
        jobs = [pool.submit(bench_decode.compile_artifact, folder, path, split_quant(q)[0], split_quant(d)[0],
                            sections=("cpu",), rounding="minmax", q4_group=split_quant(q)[1]) for q, d, path in todo]
        for job in jobs:
            job.result()


def llama_bench(llama_dir: Path, model: Path, threads: int, tokens: int, depth: int = 0) -> dict:
    """One llama-bench text-generation run after `depth` tokens of context (it does its own warm-up token
    first); tok/s and its build info."""
    cmd = [str(llama_dir / "build/bin/llama-bench"), "-m", str(model), "-p", "0", "-n", str(tokens),
           "-t", str(threads), "-r", "1", "-o", "json"] + (["-d", str(depth)] if depth else [])
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    row = json.loads(result.stdout)[0]
    keep = ("build_commit", "build_number", "cpu_info", "model_type", "model_size", "n_threads", "type_k",
            "flash_attn", "use_mmap")
    return dict(tok_s=row["avg_ts"], **{key: row.get(key) for key in keep})


def krasis_decode(path: Path, threads: int, tokens: int, depth: int = 0) -> dict:
    """bench_decode's decode timing with the native kernels after a prompt of `depth` tokens (at least 1), so
    the context positions match llama-bench's (-d depth; 0 decodes from an empty cache)."""
    r = bench_decode.bench_decode(path, threads, max(1, depth), tokens, "native")
    return dict(tok_s=r["decode_tok_s"], bytes_per_token=r["bytes_per_token"], kernels=r["kernels"])


def busy_cores(seconds: float = 2.0) -> float:
    """Cores kept busy by other processes, from /proc/stat over `seconds` while this one sleeps (the load
    average would count this benchmark's own threads for a minute after each run)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)  # minus idle and iowait

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


def wait_for_quiet(max_busy: float, timeout: float) -> tuple[float, float]:
    """Wait (up to timeout s) until other jobs use under max_busy cores; returns (seconds waited, busy cores).
    Other jobs on a 2-core machine take cores from both engines, and llama.cpp's spinning thread barrier
    may lose more to that than OpenMP's, which would bias the ratio."""
    start = time.perf_counter()
    busy = busy_cores()
    while busy > max_busy and time.perf_counter() - start < timeout:
        busy = busy_cores(5.0)
    return time.perf_counter() - start, busy


def read_through(paths: list[Path]) -> float:
    """Read each file once (into the page cache): the first round otherwise timed krasis reading its artifacts from
    disk (the 4-token warm-up pages in only the experts it routes to) at half speed. Returns GB read."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(64 << 20):
                total += len(chunk)
    return total / 1e9


def run_round(args: argparse.Namespace, files: dict, round_no: int) -> list[dict]:
    """llama.cpp then the krasis configurations compared with it, each beside its own bandwidth probe."""
    waited, busy = wait_for_quiet(args.max_busy, args.wait)
    print(f"round {round_no}: waited {waited:.0f} s for other jobs <= {args.max_busy} cores: {busy:.2f} busy",
          flush=True)
    runs = []
    for qtype, krasis in PAIRS:
        jobs = [("llama.cpp", qtype, lambda q=qtype: llama_bench(args.llama_cpp, files["gguf"][q], args.threads,
                                                                 args.tokens, args.depth))]
        jobs += [("krasis", f"{q}/{d}", lambda q=q, d=d: krasis_decode(files["krs"][(q, d)], args.threads,
                                                                        args.tokens, args.depth)) for q, d in krasis]
        for engine, config, job in jobs:
            bandwidth = bench_decode.read_bandwidth(args.threads)
            run = dict(round=round_no, pair=qtype, engine=engine, config=config, read_gb_s=bandwidth,
                       load_avg=os.getloadavg()[0], others_busy_cores=busy, **job())
            print(f"round {round_no} {engine:9s} {config:5s} {run['tok_s']:7.2f} tok/s  read {bandwidth:5.1f} GB/s  "
                  f"load {run['load_avg']:.2f}", flush=True)
            runs.append(run)
    return runs


def summarize(runs: list[dict], gguf_bytes: dict[str, int]) -> list[dict]:
    """Per krasis configuration: median tok/s of each engine, median of the same-round ratios, bytes and
    the share of the read bandwidth (effective GB/s over the median probe of that engine's runs)."""
    rows = []
    for qtype, krasis in PAIRS:
        llama = [r for r in runs if r["engine"] == "llama.cpp" and r["config"] == qtype]
        for q, d in krasis:
            mine = [r for r in runs if r["engine"] == "krasis" and r["config"] == f"{q}/{d}"]
            ratios = [k["tok_s"] / lc["tok_s"] for k, lc in zip(mine, llama, strict=True)]
            rows.append(dict(
                llama_type=qtype, krasis=f"{q}/{d}", ratios=ratios, ratio_median=statistics.median(ratios),
                llama=engine_summary(llama, gguf_bytes[qtype]), krasis_run=engine_summary(mine,
                                                                                          mine[0]["bytes_per_token"]),
            ))
    return rows


def engine_summary(runs: list[dict], per_token: int) -> dict:
    tok_s = statistics.median(r["tok_s"] for r in runs)
    read = statistics.median(r["read_gb_s"] for r in runs)
    return dict(tok_s=tok_s, tok_s_all=[r["tok_s"] for r in runs], bytes_per_token=per_token, read_gb_s=read,
                effective_gb_s=tok_s * per_token / 1e9, read_share=tok_s * per_token / 1e9 / read)


def print_table(rows: list[dict]) -> None:
    print("| llama.cpp | krasis | llama.cpp tok/s | krasis tok/s | krasis/llama.cpp | llama.cpp MB/token | "
          "krasis MB/token | llama.cpp % of read | krasis % of read | read GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lc, k = r["llama"], r["krasis_run"]
        print(f"| {r['llama_type']} | {r['krasis']} | {lc['tok_s']:.2f} | {k['tok_s']:.2f} | "
              f"{r['ratio_median']:.2f}x | {lc['bytes_per_token'] / 1e6:.1f} | {k['bytes_per_token'] / 1e6:.1f} | "
              f"{lc['read_share']:.0%} | {k['read_share']:.0%} | {lc['read_gb_s']:.1f} / {k['read_gb_s']:.1f} |")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def git_head() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent).stdout.strip()


def llama_version(llama_dir: Path) -> dict:
    """The sdist's version (llama-cpp-python) and the vendored llama.cpp commit."""
    commit = subprocess.run(["git", "-C", str(llama_dir), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    init = llama_dir.parents[1] / "llama_cpp" / "__init__.py"
    version = next((line.split('"')[1] for line in init.read_text().splitlines() if "__version__" in line), None) \
        if init.exists() else None
    return dict(llama_cpp_python=version, llama_cpp_commit=commit or None)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree with build/bin")
    ap.add_argument("--pydeps", type=Path, default=None, help="extra import path for the converter's deps")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per run (llama-bench -n)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each engine once per round)")
    ap.add_argument("--max-busy", type=float, default=0.3, help="before each round, wait until other processes "
                    "keep at most this many cores busy")
    ap.add_argument("--wait", type=float, default=120, help="longest wait for --max-busy (s); then run anyway")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/krasis-vs-llamacpp"))
    ap.add_argument("--types", default="", help="only these llama.cpp types and their pairs (e.g. Q4_0)")
    ap.add_argument("--configs", default="", help="only these krasis configurations (e.g. q4g64/q4g64,q4/q4)")
    ap.add_argument("--depth", type=int, default=0, help="tokens of context before the timed decode (llama-bench -d)")
    ap.add_argument("--label", default="dev", help="machine name in the JSON file name")
    ap.add_argument("--json", type=Path, default=None, help="default bench/results/llamacpp-vs-krasis-LABEL-DATE.json")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.types:
        PAIRS[:] = [pair for pair in PAIRS if pair[0] in args.types.split(",")]
    if args.configs:
        keep = [tuple(c.split("/")) for c in args.configs.split(",")]
        PAIRS[:] = [(qtype, [c for c in krasis if c in keep]) for qtype, krasis in PAIRS]
        PAIRS[:] = [(qtype, krasis) for qtype, krasis in PAIRS if krasis]
    use_llama_python(args.llama_cpp, args.pydeps)
    start = time.perf_counter()
    files = prepare(args)
    print(f"prepared in {time.perf_counter() - start:.0f} s", flush=True)
    gguf_info = {q: gguf_bytes_per_token(p) for q, p in files["gguf"].items()}
    print(f"read {read_through([*files['gguf'].values(), *files['krs'].values()]):.1f} GB of models through the page "
          "cache", flush=True)
    load_before = os.getloadavg()
    runs = [run for i in range(args.rounds) for run in run_round(args, files, i + 1)]
    rows = summarize(runs, {q: info[0] for q, info in gguf_info.items()})
    print_table(rows)
    record = dict(
        machine=platform.node(), label=args.label, cpu=cpu_model(), threads=args.threads, date=date.today().isoformat(),
        commit=git_head(), llama=llama_version(args.llama_cpp), layers=args.layers, vocab=args.vocab,
        tokens=args.tokens, depth=args.depth, rounds=args.rounds, load_avg_before=load_before,
        load_avg_after=os.getloadavg(),
        gguf_tensor_types={q: info[1] for q, info in gguf_info.items()}, summary=rows, runs=runs,
    )
    out = args.json or Path(f"bench/results/llamacpp-vs-krasis-{args.label}-{record['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
