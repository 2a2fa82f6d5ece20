"""Cost of `Verifier.verify` with a cached key, for ES256 and RS256 tokens.

    .venv/bin/python bench/bench_verify.py [--n 2000] [--batches 5]

Each batch verifies the same token N times, timing every call; the figures are the median and
p95 over all calls of all batches, plus the spread of batch medians. A bare `jwt.decode` with
the same key is shown as the floor our checks add to.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jwt

from broker.identity import Verifier
from tests.support.tokens import TestIssuer


def sample(call: Callable[[], object], n: int) -> list[float]:
    timings = []
    clock = time.perf_counter_ns
    for _ in range(n):
        started = clock()
        call()
        timings.append((clock() - started) / 1000)
    return timings


def report(label: str, call: Callable[[], object], n: int, batches: int) -> None:
    for _ in range(200):  # warm-up
        call()
    runs = [sample(call, n) for _ in range(batches)]
    every = sorted(t for run in runs for t in run)
    p95 = every[int(len(every) * 0.95) - 1]
    medians = [statistics.median(run) for run in runs]
    print(
        f"{label:<22} median {statistics.median(every):7.1f} µs   p95 {p95:7.1f} µs   "
        f"batch medians {min(medians):.1f}-{max(medians):.1f} µs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="verifies per batch")
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        issuers = {
            algorithm: TestIssuer.create(
                Path(directory),
                name=f"bench-{algorithm.lower()}",
                kind="spiffe",
                # One trust domain per issuer: the verifier refuses two that share one.
                trust_domain=f"{algorithm.lower()}.example.org",
                algorithm=algorithm,
                max_token_lifetime_seconds=3600,
            )
            for algorithm in ("ES256", "RS256")
        }
        verifier = Verifier(
            [issuer.settings() for issuer in issuers.values()],
            clock_skew_seconds=30,
            max_token_bytes=8192,
            jti_store=None,
            operator_groups=["sre"],
        )
        print(f"N={args.n} x {args.batches} batches, Python {sys.version.split()[0]}")
        for algorithm, issuer in issuers.items():
            token = issuer.mint(issuer.spiffe_id("agents/bench"), exp_in=3600)
            public_key = issuer.key.private_key.public_key()
            report(f"{algorithm} verify", functools.partial(verifier.verify, token), args.n, args.batches)
            report(
                f"{algorithm} jwt.decode only",
                functools.partial(
                    jwt.decode, token, public_key, algorithms=[algorithm], audience="credential-broker"
                ),
                args.n,
                args.batches,
            )
        verifier.close()


if __name__ == "__main__":
    main()
