from __future__ import annotations

import shutil
from pathlib import Path

import pytest

API_POLICY = Path(__file__).parent / "policy.yaml"


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    target = tmp_path / "policy.yaml"
    shutil.copy(API_POLICY, target)
    return target
