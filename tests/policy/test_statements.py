"""Statement classification and statement rules: the traps that hide one command inside
another, what the audit's normalised text may hold, and rules that fail closed."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pglast import ast

from broker.policy import statements
from broker.policy.cel import CelCompileError, compile_rule
from broker.policy.schema import PolicyError
from broker.policy.statements import (
    COMMAND_TAGS,
    MAX_QUERY_BYTES,
    NOT_STATEMENTS,
    Statement,
    Unparseable,
    check,
    classify,
    compile_statement_rules,
)

SELECT_ONLY = compile_statement_rules([{"name": "select-only", "when": 'statement.command == "SELECT"'}])
SELECT_OR_INSERT = compile_statement_rules(
    [{"name": "read-or-insert", "when": 'statement.command in ["SELECT", "INSERT"]'}]
)


def only(sql: str) -> Statement:
    found = classify(sql)
    assert len(found) == 1
    return found[0]


# --- command tags: the traps ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "command", "commands", "tables"),
    [
        # A SELECT whose CTE modifies data is that modification.
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "DELETE", ("DELETE",), ("t",)),
        (
            "WITH d AS (DELETE FROM a RETURNING *), u AS (UPDATE b SET x = 1 RETURNING *) SELECT * FROM d, u",
            "DELETE",
            ("DELETE", "UPDATE"),
            ("a", "b"),
        ),
        # ... and a modifying statement with a modifying CTE runs both.
        (
            "WITH d AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM d",
            "INSERT",
            ("INSERT", "DELETE"),
            ("a", "b"),
        ),
        # SELECT INTO creates a table.
        ("SELECT * INTO new_t FROM old_t", "CREATE", ("CREATE",), ("new_t", "old_t")),
        ("CREATE TABLE new_t AS SELECT * FROM old_t", "CREATE", ("CREATE",), ("new_t", "old_t")),
        # EXPLAIN ANALYZE runs its statement; a plain EXPLAIN does not.
        ("EXPLAIN ANALYZE DELETE FROM t WHERE a = 5", "DELETE", ("DELETE",), ("t",)),
        ("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1", "UPDATE", ("UPDATE",), ("t",)),
        ("EXPLAIN (ANALYZE false) DELETE FROM t", "DELETE", ("DELETE",), ("t",)),  # refused to be safe
        (
            "EXPLAIN ANALYZE WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "DELETE",
            ("DELETE",),
            ("t",),
        ),
        ("EXPLAIN DELETE FROM t WHERE a = 5", "EXPLAIN", ("EXPLAIN",), ("t",)),
        ("EXPLAIN SELECT * FROM t JOIN u USING (id)", "EXPLAIN", ("EXPLAIN",), ("t", "u")),
        # PREPARE is what it prepares, so EXECUTE can only run what was allowed.
        ("PREPARE p AS DELETE FROM t WHERE a = $1", "DELETE", ("DELETE",), ("t",)),
        ("PREPARE p (int) AS SELECT * FROM t WHERE a = $1", "SELECT", ("SELECT",), ("t",)),
        ("PREPARE p AS WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d", "DELETE", ("DELETE",), ("t",)),
        ("EXECUTE p('secret', 5)", "EXECUTE", ("EXECUTE",), ()),
        ("CREATE TABLE t AS EXECUTE p", "CREATE", ("CREATE", "EXECUTE"), ("t",)),
        ("DEALLOCATE p", "DEALLOCATE", ("DEALLOCATE",), ()),
        # COPY, and COPY PROGRAM, which runs a shell command on the server.
        ("COPY t TO STDOUT", "COPY", ("COPY",), ("t",)),
        ("COPY s.t (a, b) FROM STDIN", "COPY", ("COPY",), ("s.t",)),
        ("COPY t FROM '/etc/passwd'", "COPY", ("COPY",), ("t",)),
        ("COPY t TO PROGRAM 'gzip > /tmp/t.gz'", "COPY PROGRAM", ("COPY PROGRAM",), ("t",)),
        ("COPY t FROM PROGRAM 'curl http://x'", "COPY PROGRAM", ("COPY PROGRAM",), ("t",)),
        ("COPY (SELECT * FROM t) TO STDOUT", "COPY", ("COPY",), ("t",)),
        ("COPY (DELETE FROM t RETURNING *) TO STDOUT", "COPY", ("COPY", "DELETE"), ("t",)),
        # Opaque bodies.
        ("DO $$ BEGIN DELETE FROM t; END $$", "DO", ("DO",), ()),
        ("CALL archive_orders(5)", "CALL", ("CALL",), ()),
        # DDL, coarse.
        ("CREATE TABLE t (a int REFERENCES other (a))", "CREATE", ("CREATE",), ("other", "t")),
        ("CREATE INDEX ON t (a)", "CREATE", ("CREATE",), ("t",)),
        ("CREATE VIEW v AS SELECT * FROM base", "CREATE", ("CREATE",), ("base", "v")),
        ("CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql", "CREATE", ("CREATE",), ()),
        ("CREATE ROLE r LOGIN", "CREATE", ("CREATE",), ()),
        ("CREATE EXTENSION dblink", "CREATE", ("CREATE",), ()),
        (
            "CREATE RULE r AS ON INSERT TO t DO INSTEAD DELETE FROM x",
            "CREATE",
            ("CREATE", "DELETE"),
            ("t", "x"),
        ),
        ("CREATE SCHEMA s CREATE TABLE t (a int)", "CREATE", ("CREATE",), ("s.t",)),
        ("DROP TABLE a, s.b", "DROP", ("DROP",), ("a", "s.b")),
        ("DROP VIEW IF EXISTS v CASCADE", "DROP", ("DROP",), ("v",)),
        ("DROP INDEX s.i", "DROP", ("DROP",), ("s.i",)),
        ("DROP FUNCTION f()", "DROP", ("DROP",), ()),
        ("DROP SCHEMA s CASCADE", "DROP", ("DROP",), ()),
        ("DROP ROLE r", "DROP", ("DROP",), ()),
        ("ALTER TABLE t ADD COLUMN c int", "ALTER", ("ALTER",), ("t",)),
        ("ALTER TABLE t RENAME TO u", "ALTER", ("ALTER",), ("t",)),
        ("ALTER ROLE r PASSWORD 'x'", "ALTER", ("ALTER",), ()),
        ("ALTER SYSTEM SET work_mem = '64MB'", "ALTER", ("ALTER",), ()),
        ("TRUNCATE a, b", "TRUNCATE", ("TRUNCATE",), ("a", "b")),
        ("GRANT SELECT ON t TO u", "GRANT", ("GRANT",), ("t",)),
        ("REVOKE SELECT ON t FROM u", "REVOKE", ("REVOKE",), ("t",)),
        ("GRANT admin TO u", "GRANT", ("GRANT",), ()),
        # Transactions.
        ("BEGIN", "BEGIN", ("BEGIN",), ()),
        ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", "BEGIN", ("BEGIN",), ()),
        ("COMMIT", "COMMIT", ("COMMIT",), ()),
        ("END", "COMMIT", ("COMMIT",), ()),
        ("ROLLBACK", "ROLLBACK", ("ROLLBACK",), ()),
        ("ABORT", "ROLLBACK", ("ROLLBACK",), ()),
        ("SAVEPOINT s1", "SAVEPOINT", ("SAVEPOINT",), ()),
        ("RELEASE SAVEPOINT s1", "RELEASE", ("RELEASE",), ()),
        ("ROLLBACK TO SAVEPOINT s1", "ROLLBACK", ("ROLLBACK",), ()),
        ("PREPARE TRANSACTION 'x'", "PREPARE TRANSACTION", ("PREPARE TRANSACTION",), ()),
        ("COMMIT PREPARED 'x'", "COMMIT PREPARED", ("COMMIT PREPARED",), ()),
        # Session settings are statements the rules see.
        ("SET search_path = evil, public", "SET", ("SET",), ()),
        ("SET ROLE admin", "SET", ("SET",), ()),
        ("SET LOCAL statement_timeout = 5", "SET", ("SET",), ()),
        ("RESET ALL", "RESET", ("RESET",), ()),
        ("SHOW search_path", "SHOW", ("SHOW",), ()),
        # The rest.
        ("SELECT * FROM t FOR UPDATE", "SELECT", ("SELECT",), ("t",)),
        ("VALUES (1), (2)", "SELECT", ("SELECT",), ()),
        ("TABLE t", "SELECT", ("SELECT",), ("t",)),
        ("INSERT INTO t SELECT * FROM src", "INSERT", ("INSERT",), ("src", "t")),
        ("UPDATE t SET a = s.a FROM s WHERE t.id = s.id", "UPDATE", ("UPDATE",), ("s", "t")),
        ("DELETE FROM t USING s WHERE t.id = s.id", "DELETE", ("DELETE",), ("s", "t")),
        ("MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE", "MERGE", ("MERGE",), ("s", "t")),
        ("LISTEN chan", "LISTEN", ("LISTEN",), ()),
        ("NOTIFY chan, 'x'", "NOTIFY", ("NOTIFY",), ()),
        ("LOCK TABLE t IN EXCLUSIVE MODE", "LOCK", ("LOCK",), ("t",)),
        ("VACUUM t", "VACUUM", ("VACUUM",), ("t",)),
        ("ANALYZE t", "ANALYZE", ("ANALYZE",), ("t",)),
        ("DECLARE c CURSOR FOR SELECT * FROM t", "DECLARE", ("DECLARE",), ("t",)),
        ("FETCH 10 FROM c", "FETCH", ("FETCH",), ()),
        ("MOVE 10 IN c", "MOVE", ("MOVE",), ()),
        ("CLOSE c", "CLOSE", ("CLOSE",), ()),
        ("DISCARD ALL", "DISCARD", ("DISCARD",), ()),
        ("COMMENT ON COLUMN s.t.c IS 'x'", "COMMENT", ("COMMENT",), ("s.t",)),
        ("LOAD 'plugin'", "LOAD", ("LOAD",), ()),
    ],
)
def test_command_tags(sql: str, command: str, commands: tuple[str, ...], tables: tuple[str, ...]) -> None:
    statement = only(sql)
    assert (statement.command, statement.commands, statement.tables) == (command, commands, tables)
    assert set(statement.commands) <= COMMAND_TAGS


def test_every_statement_node_has_a_tag() -> None:
    # A pglast upgrade that adds a statement must not leave it UNKNOWN unnoticed.
    untagged = [
        name
        for name in dir(ast)
        if name.endswith("Stmt")
        and getattr(ast, name) not in NOT_STATEMENTS
        and getattr(ast, name) not in statements._TAGS
        and getattr(ast, name) not in statements._VARIABLE_TAGS
    ]
    assert untagged == []


@pytest.mark.parametrize(
    ("sql", "refused_for"),
    [
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "DELETE"),
        ("SELECT * INTO t2 FROM t", "CREATE"),
        ("EXPLAIN ANALYZE DELETE FROM t", "DELETE"),
        ("PREPARE p AS DELETE FROM t", "DELETE"),
        ("EXECUTE p", "EXECUTE"),
        ("DO $$ BEGIN PERFORM 1; END $$", "DO"),
        ("CALL p()", "CALL"),
        ("COPY (SELECT 1) TO PROGRAM 'sh'", "COPY PROGRAM"),
    ],
)
def test_a_select_only_rule_refuses_the_traps(sql: str, refused_for: str) -> None:
    decision = check(sql, SELECT_ONLY)
    assert not decision.allowed
    assert decision.rule == "select-only"
    assert decision.statements[0].command == refused_for


def test_every_command_a_statement_runs_is_checked() -> None:
    # The INSERT is allowed, the DELETE in its CTE is not.
    rules = compile_statement_rules(['statement.command in ["SELECT", "INSERT"]'])
    decision = check("WITH d AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM d", rules)
    assert not decision.allowed
    assert decision.rule == "statements[0]"
    assert decision.statements[0].verdict.detail == "false for DELETE"
    assert check("INSERT INTO b SELECT * FROM a", rules).allowed


def test_copy_program_is_not_copy() -> None:
    rules = compile_statement_rules(['statement.command in ["SELECT", "COPY"]'])
    assert check("COPY t TO STDOUT", rules).allowed
    assert not check("COPY t TO PROGRAM 'cat > /tmp/x'", rules).allowed


def test_the_standard_conforming_strings_trick_reads_as_a_select_and_a_drop() -> None:
    # With scs=off the server would read one SELECT; the parser (and the pinned upstream) two.
    sql = "select 'a\\'; drop table x; --'"
    found = classify(sql)
    assert [(s.command, s.tables) for s in found] == [("SELECT", ()), ("DROP", ("x",))]
    no_drop = compile_statement_rules([{"name": "no-drop", "when": 'statement.command != "DROP"'}])
    decision = check(sql, no_drop)
    assert not decision.allowed
    assert decision.rule == "no-drop"
    assert [item.allowed for item in decision.statements] == [True, False]


# --- tables and functions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        ('SELECT * FROM "MiXed"."T"', ("MiXed.T",)),
        ("SELECT * FROM Public.Orders", ("public.orders",)),
        ('SELECT * FROM "public"."Orders"', ("public.Orders",)),
        ("SELECT * FROM analytics.public.orders", ("public.orders",)),  # the database prefix dropped
        ('SELECT * FROM "public.x".secret', ('"public.x".secret',)),  # can't pass for public
        ('SELECT * FROM "a""b"', ('"a""b"',)),
        ("SELECT * FROM a JOIN b ON true LEFT JOIN c.d ON true", ("a", "b", "c.d")),
        ("SELECT * FROM t WHERE id IN (SELECT id FROM s WHERE EXISTS (SELECT 1 FROM u))", ("s", "t", "u")),
        ("SELECT (SELECT max(a) FROM s) FROM (SELECT * FROM t) AS sub", ("s", "t")),
        ("SELECT * FROM t UNION SELECT * FROM u", ("t", "u")),
        ("SELECT * FROM t, t, T", ("t",)),
        # CTE names are not tables, but a qualified name is, and a CTE body sees earlier CTEs only.
        ("WITH t AS (SELECT * FROM base) SELECT * FROM t", ("base",)),
        ("WITH t AS (SELECT 1) SELECT * FROM t, public.t", ("public.t",)),
        ("WITH a AS (SELECT * FROM b), b AS (SELECT * FROM a) SELECT * FROM b", ("b",)),
        ("WITH RECURSIVE r AS (SELECT 1 UNION ALL SELECT * FROM r) SELECT * FROM r", ()),
        ("WITH m AS (SELECT 1) MERGE INTO t USING m ON true WHEN MATCHED THEN DELETE", ("t",)),
        ("SELECT * FROM (WITH x AS (SELECT 1) SELECT * FROM x) s, x", ("x",)),  # scope ends
        ("INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = (SELECT 2 FROM s)", ("s", "t")),
    ],
)
def test_tables(sql: str, tables: tuple[str, ...]) -> None:
    assert only(sql).tables == tables


def test_functions_are_listed_as_written() -> None:
    statement = only("SELECT pg_terminate_backend(pid), pg_catalog.now(), count(*) FROM pg_stat_activity")
    assert statement.functions == ("pg_terminate_backend", "pg_catalog.now", "count")
    assert only("CALL s.archive(1)").functions == ("s.archive",)


# --- normalised text and fingerprints --------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "normalised"),
    [
        ("SELECT * FROM t WHERE a = 5 AND b = 'x'", "SELECT * FROM t WHERE a = $1 AND b = $2"),
        ("SELECT $1, 'x'", "SELECT $1, $2"),
        ("COPY t TO PROGRAM 'gzip > /tmp/secret'", "COPY t TO PROGRAM $1"),
        ("PREPARE p AS SELECT * FROM t WHERE a = 'secret'", "PREPARE p AS SELECT * FROM t WHERE a = $1"),
        ("EXECUTE p('secret', 5)", "EXECUTE p($1, $2)"),
        ("ALTER ROLE r PASSWORD 'secret'", "ALTER ROLE r PASSWORD $1"),
        ("COMMENT ON TABLE t IS 'secret'", "COMMENT ON TABLE t IS $1"),
        ("CREATE VIEW v AS SELECT 'secret'", "CREATE VIEW v AS SELECT $1"),
        ("DO $tag$ BEGIN PERFORM 'secret'; END $tag$", "DO $1"),
        ("SELECT 1 -- secret", "SELECT $1"),
        ("SELECT /* secret */ 1", "SELECT   $1"),
        ("SELECT 'é', 'secret'", "SELECT $1, $2"),
        ("COPY \"tàblé\" TO PROGRAM 'secret'", 'COPY "tàblé" TO PROGRAM $1'),  # offsets past multibyte text
        ("EXECUTE p($1, 'x', $3)", "EXECUTE p($1, $4, $3)"),  # numbered past the parameters
        ("SELECT E'se\\'cret', U&'d\\0061t', B'0101', X'ff', 1.5e10", "SELECT $1, $2, $3, $4, $5"),
    ],
)
def test_normalised(sql: str, normalised: str) -> None:
    assert only(sql).normalised == normalised


def test_fingerprint_ignores_constants() -> None:
    assert only("SELECT * FROM t WHERE a = 5").fingerprint == only("SELECT * FROM t WHERE a = 6").fingerprint
    assert only("SELECT * FROM t WHERE a = 5").fingerprint != only("SELECT * FROM u WHERE a = 5").fingerprint


def test_each_statement_gets_its_own_text() -> None:
    found = classify("SELECT 1;\n  DELETE FROM t WHERE a = 'x' ; SELECT 'é'")
    assert [s.normalised for s in found] == ["SELECT $1", "DELETE FROM t WHERE a = $1", "SELECT $1"]


# --- refusing what can't be parsed -----------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("", "the query is empty"),
        ("   \n", "the query is empty"),
        ("-- nothing but a comment", "the query is empty"),
        (";;", "the query is empty"),
        ("SELECT 1\x00; DROP TABLE t", "the query contains a NUL byte"),
        ("SELECT secretword FROM FROM", "the query is not valid SQL"),
        ("SELECT 'secretword", "the query is not valid SQL"),
        ("SELECT '\ud800'", "the query is not valid UTF-8 text"),
        ("SELECT " + "(" * 20000 + "1" + ")" * 20000, "the query is not valid SQL"),
        ("SELECT '" + "x" * MAX_QUERY_BYTES + "'", "the query is larger than 1 MiB"),
        ("SELECT '" + "é" * (MAX_QUERY_BYTES // 2) + "'", "the query is larger than 1 MiB"),
    ],
    ids=[
        "empty",
        "blank",
        "comment",
        "semicolons",
        "nul",
        "syntax",
        "unterminated",
        "surrogate",
        "deep",
        "large",
        "large-in-bytes",
    ],
)
def test_unparseable(sql: str, message: str) -> None:
    with pytest.raises(Unparseable) as raised:
        classify(sql)
    assert raised.value.message == message
    assert "secretword" not in str(raised.value)
    decision = check(sql, SELECT_ONLY)
    assert (decision.allowed, decision.rule, decision.detail, decision.statements) == (
        False,
        "parse",
        message,
        (),
    )


def test_a_syntax_error_says_where() -> None:
    with pytest.raises(Unparseable) as raised:
        classify("SELECT 1 FROM FROM")
    assert raised.value.position == 14


def test_deep_expressions_are_walked_without_recursion() -> None:
    statement = only("SELECT " + "(" * 5000 + "a" + ")" * 5000 + " FROM t")
    assert (statement.command, statement.tables) == ("SELECT", ("t",))


# --- rules -----------------------------------------------------------------------------------


def test_rules_are_named() -> None:
    rules = compile_statement_rules(
        [
            'statement.command == "SELECT"',
            {"name": "public-only", "when": 'statement.tables.all(t, t.startsWith("public."))'},
        ]
    )
    assert [rule.name for rule in rules.rules] == ["statements[0]", "public-only"]
    assert check("SELECT * FROM public.t", rules).allowed
    assert check("SELECT * FROM secret.t", rules).rule == "public-only"
    assert check("DELETE FROM public.t", rules).rule == "statements[0]"


def test_the_documented_example() -> None:
    rules = compile_statement_rules(
        ['statement.command in ["SELECT", "SHOW"]', 'statement.tables.all(t, t.startsWith("public."))']
    )
    assert check("SELECT * FROM public.orders o JOIN Public.Customers c ON c.id = o.cid", rules).allowed
    # Unqualified, `orders` is whatever search_path finds first (pg_catalog before public).
    assert not check("SELECT * FROM orders", rules).allowed
    assert not check("SELECT * FROM pg_authid", rules).allowed
    assert check("SHOW search_path", rules).allowed
    assert not check("SET search_path = secret", rules).allowed
    assert not check('SELECT * FROM "Secret".t', rules).allowed


def test_a_query_is_allowed_only_if_every_statement_is() -> None:
    decision = check("SELECT 1; SELECT * FROM t; DELETE FROM t WHERE a = 1; SELECT 2", SELECT_ONLY)
    assert not decision.allowed
    assert decision.rule == "select-only"
    assert decision.detail == "statement 3 of 4 (DELETE) refused by select-only: false"
    assert [(item.command, item.allowed, item.rule) for item in decision.statements] == [
        ("SELECT", True, None),
        ("SELECT", True, None),
        ("DELETE", False, "select-only"),
        ("SELECT", True, None),
    ]
    assert decision.statements[2].tables == ("t",)
    assert decision.statements[2].normalised == "DELETE FROM t WHERE a = $1"


def test_no_rules_restrict_nothing() -> None:
    assert check("DROP TABLE t", compile_statement_rules([])).allowed


def test_a_cel_error_refuses_with_the_reason() -> None:
    rules = compile_statement_rules([{"name": "third-table", "when": 'statement.tables[2] == "public.t"'}])
    decision = check("SELECT * FROM t", rules)
    assert not decision.allowed
    assert decision.rule == "third-table"
    assert decision.statements[0].verdict.detail.startswith("error:")


def test_a_rule_that_gives_no_boolean_refuses() -> None:
    # Passes the load-time dry run (whose sample names a table), gives a string here.
    rules = compile_statement_rules(['statement.tables.size() > 0 ? true : "no"'])
    decision = check("SELECT 1", rules)
    assert not decision.allowed
    assert decision.statements[0].verdict.detail == "result is string, not bool"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["statement.command =="], "CEL syntax error"),
        (["request.owner == 'x'"], "unknown variable request (available: statement)"),
        (["now > timestamp('2020-01-01T00:00:00Z')"], "unknown variable now (available: statement)"),
        (["statement.comand == 'SELECT'"], "statement has no field 'comand'"),
        (["statement.tables"], "evaluates to list, not a boolean"),
        ([{"name": "a", "when": "1 +"}], "CEL syntax error"),
        ([{"name": "a"}], "'when' must be a CEL expression"),
        ([{"name": "a", "when": "true", "unless": "false"}], "unknown key 'unless'"),
        ([{"name": "has space", "when": "true"}], "'name' must be"),
        ([{"name": "parse", "when": "true"}], "'parse' is reserved"),
        ([{"name": "a", "when": "true"}, {"name": "a", "when": "true"}], "duplicate rule name 'a'"),
        ([5], "a rule is a CEL expression"),
        ([""], "a rule must be 1-4000 characters"),
    ],
)
def test_bad_rules_are_load_errors(entries: list[object], message: str) -> None:
    with pytest.raises(PolicyError) as raised:
        compile_statement_rules(entries, path=("tasks", "report", "credentials", "db", "statements"))
    assert message in str(raised.value)
    assert raised.value.errors[0].startswith(f"tasks.report.credentials.db.statements[{len(entries) - 1}]")


def test_every_bad_rule_is_reported_at_once() -> None:
    with pytest.raises(PolicyError) as raised:
        compile_statement_rules(["statement.x", "true", "nope"])
    assert [error.split(":")[0] for error in raised.value.errors] == ["statements[0]", "statements[2]"]


def test_policy_rules_still_cannot_read_the_statement() -> None:
    with pytest.raises(CelCompileError) as raised:
        compile_rule('statement.command == "SELECT"')
    assert raised.value.message == "unknown variable statement (available: workload, request, now)"


# --- caching ---------------------------------------------------------------------------------


def test_repeated_sql_is_classified_once_and_callers_cannot_spoil_the_cache() -> None:
    sql = "SELECT * FROM cached_once WHERE a = 1"
    first = classify(sql)
    first.clear()
    again = classify(sql)
    assert [s.tables for s in again] == [("cached_once",)]
    assert again[0] is classify(sql)[0]


# --- properties ------------------------------------------------------------------------------

_SQL_BITS = st.sampled_from(
    ["SELECT", "FROM", "WHERE", "WITH", "AS", "(", ")", ";", "'", '"', "$$", "$a$", "--", "/*", "*/",
     "\\", "E'", "U&'", "x", "1", "1.5e3", ",", "=", "DELETE", "INSERT", "INTO", "VALUES", "DROP",
     "TABLE", "EXPLAIN", "ANALYZE", "PREPARE", "EXECUTE", "COPY", "PROGRAM", "DO", "CALL", " ", "\n",
     "é", "\x00", "::", "[", "]"]
)  # fmt: skip


@given(st.one_of(st.text(max_size=200), st.lists(_SQL_BITS, max_size=30).map(" ".join)))
def test_junk_never_raises_anything_but_unparseable(sql: str) -> None:
    try:
        found = classify(sql)
    except Unparseable:
        decision = check(sql, SELECT_ONLY)
        assert (decision.allowed, decision.rule) == (False, "parse")
        return
    assert found
    assert all(s.command in COMMAND_TAGS for s in found)
    check(sql, SELECT_ONLY)


_SECRET = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00", exclude_categories=["Cs"]),
    min_size=1,
    max_size=20,
).map(lambda text: "Zq" + text)


def _string_literals(secret: str) -> list[str]:
    """`secret` in each way SQL can spell a string constant."""
    spelt = [
        "'" + secret.replace("'", "''") + "'",
        "E'" + secret.replace("\\", "\\\\").replace("'", "\\'") + "'",
    ]
    if "$q$" not in secret and not secret.endswith("$q"):
        spelt.append("$q$" + secret + "$q$")
    return spelt


_TEMPLATES = [
    "SELECT {lit}",
    "SELECT * FROM t WHERE a = {lit} AND b = 1",
    "INSERT INTO t (a) VALUES ({lit})",
    "UPDATE t SET a = {lit} WHERE id = $1",
    "WITH d AS (DELETE FROM t WHERE a = {lit} RETURNING *) SELECT * FROM d",
    "COPY t TO PROGRAM {lit}",
    "COPY t FROM {lit}",
    "PREPARE p AS SELECT * FROM t WHERE a = {lit}",
    "EXECUTE p({lit}, 2)",
    "EXPLAIN ANALYZE SELECT {lit}",
    "CREATE VIEW v AS SELECT {lit} AS c",
    "CREATE TABLE t (a text DEFAULT {lit})",
    "ALTER TABLE t ADD CONSTRAINT c CHECK (a <> {lit})",
    "COMMENT ON TABLE t IS {lit}",
    "ALTER ROLE r PASSWORD {lit}",
    "CREATE USER MAPPING FOR u SERVER s OPTIONS (password {lit})",
    "ALTER SYSTEM SET work_mem = {lit}",
    "ALTER DATABASE d SET search_path = {lit}",
    "SET application_name = {lit}",
    "NOTIFY chan, {lit}",
    "CALL p({lit})",
    "SELECT set_config('a', {lit}, false)",
    "SELECT 1; SELECT {lit}; SELECT 2",
]


@given(st.sampled_from(_TEMPLATES), _SECRET, st.data())
def test_string_literals_never_reach_the_normalised_text(
    template: str, secret: str, data: st.DataObject
) -> None:
    literal = data.draw(st.sampled_from(_string_literals(secret)))
    sql = template.format(lit=literal)
    for statement in classify(sql):
        assert secret not in statement.normalised


# Where the grammar takes a number as well as a string.
_NUMERIC_TEMPLATES = [
    template
    for template in _TEMPLATES
    if not template.startswith(("COPY", "COMMENT", "ALTER ROLE", "CREATE USER", "NOTIFY"))
]


@given(
    st.sampled_from(_NUMERIC_TEMPLATES),
    st.integers(min_value=10**6) | st.floats(min_value=1e6, allow_infinity=False),
)
def test_numbers_never_reach_the_normalised_text(template: str, number: int | float) -> None:
    text = repr(number) if isinstance(number, float) else str(number)
    for statement in classify(template.format(lit=text)):
        assert text not in statement.normalised


@given(st.sampled_from(_NUMERIC_TEMPLATES), _SECRET)
def test_comments_never_reach_the_normalised_text(template: str, secret: str) -> None:
    assume("*/" not in secret and "/*" not in secret and "\n" not in secret and "\r" not in secret)
    sql = "/* " + secret + " */ " + template.format(lit="1") + " -- " + secret
    for statement in classify(sql):
        assert secret not in statement.normalised


_SIMPLE = {
    "SELECT 1": "SELECT",
    "SELECT * FROM t": "SELECT",
    "INSERT INTO t VALUES (1)": "INSERT",
    "DELETE FROM t": "DELETE",
    "BEGIN": "BEGIN",
    "COMMIT": "COMMIT",
    "SET x = 1": "SET",
    "SELECT ';'": "SELECT",
    "SELECT $$;$$": "SELECT",
    "DROP TABLE t": "DROP",
}


@given(
    st.lists(st.sampled_from(sorted(_SIMPLE)), min_size=1, max_size=8),
    st.lists(st.sampled_from([";", " ;", ";\n", "; -- c\n", ";/* ; */", "; ;"]), min_size=8, max_size=8),
)
def test_each_statement_of_a_query_is_one_statement(parts: list[str], separators: list[str]) -> None:
    sql = "".join(part + separator for part, separator in zip(parts, separators, strict=False))
    found = classify(sql)
    assert [s.command for s in found] == [_SIMPLE[part] for part in parts]


_IDENTIFIER = st.one_of(
    st.from_regex(r"\A[a-z][a-z0-9_]{0,8}\Z").map(lambda name: "t_" + name),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters='\x00"', exclude_categories=["Cs"]),
            min_size=1, max_size=12).map(lambda name: '"' + name + '"'),
)  # fmt: skip
_RELATION = st.one_of(_IDENTIFIER, st.tuples(_IDENTIFIER, _IDENTIFIER).map(".".join))


@st.composite
def _modifying(draw: st.DrawFn) -> str:
    table, other, column = draw(_RELATION), draw(_RELATION), draw(_IDENTIFIER)
    return draw(
        st.sampled_from(
            [
                f"INSERT INTO {table} ({column}) VALUES (1)",
                f"INSERT INTO {table} SELECT * FROM {other}",
                f"UPDATE {table} SET {column} = 2",
                f"DELETE FROM {table} WHERE {column} = 3",
                f"MERGE INTO {table} USING {other} ON true WHEN MATCHED THEN DELETE",
            ]
        )
    )


@st.composite
def _non_select(draw: st.DrawFn) -> str:
    table, column = draw(_RELATION), draw(_IDENTIFIER)
    dml = draw(_modifying())
    returning = dml if dml.startswith("MERGE") else f"{dml} RETURNING *"
    return draw(
        st.sampled_from(
            [
                dml,
                f"DROP TABLE {table}",
                f"TRUNCATE {table}",
                f"SELECT * INTO {table} FROM {draw(_RELATION)}",
                f"WITH {column} AS ({returning}) SELECT * FROM {column}",
                f"WITH a AS (SELECT 1), {column} AS ({returning}) SELECT * FROM a",
                f"EXPLAIN ANALYZE {dml}",
                f"EXPLAIN (ANALYZE, VERBOSE) WITH {column} AS ({returning}) SELECT 1",
                f"PREPARE p AS {dml}",
                f"PREPARE p AS WITH {column} AS ({returning}) SELECT * FROM {column}",
                f"COPY ({returning}) TO STDOUT",
                f"SELECT 1; {dml}",
            ]
        )
    )


@given(_non_select())
def test_a_select_only_rule_refuses_every_non_select(sql: str) -> None:
    decision = check(sql, SELECT_ONLY)
    assert decision.rule == "select-only"  # refused by the rule, not because it did not parse
    assert not decision.allowed


@given(_RELATION, _RELATION, _IDENTIFIER)
def test_a_select_only_rule_allows_selects(table: str, other: str, column: str) -> None:
    sql = f"WITH {column} AS (SELECT * FROM {other}) SELECT * FROM {table} JOIN {column} ON true"
    assert check(sql, SELECT_ONLY).allowed


@given(_RELATION, _RELATION, _IDENTIFIER, st.sampled_from(["DELETE FROM {t}", "UPDATE {t} SET a = 1"]))
def test_an_allowed_command_does_not_carry_a_refused_one(
    table: str, other: str, name: str, hidden: str
) -> None:
    # Every command a statement runs meets the rules, not only its outermost one.
    sql = f"WITH {name} AS ({hidden.format(t=other)} RETURNING *) INSERT INTO {table} SELECT * FROM {name}"
    decision = check(sql, SELECT_OR_INSERT)
    assert (decision.allowed, decision.rule) == (False, "read-or-insert")
    assert check(f"INSERT INTO {table} SELECT * FROM {other}", SELECT_OR_INSERT).allowed


def test_a_statement_built_by_hand_runs_its_own_command() -> None:
    # The wire side may build one (a Parse it already classified); `commands` defaults to it.
    statement = Statement("DELETE", ("public.t",), "DELETE FROM t", "0")
    assert statement.commands == ("DELETE",)
    verdict = SELECT_ONLY.evaluate(statement)
    assert (verdict.allowed, verdict.rule, verdict.detail) == (False, "select-only", "false")
