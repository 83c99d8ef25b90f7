"""A method's training trace, seed by seed: what its logged mechanics do in a run that collapses and in one that does
not (issue 16: SLRT's seeds that end at the all-normal score on synthetic-endoscopy; issue 15: TD/TF's).

    python benchmarks/method_trace.py METHOD [--task synthetic-endoscopy] [--seeds 0,1] [--steps N] [--every 50]
                                             [--set KEY=VALUE ...]

Each seed trains in its own process through the platform's loop (as benchmarks/method_gain.py: the search space's
task defaults, `--set` on top, `--steps` scales the stages to N steps in all, default their own budgets), with an
in-memory logger in place of MLflow, evaluated every `--every` steps and at the end of every stage. Printed per seed:
at each evaluation the stage, target mIoU and the IoU of the task's last class (the lesion on the endoscopy tasks),
beside the means of the method's logged step metrics over the window before it (COLUMNS); a metric the method
does not log in that window stays empty.
"""

from __future__ import annotations

import _bootstrap  # noqa: F401  (must come first: see _bootstrap.py)

import argparse
import statistics
from collections import defaultdict
from typing import Any

import methods
import search_spaces
from common import parallel
from platform import config, tasks
from platform.loop import LocalSession, TrialRunner, TrialSpec

# (column, logged metric) per method, after the stage, mIoU and last-class IoU columns every trace has
COLUMNS = {
    "slrt": (
        ("λ lesion", "train/lambda/lesion"),
        ("λ normal", "train/lambda/normal"),
        ("PL frac", "train/pseudo_label_fraction"),
        ("L_srt", "train/loss_srt"),
        ("centroid d", "train/centroid_distance"),
        ("S1 acc", "train/cls_accuracy_target"),
        ("L_seg t", "train/loss_seg_target"),
    ),
    "tdtf": (
        ("L_seg s", "train/loss_seg_source"),
        ("L_seg t", "train/loss_seg_target"),
        ("PL frac", "train/pseudo_label_fraction"),
        ("L_align", "train/loss_align"),
        ("D_F(S)", "train/d_f_features"),
        ("D_F(A_F)", "train/d_f_augmented"),
        ("P", "train/transferability_mean"),
        ("L_cyc", "train/loss_cyc"),
        ("KL t", "train/kl_t"),
        ("λ t", "train/lambda_t"),
    ),
}


class Capture:
    """A RunLogger that keeps every metric point in memory (checkpoints and images are dropped)."""

    def __init__(self) -> None:
        self.points: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.points[key].append((step, float(value)))

    def log_checkpoint(self, *args: Any) -> None:
        pass

    def log_images(self, *args: Any) -> None:
        pass

    def set_tags(self, *args: Any) -> None:
        pass


def trace(method: str, task: str, seed: int, steps: int | None, every: int, overrides: dict) -> dict[str, list]:
    defaults = search_spaces.load(method).task_defaults.get(task, {})
    spec = TrialSpec(
        method=method,
        task=task,
        hyperparams={**defaults, **overrides},
        seed=seed,
        max_steps=steps,
        eval_every=every,
        data_root=tasks.default_data_root(),
        threads=1,
    )
    logger = Capture()
    TrialRunner(spec, LocalSession(), logger).run()
    return dict(logger.points)


def rows(points: dict[str, list[tuple[int, float]]], columns: tuple, stage_names: list[str], last: str) -> list:
    out = []
    stage_of = dict(points.get("stage_index", []))
    previous = 0
    for step, miou in points.get("val_target/miou", []):
        index = int(stage_of.get(step, -1))
        row = [str(step), stage_names[index] if 0 <= index < len(stage_names) else "?", f"{miou:.1f}"]
        row.append(next((f"{v:.1f}" for s, v in points.get(last, []) if s == step), ""))
        for _, key in columns:
            window = [v for s, v in points.get(key, []) if previous < s <= step]
            row.append(f"{statistics.mean(window):.3g}" if window else "")
        out.append(row)
        previous = step
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=sorted(COLUMNS))
    parser.add_argument("--task", default="synthetic-endoscopy")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=None, help="scale the stages to N steps (default: their own)")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    method = methods.get(args.method)
    overrides = config.parse_overrides(method, args.overrides)
    task = tasks.get(args.task)
    tasks.prepare(task, tasks.default_data_root())
    hp = methods.make_hyperparams(
        method, {**search_spaces.load(args.method).task_defaults.get(task.name, {}), **overrides}
    )
    stage_names = [stage.name for stage in method.stages(hp)]
    last = f"val_target/iou/{task.info.class_names[-1]}"
    seeds = [int(s) for s in args.seeds.split(",")]
    traces = parallel([(trace, (args.method, task.name, seed, args.steps, args.every, overrides)) for seed in seeds])
    header = ["step", "stage", "mIoU", f"{task.info.class_names[-1]} IoU"] + [name for name, _ in COLUMNS[args.method]]
    for seed, points in zip(seeds, traces):
        steps = f"{args.steps} steps" if args.steps else "its own budgets"
        print(f"\n{args.method} on {task.name}, seed {seed}, {steps}, overrides {overrides or 'none'}")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows(points, COLUMNS[args.method], stage_names, last):
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
