"""`salmonn-live edge`: capture and segmentation only; the model runs on workers (see
docs/deployment.md).

Takes the same sources as `run` (microphones, files, `/audio` clients), segments them, and
publishes each window on ``<prefix>/windows/<device>`` for the pool of `salmonn-live worker`s.
Answers come back, are deduplicated by window and request, and are published as events on the
same topics and with the same schema as `run`, which this command otherwise mirrors (console,
`/events`, rules, Home Assistant, control).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``edge`` sub-command."""
    from agent.cli.worker import add_mqtt_options

    parser = subparsers.add_parser(
        "edge",
        help="cluster: capture and segment here, answers from workers over MQTT",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.toml", help="TOML configuration")
    parser.add_argument(
        "--source",
        action="append",
        metavar="[ID=]SPEC",
        help="a stream: mic, mic:DEVICE, file:PATH or ws; repeatable (ids must be unique "
        "across the cluster's edges)",
    )
    cluster = parser.add_argument_group("cluster ([cluster])")
    cluster.add_argument("--device", help="this edge's name (cluster.device, default HOSTNAME-PID)")
    cluster.add_argument(
        "--max-in-flight", type=int, help="windows awaiting answers (cluster.max_in_flight)"
    )
    cluster.add_argument(
        "--accept-timeout", type=float, metavar="S", help="cluster.accept_timeout_s"
    )
    cluster.add_argument(
        "--result-timeout", type=float, metavar="S", help="cluster.result_timeout_s"
    )
    sources = parser.add_argument_group("sources and output ([agent])")
    sources.add_argument("--exit-at-end", action="store_true", default=None)
    sources.add_argument("--loop", action="store_true", default=None)
    sources.add_argument("--realtime", action="store_true", default=None)
    sources.add_argument("--print", choices=("text", "json", "none"), default=None)
    sources.add_argument("--print-partials", action="store_true", default=None)
    ws = parser.add_argument_group("WebSocket ([ws])")
    ws.add_argument("--ws", metavar="HOST:PORT|off", help="serve /events and /audio (ws.listen)")
    ws.add_argument("--ws-token", metavar="TOKEN", help="required bearer token (ws.token)")
    ws.add_argument("--ws-no-auth", dest="ws_auth", action="store_false", default=None)
    add_mqtt_options(parser)
    parser.set_defaults(func=run)


def with_device_client_id(config: Any, device: str) -> Any:
    """Each edge needs its own MQTT client id for its event publisher: unless one is set,
    ``salmonn-live-<prefix>-<device>``."""
    mqtt = config.mqtt
    if mqtt.client_id is not None:
        return config
    client_id = "salmonn-live-" + mqtt.prefix.replace("/", "-") + "-" + device
    return dataclasses.replace(config, mqtt=dataclasses.replace(mqtt, client_id=client_id))


async def _main(config: Any) -> int:
    from agent.cli.run import SHUTDOWN_SIGNALS, _out, format_event
    from agent.cluster.edge import Edge
    from agent.cluster.messages import default_name
    from agent.protocols.mqtt import with_mqtt

    device = config.cluster.device or default_name()
    config = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, device=device))
    config = with_device_client_id(config, device)
    edge = Edge(config)
    loop = asyncio.get_running_loop()
    for sig in SHUTDOWN_SIGNALS:
        loop.add_signal_handler(sig, edge.request_shutdown, sig.name)
    printing = config.agent.print
    if printing != "none":
        partials = config.agent.print_partials

        def show(event: dict[str, Any]) -> None:
            _out(json.dumps(event) if printing == "json" else format_event(event))

        edge.add_sink("console", show, accept=lambda e: partials or not e.get("partial", False))
    try:
        async with with_mqtt(edge):
            reason = await edge.run()
            logger.info("edge %s stopping: %s", edge.device, reason)
    finally:
        for sig in SHUTDOWN_SIGNALS:
            loop.remove_signal_handler(sig)
    if edge.pipeline is not None and edge.pipeline.failure is not None:
        return 1
    return 2 if edge.source_errors and config.agent.exit_at_end else 0


def run(args: argparse.Namespace) -> int:
    """Validate the configuration, connect, capture until the end or a signal."""
    from agent.cli.run import _check_sources, _with_session_token
    from agent.cli.worker import cluster_overrides
    from agent.cluster.messages import broker_address
    from agent.config import load_config

    config = load_config(args.config, cluster_overrides(args))
    broker_address(config.mqtt)
    _check_sources(config)
    config = _with_session_token(config)
    logger.info("effective configuration: %s", json.dumps(config.redacted()))
    return asyncio.run(_main(config))
