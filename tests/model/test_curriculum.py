"""model/curriculum.py: a variant's stages chain through --init-from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.curriculum import main, parse_variant


def test_a_variant_is_kind_and_seed() -> None:
    v = parse_variant("n4:7")
    assert (v.kind, v.seed, v.name) == ("n4", 7, "facts-n4-s7")
    with pytest.raises(Exception, match="KIND:SEED"):
        parse_variant("n3:1")


def test_stages_chain_and_end_within_the_budget(tmp_path: Path) -> None:
    # Full attention has two stages; a tiny batch keeps the minute on a small CPU.
    assert main(["full:0", "--budget-s", "60", "--out", str(tmp_path), "--batch-size", "2"]) == 0
    final = tmp_path / "facts-full-s0"
    commands = (final / "COMMAND.txt").read_text().strip().splitlines()
    assert len(commands) == 2 and "--init-from" in commands[1]
    assert str(tmp_path / "facts-full-s0-stage1") in commands[1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = summary["variants"]["facts-full-s0"]["stages"]
    assert [s["rc"] for s in stages] == [0, 0] and all(s["steps"] > 0 for s in stages)
    assert (final / "train.log").read_text().startswith("step 50 loss")
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["total_steps"] == sum(s["steps"] for s in stages)
