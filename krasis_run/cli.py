"""`krasis-run ART --prompt ...`: generate text from a .krs artifact, streaming to stdout."""

from __future__ import annotations

import sys
import time

import typer

from .console import run_app
from .format import KrsError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@app.command(help="Memory-map a .krs artifact and generate text. The prompt goes through the model's chat "
                  "template unless --no-chat; text streams to stdout, speeds go to stderr.")
def run(
    artifact: str = typer.Argument(..., help="The .krs artifact written by krasis-compile, or hf://ORG/REPO/FILE.krs "
                                             "(downloaded into the Hub cache; works offline once cached)."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Prompt text ('-' reads standard input)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(None, "--temperature", min=0.0,
                                      help="0 = greedy. Default: the model's generation_config, else 0."),
    top_p: float = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    top_k: int = typer.Option(None, "--top-k", min=0, help="Sample among the k most likely (0 = all)."),
    seed: int = typer.Option(None, "--seed", help="Random seed for sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable)."),
    system: str = typer.Option(None, "--system", help="System message for the chat template."),
    no_chat: bool = typer.Option(False, "--no-chat", help="Feed the prompt raw, without the chat template."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads (default: physical cores)."),
    device: str = typer.Option("auto", "--device",
                               help="auto: use the GPU when CUDA is available (prefill there, decode split between "
                                    "GPU and CPU by what VRAM holds); cpu: all CPU; cuda: require the GPU."),
    gpu_budget: str = typer.Option(None, "--gpu-budget",
                                   help="VRAM krasis may use, e.g. 16GiB (default: free VRAM minus 1 GiB). Dense "
                                        "weights and the KV cache first, then whole expert layers; the other experts "
                                        "stream through VRAM for prefill and run on the CPU for decode."),
    context: int = typer.Option(None, "--context", "-c", min=1,
                                help="Tokens of context (prompt + answer) the GPU KV cache holds (default: the "
                                     "model's, at most 32768). Smaller leaves VRAM for experts."),
    verify: bool = typer.Option(False, "--verify", help="Check every chunk's checksum before running."),
    prefault: bool = typer.Option(True, "--prefault/--no-prefault",
                                  help="Map the weights the CPU decodes from at load (read into RAM if not cached, "
                                       "where they fit the available memory), not page by page on first use."),
    serve: bool = typer.Option(False, "--serve", help="Serve an OpenAI-compatible HTTP API instead of one prompt."),
    host: str = typer.Option("127.0.0.1", "--host", help="--serve: address to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="--serve: TCP port."),
    api_key: str = typer.Option(None, "--api-key", envvar="KRASIS_API_KEY",
                                help="--serve: require 'Authorization: Bearer KEY' (or set KRASIS_API_KEY)."),
    max_queue: int = typer.Option(64, "--max-queue", min=1,
                                  help="--serve: requests that may wait for the engine; more get HTTP 429."),
) -> None:
    from .runtime import load, resident_bytes  # torch import deferred until the arguments are good

    if serve and prompt is not None:
        raise KrsError("--prompt and --serve exclude each other: the server takes its prompts over HTTP")
    if not serve and prompt is None:
        raise KrsError("give --prompt TEXT (or --prompt - for standard input), or --serve")
    from .hub import resolve_artifact

    name, artifact = artifact, resolve_artifact(artifact)
    if prompt == "-":
        prompt = sys.stdin.read()
    started = time.perf_counter()
    rt = load(artifact, device=device, threads=threads, verify=verify, progress=True, gpu_budget=gpu_budget,
              context=context, prefault=prefault)
    _status(f"loaded {artifact} in {time.perf_counter() - started:.2f} s: {rt.args.num_hidden_layers} layers, "
            f"{rt.threads} threads, kernels {rt.ops.describe()}; resident {_size(resident_bytes())} "
            f"(heap {_size(resident_bytes('RssAnon'))}, mapped pages {_size(resident_bytes('RssFile'))}: weights are "
            f"read in place from the {_size(rt.placement.mapped_bytes)} mapping, {_size(rt.prefaulted)} of it "
            "mapped at load)")
    p = rt.placement
    if p.prefill_device == "cuda":
        v = p.vram_plan
        _status(f"GPU: budget {_size(p.gpu_budget)}: dense weights {_size(v['dense'])}, KV cache "
                f"{_size(v['kv_cache'])} for {p.context} tokens and prefill workspace {_size(v['workspace'])} "
                f"(both sized by --context), {len(p.resident_layers)} expert layers resident "
                f"({_size(v['resident_experts'])}), the rest streamed from the {p.prefill_section} section for "
                f"prefill; decode {rt.engine.mode} (experts not in VRAM: on the CPU, part of them read by the GPU "
                f"over PCIe)")
    if serve:
        from .server import run_server

        run_server(rt, name, host=host, port=port, api_key=api_key, max_queue=max_queue)
        return
    gen = rt.generation_config
    sampling = gen.get("do_sample", False)
    temperature = temperature if temperature is not None else (gen.get("temperature", 1.0) if sampling else 0.0)
    top_p = top_p if top_p is not None else (gen.get("top_p", 1.0) if sampling else 1.0)
    top_k = top_k if top_k is not None else (gen.get("top_k", 0) if sampling else 0)
    tok = rt.tokenizer
    if no_chat:
        text = prompt
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = tok.encode(text)
    if not ids:
        raise KrsError("the prompt encodes to no tokens")
    if len(ids) >= rt.context_length:
        raise KrsError(f"prompt has {len(ids)} tokens; the model's context holds {rt.context_length}")
    from .tokenizer import StopStrings

    decoder, stops = tok.stream(), StopStrings(stop)
    for token in rt.generate(ids, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, seed=seed):
        out, stopped = stops.feed(decoder.push(token))
        sys.stdout.write(out)
        sys.stdout.flush()
        if stopped:
            break
    else:
        sys.stdout.write(stops.feed(decoder.flush())[0] + stops.flush())
    sys.stdout.write("\n")
    sys.stdout.flush()
    t = rt.timings
    _status(f"prompt: {t.prompt_tokens} tokens, {t.prompt_tok_s():.1f} tok/s; "
            f"decode: {t.decode_tokens} tokens, {t.decode_tok_s():.2f} tok/s")


def main() -> None:
    run_app(app, "krasis-run")
