"""The import graph of fluxkv/: no module is in an import cycle (imports under TYPE_CHECKING
included), and the core knows nothing of gRPC, brokers, etcd or tracing (README: Design)."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

PACKAGE = ROOT / "fluxkv"
# The core: the store, change records, errors, expiry, the watch history and the scan cursor.
CORE = ("changes", "errors", "expiry", "scan_cursor", "store", "watch")
# What the core must not import, directly or through another module.
OUTSIDE_CORE = ("grpc", "grpc_health", "grpc_reflection", "pygrpc_native", "aio_pika", "aiormq", "opentelemetry")


def imports_of(path: Path) -> set[str]:
    """The top-level modules and fluxkv modules `path` imports anywhere (functions and
    TYPE_CHECKING blocks included), generated protobuf modules left out."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "fluxkv" else [node.module]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {name if name.startswith("fluxkv.") else name.split(".")[0] for name in found} - {"fluxkv"}


def graph() -> dict[str, set[str]]:
    modules = {f"fluxkv.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {
        name: {m for m in imports_of(path) if m in modules or not m.startswith("fluxkv.")}
        for name, path in modules.items()
    }


def test_no_module_is_in_an_import_cycle() -> None:
    edges = graph()
    cycles = []
    for start in edges:
        # Depth-first from each module: a path back to it is a cycle.
        stack = [(start, [start])]
        seen = set()
        while stack:
            module, path = stack.pop()
            for nxt in edges.get(module, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*path, nxt]))
                elif nxt in edges and nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert cycles == []


def test_the_core_imports_no_grpc_broker_etcd_or_tracing() -> None:
    edges = graph()
    for module in CORE:
        reached, todo = set(), [f"fluxkv.{module}"]
        while todo:  # everything the module imports, through other fluxkv modules too
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in reached:
                    reached.add(nxt)
                    todo.append(nxt)
        forbidden = sorted(m for m in reached if m in OUTSIDE_CORE or m in ("fluxkv.etcd_client", "fluxkv.tracing"))
        assert forbidden == [], f"fluxkv.{module} reaches {forbidden}"
