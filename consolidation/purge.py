"""Purge one event from the Parquet history (the first half of a retraction).

Only the files of the scope's bucket are read. A file that holds the event (its
interaction row, and the reply rows answering it, which may repeat its text) is rewritten
without those rows to a temp name and renamed over the original, so a reader sees the old
file or the new one, and every other row stays. The file keeps its name: the name records
the offset range the history aggregator wrote, which is what makes a replay replace it.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from consolidation.exceptions import HistoryError

log = logging.getLogger(__name__)


@dataclass
class PurgeResult:
    files_rewritten: list[Path] = field(default_factory=list)
    rows_removed: int = 0
    offset: int | None = None  # the interaction's offset in somna.interactions, if found
    partition: int | None = None


def purge_event(history_dir: Path, scope_id: str, event_id: str) -> PurgeResult:
    """Remove the rows of ``event_id`` (scope ``scope_id``) from every history file."""
    from streams.history import SCHEMA, bucket_of

    result = PurgeResult()
    history_dir = Path(history_dir)
    for path in sorted(history_dir.glob(f"date=*/bucket={bucket_of(scope_id):02d}/*.parquet")):
        try:
            table = pq.read_table(path, schema=SCHEMA)
        except Exception as e:
            raise HistoryError(f"cannot read history file {path}: {e}") from e
        hit = pc.and_(pc.equal(table["event_id"], event_id), pc.equal(table["scope_id"], scope_id))
        hit = pc.fill_null(hit, False)
        n = pc.sum(hit).as_py() or 0
        if not n:
            continue
        for row in table.filter(hit).to_pylist():
            if row["kind"] == "interaction":
                result.offset, result.partition = row["offset"], row["partition"]
        kept = table.filter(pc.invert(hit))
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        pq.write_table(
            kept.cast(SCHEMA) if kept.num_rows else pa.Table.from_pylist([], schema=SCHEMA), tmp
        )
        os.replace(tmp, path)
        result.files_rewritten.append(path)
        result.rows_removed += n
        log.info("purged %d row(s) of event %s from %s", n, event_id, path)
    return result
