"""Fixtures for the deltacr tests (helpers live in deltacr_helpers.py)."""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

from deltacr import _sys
from deltacr_helpers import ROOT, Lab

@pytest.fixture(scope="session", autouse=True)
def _subreaper() -> None:
    # Daemons started by `attach` double fork; as a subreaper we get (and reap) them.
    _sys.set_child_subreaper()


@pytest.fixture
def lab() -> Iterator[Lab]:
    lb = Lab()
    try:
        yield lb
    finally:
        lb.teardown()


@pytest.fixture
def store(tmp_path: Any) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def cli_env(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    run = tmp_path / "run"
    monkeypatch.setenv("DELTACR_RUN_DIR", str(run))
    monkeypatch.setenv("DELTACR_STORE_ROOT", str(tmp_path / "stores"))
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT
    return env


