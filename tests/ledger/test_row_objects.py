"""Rows become mapped objects without the ORM's constructor (broker/ledger/_sql.py)."""

from __future__ import annotations

import subprocess
import sys

FIRST_USE = """
import uuid
from sqlalchemy.orm.attributes import set_committed_value
from broker.models import Lease, Task
from broker.ledger._sql import row_object

task = row_object(Task, {"id": uuid.uuid4(), "state": "active", "owner": "alice@example.com"})
set_committed_value(task, "leases", [row_object(Lease, {"id": uuid.uuid4(), "state": "active"})])
task.state = "finished"
print(task.state, task.owner, len(task.leases))
"""


def test_a_row_object_works_as_the_first_orm_use_of_a_process():
    # A fresh gunicorn worker whose first request is a finish builds its first mapped
    # objects this way, before any query or constructor has configured the mappers.
    ran = subprocess.run(
        [sys.executable, "-c", FIRST_USE], capture_output=True, text=True, timeout=60, check=False
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.split() == ["finished", "alice@example.com", "1"]
