"""Measured domain gap of the embedded synthetic tasks: source-only vs a target-trained oracle, same budget.

For each synthetic task: `source_only` trained on the labelled source domain, and the same network trained on the
labelled target training split (the oracle; it uses target labels, which no adaptation method may), both evaluated
on the target validation split. A task has a real gap when source-only reaches at most 70% of the oracle's mIoU.

    python benchmarks/synthetic_gap.py [--tasks synthetic-urban,...] [--seeds 0,1,2] [--steps 300]

Runs in-process through the platform's training loop (no Ray: this measures the data, not the orchestration).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

from platform import tasks
from platform.loop import LocalSession, TrialRunner, TrialSpec
import search_spaces


def oracle_task(task: tasks.Task) -> tasks.Task:
    """The same task with the labelled target training split as its source: the target-trained upper bound."""
    oracle = dataclasses.replace(task, name=f"{task.name}+oracle", source_train=task.target_train,
                                 source_size=task.target_size)
    tasks.TASKS[oracle.name] = oracle
    return oracle


def run(task_name: str, seed: int, steps: int, data_root: str) -> dict[str, float]:
    space = search_spaces.load("source_only")
    base = tasks.get(task_name.removesuffix("+oracle"))
    spec = TrialSpec(method="source_only", task=task_name, hyperparams=dict(space.task_defaults[base.name]),
                     seed=seed, max_steps=steps, eval_every=steps, data_root=data_root, threads=1)
    return TrialRunner(spec, LocalSession()).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="synthetic-urban,synthetic-endoscopy,synthetic-cxr")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--data-root", default=tasks.default_data_root())
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{'task':22s} {'source-only mIoU':>18s} {'oracle mIoU':>14s} {'ratio':>7s}   (target val, {args.steps} steps, "
          f"seeds {args.seeds})")
    for name in args.tasks.split(","):
        task = tasks.get(name)
        oracle = oracle_task(task)
        started = time.perf_counter()
        source = [run(name, s, args.steps, args.data_root)["val_target/miou"] for s in seeds]
        target = [run(oracle.name, s, args.steps, args.data_root)["val_target/miou"] for s in seeds]
        ratio = statistics.mean(source) / statistics.mean(target)
        spread = lambda v: f"{statistics.mean(v):5.1f} ± {statistics.stdev(v) if len(v) > 1 else 0:4.1f}"
        print(f"{name:22s} {spread(source):>18s} {spread(target):>14s} {ratio:7.2f}   "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
