"""The clients use the agent's public protocols only: no module under clients/ imports the
agent's own packages (read from the source, so an import inside a function counts too)."""

from __future__ import annotations

import ast

import pytest

from tests.clients.conftest import ROOT

CLIENTS = ROOT / "clients"
PRIVATE = {"agent", "model", "streaming"}
DYNAMIC_IMPORTS = {"import_module", "__import__"}


def imported_packages(tree: ast.AST) -> set[str]:
    """The top-level package of every absolute import in ``tree``, dynamic ones included."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if name in DYNAMIC_IMPORTS and isinstance(first, ast.Constant):
                found.add(str(first.value).split(".")[0])
    return found


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import agent.events", {"agent"}),
        ("from model import salmonn", {"model"}),
        ("def f():\n    from streaming.reframer import Reframer", {"streaming"}),
        ("import importlib\nimportlib.import_module('agent.ws')", {"importlib", "agent"}),
        ("from . import common\nfrom clients.common import say", {"clients"}),
    ],
)
def test_imported_packages_sees_every_kind_of_import(source: str, expected: set[str]) -> None:
    assert imported_packages(ast.parse(source)) == expected


def test_no_client_imports_the_agent_model_or_streaming() -> None:
    sources = sorted(CLIENTS.rglob("*.py"))
    assert len(sources) >= 10, sources  # the four clients and common.py were found
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            imported_packages(ast.parse(path.read_text())) & PRIVATE
        )
        for path in sources
    }
    assert {path: names for path, names in offenders.items() if names} == {}
