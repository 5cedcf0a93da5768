"""Topic provisioning: idempotent, one partition count, compaction where it belongs."""

from __future__ import annotations

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
