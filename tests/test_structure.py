"""The seams: every channel in the registry loads, and the import graph keeps its shape
(no circle between the daemon and ingest; no channel reaching into the queue)."""

from __future__ import annotations

import ast
from pathlib import Path

import msgspec
import pytest

from firehosed.channels import REGISTRY
from firehosed.channels.base import Channel

PACKAGE = Path(__file__).resolve().parent.parent / "firehosed"


@pytest.mark.parametrize("channel_type", sorted(REGISTRY))
def test_every_registry_entry_loads(channel_type: str) -> None:
    entry = REGISTRY[channel_type]
    config = entry.config_type()
    assert issubclass(config, msgspec.Struct)
    assert config.__struct_config__.tag == channel_type  # what config files name it by
    assert config.__struct_config__.forbid_unknown_fields
    assert issubclass(entry.channel_type(), Channel)


def imports_of(module: Path) -> set[str]:
    """The firehosed modules `module` imports, at run time or for type checking."""
    names = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("firehosed"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("firehosed"))
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path) & modules.keys() for name, path in modules.items()}


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name == goal:
            return True
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return False


def test_ingest_does_not_import_the_daemon() -> None:
    graph = import_graph()
    ingest = [name for name in graph if name.startswith("firehosed.ingest")]
    assert ingest
    assert not [name for name in ingest if reaches(graph, name, "firehosed.daemon")]


def test_admin_does_not_import_the_daemon() -> None:
    """The admin listener asks the daemon through its Operations protocol, like ingest."""
    graph = import_graph()
    admin = [name for name in graph if name.startswith("firehosed.admin")]
    assert len(admin) >= 2
    assert not [name for name in admin if reaches(graph, name, "firehosed.daemon")]


def test_no_channel_imports_the_queue() -> None:
    graph = import_graph()
    channels = [name for name in graph if name.startswith("firehosed.channels")]
    assert len(channels) > 8
    offenders = [
        (name, target)
        for name in channels
        for target in graph[name]
        if target.startswith(("firehosed.queue", "firehosed.delivery", "firehosed.daemon"))
    ]
    assert offenders == []


def test_nothing_outside_the_queue_package_uses_the_segment_store() -> None:
    graph = import_graph()
    users = {
        name
        for name, targets in graph.items()
        if "firehosed.queue.store" in targets and not name.startswith("firehosed.queue")
    }
    assert users <= {"firehosed.replay"}  # offline replay works on the files, daemon stopped
