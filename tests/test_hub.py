"""hf:// artifacts through the real huggingface_hub code paths, offline from a pre-populated Hub cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import krasis_run
from krasis_run.format import KrsError
from krasis_run.hub import HubFile, cached_artifacts, parse

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    code = "from krasis_run.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def hub_cache(tiny_per_expert, tmp_path_factory) -> tuple[Path, dict]:
    """A Hub cache laid out as huggingface_hub writes it: blobs, a snapshot of symlinks, refs/main."""
    root = tmp_path_factory.mktemp("hubcache")
    cache = root / "hub"
    repo = cache / "models--krasis-test--tiny-krs"
    (repo / "blobs").mkdir(parents=True)
    blob = repo / "blobs" / "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
    shutil.copyfile(tiny_per_expert.artifact("q4", "q8"), blob)
    for rel in ("tiny.krs", "sub/dir/tiny.krs"):
        link = repo / "snapshots" / COMMIT / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(root / "home"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return cache, env


def test_parse():
    assert parse("hf://org/repo/file.krs") == HubFile("org/repo", "file.krs", None)
    assert parse("hf://Org-1/re.po@v2/a/b/c.krs") == HubFile("Org-1/re.po", "a/b/c.krs", "v2")
    assert parse("hf://org/repo@v2/a/b/c.krs").url() == "hf://org/repo@v2/a/b/c.krs"
    for bad in ("hf://org/file.krs", "hf://org/repo/", "hf:///repo/x.krs", "hf://org/repo/../x.krs"):
        with pytest.raises(KrsError, match="hf://ORG/REPO/FILE.krs"):
            parse(bad)


def test_run_from_hub_cache_offline(tiny_per_expert, hub_cache):
    _, env = hub_cache
    rt = krasis_run.load(tiny_per_expert.artifact("q4", "q8"), threads=1)
    prompt = rt.tokenizer.encode(rt.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}]))
    expected = rt.tokenizer.decode(list(rt.generate(prompt, max_new_tokens=8))) + "\n"
    for url in ("hf://krasis-test/tiny-krs/tiny.krs", f"hf://krasis-test/tiny-krs@{COMMIT}/sub/dir/tiny.krs"):
        hub = run_cli(url, "--prompt", "hello", "-n", "8", "--temperature", "0", "--threads", "1", env=env)
        assert hub.returncode == 0, hub.stderr
        assert hub.stdout == expected


@pytest.mark.parametrize("url,needle", [
    ("hf://krasis-test/not-cached/x.krs", "not in the Hub cache"),
    ("hf://krasis-test/tiny-krs/other.krs", "not in the Hub cache"),
    ("hf://krasis-test/tiny-krs", "hf://ORG/REPO/FILE.krs"),
])
def test_hub_errors_are_one_line(hub_cache, url, needle):
    _, env = hub_cache
    result = run_cli(url, "--prompt", "hi", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("krasis-run: error:") and len(result.stderr.strip().splitlines()) == 1
    assert needle in result.stderr


def test_cached_artifacts_are_listed(hub_cache):
    cache, _ = hub_cache
    urls = [url for url, _ in cached_artifacts(cache)]
    assert urls == ["hf://krasis-test/tiny-krs/sub/dir/tiny.krs", "hf://krasis-test/tiny-krs/tiny.krs"]
    assert cached_artifacts(cache / "missing") == []
