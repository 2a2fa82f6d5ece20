from __future__ import annotations

import shutil

import pytest

from broker.policy import PolicyError, PolicyStore
from tests.conftest import TEST_POLICY


def test_a_restart_with_a_broken_file_serves_the_last_good_policy(tmp_path):
    path, last_good = tmp_path / "policy.yaml", tmp_path / "state" / "last-good.yaml"
    last_good.parent.mkdir()
    shutil.copy(TEST_POLICY, path)
    first = PolicyStore(path, last_good=last_good)
    assert "everything" in first.current().tasks

    path.write_text("tasks: {broken: [")
    assert first.reload() is False
    restarted = PolicyStore(path, last_good=last_good)  # a respawned worker
    assert set(restarted.current().tasks) == set(first.current().tasks)

    with pytest.raises(PolicyError):
        PolicyStore(path)  # without a last good copy a broken file still fails fast
