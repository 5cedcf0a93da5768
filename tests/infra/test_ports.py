"""Picking local ports for the servers we start (infra/ports.py)."""

from __future__ import annotations

import socket

import pytest

from infra import ports
from infra.kafka import EmbeddedKafka


def test_a_picked_port_is_free_and_two_picks_are_distinct(monkeypatch: pytest.MonkeyPatch):
    port = ports.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nobody held it
    picks = iter([24000, 24000, 24001, 24000])  # two random picks that agree, then differ
    monkeypatch.setattr(ports, "free_port", lambda host="127.0.0.1": next(picks))
    assert ports.free_ports(2) == [24000, 24001]


def test_a_broker_picks_a_controller_port_unlike_its_own(monkeypatch, tmp_path):
    picks = iter([24000, 24000, 24001])
    monkeypatch.setattr(ports, "free_port", lambda host="127.0.0.1": next(picks))
    kafka = EmbeddedKafka(tmp_path, port=24000, controller_port=0)
    assert (kafka.port, kafka.controller_port) == (24000, 24001)
