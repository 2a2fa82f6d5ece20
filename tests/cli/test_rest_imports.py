"""The REST commands load only the client: no ORM, web framework, database driver or requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_SIDE = ("sqlalchemy", "flask", "psycopg", "requests")


def test_the_operator_and_approver_commands_import_none_of_the_servers_packages():
    code = (
        "import json, sys\n"
        "import broker.cli.ops, broker.cli.approvals\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    assert {"broker", "click", "urllib3"} <= loaded  # what was imported is what was seen
    assert sorted(loaded & set(SERVER_SIDE)) == []
