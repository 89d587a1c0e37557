"""Checkpoints by name from the Hugging Face Hub: `hf-hub:org/name` or `hf-hub:org/name@revision` -> the
snapshot folder `huggingface_hub` keeps in its cache, and a `HubSource` saying what it is.

Only the files of a model folder in safetensors are fetched (`ALLOW_PATTERNS`), never a pickle: a repo
whose weights are `pytorch_model.bin` or `.pth` only is refused. The folder is then read as any local model
folder (`checkpoint.read_checkpoint`), through the same checks; the revision is resolved to the commit
the snapshot is of, and the SHA-256 of each weight file is taken on the bytes read (and compared with
the digest the Hub records for it, which names the file in the cache).

`huggingface_hub` reads `HF_HUB_CACHE` and `HF_HUB_OFFLINE` when it is imported; this module reads them
at each call (`hub_cache`, `hub_offline`), so a process that changes them is honoured.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import CheckpointError
from .names import MODEL_CONFIG_NAME, PROCESSOR_NAME, SHARD_INDEX_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
# What a model folder is read from (config.json, preprocessor_config.json, model.safetensors or its
# shards and their index); nothing else of the repo is downloaded (other formats, other toolkits' files).
ALLOW_PATTERNS = (
    MODEL_CONFIG_NAME,
    PROCESSOR_NAME,
    WEIGHTS_NAME,
    SHARD_INDEX_NAME,
    "model-*-of-*.safetensors",
)
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubSource:
    """Where a checkpoint came from on the Hub: the repo, the commit its files are of, and the SHA-256
    of each weight file (file name -> digest), taken on the bytes read."""

    repo: str
    revision: str  # the commit hash the snapshot is of
    requested: str | None = None  # the revision asked for (a branch, tag or commit); None: main
    sha256: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The name that loads these very files again: `hf-hub:org/name@commit`."""
        return f"{HUB_PREFIX}{self.repo}@{self.revision}"

    def as_dict(self) -> dict[str, Any]:
        """The run record's entry: repo, requested and resolved revision, and the weight files' digests."""
        return {
            "repo": self.repo,
            "revision": self.revision,
            "requested": self.requested,
            "sha256": dict(self.sha256),
        }


def is_hub_name(path: object) -> bool:
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """`hf-hub:org/name[@revision]` -> (repo, revision or None)."""
    repo, _, revision = name[len(HUB_PREFIX) :].partition("@")
    if not _REPO.match(repo) or ".." in repo or (revision == "" and "@" in name):
        raise CheckpointError(f"{name}: not a Hub name; expected hf-hub:org/name or hf-hub:org/name@revision")
    return repo, revision or None


def hub_cache() -> str | None:
    """The cache folder as the environment names it now: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    None (huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "on", "yes", "true")


def download(name: str) -> tuple[Path, HubSource]:
    """The snapshot folder of `name` (downloaded unless cached) and its source; the digests are not
    taken yet (`expected_digests` gives those the Hub records, `read_checkpoint` checks them)."""
    repo, revision = parse_hub_name(name)
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as error:
        raise CheckpointError(
            f"{name}: Hub names need huggingface_hub (pip install huggingface_hub)"
        ) from error
    offline = hub_offline()
    try:
        folder = huggingface_hub.snapshot_download(
            repo,
            revision=revision,
            cache_dir=hub_cache(),
            allow_patterns=list(ALLOW_PATTERNS),
            local_files_only=offline,
        )
    except GatedRepoError as error:
        raise CheckpointError(
            f"{name}: a gated repo; accept its terms on the Hub and log in (hf auth login)"
        ) from error
    except RepositoryNotFoundError as error:
        raise CheckpointError(
            f"{name}: no such repo on the Hub (or it is private: log in with hf auth login)"
        ) from error
    except RevisionNotFoundError as error:
        raise CheckpointError(f"{name}: the repo has no revision {revision!r}") from error
    except LocalEntryNotFoundError as error:
        where = hub_cache() or constants.HF_HUB_CACHE
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise CheckpointError(
            f"{name}: {reason} and {repo}@{revision or 'main'} is not in the cache at {where}; download it "
            "once online, or point HF_HUB_CACHE at a cache that holds it"
        ) from error
    except HfHubHTTPError as error:
        raise CheckpointError(
            f"{name}: the Hub refused the download: {str(error).splitlines()[0]}"
        ) from error
    folder = Path(folder)
    source = HubSource(repo, folder.name, revision)
    _check_weights(name, folder)
    return folder, source


def _check_weights(name: str, folder: Path) -> None:
    """Refuse a snapshot without safetensors weights, naming the pickles it holds instead."""
    if (folder / WEIGHTS_NAME).is_file() or (folder / SHARD_INDEX_NAME).is_file():
        return
    pickles = sorted(path.name for path in folder.iterdir() if path.suffix.lower() in PICKLE_SUFFIXES)
    held = f"it holds only {', '.join(pickles)}" if pickles else f"it has no {WEIGHTS_NAME} or shard index"
    raise CheckpointError(
        f"{name}: {held}; vitkit reads safetensors only (a pickle can run code when it is loaded)"
    )


def expected_digests(files: tuple[Path, ...]) -> dict[Path, str | None]:
    """Each weight file of a snapshot -> the SHA-256 the Hub records for it, or None. A file stored with
    Git LFS (every weight file of a model repo) is kept in the cache under that digest (`blobs/<sha256>`,
    the snapshot's file a link to it); a small file stored in Git is named by its Git hash instead."""
    digests: dict[Path, str | None] = {}
    for path in files:
        blob = Path(os.path.realpath(path)).name
        digests[path] = blob if _SHA256.match(blob) else None
    return digests


def log_source(source: HubSource) -> None:
    digests = ", ".join(f"{file} sha256 {digest}" for file, digest in source.sha256.items())
    requested = f" ({source.requested})" if source.requested and source.requested != source.revision else ""
    log.info("%s%s: revision %s%s; %s", HUB_PREFIX, source.repo, source.revision, requested, digests)
