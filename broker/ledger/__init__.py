"""The one reader and writer of tasks and leases (and of pooled task tokens, whose
handover to a task happens in the task's own statements): every service and the
scheduler come here.

- `tasks`: the task path (a start, a finish, a read, an expiry) in as few round trips as
  possible. Each step touches one task and its few leases once, and most of its time in
  the database was waiting: a BEGIN, then one statement, its answer, the next. Here the
  statements of one step go together in psycopg's pipeline mode on the session's own
  connection (`broker.db.pipelined`), audit rows included, so a start costs five round
  trips and a finish three where they cost eighteen between them. The SQL is spelled out
  (column lists come from the models), and rows become plain, session-less `Task`/`Lease`
  objects: what the renderers and the `Revoker` work with anyway, without the ORM's unit
  of work, which was the largest single item of the worker's CPU on this path.
- `attached`: `load_task`, for the rarer edits (approval, claim, operator revocation, the
  kill switch).
- `claims`: what the scheduler claims (due, stuck, spent, lapsed).
- `pool`: pooled task tokens.
- `inventory`: what operators and approvers list.
- `locks`: operators' locks, and the statements that end many tasks at once.

Two kinds of task object come out:
- from `read_task(s)`: session-less; changing one persists nothing by itself. What ending
  a task may change (`lifecycle.TASK_END_FIELDS`, `LEASE_END_FIELDS`) is written back with
  `write_back_end(ed)`, so a field the revoker sets is saved on every path.
- from `load_task`: attached to the caller's session; the session's flush at the unit of
  work's commit writes every changed field.
"""

from broker.ledger.attached import database_now, load_task
from broker.ledger.claims import (
    MARK_RETIRED,
    RETIRE_BATCH,
    due_retry,
    due_tasks,
    lapse_pending_approvals,
    revoke_pending_count,
    spent_token,
    stuck_start,
    until_next_deadline,
)
from broker.ledger.inventory import (
    Filters,
    leases_matching,
    read_lease,
    task_ids_matching,
    task_of_lease,
    tasks_matching,
    waiting_for_approval,
)
from broker.ledger.locks import (
    REVOKE_ENDED_BATCH,
    Targets,
    active_lease_count,
    add_lock,
    end_matching,
    ended_holding,
    lapse_expired_locks,
    list_locks,
    lock_targets,
    matching_lock,
    read_lock,
    remove_lock,
    targets_of,
)
from broker.ledger.pool import FORGET_POOLED, PoolRecord, lapsed_pooled, record_pooled, take_pooled
from broker.ledger.tasks import (
    IDEMPOTENCY_INDEX,
    USAGE_QUERY,
    Admission,
    activate_with_leases,
    idempotency_clash,
    insert_task,
    lock_and_count,
    read_task,
    read_tasks,
    release_idempotency_key,
    write_back_end,
    write_back_ended,
)

__all__ = [
    "FORGET_POOLED",
    "IDEMPOTENCY_INDEX",
    "MARK_RETIRED",
    "RETIRE_BATCH",
    "REVOKE_ENDED_BATCH",
    "USAGE_QUERY",
    "Admission",
    "Filters",
    "PoolRecord",
    "Targets",
    "activate_with_leases",
    "active_lease_count",
    "add_lock",
    "database_now",
    "due_retry",
    "due_tasks",
    "end_matching",
    "ended_holding",
    "idempotency_clash",
    "insert_task",
    "lapse_expired_locks",
    "lapse_pending_approvals",
    "lapsed_pooled",
    "leases_matching",
    "list_locks",
    "load_task",
    "lock_and_count",
    "lock_targets",
    "matching_lock",
    "read_lease",
    "read_lock",
    "read_task",
    "read_tasks",
    "record_pooled",
    "release_idempotency_key",
    "remove_lock",
    "revoke_pending_count",
    "spent_token",
    "stuck_start",
    "take_pooled",
    "targets_of",
    "task_ids_matching",
    "task_of_lease",
    "tasks_matching",
    "until_next_deadline",
    "waiting_for_approval",
    "write_back_end",
    "write_back_ended",
]
