"""CSCL's VGG-16 setting at the papers' sizes on this machine's CPU: one iteration of Alg. 2 and `predict`.

    python benchmarks/cscl_vgg16_paper_size.py [--threads 2]

The real FCN-8s on VGG-16 (random weights: the shapes, not the values, are what is checked), the derived D
(methods/cscl.py, reading g), T_Q and T_C, with Sec. 3.5's VGG optimisers, on one 1280x720 GTA5-sized source image
with labels and one 1024x512 Cityscapes-sized target image (batch size 1, as printed); then `predict` on the target
image. Prints E's feature and D's output sizes for both domains, the losses and the seconds each part took. The test
suite runs the same step with a same-shape stand-in for the VGG-16 layers (tests/methods/test_cscl.py).
"""

from __future__ import annotations

import _bootstrap  # noqa: F401  (must come first: see _bootstrap.py)

import argparse
import time

import torch

from methods import cscl
from methods.contract import Batch, StagePosition, StepContext, TaskInfo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = TaskInfo(num_classes=19, in_channels=3, class_names=tuple(f"c{k}" for k in range(19)))
    hp = cscl.Hyperparams(
        architecture="fcn8s_vgg16", segmenter_optimizer="adam", learning_rate=1e-4, discriminator_learning_rate=1.5e-6
    )
    started = time.perf_counter()
    modules = cscl.build(hp, info)
    modules.train()
    optims = cscl.optimizers(hp, modules, 124_830)
    ctx = StepContext(
        hp=hp,
        info=info,
        modules=modules,
        optimizers={n: o.optimizer for n, o in optims.items()},
        state={"thresholds": torch.full((19,), 0.5)},
        stage="adapt",
        stage_step=0,
        stage_steps=124_830,
        target_epoch=0,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
    )
    batch = Batch(
        source_image=torch.rand(1, 3, 720, 1280),
        source_label=torch.randint(0, 19, (1, 720, 1280)),
        target_image=torch.rand(1, 3, 512, 1024),
    )
    print(
        f"D's stride-2 layers: {cscl.discriminator_downsampling(hp)} (built in {time.perf_counter() - started:.1f} s)"
    )
    with torch.no_grad():
        for name, images in (("source 1280x720", batch.source_image), ("target 1024x512", batch.target_image)):
            features = modules["segmenter"].encode(cscl.imagenet_normalise(images)).main
            print(
                f"  {name}: E's features {tuple(features.shape[-2:])}, D's output "
                f"{tuple(modules['discriminator'](features).shape[-2:])}"
            )
    started = time.perf_counter()
    losses = cscl.train_step(ctx, batch)
    step_s = time.perf_counter() - started
    print(f"one iteration of Alg. 2: {step_s:.1f} s; " + ", ".join(f"{k} {float(v):.4f}" for k, v in losses.items()))
    modules.eval()
    started = time.perf_counter()
    logits = cscl.predict(hp, modules, batch.target_image, StagePosition("adapt"))
    print(
        f"predict: {tuple(logits.shape)} in {time.perf_counter() - started:.1f} s, finite: {bool(logits.isfinite().all())}"
    )


if __name__ == "__main__":
    main()
