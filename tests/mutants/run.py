"""`make mutants`: remove each guard in tests/mutants/mutations.toml and check a test notices.

Each mutation names a file, an exact `find` snippet, its `replace`, the promise or check
it breaks and the tests expected to catch it. For each one this copies the tree to a
scratch directory (the checkout is never touched), applies the replacement, runs only
the named tests with the project's venv (PYTHONPATH at the copy) and reports `caught`
(a test failed) or `survived` (all passed). It exits non-zero if any survives, if a
`find` is not in its file exactly once (so mutations can't rot silently when the code
changes), or if the named tests don't pass on the unmutated copy first.

Why not mutmut: it generates every operator mutation of every line, mostly noise for a
broker (a changed log message, an off-by-one in a page size), takes hours against real
Vault and Postgres, and can't say which test should catch what. This list is short and
deliberate: one entry per guard that keeps a promise of docs/contract.md §6 or a check of
docs/security.md, and each names the test that owns it.

One Postgres and one OpenBao, started here, serve every mutant's run (see
tests/mutants/shared_stack.py); their tables are emptied by the tests' own fixtures.

    python -m tests.mutants.run [--only ID ...] [--list]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MUTATIONS = Path(__file__).with_name("mutations.toml")
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", "*.egg-info"
)
TIMEOUT_SECONDS = 600


def load_mutations() -> list[dict[str, Any]]:
    mutations: list[dict[str, Any]] = tomllib.loads(MUTATIONS.read_text())["mutation"]
    ids = [m["id"] for m in mutations]
    if len(set(ids)) != len(ids):
        sys.exit("mutations.toml: duplicate ids")
    for mutation in mutations:
        count = (ROOT / mutation["file"]).read_text().count(mutation["find"])
        if count != 1:
            sys.exit(
                f"mutation {mutation['id']}: `find` occurs {count} times in {mutation['file']}, not once"
            )
    return mutations


def copy_tree(target: Path) -> Path:
    shutil.copytree(ROOT, target, ignore=COPY_IGNORE)
    return target


def apply(tree: Path, mutation: dict[str, Any]) -> None:
    path = tree / mutation["file"]
    text = path.read_text()
    path.write_text(text.replace(mutation["find"], mutation["replace"], 1))


def run_tests(tree: Path, tests: list[str], stack_file: Path, log: Path) -> tuple[int, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "BROKER_MUTANTS_STACK": str(stack_file)}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    command += ["-p", "tests.mutants.shared_stack", *tests]
    began = time.monotonic()
    with log.open("w") as out:
        try:
            code = subprocess.run(
                command,
                check=False,
                cwd=tree,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=TIMEOUT_SECONDS,
            ).returncode
        except subprocess.TimeoutExpired:
            code = -1
    return code, time.monotonic() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="run only these mutation ids")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    mutations = load_mutations()
    if args.only:
        unknown = set(args.only) - {m["id"] for m in mutations}
        if unknown:
            sys.exit(f"unknown mutation ids: {sorted(unknown)}")
        mutations = [m for m in mutations if m["id"] in args.only]
    if args.list:
        for m in mutations:
            print(f"{m['id']:40} {m['promise']}")
        return 0

    from broker.dev.stack import start_stack
    from tests.mutants.shared_stack import dump

    scratch = Path(tempfile.mkdtemp(prefix="broker-mutants-"))
    stack = start_stack(scratch / "stack")
    try:
        stack_file = scratch / "stack.json"
        dump(stack, stack_file)
        return _run_all(mutations, scratch, stack_file)
    finally:
        stack.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _run_all(mutations: list[dict[str, Any]], scratch: Path, stack_file: Path) -> int:
    every_test = sorted({test for m in mutations for test in m["tests"]})
    baseline = copy_tree(scratch / "baseline")
    code, took = run_tests(baseline, every_test, stack_file, scratch / "baseline.log")
    if code != 0:
        print((scratch / "baseline.log").read_text()[-4000:])
        print(f"baseline: the named tests fail on the unmutated tree (exit {code}); nothing to compare")
        return 2
    print(f"baseline: the {len(every_test)} named test ids pass unmutated ({took:.0f}s)")
    results: dict[str, str] = {}
    for mutation in mutations:
        tree = copy_tree(scratch / f"m-{mutation['id']}")
        apply(tree, mutation)
        log = scratch / f"{mutation['id']}.log"
        code, took = run_tests(tree, mutation["tests"], stack_file, log)
        # pytest: 1 = a test failed (caught), 0 = all passed (survived), else an error.
        verdict = {0: "SURVIVED", 1: "caught"}.get(code, f"ERROR (exit {code})")
        results[mutation["id"]] = verdict
        print(f"{verdict:9} {mutation['id']:40} {took:5.0f}s  {mutation['promise']}", flush=True)
        if code != 1:
            print("          " + "\n          ".join(log.read_text().splitlines()[-15:]))
        shutil.rmtree(tree, ignore_errors=True)
    caught = sum(v == "caught" for v in results.values())
    print(f"\n{caught}/{len(results)} mutations caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
