"""Topic names (constants, one place) and their provisioning."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

INTERACTIONS = "somna.interactions"
REPLIES = "somna.replies"
RETRACTIONS = "somna.retractions"
SLEEP_JOBS = "somna.sleep-jobs"
FAST_WEIGHTS = "somna.fast-weights"
DEAD_LETTERS = "somna.dead-letters"

# Keyed by scope and co-partitioned: the same partition count for all of them.
CO_PARTITIONED = (INTERACTIONS, REPLIES, RETRACTIONS, SLEEP_JOBS, FAST_WEIGHTS)
ALL_TOPICS = (*CO_PARTITIONED, DEAD_LETTERS)

# Per-topic configs. Everything not listed keeps the broker defaults (delete, 7 days):
# - interactions, replies: the log; the Parquet history is the long-term record (and what
#   a retraction purges), so Kafka needs them only until the history has flushed them.
# - retractions: commands, applied to the history once; a delete policy like the log.
# - sleep-jobs: a work queue; compacting by scope could drop a job that is still due.
# - fast-weights: compacted, since only the latest version per scope (the key) matters
#   to an agent that (re)joins; older versions stay in MLflow for rollback.
# - dead-letters: kept longer (30 days) so that someone can look at them.
# - interactions: records up to 16 MiB (the broker's default is 1 MiB). A text over the
#   worker's limit (SOMNA_MAX_TEXT_BYTES) must reach the worker to be dead-lettered with
#   its reason (invariant 6); refused at the producer, the user would learn nothing more
#   than "too large". Consumers still fetch it: Kafka returns a first record larger than
#   the fetch size whole.
MAX_INTERACTION_BYTES = 16 * 1024 * 1024
TOPIC_CONFIGS: dict[str, dict[str, str]] = {
    INTERACTIONS: {"max.message.bytes": str(MAX_INTERACTION_BYTES)},
    FAST_WEIGHTS: {"cleanup.policy": "compact"},
    DEAD_LETTERS: {"retention.ms": str(30 * 24 * 3600 * 1000)},
}

_TOPIC_ALREADY_EXISTS = 36  # Kafka error code
_DYNAMIC_TOPIC_CONFIG = 1  # DescribeConfigs v1+ config_source: a topic-level override


def provision(bootstrap: str, partitions: int, replication: int = 1) -> None:
    """Create the Somna topics that are missing; check the ones that exist.

    Idempotent. Every topic gets ``partitions`` partitions (the co-partitioned ones must
    agree, or a scope's events and state would land on different workers); an existing
    topic with another count is an error, since Kafka cannot shrink a topic.
    """
    from infra.sync import run_sync

    run_sync(provision_async(bootstrap, partitions, replication))


async def provision_async(bootstrap: str, partitions: int, replication: int = 1) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaConnectionError, for_code

    from infra.errors import SetupError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    try:
        await admin.start()
    except KafkaConnectionError as e:
        await admin.close()
        raise SetupError(
            f"cannot reach Kafka at {bootstrap}: start it (`somna up` or `somna kafka`), "
            "or set SOMNA_KAFKA_BOOTSTRAP to a running cluster"
        ) from e
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in ALL_TOPICS if t not in existing]
        if missing:
            new = [
                NewTopic(t, partitions, replication, topic_configs=TOPIC_CONFIGS.get(t, {}))
                for t in missing
            ]
            response = await admin.create_topics(new)
            for topic, code, *message in response.topic_errors:
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise SetupError(
                        f"creating topic {topic} on {bootstrap} failed: "
                        f"{for_code(code).__name__} {message[0] if message else ''}"
                    )
        if len(missing) < len(ALL_TOPICS):
            await _align_configs(admin, bootstrap)
        for info in await _describe_when_ready(admin, list(ALL_TOPICS)):
            count = len(info["partitions"])
            if count != partitions:
                raise SetupError(
                    f"topic {info['topic']} on {bootstrap} has {count} partitions, not "
                    f"{partitions}: set SOMNA_PARTITIONS={count} to use it as it is, or "
                    "point at a fresh cluster / data dir (Kafka cannot shrink a topic)"
                )
    finally:
        await admin.close()


async def _align_configs(admin: object, bootstrap: str) -> None:
    """Give topics that already exist the configs listed above (a data dir made by an older
    Somna, or topics made by hand). AlterConfigs replaces a topic's whole set of
    overrides, so the overrides of other keys are read first and kept."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
    from aiokafka.errors import for_code

    from infra.errors import SetupError

    resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in TOPIC_CONFIGS]
    changes = []
    for response in await admin.describe_configs(resources):  # type: ignore[attr-defined]
        v0 = response.API_VERSION == 0  # v0 has is_default where v1+ has config_source
        for _code, _message, _type, topic, entries in response.resources:
            if topic not in TOPIC_CONFIGS:
                continue
            overrides = {
                e[0]: e[1] for e in entries if (not e[3] if v0 else e[3] == _DYNAMIC_TOPIC_CONFIG)
            }
            wanted = {**overrides, **TOPIC_CONFIGS[topic]}
            if wanted != overrides:
                changes.append(ConfigResource(ConfigResourceType.TOPIC, topic, wanted))
    if not changes:
        return
    for response in await admin.alter_configs(changes):  # type: ignore[attr-defined]
        for code, message, _type, topic in response.resources:
            if code:
                raise SetupError(
                    f"setting the configs of topic {topic} on {bootstrap} failed: "
                    f"{for_code(code).__name__} {message or ''}"
                )
    log.info("topic configs updated: %s", ", ".join(c.name for c in changes))


async def _describe_when_ready(admin: object, topics: list[str], timeout: float = 30.0) -> list:
    """Topic metadata, waiting out the moment after creation when a topic has no leaders."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while True:
        infos = await admin.describe_topics(topics)  # type: ignore[attr-defined]
        ready = all(
            i["error_code"] == 0
            and i["partitions"]
            and all(p["leader"] >= 0 for p in i["partitions"])
            for i in infos
        )
        if ready or time.monotonic() > deadline:
            return infos
        await asyncio.sleep(0.2)
