"""The UDA sweep platform, and a faithful superset of the standard-library ``platform`` module.

Why this file looks the way it does: the customer's command is ``python -m platform.sweep``, so this package is
named ``platform`` and, with the repository root on ``sys.path``, it shadows the standard-library module of the same
name. ``uuid``, ``ray``, ``torch``, ``mlflow`` and ``pytest`` all ``import platform`` and call ``platform.system()``,
``platform.machine()`` and friends (``ray/__init__.py`` does so at import time), so a plain package would crash them.

This module therefore loads the standard library's ``platform.py`` by file path and re-exports its whole namespace
(public and private names; dunder names excluded so that this package keeps its own ``__path__`` and ``__doc__``).
Every function keeps its own module globals (caches included), so the values are exactly those of the standard
library. The platform's own code lives in the submodules (``platform.sweep``, ``platform.train``, ...).

The other half of the contract is operational: every process that imports ``platform.*`` must have the repository
root on ``sys.path`` *before* anything imports the standard-library module. ``platform.cluster`` arranges that for
Ray workers (runtime env ``working_dir`` or ``PYTHONPATH``); see docs/architecture.md.
"""

import importlib.util as _importlib_util
import os as _os
import sysconfig as _sysconfig

_STDLIB_PLATFORM_PATH = _os.path.join(_sysconfig.get_paths()["stdlib"], "platform.py")


def _load_stdlib_platform():
    spec = _importlib_util.spec_from_file_location("_stdlib_platform", _STDLIB_PLATFORM_PATH)
    if spec is None or spec.loader is None:  # pragma: no cover - a broken Python installation
        raise ImportError(f"cannot load the standard-library platform module from {_STDLIB_PLATFORM_PATH}")
    module = _importlib_util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_stdlib = _load_stdlib_platform()
globals().update(
    {name: value for name, value in vars(_stdlib).items() if not (name.startswith("__") and name.endswith("__"))}
)
