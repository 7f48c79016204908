"""`krasis`: pick an artifact, a GPU budget, CPU threads and a port, then serve; `krasis chat` talks to it.

Every choice is also a flag; a choice not given as a flag is asked for (showing the default and the
memory it needs) unless --yes, which takes the defaults. Answers are remembered in
$XDG_CONFIG_HOME/krasis/launcher.json (~/.config/krasis/launcher.json) and become the next defaults.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from .console import run_app
from .format import KrsError

CONFIG_NAME = "launcher.json"
MAX_TRIES = 3


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "krasis" / CONFIG_NAME


def load_config() -> dict:
    try:
        data = json.loads(config_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_config(values: dict) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(values, indent=2) + "\n")
    tmp.replace(path)
    return path


def size(n: int) -> str:
    from .info import size as fmt

    return fmt(n)


def cuda_free_bytes() -> int | None:
    """Free VRAM of the first CUDA device, or None without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info()[0])
    except Exception:  # noqa: BLE001 - a broken driver means: no GPU for us
        return None


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


@dataclass
class Candidate:
    spec: str  # what the user passes: a path or an hf:// URL
    path: Path
    note: str  # size and memory, or why it cannot be used


def describe(path: Path) -> tuple[str, object]:
    from .artifact import Artifact
    from .info import summarize

    try:
        art = Artifact(path)
    except KrsError as e:
        return f"unusable: {e}", None
    try:
        s = summarize(art)
    finally:
        art.close()
    note = (f"{s.architecture}, {s.layers} layers, {s.experts} experts, {s.quant.get('experts')}; file "
            f"{size(s.file_size)}, RAM to decode ~{size(s.ram_decode)}")
    return note + ("" if s.supported else " (architecture not supported by this krasis)"), s


def candidates() -> list[Candidate]:
    from .hub import cached_artifacts

    found = [Candidate(str(p), p, "") for p in sorted(Path.cwd().glob("*.krs")) if p.is_file()]
    cache = os.environ.get("HF_HUB_CACHE")
    found += [Candidate(url, p, "") for url, p in cached_artifacts(cache)]
    for c in found:
        c.note = describe(c.path)[0]
    return found


class Asker:
    """Prompts on stderr, answers from stdin; end of input (or --yes) takes the default."""

    def __init__(self, interactive: bool):
        self.interactive = interactive

    def say(self, text: str = "") -> None:
        print(text, file=sys.stderr, flush=True)

    def ask(self, question: str, default: str | None, check) -> object:
        """`check(answer)` returns the value or raises KrsError (the question is asked again)."""
        if not self.interactive:
            if default is None:
                raise KrsError(f"{question}: no default; give it as a flag")
            return check(default)
        for _ in range(MAX_TRIES):
            shown = f" [{default}]" if default not in (None, "") else ""
            print(f"{question}{shown}: ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:  # end of input: take the default
                print(file=sys.stderr)
                if default is None:
                    raise KrsError(f"{question}: no answer and no default")
                return check(default)
            answer = line.strip() or default
            if answer is None:
                self.say("  an answer is needed")
                continue
            try:
                return check(answer)
            except KrsError as e:
                self.say(f"  {e}")
        raise KrsError(f"{question}: no usable answer after {MAX_TRIES} tries")


def choose_artifact(asker: Asker, remembered: str | None) -> str:
    from .hub import is_hub, parse

    found = candidates()
    if found and asker.interactive:
        asker.say("Artifacts (this folder, then the Hub cache):")
        for i, c in enumerate(found, 1):
            asker.say(f"  {i}. {c.spec}\n       {c.note}")
    default = remembered or (found[0].spec if found else None)

    def check(answer: str) -> str:
        if answer.isdigit() and found:
            index = int(answer)
            if not 1 <= index <= len(found):
                raise KrsError(f"pick 1 to {len(found)}, a path or an hf:// URL")
            return found[index - 1].spec
        if is_hub(answer):
            parse(answer)
            return answer
        path = Path(answer).expanduser()
        if not path.is_file():
            raise KrsError(f"no such file: {answer}")
        return str(path.resolve())

    return asker.ask("Artifact (number, path or hf://ORG/REPO/FILE.krs)", default, check)


def choose_gpu_budget(asker: Asker, remembered: str | None, summary) -> str:
    """'cpu' (no GPU), 'auto' (free VRAM minus a margin) or a size such as 16GiB."""
    from .planner import parse_size

    free = cuda_free_bytes()
    if free is None:
        if asker.interactive:
            asker.say("GPU: no CUDA device; prefill and decode run on the CPU.")
        return "cpu"
    if asker.interactive:
        asker.say(f"GPU: {size(free)} free. The GPU holds the dense weights, the KV cache and a prefill workspace, "
                  "then as many expert layers as the budget allows; the rest stream through it for prefill and run "
                  "on the CPU (and partly over PCIe) for decode.")
        if summary is not None and summary.vram_all_experts:
            asker.say(f"  dense weights {size(summary.vram_dense)}; each expert layer "
                      f"{size(summary.vram_expert_layer)}; all {summary.moe_layers} layers resident: "
                      f"{size(summary.vram_dense + summary.vram_all_experts)} + workspace")

    def check(answer: str) -> str:
        answer = answer.strip()
        if answer.lower() in ("cpu", "0", "none", "no"):
            return "cpu"
        if answer.lower() == "auto":
            return "auto"
        n = parse_size(answer)
        if n > free:
            raise KrsError(f"{answer} is more than the {size(free)} free on the GPU")
        return answer

    return asker.ask("GPU budget (auto, cpu, or a size like 16GiB)", remembered or "auto", check)


def choose_threads(asker: Asker, remembered: int | None) -> int:
    from .planner import physical_cores

    cores = physical_cores()

    def check(answer) -> int:
        if not str(answer).isdigit() or int(answer) < 1:
            raise KrsError(f"threads must be a positive whole number, not {answer!r}")
        return int(answer)

    if asker.interactive:
        asker.say(f"CPU: {cores} physical cores, {os.cpu_count()} logical; decode is memory-bound, "
                  "one thread per physical core is usually best.")
    return asker.ask("CPU threads", str(remembered or cores), check)


def choose_port(asker: Asker, remembered: int | None, host: str) -> int:
    def check(answer) -> int:
        if not str(answer).isdigit() or not 1 <= int(answer) <= 65535:
            raise KrsError(f"a port is a number from 1 to 65535, not {answer!r}")
        if not port_free(host, int(answer)):
            raise KrsError(f"port {answer} on {host} is in use")
        return int(answer)

    return asker.ask(f"Port on {host}", str(remembered or 8000), check)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=False,
                  help="Launch an OpenAI-compatible krasis server (asks for what no flag gives), or chat with one.")


@app.callback(invoke_without_command=True)
def launch(
    ctx: typer.Context,
    artifact: str = typer.Option(None, "--artifact", "-a", help="A .krs path or hf://ORG/REPO/FILE.krs."),
    gpu_budget: str = typer.Option(None, "--gpu-budget", help="auto, cpu, or the VRAM to use (e.g. 16GiB)."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads (default: physical cores)."),
    port: int = typer.Option(None, "--port", min=1, max=65535, help="TCP port (default 8000)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    api_key: str = typer.Option(None, "--api-key", envvar="KRASIS_API_KEY", help="Require this bearer key."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Requests that may wait; more get HTTP 429."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Never ask: take the remembered or default choices."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Make the choices, print the command, don't serve."),
    save: bool = typer.Option(True, "--save/--no-save", help="Remember the choices for next time."),
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    remembered = load_config()
    asker = Asker(interactive=not yes)
    if artifact is None:
        artifact = choose_artifact(asker, remembered.get("artifact"))
    from .hub import is_hub, resolve_artifact

    if not is_hub(artifact) and not Path(artifact).is_file():
        raise KrsError(f"artifact not found: {artifact}")
    local = resolve_artifact(artifact)  # an hf:// artifact is downloaded (or found in the cache) now
    note, summary = describe(local)
    if summary is None:
        raise KrsError(note.removeprefix("unusable: "))
    if asker.interactive:
        asker.say(f"  {artifact}: {note}")
    if gpu_budget is None:
        gpu_budget = choose_gpu_budget(asker, remembered.get("gpu_budget"), summary)
    if threads is None:
        threads = choose_threads(asker, remembered.get("threads"))
    if port is None:
        port = choose_port(asker, remembered.get("port"), host)
    choices = {"artifact": artifact, "gpu_budget": gpu_budget, "threads": threads, "port": port, "host": host}
    if save:
        path = save_config({**remembered, **choices})
        print(f"remembered these choices in {path}", file=sys.stderr)
    command = ["krasis-run", artifact, "--serve", "--host", host, "--port", str(port), "--threads", str(threads)]
    if gpu_budget == "cpu":
        command += ["--device", "cpu"]
    elif gpu_budget != "auto":
        command += ["--gpu-budget", gpu_budget]
    print("same as: " + shlex.join(command) + (" --api-key ..." if api_key else ""), file=sys.stderr, flush=True)
    if dry_run:
        print(json.dumps(choices))
        return
    from .runtime import load
    from .server import run_server

    device = "cpu" if gpu_budget == "cpu" else "auto"
    budget = None if gpu_budget in ("cpu", "auto") else gpu_budget
    rt = load(local, device=device, threads=threads, progress=True,
              **({"gpu_budget": budget} if budget else {}))
    run_server(rt, artifact, host=host, port=port, api_key=api_key, max_queue=max_queue)


# ---------------------------------------------------------------- krasis chat


def _request(url: str, api_key: str | None, body: dict | None = None, timeout: float = 600):
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    return urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout)


def _http_message(e) -> str:
    try:
        return json.loads(e.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return str(e)


@app.command(help="Chat in the terminal with a running krasis (or any OpenAI-compatible) server. "
                  "/reset clears the history, /system TEXT sets the system message, /exit quits; "
                  "Ctrl-C stops a reply.")
def chat(
    url: str = typer.Option(None, "--url", help="Server base URL (default: http://127.0.0.1:<remembered port>/v1)."),
    api_key: str = typer.Option(None, "--api-key", envvar="KRASIS_API_KEY", help="Bearer key, if the server has one."),
    model: str = typer.Option(None, "--model", help="Model id (default: the server's first)."),
    system: str = typer.Option(None, "--system", help="System message."),
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", min=1, help="Most tokens per reply."),
    temperature: float = typer.Option(None, "--temperature", min=0.0, help="Default: the server's."),
) -> None:
    import urllib.error

    if url is None:
        url = f"http://127.0.0.1:{load_config().get('port', 8000)}/v1"
    url = url.rstrip("/")
    try:
        if model is None:
            with _request(url + "/models", api_key, timeout=30) as r:
                model = json.loads(r.read())["data"][0]["id"]
    except urllib.error.HTTPError as e:
        raise KrsError(f"{url}: {_http_message(e)}") from None
    except (urllib.error.URLError, OSError) as e:
        raise KrsError(f"cannot reach a server at {url} ({getattr(e, 'reason', e)}): start one with `krasis`") from None
    print(f"chatting with {model} at {url}; /reset, /system TEXT, /exit", file=sys.stderr, flush=True)
    history: list[dict] = []
    while True:
        print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            print(f"(system message {'set' if system else 'cleared'})", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True}
        if temperature is not None:
            body["temperature"] = temperature
        reply: list[str] = []
        try:
            with _request(url + "/chat/completions", api_key, body) as r:
                for raw in r:
                    raw = raw.decode("utf-8").strip()
                    if not raw.startswith("data: ") or raw == "data: [DONE]":
                        continue
                    event = json.loads(raw[len("data: "):])
                    if "error" in event:
                        raise KrsError(event["error"].get("message", "server error"))
                    delta = event["choices"][0].get("delta", {}).get("content") if event["choices"] else None
                    if delta:
                        reply.append(delta)
                        sys.stdout.write(delta)
                        sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
        except urllib.error.HTTPError as e:
            history.pop()
            print(f"error: {_http_message(e)}", file=sys.stderr)
            continue
        except (urllib.error.URLError, OSError) as e:
            raise KrsError(f"lost the server at {url}: {getattr(e, 'reason', e)}") from None
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})


def main() -> None:
    run_app(app, "krasis")
