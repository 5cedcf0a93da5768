"""The events of ../shared/DESIGN.md ("Events"): typed, versioned, validated.

Every event on a Somna topic is a UTF-8 JSON object with ``schema_version: 1``. Decoding
is strict: a payload that is not valid UTF-8, not JSON, misses a field, has an unknown
version or an oversize text raises :class:`InvalidEvent`, which the workers turn into a
dead letter (see ``streams/dead_letters.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION = 1
# Scope ids become Kafka keys, MLflow model names and Parquet partition values: keep them
# to a conservative alphabet so that `../x` or `a/b` can never become a path.
SCOPE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
DEFAULT_MAX_TEXT_BYTES = 16_384


class InvalidEvent(ValueError):
    """A payload that cannot become an event; ``reason`` is what the dead letter says."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def now() -> float:
    return time.time()


def new_id() -> str:
    return uuid.uuid4().hex


class Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @field_validator("scope_id", check_fields=False)
    @classmethod
    def _scope_id_is_safe(cls, v: str) -> str:
        if not SCOPE_ID_RE.match(v) or ".." in v:
            raise ValueError(f"scope_id {v!r} must match {SCOPE_ID_RE.pattern} and hold no '..'")
        return v


class Interaction(Event):
    event_id: str = Field(min_length=1, max_length=128)
    scope_id: str
    session_id: str = Field(min_length=1, max_length=128)
    role: Literal["user", "assistant", "system"]
    text: str
    ts: float


def reply_id_for(event_id: str) -> str:
    """Deterministic: a redelivered event gets the same reply_id (invariant 4)."""
    return "r-" + hashlib.sha256(event_id.encode("utf-8")).hexdigest()[:32]


class Reply(Event):
    reply_id: str
    event_id: str
    scope_id: str
    text: str
    base_model_version: str
    fast_weights_version: str | None = None
    latency_ms: float
    ts: float


class Retraction(Event):
    scope_id: str
    event_id: str = Field(min_length=1, max_length=128)
    reason: str = ""
    ts: float


class SleepJob(Event):
    job_id: str
    scope_id: str
    from_watermark: int  # first Kafka offset (of somna.interactions) the job covers
    to_watermark: int  # last offset it covers, inclusive
    parent_version: str | None = None
    passes: int = Field(ge=1, le=64)
    reason: Literal["chunk_full", "idle", "rebuild", "retraction"] = "chunk_full"


class FastWeightsPublished(Event):
    scope_id: str
    version: str
    artifact_uri: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    watermark: int
    base_model_version: str
    job_id: str


class DeadLetter(Event):
    source_topic: str
    partition: int
    offset: int
    error: str
    payload: str  # base64 of the raw bytes, so that invalid UTF-8 survives
    ts: float


E = TypeVar("E", bound=Event)


def decode(raw: bytes | None, kind: type[E], *, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> E:
    """Bytes from Kafka to a validated event, or :class:`InvalidEvent` saying why."""
    if raw is None:
        raise InvalidEvent("empty payload (tombstone)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidEvent(f"payload is not valid UTF-8: {e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidEvent(f"payload is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidEvent(f"payload is a JSON {type(obj).__name__}, expected an object")
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InvalidEvent(
            f"unknown schema_version {version!r} (this worker reads {SCHEMA_VERSION})"
        )
    body = obj.get("text")
    if isinstance(body, str) and len(body.encode("utf-8")) > max_text_bytes:
        raise InvalidEvent(
            f"text is {len(body.encode('utf-8'))} bytes, over the limit of {max_text_bytes}"
        )
    try:
        return kind.model_validate(obj)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise InvalidEvent(f"invalid {kind.__name__}: {errs}") from None
