"""What a sweep of many short trials spends outside training: per-trial fixed cost and slot utilisation, with Tune's
trial processes reused (the default for inline trials) and with a fresh process per trial, side by side in one run.

    python benchmarks/trial_starts.py [--trials 12] [--steps 20] [--repeats 1]

Each variant runs `python -m platform.sweep source_only --num-samples N --max-steps S --eval-every S` on
synthetic-urban in a scratch directory with its own MLflow store, on this machine's local cluster (two slots on two
cores). From the MLflow store: each trial's loop time (`time/elapsed_s`, the training loop in its process) and the
sweep's wall time, from the first trial run's start to the last one's end.

- slot utilisation = Σ loop time ÷ (sweep wall time × slots)
- fixed cost per trial = (sweep wall time × slots − Σ loop time) ÷ trials: everything a trial costs beyond its loop
  (process start, imports, MLflow run creation, Tune scheduling, idle slots), amortised.
Goal (issue 20 item 3): fixed cost under 1 s per trial, utilisation at least 0.9.
"""

from __future__ import annotations

import _bootstrap

import argparse
import os
import subprocess
import sys
import tempfile
import time

from mlflow.tracking import MlflowClient

from platform import tasks


def sweep(trials: int, steps: int, fresh: bool, data_root: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="uda-starts-") as scratch:
        store = f"sqlite:///{scratch}/mlflow.db"
        command = [
            sys.executable,
            "-m",
            "platform.sweep",
            "source_only",
            "--num-samples",
            str(trials),
            "--max-steps",
            str(steps),
            "--eval-every",
            str(steps),
            "--tracking-uri",
            store,
            "--storage-path",
            f"{scratch}/results",
            *(["--fresh-trial-processes"] if fresh else []),
        ]
        env = dict(os.environ, PYTHONPATH=_bootstrap.ROOT, UDA_DATA_ROOT=data_root)
        started = time.perf_counter()
        out = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
        command_s = time.perf_counter() - started
        if out.returncode != 0:
            raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
        client = MlflowClient(store)
        experiment = client.get_experiment_by_name("source_only/synthetic-urban")
        runs = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
        loops = [max(m.value for m in client.get_metric_history(r.info.run_id, "time/elapsed_s")) for r in runs]
        wall = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
        slots = 2
        return {
            "trials": len(runs),
            "wall": wall,
            "loop": sum(loops),
            "command": command_s,
            "utilisation": sum(loops) / (wall * slots),
            "fixed": (wall * slots - sum(loops)) / len(runs),
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="alternations of the two variants")
    args = parser.parse_args(argv)
    data_root = tasks.default_data_root()
    tasks.prepare(tasks.get("synthetic-urban"), data_root)
    print(f"{args.trials} trials of {args.steps} steps of source_only on synthetic-urban, 2 slots")
    print(f"{'variant':28s} {'trials':>6s} {'wall s':>7s} {'Σ loop s':>8s} {'fixed s/trial':>13s} {'utilisation':>11s}")
    for _ in range(args.repeats):
        for label, fresh in (("fresh process per trial", True), ("reused trial processes", False)):
            r = sweep(args.trials, args.steps, fresh, data_root)
            print(
                f"{label:28s} {r['trials']:6d} {r['wall']:7.1f} {r['loop']:8.1f} {r['fixed']:13.2f} "
                f"{r['utilisation']:11.2f}   (whole command {r['command']:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
