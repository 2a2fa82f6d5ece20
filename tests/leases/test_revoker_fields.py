"""Every field the revoker may change is written back on every path.

Tasks read without the ORM (finish, expiry) are saved by `broker.ledger.write_back_end(ed)`,
which writes `Revoker.TASK_FIELDS` and `Revoker.LEASE_FIELDS`. A field the revoker starts
to set without adding it there would be lost on those paths; this test reads the revoker's
source and the task service's finish for every assignment to a task or lease attribute.
"""

from __future__ import annotations

import ast
import inspect

import pytest

from broker.leases import revoker as revoker_module
from broker.leases.revoker import Revoker
from broker.ledger import tasks as ledger
from broker.tasks import service as task_service


def _assigned(source: str, name: str) -> set[str]:
    """Attributes assigned on a variable called `name` (plain, tuple and augmented assignments)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            parts = target.elts if isinstance(target, ast.Tuple) else [target]
            for part in parts:
                if isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name) and part.value.id == name:
                    found.add(part.attr)
    return found


@pytest.mark.parametrize("module", [revoker_module, task_service], ids=["revoker", "finish"])
def test_every_task_field_the_end_of_a_task_sets_is_written_back(module):
    source = inspect.getsource(module)
    if module is task_service:
        source = inspect.getsource(task_service.TaskService.finish)
        source = "\n".join(line[4:] for line in source.splitlines())
    assert _assigned(source, "task") <= set(Revoker.TASK_FIELDS)


def test_every_lease_field_the_revoker_sets_is_written_back():
    assert _assigned(inspect.getsource(revoker_module), "lease") <= set(Revoker.LEASE_FIELDS)


def test_the_ledger_writes_exactly_the_declared_fields():
    for field in Revoker.TASK_FIELDS:
        assert f"{field} = %({field})s" in ledger._TASK_ENDED
    for field in Revoker.LEASE_FIELDS:
        assert f"{field} = %({field})s" in ledger._LEASE_ENDED


def test_the_check_sees_assignments():
    # The reader above must find what it looks for, or the tests above pass vacuously.
    found = _assigned("task.a = 1\ntask.b, task.c = 2, 3\nlease.d += 1\n", "task")
    assert found == {"a", "b", "c"}
