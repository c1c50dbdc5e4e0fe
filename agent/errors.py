"""Errors raised by `agent/`. The command line turns them into one line and exit code 2.

Third-party errors (websockets, TOML parsing, OS errors on sockets and certificates) are wrapped
at the adapter that meets them, with ``raise ... from exc``.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base class for errors of the running agent and its configuration."""


class ConfigError(AgentError, ValueError):
    """The configuration (TOML file or command line) is invalid: unknown key, wrong type, value."""


class ControlError(AgentError, ValueError):
    """A control command (mute, questions, LoRA scale) is invalid; nothing was changed."""


class OutputError(AgentError):
    """An output (WebSocket server, sink) could not be started or used."""


class AudioProtocolError(AgentError):
    """A remote audio client broke the `/audio` protocol.

    Attributes:
        code: The WebSocket close code to answer with (see `agent.protocols.ws.CloseCode`).
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
