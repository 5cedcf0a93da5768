"""Thin `somna` subcommands of the model package: `somna train`.

The only module under model/ that touches non-torch libraries (typer here; mlflow and
matplotlib lazily, inside the command), so model/ still runs alone on a GPU machine.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

BASE_MODEL_NAME = "somna-hybrid"
TRAIN_EXPERIMENT = "somna-train"


def train_command(
    task: Annotated[str, typer.Option(help="facts (dialogue facts) or khop (graph).")] = "facts",
    passes: Annotated[int, typer.Option(help="Sleep passes N per chunk.")] = 4,
    memory: Annotated[
        str, typer.Option(help="sleep: chunked wake/sleep/evict; full: keep the whole cache.")
    ] = "sleep",
    pattern: Annotated[str, typer.Option(help="Layer pattern, G = GDN, A = attention.")] = "AG",
    n_layers: Annotated[int, typer.Option(help="Blocks (the pattern is tiled).")] = 4,
    d_model: Annotated[int, typer.Option(help="Residual width.")] = 64,
    n_heads: Annotated[int, typer.Option(help="Heads per mixer.")] = 2,
    head_dim: Annotated[int, typer.Option(help="Per-head width (S is head_dim^2).")] = 32,
    chunk: Annotated[int, typer.Option(help="Tokens per sleep chunk = attention window.")] = 64,
    fact_chunks: Annotated[int, typer.Option(help="Chunks of facts per sequence.")] = 3,
    question_chunks: Annotated[int, typer.Option(help="Chunks of questions per sequence.")] = 2,
    chain: Annotated[
        int, typer.Option(help="facts: edges per chain (max hops); khop: max hops.")
    ] = 3,
    fact_offset: Annotated[
        str, typer.Option(help="facts: where a chain sits in its chunk: start or random.")
    ] = "start",
    train_gap_chunks: Annotated[
        int, typer.Option(help="facts: up to this many chatter chunks before the questions.")
    ] = 0,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine).")] = 3e-3,
    lm_weight: Annotated[
        float, typer.Option(help="Auxiliary next-token loss on all tokens (0 = answers only).")
    ] = 0.0,
    slow_decay_init: Annotated[
        bool, typer.Option(help="Start GDN heads with slow decay (long memory).")
    ] = False,
    init_from: Annotated[
        Path | None, typer.Option(help="Continue from this checkpoint dir's weights.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of init and training data.")] = 0,
    eval_every: Annotated[int, typer.Option(help="Steps between quick evaluations.")] = 250,
    eval_examples: Annotated[int, typer.Option(help="Held-out examples per eval seed.")] = 64,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = default).")] = 0,
    max_minutes: Annotated[
        float, typer.Option(help="Wall-clock budget; the LR schedule follows it (0 = none).")
    ] = 0.0,
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")] = Path(
        "model/checkpoints/run"
    ),
    mlflow_uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow tracking URI; log the run and register the checkpoint.",
            envvar="SOMNA_MLFLOW_URI",
        ),
    ] = None,
) -> None:
    """Train the hybrid end to end through its sleep passes; save, log and register it."""
    from model.train import TrainConfig, train

    cfg = TrainConfig(
        task=task,
        passes=passes,
        memory=memory,
        pattern=pattern,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        head_dim=head_dim,
        chunk=chunk,
        fact_chunks=fact_chunks,
        question_chunks=question_chunks,
        chain=chain,
        fact_offset=fact_offset,
        train_gap_chunks=train_gap_chunks,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        lm_weight=lm_weight,
        slow_decay_init=slow_decay_init,
        init_from=str(init_from) if init_from else None,
        seed=seed,
        eval_every=eval_every,
        eval_examples=eval_examples,
        threads=threads,
        max_minutes=max_minutes,
        out=str(out),
        command="somna " + shlex.join(sys.argv[1:]),
    )
    tracker = _MlflowTracker(mlflow_uri, cfg) if mlflow_uri else None
    result = train(cfg, log=tracker.log if tracker else _print_point)
    if result.out is not None:
        plot_accuracy_by_distance(result.metrics, result.out / "accuracy_by_distance.png")
    if tracker:
        version = tracker.finish(result)
        typer.echo(f"registered {BASE_MODEL_NAME} version {version}")
    _print_summary(result.metrics)


def import_command(
    checkpoints: Annotated[
        list[Path], typer.Argument(help="Checkpoint directories written by `somna train`.")
    ],
    mlflow_uri: Annotated[
        str, typer.Option(help="MLflow tracking URI.", envvar="SOMNA_MLFLOW_URI")
    ],
) -> None:
    """Log runs trained where MLflow was out of reach (a lent GPU) and register them.

    Each directory's params, curves, final accuracy, plot and checkpoint go to MLflow as
    `somna train --mlflow-uri` would have logged them. A checkpoint already registered
    (same weights: the `weights_sha256` tag) is skipped, so importing twice is harmless."""
    from model.train import TrainResult, load_train_config

    for directory in checkpoints:
        metrics_path = directory / "metrics.json"
        if not metrics_path.is_file():
            raise typer.BadParameter(f"{directory} has no metrics.json: not a finished run")
        cfg = load_train_config(directory)
        weights = _weights_sha256(directory)
        existing = _registered_with_weights(mlflow_uri, weights)
        if existing is not None:
            typer.echo(f"{directory}: already {BASE_MODEL_NAME} version {existing}")
            continue
        tracker = _MlflowTracker(mlflow_uri, cfg, echo=False)
        tracker.client.set_tag(tracker.run_id, "imported_from", str(directory))
        history = json.loads((directory / "history.json").read_text())
        for point in history:
            point = dict(point)
            tracker.log(int(point.pop("step")), point)
        metrics = json.loads(metrics_path.read_text())
        version = tracker.finish(TrainResult(metrics=metrics, out=directory, history=history))
        typer.echo(f"{directory}: registered {BASE_MODEL_NAME} version {version}")


def _weights_sha256(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def _registered_with_weights(uri: str, sha256: str) -> str | None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = client.search_model_versions(
        f"name = '{BASE_MODEL_NAME}' and tags.weights_sha256 = '{sha256}'"
    )
    return str(found[0].version) if found else None


def _print_point(step: int, point: dict[str, float]) -> None:
    accs = {k: round(v, 3) for k, v in point.items() if k.startswith("acc_")}
    typer.echo(f"step {step} loss {point['loss']:.4f} {accs if accs else ''}", err=True)


def _print_summary(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out exact match ({metrics['task']}, N={metrics['passes']})")
    table.add_column("slice")
    table.add_column("accuracy", justify="right")
    table.add_column("n", justify="right")
    for key, v in metrics["eval"]["accuracy"].items():
        table.add_row(key, f"{v['mean']:.3f} ± {v['std']:.3f}", str(v["n"]))
    Console().print(table)


def plot_accuracy_by_distance(metrics: dict[str, Any], path: Path) -> Path:
    """PNG of held-out accuracy against distance (chunks since the facts were evicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = metrics["eval"]["accuracy"]
    keys = [k for k in acc if k.startswith("distance=")]
    xs = [int(k.split("=")[1]) for k in keys]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.errorbar(
        xs,
        [acc[k]["mean"] for k in keys],
        yerr=[acc[k]["std"] for k in keys],
        marker="o",
        capsize=3,
    )
    ax.set_xlabel("distance (chunks since the facts were evicted)")
    ax.set_ylabel("exact match (held-out names)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{metrics['task']}, memory={metrics['memory']}, N={metrics['passes']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class _MlflowTracker:
    """Params up front, curves while training, checkpoint + plot + registration at the end."""

    def __init__(self, uri: str, cfg: Any, echo: bool = True) -> None:
        import os
        from dataclasses import asdict

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow import MlflowClient

        self.echo = echo
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = self.client.get_experiment_by_name(TRAIN_EXPERIMENT)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(TRAIN_EXPERIMENT)
        name = f"{cfg.task}-{cfg.memory}-n{cfg.passes}"
        self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        for key, value in asdict(cfg).items():
            self.client.log_param(self.run_id, key, str(value)[:500])

    def log(self, step: int, point: dict[str, float]) -> None:
        if self.echo:
            _print_point(step, point)
        for key, value in point.items():
            self.client.log_metric(self.run_id, _metric_name(key), float(value), step=step)

    def finish(self, result: Any) -> str:
        for key, value in result.metrics["eval"]["accuracy"].items():
            self.client.log_metric(self.run_id, _metric_name(f"final_acc_{key}"), value["mean"])
        self.client.log_artifacts(self.run_id, str(result.out), artifact_path="model")
        self.client.set_terminated(self.run_id)
        try:
            self.client.create_registered_model(BASE_MODEL_NAME)
        except Exception as e:  # already exists (mlflow raises MlflowException)
            if "ALREADY_EXISTS" not in str(getattr(e, "error_code", "")):
                raise
        run = self.client.get_run(self.run_id)
        mv = self.client.create_model_version(
            BASE_MODEL_NAME,
            source=f"{run.info.artifact_uri}/model",
            run_id=self.run_id,
            tags={
                "checkpoint": result.out.name,
                "task": result.metrics["task"],
                "passes": str(result.metrics["passes"]),
                "device": str(result.metrics.get("device", "")),
                "weights_sha256": _weights_sha256(result.out),
            },
        )
        return str(mv.version)


def _metric_name(key: str) -> str:
    # MLflow metric names may not contain "=": "acc_hops=2" -> "acc_hops_2".
    return key.replace("=", "_")


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root app."""
    app.command("train")(train_command)
    app.command("train-import")(import_command)


if __name__ == "__main__":
    # `python -m model.cli train ...` is `somna train ...` on a machine that has torch,
    # typer and rich but none of the service packages (a lent GPU machine).
    standalone = typer.Typer(add_completion=False)
    standalone.callback()(lambda: None)  # keep `train` a subcommand, as under `somna`
    register(standalone)
    standalone()
