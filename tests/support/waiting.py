"""Waiting for something to happen, the one way tests do it.

A poll with a generous timeout: it says *that* something happened, never how fast (a
promise with a time bound is checked on timestamps the broker recorded, not here).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.1, what: str = "") -> T:
    """Poll until `predicate()` is truthy and return that value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true after {timeout}s: {what or predicate}")
        time.sleep(interval)


def wait_until(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> float:
    """`wait_for` that returns how many seconds it took instead of the value."""
    start = time.monotonic()
    wait_for(condition, timeout=timeout, interval=interval)
    return time.monotonic() - start
