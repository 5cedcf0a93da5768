"""The sleep worker's start-up scheduling (``SOMNA_SLEEP_SCHED``), in a child process:
SCHED_IDLE cannot be undone without privileges, so the test process must not take it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, os, sys, threading
import torch
from consolidation.sleep_worker import apply_scheduling
from infra.settings import Settings
before = threading.Thread(target=threading.Event().wait, daemon=True)  # started before
before.start()
policy = apply_scheduling(Settings(), sys.argv[1])
after = []
t = threading.Thread(target=lambda: after.append(os.sched_getscheduler(0)))  # started after
t.start(); t.join()
print(json.dumps({
    "policy": policy,
    "main": os.sched_getscheduler(0),
    "before": os.sched_getscheduler(before.native_id),
    "after": after[0],
    "threads": torch.get_num_threads(),
}))
"""


def probe(sched: str, device: str) -> dict:
    env = dict(os.environ, SOMNA_SLEEP_SCHED=sched)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, device], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policy")
def test_idle_puts_every_thread_under_sched_idle_with_one_torch_thread():
    got = probe("idle", "cuda")  # "idle" is asked for: the device does not matter
    assert got["policy"] == "idle" and got["threads"] == 1
    assert got["main"] == got["before"] == got["after"] == os.SCHED_IDLE


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policy")
def test_auto_is_idle_on_the_cpu_only_and_normal_leaves_it():
    assert probe("auto", "cpu")["policy"] == "idle"
    for sched, device in (("auto", "cuda"), ("normal", "cpu")):
        got = probe(sched, device)
        assert got["policy"] == "normal" and got["main"] == os.SCHED_OTHER, (sched, device)
