"""Retracted events, recorded as tags on the scope's registered model: the tombstones every
sleep worker honours (the Kafka log still holds the event's text).
"""

from __future__ import annotations

from consolidation.fast_weights import fast_weights_model_name
from consolidation.tracking import client, ensure_registered_model, is_missing

_RETRACTED_PREFIX = "retracted."


def record_retraction(tracking_uri: str, scope_id: str, event_id: str, reason: str = "") -> None:
    """Remember on the scope's registered model that ``event_id`` is retracted.

    The Kafka log still holds the event's text; every later sleep of the scope leaves it
    out (the registry is the one store all sleep workers share, wherever they run).
    """
    c = client(tracking_uri)
    name = fast_weights_model_name(scope_id)
    ensure_registered_model(c, name, {"scope_id": scope_id, "somna.kind": "fast-weights"})
    c.set_registered_model_tag(name, _RETRACTED_PREFIX + event_id, reason or "retracted")


def retracted_event_ids(tracking_uri: str, scope_id: str) -> set[str]:
    from mlflow.exceptions import MlflowException

    try:
        rm = client(tracking_uri).get_registered_model(fast_weights_model_name(scope_id))
    except MlflowException as e:
        if is_missing(e) or "not found" in str(e).lower():
            return set()
        raise
    return retracted_in(rm.tags)


def retracted_in(tags: dict[str, str]) -> set[str]:
    """The retracted event ids among a registered model's tags."""
    return {k[len(_RETRACTED_PREFIX) :] for k in tags if k.startswith(_RETRACTED_PREFIX)}
