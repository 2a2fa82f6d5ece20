"""Reading a policy file: YAML -> validated model -> compiled `Policy`, or every error at once.

Errors name their location the way an author would search for it (`tasks.deploy.when[0]`)
and, where the YAML node is known, the line. Duplicate keys are an error: plain YAML keeps
the last one silently, and a policy whose second `owners:` quietly replaces the first is a
review trap.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from broker.policy.engine import Policy, compile_policy
from broker.policy.schema import (
    PathPart,
    PolicyError,
    PolicyFile,
    PolicyIssue,
    PolicyUnreadable,
    format_location,
)

log = logging.getLogger(__name__)

LineMap = Mapping[tuple[PathPart, ...], int]
_MERGE_TAG = "tag:yaml.org,2002:merge"


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read, validate and compile the policy at `path`; raise `PolicyError` if unusable."""
    return parse_policy(_read(Path(path)), source=str(path))


def parse_policy(text: str | bytes, source: str = "<policy>") -> Policy:
    """Like `load_policy` for text already in memory (`source` only names it in errors)."""
    if isinstance(text, bytes):
        text = _decode(text, source)
    lines, data = _parse_yaml(text, source)
    model = _validate(data, lines, source)
    try:
        return compile_policy(model)
    except PolicyError as error:
        raise _located(error, lines) from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise PolicyUnreadable(f"cannot read {path}: {error.strerror or error}") from None


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PolicyUnreadable(f"{source} is not UTF-8 text (byte {error.start})") from None


# --- YAML ----------------------------------------------------------------------------------


def _parse_yaml(text: str, source: str) -> tuple[LineMap, Any]:
    """Compose the node tree (for lines and duplicate keys), then build plain data from it."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            issue = PolicyIssue((), "the file is empty; expected a mapping with 'tasks'", 1)
            raise PolicyError(f"{source} is not a valid policy", [issue])
        duplicates = _duplicate_keys(node)
        if duplicates:
            raise PolicyError(f"{source} has duplicate keys", duplicates)
        # Lines first: constructing flattens `<<` merge keys into the node tree in place.
        lines = _line_map(node)
        return lines, loader.construct_document(node)
    except yaml.YAMLError as error:
        raise PolicyUnreadable(f"{source} is not valid YAML{_yaml_where(error)}") from None
    finally:
        loader.dispose()


def _yaml_where(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return f"{where}: {problem}" if problem else where


def _children(node: yaml.Node) -> list[tuple[PathPart, yaml.Node, yaml.Node]]:
    """(path part, node whose line locates it, value node) for each child of `node`."""
    if isinstance(node, yaml.MappingNode):
        return [(_key_text(key), key, value) for key, value in node.value if key.tag != _MERGE_TAG]
    if isinstance(node, yaml.SequenceNode):
        return [(index, item, item) for index, item in enumerate(node.value)]
    return []


def _key_text(key: yaml.Node) -> str:
    # A non-scalar key can't name a policy field; it only needs a stable, readable label.
    return str(key.value) if isinstance(key, yaml.ScalarNode) else "<complex key>"


def _walk(node: yaml.Node) -> list[tuple[tuple[PathPart, ...], yaml.Node, yaml.Node]]:
    """Every (path, locating node, value node) below `node`, depth first."""
    found: list[tuple[tuple[PathPart, ...], yaml.Node, yaml.Node]] = []
    stack: list[tuple[tuple[PathPart, ...], yaml.Node, frozenset[int]]] = [((), node, frozenset())]
    while stack:
        path, current, ancestors = stack.pop()
        if id(current) in ancestors:  # a recursive alias: stop rather than loop forever
            continue
        for part, locator, value in _children(current):
            child_path = (*path, part)
            found.append((child_path, locator, value))
            stack.append((child_path, value, ancestors | {id(current)}))
    return found


def _line_map(root: yaml.Node) -> dict[tuple[PathPart, ...], int]:
    lines: dict[tuple[PathPart, ...], int] = {(): root.start_mark.line + 1}
    for path, locator, _value in _walk(root):
        lines.setdefault(path, locator.start_mark.line + 1)
    return lines


def _duplicate_keys(root: yaml.Node) -> list[PolicyIssue]:
    issues = []
    checked: set[int] = set()  # an aliased mapping is reported once, not per reference
    for path, mapping in [((), root), *((p, v) for p, _loc, v in _walk(root))]:
        if not isinstance(mapping, yaml.MappingNode) or id(mapping) in checked:
            continue
        checked.add(id(mapping))
        first_seen: dict[str, int] = {}
        for part, key, _value in _children(mapping):
            line = key.start_mark.line + 1
            name = str(part)
            if name in first_seen:
                message = f"duplicate key {name!r} (first at line {first_seen[name]})"
                issues.append(PolicyIssue(path, message, line))
            first_seen.setdefault(name, line)
    return sorted(issues, key=lambda issue: issue.line or 0)


def line_for(lines: LineMap, path: tuple[PathPart, ...]) -> int | None:
    """The line of `path`, or of its nearest ancestor the file spells out."""
    for end in range(len(path), -1, -1):
        line = lines.get(path[:end])
        if line is not None:
            return line
    return None


# --- validation ----------------------------------------------------------------------------


def _validate(data: Any, lines: LineMap, source: str) -> PolicyFile:
    if not isinstance(data, dict):
        issue = PolicyIssue((), "expected a mapping with 'tasks' at the top level", 1)
        raise PolicyError(f"{source} is not a valid policy", [issue])
    try:
        return PolicyFile.model_validate(data)
    except ValidationError as error:
        issues = [_issue_from_pydantic(detail, lines) for detail in error.errors()]
        issues.sort(key=lambda issue: issue.line or 0)
        raise PolicyError(f"{source} is not a valid policy", issues) from None


def _issue_from_pydantic(detail: ErrorDetails, lines: LineMap) -> PolicyIssue:
    loc = _without_union_tags(tuple(detail["loc"]))
    kind = detail["type"]
    message = detail["msg"].removeprefix("Value error, ")
    ctx = detail.get("ctx", {})
    if kind == "extra_forbidden":
        message = f"unknown key {loc[-1]!r} (check its spelling)"
        return PolicyIssue(loc[:-1], message, line_for(lines, loc))
    if kind == "missing":
        return PolicyIssue(loc[:-1], f"missing required key {loc[-1]!r}", line_for(lines, loc))
    if loc and loc[-1] == "[key]":
        name = loc[-2]
        return PolicyIssue(loc[:-2], f"invalid name {name!r}: {message}", line_for(lines, loc[:-1]))
    if kind == "union_tag_invalid":
        message = f"unknown kind {ctx.get('tag')!r} (expected one of {ctx.get('expected_tags')})"
        return PolicyIssue(loc, message, line_for(lines, (*loc, "kind")))
    if kind == "union_tag_not_found":
        message = "missing required key 'kind' (database, vault_token, pki or lease)"
    return PolicyIssue(loc, message, line_for(lines, loc))


def _without_union_tags(loc: tuple[PathPart, ...]) -> tuple[PathPart, ...]:
    """Drop the discriminator pydantic inserts: tasks.t.credentials.db.<kind>.role."""
    is_credential_field = len(loc) > 4 and loc[0] == "tasks" and loc[2] == "credentials" and loc[4] != "[key]"
    return (*loc[:4], *loc[5:]) if is_credential_field else loc


def _located(error: PolicyError, lines: LineMap) -> PolicyError:
    """`error` with a line number on every issue that lacks one."""
    issues = [
        issue if issue.line is not None else replace(issue, line=line_for(lines, issue.path))
        for issue in error.issues
    ]
    return PolicyError(error.message, issues)


# --- live policy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySnapshot:
    policy: Policy
    version: int  # 1 for the first load, +1 per successful change
    sha256: str  # of the file's bytes, for metrics and audit


class PolicyStore:
    """The policy in force, reloadable at runtime (SIGHUP) without ever serving a bad one.

    Readers call `current()` and get a complete, compiled policy; `reload()` builds the new
    one off to the side and swaps a single reference, so a reader never sees half a reload.
    """

    def __init__(self, path: str | os.PathLike[str], *, last_good: Path | None = None) -> None:
        """`last_good`, when given, keeps a copy of the newest policy that loaded, so a
        process (re)started while the file on disk is broken serves that copy instead of
        failing to boot: gunicorn respawning a worker must not take the service down."""
        self.path = Path(path)
        self._last_good = last_good
        self._lock = threading.Lock()  # serialises reloads; readers never take it
        try:
            raw = _read(self.path)
            policy = parse_policy(raw, str(self.path))
        except PolicyError as error:
            if last_good is None or not last_good.exists():
                raise
            log.error("policy file unusable, serving the last good copy: %s", _summary(error))
            raw = last_good.read_bytes()
            policy = parse_policy(raw, str(last_good))
        self._snapshot = PolicySnapshot(policy, 1, _sha256(raw))
        self._remember(raw)

    def _remember(self, raw: bytes) -> None:
        if self._last_good is None:
            return
        staging = self._last_good.with_suffix(f".{os.getpid()}.tmp")
        staging.write_bytes(raw)
        staging.replace(self._last_good)

    def current(self) -> Policy:
        return self._snapshot.policy

    def snapshot(self) -> PolicySnapshot:
        """Policy, version and digest read together (separate reads could straddle a reload)."""
        return self._snapshot

    @property
    def version(self) -> int:
        return self._snapshot.version

    @property
    def sha256(self) -> str:
        return self._snapshot.sha256

    def reload(self) -> bool:
        """Load the file again; on any problem keep the old policy, log why, return False.

        An unchanged file (same digest) is not a new version and returns True.
        """
        with self._lock:
            old = self._snapshot
            try:
                raw = _read(self.path)
                digest = _sha256(raw)
                if digest == old.sha256:
                    return True
                policy = parse_policy(raw, str(self.path))
            except PolicyError as error:
                log.warning("policy reload failed, keeping version %d: %s", old.version, _summary(error))
                return False
            self._snapshot = PolicySnapshot(policy, old.version + 1, digest)
            self._remember(raw)
        log.info(
            "policy reloaded: version %d, %d task types, sha256 %s",
            old.version + 1,
            len(policy.tasks),
            digest[:12],
        )
        return True


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _summary(error: PolicyError) -> str:
    first = f" (first: {error.errors[0]})" if error.errors else ""
    more = f"; {len(error.errors)} error(s){first}" if error.errors else ""
    return f"{error.message}{more}"


__all__ = [
    "PolicyError",
    "PolicySnapshot",
    "PolicyStore",
    "PolicyUnreadable",
    "format_location",
    "line_for",
    "load_policy",
    "parse_policy",
]
