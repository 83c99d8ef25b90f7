"""What CIRN's on-the-fly translation costs in stage 2 at the paper's size (issue 17 item 2).

Stage 2 translates every source batch with the frozen G (`methods/cirn.py` `cir_images`, choice: on the fly, because
a precomputed translated dataset would need a source-side store the contract does not have). This times, in one
process and alternating, the translation alone (`cir_images`, what the step runs) and the whole stage-2 step
(`adaptation_step`: the translation, E + C + ACM on the translated source and the target image, D, both updates), at
the paper defaults (DeepLab-v2 ResNet-101, batch 1, the CycleGAN G with 64 filters and 9 residual blocks), on the
gta5-cityscapes sizes: source 1280x720, target 1024x512 (tasks.py). The share of the step is what a precomputed
dataset would save, at most.

    python benchmarks/cirn_translation.py [--device cpu|cuda] [--threads 2] [--repeats 3] [--size HxW]

(`--size` sets both images to HxW, for a quick check at a small size.)

Random weights and images: the cost of a forward pass does not depend on their values.
"""

from __future__ import annotations

import _bootstrap  # noqa: F401  (must come first: see _bootstrap.py)

import argparse
import statistics
import time

import torch

import methods
from methods import cirn
from methods.contract import Batch, StepContext
from platform import tasks


def _context(hp: cirn.Hyperparams, device: torch.device) -> tuple[StepContext, object]:
    """Stage 2 entered as the platform enters it: its modules train, the rest (G) frozen in eval mode; on_start."""
    info = tasks.get("gta5-cityscapes").info
    torch.manual_seed(0)
    modules = cirn.build(hp, info).to(device)
    stage = next(s for s in cirn.stages(hp) if s.name == "adapt")
    for name, module in modules.items():
        module.train(name in stage.trains)
        module.requires_grad_(name in stage.trains)
    optimisers = stage.optimizers(hp, modules, 100)
    ctx = StepContext(
        hp=hp,
        info=info,
        modules=modules,
        optimizers={name: o.optimizer for name, o in optimisers.items()},
        state=cirn.init_state(hp, info),
        stage="adapt",
        stage_step=0,
        stage_steps=100,
        target_epoch=0,
        generator=torch.Generator().manual_seed(0),
        device=device,
    )
    with torch.no_grad():
        ctx.state.update(stage.on_start(ctx) or {})
    return ctx, stage


def _seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed alternations (after one warm-up of each)")
    parser.add_argument(
        "--size", default=None, help="source and target HxW (default: gta5-cityscapes' 720x1280 and 512x1024)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = tasks.get("gta5-cityscapes")
    source_size = tuple(int(v) for v in args.size.split("x")) if args.size else task.source_size
    target_size = task.target_size if not args.size else source_size
    hp = methods.make_hyperparams(methods.get("cirn"), {"backbone_weights": "random"})
    ctx, stage = _context(hp, device)
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 19, (hp.batch_size, *source_size), generator=generator).to(device)
    batch = Batch(
        source_image=torch.rand(hp.batch_size, 3, *source_size, generator=generator).to(device),
        source_label=labels,
        target_image=torch.rand(hp.batch_size, 3, *target_size, generator=generator).to(device),
    )
    translate = lambda: cirn.cir_images(ctx, batch)
    step = lambda: stage.step(ctx, batch)
    translate(), step()  # warm-up
    timings: dict[str, list[float]] = {"translate": [], "step": []}
    for _ in range(args.repeats):
        timings["translate"].append(_seconds(translate, device))
        timings["step"].append(_seconds(step, device))
    g, s = statistics.mean(timings["translate"]), statistics.mean(timings["step"])
    print(
        f"cirn stage 2 at batch {hp.batch_size}, source {source_size[1]}x{source_size[0]}, target "
        f"{target_size[1]}x{target_size[0]}, {args.device} with {args.threads} threads, {args.repeats} alternations:"
    )
    print(
        f"  translation by the frozen G (cir_images): {g:.2f} s  [{', '.join(f'{t:.2f}' for t in timings['translate'])}]"
    )
    print(f"  whole adaptation step (it included):      {s:.2f} s  [{', '.join(f'{t:.2f}' for t in timings['step'])}]")
    print(f"  translation share of the step: {g / s:.3f}; 100,000 iterations: {g * 1e5 / 3600:.1f} h of translation")


if __name__ == "__main__":
    main()
