from __future__ import annotations

import pytest


@pytest.fixture
def served(config_file):
    """`broker serve` as a user runs it: gunicorn master, 2 workers, its scheduler beside it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import requests

    from broker.dev.stack.postgres import free_port

    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker",
            "serve",
            "--config",
            str(config_file),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--threads",
            "2",
        ],
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.1)
    else:
        process.kill()
        raise AssertionError("broker serve did not become ready")
    process.url = url  # type: ignore[attr-defined]
    yield process
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
