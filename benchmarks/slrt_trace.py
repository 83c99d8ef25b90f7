"""SLRT's training trace (issue 16), kept under its old name: `benchmarks/method_trace.py slrt` with the same flags.

python benchmarks/slrt_trace.py [--task synthetic-endoscopy] [--seeds 0,1] [--steps N] [--every 50]
                                [--set KEY=VALUE ...]
"""

from __future__ import annotations

import _bootstrap  # noqa: F401  (must come first: see _bootstrap.py)

import sys

from method_trace import main

if __name__ == "__main__":
    main(["slrt", *sys.argv[1:]])
