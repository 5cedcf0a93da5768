"""Settings for every Somna process, read from the environment (prefix ``SOMNA_``).

One object, validated on construction, so that a worker, a test and the CLI agree on
where the data dir is and which broker and tracking server to talk to.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOMNA_", extra="ignore")

    # Where Kafka logs, the MLflow db and artifacts, and the Parquet history live.
    data_dir: Path = Path(".somna")
    # An existing cluster; when unset, `somna up` starts the embedded broker.
    kafka_bootstrap: str | None = None
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    # An existing tracking server; when unset, `somna up` starts `mlflow server`.
    mlflow_uri: str | None = None
    mlflow_port: int = 5000
    # Same count for all co-partitioned topics: one worker owns a scope's everything.
    partitions: int = Field(default=4, ge=1, le=1024)
    # Tokens of a scope that are waiting to be consolidated before a sleep job is emitted.
    chunk_tokens: int = Field(default=256, ge=8)
    # Seconds of silence after which a scope's partial chunk is consolidated anyway.
    idle_seconds: float = Field(default=30.0, gt=0)
    # Seconds after which a sleep job whose fast weights never came back is sent again.
    sleep_job_retry_seconds: float = Field(default=600.0, gt=0)
    # Offline recurrence passes per sleep job.
    sleep_passes: int = Field(default=4, ge=1, le=64)
    # Longest interaction text accepted, in UTF-8 bytes; longer goes to dead letters.
    max_text_bytes: int = Field(default=16_384, ge=1)
    # Dollars per GPU-hour, for `somna cost`.
    gpu_dollars_per_hour: float = Field(default=2.5, ge=0)
    # Port of the Prometheus endpoint of a worker (0 = pick a free one).
    metrics_port: int = 0
    # Tumbling window of the Parquet history writer: one file per partition per window.
    history_window_seconds: float = Field(default=5.0, gt=0)
    # Scopes whose memory the inference agent keeps loaded (LRU); the rest reload on demand.
    agent_max_scopes: int = Field(default=1024, ge=1)
    # Torch threads of the agent's engine. One: with two, one other busy process on a
    # 2-core box made a 3-question call 42 ms at p50 and 210 at p99 instead of 21 and 32
    # (each op waits for both threads; `somna bench contention`). 0: torch's default.
    agent_torch_threads: int = Field(default=1, ge=0, le=256)
    # CPU priority (nice) of the agent, so that its questions are not held behind the
    # tracking server, the broker and the aggregators on a shared box: of the whole worker
    # when the agent runs alone in it (`somna up`), else of its engine thread only. The
    # engine thread alone at -10: hot swap p99 349-490 ms against 495-1,202 at 0 (older
    # code); the agent's worker at -10 (event loop, artifact reads and engine): p99
    # 134-187 ms in 4 runs of 5 (the fifth: a 200 ms broker stall, 321), against 136-402
    # (3 runs of 8 under 200) with only its engine thread (`somna bench swap`, 2-core
    # Intel box).
    # Lowering it needs CAP_SYS_NICE; without, the agent keeps the priority it was given.
    agent_nice: int = Field(default=-10, ge=-20, le=19)
    # Consumer group of `somna worker stream` (None: derived from its roles).
    stream_group: str | None = None
    # A stable name of this stream worker in its group (Kafka static membership): restarted
    # under the same name it takes its partitions back at once, instead of after the
    # session timeout. Each worker of a group needs its own; None: dynamic membership.
    stream_instance_id: str | None = None
    # CPU scheduling of the sleep worker. "idle": SCHED_IDLE and one torch thread, so that
    # it only gets CPU time nothing else wants and sleeping beside an agent does not slow
    # its turns; "normal": as started; "auto": "idle" when sleep runs on the CPU.
    sleep_sched: Literal["auto", "idle", "normal"] = "auto"
    # The sleep worker wakes what each new version leaves pending for the agents, so that
    # their swaps wake only what came after (consolidation/prewake.py). Needs the agents
    # on this data dir; off, every swap re-wakes its scope's events after the watermark.
    sleep_prewake: bool = True

    @field_validator("kafka_bootstrap", "mlflow_uri")
    @classmethod
    def _blank_is_none(cls, v: str | None) -> str | None:
        return v or None

    @cached_property
    def history_dir(self) -> Path:
        return self.data_dir / "history"

    @property
    def bootstrap(self) -> str:
        """The broker to use: the existing cluster, or the embedded one."""
        return self.kafka_bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_uri or f"http://127.0.0.1:{self.mlflow_port}"


def get_settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]
