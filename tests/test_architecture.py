"""Each room imports only what it may: the rules below, read from the source of every module
(an import inside a function counts, and so does `importlib.import_module("...")`).

The one way dependencies point: `streaming` and `model` know nothing of the rest; `training`
builds on them and on the agent's intent language; the agent's runtime, protocols and cluster
never import training; only the command line (`agent.cli`, the composition root) and `bench`
see everything; `clients` speak the public protocols only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DYNAMIC_IMPORTS = {"import_module", "__import__"}

#: (a room: a folder or module path, the imports it must not make). An import is named by its
#: dotted module; a rule names a package or module and forbids it and everything below it.
FORBIDDEN: tuple[tuple[str, frozenset[str]], ...] = (
    ("streaming", frozenset({"agent", "model", "training", "bench", "clients"})),
    ("model", frozenset({"agent", "streaming", "training", "bench", "clients"})),
    # The converters sit below the loader (as transformers keeps convert_openai_to_hf.py apart
    # from modeling_whisper.py): model.whisper imports them, never the other way round.
    ("model/convert_whisper.py", frozenset({"model.whisper", "model.salmonn"})),
    # training's own command-line module registers with the agent's CLI and borrows its model
    # options; the rest of the room uses only the intent language of the agent.
    (
        "training",
        frozenset(
            {
                "agent.cli",
                "agent.runtime",
                "agent.protocols",
                "agent.cluster",
                "agent.config",
                "agent.events",
                "bench",
                "clients",
            }
        ),
    ),
    ("agent/runtime", frozenset({"agent.cli", "agent.cluster", "training", "bench", "clients"})),
    ("agent/protocols", frozenset({"agent.cli", "agent.cluster", "training", "bench", "clients"})),
    # The Wyoming server is handed plain callables: none of the agent's machinery or model.
    (
        "agent/protocols/wyoming.py",
        frozenset(
            {"agent.cli", "agent.runtime", "agent.cluster", "model", "training", "bench", "clients"}
        ),
    ),
    ("agent/cluster", frozenset({"agent.cli", "training", "bench", "clients"})),
    ("agent/config.py", frozenset({"agent.cli", "agent.runtime", "agent.cluster", "training"})),
    (
        "agent/events.py",
        frozenset(
            {
                "agent.cli",
                "agent.runtime",
                "agent.protocols",
                "agent.cluster",
                "training",
                "model",
                "streaming",
            }
        ),
    ),
    (
        "agent/intents.py",
        frozenset(
            {
                "agent.cli",
                "agent.runtime",
                "agent.protocols",
                "agent.cluster",
                "training",
                "model",
                "streaming",
            }
        ),
    ),
    (
        "agent/errors.py",
        frozenset(
            {
                "agent.cli",
                "agent.runtime",
                "agent.protocols",
                "agent.cluster",
                "training",
                "model",
                "streaming",
            }
        ),
    ),
    ("bench", frozenset({"clients"})),
    ("clients", frozenset({"agent", "model", "streaming", "training", "bench"})),
)
#: Exceptions, each with its reason.
ALLOWED: dict[str, frozenset[str]] = {
    # `salmonn-live train|data|eval`: registered like `bench`; shares `ask`'s model options.
    "training/cli.py": frozenset({"agent.cli", "agent.cli.ask", "agent.config"}),
}


def imported_modules(tree: ast.AST) -> set[str]:
    """The dotted module of every absolute import in ``tree``, dynamic ones included
    (``from a.b import c`` gives ``a.b`` and ``a.b.c``: ``c`` may be a module)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if name in DYNAMIC_IMPORTS and isinstance(first, ast.Constant):
                found.add(str(first.value))
    return found


def _matches(module: str, rule: str) -> bool:
    return module == rule or module.startswith(rule + ".")


def violations(path: Path, room: str, forbidden: frozenset[str]) -> list[str]:
    """The imports of one source file that its room forbids (and no exception allows)."""
    relative = path.relative_to(ROOT).as_posix()
    allowed = ALLOWED.get(relative, frozenset())
    return sorted(
        module
        for module in imported_modules(ast.parse(path.read_text()))
        if any(_matches(module, rule) for rule in forbidden)
        and not any(_matches(module, ok) for ok in allowed)
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import agent.events", {"agent.events"}),
        ("from model import salmonn", {"model", "model.salmonn"}),
        (
            "def f():\n    from streaming.reframer import Reframer",
            {"streaming.reframer", "streaming.reframer.Reframer"},
        ),
        (
            "import importlib\nimportlib.import_module('agent.protocols.ws')",
            {"importlib", "agent.protocols.ws"},
        ),
        (
            "from . import common\nfrom clients.common import say",
            {"clients.common", "clients.common.say"},
        ),
    ],
)
def test_imported_modules_sees_every_kind_of_import(source: str, expected: set[str]) -> None:
    assert imported_modules(ast.parse(source)) == expected


def test_the_rule_check_catches_a_forbidden_import(tmp_path: Path, monkeypatch) -> None:
    module = ROOT / "streaming" / "_probe_for_test.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from agent.runtime import app")
    assert violations(module, "streaming", FORBIDDEN[0][1]) == [
        "agent.runtime",
        "agent.runtime.app",
    ]


@pytest.mark.parametrize(("room", "forbidden"), FORBIDDEN, ids=[room for room, _ in FORBIDDEN])
def test_no_room_imports_what_it_must_not(room: str, forbidden: frozenset[str]) -> None:
    target = ROOT / room
    sources = [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))
    assert sources, f"{room} has no Python source: the rule is stale"
    found = {
        path.relative_to(ROOT).as_posix(): bad
        for path in sources
        if (bad := violations(path, room, forbidden))
    }
    assert found == {}
