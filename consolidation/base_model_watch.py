"""Noticing a new ``production`` base model while a worker runs, without a restart.

A worker loads the base model once, at start. When an operator moves ``production`` (a
new checkpoint, or back to an older one), :class:`BaseModelWatch` sees it on its next poll
(one registry call per interval), downloads and loads the new version off the event loop,
and hands it to the worker's callback. Each worker decides what a new base model means
for what it holds: the stream agent (``streams/agent.py``) swaps the model in on its
engine thread and drops every scope's memory; the sleep worker takes it between batches.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from consolidation.base_model import (
    BASE_MODEL_NAME,
    PRODUCTION,
    BaseModel,
    base_model_version,
    load_base_model,
)

log = logging.getLogger(__name__)

POLL_SECONDS = 30.0


class BaseModelWatch:
    """Polls the registry's ``alias`` of the base model; calls ``on_change`` with the new
    model when it points at a version other than the one served.

    Fast weights are states of one base model: after a change a worker must not mix them.
    Dropped scopes reload from fast weights consolidated with the new version once `somna
    memory rebuild` has run, or else from their unconsolidated events only.
    """

    def __init__(
        self,
        tracking_uri: str,
        served_version: str,
        on_change: Callable[[BaseModel], Awaitable[None]],
        *,
        alias: str = PRODUCTION,
        name: str = BASE_MODEL_NAME,
        interval: float = POLL_SECONDS,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.served_version = served_version
        self.on_change = on_change
        self.alias = alias
        self.name = name
        self.interval = interval

    async def check(self) -> BaseModel | None:
        """One poll: the new model after ``on_change`` took it, or None when unchanged."""
        version = await asyncio.to_thread(
            base_model_version, self.tracking_uri, alias=self.alias, name=self.name
        )
        if version is None or version == self.served_version:
            return None  # an alias removed by hand: keep serving what we have
        base = await asyncio.to_thread(load_base_model, self.tracking_uri, version, name=self.name)
        await self.on_change(base)
        log.info("base model %s: now serving v%s (was v%s)", self.name, version,
                 self.served_version)  # fmt: skip
        self.served_version = version
        return base

    async def poll(self) -> None:
        """:meth:`check` for a worker's loop (every ``interval`` seconds): a registry error
        is logged and the served model kept; the next poll tries again."""
        try:
            await self.check()
        except Exception as e:  # noqa: BLE001 (registry away: keep serving, poll again)
            log.warning("base model watch: %s", e)
