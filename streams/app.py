"""The Faust application of the streaming worker: one App, its topics declared once.

Choices, and why:
- Keys and values are raw bytes: decoding is ours (``streams.records.decode``), so that a
  bad payload becomes a dead letter instead of a Faust serializer crash (invariant 6).
- ``at_least_once`` with ``producer_acks=-1``: Faust flushes the producer before it commits
  offsets, and everything we produce is idempotent by construction (reply_id from event_id,
  history file names from offsets, job ids from watermarks), so a redelivery repeats an
  output instead of losing one (invariant 4). ``exactly_once`` would add a transactional
  producer per partition for no extra guarantee downstream readers can see.
- Tables live in memory and are rebuilt from their changelog topic on start; no standby
  replicas, so that a table only ever holds the partitions this worker owns.
- The consumer group id is the App id; roles split over processes get their own group.
- The inference agent is not a Faust agent: it consumes in a group of its own, the App id
  plus ``-agent`` (streams/agent_consumer.py), hosted as a service of this App. An App of
  the agent role alone has no Faust agents, only the service and the timers.
"""

from __future__ import annotations

from dataclasses import dataclass

import faust

from infra.settings import Settings
from infra.topics import DEAD_LETTERS, FAST_WEIGHTS, INTERACTIONS, REPLIES, RETRACTIONS, SLEEP_JOBS

GROUP_PREFIX = "somna-stream"
ALL_ROLES = ("agent", "history", "consolidator")
# How `somna up` and `somna bench swap` deploy the roles: the agent in a stream worker of
# its own, the aggregators in another (the consolidator's bursts of sleep jobs held the
# agent's event loop during swaps; measured in benchmarks/swap.py).
AGENT_ROLES = ("agent",)
AGGREGATOR_ROLES = ("history", "consolidator")


def group_id(roles: tuple[str, ...] = ALL_ROLES) -> str:
    """One consumer group per set of roles, so split deployments do not steal partitions."""
    roles = tuple(sorted(roles))
    if roles == tuple(sorted(ALL_ROLES)):
        return GROUP_PREFIX
    return GROUP_PREFIX + "-" + "-".join(roles)


def broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


def create_app(settings: Settings, *, app_id: str = GROUP_PREFIX) -> faust.App:
    # Faust's own table directory, empty with in-memory stores; its default is
    # "<app id>-data" in the working directory (one per test group id). It must exist.
    datadir = settings.data_dir / "faust" / app_id
    datadir.mkdir(parents=True, exist_ok=True)
    return faust.App(
        app_id,
        broker=broker_urls(settings.bootstrap),
        autodiscover=False,
        store="memory://",
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        table_standby_replicas=0,
        processing_guarantee="at_least_once",
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # A killed worker's partitions move after this long; heartbeats keep flowing while
        # the model works, since torch runs off the event loop (see streams/agent.py).
        broker_session_timeout=20.0,
        broker_heartbeat_interval=3.0,
        consumer_group_instance_id=settings.stream_instance_id,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        datadir=str(datadir),
    )


@dataclass
class Topics:
    interactions: faust.TopicT
    replies: faust.TopicT
    retractions: faust.TopicT
    sleep_jobs: faust.TopicT
    fast_weights: faust.TopicT
    dead_letters: faust.TopicT


def declare_topics(app: faust.App) -> Topics:
    """Each topic once; they are provisioned by `infra.topics.provision` before the worker."""

    def topic(name: str) -> faust.TopicT:
        return app.topic(
            name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        )

    return Topics(
        interactions=topic(INTERACTIONS),
        replies=topic(REPLIES),
        retractions=topic(RETRACTIONS),
        sleep_jobs=topic(SLEEP_JOBS),
        fast_weights=topic(FAST_WEIGHTS),
        dead_letters=topic(DEAD_LETTERS),
    )
