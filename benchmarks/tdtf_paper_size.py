"""TD/TF's paper configuration at the papers' sizes: seconds and peak memory of one step of each stage (issue 15
item 8), on this machine's CPU (or `--device cuda`).

    python benchmarks/tdtf_paper_size.py [--device cpu|cuda] [--threads 2] [--only NAME,...] [--skip STAGE,...]

The printed model (methods/tdtf.py's Hyperparams defaults: CycleGAN generators with 64 filters and 9 blocks plus the
variational bottleneck, 70x70 PatchGANs, DeepLab-v3 on ResNet-101 at batch 2, D_F with five stride-2 layers, A_F
with 16 RA2B blocks of 256 channels), random weights (shapes and costs, not values), each case in a fresh
subprocess: `--steps` steps of each stage (TD; TF Steps I, II and III), the last one timed, on random images of the
case's size (default 1: on this CPU one TD step at GTA5 size takes minutes, so the timed step is the first, with its
one-time allocations; `--steps 2` times a second one). Steps II and III run with D_F's transferability in force (w = 1 + P), as from round 2.
Peak memory is the process's peak resident set size beyond what it held before the model was built (CPU), or
torch's peak allocation (CUDA).

Cases: the endoscopy task (512x512 both domains, 2 classes); GTA5 (1280x720) → Cityscapes (1024x512), 19 classes,
with `augmentor_downsample` 2 (the search space's default there). At factor 1 A_F's attention maps alone need about
26 GB in backprop at GTA5 size (16 blocks x batch 2 x N² floats, N = 160·90 positions at output stride 8): printed as
an estimate and not run (more than the 24 GB of the CPU machines this project is developed on). Measured on such a
machine (README): at GTA5 size with factor 2 the process is killed for memory in TD (where A_F plays no part) and,
with TD skipped, in Step III; `--skip td` or `--skip td,tf_align` measures the stages that fit. Peak memory is
printed in MiB, the attention estimates in GB (10^9 bytes). A case killed for memory prints the stage it was in
and the stages it completed.
"""

from __future__ import annotations

import _bootstrap  # noqa: F401  (must come first: see _bootstrap.py)

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = {
    # name: (source (H, W), target (H, W), classes, augmentor_downsample)
    "endoscopy-512": ((512, 512), (512, 512), 2, 1),
    "gta5-cityscapes-ds2": ((720, 1280), (512, 1024), 19, 2),
}


def attention_gb(height: int, width: int, downsample: int, blocks: int = 16, batch: int = 2) -> float:
    """A_F's N x N attention maps kept for backprop (softmax's output, one per block and image, float32), in GB."""
    positions = (height // 8 // downsample) * (width // 8 // downsample)
    return blocks * batch * positions**2 * 4 / 1e9


def measure(name: str, device: str, threads: int, steps: int = 1, skip: tuple[str, ...] = ()) -> dict:
    import torch

    from methods import tdtf
    from methods.contract import Batch, StepContext, TaskInfo

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    (source_h, source_w), (target_h, target_w), classes, downsample = CASES[name]
    info = TaskInfo(num_classes=classes, in_channels=3, class_names=tuple(f"c{k}" for k in range(classes)))
    hp = tdtf.Hyperparams(augmentor_downsample=downsample)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    modules = tdtf.build(hp, info).to(device)
    state = tdtf.init_state(hp, info)
    state.update(step3_done=True, transferability_ready=True)  # P in force, as from round 2
    batch = Batch(
        source_image=torch.rand(hp.batch_size, 3, source_h, source_w, device=device),
        source_label=torch.randint(0, classes, (hp.batch_size, source_h, source_w), device=device),
        target_image=torch.rand(hp.batch_size, 3, target_h, target_w, device=device),
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = {}
    for index, stage in enumerate(tdtf.stages(hp)[:4]):  # one round: td, tf_segment, tf_augment, tf_align
        if stage.name in skip:
            continue
        for module_name, module in modules.items():
            module.train(module_name in stage.trains)
            module.requires_grad_(module_name in stage.trains)
        optims = stage.optimizers(hp, modules, 1000)
        ctx = StepContext(
            hp=hp,
            info=info,
            modules=modules,
            optimizers={n: o.optimizer for n, o in optims.items()},
            state=state,
            stage=stage.name,
            stage_step=0,
            stage_steps=1000,
            target_epoch=0,
            generator=torch.Generator().manual_seed(0),
            device=torch.device(device),
            stage_index=index,
        )
        print(f"{stage.name} started", file=sys.stderr, flush=True)  # where a case killed for memory got to
        timings = []
        for _ in range(steps):  # the last one is timed
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            stage.step(ctx, batch)
            if device == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - started)
        seconds[stage.name] = timings[-1]
        rss_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(f"{stage.name} took {timings[-1]:.1f} s (peak so far {rss_mb:.0f} MiB)", file=sys.stderr, flush=True)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"seconds": seconds, "peak_mb": peak_mb, "parameters": sum(p.numel() for p in modules.parameters())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="steps per stage, the last one timed")
    parser.add_argument("--only", default="", help="comma-separated case names: " + ", ".join(CASES))
    parser.add_argument(
        "--skip", default="", help="comma-separated stages not to run (td, tf_segment, tf_augment, tf_align)"
    )
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON out
    args = parser.parse_args(argv)
    skip = tuple(filter(None, args.skip.split(",")))
    if args.case:
        print(json.dumps(measure(args.case, args.device, args.threads, args.steps, skip)))
        return
    only = set(filter(None, args.only.split(",")))
    print(f"tdtf paper defaults, device {args.device}, {args.threads} threads; seconds of one step per stage")
    print(f"{'case':22s} {'params':>12s} {'td':>8s} {'step I':>8s} {'step II':>8s} {'step III':>8s} {'peak MiB':>9s}")
    for name in CASES:
        if only and name not in only:
            continue
        command = [sys.executable, __file__, "--case", name, "--device", args.device, "--threads", str(args.threads)]
        command += ["--steps", str(args.steps), "--skip", ",".join(skip)]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            lines = out.stderr.strip().splitlines()
            how = "killed (out of memory?)" if out.returncode < 0 else f"exit {out.returncode}"
            done = "; ".join(line for line in lines if " took " in line)
            print(f"{name:22s} failed, {how}; last line: {(lines or ['before the first stage'])[-1]}; {done}")
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        cells = " ".join(
            f"{result['seconds'][stage]:8.1f}" if stage in result["seconds"] else f"{'-':>8s}"
            for stage in ("td", "tf_segment", "tf_augment", "tf_align")
        )
        print(f"{name:22s} {result['parameters']:>12,d} {cells} {result['peak_mb']:9.0f}", flush=True)
    for (height, width), label in (((512, 512), "512x512"), ((720, 1280), "1280x720")):
        sizes = ", ".join(f"factor {d}: {attention_gb(height, width, d):.1f} GB" for d in (1, 2, 4))
        print(f"A_F's attention maps at {label} (batch 2, 16 blocks, estimate): {sizes}")


if __name__ == "__main__":
    main()
