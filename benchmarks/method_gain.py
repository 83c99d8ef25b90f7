"""Target mIoU of a method vs `source_only` on a synthetic task, over seeds, plus the method's ablation grid.

    python benchmarks/method_gain.py METHOD [--task synthetic-urban] [--seeds 0,1,2] [--steps 300] [--grid NAME]
                                            [--no-source-only]

Both run with their search spaces' task defaults (same network, batch and learning rate), the same step budget and
seeds, through the platform's training loop in-process (two runs at a time on two cores). Reported: the final
evaluation's target-validation mIoU (not the best one, which would select with target labels), mean ± std; on the
chest X-ray tasks also the Dice averaged over both lungs and the ASD (mm) averaged over both lungs.
`--no-source-only` leaves out the source_only row when the grid holds its own baseline (seuda's T-noDA); the first
row is the one the others are compared with.

    python benchmarks/method_gain.py cscl --grid table1
    python benchmarks/method_gain.py seuda --grid table1 --no-source-only

(Each seuda row trains its own segmenter here; SeUDA's Table 1 protocol, one segmenter per seed tested under every
setting with S-test, is benchmarks/seuda_table1.py.)
"""

from __future__ import annotations

import _bootstrap  # noqa: F401  (must come first: see _bootstrap.py)

import argparse
import statistics
import time

import search_spaces
from common import mean_std, parallel, train_once
from platform import config, tasks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method")
    parser.add_argument("--task", default=None, help="default: the method's default task")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="scale every run to N steps (default: each row's own budget; source_only as the defaults)",
    )
    parser.add_argument("--grid", default=None, help="also run every point of this grid (e.g. the ablation rows)")
    parser.add_argument("--no-source-only", action="store_true", help="no source_only row (the grid has a baseline)")
    args = parser.parse_args(argv)
    space = search_spaces.load(args.method)
    task = args.task or space.default_task
    seeds = [int(s) for s in args.seeds.split(",")]
    data_root = tasks.default_data_root()
    tasks.prepare(tasks.get(task), data_root)
    # the method's rows run at their own budgets (the stages' epochs or steps) unless --steps scales them all;
    # source_only runs as long as the method's defaults (equal budget)
    default_steps = sum(config.trial_steps(config.resolve(args.method, task, max_steps=args.steps), {}, data_root, 1))
    steps = args.steps
    rows = [] if args.no_source_only else [("source_only", "source_only", {})]
    if args.grid:
        rows += [
            (args.method, " ".join(f"{k}={v}" for k, v in point.items()) or f"{args.method} (defaults)", point)
            for point in space.grid_points(args.grid)
        ]
    else:
        rows.append((args.method, f"{args.method} (defaults)", {}))
    started = time.perf_counter()
    jobs = [
        (train_once, (method, task, overrides, seed, default_steps if method == "source_only" else steps, data_root))
        for method, _, overrides in rows
        for seed in seeds
    ]
    results = parallel(jobs)
    metrics = [("mIoU", lambda r: r["val_target/miou"])]
    if tasks.get(task).lung_metrics:
        lungs = [key.rsplit("/", 1)[1] for key in results[0] if key.startswith("val_target/dice/")]
        metrics += [
            ("Dice", lambda r: statistics.mean(r[f"val_target/dice/{lung}"] for lung in lungs)),
            ("ASD mm", lambda r: statistics.mean(r[f"val_target/asd_mm/{lung}"] for lung in lungs)),
        ]
    budget = f"{steps} steps" if steps else f"each row's own budget (the defaults: {default_steps} steps)"
    print(f"{task}, {budget}, seeds {args.seeds}: final target-validation scores, mean ± std [per seed]")
    for name, metric in metrics:
        print(f" {name}:")
        baseline = None
        for index, (_, label, _) in enumerate(rows):
            values = [metric(r) for r in results[index * len(seeds) : (index + 1) * len(seeds)]]
            defined = [v for v in values if v == v] or [float("nan")]
            baseline = baseline if baseline is not None else statistics.mean(defined)
            delta = statistics.mean(defined) - baseline
            print(
                f"  {label:48s} {mean_std(values)}   {delta:+5.1f} vs {rows[0][1]}   "
                f"[{', '.join(f'{v:.1f}' for v in values)}]"
            )
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
