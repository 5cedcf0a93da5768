"""`somna doctor`: what this machine has and lacks for Somna, each problem with its fix."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from infra.errors import SetupError
from infra.kafka import (
    JAVA_FIX,
    MAVEN_FIX,
    broker_answers,
    check_data_dir,
    find_java,
    jar_cache_dir,
    jars_ready,
)
from infra.mlflow_server import mlflow_answers
from infra.ports import port_is_free, who_listens
from infra.settings import Settings

Status = Literal["ok", "warn", "fail"]


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def java_version(java: str) -> int | None:
    """The major version of a java executable (17 for '17.0.15'), None if it will not say."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major  # "1.8" is Java 8


def check_java(settings: Settings) -> Check:
    if settings.kafka_bootstrap:
        return Check("java", "ok", "not needed: SOMNA_KAFKA_BOOTSTRAP is set")
    try:
        java = find_java()
    except SetupError:
        return Check("java", "fail", "no java on PATH or in JAVA_HOME", JAVA_FIX)
    major = java_version(java)
    if major is None or major < 11:
        return Check("java", "fail", f"{java} is Java {major or '?'}; Kafka needs 11+", JAVA_FIX)
    return Check(
        "java",
        "ok" if major >= 17 else "warn",
        f"Java {major} ({java})",
        "" if major >= 17 else "Java 17 is what Somna is tested with",
    )


def check_jars(settings: Settings) -> list[Check]:
    if settings.kafka_bootstrap:
        return [Check("kafka jars", "ok", "not needed: SOMNA_KAFKA_BOOTSTRAP is set")]
    jars = jar_cache_dir()
    if jars_ready(jars):
        return [Check("kafka jars", "ok", f"cached in {jars}")]
    mvn = shutil.which("mvn")
    return [
        Check("maven", "ok" if mvn else "fail", mvn or "no mvn on PATH", "" if mvn else MAVEN_FIX),
        Check(
            "kafka jars",
            "warn",
            f"not cached yet ({jars})",
            "run `somna kafka --fetch-jars` once (needs Maven Central)",
        ),
    ]


def check_port(name: str, port: int, answers: bool, env: str, use: str) -> Check:
    if port_is_free(port):
        return Check(f"{name} port", "ok", f"{port} is free")
    if answers:
        return Check(
            f"{name} port",
            "warn",
            f"{port}: a {name} already runs there",
            f"use it with {use}, or stop it before `somna up`",
        )
    return Check(
        f"{name} port",
        "fail",
        f"{port} is in use by {who_listens(port)}",
        f"stop that process, or pick another port with {env}",
    )


def check_ports(settings: Settings) -> list[Check]:
    checks = []
    if settings.kafka_bootstrap:
        ok = broker_answers(settings.kafka_bootstrap)
        checks.append(
            Check(
                "kafka",
                "ok" if ok else "fail",
                f"SOMNA_KAFKA_BOOTSTRAP={settings.kafka_bootstrap} "
                + ("answers" if ok else "does not answer"),
                "" if ok else "start that cluster or unset SOMNA_KAFKA_BOOTSTRAP",
            )
        )
    else:
        bootstrap = f"127.0.0.1:{settings.kafka_port}"
        checks.append(
            check_port(
                "kafka",
                settings.kafka_port,
                not port_is_free(settings.kafka_port) and broker_answers(bootstrap),
                "--port / SOMNA_KAFKA_PORT",
                f"SOMNA_KAFKA_BOOTSTRAP={bootstrap}",
            )
        )
        checks.append(
            check_port(
                "kafka controller",
                settings.kafka_controller_port,
                False,
                "SOMNA_KAFKA_CONTROLLER_PORT",
                "",
            )
        )
    if settings.mlflow_uri:
        ok = mlflow_answers(settings.mlflow_uri)
        checks.append(
            Check(
                "mlflow",
                "ok" if ok else "fail",
                f"SOMNA_MLFLOW_URI={settings.mlflow_uri} "
                + ("answers" if ok else "does not answer"),
                "" if ok else "start that server or unset SOMNA_MLFLOW_URI",
            )
        )
    else:
        uri = f"http://127.0.0.1:{settings.mlflow_port}"
        checks.append(
            check_port(
                "mlflow",
                settings.mlflow_port,
                mlflow_answers(uri),
                "--port / SOMNA_MLFLOW_PORT",
                f"SOMNA_MLFLOW_URI={uri}",
            )
        )
    return checks


def check_data_dir_sanity(settings: Settings) -> list[Check]:
    data = settings.data_dir
    if data.exists() and not data.is_dir():
        return [Check("data dir", "fail", f"{data} is a file", "pick another --data-dir")]
    probe = data if data.exists() else _nearest_existing(data)
    if not os.access(probe, os.W_OK):
        return [
            Check(
                "data dir",
                "fail",
                f"{probe} is not writable",
                "pick another --data-dir / SOMNA_DATA_DIR",
            )
        ]
    free_gb = shutil.disk_usage(probe).free / 1e9
    checks = [
        Check(
            "data dir",
            "ok" if free_gb > 2 else "warn",
            f"{data.resolve()} ({'exists' if data.exists() else 'new'}, {free_gb:.1f} GB free)",
            "" if free_gb > 2 else "free some disk space",
        )
    ]
    if not settings.kafka_bootstrap:
        try:
            cluster = check_data_dir(data / "kafka")
            checks.append(
                Check(
                    "kafka data",
                    "ok",
                    f"cluster {cluster}" if cluster else "new (formatted on start)",
                )
            )
        except SetupError as e:
            checks.append(
                Check(
                    "kafka data",
                    "fail",
                    str(e).split(". ")[0],
                    "move it away or pick another --data-dir",
                )
            )
    return checks


def _nearest_existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def check_python() -> list[Check]:
    new_enough = sys.version_info >= (3, 11)
    fix = "" if new_enough else "use Python 3.11+"
    checks = [Check("python", "ok" if new_enough else "fail", sys.version.split()[0], fix)]
    try:
        import torch

        checks.append(Check("torch", "ok", torch.__version__))
        if torch.cuda.is_available():
            checks.append(Check("cuda", "ok", torch.cuda.get_device_name(0)))
        else:
            checks.append(
                Check(
                    "cuda",
                    "warn",
                    "no GPU: sleep runs on CPU (slow, correct)",
                    "on a GPU machine install a CUDA build of torch",
                )
            )
    except ImportError:
        checks.append(Check("torch", "fail", "not installed", "pip install -e .  (in .venv)"))
    has_fla = importlib.util.find_spec("fla") is not None
    checks.append(
        Check(
            "fla",
            "ok" if has_fla else "warn",
            "flash-linear-attention installed"
            if has_fla
            else "not installed: the pure-torch gated delta rule is used",
            "" if has_fla else "on a GPU machine: pip install -e '.[gpu]'",
        )
    )
    return checks


def run_checks(settings: Settings) -> list[Check]:
    return [
        *check_python(),
        check_java(settings),
        *check_jars(settings),
        *check_ports(settings),
        *check_data_dir_sanity(settings),
    ]
