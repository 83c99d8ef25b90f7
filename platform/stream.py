"""Streaming Parquet reader for training workers: each rank reads its own row groups, one row group at a time.

Decoding and augmentation (resize, random scale, crop, flip) run in a pool of threads (PIL's PNG decoder and
torch's resizing release the GIL) a few batches ahead of the training loop; measured against a PNG-folder DataLoader
and a pure decode loop in benchmarks/data_throughput.py. Why not Ray Data: see docs/architecture.md.

Order: for epoch e, the row groups of a split are permuted with a Generator seeded by (seed, e), identically on every
rank; rank r takes every world_size-th group of that permutation (so ranks read disjoint groups), then permutes the
rows inside each group and draws its flips with a Generator seeded by (seed, e, r). The order is a pure function of
(seed, epoch, rank), so a resumed trial skips the samples it already consumed at the index level, without reading
them, and sees exactly the batches it would have seen.

Memory stays bounded whatever the dataset size: one decoded row group per stream. Paths may be local or any URI that
pyarrow's filesystems understand (s3://, gs://, hdfs://); NFS is a local path.

Columns: a training stream is built with the columns it may read. The target training stream is built without
"label", so target pixel labels cannot reach a method, not even by mistake.
"""

from __future__ import annotations

import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.nn import functional as F

from platform.datasets import decode_png


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int
    num_rows: int


def _open(path: str) -> pq.ParquetFile:
    """Open a shard (local path or any URI pyarrow understands); a truncated or corrupt file is named."""
    try:
        if "://" in path:
            filesystem, inner = pafs.FileSystem.from_uri(path)
            return pq.ParquetFile(filesystem.open_input_file(inner))
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise
    except (pa.ArrowInvalid, OSError) as error:
        raise OSError(f"corrupt or truncated shard {path}: {error} (convert the dataset again)") from error


def row_groups(files: Sequence[str]) -> list[RowGroup]:
    groups = []
    for path in files:
        metadata = _open(path).metadata
        groups.extend(RowGroup(path, i, metadata.row_group(i).num_rows) for i in range(metadata.num_row_groups))
    return groups


@dataclass(frozen=True)
class Augment:
    """Per-sample augmentation parameters, drawn with the epoch order (so that a resumed stream redraws them)."""

    flip: bool = False
    scale: float = 1.0  # random scale factor applied after the resize
    crop: tuple[float, float] = (0.0, 0.0)  # crop position as fractions of the free room (y, x)


@dataclass(frozen=True)
class Policy:
    """A task's training-time transform: resize to `size`, random scale in `scale_range`, random crop to `crop`,
    random horizontal flip."""

    size: tuple[int, int] | None = None
    hflip: bool = False
    scale_range: tuple[float, float] | None = None
    crop: tuple[int, int] | None = None

    def draw(self, rng: np.random.Generator, count: int) -> list[Augment]:
        flips = rng.random(count) < 0.5 if self.hflip else np.zeros(count, dtype=bool)
        scales = rng.uniform(*self.scale_range, count) if self.scale_range else np.ones(count)
        crops = rng.random((count, 2)) if self.crop else np.zeros((count, 2))
        return [Augment(bool(f), float(c), (float(y), float(x))) for f, c, (y, x) in zip(flips, scales, crops)]


def _resize_sample(sample: dict[str, torch.Tensor], size: tuple[int, int], resize_label: bool) -> None:
    if tuple(sample["image"].shape[-2:]) == tuple(size):
        return
    sample["image"] = F.interpolate(sample["image"][None], size=size, mode="bilinear", align_corners=False)[0]
    if "label" in sample and resize_label:
        sample["label"] = F.interpolate(sample["label"][None, None].float(), size=size, mode="nearest")[0, 0].long()


def augment_sample(sample: dict[str, torch.Tensor], policy: Policy, augment: Augment) -> dict[str, torch.Tensor]:
    """Resize, scale, crop (labels padded with 255 where the crop is larger than the image), flip."""
    if policy.size is not None:
        _resize_sample(sample, policy.size, True)
    if augment.scale != 1.0:
        height, width = sample["image"].shape[-2:]
        _resize_sample(sample, (max(1, round(height * augment.scale)), max(1, round(width * augment.scale))), True)
    if policy.crop is not None:
        crop_h, crop_w = policy.crop
        height, width = sample["image"].shape[-2:]
        pad_h, pad_w = max(0, crop_h - height), max(0, crop_w - width)
        if pad_h or pad_w:
            sample["image"] = F.pad(sample["image"], (0, pad_w, 0, pad_h))
            if "label" in sample:
                sample["label"] = F.pad(sample["label"], (0, pad_w, 0, pad_h), value=255)
            height, width = sample["image"].shape[-2:]
        top = int(augment.crop[0] * (height - crop_h))
        left = int(augment.crop[1] * (width - crop_w))
        sample["image"] = sample["image"][:, top:top + crop_h, left:left + crop_w]
        if "label" in sample:
            sample["label"] = sample["label"][top:top + crop_h, left:left + crop_w]
    if augment.flip:
        sample["image"] = sample["image"].flip(-1)
        if "label" in sample:
            sample["label"] = sample["label"].flip(-1)
    return sample


def decode_sample(row: dict, num_classes: int, size: tuple[int, int] | None, flip: bool,
                  resize_label: bool = True) -> dict[str, torch.Tensor]:
    """A Parquet row → tensors: image (C, H, W) float32 in [0, 1], label (H, W) int64, image_labels (K,) float32."""
    image = decode_png(row["image"])
    image = torch.from_numpy(image.copy()).float().div_(255)
    image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
    sample = {"image": image}
    if row.get("label") is not None:
        sample["label"] = torch.from_numpy(decode_png(row["label"]).astype(np.int64))
    if row.get("spacing_mm") is not None:
        sample["spacing_mm"] = torch.tensor(row["spacing_mm"], dtype=torch.float64)
    if row.get("image_labels") is not None:
        present = torch.zeros(num_classes)
        present[list(row["image_labels"])] = 1
        sample["image_labels"] = present
    if size is not None:
        _resize_sample(sample, size, resize_label)
    if flip:
        sample["image"] = sample["image"].flip(-1)
        if "label" in sample:
            sample["label"] = sample["label"].flip(-1)
    return sample


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


class _RowGroupReader:
    """Reads and caches one row group at a time (the memory bound)."""

    def __init__(self, columns: Sequence[str]):
        self.columns = list(columns)
        self._files: dict[str, pq.ParquetFile] = {}
        self._key: tuple[str, int] | None = None
        self._rows: list[dict] = []

    def rows(self, group: RowGroup) -> list[dict]:
        if self._key != (group.path, group.index):
            if group.path not in self._files:
                self._files[group.path] = _open(group.path)
            try:
                table = self._files[group.path].read_row_group(group.index, columns=self.columns)
            except Exception as error:  # a truncated or corrupt shard: name it
                raise OSError(f"cannot read row group {group.index} of {group.path}: {error}") from error
            self._rows = table.to_pylist()
            self._key = (group.path, group.index)
        return self._rows


class TrainStream:
    """Infinite iterator of training batches for one rank; see the module docstring for the order."""

    def __init__(self, files: Sequence[str], columns: Sequence[str], batch_size: int, num_classes: int, seed: int,
                 rank: int = 0, world_size: int = 1, size: tuple[int, int] | None = None, hflip: bool = False,
                 start_sample: int = 0, policy: Policy | None = None, threads: int = 2, prefetch: int = 2):
        self.groups = row_groups(files)
        if not self.groups:
            raise ValueError(f"no rows in {', '.join(files) or '(no files)'}")
        if len(self.groups) < world_size:
            raise ValueError(f"{len(self.groups)} row groups cannot be split over {world_size} workers")
        self.batch_size, self.num_classes, self.seed = batch_size, num_classes, seed
        self.rank, self.world_size = rank, world_size
        self.policy = policy or Policy(size=size, hflip=hflip)
        self.start_sample = start_sample
        self.threads, self.prefetch = threads, prefetch
        self.reader = _RowGroupReader(columns)
        self.num_samples = sum(g.num_rows for g in self.groups)

    def _epoch_order(self, epoch: int) -> list[tuple[RowGroup, int, Augment]]:
        shared = np.random.default_rng([self.seed, epoch])
        mine = shared.permutation(len(self.groups))[self.rank::self.world_size]
        local = np.random.default_rng([self.seed, epoch, 1 + self.rank])
        order = []
        for g in mine:
            group = self.groups[g]
            order.extend((group, int(r)) for r in local.permutation(group.num_rows))
        return [(group, row, augment) for (group, row), augment in zip(order, self.policy.draw(local, len(order)))]

    def _indices(self) -> Iterator[tuple[RowGroup, int, Augment]]:
        skip = self.start_sample
        for epoch in itertools.count():
            order = self._epoch_order(epoch)
            if skip >= len(order):
                skip -= len(order)
                continue
            yield from order[skip:]
            skip = 0

    def _decode(self, row: dict, augment: Augment) -> dict[str, torch.Tensor]:
        return augment_sample(decode_sample(row, self.num_classes, None, False), self.policy, augment)

    def _next_rows(self, indices: Iterator[tuple[RowGroup, int, Augment]]) -> list[tuple[dict, Augment]]:
        """The next batch's rows (read here, in order, one row group in memory) and their augmentations."""
        return [(self.reader.rows(group)[row], augment)
                for group, row, augment in itertools.islice(indices, self.batch_size)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        indices = self._indices()
        if self.threads <= 1:
            while True:
                yield collate([self._decode(row, augment) for row, augment in self._next_rows(indices)])
        with ThreadPoolExecutor(self.threads, thread_name_prefix="uda-decode") as pool:
            pending: deque = deque()
            while True:
                while len(pending) < self.prefetch:
                    pending.append([pool.submit(self._decode, row, augment) for row, augment in self._next_rows(indices)])
                yield collate([future.result() for future in pending.popleft()])


def eval_batches(files: Sequence[str], columns: Sequence[str], batch_size: int, num_classes: int, rank: int = 0,
                 world_size: int = 1, size: tuple[int, int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Every row of the split once (this rank's share: row groups g with g % world_size == rank), in file order.

    Images are resized to `size` (the resolution the model segments at); labels keep their full resolution, because
    evaluation is at label resolution. A batch only holds samples of one image size.
    """
    reader = _RowGroupReader(columns)
    batch: list[dict[str, torch.Tensor]] = []
    for index, group in enumerate(row_groups(files)):
        if index % world_size != rank:
            continue
        for row in reader.rows(group):
            sample = decode_sample(row, num_classes, size, flip=False, resize_label=False)
            if batch and _shapes(batch[0]) != _shapes(sample):
                yield collate(batch)
                batch = []
            batch.append(sample)
            if len(batch) == batch_size:
                yield collate(batch)
                batch = []
    if batch:
        yield collate(batch)


def _shapes(sample: dict[str, torch.Tensor]) -> tuple:
    return tuple((key, tuple(value.shape)) for key, value in sorted(sample.items()))
