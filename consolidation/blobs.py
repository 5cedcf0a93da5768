"""A content-addressed copy of fresh fast-weights artifacts, on the data dir workers share.

The sleep worker already shares ``data_dir`` with the stream worker (the Parquet history
lives there). After registering a version it drops a copy of the artifact here, named by
its sha256, and beside it the record of that registration (the ``FastWeightsPublished``
it is about to publish), before publishing. The agent reads that copy instead of
downloading it through the tracking server, and a publish that matches the record field
for field needs no registry lookup either: the record is only written after the version
was registered, by a worker of this data dir, which the agent trusts as it trusts the
history beside it. The agent still hashes the bytes it reads and checks the scope in the
file. Anything else (no record, another host, a forged or altered event, a damaged or
pruned copy) goes through the registry and, if need be, a download, as before.

Only the swap right after a publish needs the copy, so copies older than ``KEEP_SECONDS``
are pruned by the writer.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from streams.records import FastWeightsPublished, InvalidEvent, decode

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


def record_path(blob_root: Path, sha256: str) -> Path:
    return path_for(blob_root, sha256).with_suffix(".json")


def put(blob_root: Path, published: FastWeightsPublished, src: Path) -> None:
    """Copy ``src`` (registered as ``published``, whose sha256 the caller computed) under
    its hash, then the record of its registration; best effort."""
    global _written
    try:
        dest = path_for(blob_root, published.sha256)
        blob_root.mkdir(parents=True, exist_ok=True)
        if not dest.is_file():
            _atomic_write(dest, src.read_bytes())
        # The record last: a record always has its bytes beside it.
        _atomic_write(record_path(blob_root, published.sha256), published.to_bytes())
        _written += 1
        if _written % PRUNE_EVERY == 0:
            prune(blob_root)
    except OSError as e:  # a full or read-only disk costs a download, not the version
        log.warning("no local copy of artifact %s: %s", published.sha256[:12], e)


def _atomic_write(dest: Path, data: bytes) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)  # readers never see a partial file


def registered_here(blob_root: Path, published: FastWeightsPublished) -> bool:
    """Whether a sleep worker of this data dir registered exactly ``published``."""
    try:
        raw = record_path(blob_root, published.sha256).read_bytes()
        return decode(raw, FastWeightsPublished) == published
    except (ValueError, OSError, InvalidEvent):
        return False


def find(blob_root: Path, sha256: str) -> Path | None:
    try:
        path = path_for(blob_root, sha256)
    except ValueError:
        return None
    return path if path.is_file() else None


def prune(blob_root: Path, keep_seconds: float = KEEP_SECONDS) -> int:
    """Remove copies older than ``keep_seconds``; returns how many."""
    cutoff, removed = time.time() - keep_seconds, 0
    for p in [*blob_root.glob("*.safetensors"), *blob_root.glob("*.json")]:
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink()
                removed += 1
        except FileNotFoundError:
            pass  # pruned by another writer
    return removed
