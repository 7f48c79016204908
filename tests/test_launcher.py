"""The `krasis` launcher: flags only, prompts fed on stdin, remembered answers; `krasis chat`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from fixtures import stop_process
from test_server_cli import free_port, wait_healthy
from typer.testing import CliRunner

import krasis_run
from krasis_run import launcher
from krasis_run.launcher import app
from krasis_run.server import KrasisServer, ServerThread, model_name_for

ENV = {**os.environ, "PYTHONPATH": str(Path(krasis_run.__file__).parents[1])}  # the tests run from another folder


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_per_expert):
    """A fresh config folder, an empty Hub cache, and a working folder holding one artifact."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(tiny_per_expert.artifact("q4", "q8"), work / "tiny.krs")
    monkeypatch.chdir(work)
    monkeypatch.setattr(launcher, "cuda_free_bytes", lambda: None)
    return tmp_path


def launch(*args: str, input: str | None = None):
    result = CliRunner().invoke(app, list(args), input=input)
    return result, (json.loads(result.stdout.strip().splitlines()[-1]) if result.exit_code == 0 else None)


def test_flags_only_never_prompt(home):
    port = free_port()
    result, choices = launch("--artifact", "tiny.krs", "--threads", "1", "--port", str(port), "--gpu-budget", "cpu",
                             "--dry-run")
    assert result.exit_code == 0, result.output
    assert choices == {"artifact": "tiny.krs", "gpu_budget": "cpu", "threads": 1, "port": port, "host": "127.0.0.1"}
    assert "?" not in result.stderr and "[" not in result.stderr  # nothing was asked
    assert f"krasis-run tiny.krs --serve --host 127.0.0.1 --port {port} --threads 1 --device cpu" in result.stderr
    saved = json.loads((home / "config" / "krasis" / "launcher.json").read_text())
    assert saved["port"] == port and saved["artifact"] == "tiny.krs"


def test_prompts_from_stdin_are_remembered(home):
    port = free_port()
    result, choices = launch("--dry-run", input=f"1\n3\nnot-a-port\n{port}\n")
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "1. " in err and "tiny.krs" in err and "RAM to decode" in err  # the list, with memory
    assert "physical cores" in err and "no CUDA device" in err
    assert "a port is a number" in err  # a bad answer is asked again
    assert choices["artifact"].endswith("tiny.krs") and choices["threads"] == 3 and choices["port"] == port
    # next time the remembered answers are the defaults: Enter everywhere
    result, again = launch("--dry-run", input="\n\n\n")
    assert again == choices and f"[{port}]" in result.stderr
    # and --yes takes them without asking
    result, yes = launch("--dry-run", "--yes")
    assert yes == choices


def test_gpu_budget_prompt_shows_memory(home, monkeypatch):
    monkeypatch.setattr(launcher, "cuda_free_bytes", lambda: 8 << 30)
    result, choices = launch("--dry-run", "--artifact", "tiny.krs", "--threads", "1", "--port", str(free_port()),
                             input="64GiB\n4GiB\n")
    assert result.exit_code == 0, result.output
    assert "8.00 GiB free" in result.stderr and "each expert layer" in result.stderr
    assert "more than the 8.00 GiB free" in result.stderr
    assert choices["gpu_budget"] == "4GiB"
    assert "--gpu-budget 4GiB" in result.stderr


def test_errors_are_one_line(home, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no artifacts here, nothing remembered
    result, _ = launch("--yes")
    assert result.exit_code != 0
    result = subprocess.run([sys.executable, "-c", "from krasis_run.launcher import main; main()", "--yes",
                             "--artifact", "missing.krs"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env=ENV)
    assert result.returncode == 2 and result.stderr.strip() == "krasis: error: artifact not found: missing.krs"


def test_launcher_serves(home, tiny_per_expert):
    port = free_port()
    code = "from krasis_run.launcher import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "--artifact", "tiny.krs", "--threads", "1", "--port",
                             str(port), "--gpu-budget", "cpu", "--yes"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=ENV)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = client.completions.create(model="tiny", prompt="def", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens <= 3
    finally:
        stop_process(proc)


def test_chat(tiny_per_expert, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    rt = krasis_run.load(tiny_per_expert.artifact("q4", "q8"), threads=1)
    name = model_name_for(tiny_per_expert.artifact("q4", "q8"))
    tok = rt.tokenizer

    def expected(messages):
        ids = tok.encode(tok.apply_chat_template(messages))
        return tok.decode(list(rt.generate(ids, max_new_tokens=6, temperature=0.0)))

    first = expected([{"role": "user", "content": "hello"}])
    after_reset = expected([{"role": "system", "content": "terse"}, {"role": "user", "content": "again"}])
    with ServerThread(KrasisServer(rt, name, api_key="k")) as s:
        result = CliRunner().invoke(app, ["chat", "--url", s.url + "/v1", "--api-key", "k", "-n", "6",
                                          "--temperature", "0"],
                                    input="hello\n/reset\n/system terse\nagain\n/exit\nignored\n")
        assert result.exit_code == 0, result.output
        assert result.stdout == f"{first}\n{after_reset}\n"
        assert f"chatting with {name}" in result.stderr
        assert httpx.get(s.url + "/health").json()["served"] == 2
        bad = CliRunner().invoke(app, ["chat", "--url", s.url + "/v1", "--api-key", "wrong"], input="hi\n")
        assert bad.exit_code != 0 and isinstance(bad.exception, krasis_run.KrsError)
        assert "incorrect API key" in str(bad.exception)
    gone = CliRunner().invoke(app, ["chat", "--url", f"http://127.0.0.1:{free_port()}/v1"], input="hi\n")
    assert "cannot reach a server" in str(gone.exception)
