"""`salmonn-live worker`: a model worker of a cluster (see docs/deployment.md).

Loads the model, reads windows from edges through the MQTT 5 shared subscription
``$share/<group>/<prefix>/windows/+`` and sends the answers back to each window's edge, which
publishes them as events. Start as many as the load needs, on as many machines; they share the
windows. Stops cleanly on SIGINT, SIGTERM or SIGHUP (answers what it holds, then says ``offline``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)


#: `worker`'s option groups: (title, configuration section); the options come from the fields.
WORKER_GROUPS = (
    ("cluster ([cluster])", "cluster"),
    ("model ([model])", "model"),
    ("batching ([worker])", "worker"),
    ("MQTT ([mqtt]; a broker URL is required)", "mqtt"),
)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``worker`` sub-command."""
    from agent.cli.options import add_config_options

    parser = subparsers.add_parser(
        "worker",
        help="cluster: load the model, answer windows from edges over MQTT",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.toml", help="TOML configuration")
    add_config_options(parser, "worker", WORKER_GROUPS)
    parser.set_defaults(func=run)


async def _main(config: Any) -> int:
    from agent.cli.run import SHUTDOWN_SIGNALS, _model_loader
    from agent.cluster.worker import ClusterWorker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in SHUTDOWN_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        async with ClusterWorker(config, _model_loader(config.model)) as worker:
            reason = await worker.run(stop)
            logger.info("worker %s stopping: %s", worker.id, reason)
            if worker.refused is not None:
                sys.stderr.write(f"salmonn-live worker: MQTT broker refused: {worker.refused}\n")
                return 2
            failed = worker.pipeline is not None and worker.pipeline.failure is not None
    finally:
        for sig in SHUTDOWN_SIGNALS:
            loop.remove_signal_handler(sig)
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    """Validate the configuration, load the model, serve until a signal."""
    from agent.cli.run import overrides_from_args
    from agent.cluster.messages import broker_address
    from agent.config import load_config

    config = load_config(args.config, overrides_from_args(args))
    broker_address(config.mqtt)  # fail before the model loads
    logger.info("effective configuration: %s", json.dumps(config.redacted()))
    return asyncio.run(_main(config))
