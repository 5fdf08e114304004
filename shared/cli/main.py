"""``radstream``: run the local stack, manage keys, read operator feeds."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from shared.config import KafkaSettings, Settings
from shared.runtime.reader import read_topic
from shared.schemas import DeadLetter
from shared.security.envelope import Keyring, init_keyring_file, rotate_keyring_file
from shared.stack.local import DEFAULT_HOME, LocalStack, dump

app = typer.Typer(no_args_is_help=True, help="RadStream: near-real-time scan analysis on Kafka.")
stack_app = typer.Typer(no_args_is_help=True, help="The local stack: broker and services.")
keys_app = typer.Typer(no_args_is_help=True, help="The payload encryption keyring.")
app.add_typer(stack_app, name="stack")
app.add_typer(keys_app, name="keys")

console = Console()


@app.callback()
def _quiet_clients() -> None:
    # aiokafka logs transient coordinator lookups at ERROR; the CLI reports outcomes itself.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


err = Console(stderr=True)

HomeOpt = Annotated[Path, typer.Option("--home", envvar="RADSTREAM_HOME", help="stack folder")]


def _settings_for(home: Path, principal: str) -> tuple[Settings, KafkaSettings, Keyring]:
    """Settings of an outside party: from RADSTREAM_KAFKA__* if given, else the local stack's."""
    settings = Settings(home=home)
    kafka = settings.kafka
    if not kafka.username:
        stack = LocalStack(home)
        if not (stack.home / "secrets" / "credentials.json").exists():
            err.print(
                f"[red]no credentials: set RADSTREAM_KAFKA__* or run 'radstream stack up' ({home})"
            )
            raise typer.Exit(2)
        kafka = stack.broker.settings_for(principal)
    keyring_path = settings.keyring_path
    if not keyring_path.exists():
        err.print(f"[red]no keyring at {keyring_path}: run 'radstream keys init'")
        raise typer.Exit(2)
    return settings, kafka, Keyring.from_file(keyring_path)


@stack_app.command("up")
def stack_up(home: HomeOpt = DEFAULT_HOME) -> None:
    """Start the broker and every service (idempotent)."""
    stack = LocalStack(home)
    with console.status("starting the local stack (first run fetches Apache Kafka)..."):
        actions = stack.up()
    for line in actions:
        console.print(f"  [green]✓[/] {line}")
    console.print(
        f"stack home: {stack.home}  ·  broker: {stack.broker.bootstrap_servers} (SASL_SSL)"
    )


@stack_app.command("down")
def stack_down(home: HomeOpt = DEFAULT_HOME) -> None:
    """Stop every service, then the broker."""
    for line in LocalStack(home).down():
        console.print(f"  [yellow]■[/] {line}")


@stack_app.command("status")
def stack_status(
    home: HomeOpt = DEFAULT_HOME,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """Broker, each service's health, consumer lag per stage."""
    status = LocalStack(home).status()
    if as_json:
        print(dump(status))
        return
    broker = status["broker"]
    mark = "[green]running[/]" if broker["running"] else "[red]down[/]"
    console.print(f"broker {broker['bootstrap']}: {mark}")
    table = Table("service", "pid", "healthy", "ready", "metrics")
    for svc in status["services"]:
        table.add_row(
            svc["name"],
            str(svc["pid"] or "-"),
            _yn(svc["healthy"]),
            _yn(svc["ready"]),
            svc["metrics"],
        )
    if status["services"]:
        console.print(table)
    else:
        console.print("no services installed yet")
    if status["lag"]:
        lag = Table("stage", "input", "lag (records)", "per partition")
        for stage, info in status["lag"].items():
            parts = " ".join(f"{p}:{n}" for p, n in info["partitions"].items())
            lag.add_row(stage, info["input"], str(info["total"]), parts)
        console.print(lag)
    if not broker["running"]:
        raise typer.Exit(1)


def _yn(ok: bool) -> str:
    return "[green]yes[/]" if ok else "[red]no[/]"


@keys_app.command("init")
def keys_init(home: HomeOpt = DEFAULT_HOME) -> None:
    """Create the keyring (one active key-encryption key and the key-hash key)."""
    path = Settings(home=home).keyring_path
    existed = path.exists()
    data = init_keyring_file(path)
    console.print(f"keyring {'kept' if existed else 'created'}: {path} (active key {data.active})")


@keys_app.command("rotate")
def keys_rotate(home: HomeOpt = DEFAULT_HOME) -> None:
    """Add a new active key; older keys stay for decryption. Services pick it up live."""
    path = Settings(home=home).keyring_path
    if not path.exists():
        err.print(f"[red]no keyring at {path}: run 'radstream keys init'")
        raise typer.Exit(2)
    kid = rotate_keyring_file(path)
    console.print(f"new active key {kid}; {len(Keyring.from_file(path).key_ids)} keys in {path}")


@app.command("deadletters")
def deadletters(
    home: HomeOpt = DEFAULT_HOME,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="wait for new ones")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", help="stop after S seconds")] = None,
) -> None:
    """Dead letters (operator principal): stage, reason, source coordinates, time."""
    settings, kafka, keyring = _settings_for(home, "operator")
    topic = settings.topic("deadletter")

    async def run() -> int:
        count = 0
        table = None if as_json or follow else Table("time", "stage", "reason", "source", "message")
        async for item in read_topic(
            kafka, topic, DeadLetter, keyring, follow=follow, timeout_s=timeout
        ):
            count += 1
            letter = item.record
            if letter is None:
                row = {"error": item.error, "partition": item.partition, "offset": item.offset}
                print(json.dumps(row)) if as_json else err.print(
                    f"[red]unreadable dead letter: {row}"
                )
                continue
            if as_json:
                print(letter.model_dump_json(exclude={"schema_version"}), flush=True)
            else:
                source = f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset}"
                cols = (
                    letter.failed_at.isoformat(timespec="seconds"),
                    letter.stage,
                    letter.reason,
                    source,
                    letter.message,
                )
                table.add_row(*cols) if table is not None else console.print("  ".join(cols))
        if table is not None:
            console.print(table if count else "no dead letters")
        return count

    asyncio.run(run())


def main() -> None:  # pragma: no cover
    sys.exit(app())
