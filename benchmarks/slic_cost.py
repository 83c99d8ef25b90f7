"""The cost of SLRT's superpixels (Alg. 2 line 4) on this CPU, both ways methods/slrt.py can get them.

    python benchmarks/slic_cost.py [--repeats 3] [--batch 4]

- `superpixel_source="step"` (default): SLIC on every step's target batch, inside the step. Timed per batch of
  `--batch` images (the paper's batch of 4) at the synthetic size (64×64) and at Cityscapes' training size (1024×512,
  `superpixel_size` 16 as the search space sets it, i.e. about 2,048 segments), for `superpixel_scale` 1, 0.5, 0.25.
- `superpixel_source="store"`: SLIC once per target image in Alg. 1's pass (the same call, one image at a time, so
  per image it costs the same), then per step a read of the batch's int16 maps from the per-sample store
  (platform/store.py, a memory map) and their placement like the crop (platform/stream.py `place_map`): timed here.

The images are synthetic-urban target frames resized to each size (real image content: SLIC's run time depends on
it, a constant or noise image would not be representative). Printed: seconds per batch, median of `--repeats`, and
the ratio to scale 1 at paper size.
"""

from __future__ import annotations

import _bootstrap  # noqa: F401  (must come first: see _bootstrap.py)

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from methods import slrt
from methods.contract import SampleMap
from platform import store, stream, tasks
from platform.datasets import split_files


def _frames(batch: int, size: tuple[int, int], data_root: str) -> torch.Tensor:
    """`batch` synthetic-urban target frames (B, 3, H, W) in [0, 1], resized to `size`."""
    task = tasks.get("synthetic-urban")
    tasks.prepare(task, data_root)
    split = task.target_train
    rows = stream.first_rows(split_files(data_root, split.dataset, split.split), ["image"], batch)
    images = torch.stack([stream.decode_sample(row, 1, task.target_size, flip=False)["image"] for row in rows])
    return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def _median_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--data-root", default=tasks.default_data_root())
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    print(f"SLIC per batch of {args.batch} (seconds, median of {args.repeats}); superpixel_source='step'")
    print("| size | superpixel_size | superpixel_scale | segments | s / batch | × scale 1 |")
    print("|---|---|---|---|---|---|")
    for (height, width), size, scales in (((64, 64), 8, (1.0,)), ((512, 1024), 16, (1.0, 0.5, 0.25))):
        images = _frames(args.batch, (height, width), args.data_root)
        base = None
        for scale in scales:
            seconds = _median_seconds(lambda s=scale, n=size, x=images: slrt.superpixels(x, n, scale=s), args.repeats)
            base = base or seconds
            segments = round(height * width / size**2)
            print(f"| {width}×{height} | {size} | {scale} | {segments} | {seconds:.3f} | {seconds / base:.2f} |")

    height, width = 512, 1024
    images = _frames(args.batch, (height, width), args.data_root)
    maps = slrt.superpixels(images, 16).to(torch.int16)
    specs = {"superpixels": SampleMap(dtype=torch.int16, interpolation="nearest", fill=-1)}
    with tempfile.TemporaryDirectory() as root:
        writer = store.StoreWriter(root, "pass-0-0", specs, rank=0)
        writer.add("superpixels", torch.arange(args.batch), maps)
        writer.close()
        store.mark_complete(root, "pass-0-0", specs, world_size=1)
        samples = store.SampleStore(root, "pass-0-0", specs)
        placement = stream.Placement(size=(height, width), box=(0, 0, height, width // 2), flip=True)

        def read_and_place() -> None:
            for array in samples.read("superpixels", range(args.batch)):
                stream.place_map(torch.from_numpy(array.copy())[None].float(), placement, "nearest", -1)

        read = _median_seconds(read_and_place, max(args.repeats, 10))
    per_image = _median_seconds(lambda: slrt.superpixels(images[:1], 16), args.repeats)
    print(
        f"\nsuperpixel_source='store' at {width}×{height}: SLIC {per_image:.3f} s per image once per epoch in the pass"
    )
    print(f"  (the same call as in the step), then per step {read * 1000:.1f} ms to read and place {args.batch} maps")


if __name__ == "__main__":
    main()
