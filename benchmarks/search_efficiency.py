"""Search efficiency (issue 20 item 1): how much of a full grid's compute each searcher and scheduler that the CLI
offers needs to find the grid's best configuration.

    python benchmarks/search_efficiency.py [--method adaptsegnet] [--grid search_efficiency] [--steps 100]
        [--eval-every 10] [--seeds 0,1,2] [--repetitions 3] [--samples 27] [--pbt-population 8] [--out DIR]
        [--plot docs/search_efficiency.png]

Three phases; the first and third train for real and are cached in --out, so a second run only replays:

1. record: every point of the grid once per seed, trained by `python -m platform.sweep METHOD --grid GRID --seeds
   ... --max-steps STEPS --eval-every E` into its own MLflow store, and every trial's learning curve (target
   validation mIoU at each evaluation) read back from MLflow. This is the grid's own cost and the ground truth: a
   configuration's score at full budget is the mean over the seeds of its trials' final mIoU.
2. replay: grid, random search and TPE (`--search random|tpe`), each without and with ASHA (`--scheduler asha`, and
   ASHA's grace period and reduction factor varied), run by Tune with the searchers and schedulers that
   platform/tuning.py builds for a sweep (`param_space`, `searcher` with its SeedReplicas, `scheduler`,
   `num_tune_samples`, two trials at a time as on this machine), over a trainable that replays the recorded curve
   of its (configuration, seed), paced as training would be, and counts the steps it would have trained. The replay
   is exact for these strategies: their search space is the grid's values (RANGES become `choice`s of them), so every
   configuration they can propose has a recorded curve, and a curve does not depend on which other trials ran. Random
   search and TPE start without the defaults-first point (the CLI's rule), so that they get no free start; the grid
   runs its points in a shuffled order per repetition (repetition 0 in the grid's own order).
3. pbt: `--scheduler pbt` changes hyperparameters while trials run, which no recorded curve holds: it trains for
   real (`python -m platform.sweep METHOD --scheduler pbt --num-samples P --seeds R`, one repetition per seed R,
   its population sampled from the search space's RANGES, defaults first). Its result is the best member's final
   model: one seed, selected on target validation, not a configuration re-scored over seeds; it is compared with the
   grid's best single trial as well as with its best mean.

Per strategy, over --repetitions search seeds: the anytime curve (after each trial ends, the configuration the sweep
would name best so far, i.e. the one with the most evaluations and then the best mean observed mIoU over its ended
trials, re-scored at full budget over the seeds) against cumulative training steps, and the compute each needs to
come within the tolerance of the grid's best mean and stay there (a sweep stopped at any later point names a
configuration within the tolerance). The tolerance is the standard error of a difference between two
configurations' means over the seeds, s * sqrt(2 / n_seeds), with s the median over the grid's configurations of the
sample standard deviation over seeds: a configuration closer than that to the best cannot be told from it by the
grid itself.
"""

from __future__ import annotations

import _bootstrap

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Callback

import search_spaces
from platform import config, tasks, tracking, tuning
from platform.loop import PRIMARY_METRIC

DEFAULT_OUT = os.path.join(os.path.expanduser("~"), ".cache", "uda-platform", "search-efficiency")
SLOTS = 2  # trials at a time: what the sweep runs on this 2-core machine (cluster.max_concurrent_trials)


def point_key(point: Mapping[str, Any], seed: int | None = None) -> str:
    """A configuration (and seed) as a stable string key."""
    key = json.dumps({k: float(v) for k, v in sorted(point.items())}, sort_keys=True)
    return key if seed is None else f"{key}|{seed}"


# ---------------------------------------------------------------------------------------------- 1. record


def sweep_command(args: argparse.Namespace, out: str, name: str, extra: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "platform.sweep",
        args.method,
        "--max-steps",
        str(args.steps),
        "--eval-every",
        str(args.eval_every),
        "--tracking-uri",
        f"sqlite:///{out}/mlflow.db",
        "--storage-path",
        f"{out}/ray",
        "--name",
        name,
        *extra,
    ]


def run_sweep(command: list[str], log: str) -> float:
    started = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.run(command, cwd=_bootstrap.ROOT, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(command[2:])} failed (exit {code}); see {log}")
    return time.perf_counter() - started


def children(out: str, method: str, task: str, name: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    tracker = tracking.Tracker(f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name(f"{method}/{task}")
    parent = tracker.find_sweep(experiment.experiment_id, name)
    runs = tracker.children(experiment.experiment_id, parent)
    histories = {r.info.run_id: client.get_metric_history(r.info.run_id, PRIMARY_METRIC) for r in runs}
    return [(run, sorted(histories[run.info.run_id], key=lambda m: (m.timestamp, m.step))) for run in runs]


def record(args: argparse.Namespace, task: str) -> dict[str, Any]:
    out = os.path.join(args.out, "record")
    path = os.path.join(out, "curves.json")
    if os.path.exists(path):
        with open(path) as handle:
            return json.load(handle)
    os.makedirs(out, exist_ok=True)
    print(f"record: training the grid {args.grid} ({args.method}, seeds {args.seeds}, {args.steps} steps)", flush=True)
    command = sweep_command(args, out, "record", ["--grid", args.grid, "--seeds", args.seeds])
    seconds = run_sweep(command, os.path.join(out, "sweep.log"))
    curves = {}
    for run, history in children(out, args.method, task, "record"):
        if run.info.status != "FINISHED":
            raise SystemExit(f"record: trial {run.info.run_name} ended {run.info.status}; see {out}/sweep.log")
        point = json.loads(run.data.tags[tracking.SWEPT_TAG])
        curves[point_key(point, int(run.data.tags["seed"]))] = [[m.step, m.value] for m in history]
    recorded = {"curves": curves, "seconds": seconds, "command": " ".join(command[2:])}
    with open(path, "w") as handle:
        json.dump(recorded, handle)
    return recorded


# ---------------------------------------------------------------------------------------------- ground truth


@dataclass(frozen=True)
class Truth:
    scores: Mapping[str, float]  # configuration → mean over seeds of the final mIoU
    spreads: Mapping[str, float]  # configuration → sample std over seeds
    singles: Mapping[str, float]  # (configuration, seed) → final mIoU
    steps: int  # one trial's full budget
    seeds: int

    @property
    def best(self) -> tuple[str, float]:
        key = max(self.scores, key=self.scores.get)
        return key, self.scores[key]

    @property
    def tolerance(self) -> float:
        return statistics.median(self.spreads.values()) * math.sqrt(2 / self.seeds)

    @property
    def grid_compute(self) -> int:
        return len(self.singles) * self.steps


def ground_truth(curves: Mapping[str, list], seeds: Sequence[int]) -> Truth:
    finals: dict[str, list[float]] = {}
    singles = {}
    for key, curve in curves.items():
        finals.setdefault(key.rsplit("|", 1)[0], []).append(curve[-1][1])
        singles[key] = curve[-1][1]
    steps = max(curve[-1][0] for curve in curves.values())
    return Truth(
        {k: statistics.mean(v) for k, v in finals.items()},
        {k: statistics.stdev(v) for k, v in finals.items()},
        singles,
        steps,
        len(seeds),
    )


# ---------------------------------------------------------------------------------------------- 2. replay


_EVENTS: list[tuple] = []  # the driver's ledger of Tune results and completions (LedgerCallback)


def replay_trial(config_: dict[str, Any], curves: Mapping[str, list], pace: float) -> None:
    """A Tune function trainable that reports its (configuration, seed)'s recorded curve instead of training."""
    from ray import tune

    for step, value in curves[point_key(config_["hp"], int(config_["seed"]))]:
        time.sleep(pace)  # the evaluation's share of training time, so that trials interleave as they would
        tune.report({PRIMARY_METRIC: value, "step": step})


class Ledger(Callback):
    """Driver side: every result and every trial's end, in the order Tune sees them (into `_EVENTS`, a module
    global, so that whatever copy of the callback Tune keeps writes to the same ledger)."""

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        _EVENTS.append(("result", trial.trial_id, trial.config, result["step"], result[PRIMARY_METRIC]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _EVENTS.append(("complete", trial.trial_id, trial.config, None, None))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _EVENTS.append(("error", trial.trial_id, trial.config, None, None))


@dataclass(frozen=True)
class Strategy:
    name: str
    search: str  # grid | random | tpe
    asha: tuple[int, float] | None = None  # (grace period, reduction factor)


@dataclass
class Run:
    strategy: str
    repetition: int
    curve: list[tuple[int, float]] = field(default_factory=list)  # (cumulative steps, re-scored incumbent)
    compute: int = 0
    configurations: int = 0
    final: str = ""

    def to_tolerance(self, threshold: float) -> tuple[int, int] | None:
        """(compute, trials ended) after which the incumbent stays within the tolerance to the end of the run (None:
        never)."""
        reached = None
        for ended, (steps, score) in enumerate(self.curve, start=1):
            if score < threshold:
                reached = None
            elif reached is None:
                reached = steps, ended
        return reached


def replay(
    strategy: Strategy, repetition: int, args: argparse.Namespace, space: Any, curves: Mapping[str, list], truth: Truth
) -> Run:
    from ray import tune

    points = space.grid_points(args.grid)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    choices = {key: ("choice", sorted({p[key] for p in points})) for key in points[0]}
    if strategy.search == "grid":
        order = list(points)
        if repetition:
            random.Random(repetition).shuffle(order)
        sweep = config.Sweep("grid", tuple(order), seeds, 1)
    elif strategy.search == "random":  # without the defaults-first point
        sweep = config.Sweep(
            "random", tuple(config.sample_points(choices, args.samples, repetition)), seeds, args.samples
        )
    else:
        sweep = config.Sweep("tpe", (), seeds, args.samples)
    reports = config.evaluations([truth.steps], args.eval_every)
    scheduler = None
    if strategy.asha is not None:
        grace, factor = strategy.asha
        scheduler = tuning.scheduler("asha", reports, grace_period=grace, reduction_factor=factor)
    _EVENTS.clear()
    with tempfile.TemporaryDirectory(prefix="uda-replay-") as scratch:
        tuner = tune.Tuner(
            tune.with_resources(
                tune.with_parameters(replay_trial, curves=curves, pace=args.pace * args.eval_every), {"cpu": 1}
            ),
            param_space=tuning.param_space(sweep, choices),
            tune_config=tune.TuneConfig(
                metric=PRIMARY_METRIC,
                mode=tuning.MODE,
                num_samples=tuning.num_tune_samples(sweep),
                search_alg=tuning.searcher(sweep, repetition),
                scheduler=scheduler,
                max_concurrent_trials=SLOTS,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(storage_path=scratch, verbose=0, callbacks=[Ledger()]),
        )
        tuner.fit()
    return ledger_run(strategy.name, repetition, list(_EVENTS), truth)


def ledger_run(name: str, repetition: int, events: list[tuple], truth: Truth) -> Run:
    """Cumulative steps and the re-scored incumbent after each trial ends."""
    run = Run(name, repetition)
    last: dict[str, tuple[int, float]] = {}  # trial → (steps reached, latest mIoU)
    ended: dict[str, list[tuple[int, float]]] = {}  # configuration → its ended trials' (steps, final mIoU)
    steps = 0
    for kind, trial_id, trial_config, step, value in events:
        if kind == "error":  # a replay that fails (e.g. a configuration without a recorded curve) voids the table
            raise SystemExit(f"replay {name} #{repetition}: trial {trial_id} ({trial_config}) failed")
        if kind == "result":
            steps += step - last.get(trial_id, (0, 0.0))[0]
            last[trial_id] = (step, value)
            continue
        if trial_id not in last:
            continue
        ended.setdefault(point_key(trial_config["hp"]), []).append(last.pop(trial_id))
        incumbent = max(ended, key=lambda key: incumbent_rank(ended[key]))
        run.curve.append((steps, truth.scores[incumbent]))
        run.final = incumbent
    run.compute, run.configurations = steps, len(ended)
    return run


def incumbent_rank(trials: list[tuple[int, float]]) -> tuple[int, float]:
    """What a sweep names best: the most evaluations first, then the mean mIoU of its trials that got that far."""
    budget = max(steps for steps, _ in trials)
    return budget, statistics.mean(value for steps, value in trials if steps == budget)


# ---------------------------------------------------------------------------------------------- 3. pbt


def pbt(args: argparse.Namespace, task: str, repetition: int) -> dict[str, Any]:
    out = os.path.join(args.out, f"pbt-{args.pbt_population}")
    path = os.path.join(out, f"rep-{repetition}.json")
    if os.path.exists(path):
        with open(path) as handle:
            return json.load(handle)
    os.makedirs(out, exist_ok=True)
    print(f"pbt: repetition {repetition}, a population of {args.pbt_population}, seed {repetition}", flush=True)
    name = f"pbt-{repetition}"
    extra = ["--scheduler", "pbt", "--num-samples", str(args.pbt_population), "--seeds", str(repetition)]
    command = sweep_command(args, out, name, extra)
    seconds = run_sweep(command, os.path.join(out, f"{name}.log"))
    members = []
    for run, history in children(out, args.method, task, name):
        exploits = sorted(k for k in run.data.tags if k.startswith("uda.pbt.exploit."))
        members.append(
            {
                "run": run.info.run_name,
                "status": run.info.status,
                "final": history[-1].value if history else float("nan"),
                "evaluations": len(history),  # each one follows eval_every trained steps (an exploit restores
                # the donor's step and trains on from there)
                "exploits": len(exploits),
            }
        )
    result = {"members": members, "seconds": seconds, "command": " ".join(command[2:])}
    with open(path, "w") as handle:
        json.dump(result, handle)
    return result


# ---------------------------------------------------------------------------------------------- report


def strategies(asha_variants: bool) -> list[Strategy]:
    plain = [Strategy(s, s) for s in ("grid", "random", "tpe")]
    default_asha = (tuning.ASHA_GRACE_PERIOD, tuning.ASHA_REDUCTION_FACTOR)
    asha = [Strategy(f"{s.name}+asha", s.search, default_asha) for s in plain]
    found = plain + asha
    if asha_variants:
        for grace, factor in ((2, 2), (1, 3), (2, 3), (3, 2)):
            if (grace, factor) != (tuning.ASHA_GRACE_PERIOD, tuning.ASHA_REDUCTION_FACTOR):
                found += [Strategy(f"{s}+asha(g{grace},r{factor})", s, (grace, factor)) for s in ("random", "tpe")]
    return found


def summarise(runs: list[Run], truth: Truth, pbt_runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    best_key, best = truth.best
    threshold = best - truth.tolerance
    lines = [
        f"{args.method} on {args.task}, grid {args.grid}: {len(truth.scores)} configurations x {truth.seeds} seeds "
        f"x {truth.steps} steps = {truth.grid_compute} steps of training (the grid's compute)",
        f"grid's best mean: {best:.2f} ({best_key}); median seed std {statistics.median(truth.spreads.values()):.2f}; "
        f"tolerance {truth.tolerance:.2f} (s * sqrt(2/{truth.seeds})), so within tolerance = mIoU >= {threshold:.2f}; "
        f"{sum(v >= threshold for v in truth.scores.values())} of {len(truth.scores)} configurations are",
        "",
        "| strategy | compute to tolerance ÷ grid (median; per repetition) | trials ended by then (per repetition) | "
        "reached | total compute ÷ grid | final pick, re-scored (mean) | configurations tried (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r.strategy for r in runs):
        mine = [r for r in runs if r.strategy == name]
        reached = [r.to_tolerance(threshold) for r in mine]
        fractions = [x[0] / truth.grid_compute if x is not None else math.inf for x in reached]
        per = ", ".join(f"{f:.2f}" if f != math.inf else "never" for f in fractions)
        trials = ", ".join(str(x[1]) if x is not None else "-" for x in reached)
        lines.append(
            f"| {name} | {statistics.median(fractions):.2f} ({per}) | {trials} | "
            f"{sum(x is not None for x in reached)} of "
            f"{len(mine)} | {statistics.mean(r.compute for r in mine) / truth.grid_compute:.2f} | "
            f"{statistics.mean(truth.scores[r.final] for r in mine):.2f} | "
            f"{statistics.mean(r.configurations for r in mine):.1f} |"
        )
    if pbt_runs:
        singles = sorted(truth.singles.values())
        lines += [
            "",
            f"PBT (population {args.pbt_population}, real training, one seed per repetition; the best member's final "
            f"model, selected on target validation): the grid's best single trial is {singles[-1]:.2f}, its median "
            f"trial {statistics.median(singles):.2f}",
            "| repetition | best member's final mIoU | population median | compute ÷ grid | exploits | wall s |",
            "|---|---|---|---|---|---|",
        ]
        for repetition, result in enumerate(pbt_runs):
            finals = [m["final"] for m in result["members"]]
            compute = sum(m["evaluations"] for m in result["members"]) * args.eval_every
            lines.append(
                f"| {repetition} | {max(finals):.2f} | {statistics.median(finals):.2f} | "
                f"{compute / truth.grid_compute:.3f} | {sum(m['exploits'] for m in result['members'])} | "
                f"{result['seconds']:.0f} |"
            )
    return "\n".join(lines)


def plot(runs: list[Run], truth: Truth, pbt_runs: list[dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = truth.best[1]
    figure, axis = plt.subplots(figsize=(9, 5.5))
    shown = [s.name for s in strategies(False)]
    colours = dict(zip(shown, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    xs = [10 ** (-2.5 + 2.5 * i / 200) for i in range(201)]  # log-spaced, 0.003 to 1
    for name in shown:
        mine = [r for r in runs if r.strategy == name]
        if not mine:
            continue
        ys = []
        for x in xs:
            values = [
                _at(r.curve, x * truth.grid_compute) if x * truth.grid_compute <= r.compute else None for r in mine
            ]
            values = [v for v in values if v is not None]
            ys.append(statistics.mean(values) if len(values) == len(mine) else math.nan)
        style = "--" if "asha" in name else "-"
        axis.plot(xs, ys, style, color=colours[name], label=f"{name} (mean of {len(mine)})")
        for r in mine:
            axis.step(
                [s / truth.grid_compute for s, _ in r.curve],
                [v for _, v in r.curve],
                style,
                where="post",
                color=colours[name],
                alpha=0.2,
                linewidth=0.8,
            )
    for result in pbt_runs:
        compute = sum(m["evaluations"] for m in result["members"]) * args.eval_every / truth.grid_compute
        axis.plot([compute], [max(m["final"] for m in result["members"])], "k^")
    if pbt_runs:
        axis.plot([], [], "k^", label="PBT: best member's own final mIoU (1 seed, not re-scored)")
    axis.axhline(best, color="grey", linewidth=0.8)
    axis.axhspan(best - truth.tolerance, best, color="grey", alpha=0.15, label="grid's best mean - tolerance")
    axis.set_xlabel("cumulative training steps ÷ the full grid's (log scale)")
    axis.set_ylabel("incumbent's target mIoU, re-scored at full budget (mean over seeds)")
    axis.set_title(f"{args.method} on {args.task}: grid {args.grid}, {truth.steps} steps per trial")
    axis.set_xscale("log")
    axis.set_xlim(10**-2.5, 1.05)
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)


def _at(curve: list[tuple[int, float]], steps: float) -> float | None:
    value = None
    for at, score in curve:
        if at > steps:
            break
        value = score
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="adaptsegnet")
    parser.add_argument("--grid", default="search_efficiency")
    parser.add_argument("--steps", type=int, default=100, help="each trial's budget (--max-steps)")
    parser.add_argument("--eval-every", type=int, default=10, help="evaluations = ASHA's rungs and PBT's intervals")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--repetitions", type=int, default=3, help="search seeds per strategy")
    parser.add_argument("--samples", type=int, default=27, help="random/TPE configurations (--num-samples)")
    parser.add_argument("--pbt-population", type=int, default=8, help="0: no PBT runs")
    parser.add_argument("--pace", type=float, default=0.005, help="replay seconds per recorded training step")
    parser.add_argument("--asha-variants", action="store_true", help="also grace periods 2-3, reduction factor 3")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where the recorded and PBT runs are cached")
    parser.add_argument("--plot", default=os.path.join(_bootstrap.ROOT, "docs", "search_efficiency.png"))
    parser.add_argument("--replot", action="store_true", help="summary and plot from --out's results.json only")
    args = parser.parse_args(argv)
    space = search_spaces.load(args.method)
    args.task = space.default_task
    tasks.prepare(tasks.get(args.task), tasks.default_data_root())
    recorded = record(args, args.task)
    truth = ground_truth(recorded["curves"], args.seeds.split(","))
    if args.replot:
        with open(os.path.join(args.out, "results.json")) as handle:
            saved = json.load(handle)
        runs = [Run(**{**r, "curve": [tuple(point) for point in r["curve"]]}) for r in saved["runs"]]
        print(summarise(runs, truth, saved["pbt"], args))
        plot(runs, truth, saved["pbt"], args, args.plot)
        return
    print(f"recorded: {len(recorded['curves'])} trials in {recorded['seconds'] / 60:.1f} min", flush=True)
    pbt_runs = [pbt(args, args.task, r) for r in range(args.repetitions)] if args.pbt_population else []

    import ray

    from platform import cluster

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's console boxes off, as in the sweep (platform/cli.py)
    cluster.connect(None)
    runs = []
    started = time.perf_counter()
    for strategy in strategies(args.asha_variants):
        for repetition in range(args.repetitions):
            runs.append(replay(strategy, repetition, args, space, recorded["curves"], truth))
            print(
                f"replay {strategy.name} #{repetition}: {runs[-1].compute / truth.grid_compute:.2f} of the grid's "
                f"compute, {runs[-1].configurations} configurations, pick {truth.scores[runs[-1].final]:.2f}",
                flush=True,
            )
    ray.shutdown()
    print(f"replays took {(time.perf_counter() - started) / 60:.1f} min\n")
    print(summarise(runs, truth, pbt_runs, args))
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump({"runs": [r.__dict__ for r in runs], "pbt": pbt_runs, "scores": truth.scores}, handle, indent=1)
    plot(runs, truth, pbt_runs, args, args.plot)
    print(f"\nanytime plot: {args.plot}; raw results: {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
