"""The ``shardd`` entry point: settings from file, environment and flags; then serve."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from typing import Any

import click
import uvloop
from aiohttp import web

from . import config, logs
from .api.app import make_app
from .api.keys import CLUSTER

log = logging.getLogger("shardd")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: config.Settings) -> None:
    """Without tokens anybody who can connect is admin: allow loopback only."""
    if not settings.tokens and not is_loopback(settings.host):
        raise click.UsageError(
            f"refusing to listen on {settings.host} without tokens; set SHARDD_TOKENS "
            "(SECRET:SCOPE[,SCOPE];...) or listen on 127.0.0.1"
        )


def _options(func: Any) -> Any:
    for f in reversed(config.Settings.fields()):
        flag = "--" + f.name.replace("_", "-")
        kind = config.field_type(f)
        if kind is bool:
            func = click.option(
                flag + "/--no-" + f.name.replace("_", "-"),
                f.name,
                default=None,
                help=f.metadata["help"],
            )(func)
        elif getattr(kind, "__origin__", None) is tuple:
            func = click.option(flag, f.name, multiple=True, default=None, help=f.metadata["help"])(
                func
            )
        else:
            func = click.option(flag, f.name, default=None, help=f.metadata["help"])(func)
    return click.option(
        "--config",
        "config_file",
        default=None,
        help="TOML file with settings (also SHARDD_CONFIG).",
    )(func)


@click.command()
@_options
def main(config_file: str | None, **flags: Any) -> None:
    """Serve the shardd HTTP/JSON API."""
    flags = {k: (list(v) or None) if isinstance(v, tuple) else v for k, v in flags.items()}
    try:
        settings = config.load(config_file=config_file, overrides=flags)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    check_exposure(settings)
    logs.setup(settings.log_level)
    log.info("shardd listening on %s:%s", settings.host, settings.port)
    loop_factory = uvloop.new_event_loop if settings.event_loop == "uvloop" else None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(settings))


async def serve(settings: config.Settings) -> None:
    """Serve until SIGTERM or SIGINT; then drain: ``/readyz`` answers 503 for
    ``shutdown_drain`` seconds while requests are still served (a load balancer stops
    sending new ones), then the listener closes and requests in flight get
    ``shutdown_timeout`` seconds to finish."""
    app = make_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.shutdown_timeout)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        await stop.wait()
        if settings.shutdown_drain > 0:
            log.info("stopping: not ready, serving for %.1f s more", settings.shutdown_drain)
            app[CLUSTER].watcher.draining = True
            await asyncio.sleep(settings.shutdown_drain)
        log.info("stopping: listener closed, finishing requests in flight")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
