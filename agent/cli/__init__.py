"""The `salmonn-live` command line: one entry point, one sub-command per job.

Each sub-command lives in its own module with a `register(subparsers)` function that adds
its parser and sets `func(args) -> int`. Heavy imports (torch, transformers) happen inside
`func`, so `salmonn-live --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Sub-command modules, in the order `--help` lists them.
_COMMAND_MODULES = (
    "agent.cli.ask",
    "agent.cli.segment",
    "agent.cli.run",
    "agent.cli.edge",
    "agent.cli.worker",
    "agent.cli.wyoming",
    "training.cli",
    "bench.cli",
)


def _expected_errors() -> tuple[type[BaseException], ...]:
    from agent.errors import AgentError
    from model.errors import ModelError
    from streaming.errors import StreamingError

    return (AgentError, ModelError, StreamingError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="salmonn-live",
        description="A real-time hearing agent built on SALMONN.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    # Not dest="command": `run` has a --command option, which would overwrite the name.
    subparsers = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line. Returns the process exit code (0 ok, 2 bad input, 1 crash).

    A closed stdout or stderr never stops or hangs a command (see `agent.cli.logsetup`).
    """
    from agent.cli import logsetup

    # Before any sub-command imports tqdm or transformers (their switches are read at import).
    logsetup.install()
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.INFO if args.verbose < 2 else logging.DEBUG)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.verbose < 2:
        # Third-party chatter: amqtt's state machine logs every transition at INFO, and
        # transformers warns about its own Whisper generation internals on every batch.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except _expected_errors() as exc:
        print(f"salmonn-live {args.subcommand}: error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
