"""Data throughput at GTA5 size: images per second delivered to a training loop, three ways, side by side.

A GTA5-like download is generated (1914x1052 RGB frames with structure and noise, labelId maps, both PNGs saved
with Pillow's default compression like the official files) and converted with the real converter
(`platform.data.convert gta5`, `--codec`, default zstd like the converter). Every reader then applies the same
per-sample transform, the platform's own functions: decode of image and label, the gta5-cityscapes training transform
(resize to 1280x720, random horizontal flip), and uint8 batches of `--batch-size` (the training loop makes them float
on its device, after the copy; that step is the same for every reader and is not timed). All use `--workers` parallel decoders
(default: all cores):

- stream: the platform's `TrainStream` over the Parquet shards (what a Ray Train worker runs);
- folder: a PyTorch `DataLoader` over the official-format PNG folder with `num_workers` processes, same transform;
- decode limit: `--workers` processes decoding and transforming the stream's own payloads (the Parquet cells,
  already in memory), no reader at all: what the stream could deliver if its plumbing cost nothing.

Ratios reported: stream ÷ folder (goal ≥ 1.5: what converting the download buys) and stream ÷ decode limit (goal
≥ 0.9: what the stream's plumbing costs). Start-up (first batch) is excluded from every timing.

    python benchmarks/data_throughput.py [--images 48] [--batches 36] [--batch-size 4] [--workers N]
                                         [--codec zstd|png]
"""

from __future__ import annotations

import _bootstrap  # noqa: F401  (must come first: see _bootstrap.py)

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import torch
from cityscapesscripts.helpers.labels import id2label
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from platform import data, tasks
from platform.datasets import CODECS, split_files
from platform.stream import Augment, Policy, TrainStream, augment_sample, collate, decode_row

HEIGHT, WIDTH = 1052, 1914
TASK = tasks.get("gta5-cityscapes")
POLICY = Policy(size=TASK.source_size, hflip=TASK.hflip, scale_range=TASK.train_scale_range, crop=TASK.train_crop)


def _frame(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A frame with large smooth regions, edges and sensor noise (compresses like a rendered game frame)."""
    coarse = rng.integers(0, 256, (HEIGHT // 32 + 1, WIDTH // 32 + 1, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BILINEAR)).astype(np.int16)
    image = np.clip(image + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8)
    label_ids = np.array([i for i in id2label if i >= 0], dtype=np.uint8)
    blocks = rng.choice(label_ids, (HEIGHT // 64 + 1, WIDTH // 64 + 1)).astype(np.uint8)
    label = np.asarray(Image.fromarray(blocks).resize((WIDTH, HEIGHT), Image.NEAREST))
    return image, label


def generate(root: str, count: int) -> str:
    source = os.path.join(root, "GTA5")
    rng = np.random.default_rng(0)
    for index in range(count):
        image, label = _frame(rng)
        for folder, array in (("images", image), ("labels", label)):
            os.makedirs(os.path.join(source, folder), exist_ok=True)
            Image.fromarray(array).save(os.path.join(source, folder, f"{index + 1:05d}.png"))
    return source


def _work(image: bytes, label: bytes, augment: Augment) -> dict[str, torch.Tensor]:
    """The per-sample work every reader does (the stream's own functions, so that only the plumbing differs)."""
    return augment_sample(decode_row({"image": image, "label": label}, 19), POLICY, augment)


class _Folder(Dataset):
    def __init__(self, source: str, count: int):
        self.paths = [
            (os.path.join(source, "images", f"{i + 1:05d}.png"), os.path.join(source, "labels", f"{i + 1:05d}.png"))
            for i in range(count)
        ]
        self.augments = POLICY.draw(np.random.default_rng(0), count)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image_path, label_path = self.paths[index]
        with open(image_path, "rb") as image, open(label_path, "rb") as label:
            # the folder holds labelIds; the mapping is not timed work (a lookup), so decode the bytes as they are
            return _work(image.read(), label.read(), self.augments[index])


def _rate(batches, count: int, batch_size: int) -> float:
    iterator = iter(batches)
    next(iterator)  # start-up excluded
    start = time.perf_counter()
    for _ in range(count):
        batch = next(iterator)
        assert batch["image"].shape[0] == batch_size
    return count * batch_size / (time.perf_counter() - start)


def _decode_share(job: tuple[list[tuple[bytes, bytes]], int]) -> tuple[int, float]:
    payloads, repeats = job
    torch.set_num_threads(1)
    augments = POLICY.draw(np.random.default_rng(1), len(payloads))
    _work(*payloads[0], augments[0])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        for (image, label), augment in zip(payloads, augments):
            _work(image, label, augment)
    return repeats * len(payloads), time.perf_counter() - start


def decode_limit(files: list[str], workers: int, images: int) -> float:
    payloads = [
        (row["image"], row["label"])
        for path in files
        for row in pq.read_table(path, columns=["image", "label"]).to_pylist()
    ]
    repeats = max(1, images // len(payloads))
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_decode_share, [(payloads[w::workers], repeats) for w in range(workers)]))
    return sum(n for n, _ in results) / max(seconds for _, seconds in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="generated frames")
    parser.add_argument(
        "--batches", type=int, default=36, help="timed batches per reader (36 x 4: three passes over 48 frames)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--codec", choices=CODECS, default="zstd", help="the converter's codec for the stream")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="uda-throughput-") as root:
        start = time.perf_counter()
        source = generate(root, args.images)
        data.convert(
            "gta5", source, os.path.join(root, "data", "gta5"), workers=args.workers, progress=False, codec=args.codec
        )
        files = split_files(os.path.join(root, "data"), "gta5", "train")
        png_mb = sum(
            os.path.getsize(os.path.join(source, "images", f)) for f in os.listdir(os.path.join(source, "images"))
        )
        parquet_mb = sum(os.path.getsize(f) for f in files)
        print(
            f"{args.images} frames {WIDTH}x{HEIGHT}: PNG folder {png_mb / 2**20:.0f} MB, Parquet "
            f"{parquet_mb / 2**20:.0f} MB ({args.codec}, {time.perf_counter() - start:.0f} s to generate and convert); "
            f"transform {POLICY}; {args.workers} workers, batch {args.batch_size}"
        )
        stream = TrainStream(
            files, ["image", "label"], args.batch_size, 19, seed=0, policy=POLICY, threads=args.workers, prefetch=2
        )
        rate_stream = _rate(stream, args.batches, args.batch_size)
        loader = DataLoader(
            _Folder(source, args.images),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            collate_fn=collate,
            persistent_workers=True,
            prefetch_factor=2,
        )
        rate_folder = _rate(_cycle(loader), args.batches, args.batch_size)
        rate_limit = decode_limit(files, args.workers, args.batches * args.batch_size)
    print(f"{'reader':28s} {'img/s':>7s}")
    print(f"{'stream (Parquet)':28s} {rate_stream:7.2f}")
    print(f"{'folder (DataLoader)':28s} {rate_folder:7.2f}")
    print(f"{'decode limit':28s} {rate_limit:7.2f}")
    print(f"stream ÷ folder       = {rate_stream / rate_folder:.2f}  (goal ≥ 1.5)")
    print(f"stream ÷ decode limit = {rate_stream / rate_limit:.2f}  (goal ≥ 0.9)")


def _cycle(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    main()
