"""The infra commands as a user runs them: one-line errors, --fetch-jars, doctor."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infra.cli import app
from infra.kafka import jar_cache_dir, jars_ready
from infra.ports import free_port


def test_a_setup_error_is_one_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "kafka" / "data").mkdir(parents=True)
    (tmp_path / "kafka" / "data" / "meta.properties").write_text("garbage\n")
    done = subprocess.run(
        [sys.executable, "-m", "infra", "kafka", "--data-dir", str(tmp_path),
         "--port", str(free_port()), "--controller-port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert "--data-dir" in done.stderr


@pytest.mark.skipif(not jars_ready(), reason="the Kafka jars are not cached yet")
def test_fetch_jars_prints_the_cache_dir() -> None:
    result = CliRunner().invoke(app, ["kafka", "--fetch-jars"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(jar_cache_dir())


def test_doctor_names_the_fix_for_missing_java(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.delenv("SOMNA_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.setenv("COLUMNS", "300")
    result = CliRunner().invoke(app, ["doctor", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 1
    assert "openjdk-17-jre-headless" in result.output
