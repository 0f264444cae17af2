"""``shardctl``: the operator's CLI over the catalog and the shards.

Read commands take ``--json``; commands that change the cluster ask for confirmation
unless given ``--yes``.  The catalog DSN comes from the settings (``SHARDD_CATALOG_DSN``,
``--config``) or ``--catalog-dsn``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click
import orjson

from . import admin, catalog, changefeed, config, errors, failover, hotkeys, pgctl, reshard

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except (
        OSError,
        LookupError,
        ValueError,
        failover.FailoverError,
        pgctl.PgCtlError,
        reshard.MoveError,
    ) as exc:
        raise click.ClickException(str(exc)) from exc


def emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        render(data)


def confirm(yes: bool, question: str) -> None:
    if not yes:
        click.confirm(question, abort=True)


yes_option = click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


class Context:
    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings

    @property
    def dsn(self) -> str:
        return self.settings.catalog_dsn


pass_ctx = click.make_pass_decorator(Context)


@click.group(invoke_without_command=True)
@click.option("--catalog-dsn", default=None, help="Catalog DSN [SHARDD_CATALOG_DSN].")
@click.option("--config", "config_file", default=None, help="TOML settings file.")
@click.pass_context
def main(ctx: click.Context, catalog_dsn: str | None, config_file: str | None) -> None:
    """Operate a shardd cluster."""
    try:
        settings = config.load(config_file=config_file, overrides={"catalog_dsn": catalog_dsn})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    ctx.obj = Context(settings)
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@main.command()
@json_option
@pass_ctx
def status(ctx: Context, as_json: bool) -> None:
    """Shards, nodes, roles, health, replica lag, slots and items per shard."""

    def render(data: dict[str, Any]) -> None:
        mode = (
            f"synchronous ({data['synchronous_mode']})" if data["synchronous"] else "asynchronous"
        )
        click.echo(f"epoch {data['epoch']}, {data['slot_count']} slots, {mode} replication")
        click.echo(f"monitor: {data['monitor'] or 'none yet'}")
        for shard in data["shards"]:
            items = "?" if shard["items"] is None else shard["items"]
            notes = "".join(
                [
                    ", under Patroni" if shard["failover_mode"] == "patroni" else "",
                    " DEGRADED (asynchronous)" if shard["degraded"] else "",
                    f" WRITES REFUSED: {shard['write_block']}" if shard["write_block"] else "",
                ]
            )
            click.echo(f"shard {shard['name']}: {shard['slots']} slots, {items} items{notes}")
            for node in shard["nodes"]:
                health = "up" if node["healthy"] else "DOWN"
                lag = "" if node["lag_bytes"] is None else f" lag={node['lag_bytes']}B"
                if node["lag_seconds"] is not None and node["role"] == "replica":
                    lag += f"/{node['lag_seconds']:.1f}s"
                fenced = " FENCED" if node["fenced"] else ""
                zone = f" zone={node['zone']}" if node["zone"] else ""
                click.echo(
                    f"  {node['name']:<18} {node['role']:<8} {node['host']}:{node['port']:<6}"
                    f" {health}{zone}{lag}{fenced}"
                )

        for event in data["failovers"]:
            lost = "?" if event["lost_bytes"] is None else event["lost_bytes"]
            if not event["lost_exact"]:
                lost = f"at least {lost}"
            click.echo(
                f"failover {event['promoted_at']:%Y-%m-%d %H:%M:%S} {event['shard']}:"
                f" {event['old_primary']} -> {event['new_primary']} ({event['kind']},"
                f" lost {lost} bytes)"
            )

    emit(run(admin.status(ctx.dsn)), as_json, render)


@main.command("failover")
@click.option("--shard", "shard_name", required=True, help="Shard whose primary to replace.")
@click.option("--to", "to", default=None, help="Replica to promote [the most caught-up].")
@click.option("--catch-up-timeout", default=10.0, show_default=True, help="Seconds.")
@click.option(
    "--force",
    is_flag=True,
    help="The primary is down and no replica qualifies: promote the most advanced one anyway"
    " and report the WAL it lacks.",
)
@yes_option
@pass_ctx
def failover_command(
    ctx: Context, shard_name: str, to: str | None, catch_up_timeout: float, force: bool, yes: bool
) -> None:
    """Planned switchover: pause the shard's writes, promote a caught-up replica, resume.

    Clients see added latency, not errors.  The old primary is fenced afterwards; bring
    it back as a replica with `shardctl node rejoin`.  With --force, replace a primary
    that is down although no replica is within max_lag_on_failover: acknowledged writes
    the promoted replica never received are lost, and the loss is reported.
    """
    shard = run(admin.topology(ctx.dsn)).shards.get(shard_name)
    if shard is not None and shard.failover_mode == "patroni":
        if force:
            raise click.ClickException(
                f"Patroni chooses the primary of {shard_name}: force a failover with"
                " `patronictl failover`; shardd follows the leader Patroni elects"
            )
        confirm(yes, f"Ask Patroni to switch shard {shard_name} over to {to or 'a replica'}?")
        outcome = run(failover.patroni.switch_over(ctx.dsn, shard_name, to=to))
        click.echo(
            f"shard {outcome.shard}: {outcome.new_primary} is the primary (was"
            f" {outcome.old_primary}; Patroni's switchover; writes paused {outcome.seconds:.3f}s;"
            f" epoch {outcome.epoch})"
        )
        return
    if force:
        confirm(yes, f"Promote a replica of {shard_name} even if it lacks acknowledged writes?")
        outcome = run(
            failover.force_promotion(ctx.dsn, shard_name, lease=ctx.settings.topology_lease)
        )
        lost = "unknown" if outcome.lost_bytes is None else f"{outcome.lost_bytes} bytes"
        click.echo(
            f"shard {outcome.shard}: {outcome.new_primary} is the primary (was"
            f" {outcome.old_primary}; forced; lost at least {lost} of WAL, exact once"
            f" {outcome.old_primary} answers again; epoch {outcome.epoch})"
        )
        return
    confirm(yes, f"Switch shard {shard_name} over to {to or 'its most caught-up replica'}?")
    outcome = run(
        failover.switch_over(ctx.dsn, shard_name, to=to, catch_up_timeout=catch_up_timeout)
    )
    click.echo(
        f"shard {outcome.shard}: {outcome.new_primary} is the primary (was"
        f" {outcome.old_primary}; writes paused {outcome.seconds:.3f}s; epoch {outcome.epoch})"
    )


@main.command("sync-mode")
@click.argument("mode", type=click.Choice(["degrade", "strict"]), required=False)
@pass_ctx
def sync_mode(ctx: Context, mode: str | None) -> None:
    """Show or set what a synchronous cluster does when a shard has no standby.

    degrade: commit asynchronously until a standby streams again (recorded, visible in
    status and metrics).  strict: refuse the shard's writes (503 no_sync_standby).
    """

    async def go() -> str:
        async with admin.connect(ctx.dsn) as conn:
            if mode is not None:
                await catalog.set_synchronous_mode(conn, mode)
            return await catalog.synchronous_mode(conn)

    click.echo(f"synchronous_mode {run(go())}")


@main.group()
def node() -> None:
    """Nodes: list, zone, rejoin."""


@node.command("list")
@json_option
@pass_ctx
def node_list(ctx: Context, as_json: bool) -> None:
    """Every node with its shard, role, health, lag and fence."""
    data = run(admin.status(ctx.dsn))
    rows = [{"shard": s["name"], **n} for s in data["shards"] for n in s["nodes"]]

    def render(rows: list[dict[str, Any]]) -> None:
        for row in rows:
            health = "up" if row["healthy"] else "DOWN"
            lag = "-" if row["lag_bytes"] is None else f"{row['lag_bytes']}B"
            fenced = "fenced" if row["fenced"] else ""
            click.echo(
                f"{row['name']:<18} {row['shard']:<8} {row['role']:<8}"
                f" {row['host']}:{row['port']:<6} {health:<5} zone={row['zone'] or '-':<8}"
                f" lag={lag:<10} {fenced}"
            )

    emit(rows, as_json, render)


def _zone(value: str) -> str:
    if not config.ZONE.fullmatch(value):
        raise click.BadParameter(f"a zone matches {config.ZONE.pattern}")
    return value


@node.command("zone")
@click.argument("name")
@click.argument("zone", callback=lambda ctx, param, value: _zone(value))
@pass_ctx
def node_zone(ctx: Context, name: str, zone: str) -> None:
    """Label node NAME with ZONE ("" for none): reads prefer replicas of their instance's
    zone, promotions the old primary's."""

    async def label() -> int:
        async with admin.connect(ctx.dsn) as conn:
            return await catalog.set_zone(conn, name, zone)

    try:
        epoch = run(label())
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{name} is in zone {zone or '(none)'} (epoch {epoch})")


@node.command("rejoin")
@click.argument("name")
@click.option("--datadir", required=True, help="The node's data directory (on this host).")
@click.option("--log", "logfile", default=None, help="Server log file [DATADIR.log].")
@yes_option
@pass_ctx
def node_rejoin(ctx: Context, name: str, datadir: str, logfile: str | None, yes: bool) -> None:
    """Rebuild fenced node NAME as a replica of its shard's primary (run on its host).

    The node is stopped, its data replaced by a base backup of the current primary
    (its own configuration files are kept), started as a standby and, once it streams,
    recorded as a replica.
    """
    confirm(yes, f"Replace the data of {name} in {datadir} with a copy of its primary?")
    epoch = run(failover.rejoin(ctx.dsn, name, datadir=datadir, logfile=logfile))
    click.echo(f"{name} rejoined as a replica (epoch {epoch})")


@main.command()
@json_option
@pass_ctx
def tables(ctx: Context, as_json: bool) -> None:
    """Declared tables."""
    topo = run(admin.topology(ctx.dsn))
    data = [topo.tables[name].as_json() for name in sorted(topo.tables)]

    def render(rows: list[dict[str, str]]) -> None:
        for row in rows:
            click.echo(f"{row['name']:<32} {row['description']}")

    emit(data, as_json, render)


@main.command()
@click.option("--limit", default=10, show_default=True, help="Keys and slots shown.")
@json_option
@pass_ctx
def hot(ctx: Context, limit: int, as_json: bool) -> None:
    """The hottest keys, slots and shards over every instance, live (hot-key reports)."""

    async def load() -> dict[str, Any]:
        async with admin.connect(ctx.dsn, command_timeout=ctx.settings.catalog_timeout) as conn:
            topology = await catalog.load_topology(conn)
            view = await hotkeys.load_view(conn, topology, ctx.settings)
        return view.as_json(limit=limit)

    def render(view: dict[str, Any]) -> None:
        click.echo(
            f"{view['requests_per_s']:.1f} requests/s through {len(view['instances'])}"
            f" instance(s), over the last ~{view['window_seconds']:g} s"
        )
        click.echo("keys (share of all traffic):")
        for key in view["keys"]:
            click.echo(
                f"  {100 * key['share']:5.1f}%  {key['table']}/{key['pk']}  slot {key['slot']}"
                f" on {key['shard']}  {key['reads_per_s']:.1f} reads/s"
                f" {key['writes_per_s']:.1f} writes/s"
            )
        click.echo("slots:")
        for slot in view["slots"]:
            click.echo(
                f"  {100 * slot['share']:5.1f}%  slot {slot['slot']} on {slot['shard']}"
                f"  {slot['requests_per_s']:.1f} requests/s"
            )
        click.echo("shards (requests/s, x mean):")
        for shard in view["shards"]:
            click.echo(
                f"  {shard['name']:<12} {shard['requests_per_s']:10.1f}  {shard['vs_mean']:.2f}x"
            )

    emit(run(load()), as_json, render)


@main.group()
def changes() -> None:
    """The change feed: tail."""


@changes.command("tail")
@click.option("--tables", default=None, help="Comma-separated tables [every table].")
@click.option("--cursor", default=None, help="Go on after this cursor [from the start].")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Stop after N changes.")
@click.option("--once", is_flag=True, help="Read once (what is there now) and stop.")
@json_option
@pass_ctx
def changes_tail(
    ctx: Context,
    tables: str | None,
    cursor: str | None,
    limit: int | None,
    once: bool,
    as_json: bool,
) -> None:
    """Follow the change feed: one line per change (--json: a JSON object), until Ctrl-C,
    --limit or --once; then the cursor to go on from (--cursor) goes to stderr.

    Reads the shard primaries directly, as GET /v1/changes does.  Without --cursor it
    starts at the oldest change the shards keep.
    """
    try:
        start = changefeed.Cursor.decode(cursor) if cursor is not None else None
    except errors.ApiError as exc:
        raise click.UsageError(exc.message) from exc
    last = [start]

    def show(page: changefeed.Page) -> None:
        for change in page.changes:
            data = change.as_json()
            if as_json:
                click.echo(orjson.dumps(data).decode())
            else:
                item = orjson.dumps(data["item"]).decode()
                click.echo(
                    f"{data['at']} {change.shard} {change.op} {change.table}"
                    f" {change.pk!r}/{change.sk!r} v{change.version} {item}"
                )
        last[0] = page.cursor

    try:
        run(
            changefeed.follow(
                ctx.dsn,
                cursor=start,
                tables=tables.split(",") if tables else None,
                on_page=show,
                limit=limit,
                once=once,
                page_size=ctx.settings.default_page_size,
                max_bytes=ctx.settings.max_response_bytes,
            )
        )
    except KeyboardInterrupt:
        pass
    except errors.ApiError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from exc
    finally:
        if last[0] is not None:
            click.echo(f"cursor: {last[0].encode()}", err=True)


@main.command()
@yes_option
@pass_ctx
def migrate(ctx: Context, yes: bool) -> None:
    """Apply migrations/ to the catalog and every shard primary (idempotent)."""
    confirm(yes, "Apply pending migrations to the catalog and all shard primaries?")
    applied = run(admin.migrate_all(ctx.dsn, slot_count=ctx.settings.slot_count))
    for target, versions in applied.items():
        done = ", ".join(f"{v:04d}" for v in versions) or "up to date"
        click.echo(f"{target}: {done}")


@main.command()
@yes_option
@pass_ctx
def init(ctx: Context, yes: bool) -> None:
    """Assign every slot of a new cluster to the registered shards (once)."""
    confirm(yes, "Assign all slots to the registered shards?")
    counts = run(admin.init_slots(ctx.dsn))
    for shard, count in sorted(counts.items()):
        click.echo(f"{shard}: {count} slots")


@main.group()
def shard() -> None:
    """Shards: list, add."""


@shard.command("list")
@json_option
@pass_ctx
def shard_list(ctx: Context, as_json: bool) -> None:
    """Registered shards and their nodes."""
    topo = run(admin.topology(ctx.dsn))
    counts = topo.slot_counts()
    data = [
        {
            "name": s.name,
            "weight": s.weight,
            "slots": counts.get(s.name, 0),
            "nodes": [
                {"name": n.name, "role": n.role, "host": n.host, "port": n.port, "fenced": n.fenced}
                for n in s.nodes
            ],
        }
        for s in topo.shards.values()
    ]

    def render(rows: list[dict[str, Any]]) -> None:
        for row in rows:
            nodes = ", ".join(f"{n['name']}({n['role']})" for n in row["nodes"])
            click.echo(f"{row['name']:<10} weight={row['weight']} slots={row['slots']} {nodes}")

    emit(data, as_json, render)


@shard.command("add")
@click.argument("name")
@click.option("--primary", "primary_dsn", required=True, help="postgresql:// DSN")
@click.option("--replica", "replica_dsns", multiple=True, help="DSN of a replica (repeat)")
@click.option("--weight", default=1, show_default=True)
@click.option(
    "--zone",
    "zones",
    multiple=True,
    callback=lambda ctx, param, values: tuple(_zone(v) for v in values),
    help="Zone of the primary, then of each replica in order (repeat).",
)
@click.option(
    "--patroni-url",
    "patroni_urls",
    multiple=True,
    help="Patroni REST API (http://host:port) of the primary, then of each replica (repeat):"
    " Patroni chooses this shard's primary and shardd follows it.",
)
@yes_option
@pass_ctx
def shard_add(
    ctx: Context,
    name: str,
    primary_dsn: str,
    replica_dsns: tuple[str, ...],
    weight: int,
    zones: tuple[str, ...],
    patroni_urls: tuple[str, ...],
    yes: bool,
) -> None:
    """Register shard NAME (migrates its primary; it owns no slots until a rebalance)."""
    if len(zones) > 1 + len(replica_dsns):
        raise click.BadParameter(
            f"{len(zones)} zones for {1 + len(replica_dsns)} nodes", param_hint="--zone"
        )
    if patroni_urls and len(patroni_urls) != 1 + len(replica_dsns):
        raise click.BadParameter(
            f"{len(patroni_urls)} URLs for {1 + len(replica_dsns)} nodes: give one each",
            param_hint="--patroni-url",
        )
    for url in patroni_urls:
        if not re.fullmatch(r"https?://[^/\s]+/?", url):
            raise click.BadParameter(
                f"not http(s)://host:port: {url!r}", param_hint="--patroni-url"
            )
    confirm(yes, f"Register shard {name}?")
    epoch = run(
        admin.add_shard(
            ctx.dsn,
            name=name,
            primary_dsn=primary_dsn,
            replica_dsns=replica_dsns,
            weight=weight,
            zones=zones,
            patroni_urls=patroni_urls,
        )
    )
    click.echo(f"shard {name} registered (epoch {epoch})")


def _mover(ctx: Context, as_json: bool) -> tuple[reshard.Mover, Callable[[], None]]:
    """A mover whose progress is a live bar over slots (or nothing with --json)."""
    if as_json:
        return _new_mover(ctx), lambda: None
    bar = click.progressbar(length=1, label="planning", show_eta=True, show_pos=True)
    bar.__enter__()
    seen: dict[int, str] = {}
    total = 0

    def progress(move: reshard.Move) -> None:
        nonlocal total
        if move.id not in seen:
            total += len(move.slots)
            bar.length = total
        if move.phase in ("done", "aborted") and seen.get(move.id) not in ("done", "aborted"):
            bar.update(len(move.slots))
        seen[move.id] = move.phase
        backlog = "" if move.backlog is None else f" backlog {move.backlog}"
        bar.label = (
            f"move {move.id} {move.source}->{move.target} {move.phase}:"
            f" {move.rows_copied} rows copied, {move.changes_applied} changes{backlog}"
        )
        bar.render_progress()

    def close() -> None:
        bar.__exit__(None, None, None)

    return _new_mover(ctx, progress=progress), close


def _new_mover(ctx: Context, *, progress: reshard.mover.Progress | None = None) -> reshard.Mover:
    return reshard.Mover(
        ctx.dsn,
        lease=ctx.settings.topology_lease,
        freeze_lock_timeout=ctx.settings.lock_timeout,
        progress=progress,
    )


def _report(moves: list[reshard.Move], as_json: bool) -> None:
    def render(rows: list[dict[str, Any]]) -> None:
        for row in rows:
            pause = "" if row["pause_ms"] is None else f" pause {row['pause_ms']:.1f} ms"
            click.echo(
                f"move {row['id']:<4} {row['source']}->{row['target']} {row['slots']} slots"
                f" {row['phase']:<11} rows {row['rows_copied']} changes"
                f" {row['changes_applied']}{pause}{' ' + row['error'] if row['error'] else ''}"
            )

    emit([m.as_json() for m in moves], as_json, render)


def _run_moves(ctx: Context, as_json: bool, action: Callable[[reshard.Mover], Any]) -> Any:
    mover, close = _mover(ctx, as_json)
    try:
        return run(action(mover))
    finally:
        close()


@main.command()
@click.option("--dry-run", is_flag=True, help="Show the plan with estimates; move nothing.")
@click.option(
    "--by",
    type=click.Choice(["slots", "load"]),
    default="slots",
    show_default=True,
    help="slots: slot counts by shard weight; load: move single hot slots off the "
    "busiest shards (writes per slot from the change logs, last 10 minutes).",
)
@click.option("--max-parallel", default=2, show_default=True, help="Moves running at once.")
@click.option(
    "--group-slots", default=16, show_default=True, help="Slots per move (frozen together)."
)
@click.option("--resume", is_flag=True, help="Continue the unfinished run.")
@click.option("--abort", "abort_", is_flag=True, help="Roll back every unfinished move.")
@yes_option
@json_option
@pass_ctx
def rebalance(
    ctx: Context,
    dry_run: bool,
    by: str,
    max_parallel: int,
    group_slots: int,
    resume: bool,
    abort_: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Move slots online until the map matches the weighted ring (see README)."""
    if resume and abort_:
        raise click.UsageError("--resume and --abort exclude each other")
    if abort_:
        confirm(yes, "Roll back every unfinished move?")
        _report(_run_moves(ctx, as_json, reshard.abort), as_json)
        return
    if resume:
        confirm(yes, "Resume the unfinished rebalance?")
        moves = _run_moves(
            ctx, as_json, lambda mover: reshard.resume(mover, max_parallel=max_parallel)
        )
        _report(moves, as_json)
        return
    load = run(reshard.measure_load(ctx.dsn)) if by == "load" else None
    if load is not None and not as_json:
        _advise(load)
    planned = run(reshard.plan_for(ctx.dsn, group_slots=group_slots, by=by, load=load))
    # Also with --yes: it fails at once, before anything is recorded, when a source has
    # no primary (one query per source shard).
    estimates = run(reshard.estimate(ctx.dsn, planned))
    if dry_run or not yes:

        def render(rows: list[dict[str, Any]]) -> None:
            if not rows:
                click.echo("the slot map is balanced; nothing to move")
            for row in rows:
                click.echo(
                    f"{row['source']}->{row['target']}: {row['slots']} slots,"
                    f" ~{row['rows']} rows, ~{row['bytes']} bytes"
                )
            total = sum(r["slots"] for r in rows)
            click.echo(f"{len(rows)} moves, {total} slots")

        emit(estimates, as_json, render)
        if dry_run or not planned:
            return
    confirm(yes, "Run these moves now?")
    moves = _run_moves(
        ctx,
        as_json,
        lambda mover: reshard.rebalance(
            mover, group_slots=group_slots, max_parallel=max_parallel, by=by, load=load
        ),
    )
    _report(moves, as_json)


def _advise(load: reshard.Load) -> None:
    """Say which keys no slot move can balance, and what helps instead."""
    for key in load.celebrities:
        click.echo(
            f"celebrity: {key.table}/{key.pk} alone takes {key.reads_per_s:.0f} reads/s and"
            f" {key.writes_per_s:.0f} writes/s ({100 * key.share:.0f}% of all traffic), more"
            f" than a shard's fair share: no slot move can balance it. Reads: cache it"
            f" (PUT /v1/tables/{key.table} with cache hot or all) and read it eventual (spread"
            f" over every node of its shard); writes: give it a shard of its own with"
            f" `shardctl isolate --table {key.table} --pk {key.pk} --to SHARD`.",
            err=True,
        )


@main.command()
@click.option("--table", required=True, help="The celebrity's table.")
@click.option("--pk", required=True, help="The celebrity's partition key.")
@click.option("--to", "to", required=True, help="The shard to dedicate to its slot.")
@click.option("--dry-run", is_flag=True, help="Show the moves; change nothing.")
@click.option("--max-parallel", default=2, show_default=True, help="Moves running at once.")
@click.option("--group-slots", default=16, show_default=True, help="Slots per move.")
@yes_option
@json_option
@pass_ctx
def isolate(
    ctx: Context,
    table: str,
    pk: str,
    to: str,
    dry_run: bool,
    max_parallel: int,
    group_slots: int,
    yes: bool,
    as_json: bool,
) -> None:
    """Move the slot of TABLE/PK onto shard TO, alone, online; pin it there.

    TO keeps that slot and takes no other (weight 0): its other slots move off it, and
    later rebalances, by slots or by load, leave the pinned slot where it is.
    """
    topo = run(admin.topology(ctx.dsn))
    if table not in topo.tables:
        raise click.ClickException(f"no table {table}")
    isolation = run(reshard.plan_isolation(ctx.dsn, pk=pk, to=to, group_slots=group_slots))
    owner = topo.slot_map[isolation.slot]
    summary = {
        "table": table,
        "pk": pk,
        "slot": isolation.slot,
        "from": owner,
        "to": to,
        "moves": [
            {"source": m.source, "target": m.target, "slots": list(m.slots)}
            for m in isolation.planned
        ],
    }
    if dry_run or not yes:

        def render(data: dict[str, Any]) -> None:
            click.echo(
                f"{table}/{pk} is in slot {data['slot']} on {data['from']}; {to} would hold"
                f" it alone ({sum(len(m['slots']) for m in data['moves'])} slots move"
                f" in {len(data['moves'])} moves)"
            )

        emit(summary, as_json, render)
        if dry_run:
            return
    confirm(yes, f"Dedicate shard {to} to slot {isolation.slot} and move the slots now?")
    _, moved = _run_moves(
        ctx,
        as_json,
        lambda mover: reshard.isolate(
            mover, pk=pk, to=to, group_slots=group_slots, max_parallel=max_parallel
        ),
    )
    _report(moved, as_json)
    if not as_json:
        click.echo(f"slot {isolation.slot} ({table}/{pk}) is pinned to {to}, alone")


@main.command()
@json_option
@pass_ctx
def moves(ctx: Context, as_json: bool) -> None:
    """Slot moves, newest last, with their phases."""

    async def load() -> list[reshard.Move]:
        async with admin.connect(ctx.dsn) as conn:
            return await reshard.list_moves(conn)

    _report(run(load()), as_json)


@shard.command("remove")
@click.argument("name")
@click.option("--max-parallel", default=2, show_default=True)
@click.option("--group-slots", default=16, show_default=True)
@yes_option
@json_option
@pass_ctx
def shard_remove(
    ctx: Context, name: str, max_parallel: int, group_slots: int, yes: bool, as_json: bool
) -> None:
    """Move every slot off shard NAME, then unregister it (its nodes keep running)."""
    confirm(yes, f"Move every slot off {name} and unregister it?")
    moved = _run_moves(
        ctx,
        as_json,
        lambda mover: reshard.remove_shard(
            mover, name, group_slots=group_slots, max_parallel=max_parallel
        ),
    )
    _report(moved, as_json)
    if not as_json:
        click.echo(f"shard {name} removed")


if __name__ == "__main__":
    main()


# -- views --------------------------------------------------------------------------


@main.group("views")
def views_group() -> None:
    """Views: denormalized copies of tables, kept current from the change logs."""


def _with_cluster(ctx: Context, action: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """Run ``action(cluster)`` on an in-process data plane over the catalog's topology."""
    from .cluster import Cluster

    async def go() -> T:
        cluster = Cluster(ctx.settings)
        try:
            await cluster.start()
            cluster.watcher.require_topology()
            return await action(cluster)
        finally:
            await cluster.close()

    try:
        return run(go())
    except errors.ApiError as exc:
        raise click.ClickException(exc.message) from exc


def _find_view(cluster: Any, name: str) -> Any:
    from .views import manage

    return manage.find(cluster.watcher.require_topology(), None, name)


@views_group.command("list")
@json_option
@pass_ctx
def views_list(ctx: Context, as_json: bool) -> None:
    """Every view, its source table and state."""
    topo = run(admin.topology(ctx.dsn))
    data = [topo.views[name].as_json() for name in sorted(topo.views)]

    def render(rows: list[dict[str, Any]]) -> None:
        for row in rows:
            click.echo(f"{row['name']:<32} {row['table']:<24} {row['state']}")

    emit(data, as_json, render)


@views_group.command("status")
@click.argument("name")
@json_option
@pass_ctx
def views_status(ctx: Context, name: str, as_json: bool) -> None:
    """A view's state and its lag per source shard."""
    from .views import manage

    data = _with_cluster(ctx, lambda c: manage.status(c, _find_view(c, name)))

    def render(view: dict[str, Any]) -> None:
        click.echo(f"{view['name']} on {view['table']}: {view['state']}")
        for shard in view["shards"]:
            lag = "-" if shard["lag_seconds"] is None else f"{shard['lag_seconds']:.3f} s"
            click.echo(
                f"  {shard['shard']:<12} {shard['state']:<12} lag {lag:<10}"
                f" last batch {shard['last_batch']}  rows applied {shard['rows_applied']}"
            )

    emit(data, as_json, render)


def _check(ctx: Context, name: str, as_json: bool, *, repair: bool) -> None:
    from .views import manage

    found = _with_cluster(ctx, lambda c: manage.verify(c, _find_view(c, name), repair=repair))
    report = found.as_json()

    def render(data: dict[str, Any]) -> None:
        click.echo(
            f"{data['view']}: {data['checked']} rows checked, {data['missing']} missing,"
            f" {data['extra']} extra, {data['stale']} stale"
            + (" (repaired)" if repair and not found.clean else "")
        )

    emit(report, as_json, render)
    # The first rows of each kind, for a look (view pk, row sort key), on stderr.
    for kind in ("missing", "extra", "stale"):
        for pk, sk in getattr(found, kind)[:5]:
            click.echo(f"{kind}: {pk!r} {sk!r}", err=True)
    if not repair and not found.clean:
        raise SystemExit(1)


@views_group.command("verify")
@click.argument("name")
@json_option
@pass_ctx
def views_verify(ctx: Context, name: str, as_json: bool) -> None:
    """Recompute the view from its sources; exit 1 when any row is missing, extra or stale."""
    _check(ctx, name, as_json, repair=False)


@views_group.command("repair")
@click.argument("name")
@json_option
@pass_ctx
def views_repair(ctx: Context, name: str, as_json: bool) -> None:
    """Write exactly the rows verify finds missing, extra or stale."""
    _check(ctx, name, as_json, repair=True)


@views_group.command("rebuild")
@click.argument("name")
@json_option
@yes_option
@pass_ctx
def views_rebuild(ctx: Context, name: str, as_json: bool, yes: bool) -> None:
    """Copy every source shard into the view again (online), then repair what is left."""
    from .views import manage

    confirm(yes, f"Rebuild view {name}?")
    report = _with_cluster(ctx, lambda c: manage.rebuild(c, _find_view(c, name))).as_json()
    emit(report, as_json, lambda r: click.echo(f"{r['view']}: rebuilt, {r['checked']} rows"))
