"""What Flyte's task cache keys on: data by content (SHA-256), the run by its fingerprint, versions from the code.

- ``prepare_data`` keys on the data section of the config, whose ``source`` is rewritten to ``sha256:<digest>.<ext>``
  for a file: a changed byte is a miss, the same bytes in another place (or uploaded again) are a hit. A folder
  source (shards of one table, see ``workflows.data``) becomes ``sha256:<digest>/``, the digest taken over each
  shard's name and bytes in reading order: one changed byte, a renamed or an added shard is a miss; an identical
  folder elsewhere is a hit (files the loader skips, ``_SUCCESS`` and the like, are not in it).
- ``train_model`` keys on the prepared data's content hash and the run fingerprint (the config without the settings
  that only observe a run: ``report_to`` and the like, see ``workflows.fingerprint``). ``workdir`` is not in the key
  either: it only says where checkpoints live, and a resumed run ends bit-identical to an uninterrupted one.
- Every cache version is ``CACHE_VERSION``: bump ``fingerprint.PIPELINE_VERSION`` (or the checkpoint format) and every
  older result is a miss. ``pyflyte run --overwrite-cache`` forces a fresh run of cached tasks.
"""

from __future__ import annotations

import hashlib
import os
from typing import Annotated

from flytekit import HashMethod
from flytekit.types.directory import FlyteDirectory

from trainer_lib.versions import FORMAT_VERSION

from .config import ConfigError, PipelineConfig
from .fingerprint import PIPELINE_VERSION, config_digest

CACHE_VERSION = f"pipeline{PIPELINE_VERSION}-checkpoint{FORMAT_VERSION}"
#: how a content-addressed source is written in ``data.source``
SOURCE_PREFIX = "sha256:"
SOURCE_SUFFIXES = (".csv", ".parquet")
_CHUNK = 1 << 20


def file_digest(path: str, digest=None) -> str:
    """SHA-256 of a file's bytes."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_digest(root: str, paths: list[str]) -> str:
    """SHA-256 over each of ``paths``' path relative to ``root`` and its bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        file_digest(path, digest)
        digest.update(b"\0")
    return digest.hexdigest()


def tree_digest(root: str) -> str:
    """SHA-256 over every file's relative path and bytes under ``root``, in sorted order."""
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        paths.extend(os.path.join(folder, name) for name in sorted(files))
    return files_digest(root, paths)


def _directory_hash(directory: FlyteDirectory) -> str:
    return tree_digest(directory.download())


#: a folder output whose cache identity is its content, not the (per-execution) place it was written to
ContentDirectory = Annotated[FlyteDirectory, HashMethod(_directory_hash)]


def run_fingerprint(config: PipelineConfig) -> str:
    """The run's identity (the same as the checkpoints' resume check): settings that only observe a run are out."""
    return config_digest(config)


def source_suffix(*names: str | None) -> str:
    """``.csv`` or ``.parquet``, from the first of ``names`` that has one of them."""
    for name in names:
        if name:
            suffix = os.path.splitext(str(name).split("?", 1)[0])[1].lower()
            if suffix in SOURCE_SUFFIXES:
                return suffix
    raise ConfigError(f"data: expected a .csv or .parquet file, got {next((n for n in names if n), None)!r}")


def content_addressed(source_path: str, *names: str | None) -> str:
    """``sha256:<digest><suffix>``: the ``data.source`` that stands for a file's content in a cache key."""
    return f"{SOURCE_PREFIX}{file_digest(source_path)}{source_suffix(*names, source_path)}"


def folder_addressed(folder: str) -> str:
    """``sha256:<digest>/``: the ``data.source`` that stands for a folder of shards (the ones the loader reads)."""
    from .data import source_files

    return f"{SOURCE_PREFIX}{files_digest(folder, source_files(folder))}/"
