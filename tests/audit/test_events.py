"""The registry of audit events is complete: every event the source records is in it, and
docs/audit.md describes every one, so nobody reads an event in the log they were never told of."""

from __future__ import annotations

import ast
import re
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import lifecycle
from broker.audit.events import AUDIT_EVENTS

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "broker"
# What an f-string's placeholder stands for, by its variable's name: the states a task ends in.
PLACEHOLDERS = {"state": typing.get_args(lifecycle.Ending)}


def _names(node: ast.expr, where: str) -> Iterator[str]:
    """Every event name `node` (the call's event argument) can evaluate to."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.IfExp):
        yield from _names(node.body, where)
        yield from _names(node.orelse, where)
    elif isinstance(node, ast.JoinedStr):
        # One placeholder naming a variable PLACEHOLDERS knows, around constant text.
        [hole] = [part for part in node.values if isinstance(part, ast.FormattedValue)]
        assert isinstance(hole.value, ast.Name) and hole.value.id in PLACEHOLDERS, (
            f"{where}: {ast.unparse(node)}"
        )
        for value in PLACEHOLDERS[hole.value.id]:
            yield "".join(value if part is hole else str(ast.literal_eval(part)) for part in node.values)
    else:
        raise AssertionError(f"{where}: an event name the test can't read: {ast.unparse(node)}")


# The calls that record an event, and the position of its name: `record(session, clock,
# "<event>", ...)`, and the gateway's batched `....queue_event("<event>", ...)`.
RECORDERS = {"record": 2, "queue_event": 0}
# The gateway's batch writer records what `queue_event` queued; the names are read there.
FORWARDS = {("broker/gateway/events.py", "item.event")}


def _recorder(node: ast.AST) -> int | None:
    if not isinstance(node, ast.Call):
        return None
    name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
    return RECORDERS.get(name) if isinstance(name, str) else None


def recorded_events() -> dict[str, str]:
    """Each event some recording call in broker/ records, and where."""
    found: dict[str, str] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            position = _recorder(node)
            if position is not None and isinstance(node, ast.Call) and len(node.args) > position:
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if (path.relative_to(ROOT).as_posix(), ast.unparse(node.args[position])) in FORWARDS:
                    continue
                for name in _names(node.args[position], where):
                    found.setdefault(name, where)
    return found


def test_the_walk_reads_the_calls_of_every_kind():
    recorded = recorded_events()
    # A constant, a conditional and an f-string over the task's ending states.
    assert {"task.denied", "lease.revoke_failed", "lease.revoke_deferred"} <= recorded.keys()
    assert {f"task.{state}" for state in typing.get_args(lifecycle.Ending)} <= recorded.keys()


def test_every_recorded_event_is_registered_and_every_registered_one_recorded():
    recorded = recorded_events()
    unregistered = {name: where for name, where in recorded.items() if name not in AUDIT_EVENTS}
    assert not unregistered, "add these to broker/audit/events.py"
    assert sorted(recorded) == sorted(AUDIT_EVENTS), "nothing records these any more"


def test_every_registered_event_has_a_meaning():
    assert all(meaning.strip() and "\n" not in meaning for meaning in AUDIT_EVENTS.values())


def _documented(path: str, heading: str) -> set[str]:
    text = (ROOT / "docs" / path).read_text()
    section = text[text.index(heading) :]
    table = []
    for line in section.splitlines()[2:]:  # past the blank line and the heading
        if line.startswith("#"):
            break
        if line.startswith("| `"):
            table.append(line)
    return {name for line in table for name in re.findall(r"`([a-z_]+\.[a-z_]+)`", line.split("|")[1])}


@pytest.mark.parametrize(("path", "heading"), [("audit.md", "\n## Events\n"), ("api.md", "\nEvent names:\n")])
def test_the_docs_describe_every_registered_event(path, heading):
    assert sorted(_documented(path, heading)) == sorted(AUDIT_EVENTS)
