"""Rollback: move a scope's ``live`` alias back to an earlier version and publish it.

The agent swaps the published version in like any other. Its watermark is older than what
the agent has dropped from its KV, so the agent re-derives the scope's state from that
version plus the history after its watermark; the next sleep job of the scope starts from
the rolled-back version and folds that history in again (no gap, invariant 1).
"""

from __future__ import annotations

import asyncio

from consolidation import fast_weights
from infra.settings import Settings
from streams.records import FastWeightsPublished


async def rollback_async(
    settings: Settings, scope_id: str, version: str, *, publish: bool = True
) -> FastWeightsPublished:
    """Point ``live`` at ``version`` (raises VersionNotFound) and publish it."""
    from consolidation.publish import publish as publish_events

    published = await asyncio.to_thread(
        fast_weights.set_live, settings.tracking_uri, scope_id, str(version)
    )
    if publish:
        await publish_events(settings.bootstrap, [published])
    return published


def rollback(
    settings: Settings, scope_id: str, version: str, *, publish: bool = True
) -> FastWeightsPublished:
    """Synchronous :func:`rollback_async` (CLI)."""
    return asyncio.run(rollback_async(settings, scope_id, version, publish=publish))
