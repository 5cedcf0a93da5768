"""`somna chat` and `somna demo`: thin commands delegating to streams.chat / streams.demo."""

from __future__ import annotations

from typing import Annotated

import typer


def chat(
    text: Annotated[str, typer.Argument(help="What the user says.")],
    scope: Annotated[str, typer.Option(help="Whose memory (a user, an agent, a tenant).")],
    session: Annotated[str, typer.Option(help="Session id of the turn.")] = "cli",
    role: Annotated[
        str, typer.Option(help="user (waits for a reply), system or assistant (remembered only).")
    ] = "user",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the reply.")] = 60.0,
) -> None:
    """Send a turn through Kafka and print the reply."""
    from infra.settings import Settings
    from infra.sync import run_sync
    from streams.chat import chat as send

    reply = run_sync(send(Settings(), scope, text, session_id=session, role=role, timeout=timeout))
    if reply is None:
        typer.echo("remembered.")
        return
    typer.echo(reply.text)
    fw = f"v{reply.fast_weights_version}" if reply.fast_weights_version else "none"
    typer.secho(
        f"[{reply.latency_ms:.0f} ms, base model v{reply.base_model_version}, fast weights {fw}]",
        dim=True,
        err=True,
    )


def demo(
    users: Annotated[int, typer.Option(help="Simulated users (scopes).")] = 8,
    duration: Annotated[float, typer.Option(help="Seconds to run (0 = until Ctrl-C).")] = 0.0,
    think: Annotated[float, typer.Option(help="Seconds each user waits between turns.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the dialogues.")] = 0,
    chunk: Annotated[
        int, typer.Option(help="Tokens per chunk of the dialogues (the model's training chunk).")
    ] = 64,
) -> None:
    """Simulated users speaking the facts task, with a live view of the service."""
    from infra.settings import Settings
    from infra.sync import run_sync
    from streams.demo import run_demo

    try:
        run_sync(
            run_demo(
                Settings(), users=users, duration=duration, think=think, seed=seed, chunk=chunk
            )
        )
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root app."""
    app.command("chat")(chat)
    app.command("demo")(demo)
