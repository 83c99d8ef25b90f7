"""Data-parallel scaling: one trial on 1 vs N Ray Train workers, side by side in one run.

`python -m platform.train METHOD --workers W --trial-runner train` for W = 1 and W = `--workers`, each worker with
`--cpus-per-worker` CPUs (and `--gpus-per-worker` GPUs when given), the same per-worker batch, so the global batch
grows with W (weak scaling, how data parallelism is used). Throughput is training images per second of the worker
loop (`time/elapsed_s` logged by rank 0: first step to last report, evaluations included), so Ray's start-up is
excluded; the whole command's time is printed too. Efficiency = throughput(W) / (W × throughput(1)).

On a 2-core machine with no GPU, two 1-CPU workers share the cores with the Tune driver and Ray's daemons: expect
little. On a GPU machine pass `--gpus-per-worker 1 --task ... --set architecture=deeplabv2_resnet101`.

    python benchmarks/scaling.py [--method source_only] [--task synthetic-urban] [--workers 2] [--steps 100]
                                 [--batch-size 8] [--cpus-per-worker 1] [--gpus-per-worker 0] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import _bootstrap  # noqa: F401  (must come first: see _bootstrap.py)

import argparse

from common import train_command
from platform import tasks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="source_only")
    parser.add_argument("--task", default="synthetic-urban")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="per worker")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    task = tasks.get(args.task)
    data_root = tasks.default_data_root()
    tasks.prepare(task, data_root)
    results = {}
    for workers in (1, args.workers):
        # both through Ray Train (the default runs a one-worker trial inline): one runtime, only W changes
        extra = [
            "--workers",
            str(workers),
            "--trial-runner",
            "train",
            "--cpus-per-worker",
            str(args.cpus_per_worker),
            "--gpus-per-worker",
            str(args.gpus_per_worker),
            "--set",
            f"batch_size={args.batch_size}",
        ]
        for override in args.overrides:
            extra += ["--set", override]
        results[workers] = train_command(args.method, args.task, args.steps, args.steps, data_root, extra)
    print(
        f"{args.method} on {args.task}, {args.steps} steps, batch {args.batch_size} per worker, "
        f"{args.cpus_per_worker} CPU(s) and {args.gpus_per_worker:g} GPU(s) per worker"
    )
    print(f"{'workers':>7s} {'loop s':>8s} {'images/s':>9s} {'command s':>10s} {'mIoU':>6s}")
    rate = {}
    for workers, measured in results.items():
        rate[workers] = args.steps * args.batch_size * workers / measured["loop"]
        print(
            f"{workers:7d} {measured['loop']:8.1f} {rate[workers]:9.1f} {measured['command']:10.1f} "
            f"{measured['miou']:6.1f}"
        )
    speedup = rate[args.workers] / rate[1]
    print(f"throughput {args.workers} ÷ 1 workers = {speedup:.2f} (efficiency {speedup / args.workers:.2f})")


if __name__ == "__main__":
    main()
