"""``radstream``: run the local stack, manage keys, read operator feeds."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from shared.config import KafkaSettings, Settings
from shared.runtime.audit import emit_audit
from shared.runtime.reader import latest_for_series, read_topic
from shared.schemas import BlobRef, DeadLetter, ResultsReady, SegmentationDone
from shared.security.envelope import (
    KeyFileError,
    Keyring,
    init_keyring_file,
    rotate_keyring_file,
)
from shared.security.kek import keyring_for
from shared.security.keyfile import issue_all, retire, rotate_hmac
from shared.security.paths import UnsafeName, child, write_new
from shared.stack.local import DEFAULT_HOME, READY_TIMEOUT_S, LocalStack, StackError, dump
from shared.topology import STAGES

app = typer.Typer(no_args_is_help=True, help="RadStream: near-real-time scan analysis on Kafka.")
stack_app = typer.Typer(no_args_is_help=True, help="The local stack: broker and services.")
keys_app = typer.Typer(
    no_args_is_help=True, help="Keys: per-purpose key pairs, key files, rotation, passwords."
)
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
    """Settings of an outside party: from RADSTREAM_KAFKA__* if given, else the local stack's;
    its own key file (RADSTREAM_KEYRING_FILE, else the local stack's file for it)."""
    settings = Settings(home=home)
    kafka = settings.kafka
    stack = LocalStack(home)
    if not kafka.username:
        if not (stack.home / "secrets" / "credentials.json").exists():
            err.print(
                f"[red]no credentials: set RADSTREAM_KAFKA__* or run 'radstream stack up' ({home})"
            )
            raise typer.Exit(2)
        kafka = stack.broker.settings_for(principal)
    if settings.keyring_file is None:
        settings = settings.model_copy(update={"keyring_file": stack.key_file(principal)})
    settings = settings.model_copy(update={"kafka": kafka})
    if not settings.keyring_path.exists():
        err.print(f"[red]no key file at {settings.keyring_path}: run 'radstream keys init'")
        raise typer.Exit(2)
    try:
        keyring = keyring_for(settings)
    except KeyFileError as exc:
        err.print(f"[red]{exc}")
        raise typer.Exit(2) from None
    return settings, kafka, keyring


@stack_app.command("up")
def stack_up(
    home: HomeOpt = DEFAULT_HOME,
    timeout: Annotated[
        float, typer.Option("--timeout", help="longest wait for every service to be ready, s")
    ] = READY_TIMEOUT_S,
) -> None:
    """Start the broker and every service (idempotent); returns when every service is ready
    (answers /readyz; the gateway accepts a DICOM association), else fails naming the one
    that is not, with the end of its log."""
    stack = LocalStack(home)
    try:
        with console.status("starting the local stack (first run fetches Apache Kafka)..."):
            actions = stack.up(timeout)
    except StackError as exc:
        err.print(f"[red]✗ {exc}[/] (log: {stack.log_file(exc.service)})", soft_wrap=True)
        sys.stderr.write(exc.log_tail + "\n")  # as written: log lines are not rewrapped
        raise typer.Exit(1) from None
    for line in actions:
        console.print(f"  [green]✓[/] {line}")
    console.print(
        f"stack home: {stack.home}  ·  broker: {stack.broker.bootstrap_servers} (SASL_SSL)"
        f"  ·  DICOM gateway: 127.0.0.1:{stack.ports.gateway_dicom}"
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
    table = Table("service", "pid", "healthy", "ready", "processed", "metrics")
    for svc in status["services"]:
        done = ", ".join(f"{k} {v:.0f}" for k, v in sorted(svc.get("processed", {}).items()))
        table.add_row(
            svc["name"],
            str(svc["pid"] or "-"),
            _yn(svc["healthy"]),
            _yn(svc["ready"]),
            done or "-",
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


MasterOpt = Annotated[
    Path | None,
    typer.Option("--master", help="master keyring (default: the local stack's)"),
]


def _master(home: Path, master: Path | None, must_exist: bool = True) -> tuple[LocalStack, Path]:
    stack = LocalStack(home)
    path = master or stack.keyring_path
    if must_exist and not path.exists():
        err.print(f"[red]no master keyring at {path}: run 'radstream keys init'")
        raise typer.Exit(2)
    return stack, path


def _issue(stack: LocalStack, master: Path) -> None:
    files = issue_all(master, stack.broker.principals_dir)
    console.print(f"  key files of {len(files)} principals in {stack.broker.principals_dir}")


def _audit_key_op(
    home: Path, action: str, resource: str, outcome: Literal["success", "error"] = "success"
) -> None:
    """A key operation on the audit trail, as the key administrator (when the stack's broker
    runs; without one there is nothing to write to, and the operation says so)."""
    stack = LocalStack(home)
    if not stack.broker.is_running():
        err.print("[yellow]broker not running: this key operation is not on the audit trail")
        return
    settings, _, keyring = _settings_for(home, "keyadmin")
    asyncio.run(emit_audit(settings, keyring, action, resource, outcome))


@keys_app.command("init")
def keys_init(home: HomeOpt = DEFAULT_HOME, master: MasterOpt = None) -> None:
    """Create the master keyring (a key pair per purpose, the key-hash and blob naming keys)
    and every principal's key file (only the keys its role needs)."""
    stack, path = _master(home, master, must_exist=False)
    existed = path.exists()
    material = init_keyring_file(path)
    console.print(f"master keyring {'kept' if existed else 'created'}: {path}")
    for purpose, pk in material.purposes.items():
        console.print(f"  {purpose:11} active {pk.active}")
    _issue(stack, path)


@keys_app.command("rotate")
def keys_rotate(
    home: HomeOpt = DEFAULT_HOME,
    master: MasterOpt = None,
    purpose: Annotated[
        list[str] | None, typer.Option("--purpose", help="only these purposes (repeat)")
    ] = None,
) -> None:
    """A new active key pair per purpose; old keys stay for opening. Principals' key files are
    issued again (services re-read them live). Then: 'keys rewrap', later 'keys retire'."""
    stack, path = _master(home, master)
    try:
        new = rotate_keyring_file(path, tuple(purpose) if purpose else None)
    except KeyFileError as exc:
        err.print(f"[red]{exc}")
        raise typer.Exit(2) from None
    for name, kid in new.items():
        console.print(f"  {name:11} new active key {kid}")
    _issue(stack, path)
    _audit_key_op(home, "keys:rotate", ",".join(new.values()))


@keys_app.command("rotate-hmac")
def keys_rotate_hmac(
    home: HomeOpt = DEFAULT_HOME,
    master: MasterOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="rotate even with records still in flight")
    ] = False,
) -> None:
    """A new key-hash (HMAC) key for Kafka keys. A series' key, and so its partition, changes:
    drain first (no series in assembly, every stage's lag 0; docs/keys.md). Refused while the
    local stack shows lag, unless --force."""
    stack, path = _master(home, master)
    if not force and stack.broker.is_running():
        lag = stack.status().get("lag", {})
        waiting = {name: info["total"] for name, info in lag.items() if info["total"]}
        if waiting:
            err.print(f"[red]records in flight (lag {waiting}): drain first, or --force")
            raise typer.Exit(1)
    hid = rotate_hmac(path)
    console.print(f"new active key-hash key {hid} (older ones are still recognised)")
    _issue(stack, path)
    _audit_key_op(home, "keys:rotate-hmac", hid)


@keys_app.command("rewrap")
def keys_rewrap(home: HomeOpt = DEFAULT_HOME, master: MasterOpt = None) -> None:
    """Wrap every blob's data key for the active key of its purpose (content not decrypted)."""
    from shared.security.rotation import rewrap_blobs
    from shared.storage import LocalDirBackend

    _, path = _master(home, master)
    report = rewrap_blobs(LocalDirBackend(Settings(home=home).blob_path), Keyring.from_file(path))
    failed = f", [red]failed {report.failed}" if report.failed else ""
    console.print(
        f"{report.scanned} blobs: {report.rewrapped} re-wrapped, {report.current} current, "
        f"{report.legacy} legacy (RSE1){failed}"
    )
    _audit_key_op(home, "keys:rewrap", f"{report.rewrapped} blobs")
    if report.failed:
        raise typer.Exit(1)


@keys_app.command("status")
def keys_status(home: HomeOpt = DEFAULT_HOME, master: MasterOpt = None) -> None:
    """Each purpose's keys (active, old) and how many blobs each seals."""
    from shared.security.keyfile import read_key_file
    from shared.security.rotation import blob_key_usage
    from shared.storage import LocalDirBackend

    _, path = _master(home, master)
    material = read_key_file(path)
    usage = blob_key_usage(LocalDirBackend(Settings(home=home).blob_path))
    table = Table("purpose", "key id", "state", "blobs")
    for name, pk in material.purposes.items():
        for kid in pk.keys:
            state = "active" if kid == pk.active else "old"
            table.add_row(name, kid, state, str(usage.get(kid, 0)))
    for kid in material.hmac_keys or {}:
        table.add_row("key-hash", kid, "active" if kid == material.hmac_active else "old", "-")
    for kid in material.legacy or {}:
        table.add_row("legacy", kid, "open only", str(usage.get(kid, 0)))
    console.print(table)


@keys_app.command("retire")
def keys_retire(
    key_id: Annotated[str, typer.Argument(help="an old key id (keys status)")],
    home: HomeOpt = DEFAULT_HOME,
    master: MasterOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="even if blobs still use it (they become unreadable)")
    ] = False,
) -> None:
    """Remove an old key from the master keyring and every principal's key file. Refused while
    blobs are still sealed under it (run 'keys rewrap' first)."""
    from shared.security.rotation import blob_key_usage
    from shared.storage import LocalDirBackend

    stack, path = _master(home, master)
    in_use = blob_key_usage(LocalDirBackend(Settings(home=home).blob_path)).get(key_id, 0)
    if in_use and not force:
        err.print(f"[red]{in_use} blobs are still sealed under {key_id}: run 'keys rewrap' first")
        raise typer.Exit(1)
    try:
        kind = retire(path, key_id)
    except KeyFileError as exc:
        err.print(f"[red]{exc}")
        raise typer.Exit(2) from None
    console.print(f"retired {kind} key {key_id}")
    _issue(stack, path)
    _audit_key_op(home, "keys:retire", key_id)


@keys_app.command("rotate-password")
def keys_rotate_password(
    principal: Annotated[str, typer.Argument(help="the principal (service or party)")],
    home: HomeOpt = DEFAULT_HOME,
) -> None:
    """A new random SCRAM password for PRINCIPAL: changed on the running broker (through a
    0600 file, never a command line), then in its password file. Its open connections stay;
    its next ones use the new password (services read the file at every client start)."""
    import secrets

    from shared.stack.broker import BrokerError

    stack = LocalStack(home)
    if not stack.broker.is_running():
        err.print("[red]the broker is not running: 'radstream stack up' first")
        raise typer.Exit(2)
    try:
        stack.broker.set_password(principal, secrets.token_urlsafe(24))
    except BrokerError as exc:
        err.print(f"[red]{exc}")
        _audit_key_op(home, "keys:rotate-password", principal, "error")
        raise typer.Exit(1) from None
    _audit_key_op(home, "keys:rotate-password", principal)
    console.print(f"new password for {principal} in {stack.broker.password_file(principal)} (0600)")


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
        await emit_audit(settings, keyring, "read:deadletter", topic)
        return count

    asyncio.run(run())


@app.command("publish")
def publish(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive)")],
    source: Annotated[str, typer.Option("--source", help="scanner / sender name")] = "cli",
    home: HomeOpt = DEFAULT_HOME,
) -> None:
    """Publish DICOM files as a scanner: one instance per message, then an end-of-series
    marker per series. Files are sent as they are; ingest judges them."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from shared.ingress.files import TooLarge, read_capped, series_of
    from shared.ingress.publisher import Publisher, PublishError

    settings, kafka, keyring = _settings_for(home, "scanner")
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            err.print(f"[red]no such file or folder: {path}")
            raise typer.Exit(2)
    if not files:
        err.print("[red]nothing to publish")
        raise typer.Exit(2)

    async def run() -> tuple[int, int, int]:
        failed = 0
        per_series: dict[str, int] = {}
        async with Publisher(
            kafka, keyring, source=source, topic=settings.topic("instances")
        ) as pub:
            with Progress(
                TextColumn("publishing"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=err,
            ) as progress:
                task = progress.add_task("publish", total=len(files))
                groups: dict[str | None, list[Path]] = {}
                cap = kafka.max_message_bytes
                for f in files:
                    if f.stat().st_size > cap:  # never read: it could not be sent anyway
                        failed += 1
                        err.print(f"[red]too large to publish ({cap} byte cap): {f.name}")
                        progress.advance(task)
                        continue
                    groups.setdefault(series_of(f), []).append(f)  # from a bounded prefix
                for uid, group in groups.items():
                    sent = 0
                    for f in group:
                        try:
                            await pub.publish(read_capped(f, cap))
                            sent += 1
                        except (PublishError, TooLarge) as exc:
                            failed += 1
                            err.print(f"[red]not acknowledged: {f.name}: {exc}")
                        progress.advance(task)
                    if uid is not None:
                        try:
                            await pub.end_series(uid, sent)
                            per_series[uid] = sent
                        except PublishError as exc:
                            failed += 1
                            err.print(f"[red]end-of-series marker not acknowledged: {exc}")
        return len(files) - failed, len(per_series), failed

    ok, series, failed = asyncio.run(run())
    console.print(
        f"published {ok} instance(s) in {series} series"
        + (f", [red]{failed} failed" if failed else "")
    )
    if failed:
        raise typer.Exit(1)


@app.command("phantom")
def phantom_cmd(
    kind: Annotated[str, typer.Argument(help="chest-ct | head-ct | radiograph")],
    out: Annotated[Path, typer.Option("--out", help="folder for the series and truth.npz")],
    seed: Annotated[int, typer.Option("--seed")] = 0,
    size: Annotated[int, typer.Option("--size", help="rows = columns, 128 to 512")] = 256,
    slices: Annotated[int, typer.Option("--slices")] = 64,
    nodules: Annotated[
        str, typer.Option("--nodules", help="chest: diameters in mm, e.g. 6,10")
    ] = "8,12",
    bleed_ml: Annotated[
        float, typer.Option("--bleed-ml", help="head: haemorrhage volume, 0 for none")
    ] = 5.0,
) -> None:
    """Write a synthetic study with known ground truth (DICOM series + truth.npz)."""
    from shared.dicom import phantom

    if not 16 <= size <= 1024:
        err.print("[red]--size must be between 16 and 1024")
        raise typer.Exit(2)
    if kind == "chest-ct":
        diam = tuple(float(d) for d in nodules.split(",") if d.strip())
        ph = phantom.chest_ct(out, seed=seed, size=size, slices=slices, nodules_mm=diam)
    elif kind == "head-ct":
        ph = phantom.head_ct(out, seed=seed, size=size, slices=slices, bleed_ml=bleed_ml)
    elif kind == "radiograph":
        ph = phantom.radiograph(out, seed=seed, size=size)
    else:
        err.print(f"[red]unknown phantom {kind!r}: chest-ct, head-ct or radiograph")
        raise typer.Exit(2)
    console.print(f"{kind}: {len(ph.files)} instance(s) in {out} (truth in {out / 'truth.npz'})")


@app.command("demo")
def demo(
    home: HomeOpt = DEFAULT_HOME,
    out: Annotated[
        Path | None, typer.Option("--out", help="report folder (default out/demo)")
    ] = None,
    wait: Annotated[
        float, typer.Option("--wait", help="longest wait for the alerts, seconds")
    ] = 300.0,
) -> None:
    """Start the stack, publish demo studies, show alerts live, write an HTML report."""
    from shared.cli.demo import default_out, run_demo

    run_demo(LocalStack(home), out or default_out(), console, wait)


@app.command("alerts")
def alerts(
    home: HomeOpt = DEFAULT_HOME,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="wait for new alerts")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", help="stop after S seconds")] = None,
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="with --follow: replay old alerts too")
    ] = False,
) -> None:
    """The alert feed, as the alert-consumer principal (it can read alerts and nothing else)."""
    from shared.schemas import Alert

    settings, kafka, keyring = _settings_for(home, "alert-consumer")
    colours = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan"}

    async def run() -> None:
        await emit_audit(settings, keyring, "read:alerts", settings.topic("alerts"))
        async for item in read_topic(
            kafka,
            settings.topic("alerts"),
            Alert,
            keyring,
            follow=follow,
            timeout_s=timeout,
            from_beginning=from_beginning or not follow,
        ):
            a = item.record
            if a is None:
                where = f"partition {item.partition} offset {item.offset}"
                err.print(f"[red]unreadable alert at {where}: {item.error}")
                continue
            if as_json:
                print(a.model_dump_json(exclude={"schema_version"}), flush=True)
            else:
                measures = ", ".join(f"{k}={v:g}" for k, v in a.measurements.items())
                head = f"[{colours[a.severity]}]{a.severity.upper():8}[/] {a.finding_label:16}"
                series = f"series …{a.series_instance_uid[-12:]} r{a.revision}"
                tail = f"latency {a.latency_seconds:.1f} s → {', '.join(a.routes)}"
                console.print(f"{head} {measures:28} {series}  {tail}")

    asyncio.run(run())


# stage → the topic an operator re-publishes to (the stage's input), from the topology
REPLAY = {s.name: s.input for s in STAGES if s.replay}


@app.command("replay")
def replay(
    stage: Annotated[str, typer.Option("--stage", help=" | ".join(REPLAY))],
    series_instance_uid: Annotated[str, typer.Option("--series", help="SeriesInstanceUID")],
    home: HomeOpt = DEFAULT_HOME,
) -> None:
    """Re-run a series from a stage: its latest input to that stage is published again as a
    new revision (lineage kept: same blobs and measurements, revision + 1). Operator."""
    from aiokafka import AIOKafkaProducer

    from shared import schemas
    from shared.runtime.codec import Codec
    from shared.security.kafka import client_kwargs
    from shared.topology import topic as topic_of

    if stage not in REPLAY:
        err.print(f"[red]--stage must be one of {', '.join(REPLAY)}")
        raise typer.Exit(2)
    settings, kafka, keyring = _settings_for(home, "operator")
    topic = settings.topic(REPLAY[stage])
    model: Any = getattr(schemas, topic_of(REPLAY[stage]).carries)

    async def run() -> int | None:
        latest = await latest_for_series(kafka, topic, model, keyring, series_instance_uid)
        if latest is None:
            return None
        again = latest.model_copy(update={"revision": latest.revision + 1})
        key = keyring.keyed_hash(series_instance_uid)
        codec = Codec(keyring)
        producer = AIOKafkaProducer(
            acks="all",
            enable_idempotence=True,
            max_request_size=kafka.max_message_bytes,
            **client_kwargs(kafka),
        )
        await producer.start()
        try:
            value, headers = codec.encode(topic, key, again)
            await producer.send_and_wait(topic, value, key=key, headers=headers)
            await emit_audit(settings, keyring, f"replay:{stage}", key.decode(), key=key)
        finally:
            await producer.stop()
        return int(again.revision)

    revision = asyncio.run(run())
    if revision is None:
        err.print(f"[red]no input for that series on {topic}")
        raise typer.Exit(1)
    console.print(f"replayed from {stage}: revision {revision} published to {topic}")


def _findings_and_results(
    settings: Settings, keyring: Keyring, series_instance_uid: str, wait_s: float = 0.0
) -> tuple[SegmentationDone | None, ResultsReady | None]:
    """A series' latest findings and the results record of that revision (each waited for
    within ``wait_s`` in all)."""
    import time

    started = time.monotonic()
    kafka = settings.kafka
    done: SegmentationDone | None = asyncio.run(
        latest_for_series(
            kafka,
            settings.topic("findings"),
            SegmentationDone,
            keyring,
            series_instance_uid,
            wait_s=wait_s,
        )
    )
    if done is None:
        return None, None
    paperwork: ResultsReady | None = asyncio.run(
        latest_for_series(
            kafka,
            settings.topic("results"),
            ResultsReady,
            keyring,
            series_instance_uid,
            wait_s=max(0.0, wait_s - (time.monotonic() - started)),
            revision=done.revision,
        )
    )
    return done, paperwork


@app.command("results")
def results(
    series_instance_uid: Annotated[str, typer.Argument(help="SeriesInstanceUID of the series")],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="folder to write findings.json, results.json, seg.dcm, sr.dcm, PNGs"
        ),
    ],
    home: HomeOpt = DEFAULT_HOME,
    timeout: Annotated[
        float, typer.Option("--timeout", help="wait up to S seconds for the findings and results")
    ] = 0.0,
) -> None:
    """A series' findings (latest revision) joined to its results: the DICOM SEG, the SR
    (TID 1500 measurements), the overlay pictures and their delivery to the PACS. Operator.
    Exits 1 without findings, 3 with findings but no results record (yet)."""
    from shared.storage import BlobStore, LocalDirBackend

    settings, _, keyring = _settings_for(home, "operator")
    done, paperwork = _findings_and_results(settings, keyring, series_instance_uid, timeout)
    if done is None:
        err.print("[red]no findings for that series (yet)")
        raise typer.Exit(1)
    resource = keyring.keyed_hash(series_instance_uid).decode()
    asyncio.run(emit_audit(settings, keyring, "read:results", resource))
    store = BlobStore(LocalDirBackend(settings.blob_path), keyring)
    out.mkdir(parents=True, exist_ok=True)
    try:
        written = write_results(out, done, paperwork, store.get)
    except UnsafeName as exc:
        err.print(f"[red]refused: {exc}")
        raise typer.Exit(4) from None
    segments = {r.finding_label: r for r in (paperwork.segments if paperwork else [])}
    table = Table("finding", "label", "volume mL", "diameter mm", "centroid (mm)", "SEG segment")
    for f in done.findings:
        seg_ref = segments.get(f.label)
        table.add_row(
            f.type,
            f.label,
            f"{f.volume_ml:.2f}" if f.volume_ml is not None else "-",
            f"{f.diameter_mm:.1f}" if f.diameter_mm is not None else "-",
            ", ".join(f"{v:.1f}" for v in f.centroid_mm or []),
            str(seg_ref.segment_number) if seg_ref and seg_ref.segment_number else "-",
        )
    console.print(table)
    console.print(
        f"revision {done.revision}, task {done.task}: wrote {', '.join(written)} to {out}"
    )
    if paperwork is None:
        err.print("[yellow]no results record for this revision yet (SEG, SR, pictures follow)")
        raise typer.Exit(3)
    delivered = ", ".join(f"{d.object} {d.outcome}" for d in paperwork.deliveries) or "nothing"
    console.print(f"PACS: {paperwork.delivery} ({delivered})")


def write_results(
    out: Path,
    done: SegmentationDone,
    paperwork: ResultsReady | None,
    fetch: Callable[[BlobRef], bytes],
) -> list[str]:
    """Write a series' findings and results files into ``out`` (``radstream results --out``).
    Every name that comes from a record is checked first (:mod:`shared.security.paths`): a
    crafted overlay name (``../x``, ``/abs``, a link) refuses the whole set before a byte is
    written."""
    names = [overlay.name for overlay in (paperwork.overlays if paperwork else [])]
    for name in names:
        child(out, name)
    if len(set(names)) != len(names) or set(names) & RESULT_FILES:
        raise UnsafeName("overlay names repeat or shadow the results files")
    files: list[tuple[str, bytes]] = [
        ("findings.json", done.model_dump_json(indent=2, exclude={"schema_version"}).encode())
    ]
    if paperwork is not None:
        dumped = paperwork.model_dump_json(indent=2, exclude={"schema_version"})
        files.append(("results.json", dumped.encode()))
        for name, ref in (("seg.dcm", paperwork.seg), ("sr.dcm", paperwork.sr)):
            if ref is not None:
                files.append((name, fetch(ref)))
        files.extend((overlay.name, fetch(overlay.blob)) for overlay in paperwork.overlays)
    for name, data in files:
        write_new(out, name, data)
    return [name for name, _ in files]


RESULT_FILES = frozenset({"findings.json", "results.json", "seg.dcm", "sr.dcm"})


@app.command("export")
def export(
    series_instance_uid: Annotated[str, typer.Argument(help="SeriesInstanceUID of the series")],
    out: Annotated[Path, typer.Option("--out", help="folder for series/NNNN.dcm and seg.dcm")],
    deidentify: Annotated[
        bool, typer.Option("--deidentify", help="required: only de-identified copies leave")
    ] = False,
    retain_dates: Annotated[
        bool,
        typer.Option(
            "--retain-dates", help="Retain Longitudinal Temporal Information (Full Dates) option"
        ),
    ] = False,
    clean_descriptors: Annotated[
        bool, typer.Option("--clean-descriptors", help="Clean Descriptors option")
    ] = False,
    key_file: Annotated[
        Path | None,
        typer.Option(
            "--pseudonym-key",
            help="the project's pseudonymisation key (0600); default: the exporter's, "
            "created on first use",
        ),
    ] = None,
    home: HomeOpt = DEFAULT_HOME,
) -> None:
    """A de-identified research copy of a series (latest revision) and its SEG, as the
    exporter principal: DICOM PS3.15 Annex E Basic Profile (+ the options asked for), a
    pseudonym per study and UIDs remapped by a keyed hash, consistent across the images and
    the SEG and across exports with the same key. Audited."""
    import io
    import secrets

    import pydicom

    from shared.dicom.deid import Deidentifier, Options, to_part10
    from shared.security.keyfile import read_secret_file, write_private
    from shared.storage import BlobStore, LocalDirBackend

    if not deidentify:
        err.print("[red]only de-identified exports are offered: add --deidentify")
        raise typer.Exit(2)
    settings, _, keyring = _settings_for(home, "exporter")
    path = key_file or LocalStack(home).broker.principals_dir / "exporter" / "deid.key"
    if not path.exists():
        write_private(path, secrets.token_hex(32))
    try:
        key = bytes.fromhex(read_secret_file(path))
    except (KeyFileError, ValueError) as exc:
        err.print(f"[red]pseudonymisation key {path}: {exc}")
        raise typer.Exit(2) from None
    done, paperwork = _findings_and_results(settings, keyring, series_instance_uid)
    if done is None or not done.source_instances:
        err.print("[red]no analysed revision of that series (yet)")
        raise typer.Exit(1)
    store = BlobStore(LocalDirBackend(settings.blob_path), keyring)
    options = Options(retain_dates=retain_dates, clean_descriptors=clean_descriptors)
    deid = Deidentifier(key, options)
    (out / "series").mkdir(parents=True, exist_ok=True)
    for number, ref in enumerate(done.source_instances, start=1):
        ds = pydicom.dcmread(io.BytesIO(store.get(ref.blob)))
        (out / "series" / f"{number:04d}.dcm").write_bytes(to_part10(deid.apply(ds)))
    written = [f"{len(done.source_instances)} images"]
    if paperwork is not None and paperwork.seg is not None:
        seg = pydicom.dcmread(io.BytesIO(store.get(paperwork.seg)))
        (out / "seg.dcm").write_bytes(to_part10(deid.apply(seg)))
        written.append("the SEG")
    resource = keyring.keyed_hash(series_instance_uid).decode()
    asyncio.run(emit_audit(settings, keyring, "export:deidentified", resource))
    pseudonym = deid.pseudonym(done.study_instance_uid)
    console.print(f"exported {' and '.join(written)} of revision {done.revision} to {out}")
    console.print(f"patient pseudonym {pseudonym}; profile: {', '.join(deid.options.codes)}")


@app.command("audit")
def audit(
    home: HomeOpt = DEFAULT_HOME,
    check: Annotated[
        bool, typer.Option("--verify", help="check the hash chain; exit 1 if it is broken")
    ] = False,
    syslog: Annotated[
        bool, typer.Option("--syslog", help="print RFC 5424 syslog lines (for a collector)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """The audit trail, as the auditor principal: who (broker-verified principal) did what, to
    what, with what outcome. --verify recomputes the hash chain: an edited, dropped or
    reordered entry is reported with its position."""
    from shared.schemas import AuditEntry
    from shared.security.audit import to_syslog, verify
    from shared.topology import AUDIT

    settings, kafka, keyring = _settings_for(home, "auditor")

    async def read() -> tuple[list[AuditEntry], list[str]]:
        entries: list[AuditEntry] = []
        unreadable: list[str] = []
        async for item in read_topic(kafka, settings.topic(AUDIT), AuditEntry, keyring):
            if item.record is None:
                unreadable.append(f"offset {item.offset}: unreadable ({item.error})")
            else:
                entries.append(item.record)
        return entries, unreadable

    entries, unreadable = asyncio.run(read())
    if check:
        result = verify(entries)
        problems = unreadable + result.problems
        for problem in problems:
            err.print(f"[red]{problem}")
        if problems:
            err.print(f"[red]audit chain BROKEN: {len(problems)} problem(s) in {len(entries)}")
            raise typer.Exit(1)
        console.print(f"audit chain intact: {result.entries} entries, head {result.head}")
        return
    for entry in entries:
        if syslog:
            print(to_syslog(entry), flush=True)
        elif as_json:
            print(entry.model_dump_json(exclude={"schema_version"}), flush=True)
        else:
            console.print(
                f"{entry.seq:6} {entry.at.isoformat(timespec='seconds')} {entry.principal:15} "
                f"{entry.action:24} {entry.outcome:8} {entry.resource}"
            )
    for problem in unreadable:
        err.print(f"[red]{problem}")


def main() -> None:  # pragma: no cover
    sys.exit(app())
