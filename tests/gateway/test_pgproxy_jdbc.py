"""pgjdbc through the gateway: its own SCRAM client, its startup parameters (DateStyle,
TimeZone, extra_float_digits), server-prepared statements, batches, and a refusal.

Skipped unless a JDK and a PostgreSQL JDBC jar are on the machine (the jar is looked for
in the local Maven repository, or given by GATEWAY_TEST_PGJDBC_JAR)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PROGRAM = r"""
import java.sql.*;

public class GwJdbc {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        try (Connection c = DriverManager.getConnection(url, args[1], args[2])) {
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("SELECT 1")) {
                r.next();
                System.out.println("one=" + r.getInt(1));
            }
            // Used five times, pgjdbc switches to a named server-side statement.
            try (PreparedStatement p = c.prepareStatement("SELECT ?::int * 2")) {
                int sum = 0;
                for (int i = 0; i < 6; i++) {
                    p.setInt(1, i);
                    try (ResultSet r = p.executeQuery()) { r.next(); sum += r.getInt(1); }
                }
                System.out.println("sum=" + sum);
            }
            try (Statement s = c.createStatement()) {
                s.execute("DROP TABLE items");
                System.out.println("dropped");
            } catch (SQLException e) {
                System.out.println("refused=" + e.getSQLState());
            }
            c.setAutoCommit(false);
            try (PreparedStatement p = c.prepareStatement("SELECT ?::text")) {
                p.setString(1, "in a transaction");
                try (ResultSet r = p.executeQuery()) { r.next(); System.out.println("text=" + r.getString(1)); }
            }
            try (Statement s = c.createStatement()) {
                s.addBatch("SELECT 1");
                s.addBatch("DROP TABLE items");
                s.executeBatch();
                System.out.println("batch ran");
            } catch (SQLException e) {
                System.out.println("batch refused");
            }
            c.rollback();
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("SELECT 2")) {
                r.next();
                System.out.println("two=" + r.getInt(1));
            }
        }
    }
}
"""


def pgjdbc_jar() -> Path | None:
    given = os.environ.get("GATEWAY_TEST_PGJDBC_JAR")
    if given:
        return Path(given)
    found = sorted((Path.home() / ".m2/repository/org/postgresql/postgresql").glob("*/postgresql-*.jar"))
    return found[-1] if found else None


@pytest.mark.slow
def test_jdbc_client(gateway, handle, tmp_path):
    java, jar = shutil.which("java"), pgjdbc_jar()
    if java is None or jar is None:
        pytest.skip("needs a JDK and the PostgreSQL JDBC jar")
    source = tmp_path / "GwJdbc.java"
    source.write_text(PROGRAM)
    url = f"jdbc:postgresql://127.0.0.1:{gateway.port}/gw_target?sslmode=disable"
    result = subprocess.run(
        [java, "-cp", str(jar), str(source), url, handle.id, handle.secret],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [
        "one=1",
        "sum=30",
        "refused=42501",
        "text=in",
        "a",
        "transaction",
        "batch",
        "refused",
        "two=2",
    ]
