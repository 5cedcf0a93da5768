"""Errors of the streaming workers, under the one Somna base error."""

from __future__ import annotations

from infra.errors import SomnaError


class StreamsError(SomnaError):
    """A streaming worker cannot do what was asked (not bad input: that is a dead letter)."""


class ReplyTimeout(StreamsError):
    """No reply came back in time (is `somna worker stream` running?)."""
