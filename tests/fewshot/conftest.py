"""Few-shot tests run in a temporary working folder: Trainers without a logger export weights to it."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
