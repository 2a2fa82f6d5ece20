"""No import runs back up a layer.

The broker's packages and top-level modules stand in layers, each using only those below
it (or beside it, without a loop): the foundations (errors, clock, settings, the states
of a task's life), the tables, what talks to the outside (identities, policy, Vault,
audit), the ledger, the services, their wiring, and what serves them. An import that
runs back up (the ledger reaching into the revoker for its field lists, the Vault package
writing Postgres) is how a folder loop starts; this test reads every import in the tree,
lazy ones included, and refuses it. `if TYPE_CHECKING:` imports are for annotations only
and do not count. The client and the MCP server stand apart: they ship to workloads and
import nothing of the server.
"""

from __future__ import annotations

import ast
from pathlib import Path

BROKER = Path(__file__).resolve().parent.parent / "broker"

LAYERS: list[set[str]] = [
    {
        "broker",
        "errors",
        "clock",
        "canonical",
        "credentials",
        "lifecycle",
        "paging",
        "config",
        "metrics",
        "logs",
        "tracing",
        "migrate",
        "db",
    },
    {"models"},
    {"identity", "policy", "vault", "audit"},
    {"ledger"},
    {"leases", "approvals", "gateway"},
    {"tasks", "operator"},
    {"services"},
    {"api", "console", "scheduler", "app"},
    {"server"},
    {"dev", "cli", "__main__"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
# Shipped to workloads: only the package's own `__version__` and each other, in this order.
APART = {"client": {"broker"}, "mcp": {"broker", "client"}}


def _unit(module: str, units: set[str]) -> str:
    """`broker.ledger.tasks` -> `ledger`; `broker.models` -> `models`; `broker` (and a name
    the package itself defines, such as `broker.__version__`) -> `broker`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in units else "broker"


def _imports(tree: ast.Module) -> list[str]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found: list[str] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "broker":
            found.extend(f"broker.{alias.name}" for alias in node.names)  # `from broker import metrics`
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [name for name in found if name == "broker" or name.startswith("broker.")]


def unit_edges(root: Path = BROKER) -> set[tuple[str, str, str]]:
    """(importing unit, imported unit, file) for every import between two units."""
    edges = set()
    units = {path.relative_to(root).with_suffix("").parts[0] for path in root.rglob("*.py")}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        source = "broker" if parts == ("__init__",) else parts[0]
        for module in _imports(ast.parse(path.read_text())):
            target = _unit(module, units)
            if target != source:
                edges.add((source, target, path.relative_to(root).as_posix()))
    return edges


def violations(edges: set[tuple[str, str, str]]) -> list[str]:
    found = []
    for source, target, where in sorted(edges):
        if source in APART:
            if target not in APART[source]:
                found.append(f"{where}: {source} -> {target} (the client side imports no server code)")
        elif target in APART:
            if source not in LAYERS[-1]:  # the commands that launch `broker exec` and `broker mcp`
                found.append(f"{where}: {source} -> {target} (only the commands use the client)")
        elif source not in RANK or target not in RANK:
            found.append(f"{where}: {source} -> {target} (place new packages in LAYERS)")
        elif RANK[target] > RANK[source]:
            found.append(f"{where}: {source} -> {target} runs back up a layer")
    return found + _loops({(source, target) for source, target, _ in edges})


def _loops(edges: set[tuple[str, str]]) -> list[str]:
    """Import loops between units of one layer (across layers the ranks already forbid them)."""
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
    loops: list[str] = []
    done: set[str] = set()
    path: list[str] = []

    def visit(unit: str) -> None:
        if unit in path:
            loops.append(" -> ".join([*path[path.index(unit) :], unit]))
            return
        if unit in done:
            return
        path.append(unit)
        for target in sorted(graph.get(unit, ())):
            visit(target)
        path.pop()
        done.add(unit)

    for unit in sorted(graph):
        visit(unit)
    return loops


def test_no_import_runs_back_up_a_layer():
    assert violations(unit_edges()) == []


def test_every_unit_has_its_layer():
    units = {path.relative_to(BROKER).with_suffix("").parts[0] for path in BROKER.rglob("*.py")}
    units = {"broker" if unit == "__init__" else unit for unit in units}
    assert units - set(RANK) - set(APART) == set()


def test_the_check_finds_what_it_must(tmp_path):
    # A tree with each kind of fault, so the checks above can't pass by reading nothing.
    tree = {
        "ledger/tasks.py": "from broker.leases.revoker import Revoker\n",
        "vault/pool.py": "def f():\n    from broker.ledger import x\n",
        "audit/d.py": "from broker import lifecycle, tasks, __version__\n",
        "client/sdk.py": "import broker.models\n",
        "identity/a.py": "from broker.policy import p\n",
        "policy/b.py": "from broker.identity import i\n",
        "api/c.py": "from broker.client import BrokerClient\n",
        "lifecycle.py": "if TYPE_CHECKING:\n    from broker.models import Task\n",
        "leases/__init__.py": "",
        "tasks/__init__.py": "",
        "models.py": "",
    }
    for name, text in tree.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    found = "\n".join(violations(unit_edges(tmp_path)))
    for fault in (
        "ledger -> leases",
        "vault -> ledger",
        "audit -> tasks",
        "client -> models",
        "identity -> policy -> identity",
        "api -> client",
    ):
        assert fault in found
    assert "lifecycle" not in found
    assert "__version__" not in found
