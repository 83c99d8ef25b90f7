"""The sweep driver behind `python -m platform.sweep` and `python -m platform.train`.

Order of work, so that bad input never leaves anything behind:
1. parse and validate everything (config.UsageError → one line, exit code 2): method, task, grid, search,
   hyperparameter overrides and every swept value, seeds, budgets, resources;
2. prepare the task's data (synthetic tasks are generated on first use; a missing real dataset → exit 2);
3. say what will run and roughly how long it takes;
4. connect to Ray, create the MLflow experiment and the sweep's parent run, run Tune;
5. whatever happens (success, failed trials, Ctrl-C), end every child run and the parent run, then summarise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import typing
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from platform import checkpoints, cluster, config, preflight, tasks, tracking
from platform.config import Resolved, Sweep, UsageError
from platform.datasets import DatasetNotFoundError, resolve_root
from platform.loop import PRIMARY_METRIC

# Measured on a 2-CPU machine (README, "Measured results"): fixed cost of one trial beyond its loop (its Tune
# process's start, plus for the train runner Ray Train's controller and worker group), and of starting Ray, MLflow and
# Tune once per command.
TRIAL_OVERHEAD_S = {config.INLINE: 5.0, config.TRAIN: 20.0}
RAY_START_S = 30.0

SWEEP_EXAMPLES = """examples:
  python -m platform.sweep source_only                         # default sweep on the synthetic default task
  python -m platform.sweep source_only --task synthetic-urban --grid lr --seeds 0,1,2
  python -m platform.sweep source_only --search tpe --num-samples 8 --scheduler asha
  python -m platform.sweep source_only --set learning_rate=0.02 --max-steps 100
  ray job submit --working-dir . -- python -m platform.sweep source_only --task synthetic-urban
"""

TRAIN_EXAMPLES = """examples:
  python -m platform.train source_only                         # paper/task defaults, seed 0
  python -m platform.train source_only --task synthetic-cxr --set learning_rate=0.02 --seed 1
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit code 2, like every other bad input
        raise UsageError(f"{message} (see --help)")


def build_parser(single: bool) -> argparse.ArgumentParser:
    prog = "python -m platform.train" if single else "python -m platform.sweep"
    description = (
        "Train one configuration of a method as a Ray Tune trial, tracked in MLflow."
        if single
        else "Sweep a method's hyperparameters with Ray Tune (+ Optuna), tracked in MLflow. A one-worker trial "
        "trains in its Tune trial's process; --workers N > 1 makes each trial a Ray Train run."
    )
    parser = _Parser(
        prog=prog,
        description=description,
        epilog=TRAIN_EXAMPLES if single else SWEEP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("method", help="registered method (see methods/__init__.py)")
    parser.add_argument("--task", help="task name (default: the method's default task, a synthetic one)")
    if single:
        parser.add_argument("--seed", type=int, default=0)
    else:
        parser.add_argument("--grid", help="named grid of search_spaces/<method>.py (Tune grid search)")
        parser.add_argument(
            "--search",
            choices=("random", "tpe"),
            help="sample --num-samples configurations from the search space's RANGES; random "
            "(default) or Optuna TPE; the first configuration is always the defaults",
        )
        parser.add_argument(
            "--num-samples",
            type=int,
            help="--search: configurations to sample (default 2); --grid: repeats of every point (default 1)",
        )
        parser.add_argument(
            "--scheduler",
            choices=("asha", "pbt"),
            help="asha: stop weak trials early; pbt: Population Based Training over the search space's PERTURBABLE "
            "fields (with --search random and --num-samples N, the population; one worker per trial)",
        )
        parser.add_argument("--seeds", default="0", help="comma-separated seeds, an axis of the sweep (default 0)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a Hyperparams field (repeatable)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        help="optimiser steps per trial: every stage scaled proportionally to N in all (default: the stages' own "
        "budgets, the paper's epochs or steps; for methods with share budgets, the search space's MAX_STEPS)",
    )
    parser.add_argument("--eval-every", type=int, help="evaluate on target val every N steps (default: a fifth)")
    parser.add_argument(
        "--source-val",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="hold out this fraction of the source training images (chosen by a hash of each sample id: the same "
        "images in every trial) from training and score them at every evaluation as val_source/*, for the "
        "report's source-val model selection (default 0: off)",
    )
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial (data parallel)")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument(
        "--sync-batchnorm",
        action="store_true",
        help="batch-norm statistics over all workers of a trial (GPU workers only)",
    )
    parser.add_argument("--max-failures", type=int, default=0, help="retries of a trial from its latest checkpoint")
    parser.add_argument(
        "--trial-runner",
        choices=config.RUNNERS,
        default="auto",
        help="how a trial trains: train = a Ray Train worker group (TorchTrainer); inline = in the "
        "Tune trial's own process (one worker, ~12 s less per trial); auto (default) = inline "
        "for --workers 1, else train",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="fp32 (default, the papers' setting), or mixed precision through torch.autocast: bf16, or fp16 with a "
        "gradient scaler (GPU clusters); GAN, KL and threshold terms stay in float32",
    )
    parser.add_argument(
        "--fresh-trial-processes",
        action="store_true",
        help="start a new Tune process for every inline trial instead of reusing finished trials' processes "
        "(what the platform did before; for benchmarks/trial_starts.py)",
    )
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start a local one)")
    parser.add_argument("--storage-path", help=f"Ray results and checkpoints (default {config.DEFAULT_STORAGE})")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db)"
    )
    parser.add_argument("--experiment", help="MLflow experiment (default: METHOD/TASK)")
    parser.add_argument(
        "--data-root",
        help="prepared datasets: a directory or a URI such as s3://bucket/data "
        "(default: $UDA_DATA_ROOT, else ~/.cache/uda-platform/data)",
    )
    parser.add_argument("--name", help="sweep name (default: METHOD-TASK-MODE-TIMESTAMP); reuse it with --resume")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep --name (or the latest sweep of "
        "this method and task) without rerunning finished trials",
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: run the sweep's failed trials again from scratch (e.g. after a fix)",
    )
    return parser


@dataclass(frozen=True)
class Plan:
    resolved: Resolved
    sweep: Sweep
    args: argparse.Namespace
    data_root: str
    storage_path: str
    tracking_uri: str
    experiment: str
    name: str
    scheduler: str | None = None

    @property
    def runner(self) -> str:
        """ "inline" or "train" (platform.tuning); sweeps saved before --trial-runner existed ran through Ray Train."""
        return config.trial_runner(getattr(self.args, "trial_runner", config.TRAIN), self.args.workers)


def make_plan(args: argparse.Namespace, single: bool) -> Plan:
    method, _, _ = config.method_and_task(args.method, args.task)  # first, for the error order users expect
    overrides = config.parse_overrides(method, args.overrides)
    resolved = config.resolve(
        args.method, args.task, overrides, args.max_steps, args.eval_every, getattr(args, "source_val", 0.0)
    )
    for flag, value, minimum in (
        ("--workers", args.workers, 1),
        ("--cpus-per-worker", args.cpus_per_worker, 1),
        ("--max-failures", args.max_failures, -1),
    ):
        if value < minimum:
            raise UsageError(f"{flag} must be >= {minimum} (got {value})")
    if getattr(args, "trial_runner", "auto") == "inline" and args.workers > 1:
        raise UsageError(
            f"--trial-runner inline trains in one process: use --workers 1, or --trial-runner train "
            f"(or auto) for {args.workers} workers"
        )
    if args.gpus_per_worker < 0:
        raise UsageError(f"--gpus-per-worker must be >= 0 (got {args.gpus_per_worker})")
    if args.sync_batchnorm and args.gpus_per_worker <= 0:
        raise UsageError(
            "--sync-batchnorm needs GPU workers (torch's SyncBatchNorm is CUDA-only): add "
            "--gpus-per-worker 1, or drop it (CPU workers then normalise with their own batch)"
        )
    if single:
        sweep = Sweep("grid", ({},), (args.seed,), 1)
    else:
        seeds = config.parse_seeds(args.seeds)
        sweep = config.plan_sweep(
            resolved, args.grid, args.search, args.num_samples, seeds, list(overrides), sampling_seed=seeds[0]
        )
        if args.scheduler == "pbt":
            config.check_pbt(resolved, sweep, config.trial_runner(getattr(args, "trial_runner", "auto"), args.workers))
    mode = "train" if single else (f"grid-{sweep.grid_name}" if sweep.mode == "grid" else sweep.mode)
    storage = _storage(args)
    name = args.name or (
        None if args.resume else f"{resolved.method.name}-{resolved.task.name}-{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if getattr(args, "retry_failed", False) and not args.resume:
        raise UsageError("--retry-failed applies to --resume only: add --resume (and --name of the sweep)")
    if args.resume and args.name and "://" not in storage and not os.path.isdir(os.path.join(storage, args.name)):
        raise UsageError(f"--resume: no sweep named {args.name!r} under {storage} (check --name and --storage-path)")
    if args.resume and name is None:
        name = _latest_sweep(storage, f"{resolved.method.name}-{resolved.task.name}-")
    return Plan(
        resolved=resolved,
        sweep=sweep,
        args=args,
        data_root=resolve_root(args.data_root or tasks.default_data_root()),
        storage_path=storage,
        tracking_uri=args.tracking_uri or tracking.default_tracking_uri(),
        experiment=args.experiment or f"{resolved.method.name}/{resolved.task.name}",
        name=name,
        scheduler=None if single else args.scheduler,
    )


def _latest_sweep(storage: str, prefix: str) -> str:
    candidates = [d for d in (os.listdir(storage) if os.path.isdir(storage) else []) if d.startswith(prefix)]
    if not candidates:
        raise UsageError(f"--resume: no sweep starting with {prefix!r} under {storage}; pass --name NAME")
    return max(candidates, key=lambda d: os.path.getmtime(os.path.join(storage, d)))


# ---------------------------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class Costs:
    step_s: float  # one optimiser step of the first stage
    eval_s: float  # one evaluation of the target validation split


def probe_costs(plan: Plan, stage_steps: Sequence[int]) -> Costs | None:
    """Time a few optimiser steps of every stage (each name once) and one evaluation batch in this process, on random
    tensors of the task's size, through the loop's own stage set-up (`loop.enter_stage`); `step_s` is the mean over
    the trial's steps (`stage_steps`: the first configuration's budget).

    None for GPU trials or real datasets, where a CPU probe here would be meaningless or slow."""
    resolved = plan.resolved
    if plan.args.gpus_per_worker > 0 or not resolved.task.synthetic:
        return None
    import torch

    from platform import loop
    from platform.datasets import read_manifest

    spec = loop.TrialSpec(
        method=resolved.method.name,
        task=resolved.task.name,
        hyperparams={**resolved.base, **plan.sweep.points[0]},
        seed=0,
        max_steps=resolved.max_steps,
        eval_every=resolved.eval_every,
        data_root=plan.data_root,
        source_val=resolved.source_val,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(plan.args.cpus_per_worker)
    try:
        trial = loop.open_trial(spec, torch.device("cpu"))
        height, width = read_manifest(plan.data_root, resolved.task.source_train.dataset).splits["train"].image_sizes[0]
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(trial.hp.batch_size, trial.info.in_channels, height, width, generator=generator)
        labels = torch.randint(0, trial.info.num_classes, (trial.hp.batch_size, height, width), generator=generator)
        optimisers, state, seconds = loop.Optimisers(trial), trial.method.init_state(trial.hp, trial.info), {}
        for index, stage in enumerate(trial.stages):
            if stage.name not in seconds:
                seconds[stage.name] = _time_stage(trial, index, optimisers, state, images, labels)
        step_s = sum(seconds[s.name] * n for s, n in zip(trial.stages, stage_steps)) / max(1, sum(stage_steps))
        val_count = read_manifest(plan.data_root, resolved.task.target_val.dataset).splits["val"].count
        val_count += len(trial.source_holdout)  # --source-val: scored at every evaluation as well
        eval_images = torch.rand(16, trial.info.in_channels, height, width, generator=generator)
        started = time.perf_counter()
        with loop.all_eval(trial.modules):
            trial.method.predict(trial.hp, trial.modules, eval_images, trial.positions[-1])
        eval_s = (time.perf_counter() - started) * math.ceil(val_count / 16) * 1.3  # + decoding and the matrix
        return Costs(step_s=step_s, eval_s=eval_s)
    except Exception:  # an estimate must never stop a sweep; the trial will report the real error
        return None
    finally:
        torch.set_num_threads(threads)


def _time_stage(trial: Any, index: int, optimisers: Any, state: dict, images: Any, labels: Any) -> float:
    """Seconds per step of stage `index` (the mean of two steps after a first one) on a random batch."""
    import torch

    from methods.contract import Batch
    from platform import loop

    entered = loop.enter_stage(trial, index, optimisers, state, torch.Generator().manual_seed(0))
    loop.start_stage(entered)
    stage, ctx, info = entered.stage, entered.ctx, trial.info
    if stage.target_pass is not None:  # the state a pass over the target set would leave (e.g. thresholds)
        with loop.all_eval(trial.modules):
            out = stage.target_pass.collect(ctx, images, None)
            gathered = {k: v for k, v in out.items() if k not in stage.target_pass.store}
            if stage.target_pass.update is not None:
                ctx.state.update(stage.target_pass.update(ctx, gathered))
        loop.set_modes(trial.modules, stage)
    image_labels = torch.ones(len(images), info.num_classes)
    batch = Batch(
        source_image=images,
        source_label=labels,
        target_image=images.clone() if stage.uses_target else None,
        target_image_label=image_labels if info.target_image_labels and stage.uses_target else None,
        source_image_label=image_labels if info.source_image_labels else None,
    )
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        stage.step(ctx, batch)
        timings.append(time.perf_counter() - started)
    return sum(timings[1:]) / 2


# Measured here: two 1-thread trials side by side on 2 cores each step about 1.6x slower than one alone.
CONTENTION = 1.6


def describe(plan: Plan, costs: Costs | None, concurrency: int, stage_steps: Sequence[int]) -> str:
    sweep, resolved = plan.sweep, plan.resolved
    if sweep.mode == "tpe":
        what = f"TPE over {', '.join(resolved.space.ranges)} ({sweep.num_samples} configurations, defaults first)"
    elif sweep.grid_name:
        keys = sweep.swept_keys
        what = f"grid {sweep.grid_name!r} ({len(sweep.points)} points over {', '.join(keys) or 'nothing'})"
    elif len(sweep.points) == 1 and not sweep.points[0]:
        what = "one configuration"
    else:
        what = (
            f"random search over {', '.join(resolved.space.ranges)} ({len(sweep.points)} configurations, "
            "defaults first)"
        )
    total = sum(stage_steps)
    every = resolved.eval_every or max(1, total // 5)
    lines = [
        f"{resolved.method.name} on {resolved.task.name}: {what} × seeds {list(sweep.seeds)} = "
        f"{sweep.num_trials} trial(s) of {total} steps, evaluated every {every} steps and at each stage's end",
        f"  {plan.args.workers} worker(s) per trial ({RUNNER_WORDS[plan.runner]}), {concurrency} trial(s) at a time",
        f"  stages: {_stage_words(plan, stage_steps)}",
    ]
    if resolved.source_val:
        held = len(tasks.source_validation_rows(resolved.task, plan.data_root, resolved.source_val))
        lines.append(
            f"  source validation: {held} source training images held out (--source-val {resolved.source_val:g}), "
            "scored at every evaluation as val_source/*"
        )
    if costs is not None:
        at_once = min(concurrency, sweep.num_trials)
        busy = at_once * plan.args.workers * plan.args.cpus_per_worker >= (os.cpu_count() or 1)
        slowdown = CONTENTION if at_once > 1 and busy else 1.0
        evaluations = config.evaluations(stage_steps, resolved.eval_every)
        overhead = TRIAL_OVERHEAD_S[plan.runner]
        per_trial = overhead + (total * costs.step_s + evaluations * costs.eval_s) * slowdown
        total = RAY_START_S + math.ceil(sweep.num_trials / concurrency) * per_trial
        lines.append(
            f"  expected duration: about {_minutes(total)} ({costs.step_s:.2f} s/step and "
            f"{costs.eval_s:.1f} s/evaluation measured here, ~{overhead:.0f} s fixed cost per trial)"
        )
    else:
        lines.append("  expected duration: not estimated here (GPU trials or real data; see benchmarks/)")
    lines.append(f"  sweep {plan.name}; results in {plan.storage_path}; tracking {plan.tracking_uri}")
    return "\n".join(lines)


def _stage_words(plan: Plan, stage_steps: Sequence[int]) -> str:
    """ "segmenter 300 + translate 300 (the first configuration; --max-steps 20 scaled them from 600)"."""
    from platform import budgets

    resolved = plan.resolved
    hp = config.check_hyperparams(resolved.method, {**resolved.base, **plan.sweep.points[0]})
    stages = resolved.method.stages(hp)
    text = budgets.describe(stages, stage_steps)
    if resolved.max_steps is not None and not budgets.uses_shares(stages):
        full = config.trial_steps(
            dataclasses.replace(resolved, max_steps=None), plan.sweep.points[0], plan.data_root, plan.args.workers
        )
        text += f" (--max-steps {resolved.max_steps} scaled every stage from the full {sum(full)} steps)"
    return text + (" for the first configuration" if len(plan.sweep.points) > 1 else "")


RUNNER_WORDS = {config.INLINE: "inline: trained in the Tune trial's process", config.TRAIN: "a Ray Train worker group"}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


# ---------------------------------------------------------------------------------------------- run


# What a resumed sweep may change: where it runs and logs, and whether failed trials run again. Everything else is
# the sweep's own (saved next to Tune's state when it starts) so that resumed trials continue as they began.
RESUME_MAY_CHANGE = ("resume", "retry_failed", "name", "storage_path", "tracking_uri", "address")
SAVED_ARGS = "uda-sweep-args.json"


def _storage(args: argparse.Namespace) -> str:
    storage = args.storage_path or config.DEFAULT_STORAGE
    return storage if "://" in storage else os.path.abspath(os.path.expanduser(storage))


def _sweep_file(storage: str, name: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if "://" in storage:
        filesystem, root = pafs.FileSystem.from_uri(storage)
    else:
        filesystem, root = pafs.LocalFileSystem(), storage
    return filesystem, f"{root}/{name}/{SAVED_ARGS}"


def save_sweep_args(args: argparse.Namespace, storage: str, name: str) -> None:
    filesystem, path = _sweep_file(storage, name)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(json.dumps(vars(args), indent=2, default=str).encode())


def resume_args(args: argparse.Namespace, single: bool) -> argparse.Namespace:
    """The arguments a sweep started with, plus what a resume may change; a conflicting setting is an error."""
    import pyarrow.fs as pafs

    storage = _storage(args)
    resolved = config.resolve(args.method, args.task)
    name = args.name or _latest_sweep(storage, f"{resolved.method.name}-{resolved.task.name}-")
    filesystem, path = _sweep_file(storage, name)
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return args  # a sweep started before its settings were saved: the command line is all there is
    with filesystem.open_input_stream(path) as stream:
        saved = json.loads(stream.read().decode())
    defaults = vars(build_parser(single).parse_args([args.method]))
    given = vars(args)
    if given.get("task") and config.resolve(saved["method"], saved.get("task")).task.name == resolved.task.name:
        given = {**given, "task": saved.get("task")}  # --task naming the sweep's default task is no change
    changed = [
        key
        for key, value in given.items()
        if key not in RESUME_MAY_CHANGE and value != defaults.get(key) and value != saved.get(key)
    ]
    if changed:
        shown = ", ".join(f"--{k.replace('_', '-')} {given[k]!r} (the sweep has {saved.get(k)!r})" for k in changed)
        raise UsageError(
            f"--resume continues sweep {name!r} with the settings it started with; drop {shown}, or start a new sweep"
        )
    merged = {**saved, **{key: given[key] for key in RESUME_MAY_CHANGE if key in given}}
    merged["name"] = name
    return argparse.Namespace(**merged)


def main(argv: Sequence[str] | None = None, single: bool = False) -> int:
    try:
        args = build_parser(single).parse_args(argv)
        if args.resume:
            args = resume_args(args, single)
        plan = make_plan(args, single)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    resolved = plan.resolved
    try:
        if resolved.task.synthetic:
            print(
                f"Preparing {resolved.task.name} data under {plan.data_root} (generated on first use, then cached)",
                flush=True,
            )
        fingerprints = tasks.prepare(resolved.task, plan.data_root)
        steps = [config.trial_steps(resolved, point, plan.data_root, plan.args.workers) for point in plan.sweep.points]
    except (DatasetNotFoundError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    address = plan.args.address or os.environ.get("RAY_ADDRESS") or None
    try:  # before Ray starts: nothing is left behind when one fails
        preflight.check_decoded_cache()
        preflight.check_tracking(plan.tracking_uri)
        preflight.check_storage(plan.storage_path)
        preflight.check_address(address)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # The cost probe (a few training steps) runs while Ray starts (seconds spent mostly waiting for its processes).
    # The tracking store is not opened until the trial is known to fit the cluster: a new SQLite store would be
    # created (and MLflow would print its set-up) for a command that then exits 2.
    with ThreadPoolExecutor(1, thread_name_prefix="uda-startup") as startup:
        probing = startup.submit(probe_costs, plan, steps[0])
        cluster.connect(plan.args.address)
        costs = probing.result()
    request = preflight.trial_request(
        plan.runner == config.INLINE,
        plan.args.workers,
        plan.args.cpus_per_worker,
        plan.args.gpus_per_worker,
        cluster.TRIAL_DRIVER_CPUS,
    )
    try:
        preflight.check_placement(request, cluster.node_resources, may_grow=address is not None or cluster.in_ray_job())
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        cluster.disconnect()
        return 2
    available = cluster.resources()
    concurrency = cluster.max_concurrent_trials(
        available, plan.args.workers, plan.args.cpus_per_worker, plan.args.gpus_per_worker
    )
    print(describe(plan, costs, concurrency, steps[0]), flush=True)
    reports = max(config.evaluations(point_steps, resolved.eval_every) for point_steps in steps)
    return run_sweep(plan, fingerprints, concurrency, reports)


def run_sweep(plan: Plan, fingerprints: dict[str, str], concurrency: int, reports: int) -> int:
    """`reports`: the most evaluations a trial of this sweep makes (ASHA's horizon)."""
    from ray import tune

    from platform import tuning

    resolved, sweep = plan.resolved, plan.sweep
    tracker = tracking.Tracker(plan.tracking_uri)
    experiment_id = tracker.experiment(plan.experiment, _experiment_description(plan))
    code = tracking.code_version(cluster.REPOSITORY_ROOT)
    parent = tracker.find_sweep(experiment_id, plan.name) if plan.args.resume else None
    if parent is None:
        parent = tracker.start_sweep(
            experiment_id,
            plan.name,
            params=_sweep_params(plan),
            tags={
                "method": resolved.method.name,
                "task": resolved.task.name,
                "code_version": code,
                tracking.NOTE_TAG: f"Sweep running: {describe_sweep(plan)}. Its report replaces this note when it ends.",
            },
            artifacts={"sweep.json": json.dumps(_sweep_definition(plan), indent=2, default=str)},
        )
        # the experiment's datasets, once, before trials add their inputs at the same time
        tracker.log_datasets(parent, fingerprints, plan.data_root, tuning.dataset_contexts(resolved.task.name))
    else:
        tracker.client.update_run(parent, status="RUNNING")
        if plan.args.retry_failed:  # Tune runs them again as new trials (new ids, new MLflow runs)
            for run in tracker.children(experiment_id, parent):
                if run.info.status == "FAILED":
                    tracker.client.set_tag(run.info.run_id, tracking.RETRIED_TAG, "run again by --retry-failed")
    template = tuning.TrialTemplate(
        method=resolved.method.name,
        task=resolved.task.name,
        base=dict(resolved.base),
        max_steps=resolved.max_steps,
        eval_every=resolved.eval_every,
        data_root=plan.data_root,
        storage_path=os.path.join(plan.storage_path, plan.name, "train"),
        store_root=os.path.join(plan.storage_path, plan.name, "stores"),
        sweep_name=plan.name,
        workers=plan.args.workers,
        cpus_per_worker=plan.args.cpus_per_worker,
        gpus_per_worker=plan.args.gpus_per_worker,
        max_failures=plan.args.max_failures,
        sync_batchnorm=plan.args.sync_batchnorm,
        runner=plan.runner,
        tracking_uri=plan.tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent,
        code_version=code,
        fingerprints=fingerprints,
        defaults=config.hyperparams_dict(resolved.method, resolved.base),
        slots=_slot_keeper(plan, concurrency) if plan.args.resume else "",
        tracked=resolved.space.perturbable if plan.scheduler == "pbt" else (),
        precision=getattr(plan.args, "precision", "fp32"),
        checkpoints_kept=_checkpoints_kept(plan),
        source_val=resolved.source_val,
    )
    inline = plan.runner == config.INLINE
    trainable = tune.with_resources(
        tune.with_parameters(tuning.run_trial, template=template),
        cluster.trial_resources(inline, plan.args.workers, plan.args.cpus_per_worker, plan.args.gpus_per_worker),
    )
    experiment_path = os.path.join(plan.storage_path, plan.name)
    # Ctrl-C must reach this driver as KeyboardInterrupt: Tune's own SIGINT handler ends fit() normally and returns
    # results that look finished. Tune saves its experiment state periodically, so --resume still works.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # Tune's console (status tables with cut-off configs, a TensorBoard hint) gives way to our progress lines: the
    # legacy output engine at verbosity 0 prints nothing (the new one still prints its start and end blocks)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    status, results = "FAILED", None
    try:  # from here on, whatever fails, the parent run ends (never left RUNNING)
        if not plan.args.resume:
            save_sweep_args(plan.args, plan.storage_path, plan.name)
        if plan.args.resume and tune.Tuner.can_restore(experiment_path):
            tuner = tune.Tuner.restore(
                experiment_path,
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=False,
                restart_errored=plan.args.retry_failed,
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=tuning.param_space(sweep, resolved.space.ranges),
                tune_config=tune.TuneConfig(
                    metric=PRIMARY_METRIC,
                    mode=tuning.MODE,
                    num_samples=tuning.num_tune_samples(sweep),
                    search_alg=tuning.searcher(sweep, sweep.seeds[0]),
                    scheduler=tuning.scheduler(
                        plan.scheduler, reports, resolved.space.ranges, resolved.space.perturbable
                    ),
                    max_concurrent_trials=concurrency,
                    # an inline trial's Tune process trains the next trial too (no fresh interpreter importing torch,
                    # Ray and MLflow per trial); Tune reuses it only once the previous trial's thread has ended
                    # (FunctionTrainable.reset_config waits 2 s, else starts a new process), so a trial stopped by
                    # ASHA mid-step or exploited by PBT never shares a process with a running one
                    reuse_actors=inline and not getattr(plan.args, "fresh_trial_processes", False),
                    trial_dirname_creator=lambda trial: trial.trial_id,
                    trial_name_creator=lambda trial: trial.trial_id,
                ),
                # inline trials checkpoint and retry through Tune; Train trials through their TorchTrainer
                run_config=tune.RunConfig(
                    name=plan.name,
                    storage_path=plan.storage_path,
                    verbose=0,  # our progress lines instead of Tune's tables (platform/progress.py)
                    # PBT restores a trial from another's checkpoint, possibly evaluations later (it waits for a
                    # slot): keep them all; otherwise the latest two
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=_checkpoints_kept(plan)) if inline else None,
                    failure_config=tune.FailureConfig(max_failures=plan.args.max_failures if inline else 0),
                    # saved with the sweep, so that a resumed sweep's trials give their slots back (tuning.py)
                    callbacks=[tuning.SlotRelease(tuning.slot_keeper_name(plan.name)), _progress(plan)],
                ),
            )
        results = tuner.fit()
        status = "FINISHED" if results.num_terminated else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
    finally:
        _reconcile(tracker, experiment_id, parent, results)
        tracker.end(parent, status, None if status == "FINISHED" else _parent_reason(status, results))
    _summarise(plan, tracker, experiment_id, parent, results, status)
    if status == "KILLED":
        return 130
    return 0 if results is not None and results.num_terminated else 1


_KEEPERS: list = []  # a named actor lives as long as a handle to it: the driver keeps its keepers'


def _slot_keeper(plan: Plan, concurrency: int) -> str:
    """A resumed sweep caps its running trials itself (tuning.SlotKeeper): Tune does not for restored trials."""
    from platform import tuning

    name = tuning.slot_keeper_name(plan.name)
    _KEEPERS.append(
        tuning.SlotKeeper.options(name=name, namespace=tuning.SLOTS_NAMESPACE, get_if_exists=True).remote(concurrency)
    )
    return name


def _reconcile(tracker: tracking.Tracker, experiment_id: str, parent: str, results: Any) -> None:
    """No child run may stay RUNNING: a trial that Tune ended without its function ending the run (ASHA stops it,
    its driver died, the sweep was interrupted) gets its terminal state here."""
    outcome: dict[str, tuple[str, str | None]] = {}
    for result in results or []:
        trial_id = os.path.basename(str(result.path)) if result.path else None
        if trial_id is None:
            continue
        if result.error is not None:
            outcome[trial_id] = ("FAILED", str(result.error).strip().splitlines()[-1][:1000])
        else:
            outcome[trial_id] = ("FINISHED", None)
    for run in tracker.children(experiment_id, parent):
        if run.info.status in tracking.TERMINAL:
            continue
        trial_id = run.data.tags.get(tracking.TRIAL_TAG)
        status, reason = outcome.get(trial_id, ("KILLED", "the sweep stopped before this trial finished"))
        if status == "FINISHED":
            tracker.client.set_tag(run.info.run_id, "uda.stopped_early", "scheduler")
        tracker.end(run.info.run_id, status, reason)


def _parent_reason(status: str, results: Any) -> str:
    if status == "KILLED":
        return "interrupted; continue with --resume --name <this sweep>"
    errors = len(results.errors) if results is not None else 0
    return f"no trial finished ({errors} failed)"


def _checkpoints_kept(plan: Plan) -> int | None:
    """Checkpoints kept per trial: the latest two (resume, retries), every one under PBT (an exploit may take any)."""
    return None if plan.scheduler == "pbt" else checkpoints.KEPT


def _sweep_settings(plan: Plan) -> dict[str, Any]:
    sweep = plan.sweep
    return {
        "method": plan.resolved.method.name,
        "task": plan.resolved.task.name,
        "mode": sweep.mode,
        "grid": sweep.grid_name or "",
        "num_trials": sweep.num_trials,
        "seeds": ",".join(map(str, sweep.seeds)),
        "max_steps": plan.resolved.max_steps if plan.resolved.max_steps is not None else "",
        "eval_every": plan.resolved.eval_every or "",
        "workers": plan.args.workers,
        "scheduler": plan.scheduler or "",
        "source_val": plan.resolved.source_val,
        "overrides": json.dumps(dict(plan.resolved.base), default=str),
    }


def _sweep_params(plan: Plan) -> dict[str, Any]:
    """The parent run's params: the sweep's own settings as `sweep.<setting>`, apart from the method's
    hyperparameters, which keep their Hyperparams field names: every field the sweep holds fixed, at the value
    its trials use (the swept ones are set at the end to the best trial's values)."""
    swept = set(plan.sweep.swept_keys if plan.sweep.mode != "tpe" else plan.resolved.space.ranges)
    fixed = config.hyperparams_dict(plan.resolved.method, plan.resolved.base)
    return {
        **{f"sweep.{key}": value for key, value in _sweep_settings(plan).items()},
        **{key: value for key, value in fixed.items() if key not in swept},
    }


def _sweep_definition(plan: Plan) -> dict[str, Any]:
    return {
        **_sweep_settings(plan),
        "points": list(plan.sweep.points),
        "ranges": dict(plan.resolved.space.ranges),
        "num_samples": plan.sweep.num_samples,
        "argv": sys.argv,
        "data_root": plan.data_root,
        "storage_path": plan.storage_path,
    }


def describe_sweep(plan: Plan) -> str:
    sweep = plan.sweep
    what = f"grid {sweep.grid_name}" if sweep.grid_name else f"{sweep.mode} search"
    return (
        f"{plan.resolved.method.name} on {plan.resolved.task.name}, {what}, {sweep.num_trials} trial(s), "
        f"seeds {','.join(map(str, sweep.seeds))}"
    )


def _experiment_description(plan: Plan) -> str:
    method, task = plan.resolved.method, plan.resolved.task
    return (
        f"**{method.name}** on **{task.name}** ({task.description}). Paper: {method.paper}.\n\n"
        "One parent run per sweep (`python -m platform.sweep`): its description is the sweep's report (mean ± std "
        "over seeds per configuration, the paper's numbers, the selection rules), its artifacts the report in "
        "Markdown, HTML, CSV and JSON with plots, its metrics the best trial's. One child run per trial, named by its "
        "swept values and seed; the defaults trial is tagged `uda.defaults=true`. Tables from the command line: "
        "`python -m platform.report SWEEP`."
    )


def _progress(plan: Plan) -> Any:
    from platform.progress import ProgressLines, point_key

    resolved = plan.resolved
    points = plan.sweep.points if plan.sweep.mode != "tpe" else plan.sweep.points[:1]
    totals = {}
    for point in points:
        try:
            totals[point_key(point)] = sum(config.trial_steps(resolved, point, plan.data_root, plan.args.workers))
        except Exception:  # a length that cannot be worked out here only leaves the "/total" off the lines
            pass
    defaults = config.hyperparams_dict(resolved.method, resolved.base)
    return ProgressLines(totals, defaults, plan.sweep.num_trials)


def _summarise(
    plan: Plan, tracker: tracking.Tracker, experiment_id: str, parent: str, results: Any, status: str
) -> None:
    runs = [r for r in tracker.children(experiment_id, parent) if tracking.RETRIED_TAG not in r.data.tags]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    failed = [r for r in runs if r.info.status == "FAILED"]
    print(
        f"\nSweep {plan.name}: {status}. {len(finished)} trial(s) finished, {len(failed)} failed, "
        f"{len(runs) - len(finished) - len(failed)} killed."
    )
    for run in failed:
        print(f"  failed: {run.info.run_name}: {run.data.tags.get(tracking.REASON_TAG, '')}")
    scored = [r for r in finished if "val_target/best_miou" in r.data.metrics]
    if scored:
        best = max(scored, key=lambda r: r.data.metrics["val_target/best_miou"])
        swept = plan.sweep.swept_keys if plan.sweep.mode != "tpe" else tuple(plan.resolved.space.ranges)
        shown = {k: best.data.params.get(k) for k in (*swept, "seed")}
        artifacts = f"{best.info.artifact_uri}/checkpoints"
        print(f"Best configuration: {' '.join(f'{k}={v}' for k, v in shown.items())}  ({best.info.run_name})")
        print(
            f"  target val mIoU: {best.data.metrics['val_target/best_miou']:.2f} (best evaluation), "
            f"{best.data.metrics.get(PRIMARY_METRIC, float('nan')):.2f} (last)"
        )
        per_class = {k.rsplit("/", 1)[-1]: v for k, v in best.data.metrics.items() if k.startswith("val_target/iou/")}
        if per_class:
            print("  per-class IoU (last): " + ", ".join(f"{k} {v:.1f}" for k, v in per_class.items()))
        for name, unit in (("dice", "%"), ("asd_mm", " mm")):  # lung tasks (chest X-rays)
            values = {
                k.rsplit("/", 1)[-1]: v for k, v in best.data.metrics.items() if k.startswith(f"val_target/{name}/")
            }
            if values:
                print(
                    f"  {name.split('_')[0].upper() if name == 'asd_mm' else 'Dice'} per lung (last): "
                    + ", ".join(f"{k} {v:.2f}{unit}" for k, v in values.items())
                )
        print(f"  checkpoints: {artifacts}/best_val_target_miou.pt (best on target val) and {artifacts}/last.pt")
        print(f"  MLflow run: {best.info.run_id} (sweep run {parent}, experiment {plan.experiment!r})")
    _report_on_parent(plan, tracker, parent, scored, status)
    print(f"View: {tracking.ui_command(plan.tracking_uri)}")
    print(f"  runs table (Model training view): {tracking.ui_link(plan.tracking_uri, experiment_id)}")
    print(f"  this sweep's report: {tracking.ui_link(plan.tracking_uri, experiment_id, parent)}")
    if status == "KILLED":
        print(f"Continue: {plan_resume_command(plan)}")


def _report_on_parent(plan: Plan, tracker: tracking.Tracker, parent: str, scored: list, status: str) -> None:
    """The sweep's report on its parent run (`report.log_to_parent`: description, artifacts, the best trial's
    metrics and tag), its table printed. A report that fails never fails the sweep."""
    from platform import report

    try:
        built = report.log_to_parent(plan.tracking_uri, parent, status)
        brief = report.to_markdown(dataclasses.replace(built, tables=built.tables[:1], plots={}))
        print("\n" + brief.rstrip())
        print(f"Report: python -m platform.report {plan.name} --tracking-uri {plan.tracking_uri}")
    except Exception as error:  # the trials and their runs are what matters; say why the report is missing
        print(f"(the sweep's report could not be made: {type(error).__name__}: {error})")


def exit_command(code: int) -> typing.NoReturn:
    """End `python -m platform.sweep|train` once `main` has returned. When this process started a local Ray cluster
    and MLflow logs synchronously (its default), stop Ray, flush output and logs and leave with `os._exit`: the
    interpreter's own teardown (Ray's core worker, torch) has nothing left to save and took 3-4 s here (measured with
    py-spy after the summary). Otherwise exit normally, so that atexit handlers run: MLflow's asynchronous-logging
    queue is drained by one (MLFLOW_ENABLE_ASYNC_LOGGING), and Tune's removes the sweep's trainable from a cluster
    that outlives the command (--address, RAY_ADDRESS, a Ray job)."""
    import logging

    from mlflow.environment_variables import MLFLOW_ENABLE_ASYNC_LOGGING

    if not cluster.started_local or MLFLOW_ENABLE_ASYNC_LOGGING.get():
        raise SystemExit(code)
    try:
        cluster.disconnect()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (`... | head`) or terminal: nothing more to write
                pass
    finally:
        os._exit(code)


def plan_resume_command(plan: Plan) -> str:
    return (
        f"python -m platform.sweep {plan.resolved.method.name} --task {plan.resolved.task.name} --resume "
        f"--name {plan.name} --storage-path {plan.storage_path} --tracking-uri {plan.tracking_uri}"
    )
