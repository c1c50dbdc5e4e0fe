"""`salmonn-live run`: the live agent (audio in, understanding out), configured by TOML and flags.

Every option has a TOML key (shown in `--help`); the command line wins over the file, and the
``SALMONN_LIVE_WS_TOKEN`` environment variable sits between them for the WebSocket token (so it
never shows in ``ps``). The merged configuration is validated once, before the model loads.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import secrets
import signal
import sys
from typing import Any

from agent.cli.logsetup import stream_broken
from agent.cli.options import add_config_options, config_overrides
from agent.config import MQTT_URL_ENV, TOKEN_ENV
from agent.events import Published

logger = logging.getLogger(__name__)

#: Signals that start a graceful shutdown in `run`, `edge` and `worker`. SIGHUP is among them:
#: a closed terminal or ssh session stops the agent cleanly (exit code 0), not mid-write.
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: `run`'s option groups: (title, configuration section); the options come from the fields.
RUN_GROUPS = (
    ("sources ([agent])", "agent"),
    ("model ([model])", "model"),
    ("batching ([worker])", "worker"),
    ("WebSocket ([ws])", "ws"),
    ("MQTT ([mqtt], [[rules]]; see docs/mqtt.md)", "mqtt"),
    ("sound events ([sounds])", "sounds"),
    ("Wyoming speech-to-text ([wyoming]; see docs/homeassistant.md)", "wyoming"),
)


def _out(line: str) -> None:
    """One line of command output (events as they happen) on stdout."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``run`` sub-command."""
    parser = subparsers.add_parser(
        "run",
        help="run the live agent: segment streams, ask the model, publish events",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="FILE.toml", help="TOML configuration (see examples/agent.toml)"
    )
    parser.add_argument(
        "--source",
        action="append",
        metavar="[ID=]SPEC",
        help="a stream: mic, mic:DEVICE, file:PATH or ws (remote clients on /audio); "
        "repeat for several streams; replaces [[streams]]",
    )
    add_config_options(parser, "run", RUN_GROUPS)
    parser.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line options of `run`, `edge` or `worker` as a nested config dict (options
    not given are left out), over the environment's token and broker URL."""
    from agent.config import merge, parse_source

    out: dict[str, Any] = {}
    token = os.environ.get(TOKEN_ENV)
    if token:
        out.setdefault("ws", {})["token"] = token
    mqtt_url = os.environ.get(MQTT_URL_ENV)
    if mqtt_url:
        out.setdefault("mqtt", {})["url"] = mqtt_url
    out = merge(out, config_overrides(args))
    sources = getattr(args, "source", None)  # `worker` has no sources
    if sources:
        out["streams"] = [parse_source(spec, i) for i, spec in enumerate(sources)]
    return out


def _model_loader(settings: Any) -> Any:
    def load() -> Any:
        from model.presets import resolve_model
        from model.salmonn import Salmonn

        config = resolve_model(
            settings.name,
            whisper=settings.whisper,
            beats=settings.beats,
            llm=settings.llm,
            checkpoint=settings.checkpoint,
            input_mode=settings.input_mode,
        )
        return Salmonn.from_config(config, device=settings.device, dtype=settings.dtype)

    return load


def format_event(event: dict[str, Any]) -> str:
    """One console line for an event."""
    if event["kind"] == "status":
        return f"{'':13} {event['stream']:<8} status      {event['status']}: {event['message']}"
    if event["kind"] == "trigger":
        what = f"{event['rule']}: {event['topic']} {event['payload'][:200]}"
        return f"{'':13} {event['stream']:<8} trigger     {what}"
    timing = event["timing"]
    latency = ""
    if timing.get("emitted") and timing.get("segment_end"):
        latency = f"  [+{timing['emitted'] - timing['segment_end']:.2f} s]"
    text = json.dumps(event["intent"]) if event.get("intent") else event["text"]
    if event.get("question"):
        text = f"{event['question']} -> {text}"
    mark = "…" if event["partial"] else " "
    span = f"{event['start']:6.2f}-{event['end']:6.2f}"
    return f"{span} {event['stream']:<8} {event['kind']:<10}{mark} {text}{latency}"


def _check_sources(config: Any) -> None:
    from pathlib import Path

    from agent.errors import ConfigError

    for stream in config.streams:
        if stream.kind == "file" and not Path(stream.argument or "").is_file():
            raise ConfigError(f"stream {stream.id}: no such file {stream.argument!r}")


async def _main(config: Any) -> int:
    from agent.runtime.app import Agent

    agent = Agent(config, _model_loader(config.model))
    loop = asyncio.get_running_loop()
    for sig in SHUTDOWN_SIGNALS:
        loop.add_signal_handler(sig, agent.request_shutdown, sig.name)
    printing = config.agent.print
    if printing != "none":
        partials = config.agent.print_partials
        console_only = not config.ws.enabled and not config.mqtt.enabled

        def show(item: Published) -> None:
            if not stream_broken(sys.stdout):
                _out(item.json if printing == "json" else format_event(item.data))
            if console_only and stream_broken(sys.stdout):
                # Nobody is left to hear anything: stop as if signalled (idempotent).
                agent.request_shutdown("stdout closed and no other output")

        agent.add_sink("console", show, accept=lambda item: partials or not item.event.partial)
    try:
        async with agent:
            reason = await agent.run()
            logger.info("stopping: %s", reason)
    finally:
        for sig in SHUTDOWN_SIGNALS:
            loop.remove_signal_handler(sig)
    if agent.pipeline is not None and agent.pipeline.failure is not None:
        return 1
    return 2 if agent.source_errors and config.agent.exit_at_end else 0


def _with_session_token(config: Any) -> Any:
    """Secure by default: with no token configured, make one for this run and show it once on
    the console (stderr, never through logging, so it stays out of log files and stdout's
    event stream)."""
    ws = config.ws
    if not ws.enabled or not ws.auth or ws.token:
        return config
    token = secrets.token_urlsafe(18)
    host, port = ws.host_port
    scheme = "https" if ws.tls_cert else "http"
    sys.stderr.write(
        f"WebSocket token for this run: {token}\n"
        f"  caption page: {scheme}://{host}:{port}/?token={token}"
        f"{'  (port chosen at start: see the listening event)' if port == 0 else ''}\n"
        f"  fix one with --ws-token or {TOKEN_ENV}; --ws-no-auth serves loopback without one\n"
    )
    return dataclasses.replace(config, ws=dataclasses.replace(ws, token=token))


def run(args: argparse.Namespace) -> int:
    """Validate the configuration, load the model, run until the end or a signal."""
    from agent.config import load_config

    config = load_config(args.config, overrides_from_args(args))
    _check_sources(config)
    config = _with_session_token(config)
    logger.info("effective configuration: %s", json.dumps(config.redacted()))
    return asyncio.run(_main(config))
