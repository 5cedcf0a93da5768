"""A content-addressed copy of fresh fast-weights artifacts, on the data dir workers share.

The sleep worker already shares ``data_dir`` with the stream worker (the Parquet history
lives there). After registering a version it drops a copy of the artifact here, named by
its sha256, before publishing; the agent reads that copy instead of downloading it through
the tracking server, which saves two HTTP round trips per hot swap. MLflow stays the
record: the agent still checks the version and its sha256 in the registry and hashes the
bytes it reads; a missing or damaged copy (another host, pruned) falls back to a download.

Only the swap right after a publish needs the copy, so copies older than ``KEEP_SECONDS``
are pruned by the writer.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

KEEP_SECONDS = 600.0
PRUNE_EVERY = 256  # copies written between two prunes
_written = 0


def root(data_dir: Path) -> Path:
    return Path(data_dir) / "fast-weights"


def path_for(blob_root: Path, sha256: str) -> Path:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a sha256: {sha256[:80]!r}")  # never a path from an event
    return blob_root / f"{sha256}.safetensors"


def put(blob_root: Path, sha256: str, src: Path) -> None:
    """Copy ``src`` (whose sha256 the caller computed) under its hash; best effort."""
    global _written
    try:
        dest = path_for(blob_root, sha256)
        if dest.is_file():
            return
        blob_root.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{sha256}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)  # readers never see a partial file
        _written += 1
        if _written % PRUNE_EVERY == 0:
            prune(blob_root)
    except OSError as e:  # a full or read-only disk costs a download, not the version
        log.warning("no local copy of artifact %s: %s", sha256[:12], e)


def find(blob_root: Path, sha256: str) -> Path | None:
    try:
        path = path_for(blob_root, sha256)
    except ValueError:
        return None
    return path if path.is_file() else None


def prune(blob_root: Path, keep_seconds: float = KEEP_SECONDS) -> int:
    """Remove copies older than ``keep_seconds``; returns how many."""
    cutoff, removed = time.time() - keep_seconds, 0
    for p in blob_root.glob("*.safetensors"):
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink()
                removed += 1
        except FileNotFoundError:
            pass  # pruned by another writer
    return removed
