"""Read-only views of the registry for `somna memory ls|show` (plain data, no printing)."""

from __future__ import annotations

import math
from typing import Any

from consolidation import fast_weights, fast_weights_load, retraction_record
from consolidation.exceptions import VersionNotFound
from streams.records import FastWeightsPublished


def scopes_summary(tracking_uri: str) -> list[dict[str, Any]]:
    """One row per scope: live version, its watermark and base model, number of versions."""
    rows = []
    for scope in fast_weights.list_scopes(tracking_uri):
        versions = fast_weights.list_versions(tracking_uri, scope)
        live = fast_weights.latest_live(tracking_uri, scope)
        rows.append(
            {
                "scope_id": scope,
                "live": live.version if live else None,
                "watermark": live.watermark if live else None,
                "base_model_version": live.base_model_version if live else None,
                "versions": len(versions),
                "retracted": len(retraction_record.retracted_event_ids(tracking_uri, scope)),
            }
        )
    return rows


def _norm(tensors: dict[str, Any]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors.values()))


def _diff_norm(a: dict[str, Any], b: dict[str, Any]) -> float:
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a if k in b))


def scope_versions(
    tracking_uri: str, scope_id: str, *, last: int = 20, norms: bool = True
) -> list[dict[str, Any]]:
    """The scope's versions (oldest first, at most ``last``) with lineage, watermark, and
    the norm of S and of its change from the previous version."""
    versions = fast_weights.list_versions(tracking_uri, scope_id)
    if not versions:
        raise VersionNotFound(f"scope {scope_id!r} has no fast-weights versions")
    live = fast_weights.latest_live(tracking_uri, scope_id)
    shown = versions[-last:]
    rows, prev = [], None
    if norms and len(versions) > len(shown):
        prev = _tensors(tracking_uri, scope_id, versions[len(versions) - len(shown) - 1])
    for mv in shown:
        t = mv.tags
        row: dict[str, Any] = {
            "version": str(mv.version),
            "live": live is not None and live.version == str(mv.version),
            "watermark": int(t.get("watermark", -1)),
            "from_watermark": int(t.get("from_watermark", -1)),
            "parent_version": t.get("parent_version") or None,
            "base_model_version": t.get("base_model_version"),
            "reason": t.get("reason"),
            "job_id": t.get("job_id"),
            "tokens": int(t.get("tokens", 0)),
            "events": int(t.get("events", 0)),
            "retracted_event_id": t.get("retracted_event_id"),
            "sha256": t.get("sha256"),
            "created_ms": mv.creation_timestamp,
        }
        if norms:
            cur = _tensors(tracking_uri, scope_id, mv)
            row["norm"] = _norm(cur)
            row["delta_norm"] = _diff_norm(cur, prev) if prev is not None else row["norm"]
            prev = cur
        rows.append(row)
    return rows


def _tensors(tracking_uri: str, scope_id: str, mv) -> dict[str, Any]:
    pub: FastWeightsPublished = fast_weights.published(mv)
    return fast_weights_load.load_fast_weights(tracking_uri, pub, scope_id).tensors
