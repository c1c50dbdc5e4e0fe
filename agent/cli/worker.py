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


def add_mqtt_options(parser: argparse.ArgumentParser) -> None:
    """The broker options both cluster roles share (same keys as `run`)."""
    from agent.cli.run import MQTT_URL_ENV

    mqtt = parser.add_argument_group("MQTT ([mqtt]; a broker URL is required)")
    mqtt.add_argument(
        "--mqtt",
        metavar="URL",
        help="broker mqtt://[USER:PASS@]HOST:PORT or mqtts://... (mqtt.url; better for a "
        f"password: the {MQTT_URL_ENV} environment variable)",
    )
    mqtt.add_argument("--mqtt-prefix", help="topic prefix (mqtt.prefix, default salmonn)")
    mqtt.add_argument("--mqtt-ca", metavar="PEM", help="CA of the mqtts:// broker (mqtt.ca_file)")
    mqtt.add_argument("--mqtt-cert", metavar="PEM", help="client certificate (mqtt.cert_file)")
    mqtt.add_argument("--mqtt-key", metavar="PEM", help="key of --mqtt-cert (mqtt.key_file)")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``worker`` sub-command."""
    parser = subparsers.add_parser(
        "worker",
        help="cluster: load the model, answer windows from edges over MQTT",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.toml", help="TOML configuration")
    cluster = parser.add_argument_group("cluster ([cluster])")
    cluster.add_argument(
        "--group", help="shared-subscription group (cluster.group, default salmonn)"
    )
    cluster.add_argument(
        "--worker-id", help="this worker's name (cluster.worker_id, default HOSTNAME-PID)"
    )
    model = parser.add_argument_group("model ([model])")
    model.add_argument("--model", help="preset or checkpoint directory (model.name)")
    model.add_argument("--checkpoint", help="trained parts (model.checkpoint)")
    model.add_argument("--input-mode", choices=("official", "trimmed"), help="model.input_mode")
    model.add_argument("--threads", type=int, help="torch threads, 0 = default (model.threads)")
    model.add_argument("--max-new-tokens", type=int, help="model.max_new_tokens")
    model.add_argument("--transcript", choices=("llm", "whisper"), help="model.transcript")
    worker = parser.add_argument_group("batching ([worker])")
    worker.add_argument("--max-batch", type=int, help="windows per batch (worker.max_batch)")
    worker.add_argument("--max-wait-ms", type=float, help="batching wait (worker.max_wait_ms)")
    add_mqtt_options(parser)
    parser.set_defaults(func=run)


def cluster_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """`run`'s options plus the ``[cluster]`` flags, as a nested config dict."""
    from agent.cli.run import overrides_from_args

    # `edge` and `worker` have no --command option (`run` has: model.command); none here.
    options = argparse.Namespace(**{**vars(args), "command": None})
    if not hasattr(options, "source"):
        options.source = None
    out = overrides_from_args(options)
    for dest, key in (
        ("group", "group"),
        ("worker_id", "worker_id"),
        ("device", "device"),
        ("max_in_flight", "max_in_flight"),
        ("accept_timeout", "accept_timeout_s"),
        ("result_timeout", "result_timeout_s"),
    ):
        value = getattr(args, dest, None)
        if value is not None:
            out.setdefault("cluster", {})[key] = value
    return out


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
    from agent.cluster.messages import broker_address
    from agent.config import load_config

    config = load_config(args.config, cluster_overrides(args))
    broker_address(config.mqtt)  # fail before the model loads
    logger.info("effective configuration: %s", json.dumps(config.redacted()))
    return asyncio.run(_main(config))
