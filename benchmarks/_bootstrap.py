"""Imported first by every benchmark script: puts the repository root ahead of the standard library on sys.path (and
on PYTHONPATH for subprocesses), so that `python benchmarks/<name>.py` imports our `platform` package."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != ROOT:
    sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
