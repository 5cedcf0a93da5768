"""The offline half of Somna: sleep jobs in, versioned fast weights out.

- ``sleep_worker``: the Kafka consumer group on ``somna.sleep-jobs`` (and retractions);
- ``planner``: a job, retraction or rebuild -> what to sleep (or the version that answers it);
- ``turns``: a scope's remembered turns in an offset range (Parquet history + topic tail);
- ``batch``: one batched ``lm.sleep`` over many scopes, artifacts, versions, cost;
- ``registry``: the MLflow registry (base model ``somna-hybrid@production``, one registered
  model per scope with alias ``live``), artifact checks, tombstones of retracted events;
- ``purge``, ``retraction``, ``rollback``: correcting memory; ``views``, ``cost``, ``cli``:
  `somna memory ...` and `somna cost`; ``metrics``: Prometheus.
"""
