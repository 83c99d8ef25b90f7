"""SLRT's training trace, seed by seed: what the logged mechanics do in a run that collapses to the all-normal score
and in one that does not (issue 16: seeds 1 of Ours, BL+PL+SRT and Ours-woSP end at about 47 mIoU on
synthetic-endoscopy, the score of predicting "normal" everywhere).

    python benchmarks/slrt_trace.py [--task synthetic-endoscopy] [--seeds 0,1] [--steps 600] [--every 50]
                                    [--set KEY=VALUE ...]

Each seed trains in its own process through the platform's loop (as benchmarks/method_gain.py: the search space's
task defaults, `--set` on top), with an in-memory logger in place of MLflow, evaluated every `--every` steps. Printed
per seed: target mIoU and lesion IoU at each evaluation, beside the means of the logged step metrics over the
window before it (the lesion's Eq. 5 threshold λ, the pseudo-labelled fraction of target pixels, the SRT loss and
centroid distance, S1's target accuracy). The lesion and λ columns name the endoscopy tasks' classes; on another
task they stay empty.
"""

from __future__ import annotations

import _bootstrap  # noqa: F401  (must come first: see _bootstrap.py)

import argparse
import statistics
from collections import defaultdict
from typing import Any

import search_spaces
from common import parallel
from platform import config, tasks
from platform.loop import LocalSession, TrialRunner, TrialSpec

COLUMNS = (
    ("mIoU", "val_target/miou"),
    ("lesion IoU", "val_target/iou/lesion"),
    ("λ lesion", "train/lambda/lesion"),
    ("λ normal", "train/lambda/normal"),
    ("PL frac", "train/pseudo_label_fraction"),
    ("L_srt", "train/loss_srt"),
    ("centroid d", "train/centroid_distance"),
    ("S1 acc", "train/cls_accuracy_target"),
    ("L_seg t", "train/loss_seg_target"),
)


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


def trace(task: str, seed: int, steps: int, every: int, overrides: dict[str, Any]) -> dict[str, list]:
    defaults = search_spaces.load("slrt").task_defaults.get(task, {})
    spec = TrialSpec(
        method="slrt",
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


def rows(points: dict[str, list[tuple[int, float]]]) -> list[list[str]]:
    out = []
    evaluations = [step for step, _ in points.get("val_target/miou", [])]
    previous = 0
    for step in evaluations:
        row = [str(step)]
        for _, key in COLUMNS:
            window = [v for s, v in points.get(key, []) if previous < s <= step]
            row.append(f"{statistics.mean(window):.3g}" if window else "")
        out.append(row)
        previous = step
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="synthetic-endoscopy")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    import methods

    overrides = config.parse_overrides(methods.get("slrt"), args.overrides)
    tasks.prepare(tasks.get(args.task), tasks.default_data_root())
    seeds = [int(s) for s in args.seeds.split(",")]
    traces = parallel([(trace, (args.task, seed, args.steps, args.every, overrides)) for seed in seeds])
    header = ["step"] + [name for name, _ in COLUMNS]
    for seed, points in zip(seeds, traces):
        print(f"\nslrt on {args.task}, seed {seed}, {args.steps} steps, overrides {overrides or 'none'}")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows(points):
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
