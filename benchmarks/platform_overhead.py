"""Platform overhead: the same N steps of `source_only` through the platform and in a bare PyTorch loop.

Side by side in one run, on the same machine, one thread each:
- bare: the same network, optimiser, poly schedule, batch size and evaluations, over tensors decoded into memory
  before the clock starts (the most favourable loop one can write);
- platform: `python -m platform.train source_only` as a user runs it (1 worker, MLflow on, checkpoints at every
  evaluation), with the default trial runner (inline: the Tune trial process trains) or `--trial-runner train`
  (a Ray Train worker group per trial).

Runs alternate, bare first and last: bare, platform, bare, platform, ..., bare (`--repeats` platform runs per
runner). This machine's speed drifts by 10-20% within minutes (the same 600-step bare loop has measured 49-75 s), so a
single bare run next to a single platform run measures the drift as much as the platform; the ratios below are
mean platform time ÷ mean bare time, and each platform run's ratio to the mean of its two neighbouring bare runs
is printed too.

Three ratios over the bare loop's time:
- loop: the platform worker's own loop, first step to last report (streaming decode, reports, checkpoints, MLflow);
- trial: the trial's MLflow run, start to end (adds the trial's set-up and shutdown: for `train`, Ray Train's
  controller and worker group);
- command: the whole command (adds interpreter start, Ray start, MLflow setup, Tune).

    python benchmarks/platform_overhead.py [--steps 600] [--eval-every 100] [--trial-runner inline|train|both]
                                           [--repeats 2]
"""

from __future__ import annotations

import _bootstrap

import argparse
import statistics
import time

import torch

import methods
import search_spaces
from common import train_command
from methods.contract import Batch, StagePosition, StepContext
from platform import tasks
from platform.datasets import split_files
from platform.metrics import confusion_matrix, mean_iou
from platform.stream import _RowGroupReader, decode_sample, row_groups

REPOSITORY_ROOT = _bootstrap.ROOT


def load_split(data_root: str, dataset: str, split: str, num_classes: int) -> dict[str, torch.Tensor]:
    reader = _RowGroupReader(["image", "label"])
    samples = [
        decode_sample(row, num_classes, None, False)
        for group in row_groups(split_files(data_root, dataset, split))
        for row in reader.rows(group)
    ]
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def bare_loop(steps: int, eval_every: int, data_root: str) -> tuple[float, float]:
    """A plain PyTorch loop: returns (seconds, final target mIoU)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    method = methods.get("source_only")
    task = tasks.get("synthetic-urban")
    hp = methods.make_hyperparams(method, search_spaces.load("source_only").task_defaults[task.name])
    source = load_split(data_root, task.source_train.dataset, "train", task.info.num_classes)
    target = load_split(data_root, task.target_val.dataset, "val", task.info.num_classes)
    modules = method.build(hp, task.info)
    stage = method.stages(hp)[0]
    optims = stage.optimizers(hp, modules, steps)
    modules.train()
    ctx = StepContext(
        hp=hp,
        info=task.info,
        modules=modules,
        optimizers={n: o.optimizer for n, o in optims.items()},
        state={},
        stage=stage.name,
        stage_step=0,
        stage_steps=steps,
        target_epoch=0,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
    )
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(source["image"]), generator=generator)
    miou = float("nan")
    started = time.perf_counter()
    for step in range(steps):
        index = order[(step * hp.batch_size + torch.arange(hp.batch_size)) % len(order)]
        flip = torch.rand(hp.batch_size, generator=generator) < 0.5
        images, labels = source["image"][index], source["label"][index]
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        labels = torch.where(flip[:, None, None], labels.flip(-1), labels)
        stage.step(ctx, Batch(source_image=images, source_label=labels, target_image=None))
        optims["segmenter"].scheduler.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            modules.eval()
            matrix = torch.zeros(task.info.num_classes, task.info.num_classes, dtype=torch.int64)
            with torch.no_grad():
                for start in range(0, len(target["image"]), 16):
                    logits = method.predict(hp, modules, target["image"][start : start + 16], StagePosition(stage.name))
                    matrix += confusion_matrix(
                        logits.argmax(1), target["label"][start : start + 16], task.info.num_classes
                    )
            miou = mean_iou(matrix)
            modules.train()
    return time.perf_counter() - started, miou


def platform_run(steps: int, eval_every: int, data_root: str, runner: str) -> dict[str, float]:
    return train_command(
        "source_only", "synthetic-urban", steps, eval_every, data_root, extra=("--trial-runner", runner)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="default: about 50-65 s of bare training here")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--trial-runner", choices=("inline", "train", "both"), default="inline")
    parser.add_argument("--repeats", type=int, default=2, help="platform runs per trial runner")
    args = parser.parse_args(argv)
    data_root = tasks.default_data_root()
    tasks.prepare(tasks.get("synthetic-urban"), data_root)
    runners = ("inline", "train") if args.trial_runner == "both" else (args.trial_runner,)
    bare_runs, bare_miou = [], float("nan")
    runs: dict[str, list[tuple[int, dict[str, float]]]] = {runner: [] for runner in runners}

    def bare() -> None:
        nonlocal bare_miou
        seconds, bare_miou = bare_loop(args.steps, args.eval_every, data_root)
        bare_runs.append(seconds)

    bare()
    for _ in range(args.repeats):
        for runner in runners:
            runs[runner].append((len(bare_runs) - 1, platform_run(args.steps, args.eval_every, data_root, runner)))
            bare()
    mean_bare = statistics.mean(bare_runs)
    print(f"source_only on synthetic-urban, {args.steps} steps, evaluation every {args.eval_every} steps, 1 thread")
    print(
        f"  bare PyTorch loop           {mean_bare:7.1f} s   (mean of {', '.join(f'{b:.1f}' for b in bare_runs)}; "
        f"final target mIoU {bare_miou:.1f})"
    )
    for runner, measured in runs.items():
        print(f"  trial runner {runner} ({len(measured)} run(s); means, ratio to the mean bare time):")
        for key, label in (("loop", "worker loop"), ("trial", "trial (MLflow run)"), ("command", "whole command")):
            values = [m[key] for _, m in measured]
            neighbours = [m[key] / statistics.mean(bare_runs[i : i + 2]) for i, m in measured]
            print(
                f"    {label:24s}{statistics.mean(values):7.1f} s   ratio {statistics.mean(values) / mean_bare:.2f}"
                f"   (each run vs its neighbouring bare runs: {', '.join(f'{r:.2f}' for r in neighbours)})"
            )
        fixed = statistics.mean(m["trial"] - m["loop"] for _, m in measured)
        mious = ", ".join(f"{m['miou']:.1f}" for _, m in measured)
        print(f"    fixed cost per trial beyond the loop: {fixed:.1f} s; final target mIoU {mious}")
        outside = [m["command"] - m["trial"] for _, m in measured]
        print(
            f"    the command beyond its trial (start-up and shutdown): {statistics.mean(outside):.1f} s "
            f"({', '.join(f'{o:.1f}' for o in outside)})"
        )
        ratios = [m["loop"] / statistics.mean(bare_runs[i : i + 2]) for i, m in measured]
        if len(ratios) > 1:
            print(
                f"    worker loop ÷ neighbouring bare runs: mean {statistics.mean(ratios):.3f}, "
                f"sample std {statistics.stdev(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}"
            )


if __name__ == "__main__":
    main()
