"""Topic provisioning: idempotent, one partition count, compaction where it belongs."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from infra import topics
from infra.errors import SetupError
from tests.conftest import TEST_PARTITIONS

pytestmark = pytest.mark.kafka


async def test_topics_exist_with_one_partition_count(kafka_bootstrap: str) -> None:
    topics.provision(kafka_bootstrap, TEST_PARTITIONS)  # a second time: nothing changes
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        infos = {i["topic"]: i for i in await admin.describe_topics(list(topics.ALL_TOPICS))}
        assert {t: len(i["partitions"]) for t, i in infos.items()} == {
            t: TEST_PARTITIONS for t in topics.ALL_TOPICS
        }
        [response] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topics.FAST_WEIGHTS)]
        )
        configs = {c[0]: c[1] for c in response.resources[0][4]}
        assert configs["cleanup.policy"] == "compact"
    finally:
        await admin.close()


def test_another_partition_count_is_refused(kafka_bootstrap: str) -> None:
    with pytest.raises(SetupError, match="SOMNA_PARTITIONS"):
        topics.provision(kafka_bootstrap, TEST_PARTITIONS + 1)


async def test_existing_topics_get_somna_configs_and_keep_other_overrides(
    kafka_bootstrap: str,
) -> None:
    resource = ConfigResource(ConfigResourceType.TOPIC, topics.INTERACTIONS)

    async def configs_when(expected: dict[str, str]) -> dict[str, str]:
        # KRaft applies an AlterConfigs through its metadata log: a describe right after
        # it may still show the old values.
        for _ in range(50):
            [response] = await admin.describe_configs([resource])
            configs = {c[0]: c[1] for c in response.resources[0][4]}
            if all(configs.get(k) == v for k, v in expected.items()):
                break
            await asyncio.sleep(0.1)
        return configs

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        # As a data dir made before the 16 MiB limit, with an operator's own retention.
        old = {"max.message.bytes": "1048588", "retention.ms": "123456789"}
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topics.INTERACTIONS, old)]
        )
        assert (await configs_when(old))["max.message.bytes"] == old["max.message.bytes"]
        await topics.provision_async(kafka_bootstrap, TEST_PARTITIONS)
        configs = await configs_when({"max.message.bytes": str(topics.MAX_INTERACTION_BYTES)})
        assert configs["max.message.bytes"] == str(topics.MAX_INTERACTION_BYTES)
        assert configs["retention.ms"] == "123456789"
    finally:
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topics.INTERACTIONS,
                            topics.TOPIC_CONFIGS[topics.INTERACTIONS])]
        )  # fmt: skip
        await admin.close()
