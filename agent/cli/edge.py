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

from agent.events import Published

logger = logging.getLogger(__name__)


#: `edge`'s option groups: (title, configuration section); the options come from the fields.
EDGE_GROUPS = (
    ("cluster ([cluster])", "cluster"),
    ("sources and output ([agent])", "agent"),
    ("WebSocket ([ws])", "ws"),
    ("MQTT ([mqtt]; a broker URL is required)", "mqtt"),
)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``edge`` sub-command."""
    from agent.cli.options import add_config_options

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
    add_config_options(parser, "edge", EDGE_GROUPS)
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

        def show(item: Published) -> None:
            _out(item.json if printing == "json" else format_event(item.data))

        edge.add_sink("console", show, accept=lambda item: partials or not item.event.partial)
    try:
        async with edge:
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
    from agent.cli.run import _check_sources, _with_session_token, overrides_from_args
    from agent.cluster.messages import broker_address
    from agent.config import load_config

    config = load_config(args.config, overrides_from_args(args))
    broker_address(config.mqtt)
    _check_sources(config)
    config = _with_session_token(config)
    logger.info("effective configuration: %s", json.dumps(config.redacted()))
    return asyncio.run(_main(config))
