"""Forward + backward time and peak memory of one training step for each segmenter, at the papers' sizes.

Each (architecture, size) runs in a fresh subprocess: a few warm-up steps, then the mean of the timed ones; peak
memory is the process's peak resident set size on CPU (ru_maxrss) or torch's peak allocation on CUDA, minus what the
process held before the model was built.

    python benchmarks/backbones.py [--device cpu|cuda] [--threads 2] [--only deeplabv2_resnet101,...]

Sizes (batch 1, as the papers train, except DeepLab-v3 at 2: see CASES): GTA5 1280x720 (CIRN, AdaptSegNet), Cityscapes 1024x512, SeUDA 512x512
(chest X-rays, 1 channel), and the synthetic-urban size 64x128 (batch 8, as the synthetic tasks train).
"""

from __future__ import annotations

import _bootstrap  # noqa: F401  (must come first: see _bootstrap.py)

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = [
    # (architecture, channels, height, width, batch)
    ("tiny", 3, 64, 128, 8),
    ("deeplabv2_resnet101", 3, 64, 128, 8),
    ("deeplabv2_resnet101", 3, 512, 1024, 1),
    ("deeplabv2_resnet101", 3, 720, 1280, 1),
    # DeepLab-v3 at batch 2: its image-pooling branch has batch norm over a 1x1 map, which cannot train on one image
    # (torch refuses batch statistics of a single value); SLRT trains it at batch 4
    ("deeplabv3_resnet101", 3, 512, 1024, 2),
    ("deeplabv3_resnet50", 3, 512, 1024, 2),
    ("fcn8s_vgg16", 3, 512, 1024, 1),
    ("seuda_resnet101", 1, 512, 512, 1),
]


def measure(
    architecture: str, channels: int, height: int, width: int, batch: int, device: str, threads: int, steps: int
) -> dict:
    import torch

    from methods.contract import TaskInfo
    from methods.shared.losses import segmentation_loss
    from methods.shared.segmenter import build_segmenter

    torch.set_num_threads(threads)
    classes = 3 if channels == 1 else 19
    info = TaskInfo(num_classes=classes, in_channels=channels, class_names=tuple(map(str, range(classes))))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    segmenter = build_segmenter(architecture, info).to(device).train()
    optimizer = torch.optim.SGD(segmenter.parameters(), lr=1e-4, momentum=0.9)
    images = torch.rand(batch, channels, height, width, device=device)
    labels = torch.randint(0, classes, (batch, height, width), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timings = []
    for step in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        segmentation_loss(segmenter(images), labels).backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step is a warm-up
            timings.append(time.perf_counter() - started)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {
        "seconds": sum(timings) / len(timings),
        "peak_mb": peak_mb,
        "parameters": sum(p.numel() for p in segmenter.parameters()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--only", default="", help="comma-separated architectures")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON out
    args = parser.parse_args(argv)
    if args.case:
        architecture, channels, height, width, batch = json.loads(args.case)
        print(json.dumps(measure(architecture, channels, height, width, batch, args.device, args.threads, args.steps)))
        return
    only = set(filter(None, args.only.split(",")))
    print(f"device {args.device}, {args.threads} threads; one training step (forward, backward, SGD), batch as shown")
    print(f"{'architecture':38s} {'input':>16s} {'params':>12s} {'s/step':>8s} {'peak MB':>9s}")
    for case in CASES:
        if only and case[0] not in only:
            continue
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--case",
                json.dumps(case),
                "--device",
                args.device,
                "--threads",
                str(args.threads),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            print(f"{case[0]:38s} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        architecture, channels, height, width, batch = case
        shape = f"{batch}x{channels}x{height}x{width}"
        print(
            f"{architecture:38s} {shape:>16s} {result['parameters']:>12,d} {result['seconds']:8.2f} "
            f"{result['peak_mb']:9.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
