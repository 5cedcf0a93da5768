"""Event decoding: every kind of bad input becomes an InvalidEvent with a clear reason."""

from __future__ import annotations

import json

import pytest

from streams.records import (
    FastWeightsPublished,
    Interaction,
    InvalidEvent,
    Reply,
    decode,
    reply_id_for,
)


def _interaction(**over: object) -> dict:
    base = {
        "schema_version": 1,
        "event_id": "e1",
        "scope_id": "alice",
        "session_id": "s1",
        "role": "user",
        "text": "alice reports to bob.",
        "ts": 1.0,
    }
    base.update(over)
    return base


def test_round_trip() -> None:
    ev = Interaction.model_validate(_interaction())
    assert decode(ev.to_bytes(), Interaction) == ev


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00", "not valid UTF-8"),
        (b"[1, 2]", "JSON list"),
        (json.dumps(_interaction(schema_version=2)).encode(), "unknown schema_version 2"),
        (json.dumps({k: v for k, v in _interaction().items() if k != "text"}).encode(), "text"),
        (json.dumps(_interaction(role="robot")).encode(), "role"),
        (json.dumps(_interaction(scope_id="../x")).encode(), "scope_id"),
        (json.dumps(_interaction(scope_id="a/b")).encode(), "scope_id"),
        (json.dumps(_interaction(text="x" * 20_000)).encode(), "over the limit"),
        (None, "empty payload"),
    ],
)
def test_bad_input_says_why(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent) as err:
        decode(raw, Interaction)
    assert reason in err.value.reason


def test_reply_id_is_deterministic() -> None:
    assert reply_id_for("e1") == reply_id_for("e1") != reply_id_for("e2")
    r = Reply(
        reply_id=reply_id_for("e1"),
        event_id="e1",
        scope_id="alice",
        text="bob",
        base_model_version="1",
        latency_ms=3.0,
        ts=1.0,
    )
    assert decode(r.to_bytes(), Reply) == r


def test_sha256_must_be_hex() -> None:
    payload = {
        "schema_version": 1,
        "scope_id": "alice",
        "version": "3",
        "artifact_uri": "mlflow-artifacts:/x",
        "sha256": "nothex",
        "watermark": 10,
        "base_model_version": "1",
        "job_id": "j",
    }
    with pytest.raises(InvalidEvent, match="sha256"):
        decode(json.dumps(payload).encode(), FastWeightsPublished)
