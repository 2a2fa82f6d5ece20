"""Microbenchmark: µs per `Policy.evaluate` for the demo `analytics-read` (one CEL rule).

Run:  .venv/bin/python bench/bench_policy.py [--batches 200] [--batch-size 500]

Each batch times `batch-size` back-to-back evaluations; the figures are the median and the
95th percentile of the per-evaluation time across batches (batches damp timer noise,
percentiles over batches show GC pauses and scheduler hiccups).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker.identity.types import Identity  # noqa: E402
from broker.policy import TaskRequest, Usage, load_policy  # noqa: E402

SUBJECT = "spiffe://example.org/agents/reporter"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()

    policy = load_policy(ROOT / "broker" / "dev" / "data" / "policy.yaml")
    now = dt.datetime.now(dt.UTC)
    identity = Identity(
        id=SUBJECT,
        issuer_name="spire",
        issuer="https://spire.example.org",
        subject=SUBJECT,
        kind="spiffe",
        uses=frozenset({"workload"}),
        groups=frozenset(),
        claims={"sub": SUBJECT, "aud": ["credential-broker"], "iat": 1, "exp": 2, "jti": "x"},
        expires_at=now,
    )
    request = TaskRequest(
        task="analytics-read",
        owner="alice@example.com",
        purpose="nightly revenue report",
        ttl_seconds=None,
        context={"environment": "prod", "ticket": "OPS-1234"},
    )
    usage = Usage(active_for_workload=1, starts_last_minute=3)
    decision = policy.evaluate(identity, request, usage, now)
    assert decision.allowed, decision.detail
    when_rules = len(policy.task("analytics-read").when)

    for _ in range(args.batch_size):  # warm-up
        policy.evaluate(identity, request, usage, now)
    per_call_us = []
    for _ in range(args.batches):
        start = time.perf_counter()
        for _ in range(args.batch_size):
            policy.evaluate(identity, request, usage, now)
        per_call_us.append((time.perf_counter() - start) / args.batch_size * 1e6)

    per_call_us.sort()
    p95 = per_call_us[min(len(per_call_us) - 1, int(len(per_call_us) * 0.95))]
    print(
        f"Policy.evaluate analytics-read ({when_rules} CEL rule, "
        f"{args.batches} batches x {args.batch_size}): "
        f"median {statistics.median(per_call_us):.1f} us, p95 {p95:.1f} us"
    )


if __name__ == "__main__":
    main()
