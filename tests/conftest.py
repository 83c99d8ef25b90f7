"""Shared fixtures. Run the suite from the repository root with `python -m pytest` (see README: the `pytest` console
script imports the standard-library `platform` before our package is importable)."""

from __future__ import annotations

import os
import sys

import pytest

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import platform  # noqa: E402

if not hasattr(platform, "__path__"):
    raise pytest.UsageError(
        "the standard-library `platform` module was imported before ours: run the tests from the "
        "repository root with `python -m pytest` (or put the root first on PYTHONPATH)"
    )


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A data root shared by the whole session; synthetic datasets are generated into it on first use."""
    root = os.environ.get("UDA_TEST_DATA_ROOT") or str(tmp_path_factory.mktemp("data"))
    return root


@pytest.fixture
def subprocess_env(data_root: str) -> dict[str, str]:
    """Environment for CLI subprocesses: repository root first on PYTHONPATH, the session's data root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [REPOSITORY_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env["UDA_DATA_ROOT"] = data_root
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def python() -> str:
    return sys.executable
