"""Measured domain gap of the embedded synthetic tasks: source-only vs a target-trained oracle, same budget.

For each synthetic task: `source_only` trained on the labelled source domain, and the same network trained on the
labelled target training split (the oracle; it uses target labels, which no adaptation method may), both evaluated
on the target validation split. A task has a real gap when source-only reaches at most 70% of the oracle's mIoU.

    python benchmarks/synthetic_gap.py [--tasks synthetic-urban,...] [--seeds 0,1,2] [--steps 300]

Runs through the platform's training loop in-process, two runs at a time on two cores (no Ray: this measures the
data, not the orchestration).
"""

from __future__ import annotations

import _bootstrap  # noqa: F401  (must come first: see _bootstrap.py)

import argparse
import dataclasses
import statistics
import sys
import time

from common import mean_std, parallel, train_once
from platform import tasks


def oracle_task(task: tasks.Task) -> tasks.Task:
    """The same task with the labelled target training split as its source: the target-trained upper bound."""
    oracle = dataclasses.replace(
        task, name=f"{task.name}+oracle", source_train=task.target_train, source_size=task.target_size
    )
    tasks.TASKS[oracle.name] = oracle
    return oracle


def run(task_name: str, seed: int, steps: int, data_root: str) -> dict[str, float]:
    if task_name.endswith("+oracle"):
        oracle_task(tasks.get(task_name.removesuffix("+oracle")))  # registered again in worker processes
    return train_once("source_only", task_name, {}, seed, steps, data_root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="synthetic-urban,synthetic-endoscopy,synthetic-cxr")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--data-root", default=tasks.default_data_root())
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(
        f"{'task':22s} {'source-only mIoU':>18s} {'oracle mIoU':>14s} {'ratio':>7s}   (target val, {args.steps} steps, "
        f"seeds {args.seeds})"
    )
    for name in args.tasks.split(","):
        tasks.prepare(tasks.get(name), args.data_root)
        started = time.perf_counter()
        results = parallel(
            [(run, (task, s, args.steps, args.data_root)) for task in (name, f"{name}+oracle") for s in seeds]
        )
        source = [r["val_target/miou"] for r in results[: len(seeds)]]
        target = [r["val_target/miou"] for r in results[len(seeds) :]]
        ratio = statistics.mean(source) / statistics.mean(target)
        print(
            f"{name:22s} {mean_std(source):>18s} {mean_std(target):>14s} {ratio:7.2f}   "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
