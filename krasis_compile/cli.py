"""`krasis-compile MODEL -o OUT.krs`: the command line of the compiler."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import typer

from krasis_run.console import run_app

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(help="Compile a Hugging Face BF16 safetensors checkpoint (folder or Hub repo id) into one "
                  ".krs artifact that krasis-run memory-maps.")
def compile_cmd(
    model: str = typer.Argument(..., help="Checkpoint folder, or Hub repo id such as Qwen/Qwen3-30B-A3B "
                                          "(fetched into the Hub cache; works offline once cached)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output artifact path (written atomically)."),
    quant: str = typer.Option("q4", "--quant", help="Routed-expert codec: q4 (4-bit, a scale and zero per group "
                                                     "of --q4-group columns), q8, bf16."),
    dense_quant: str = typer.Option("q8", "--dense-quant",
                                    help="Codec of attention, dense MLP and lm_head matrices: q8, bf16 or q4."),
    q4_group: int = typer.Option(32, "--q4-group",
                                 help="Columns per q4 scale/zero: 32 (5.0 bits a weight, the lower error) or 64 "
                                      "(4.5 bits, as llama.cpp's Q4_0: ~10% fewer bytes read a decoded token, "
                                      "~15% more error)."),
    sections: str = typer.Option("gpu,cpu", "--sections",
                                 help="Expert layouts to write: gpu (stacked tiles), cpu (per-expert blocks)."),
    revision: str = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    rounding: str = typer.Option("refit", "--rounding",
                                 help="refit: least-squares refit of each group's scales (lower error); "
                                      "minmax: plain min/max rounding (faster)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bar."),
    model_card: bool = typer.Option(True, "--model-card/--no-model-card",
                                    help="Write a model card (README.md) beside the artifact, ready for hf upload."),
) -> None:
    from .compile import compile_model  # torch import deferred until the arguments are good

    report = compile_model(
        model, out, quant=quant, dense_quant=dense_quant,
        sections=tuple(s.strip() for s in sections.split(",") if s.strip()),
        revision=revision, progress=not quiet, rounding=rounding, q4_group=q4_group,
    )
    gbps = report.bytes_read / report.seconds / 1e9
    print(
        f"wrote {report.out} ({report.file_size / 1e9:.3f} GB) in {report.seconds:.1f} s: "
        f"read {report.bytes_read / 1e9:.3f} GB at {gbps:.2f} GB/s, peak RSS {report.peak_rss / 2**30:.2f} GiB, "
        f"quantization rel. L2 error {report.quant_error}",
        file=sys.stderr,
    )
    if model_card:
        from .model_card import write_model_card

        print(f"wrote the model card {write_model_card(report.out)}", file=sys.stderr)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind so the temporary file is removed
    run_app(app, "krasis-compile", interrupted="interrupted; nothing written")
