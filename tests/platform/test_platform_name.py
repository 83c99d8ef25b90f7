"""Our `platform` package must be a faithful superset of the standard-library module it shadows."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig

import platform
from tests.conftest import REPOSITORY_ROOT


def _stdlib_platform():
    path = os.path.join(sysconfig.get_paths()["stdlib"], "platform.py")
    spec = importlib.util.spec_from_file_location("stdlib_platform_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_our_package_is_the_one_imported():
    assert os.path.dirname(platform.__file__) == os.path.join(REPOSITORY_ROOT, "platform")
    assert hasattr(platform, "__path__")


def test_every_public_name_of_the_stdlib_module_is_present():
    stdlib = _stdlib_platform()
    public = [name for name in dir(stdlib) if not name.startswith("_")]
    assert len(public) > 20
    missing = [name for name in public if not hasattr(platform, name)]
    assert missing == []


def test_zero_argument_functions_return_the_stdlib_values():
    stdlib = _stdlib_platform()
    calls = [
        "system",
        "machine",
        "node",
        "release",
        "version",
        "processor",
        "python_version",
        "python_version_tuple",
        "python_implementation",
        "python_compiler",
        "python_build",
        "architecture",
        "platform",
        "uname",
        "libc_ver",
        "freedesktop_os_release",
    ]
    for name in calls:
        try:
            expected = getattr(stdlib, name)()
        except OSError:  # freedesktop_os_release on systems without /etc/os-release
            continue
        assert getattr(platform, name)() == expected, name


def test_libraries_that_import_platform_work_after_ours():
    code = (
        "import platform; assert hasattr(platform, '__path__'); "
        "import uuid, ray, torch, mlflow; "
        "uuid.uuid4(); uuid.uuid1(); "
        "assert torch.ones(2).sum().item() == 2; "
        "assert mlflow.get_tracking_uri(); "
        "print(platform.system(), ray.__version__)"
    )
    env = dict(os.environ, PYTHONPATH=REPOSITORY_ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == _stdlib_platform().system()


def test_python_dash_m_runs_our_cli():
    env = dict(os.environ, PYTHONPATH=REPOSITORY_ROOT)
    out = subprocess.run(
        [sys.executable, "-m", "platform.sweep", "--help"],
        cwd=REPOSITORY_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "python -m platform.sweep" in out.stdout and "examples:" in out.stdout


def test_the_pytest_script_works_from_the_repository_root(tmp_path):
    """The README's command is `python -m pytest`; the plain `pytest` script works too when PYTHONPATH names the
    root, because then the root precedes the standard library before pytest imports anything."""
    script = os.path.join(os.path.dirname(sys.executable), "pytest")
    env = dict(os.environ, PYTHONPATH=REPOSITORY_ROOT)
    out = subprocess.run(
        [
            script,
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/platform/test_platform_name.py",
            "-k",
            "our_package_is_the_one_imported",
        ],
        cwd=REPOSITORY_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
