"""The CEL wrapper: compile once, fail closed on anything but a clean `true`."""

from __future__ import annotations

import datetime as dt
from types import MappingProxyType
from typing import Any

import pytest

from broker.policy.cel import CelActivation, CelCompileError, CelRule, compile_rule, to_cel_value, utc


@pytest.mark.parametrize(
    ("source", "variables"),
    [
        ("true", frozenset()),
        ('request.owner == "a"', frozenset({"request"})),
        ("workload.id == request.owner && now == now", frozenset({"workload", "request", "now"})),
        ("request.context.tags.exists(t, t == 1)", frozenset({"request"})),
        ("[1, 2].map(x, x * 2).filter(y, y > 2).all(z, z > 0)", frozenset()),
    ],
    ids=["constant", "one-variable", "all-variables", "macro-binding", "chained-macros"],
)
def test_compile_records_referenced_variables(source: str, variables: frozenset[str]) -> None:
    assert compile_rule(source).variables == variables


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("1 +", "CEL syntax error at 1:4: mismatched input '<EOF>'"),
        ("", "CEL syntax error at 1:1"),
        ("requst.owner", "unknown variable requst (available: workload, request, now)"),
        ("a && b", "unknown variable a, b"),
    ],
    ids=["syntax", "empty", "misspelt", "several-unknown"],
)
def test_compile_errors(source: str, message: str) -> None:
    with pytest.raises(CelCompileError) as raised:
        compile_rule(source)
    assert raised.value.message.startswith(message)
    assert "\n" not in raised.value.message
    assert raised.value.source == source


class _PanickingProgram:
    """Stands in for a compiled program whose Rust code panics (pyo3 PanicException)."""

    class PanicException(BaseException):
        pass

    def execute(self, context: Any = None) -> Any:
        raise self.PanicException("thread panicked at src/lib.rs")


def test_a_panic_in_the_extension_fails_the_rule_closed() -> None:
    rule = CelRule(source="x", program=_PanickingProgram(), variables=frozenset())  # type: ignore[arg-type]
    outcome = CelActivation({}).evaluate(rule)
    assert not outcome.passed
    assert "panicked" in outcome.detail


def test_interrupts_are_not_swallowed() -> None:
    class Interrupting:
        def execute(self, context: Any = None) -> Any:
            raise KeyboardInterrupt

    rule = CelRule(source="x", program=Interrupting(), variables=frozenset())  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        CelActivation({}).evaluate(rule)


def test_unconvertible_variables_fail_every_rule_with_a_reason() -> None:
    activation = CelActivation({"request": object()})
    outcome = activation.evaluate(compile_rule("true"))
    assert not outcome.passed
    assert outcome.detail.startswith("cannot pass variables to CEL")


def test_long_error_details_are_one_bounded_line() -> None:
    outcome = CelActivation({}).evaluate(compile_rule('"a".matches("(")'))
    assert not outcome.passed
    assert "\n" not in outcome.detail
    assert len(outcome.detail) <= 300


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (MappingProxyType({"a": (1, 2)}), {"a": [1, 2]}),
        (frozenset({"b", "a"}), ["'a'", "'b'"]),
        ({1: "int-key", (1, 2): "tuple-key"}, {1: "int-key", "(1, 2)": "tuple-key"}),
        (dt.timedelta(seconds=5), dt.timedelta(seconds=5)),
        (None, None),
    ],
    ids=["mapping-proxy", "frozenset", "odd-keys", "timedelta", "none"],
)
def test_to_cel_value(value: Any, expected: Any) -> None:
    converted = to_cel_value(value)
    if isinstance(value, frozenset):
        converted = [repr(item) for item in converted]
    assert converted == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (dt.datetime(2025, 1, 1, 12), dt.datetime(2025, 1, 1, 12, tzinfo=dt.UTC)),
        (
            dt.datetime(2025, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            dt.datetime(2025, 1, 1, 10, tzinfo=dt.UTC),
        ),
    ],
    ids=["naive-is-utc", "offset-converted"],
)
def test_utc(now: dt.datetime, expected: dt.datetime) -> None:
    assert utc(now) == expected
    assert utc(now).tzinfo is dt.UTC
