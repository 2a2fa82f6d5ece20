"""A task's life has one home (broker/lifecycle.py): its moves, and the only writers of a state.

The tree is read for every assignment to a `.state`: outside `broker/lifecycle.py` and the
ledger's SQL none may exist, so the gateway, locks and every other path that ends a task
go through `end`, `fail` and `deny`. And every field that ending a task may change is
written back by the ledger for the tasks it reads without the ORM.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Table

from broker import lifecycle
from broker.leases import revoker as revoker_module
from broker.ledger import tasks as ledger
from broker.lifecycle import (
    LEASE_END_FIELDS,
    LEASE_MOVES,
    LEASE_STATES,
    TASK_END_FIELDS,
    TASK_MOVES,
    TASK_OPEN_STATES,
    TASK_STATES,
    TERMINAL_TASK_STATES,
    IllegalMove,
)
from broker.models import Lease, Task
from broker.tasks import service as task_service

BROKER = Path(__file__).resolve().parent.parent / "broker"
NOW = datetime(2026, 12, 8, tzinfo=UTC)


def _assigned(source: str, name: str | None) -> set[str]:
    """Attributes assigned on a variable called `name` (any variable, with None): plain,
    tuple, augmented and annotated assignments, and `setattr(x, "attr", ...)`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "setattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
        ) and (name is None or (isinstance(node.args[0], ast.Name) and node.args[0].id == name)):
            found.add(str(node.args[1].value))
        for target in targets:
            parts = target.elts if isinstance(target, ast.Tuple) else [target]
            for part in parts:
                if isinstance(part, ast.Attribute) and (
                    name is None or (isinstance(part.value, ast.Name) and part.value.id == name)
                ):
                    found.add(part.attr)
    return found


def _source_of(function: object) -> str:
    source = inspect.getsource(function)  # type: ignore[arg-type]
    indent = len(source) - len(source.lstrip())
    return "\n".join(line[indent:] for line in source.splitlines())


# ---- the rule: states are written in lifecycle.py and the ledger only -----------------


def test_no_state_is_written_outside_the_lifecycle_and_the_ledger():
    writers = []
    for path in sorted(BROKER.rglob("*.py")):
        relative = path.relative_to(BROKER).as_posix()
        if relative == "lifecycle.py" or relative.startswith("ledger/"):
            continue
        if "state" in _assigned(path.read_text(), None):
            writers.append(relative)
    assert writers == []


def test_the_rule_sees_every_kind_of_assignment():
    # The reader above must find what it looks for, or the rule passes vacuously.
    for source in (
        "task.state = 'x'",
        "row.state, row.finished_at = 'x', now",
        "self.task.state = 'x'",
        "lease.state += ''",
        "task.state: str = 'x'",
        "setattr(task, 'state', 'x')",
    ):
        assert "state" in _assigned(source, None), source
    assert _assigned("task.state == 'x'\nstate = 'x'", None) == set()


def test_the_lifecycle_module_is_where_the_states_are_written():
    assert "state" in _assigned((BROKER / "lifecycle.py").read_text(), None)


# ---- the moves ------------------------------------------------------------------------


def test_every_state_has_its_moves_and_only_open_states_move_on():
    assert set(TASK_MOVES) == {None, *TASK_STATES}
    assert {state for state in TASK_STATES if TASK_MOVES[state]} == set(TASK_OPEN_STATES)
    assert set(TASK_STATES) - set(TASK_OPEN_STATES) == TERMINAL_TASK_STATES
    assert set(LEASE_MOVES) == set(LEASE_STATES)
    for targets in TASK_MOVES.values():
        assert targets <= set(TASK_STATES)


def test_the_database_holds_the_same_states():
    tasks_table, leases_table = Task.__table__, Lease.__table__
    assert isinstance(tasks_table, Table) and isinstance(leases_table, Table)  # typed FromClause
    checks = [str(getattr(c, "sqltext", "")) for c in tasks_table.constraints]
    (states,) = [check for check in checks if check.startswith("state IN")]
    assert states == "state IN ({})".format(", ".join(map(repr, TASK_STATES)))
    leases = [str(getattr(c, "sqltext", "")) for c in leases_table.constraints]
    assert "state IN ({})".format(", ".join(map(repr, LEASE_STATES))) in leases


def _task(state: str | None) -> Task:
    task = Task(id=uuid.uuid4(), task="t", owner="alice@example.com", purpose="p", ttl_seconds=60)
    if state is not None:
        task.state = state  # type: ignore[assignment]
    return task


def _lease(state: str) -> Lease:
    return Lease(id=uuid.uuid4(), state=state, revoke_attempts=0)


_WRITERS = {
    "pending_approval": lambda task: lifecycle.await_approval(task, approval_expires_at=NOW),
    "issuing": lambda task: lifecycle.begin_issuing(task, expires_at=NOW, token_accessor="a"),
    "active": lifecycle.activate,
    "finished": lambda task: lifecycle.end(task, "finished", at=NOW, reason="r"),
    "expired": lambda task: lifecycle.end(task, "expired", at=NOW, reason="r"),
    "revoked": lambda task: lifecycle.end(task, "revoked", at=NOW, reason="r"),
    "failed": lambda task: lifecycle.fail(task, at=NOW, reason="r"),
    "denied": lambda task: lifecycle.deny(task, at=NOW, reason="r"),
}


@pytest.mark.parametrize(
    ("source", "target"), list(itertools.product([None, *TASK_STATES], _WRITERS)), ids=str
)
def test_a_move_happens_exactly_when_the_table_allows_it(source, target):
    task = _task(source)
    ending = target in TERMINAL_TASK_STATES
    if target in TASK_MOVES[source]:
        _WRITERS[target](task)
        assert task.state == target
        if ending:
            assert task.finished_at == NOW
            assert task.end_reason
    elif ending and source in TERMINAL_TASK_STATES:
        # Ending an ended task is the idempotent no-op every end path relies on.
        assert _WRITERS[target](task) is False
        assert (task.state, task.finished_at, task.end_reason) == (source, None, None)
    else:
        with pytest.raises(IllegalMove):
            _WRITERS[target](task)
        assert task.state == source


@pytest.mark.parametrize(
    ("source", "target"), list(itertools.product(LEASE_STATES, ["revoked", "revoke_pending"]))
)
def test_a_lease_moves_exactly_when_the_table_allows_it(source, target):
    lease = _lease(source)
    move = {
        "revoked": lambda: lifecycle.lease_revoked(lease, at=NOW),
        "revoke_pending": lambda: lifecycle.lease_parked(lease, error="e" * 600, retry_at=NOW),
    }[target]
    if target in LEASE_MOVES[source]:
        move()
        assert lease.state == target
        assert (lease.revoked_at is not None) == (target == "revoked")
        assert lease.last_error is None or len(lease.last_error) == 500
    else:
        with pytest.raises(IllegalMove):
            move()
        assert lease.state == source


def test_the_ledger_moves_in_sql_only_where_the_table_allows():
    assert lifecycle.may_become("approval_expired") == ("pending_approval",)
    assert set(lifecycle.may_become("revoked")) == set(TASK_OPEN_STATES)


# ---- what ending writes back ----------------------------------------------------------

_ENDING = [
    lifecycle.end,
    lifecycle.fail,
    lifecycle.deny,
    lifecycle._move,
    revoker_module.Revoker,
    task_service.TaskService.finish,
]


@pytest.mark.parametrize("code", _ENDING, ids=lambda code: code.__qualname__)
def test_every_task_field_the_end_of_a_task_sets_is_written_back(code):
    assert _assigned(_source_of(code), "task") <= set(TASK_END_FIELDS)


@pytest.mark.parametrize(
    "code",
    [lifecycle.lease_revoked, lifecycle.lease_parked, lifecycle._move_lease, revoker_module.Revoker],
    ids=lambda code: code.__qualname__,
)
def test_every_lease_field_ending_sets_is_written_back(code):
    assert _assigned(_source_of(code), "lease") <= set(LEASE_END_FIELDS)


def test_the_ledger_writes_exactly_the_declared_fields():
    for field in TASK_END_FIELDS:
        assert f"{field} = %({field})s" in ledger._TASK_ENDED
    for field in LEASE_END_FIELDS:
        assert f"{field} = %({field})s" in ledger._LEASE_ENDED


def test_the_field_check_sees_assignments():
    found = _assigned("task.a = 1\ntask.b, task.c = 2, 3\nlease.d += 1\n", "task")
    assert found == {"a", "b", "c"}
