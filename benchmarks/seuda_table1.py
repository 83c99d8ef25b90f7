"""SeUDA's Table 1 as the paper runs it: one source segmenter per seed, tested under every setting; and the 10-run
stability study of SeUDA vs CyUDA.

    python benchmarks/seuda_table1.py [--task synthetic-cxr] [--seeds 0,1,2] [--steps N]
    python benchmarks/seuda_table1.py --stability [--runs 10] [--task synthetic-cxr]

"We first established the segmenter on source training data independently. Next, we test the segmenter under
various settings" (../shared/papers/003_2b3d70deb7bd4c82.txt, Sec. 3). A platform trial trains and scores one row,
so the protocol is a sequence of trials through the platform's loop, in process (two at a time on two cores):

1. per seed, one stage-1 trial (`adaptation=none`, the search space's task defaults, `segmenter_epochs`); its final
   evaluation is T-noDA; its segmenter is then scored on the source test split (S-test: Montgomery's test split;
   synthetic-cxr's source has no test split, its held-out `val` split is used) and, with histogram matching to the
   source histogram it accumulated, on the target (T-HistM);
2. per seed, CyUDA (`lambda_sem=0`) and SeUDA (defaults) as GAN-stage trials on that segmenter
   (`segmenter_weights`, `gan_epochs` source epochs, the same seed).
Every row is post-processed (largest component + hole filling, Sec. 3; methods/seuda.py). Scores: the final
evaluation of each trial on the target validation split (not the best one, which would select with target labels),
Dice and ASD averaged over both lungs, mean ± std over seeds.

--stability: Sec. 3 "running each model for 10 times under different initializations but with the same
hyper-parameters": one segmenter (seed 0) and `--runs` GAN trials (seeds 0 .. runs-1) each for SeUDA and CyUDA;
the std of Dice and ASD over the runs (the paper: Dice std 0.25% vs 2.03%, ASD std 0.16 vs 1.19 mm).

--steps N scales each row's trials to N steps in all (the stage-1 trial gets its share of N, each GAN trial the
rest), for quick runs; default: the stages' own budgets.
"""

from __future__ import annotations

import _bootstrap  # noqa: F401  (must come first: see _bootstrap.py)

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from typing import Any

import torch

import methods
import search_spaces
from common import mean_std, parallel
from methods.contract import StagePosition
from platform import budgets, loop, tasks
from platform.datasets import read_manifest, split_files
from platform.loop import LocalSession, TrialRunner, TrialSpec

METHOD = "seuda"


def _spec(task: str, overrides: dict[str, Any], seed: int, steps: int | None, data_root: str) -> TrialSpec:
    defaults = search_spaces.load(METHOD).task_defaults.get(task, {})
    return TrialSpec(
        method=METHOD,
        task=task,
        hyperparams={**defaults, **overrides},
        seed=seed,
        max_steps=steps,
        eval_every=steps or 10**9,  # once at the end (and at the end of every stage)
        data_root=data_root,
        threads=1,
    )


def source_test_split(task: tasks.Task, data_root: str) -> str:
    """The source dataset's test split, or its held-out val split when it has none (the synthetic tasks)."""
    splits = read_manifest(data_root, task.source_train.dataset).splits
    return "test" if "test" in splits else "val"


def stage1(task_name: str, seed: int, steps: int | None, data_root: str, path: str) -> dict[str, dict[str, float]]:
    """Train f_s once (an adaptation=none trial), save it to `path`, and score it as S-test, T-noDA and T-HistM."""
    torch.set_num_threads(1)
    runner = TrialRunner(_spec(task_name, {"adaptation": "none"}, seed, steps, data_root), LocalSession())
    rows = {"T-noDA": runner.run()}
    torch.save(runner.modules.state_dict(), path)
    trial, task = runner.trial, runner.trial.task
    position = StagePosition("segmenter", 0)
    split = source_test_split(task, data_root)

    def score(hp: Any, files: list[str]) -> dict[str, float]:
        return loop.evaluate_split(
            trial.method, hp, trial.modules, task, files, position, 16, 0, 1, trial.device, "val_target"
        )

    rows["S-test"] = score(trial.hp, split_files(data_root, task.source_train.dataset, split))
    rows["T-HistM"] = score(dataclasses.replace(trial.hp, adaptation="histogram"), trial.files["target_val"])
    return rows


def gan_row(task_name: str, overrides: dict[str, Any], seed: int, steps: int | None, data_root: str) -> dict:
    torch.set_num_threads(1)
    return TrialRunner(_spec(task_name, overrides, seed, steps, data_root), LocalSession()).run()


def _shares(task_name: str, steps: int | None, data_root: str) -> tuple[int | None, int | None]:
    """(stage-1 steps, GAN steps) of one row's trials under --steps N: N split like an in-trial run would split it."""
    if steps is None:
        return None, None
    method = methods.get(METHOD)
    hp = methods.make_hyperparams(method, search_spaces.load(METHOD).task_defaults.get(task_name, {}))
    info = tasks.runtime_info(tasks.get(task_name), data_root)
    segmenter, gan = budgets.stage_steps(method.stages(hp), info, hp.batch_size, 1, steps)
    return segmenter, gan


def _lung_means(metrics: dict[str, float]) -> dict[str, float]:
    lungs = [key.rsplit("/", 1)[1] for key in metrics if key.startswith("val_target/dice/")]
    return {
        "Dice": statistics.mean(metrics[f"val_target/dice/{lung}"] for lung in lungs),
        "ASD mm": statistics.mean(metrics[f"val_target/asd_mm/{lung}"] for lung in lungs),
        "mIoU": metrics["val_target/miou"],
        **{f"Dice {lung}": metrics[f"val_target/dice/{lung}"] for lung in lungs},
        **{f"ASD {lung}": metrics[f"val_target/asd_mm/{lung}"] for lung in lungs},
    }


def _print(rows: dict[str, list[dict[str, float]]], keys: list[str]) -> None:
    width = max(len(label) for label in rows)
    for key in keys:
        print(f" {key}:")
        for label, results in rows.items():
            values = [_lung_means(r)[key] for r in results]
            print(f"  {label:{width}s}  {mean_std(values)}   [{', '.join(f'{v:.2f}' for v in values)}]")


def table1(task: str, seeds: list[int], steps: int | None, data_root: str, scratch: str) -> None:
    segmenter_steps, gan_steps = _shares(task, steps, data_root)
    paths = {seed: os.path.join(scratch, f"segmenter-seed{seed}.pt") for seed in seeds}
    first = parallel([(stage1, (task, seed, segmenter_steps, data_root, paths[seed])) for seed in seeds])
    rows = {label: [r[label] for r in first] for label in ("S-test", "T-noDA", "T-HistM")}
    jobs = [
        (gan_row, (task, {**point, "segmenter_weights": paths[seed]}, seed, gan_steps, data_root))
        for point in ({"lambda_sem": 0.0}, {})
        for seed in seeds
    ]
    second = parallel(jobs)
    rows["CyUDA (lambda_sem=0)"] = second[: len(seeds)]
    rows["SeUDA (defaults)"] = second[len(seeds) :]
    budget = f"{steps} steps per row" if steps else "the stages' own budgets"
    split = source_test_split(tasks.get(task), data_root)
    print(f"{task}, Table 1 rows on one segmenter per seed ({budget}), seeds {seeds}; S-test on source {split}:")
    lungs = [key.rsplit("/", 1)[1] for key in first[0]["T-noDA"] if key.startswith("val_target/dice/")]
    _print(rows, ["Dice", "ASD mm", "mIoU", *(f"Dice {lung}" for lung in lungs), *(f"ASD {lung}" for lung in lungs)])


def stability(task: str, runs: int, steps: int | None, data_root: str, scratch: str) -> None:
    segmenter_steps, gan_steps = _shares(task, steps, data_root)
    path = os.path.join(scratch, "segmenter-seed0.pt")
    [first] = parallel([(stage1, (task, 0, segmenter_steps, data_root, path))], processes=1)
    jobs = [
        (gan_row, (task, {"lambda_sem": lambda_sem, "segmenter_weights": path}, seed, gan_steps, data_root))
        for lambda_sem in (0.5, 0.0)
        for seed in range(runs)
    ]
    results = parallel(jobs)
    rows = {"SeUDA (lambda_sem=0.5)": results[:runs], "CyUDA (lambda_sem=0)": results[runs:]}
    print(
        f"{task}, {runs} GAN runs each on one segmenter (seed 0; T-noDA Dice {_lung_means(first['T-noDA'])['Dice']:.2f}):"
    )
    _print(rows, ["Dice", "ASD mm"])
    for label, values in rows.items():
        dice = [_lung_means(r)["Dice"] for r in values]
        asd = [v for v in (_lung_means(r)["ASD mm"] for r in values) if v == v]
        print(f"  std over runs, {label}: Dice {statistics.stdev(dice):.2f}, ASD {statistics.stdev(asd):.2f} mm")
    print("  (paper, Sec. 3: SeUDA vs CyUDA Dice std 0.25 vs 2.03, ASD std 0.16 vs 1.19 mm)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default=None, help="default: seuda's default task (synthetic-cxr)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=None, help="scale each row to N steps (default: own budgets)")
    parser.add_argument("--stability", action="store_true", help="the 10-run stability study instead of Table 1")
    parser.add_argument("--runs", type=int, default=10, help="--stability: GAN runs per model")
    args = parser.parse_args(argv)
    task = args.task or search_spaces.load(METHOD).default_task
    data_root = tasks.default_data_root()
    tasks.prepare(tasks.get(task), data_root)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seuda-table1-") as scratch:
        if args.stability:
            stability(task, args.runs, args.steps, data_root, scratch)
        else:
            table1(task, [int(s) for s in args.seeds.split(",")], args.steps, data_root, scratch)
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
