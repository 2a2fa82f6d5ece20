"""CEL rules of a policy: compiled once at load, evaluated fail-closed per request.

Variables visible to every expression (docs/contract.md §4):

- `workload`: `{id, issuer, subject, claims}`; `issuer` is the configured issuer *name*
  (as written in the policy's `workloads[].issuer`), not the JWT's `iss` URL;
- `request`: `{task, owner, purpose, ttl_seconds, context}`; `ttl_seconds` is the effective
  TTL, i.e. the task type's default when the caller sent none;
- `now`: a CEL timestamp (UTC), so `now.getHours()` and `now > timestamp("...")` work.

A rule passes only when it evaluates to exactly `true`. Any other value, and any error (a
missing map key, a type mismatch, an unknown function), makes it fail with a detail saying
why; nothing raised inside CEL escapes `evaluate`. Reaching for an optional context key
should be written `has(request.context.key) && ...` or `"key" in request.context && ...`.

Other rule families (the gateway's statement rules) see other variables: they pass a
`CelVariables` to `compile_rule`; without one, a rule sees the three above.

Performance: converting Python values into CEL costs far more than running a compiled
program (tens of µs for a request against about 1 µs), so an evaluation converts each
variable once, and only the variables the task's expressions mention.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cel as cel_runtime

VARIABLE_NAMES = frozenset({"workload", "request", "now"})

# Comprehension macros bind their first argument(s) (`list.exists(x, x > 1)`), and the cel
# package reports those as variables. They are recognised from the source text so that the
# load-time check for misspelt variables does not flag them; a miss here only weakens that
# check, it can't reject a correct expression that uses the documented macros.
_MACRO_BINDINGS = re.compile(
    r"\.\s*(?:all|exists_one|exists|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,(?:\s*([A-Za-z_]\w*)\s*,)?"
)
_PARSE_ERROR_LINE = re.compile(r"ERROR: <input>:(\d+:\d+): (?:Syntax error: )?(.*)")
_MAX_DETAIL = 300
_CEL_NATIVE = (str, int, float, bool, bytes, dt.datetime, dt.timedelta)


def _reraise_control_flow(error: BaseException) -> None:
    """The CEL calls catch BaseException because a Rust panic in the extension surfaces as
    pyo3's PanicException, which is not an Exception; a rule must fail closed on that too
    rather than crash the request. Interrupts and exits still propagate."""
    if isinstance(error, KeyboardInterrupt | SystemExit | GeneratorExit):
        raise error


class CelCompileError(ValueError):
    """An expression that can't be used; `message` is one line fit for `policy check`."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{message}: {source!r}")
        self.source = source
        self.message = message


@dataclass(frozen=True)
class CelRule:
    source: str
    program: cel_runtime.Program
    variables: frozenset[str]  # the variables (of those it may read) the expression reads


@dataclass(frozen=True)
class CelOutcome:
    value: bool | None  # None: the expression errored or gave a non-bool, so it decides nothing
    detail: str

    @property
    def passed(self) -> bool:
        return self.value is True


@dataclass(frozen=True)
class CelVariables:
    """The variables one family of rules may read.

    `names` is in the order error messages list them; `fields` gives the fixed fields of
    those variables that have them (a misspelt one is a load error); `sample` holds values
    of the right shape for the load-time dry run (see `_dry_run_problem`).
    """

    names: tuple[str, ...]
    fields: Mapping[str, tuple[str, ...]]
    sample: Mapping[str, Any]
    field_use: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        variables = "|".join(map(re.escape, sorted(self.fields))) or r"(?!)"
        pattern = re.compile(rf"(?<![\w.])({variables})\s*\.\s*([A-Za-z_]\w*)")
        object.__setattr__(self, "field_use", pattern)  # derived once; the class is frozen


# The fields of `request` and `workload` are fixed (docs/contract.md §4); `context` and `claims` are
# the caller's, and any key may be missing from one request and present in the next.
FIELDS = {
    "request": ("task", "owner", "purpose", "ttl_seconds", "context"),
    "workload": ("id", "issuer", "subject", "claims"),
}

POLICY_VARIABLES = CelVariables(
    names=("workload", "request", "now"),
    fields=FIELDS,
    # A request of the right shape with an empty context and no claims.
    sample={
        "request": {"task": "t", "owner": "o@example.com", "purpose": "a sample purpose",
                    "ttl_seconds": 300, "context": {}},
        "workload": {"id": "w", "issuer": "i", "subject": "s", "claims": {}},
        "now": dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
    },
)  # fmt: skip


def compile_rule(source: str, variables: CelVariables = POLICY_VARIABLES) -> CelRule:
    """Compile `source` once; raise `CelCompileError` on syntax errors or unknown variables.

    `variables` says which variables the rule may read: the policy's, unless given.
    """
    try:
        program = cel_runtime.compile(source)
    except BaseException as error:  # the extension raises ValueError; be robust to others
        _reraise_control_flow(error)
        raise CelCompileError(source, _describe_parse_error(error)) from None
    referenced = frozenset(program.variables())
    known = frozenset(variables.names)
    unknown = referenced - known - _macro_bound_names(source)
    if unknown:
        names = ", ".join(sorted(unknown))
        available = ", ".join(variables.names)
        raise CelCompileError(source, f"unknown variable {names} (available: {available})")
    problem = _misspelt_field(source, variables) or _dry_run_problem(program, variables)
    if problem:
        raise CelCompileError(source, problem)
    return CelRule(source=source, program=program, variables=referenced & known)


# String literals, so that `request.owner == "request.x"` is not read as a field use.
_STRING_LITERAL = re.compile(r'"(?:\\.|[^"\\])*"' + r"|'(?:\\.|[^'\\])*'")


def _misspelt_field(source: str, variables: CelVariables) -> str | None:
    for variable, name in variables.field_use.findall(_STRING_LITERAL.sub('""', source)):
        fields = variables.fields[variable]
        if name not in fields:
            return f"{variable} has no field {name!r} (fields: {', '.join(fields)})"
    return None


def _dry_run_problem(program: cel_runtime.Program, variables: CelVariables) -> str | None:
    """Run the rule once on the sample values (for the policy: a request of the right shape
    with an empty context and no claims): what fails there for a reason other than a
    missing context or claim key (those are data) fails on every request, so it is a
    mistake in the rule."""
    sample = cel_runtime.Context(dict(variables.sample))
    try:
        result = program.execute(sample)
    except TypeError as error:  # operand types come from the fixed fields or literals here
        return _one_line(f"CEL type error: {error}")
    except RuntimeError as error:
        if str(error).startswith("Undefined variable or function"):
            return _one_line(f"CEL error: {error}")
        return None
    except BaseException as error:  # a missing key, and anything else data may explain
        _reraise_control_flow(error)
        return None
    if isinstance(result, bool):
        return None
    return f"evaluates to {_cel_type_name(result)}, not a boolean"


def _macro_bound_names(source: str) -> set[str]:
    return {name for match in _MACRO_BINDINGS.finditer(source) for name in match.groups() if name}


def _describe_parse_error(error: BaseException) -> str:
    # The extension's message is several lines with a caret drawing; keep "line:col: why".
    match = _PARSE_ERROR_LINE.search(str(error))
    if match:
        position, reason = match.groups()
        return f"CEL syntax error at {position}: {reason.strip()}"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"CEL compile error: {first_line}"


def to_cel_value(value: Any) -> Any:
    """Plain data CEL can take: mappings become dicts, any sequence or set a list.

    JWT claims and request context are JSON already; this guards against the odd frozenset
    or Mapping proxy, which the extension refuses to convert (and which would fail every
    rule of the task rather than just the one that reads them).
    """
    if value is None or isinstance(value, _CEL_NATIVE):
        return value
    if isinstance(value, Mapping):
        return {_to_cel_key(key): to_cel_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_cel_value(item) for item in value]
    if isinstance(value, set | frozenset):
        return sorted((to_cel_value(item) for item in value), key=repr)
    return str(value)


def _to_cel_key(key: Any) -> str | int | bool:
    return key if isinstance(key, str | int | bool) else str(key)


class CelActivation:
    """The variables of one evaluation, converted into CEL once and shared by all rules."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._context: cel_runtime.Context | None = None
        self._error = ""
        try:
            self._context = cel_runtime.Context(dict(values))
        except BaseException as error:  # fail closed: every rule reading these values fails
            _reraise_control_flow(error)
            self._error = _one_line(f"cannot pass variables to CEL: {error}")

    def evaluate(self, rule: CelRule) -> CelOutcome:
        if self._context is None:
            return CelOutcome(None, self._error)
        try:
            result = rule.program.execute(self._context)
        except BaseException as error:  # fail closed, with the reason
            _reraise_control_flow(error)
            return CelOutcome(None, _one_line(f"error: {_describe_runtime_error(error)}"))
        if result is True:
            return CelOutcome(True, "true")
        if result is False:
            return CelOutcome(False, "false")
        return CelOutcome(None, f"result is {_cel_type_name(result)}, not bool")


def _describe_runtime_error(error: BaseException) -> str:
    if isinstance(error, KeyError):
        return f"no such key {error.args[0]!r}" if error.args else "no such key"
    return str(error) or type(error).__name__


def _cel_type_name(value: Any) -> str:
    names = {str: "string", int: "int", float: "double", bytes: "bytes", list: "list", dict: "map"}
    if value is None:
        return "null"
    return names.get(type(value), type(value).__name__)


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _MAX_DETAIL else flat[: _MAX_DETAIL - 3] + "..."


def utc(now: dt.datetime) -> dt.datetime:
    """`now` as an aware UTC datetime; a naive value is taken to be UTC already."""
    return now.replace(tzinfo=dt.UTC) if now.tzinfo is None else now.astimezone(dt.UTC)
