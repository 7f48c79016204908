"""Text in and out: chat template, streaming decode, stop strings, sampling, and the krasis-run CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import krasis_run
from krasis_run.sampling import sample
from krasis_run.tokenizer import StopStrings

TEXT = "Grüße, naïve café — 日本語のテキスト。 emoji 🙂🚀 and ünïcödé text."


def run_cli(*args: str) -> subprocess.CompletedProcess:
    code = "from krasis_run.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def rt(tiny_per_expert):
    return krasis_run.load(tiny_per_expert.artifact("q4", "q8"), threads=1)


def test_streaming_never_splits_a_character(rt):
    ids = rt.tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT.encode()) // 4  # byte-level pieces: multi-byte chars span tokens
    stream = rt.tokenizer.stream()
    deltas = [stream.push(t) for t in ids]
    deltas.append(stream.flush())
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_chat_template_is_applied(rt):
    text = rt.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert rt.tokenizer.eos_token_ids == {rt.tokenizer.hf.token_to_id("<|im_end|>")}


def test_chat_template_is_sandboxed(rt):
    rt.tokenizer.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(krasis_run.KrsError, match="chat template"):
        rt.tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


def test_stop_strings_hold_back_partial_matches():
    stops = StopStrings(["</end>"])
    assert stops.feed("abc</") == ("abc", False)
    assert stops.feed("en") == ("", False)
    assert stops.feed("x") == ("</enx", False)
    assert stops.feed("yy</end>zz") == ("yy", True)


def test_sampling_modes():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample(logits) == 1
    assert sample(logits, temperature=1.0, top_k=1) == 1
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = [sample(logits, 1.0, generator=g1) for _ in range(20)]
    assert a == [sample(logits, 1.0, generator=g2) for _ in range(20)]
    assert set(a) <= {0, 1, 2, 3} and len(set(a)) > 1
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, top_p=0.5, generator=g) for _ in range(30)} <= {1, 2}


def test_generate_respects_limits_and_seed(rt):
    ids = rt.tokenizer.encode("def foo():")
    assert len(list(rt.generate(ids, max_new_tokens=5, stop_token_ids=set()))) == 5
    a = list(rt.generate(ids, max_new_tokens=8, temperature=1.0, seed=3, stop_token_ids=set()))
    b = list(rt.generate(ids, max_new_tokens=8, temperature=1.0, seed=3, stop_token_ids=set()))
    assert a == b
    first = next(iter(rt.generate(ids, max_new_tokens=8)))
    eos_stop = list(rt.generate(ids, max_new_tokens=8, stop_token_ids={first}))
    assert eos_stop == []


def test_cli_generates_and_reports_speed(tiny_per_expert):
    result = run_cli(str(tiny_per_expert.artifact("q4", "q8")), "--prompt", "hello", "-n", "12",
                     "--threads", "1", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "prompt:" in result.stderr and "tok/s" in result.stderr and "resident" in result.stderr
    rt = krasis_run.load(tiny_per_expert.artifact("q4", "q8"), threads=1)
    prompt = rt.tokenizer.encode(rt.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}]))
    expected = rt.tokenizer.decode(list(rt.generate(prompt, max_new_tokens=12)))
    assert result.stdout == expected + "\n"


def test_cli_stop_string(tiny_per_expert):
    path = str(tiny_per_expert.artifact("q4", "q8"))
    full = run_cli(path, "--prompt", "x", "--no-chat", "-n", "16", "--temperature", "0").stdout.rstrip("\n")
    assert len(full) > 4
    stop = full[2:4]
    cut = run_cli(path, "--prompt", "x", "--no-chat", "-n", "16", "--temperature", "0", "--stop", stop).stdout
    assert cut == full[: full.index(stop)] + "\n"


@pytest.mark.parametrize("args,message", [
    (["--device", "tpu"], "unknown device"),
    (["--gpu-budget", "lots"], "cannot read size"),
    pytest.param(["--device", "cuda"], "no CUDA device", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA: the GPU tests cover --device cuda")),
])
def test_cli_errors(tiny_per_expert, args, message):
    result = run_cli(str(tiny_per_expert.artifact("q4", "q8")), "--prompt", "hi", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_cli_missing_artifact(tmp_path):
    result = run_cli(str(tmp_path / "none.krs"), "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr.strip() == f"krasis-run: error: artifact not found: {tmp_path / 'none.krs'}"
