"""Prometheus metrics. Under gunicorn the values of all workers are merged through
PROMETHEUS_MULTIPROC_DIR (set by `broker serve`)."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

TASKS_STARTED = Counter(
    "broker_tasks_started_total", "Task starts by task type and result", ["task", "result"]
)
TASKS_FINISHED = Counter("broker_tasks_finished_total", "Tasks ended by final state", ["state"])
LEASES_ISSUED = Counter("broker_leases_issued_total", "Credentials issued by kind", ["kind"])
REVOCATIONS = Counter(
    "broker_revocations_total", "Lease revocations by trigger and result", ["trigger", "result"]
)
REVOKE_FAILURES = Counter("broker_revoke_failures_total", "Failed revoke attempts against Vault")
REVOCATION_LAG = Histogram(
    "broker_revocation_lag_seconds",
    "Deadline to revoked, for tasks revoked by the scheduler",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30, 60),
)
PENDING_REVOCATIONS = Gauge(
    "broker_pending_revocations", "Leases waiting in revoke_pending", multiprocess_mode="max"
)
ACTIVE_LOCKS = Gauge(
    "broker_locks_active",
    "Live operator locks (neither removed nor expired), as of the scheduler's last sweep",
    multiprocess_mode="max",
)
ORPHANS_RECONCILED = Counter(
    "broker_orphans_reconciled_total", "Vault tokens or leases no task owned, revoked"
)
POOLED_TOKENS_RECLAIMED = Counter(
    "broker_pooled_tokens_reclaimed_total", "Pooled task tokens of dead processes, revoked by the scheduler"
)
LAST_SWEEP = Gauge(
    "broker_scheduler_last_success_timestamp_seconds",
    "Unix time of the last successful run of each scheduler job",
    ["job"],
    multiprocess_mode="max",
)
REQUEST_LATENCY = Histogram(
    "broker_request_seconds",
    "API latency by endpoint",
    ["endpoint", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def render() -> tuple[bytes, str]:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
