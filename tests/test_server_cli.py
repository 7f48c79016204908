"""`krasis-run ART --serve` as a user starts it: a subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from fixtures import stop_process

from krasis_run.server import model_name_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not come up")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    code = "from krasis_run.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def test_serve_subprocess(tiny_per_expert):
    art = tiny_per_expert.artifact("q4", "q8")
    port = free_port()
    code = "from krasis_run.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(art), "--serve", "--port", str(port), "--threads", "1",
                             "--api-key", "k1"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "KRASIS_API_KEY": ""})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=model_name_for(art), max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    finally:
        stop_process(proc)
    stderr = proc.stderr.read()
    assert f"serving '{model_name_for(art)}' at http://127.0.0.1:{port}/v1" in stderr


@pytest.mark.parametrize("args,needle", [
    (["--serve", "--prompt", "hi"], "exclude each other"),
    ([], "give --prompt"),
])
def test_serve_argument_errors(tiny_per_expert, args, needle):
    result = run_cli(str(tiny_per_expert.artifact("q4", "q8")), *args)
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_newer_format_in_one_line(tiny_per_expert, tmp_path):
    data = bytearray(tiny_per_expert.artifact("q4", "q8").read_bytes())
    data[8:12] = (99).to_bytes(4, "little")
    art = tmp_path / "future.krs"
    art.write_bytes(bytes(data))
    result = run_cli(str(art), "--serve", "--port", str(free_port()))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "format version 99" in lines[0] and "upgrade krasis" in lines[0]
