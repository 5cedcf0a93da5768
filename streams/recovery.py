"""Resuming the stream partitions after a rebalance without losing events (Faust 0.15).

Faust's ``Recovery`` ends every rebalance (a worker's start included) with: resume the
stream partitions, ``await`` the seek to the committed offsets, then
``flow_control.resume()``, which empties every stream's queue. While it awaits the seek,
the fetcher already delivers records from the resumed partitions. Found by the chaos suite
(kill -9 of the stream worker, then a restart under load; 14 to 31 of 120 turns without a
reply, their history rows present):

- the records still queued for a slow stream (the agent, busy loading scopes) are dropped
  by ``flow_control.resume()`` without being acked: no reply;
- the seek resets the fetcher's read offset; records fetched before it and delivered after
  it look like a jump past offsets that were never read, which Faust takes for a gap in the
  log (compaction, transaction markers) and counts as acked; the copies fetched again
  after the seek are behind the read offset and dropped. The next commit moves past the
  events, and a later restart does not see them either.

:class:`SeekFirstRecovery` does the same steps in a safe order: seek while the stream
partitions are still paused, then resume them and the flow with no ``await`` in between,
so that no record reaches a stream's queue before the queues are emptied, and the first
record fetched is the committed one.

This narrows the window but does not close it: a record produced while a restarted worker
restores its table is still sometimes never consumed (about 1 run in 7 of
``test_the_consolidation_table_survives_a_restart``, with or without this class), so both
that test and the kill -9 chaos scenario stay marked as intermittent.
"""

from __future__ import annotations

import asyncio
from typing import Any

from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery


class SeekFirstRecovery(Recovery):
    # Faust resumes the streams in two places: after a table recovery (this app has a
    # table: the consolidator's) and after a rebalance with no tables (other role sets).

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        self.log.info("Restore complete!")
        await self.app.on_rebalance_complete.send()
        self._set_recovery_ended()
        done = [
            asyncio.ensure_future(
                table.on_recovery_completed(
                    self.actives_for_table[table], self.standbys_for_table[table]
                )
            )
            for table in self.tables.values()
        ]
        if done:
            await asyncio.wait(done)
        await self._seek_then_resume(generation_id)

    async def _resume_streams(self, generation_id: int = 0) -> None:
        await self.app.on_rebalance_complete.send()
        await self._seek_then_resume(generation_id)

    async def _seek_then_resume(self, generation_id: int) -> None:
        app: Any = self.app
        consumer = app.consumer
        if app.consumer_generation_id != generation_id:
            self.log.warning("Recovery rebalancing again")
            return
        streams = {tp for tp in consumer.assignment() if not self._is_changelog_tp(tp)}
        if streams:
            self.log.info("Seek stream partitions to committed offsets (still paused).")
            await self._wait(consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
            if app.consumer_generation_id != generation_id:
                self.log.warning("Recovery rebalancing again")
                return
        self.completed.set()
        # From here to flow_control.resume() (which empties the streams' queues): no await.
        if streams:
            consumer.resume_partitions(streams)
        self.log.info("Resuming flow...")
        app.flow_control.resume()
        consumer.resume_flow()
        await app._fetcher.maybe_start()
        self.tables.on_actives_ready()
        if not app.assignor.assigned_standbys():
            self.tables.on_standbys_ready()
        app.on_rebalance_end()
        self.log.info("Worker ready")


class SeekFirstTableManager(TableManager):
    """Faust's table manager with :class:`SeekFirstRecovery` (``faust.App(TableManager=...)``)."""

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = SeekFirstRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
