"""The names that lived here before the registry code was split by what it does.

New code imports the module that does the job:
- ``consolidation.tracking``: the MLflow client, experiments, aliases, file hashes;
- ``consolidation.base_model``: the served base model (``somna-hybrid``, ``production``);
- ``consolidation.fast_weights``: each scope's versions (register, lineage, ``live``);
- ``consolidation.fast_weights_load``: verify and load a published version;
- ``consolidation.retraction_record``: retracted events recorded on a scope's model.

This module stays for the importers outside consolidation/ (streams/history.py,
streams/worker.py, streams/engine.py, benchmarks/pipeline.py, tests/streams, tests/chaos)
until they move to those modules.
"""

from __future__ import annotations

from consolidation.base_model import (
    BASE_MODEL_NAME,
    CHECKPOINT_SHA_TAG,
    PRODUCTION,
    BaseModel,
    base_model_version,
    checkpoint_sha256,
    download_base_model,
    ensure_base_model,
    register_base_model,
    shipped_checkpoint,
)
from consolidation.fast_weights import (
    FAST_WEIGHTS_FILE,
    FAST_WEIGHTS_PREFIX,
    LINEAGE_TAGS,
    LIVE,
    FastWeights,
    Lineage,
    fast_weights_model_name,
    find_version_by_job,
    get_version,
    latest_live,
    list_scopes,
    list_versions,
    published,
    published_for_version,
    published_from_tags,
    register_fast_weights,
    scope_from_model_name,
    set_live,
    upload_artifact,
    write_artifact,
)
from consolidation.fast_weights_load import load_fast_weights, registered_versions, remember
from consolidation.retraction_record import record_retraction, retracted_event_ids
from consolidation.tracking import (
    BASE_EXPERIMENT,
    SLEEP_EXPERIMENT,
    client,
    experiment_id,
    sha256_file,
)

__all__ = [
    "BASE_EXPERIMENT", "BASE_MODEL_NAME", "CHECKPOINT_SHA_TAG", "FAST_WEIGHTS_FILE",
    "FAST_WEIGHTS_PREFIX", "LINEAGE_TAGS", "LIVE", "PRODUCTION", "SLEEP_EXPERIMENT",
    "BaseModel", "FastWeights", "Lineage", "base_model_version", "checkpoint_sha256",
    "client", "download_base_model", "ensure_base_model", "experiment_id",
    "fast_weights_model_name", "find_version_by_job", "get_version", "latest_live",
    "list_scopes", "list_versions", "load_fast_weights", "published",
    "published_for_version", "published_from_tags", "record_retraction",
    "register_base_model", "register_fast_weights", "registered_versions",
    "remember", "retracted_event_ids", "scope_from_model_name", "set_live",
    "sha256_file", "shipped_checkpoint", "upload_artifact", "write_artifact",
]  # fmt: skip
