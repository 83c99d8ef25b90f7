"""Record (or compare) every method's target-validation metrics for a fixed seed: the check that a refactoring of the
loop or the contract changes no result.

    python benchmarks/metric_parity.py record parity.json [--cli]     # before the change
    python benchmarks/metric_parity.py compare parity.json [--cli]    # after: prints every differing metric

Each method runs on its default synthetic task with its search space's task defaults, seed 0, a short budget that
still crosses every stage boundary and evaluation, in process through the platform's loop (`loop`); `--cli` also runs
`python -m platform.train` with both trial runners (`inline`, `train`) and reads the metrics back from MLflow. A
method may add keys (a new metric) without failing the comparison; a changed or missing `val_target/*` value fails.
"""

from __future__ import annotations

import _bootstrap

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

from mlflow.tracking import MlflowClient

import methods
from common import train_once
from platform import tasks

STEPS, EVAL_EVERY = 12, 6


def loop_metrics(method: str) -> dict[str, float]:
    import search_spaces

    task = search_spaces.load(method).default_task
    tasks.prepare(tasks.get(task), tasks.default_data_root())
    final = train_once(method, task, {}, seed=0, steps=STEPS)
    return {k: v for k, v in final.items() if k.startswith("val_target/")}


def cli_metrics(method: str, runner: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="uda-parity-") as scratch:
        store = f"sqlite:///{scratch}/mlflow.db"
        command = [
            sys.executable,
            "-m",
            "platform.train",
            method,
            "--max-steps",
            str(STEPS),
            "--eval-every",
            str(EVAL_EVERY),
            "--tracking-uri",
            store,
            "--storage-path",
            f"{scratch}/results",
            "--trial-runner",
            runner,
        ]
        out = subprocess.run(command, cwd=_bootstrap.ROOT, env=dict(os.environ), capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
        client = MlflowClient(store)
        runs = [
            r
            for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id])
            if "mlflow.parentRunId" in r.data.tags
        ]
        return {k: v for k, v in runs[0].data.metrics.items() if k.startswith("val_target/")}


def measure(cli: bool, only: set[str] | None = None) -> dict[str, dict[str, float]]:
    results = {}
    for name in sorted(only or methods.REGISTRY):
        results[f"{name}/loop"] = loop_metrics(name)
        print(f"{name}/loop: miou {results[f'{name}/loop']['val_target/miou']:.6f}", flush=True)
        if cli:
            for runner in ("inline", "train"):
                results[f"{name}/{runner}"] = cli_metrics(name, runner)
                print(f"{name}/{runner}: miou {results[f'{name}/{runner}']['val_target/miou']:.6f}", flush=True)
    return results


def _same(a: float | None, b: float) -> bool:
    """Bit-identical floats; NaN (an undefined metric, e.g. the ASD of an empty prediction) equals NaN."""
    return a == b or (a is not None and math.isnan(a) and math.isnan(b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("record", "compare"))
    parser.add_argument("path")
    parser.add_argument("--cli", action="store_true", help="also through `python -m platform.train`, both runners")
    parser.add_argument("--only", help="comma-separated methods to run and compare (default: all)")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    measured = measure(args.cli, only)
    if args.action == "record":
        with open(args.path, "w") as handle:
            json.dump(measured, handle, indent=2, sort_keys=True)
        print(f"recorded {len(measured)} runs in {args.path}")
        return 0
    with open(args.path) as handle:
        recorded = json.load(handle)
    differences = 0
    for run, before in sorted(recorded.items()):
        if only and run.split("/")[0] not in only or run not in measured:
            continue
        after = measured[run]
        changed = [key for key, value in sorted(before.items()) if not _same(after.get(key), value)]
        for key in changed:
            print(f"  {run} {key}: {before[key]!r} -> {after.get(key)!r}")
        differences += len(changed)
        print(f"{run}: {'DIFFERS' if changed else 'identical'} ({len(before)} metrics)")
    print("bit-identical" if differences == 0 else f"{differences} metric(s) differ")
    return 0 if differences == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
