"""`hf://ORG/REPO[@REVISION]/PATH.krs`: artifacts shared through the Hugging Face Hub.

huggingface_hub does the work: a progress bar, resumable downloads into the Hub cache (HF_HUB_CACHE,
shared with every other Hub tool), and offline use once cached (HF_HUB_OFFLINE=1, or automatically
when the Hub cannot be reached). The runtime then maps the cached file in place.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .format import KrsError

PREFIX = "hf://"
_PART = r"[A-Za-z0-9][\w.-]*"
_URL = re.compile(rf"^hf://(?P<org>{_PART})/(?P<repo>{_PART})(?:@(?P<rev>[^/]+))?/(?P<file>.+)$")


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    revision: str | None

    def url(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        org, repo = self.repo_id.split("/")
        return f"{PREFIX}{org}/{repo}{rev}/{self.filename}"


def is_hub(spec: str | os.PathLike) -> bool:
    return str(spec).startswith(PREFIX)


def parse(spec: str) -> HubFile:
    m = _URL.match(spec)
    if not m or ".." in m.group("file").split("/"):
        raise KrsError(f"cannot read {spec!r}: write hf://ORG/REPO/FILE.krs (or hf://ORG/REPO@REVISION/FILE.krs)")
    return HubFile(f"{m.group('org')}/{m.group('repo')}", m.group("file"), m.group("rev"))


def download(spec: str) -> Path:
    """The local path of a Hub artifact: from the cache, else downloaded into it (resuming a partial one)."""
    ref = parse(spec)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:  # a declared dependency; only a broken install gets here
        raise KrsError("hf:// artifacts need huggingface_hub: pip install huggingface_hub") from e
    try:
        return Path(hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision))
    except LocalEntryNotFoundError as e:
        raise KrsError(f"{spec} is not in the Hub cache and the Hub cannot be reached (offline?)") from e
    except GatedRepoError as e:
        raise KrsError(f"{ref.repo_id} is gated: accept its terms on the Hub and log in (hf auth login)") from e
    except RepositoryNotFoundError as e:
        raise KrsError(f"Hub repository {ref.repo_id} not found (or private: log in with hf auth login)") from e
    except RevisionNotFoundError as e:
        raise KrsError(f"Hub repository {ref.repo_id} has no revision {ref.revision!r}") from e
    except EntryNotFoundError as e:
        raise KrsError(f"Hub repository {ref.repo_id} has no file {ref.filename!r}") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KrsError(f"cannot fetch {spec}: {message}") from e


def resolve_artifact(spec: str | os.PathLike) -> Path:
    """A local path as it is; an hf:// URL downloaded (or found in the cache)."""
    return download(str(spec)) if is_hub(spec) else Path(spec)


def cached_artifacts(cache: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """(hf:// URL, local path) of every .krs in the Hub cache, newest snapshot per file, without network."""
    if cache is None:
        try:
            from huggingface_hub.constants import HF_HUB_CACHE

            cache = HF_HUB_CACHE
        except ImportError:
            return []
    root = Path(cache)
    found: dict[str, tuple[float, Path]] = {}
    if not root.is_dir():
        return []
    for repo in sorted(root.glob("models--*--*")):
        org, _, name = repo.name[len("models--"):].partition("--")
        for path in repo.glob("snapshots/*/**/*.krs"):
            if not path.is_file():
                continue
            rel = path.relative_to(repo / "snapshots" / path.relative_to(repo / "snapshots").parts[0])
            url = f"{PREFIX}{org}/{name}/{rel.as_posix()}"
            mtime = path.stat().st_mtime
            if url not in found or mtime > found[url][0]:
                found[url] = (mtime, path)
    return [(url, path) for url, (_, path) in sorted(found.items())]
