"""Statement rules: what each SQL statement relayed by the gateway does, and whether the
task's policy lets it through.

A database credential delivered through the gateway may carry `statements:`, a list of
CEL conditions; every statement of every query must make each of them `true`:

    statements:
      - statement.command in ["SELECT", "SHOW"]
      - {name: public-only, when: 'statement.tables.all(t, t.startsWith("public."))'}

A plain string is named `statements[0]`, `statements[1]`, ... in refusals and the audit.
No `statements:` (an empty list) restricts nothing beyond the database role's own grants.

What a rule sees, as `statement`:

- `command`: the statement's command tag, upper case: `SELECT`, `INSERT`, `UPDATE`,
  `DELETE`, `MERGE`, `CREATE`, `ALTER`, `DROP`, `TRUNCATE`, `COPY`, `COPY PROGRAM`,
  `GRANT`, `REVOKE`, `SET`, `RESET`, `SHOW`, `BEGIN`, `COMMIT`, `ROLLBACK`, `SAVEPOINT`,
  `RELEASE`, `PREPARE TRANSACTION`, `COMMIT PREPARED`, `ROLLBACK PREPARED`, `DO`, `CALL`,
  `EXECUTE`, `DEALLOCATE`, `EXPLAIN`, `LISTEN`, `UNLISTEN`, `NOTIFY`, `LOCK`, `VACUUM`,
  `ANALYZE`, `DECLARE`, `FETCH`, `MOVE`, `CLOSE`, ... (`COMMAND_TAGS` lists them all;
  a statement the table does not know is `UNKNOWN`). A query of several statements
  (`SELECT 1; DROP TABLE t`) is checked statement by statement, and refused whole if
  any one is refused.
- `commands`: every command the statement runs, `command` first. It differs from
  `[command]` only when a statement runs others inside it (`WITH d AS (DELETE ...)
  INSERT ...`), and **each rule is checked once per entry, with `command` set to it**, so
  `statement.command in ["SELECT", "INSERT"]` refuses that statement for its DELETE.
  Statements written inside DDL count too, though they run later if at all (`CREATE RULE
  ... DO INSTEAD DELETE`, a `BEGIN ATOMIC` function body): refusing those errs safe.
- `tables`: every relation the statement names anywhere (joins, subqueries, CTE bodies,
  `INSERT ... SELECT`, `SELECT ... INTO`, `DROP TABLE`, `COPY`, `LOCK`, `TRUNCATE`,
  foreign keys), except references to its own CTEs; sorted, without repeats. A name is
  `schema.table`: lower-cased unless quoted in the SQL (`Public.Orders` is
  `public.orders`, `"MiXed"."T"` is `MiXed.T`), an unqualified name stays unqualified
  (`events`: its schema is up to `search_path`, which searches `pg_catalog` first, so a
  rule on schemas refuses it), and a database prefix (`db.schema.table`) is dropped (Postgres only accepts
  the current database there). A part containing `.` or `"` is double-quoted
  (`"a.b".c`), so a schema named `public.x` can't pass for `public`.
- `functions`: the functions the statement calls by name (`count`, `pg_catalog.now`,
  the procedure of a `CALL`), lower-cased unless quoted and **qualified only when the
  SQL qualifies them**: a rule that forbids one must name both spellings
  (`f in ["pg_sleep", "pg_catalog.pg_sleep"]`), while an allow-list of bare names refuses
  a qualified call.

The command of the statements that hide another:

- `WITH d AS (DELETE ...) SELECT ...`: the modifying CTE's command (`DELETE`); a SELECT
  with several runs them all (`commands`), so no command allow-list is bypassed.
- `SELECT ... INTO t` (and `CREATE TABLE t AS`): `CREATE`, with `t` among the tables.
- `EXPLAIN ANALYZE <stmt>` runs the statement: its command, tables and `commands`. Any
  `ANALYZE` option counts, even `ANALYZE false` (refusing that costs nothing). A plain
  `EXPLAIN` is `EXPLAIN`, with the tables of the statement it explains.
- `PREPARE p AS <stmt>`: the command and tables of `<stmt>`, so that `EXECUTE p` can only
  run what a rule allowed; `EXECUTE` itself is `EXECUTE`, with no tables.
- `COPY t TO/FROM STDOUT/STDIN/'file'` is `COPY` with `t`; `COPY ... PROGRAM` is
  `COPY PROGRAM` (it runs a shell command on the database server), which a rule that
  allows `COPY` does not allow. `COPY (DELETE ... RETURNING *) TO STDOUT` also runs a
  `DELETE`.
- `DO` and `CALL` hide their bodies: `DO` and `CALL`, with no tables.
- `BEGIN`/`START TRANSACTION` are `BEGIN`, `COMMIT`/`END` are `COMMIT`, `ROLLBACK`/`ABORT`
  (and `ROLLBACK TO SAVEPOINT`) are `ROLLBACK`; every `CREATE ...` is `CREATE`, every
  `ALTER ...` (and `... RENAME`) `ALTER`, every `DROP ...` `DROP`. `SET search_path`,
  `SET ROLE` and the like are `SET`: a rule that does not allow `SET` refuses them.

What the rules can't see: which tables a statement writes rather than reads; what a
view, rule, trigger, function body or `DO` block does: the gateway pins `standard_conforming_strings=on` and
UTF-8 upstream because the parser here lexes that way, and the database role's own
privileges stay the real boundary.

For the audit each statement also has `normalised`, its text with every literal (and
comment) replaced by `$n`, and `fingerprint`, which groups statements differing only in
their constants.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pglast import ast, enums, parser

from broker.policy.cel import CelActivation, CelVariables
from broker.policy.named_rules import NamedRule, RuleVerdict, compile_named_rules
from broker.policy.schema import PathPart

log = logging.getLogger(__name__)

MAX_QUERY_BYTES = 1024 * 1024
# Repeated SQL (drivers prepare and re-send the same text) is classified once. Only texts
# up to CACHE_MAX_CHARS are kept, which bounds the cache at about 10 MiB.
CACHE_SIZE = 1024
CACHE_MAX_CHARS = 8192
PARSE_RULE = "parse"  # the rule a refusal names when the SQL could not be classified
UNKNOWN = "UNKNOWN"
# An unqualified name has no schema a rule could trust: Postgres resolves it through
# `search_path`, which searches `pg_catalog` (and `pg_temp`) first and a `SET` changes. So it
# is reported as written, and a rule on schemas (`startsWith("public.")`) refuses it.
_DEFAULT_SCHEMA: str | None = None


class Unparseable(ValueError):
    """SQL the gateway cannot classify, so it refuses it. The message is one of a few
    fixed sentences and never quotes the query (which may hold secrets)."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position  # where the parser gave up (an offset into the query), if known


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement of a query, as the rules and the audit see it."""

    command: str
    tables: tuple[str, ...]
    normalised: str
    fingerprint: str
    # Every command the statement runs, `command` first; `(command,)` unless it nests others.
    commands: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.commands:
            object.__setattr__(self, "commands", (self.command,))  # frozen: filled in once


# --- command tags ---------------------------------------------------------------------------

_TRANSACTION_TAGS = {
    enums.TransactionStmtKind.TRANS_STMT_BEGIN: "BEGIN",
    enums.TransactionStmtKind.TRANS_STMT_START: "BEGIN",
    enums.TransactionStmtKind.TRANS_STMT_COMMIT: "COMMIT",
    enums.TransactionStmtKind.TRANS_STMT_ROLLBACK: "ROLLBACK",
    enums.TransactionStmtKind.TRANS_STMT_SAVEPOINT: "SAVEPOINT",
    enums.TransactionStmtKind.TRANS_STMT_RELEASE: "RELEASE",
    enums.TransactionStmtKind.TRANS_STMT_ROLLBACK_TO: "ROLLBACK",
    # Two-phase commit acts on transactions of any session: never spelt like COMMIT.
    enums.TransactionStmtKind.TRANS_STMT_PREPARE: "PREPARE TRANSACTION",
    enums.TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED: "COMMIT PREPARED",
    enums.TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED: "ROLLBACK PREPARED",
}
_RESET_KINDS = (enums.VariableSetKind.VAR_RESET, enums.VariableSetKind.VAR_RESET_ALL)

# Statements whose tag depends on a field; the others are in _FIXED_TAGS.
_VARIABLE_TAGS: dict[type[ast.Node], Callable[[Any], str]] = {
    ast.SelectStmt: lambda node: "CREATE" if node.intoClause is not None else "SELECT",
    ast.CopyStmt: lambda node: "COPY PROGRAM" if node.is_program else "COPY",
    ast.TransactionStmt: lambda node: _TRANSACTION_TAGS.get(node.kind, UNKNOWN),
    ast.VariableSetStmt: lambda node: "RESET" if node.kind in _RESET_KINDS else "SET",
    ast.GrantStmt: lambda node: "GRANT" if node.is_grant else "REVOKE",
    ast.GrantRoleStmt: lambda node: "GRANT" if node.is_grant else "REVOKE",
    ast.VacuumStmt: lambda node: "VACUUM" if node.is_vacuumcmd else "ANALYZE",
    ast.FetchStmt: lambda node: "MOVE" if node.ismove else "FETCH",
}
_FIXED_TAGS: dict[type[ast.Node], str] = {
    ast.InsertStmt: "INSERT",
    ast.UpdateStmt: "UPDATE",
    ast.DeleteStmt: "DELETE",
    ast.MergeStmt: "MERGE",
    ast.TruncateStmt: "TRUNCATE",
    ast.ExplainStmt: "EXPLAIN",
    ast.PrepareStmt: "PREPARE",  # only ever seen nested: a top-level PREPARE is its query's
    ast.ExecuteStmt: "EXECUTE",
    ast.DeallocateStmt: "DEALLOCATE",
    ast.DoStmt: "DO",
    ast.CallStmt: "CALL",
    ast.VariableShowStmt: "SHOW",
    ast.ConstraintsSetStmt: "SET",
    ast.DiscardStmt: "DISCARD",
    ast.ListenStmt: "LISTEN",
    ast.UnlistenStmt: "UNLISTEN",
    ast.NotifyStmt: "NOTIFY",
    ast.LockStmt: "LOCK",
    ast.DeclareCursorStmt: "DECLARE",
    ast.ClosePortalStmt: "CLOSE",
    ast.ClusterStmt: "CLUSTER",
    ast.ReindexStmt: "REINDEX",
    ast.RefreshMatViewStmt: "REFRESH",
    ast.CheckPointStmt: "CHECKPOINT",
    ast.LoadStmt: "LOAD",
    ast.CommentStmt: "COMMENT",
    ast.SecLabelStmt: "SECURITY LABEL",
    ast.ReassignOwnedStmt: "REASSIGN",
    ast.ImportForeignSchemaStmt: "IMPORT",
    # CREATE ... statements whose node is not called Create*.
    ast.DefineStmt: "CREATE",
    ast.CompositeTypeStmt: "CREATE",
    ast.IndexStmt: "CREATE",
    ast.ViewStmt: "CREATE",
    ast.RuleStmt: "CREATE",
    ast.CreatedbStmt: "CREATE",
    # ALTER ... statements whose node is not called Alter*.
    ast.RenameStmt: "ALTER",
    ast.ReplicaIdentityStmt: "ALTER",
}
# Nodes named *Stmt that the parser never returns as a statement of their own.
NOT_STATEMENTS = frozenset({ast.RawStmt, ast.PLAssignStmt, ast.ReturnStmt, ast.SetOperationStmt})


def _prefixed_tags() -> dict[type[ast.Node], str]:
    """Create*, Alter* and Drop* nodes (over forty of them) by their names' prefix."""
    tags: dict[type[ast.Node], str] = {}
    for name in dir(ast):
        node_class = getattr(ast, name)
        if not (isinstance(node_class, type) and issubclass(node_class, ast.Node) and name.endswith("Stmt")):
            continue
        for prefix in ("Create", "Alter", "Drop"):
            if name.startswith(prefix):
                tags[node_class] = prefix.upper()
    return tags


_TAGS: dict[type[ast.Node], str] = {**_prefixed_tags(), **_FIXED_TAGS}
# Every tag a statement can have (the outputs of _VARIABLE_TAGS spelt out).
COMMAND_TAGS = frozenset(
    {*_TAGS.values(), *_TRANSACTION_TAGS.values(), UNKNOWN, "SELECT", "CREATE", "COPY", "COPY PROGRAM"}
    | {"SET", "RESET", "GRANT", "REVOKE", "VACUUM", "ANALYZE", "FETCH", "MOVE"}
)


def _tag(node: ast.Node) -> str:
    """The tag of `node` itself, without looking inside it."""
    variable = _VARIABLE_TAGS.get(type(node))
    if variable is not None:
        return variable(node)
    return _TAGS.get(type(node), UNKNOWN)


def _runs(node: ast.Node) -> tuple[ast.Node, bool]:
    """The statement `node` runs (looking through PREPARE and EXPLAIN ANALYZE) and True;
    or, for a plain EXPLAIN, which runs nothing, the EXPLAIN and False."""
    while True:
        if isinstance(node, ast.PrepareStmt):
            node = _required(node.query)
        elif isinstance(node, ast.ExplainStmt):
            if not any(option.defname == "analyze" for option in node.options or ()):
                return node, False
            node = _required(node.query)
        else:
            return node, True


def _required(node: ast.Node | None) -> ast.Node:
    if node is None:  # the grammar always gives one; refuse rather than guess if not
        raise ValueError("statement without its query")
    return node


# --- walking the tree ----------------------------------------------------------------------

# Slots that never hold a node; the others are looked at (a value may still be None or an enum).
_SCALAR_SLOTS = frozenset({"bool", "char", "char*", "int", "int16", "int32", "long", "ParseLoc"})
_RELATION_OBJECTS = frozenset(
    {
        enums.ObjectType.OBJECT_TABLE,
        enums.ObjectType.OBJECT_VIEW,
        enums.ObjectType.OBJECT_MATVIEW,
        enums.ObjectType.OBJECT_INDEX,
        enums.ObjectType.OBJECT_SEQUENCE,
        enums.ObjectType.OBJECT_FOREIGN_TABLE,
    }
)
# Statement nodes that, nested, are a clause of their statement rather than a command it
# runs: ALTER SYSTEM / ALTER ROLE ... SET / CREATE FUNCTION ... SET x = y.
_CLAUSES = frozenset({ast.VariableSetStmt})
_WITH_STATEMENTS = (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)


_CHILD_SLOTS: dict[type[ast.Node], tuple[str, ...]] = {}


def _child_slots(node_class: type[ast.Node]) -> tuple[str, ...]:
    names = _CHILD_SLOTS.get(node_class)
    if names is None:
        slots = getattr(node_class, "__slots__", None)
        items = slots.items() if isinstance(slots, Mapping) else ()
        names = tuple(name for name, info in items if info.c_type not in _SCALAR_SLOTS)
        _CHILD_SLOTS[node_class] = names  # a race only computes the same tuple twice
    return names


def _quote(part: str) -> str:
    # Only what could make two different names read alike; case is already the parser's.
    if "." in part or '"' in part:
        return '"' + part.replace('"', '""') + '"'
    return part


def _relation(parts: Sequence[str], schema: str | None = _DEFAULT_SCHEMA) -> str:
    """`schema.table` for a name of two or three (database-prefixed) parts, or of one inside
    a `CREATE SCHEMA`; an unqualified name otherwise stays as written."""
    if len(parts) == 1:
        if schema is None:
            return _quote(parts[0])
        parts = (schema, parts[0])
    return ".".join(_quote(part) for part in parts[-2:])


def _names(items: Iterable[Any] | None) -> list[str]:
    return [item.sval for item in items or () if isinstance(item, ast.String) and item.sval is not None]


@dataclass
class _Found:
    tables: set[str] = field(default_factory=set)
    functions: dict[str, None] = field(default_factory=dict)  # ordered, without repeats
    commands: dict[str, None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Scope:
    ctes: frozenset[str] = frozenset()  # CTE names an unqualified name may mean
    schema: str | None = _DEFAULT_SCHEMA  # where an unqualified name is, when the SQL says so


def _walk(root: ast.Node, found: _Found) -> None:
    """Collect the relations, functions and nested statements below `root`, iteratively
    (expressions nest thousands deep) and keeping track of which CTE names are in scope."""
    stack: list[tuple[Any, _Scope]] = [(root, _Scope())]
    while stack:
        item, scope = stack.pop()
        if isinstance(item, tuple):
            stack.extend((child, scope) for child in reversed(item))
            continue
        if not isinstance(item, ast.Node):
            continue
        if isinstance(item, ast.RangeVar):
            if item.schemaname is None and item.catalogname is None and item.relname in scope.ctes:
                continue  # the statement's own CTE, not a table
            parts = [item.catalogname, item.schemaname, item.relname]
            found.tables.add(_relation([part for part in parts if part is not None], scope.schema))
            continue
        if (
            item is not root
            and type(item) not in _CLAUSES
            and (type(item) in _TAGS or type(item) in _VARIABLE_TAGS)
        ):
            tag = _tag(item)
            if tag != "SELECT":  # a sub-SELECT only reads
                found.commands[tag] = None
        _note(item, found)
        skip = None
        if isinstance(item, _WITH_STATEMENTS) and item.withClause is not None:
            skip = "withClause"
            scope = _push_ctes(item.withClause, scope, stack)
        elif isinstance(item, ast.CreateSchemaStmt):
            # CREATE SCHEMA s CREATE TABLE t ...: t is s.t (a schema without a name is its owner's).
            owner = item.authrole.rolename if item.authrole is not None else None
            scope = replace(scope, schema=item.schemaname or owner or scope.schema)
        for name in reversed(_child_slots(type(item))):
            if name != skip:
                stack.append((getattr(item, name), scope))


def _push_ctes(with_clause: ast.WithClause, scope: _Scope, stack: list[tuple[Any, _Scope]]) -> _Scope:
    """Queue each CTE's body with the names it can see, and return the scope of the rest
    of the statement. A CTE sees those before it; under RECURSIVE, all of them."""
    bodies = with_clause.ctes or ()
    names = [cte.ctename for cte in bodies]
    every = replace(scope, ctes=scope.ctes | frozenset(names))
    for index in reversed(range(len(bodies))):
        visible = (
            every if with_clause.recursive else replace(scope, ctes=scope.ctes | frozenset(names[:index]))
        )
        stack.append((bodies[index], visible))
    return every


def _note(node: ast.Node, found: _Found) -> None:
    """Names that are not RangeVars: functions called, relations dropped or commented."""
    if isinstance(node, ast.FuncCall):
        found.functions[".".join(_quote(part) for part in _names(node.funcname))] = None
    elif isinstance(node, ast.DropStmt) and node.removeType in _RELATION_OBJECTS:
        for name in node.objects or ():
            found.tables.add(_relation(_names(name)))
    elif isinstance(node, ast.CommentStmt | ast.SecLabelStmt) and isinstance(node.object, tuple):
        parts = _names(node.object)
        if node.objtype == enums.ObjectType.OBJECT_COLUMN and len(parts) > 1:
            found.tables.add(_relation(parts[:-1]))
        elif node.objtype in _RELATION_OBJECTS and parts:
            found.tables.add(_relation(parts))


def _describe(node: ast.Node) -> tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(command, commands, tables, functions) of one top-level statement."""
    inner, runs = _runs(node)
    found = _Found()
    _walk(inner, found)
    tables, functions = tuple(sorted(found.tables)), tuple(found.functions)
    if not runs:  # a plain EXPLAIN: the plan of `inner`, which is not run
        return "EXPLAIN", ("EXPLAIN",), tables, functions
    command = _tag(inner)
    nested = list(found.commands)
    if command == "SELECT" and nested:
        return nested[0], tuple(nested), tables, functions  # a SELECT whose CTEs modify
    commands = tuple(dict.fromkeys([command, *nested]))
    return command, commands, tables, functions


# --- normalising -----------------------------------------------------------------------------

_LITERAL_TOKENS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST"})
_COMMENT_TOKENS = frozenset({"SQL_COMMENT", "C_COMMENT"})


def _normalise(text: str) -> str:
    """`text` with every literal replaced by `$n` and comments dropped.

    `parser.normalize` does constants the way pg_stat_statements does, but leaves them in
    most utility statements (`COPY ... PROGRAM '...'`, `PREPARE`, `EXECUTE`, `CREATE VIEW`,
    `COMMENT`, `ALTER SYSTEM`) and keeps comments; the scanner finds what it left.
    """
    normalised = parser.normalize(text)
    tokens = parser.scan(normalised)  # offsets in characters, `end` inclusive
    if not any(token.name in _LITERAL_TOKENS or token.name in _COMMENT_TOKENS for token in tokens):
        return normalised.strip()
    number = max((int(normalised[t.start + 1 : t.end + 1]) for t in tokens if t.name == "PARAM"), default=0)
    pieces, done = [], 0
    for token in tokens:
        if token.name in _LITERAL_TOKENS:
            number += 1
            replacement = f"${number}"
        elif token.name in _COMMENT_TOKENS:
            replacement = " "
        else:
            continue
        pieces += [normalised[done : token.start], replacement]
        done = token.end + 1
    pieces.append(normalised[done:])
    return "".join(pieces).strip()


# --- classifying -----------------------------------------------------------------------------


def classify(sql: str) -> list[Statement]:
    """One `Statement` per statement of `sql`; raise `Unparseable` for SQL the gateway
    refuses without looking further: empty, with a NUL, over `MAX_QUERY_BYTES`, not UTF-8
    text, or not something the PostgreSQL parser accepts."""
    if len(sql) > MAX_QUERY_BYTES:
        raise Unparseable("the query is larger than 1 MiB")
    if "\x00" in sql:
        raise Unparseable("the query contains a NUL byte")
    if len(sql) <= CACHE_MAX_CHARS:
        return list(_classify_cached(sql))
    return list(_classify(sql))


def _classify(sql: str) -> tuple[Statement, ...]:
    try:
        size = len(sql.encode())
    except UnicodeEncodeError:  # lone surrogates: not text the server could receive
        raise Unparseable("the query is not valid UTF-8 text") from None
    if size > MAX_QUERY_BYTES:
        raise Unparseable("the query is larger than 1 MiB")
    try:
        raw_statements = parser.parse_sql(sql)
    except parser.ParseError as error:
        position = error.args[1] if len(error.args) > 1 and isinstance(error.args[1], int) else None
        raise Unparseable("the query is not valid SQL", position) from None
    except Exception as error:  # fail closed; the type only, as the text may quote the SQL
        log.warning("statement parser failed: %s", type(error).__name__)
        raise Unparseable("the query is not valid SQL") from None
    if not raw_statements:
        raise Unparseable("the query is empty")
    try:
        return tuple(_statement(sql, raw) for raw in raw_statements)
    except Exception as error:  # a tree this module does not expect: refuse, don't crash
        log.warning("statement classification failed: %s", type(error).__name__)
        raise Unparseable("the query could not be classified") from None


_classify_cached = functools.lru_cache(maxsize=CACHE_SIZE)(_classify)


def _statement(sql: str, raw: ast.RawStmt) -> Statement:
    # Character offsets; a length of 0 means "to the end".
    start, length = raw.stmt_location or 0, raw.stmt_len or 0
    text = sql[start : start + length] if length else sql[start:]
    command, commands, tables, functions = _describe(_required(raw.stmt))
    return Statement(
        command=command,
        tables=tables,
        normalised=_normalise(text),
        fingerprint=parser.fingerprint(text),
        commands=commands,
        functions=functions,
    )


# --- rules -----------------------------------------------------------------------------------

STATEMENT_VARIABLES = CelVariables(
    names=("statement",),
    fields={"statement": ("command", "commands", "tables", "functions")},
    sample={
        "statement": {
            "command": "SELECT",
            "commands": ["SELECT"],
            "tables": ["public.t"],
            "functions": ["count"],
        }
    },
)


StatementRule = NamedRule


class StatementRules:
    """The compiled `statements:` of one credential. Immutable and safe to share.

    Rules read only what `_cel_value` passes them, so a verdict is kept per distinct value
    of that (bounded, like the classification cache): a driver's repeated statements, and
    statements that differ only in their constants, cost a dictionary lookup.
    """

    def __init__(self, rules: Sequence[StatementRule]) -> None:
        self.rules: tuple[StatementRule, ...] = tuple(rules)
        self._evaluate_cached = functools.lru_cache(maxsize=CACHE_SIZE)(self._evaluate)

    def __len__(self) -> int:
        return len(self.rules)

    def evaluate(self, statement: Statement) -> RuleVerdict:
        """All rules against `statement`, once per command it runs; fail closed."""
        key = (statement.command, statement.commands, statement.tables, statement.functions)
        return self._evaluate_cached(*key)

    def _evaluate(
        self, main: str, commands: tuple[str, ...], tables: tuple[str, ...], functions: tuple[str, ...]
    ) -> RuleVerdict:
        if not self.rules:
            return RuleVerdict(True, None, "no statement rules")
        for command in commands:
            activation = CelActivation({"statement": _cel_value(command, commands, tables, functions)})
            for rule in self.rules:
                outcome = activation.evaluate(rule.rule)
                if not outcome.passed:
                    why = outcome.detail if command == main else f"{outcome.detail} for {command}"
                    return RuleVerdict(False, rule.name, why)
        return RuleVerdict(True, None, "every rule passed")


def _cel_value(
    command: str, commands: tuple[str, ...], tables: tuple[str, ...], functions: tuple[str, ...]
) -> dict[str, Any]:
    """What a rule sees as `statement` (module docstring), for one command it runs."""
    return {
        "command": command,
        "commands": list(commands),
        "tables": list(tables),
        "functions": list(functions),
    }


def compile_statement_rules(
    entries: Sequence[object], path: tuple[PathPart, ...] = ("statements",)
) -> StatementRules:
    """Compile a credential's `statements:` entries (each a CEL string or a mapping with
    `name` and `when`); raise `PolicyError` listing every bad entry, located under `path`."""
    reserved = {PARSE_RULE: "it names refusals of SQL that does not parse"}
    return StatementRules(
        compile_named_rules(entries, path, variables=STATEMENT_VARIABLES, reserved=reserved)
    )


# --- checking a query ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatementCheck:
    """One statement and its verdict: what the audit records."""

    statement: Statement
    verdict: RuleVerdict

    @property
    def command(self) -> str:
        return self.statement.command

    @property
    def tables(self) -> tuple[str, ...]:
        return self.statement.tables

    @property
    def normalised(self) -> str:
        return self.statement.normalised

    @property
    def allowed(self) -> bool:
        return self.verdict.allowed

    @property
    def rule(self) -> str | None:
        return self.verdict.rule


@dataclass(frozen=True, slots=True)
class Decision:
    """A whole query: allowed only if every statement is; `rule` and `detail` are the
    first refusal's. Empty `statements` means the SQL could not be classified."""

    allowed: bool
    rule: str | None
    detail: str
    statements: tuple[StatementCheck, ...]


def check(sql: str, rules: StatementRules) -> Decision:
    """Classify `sql` and judge each of its statements; never raises for bad SQL."""
    try:
        statements = classify(sql)
    except Unparseable as error:
        return Decision(False, PARSE_RULE, error.message, ())
    checks = tuple(StatementCheck(statement, rules.evaluate(statement)) for statement in statements)
    for number, item in enumerate(checks, start=1):
        if not item.allowed:
            where = f"statement {number} of {len(checks)}" if len(checks) > 1 else "the statement"
            detail = f"{where} ({item.command}) refused by {item.rule}: {item.verdict.detail}"
            return Decision(False, item.rule, detail, checks)
    return Decision(True, None, "allowed", checks)


__all__ = [
    "COMMAND_TAGS",
    "PARSE_RULE",
    "Decision",
    "RuleVerdict",
    "Statement",
    "StatementCheck",
    "StatementRules",
    "Unparseable",
    "check",
    "classify",
    "compile_statement_rules",
]
