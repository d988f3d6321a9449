"""The package's layers: no import cycle, and no module imports a higher layer.

Every `import` / `from ... import` anywhere in a module counts, inside functions too (an
import hidden in a function is still a dependency). Importing a submodule of a subpackage
also imports that subpackage's `__init__`. `PYDIST_LAYERS_SRC` points the test at another
copy of the package (e.g. an older tree).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(os.environ.get("PYDIST_LAYERS_SRC") or Path(__file__).resolve().parent.parent / "src" / "pydist")
ROOT = "__init__"  # the package `pydist` itself

# Lowest first. A module may import modules of lower layers only; within a layer marked True
# its modules may also import each other (the cycle test still applies).
LAYERS: list[tuple[set[str], bool]] = [
    ({"serialization"}, False),  # pickling; imports no pydist module
    ({"exceptions"}, False),  # the exception types (pickle themselves via serialization)
    ({"protocol", "channel"}, False),  # the bytes on the wire (sans-IO); the local Channel
    ({"threads", "sharedmem"}, False),  # the runtime threads; large buffers via shared memory
    ({"transport"}, False),  # connections, handshakes, listeners
    ({"group"}, False),  # membership: PGRP, Worker records and states, deregister
    ({"dispatch"}, False),  # frames to handlers by kind; a connection's loss
    ({"managers"}, False),  # the ClusterManager interface, WorkerConfig, helpers
    ({"managers.forkserver"}, False),  # the master's side of the fork server (LocalManager)
    ({"managers.local", "managers.ssh", "managers.slurm", "managers.mpi"}, False),  # Local-, SSH-, Slurm-, MPIManager
    ({"joining"}, False),  # connection setup: dialling, accepting, JOIN / IDENTIFY / EXIT
    ({"calls"}, False),  # reply slots, request/reply, running calls, interrupts
    ({"callbacks", "refs"}, False),  # lifecycle callbacks + statuses; Futures, RemoteChannels
    ({"cluster", "remotecall"}, False),  # addprocs / rmprocs / membership API; remotecall
    ({"workerpool", "managers.elastic"}, False),  # pools; ElasticManager (runs addprocs)
    ({"pmap", "executor"}, False),  # pmap; the concurrent.futures Executor
    ({"pgenerate"}, False),  # the streaming pmap, built on pmap's helpers
    ({"macros", "joblib"}, False),  # sugar; the joblib backend (imported only by users)
    ({"runtime", "worker", ROOT, "__main__", "cli", "mpi", "forkserver"}, True),  # wiring, shutdown, entry points
]


def _modules() -> dict[str, Path]:
    """Dotted names relative to the package ('cluster', 'managers', 'managers.local')."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts) or ROOT] = path
    return out


def _package_of(name: str, path: Path) -> list[str]:
    """The package a module's relative imports start from, as a list of parts."""
    parts = [] if name == ROOT else name.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def add(parts: list[str]) -> None:
        target = ".".join(parts) or ROOT
        if target not in modules:
            return
        found.add(target)
        for i in range(1, len(parts)):  # a subpackage's __init__ runs first
            found.add(".".join(parts[:i]))

    pkg = _package_of(name, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pydist":
                    add(parts[1:])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else list(pkg)
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "pydist":
                parts = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                sub = parts + [alias.name]
                if ".".join(sub) in modules:  # `from . import protocol`: the submodule
                    add(sub)
                else:  # `from .cluster import PGRP`: the module itself
                    add(parts)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles (modules that import each other, and their imports):\n" + \
        "\n".join(", ".join(f"{m} -> {t}" for m in c for t in sorted(graph[m]) if t in c)
                  for c in cycles)


def test_every_module_has_one_layer():
    modules = set(_modules())
    placed = [m for layer, _ in LAYERS for m in layer]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    assert modules - set(placed) == set(), "modules in no layer: add them to LAYERS"
    assert set(placed) - modules == set(), "LAYERS names modules that do not exist"


def test_imports_go_down_the_layers():
    level = {m: i for i, (layer, _) in enumerate(LAYERS) for m in layer}
    same_ok = {i for i, (_, ok) in enumerate(LAYERS) if ok}
    bad = []
    for name, targets in sorted(_graph().items()):
        if name not in level:
            bad.append(f"{name} (in no layer)")
            continue
        for target in sorted(targets):
            if target not in level:
                bad.append(f"{name} -> {target} (in no layer)")
            elif level[target] > level[name] or (level[target] == level[name]
                                                  and level[name] not in same_ok):
                bad.append(f"{name} (layer {level[name]}) -> {target} (layer {level[target]})")
    assert not bad, "imports of the same or a higher layer:\n  " + "\n  ".join(bad)


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True).stdout


@pytest.mark.parametrize("entry", ["import pydist", "import pydist.worker"])
def test_entry_points_wire_every_message_kind(entry):
    """`import pydist` and a worker process (`python -m pydist.worker`) both end up with a
    handler for every message kind and the worker-lost hook in place."""
    if os.environ.get("PYDIST_LAYERS_SRC"):
        pytest.skip("checks the installed package")
    out = _run(f"{entry}\nimport pydist.cluster as c, pydist.dispatch as d, pydist.protocol as p\n"
               "print(sorted(set(p.KIND_NAMES) - set(d.HANDLERS)), "
               "c.PGRP.on_lost is c.worker_lost)")
    assert out.split() == ["[]", "True"]
