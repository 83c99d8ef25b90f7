"""Streaming Parquet reader for training workers: each rank reads its own row groups, one row group at a time.

Reading, decoding and augmentation (resize, random scale, crop, flip) of a whole batch are one task in a pool of
threads, a few batches ahead of the training loop (zstd decompression, PIL's PNG decoder and torch's resizing release
the GIL, and two threads scale 2x on two cores). Images stay uint8 through the transform and the batch is made float
once; binary cells are zero-copy views into memory-mapped shards. Measured against a PNG-folder DataLoader and a pure
decode loop in benchmarks/data_throughput.py. Why not Ray Data: see docs/architecture.md.

Order: for epoch e, the row groups of a split are permuted with a Generator seeded by (seed, e), identically on every
rank; rank r takes every world_size-th group of that permutation (so ranks read disjoint groups), then permutes the
rows inside each group and draws its flips with a Generator seeded by (seed, e, r). The order is a pure function of
(seed, epoch, rank), so a resumed trial skips the samples it already consumed at the index level, without reading
them, and sees exactly the batches it would have seen.

Memory stays bounded whatever the dataset size: the two last row groups read, plus the batches in flight. Paths may be local or any URI that
pyarrow's filesystems understand (s3://, gs://, hdfs://); NFS is a local path.

Columns: a training stream is built with the columns it may read. The target training stream is built without
"label", so target pixel labels cannot reach a method, not even by mistake.
"""

from __future__ import annotations

import itertools
import threading
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

from platform.datasets import decode_array


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
        return pq.ParquetFile(path, memory_map=True)
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
    """Image bilinear, label nearest; uint8 tensors are resized as uint8 (3x faster than float on CPU; the result
    differs from resizing in float by at most one grey level, the rounding to uint8)."""
    if tuple(sample["image"].shape[-2:]) == tuple(size):
        return
    sample["image"] = F.interpolate(sample["image"][None], size=size, mode="bilinear", align_corners=False)[0]
    if "label" in sample and resize_label:
        label = sample["label"]
        resized = F.interpolate((label if label.dtype == torch.uint8 else label.float())[None, None], size=size,
                                mode="nearest")[0, 0]
        sample["label"] = resized.to(label.dtype)


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


def decode_row(row: dict, num_classes: int) -> dict[str, torch.Tensor]:
    """A Parquet row → tensors before any transform: image (C, H, W) uint8, label (H, W) uint8, image_labels (K,)
    float32, spacing_mm (2,) float64. `finish` makes them model inputs."""
    image = torch.from_numpy(np.array(decode_array(row["image"])))  # a writable copy: the decoded buffer is read-only
    sample = {"image": image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)}
    if row.get("label") is not None:
        sample["label"] = torch.from_numpy(np.array(decode_array(row["label"])))
    if row.get("spacing_mm") is not None:
        sample["spacing_mm"] = torch.tensor(row["spacing_mm"], dtype=torch.float64)
    if row.get("image_labels") is not None:
        present = torch.zeros(num_classes)
        present[list(row["image_labels"])] = 1
        sample["image_labels"] = present
    return sample


def finish(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model inputs: image float32 in [0, 1] (contiguous), label int64."""
    if sample["image"].dtype == torch.uint8:
        sample["image"] = sample["image"].contiguous().float().div_(255)
    if "label" in sample:
        sample["label"] = sample["label"].long()
    return sample


def decode_sample(row: dict, num_classes: int, size: tuple[int, int] | None, flip: bool,
                  resize_label: bool = True) -> dict[str, torch.Tensor]:
    """A Parquet row → model inputs (see `finish`), resized to `size` and flipped if asked."""
    sample = decode_row(row, num_classes)
    if size is not None:
        _resize_sample(sample, size, resize_label)
    if flip:
        sample["image"] = sample["image"].flip(-1)
        if "label" in sample:
            sample["label"] = sample["label"].flip(-1)
    return finish(sample)


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


class _RowGroupReader:
    """Reads and caches the last row groups it was asked for (the memory bound); safe to share between threads.

    Local shards are memory-mapped, and binary cells (image, label) are handed out as zero-copy pyarrow buffers
    into the row group's memory rather than Python bytes: at GTA5 size, copying them cost as much as decoding.
    """

    def __init__(self, columns: Sequence[str], cached_groups: int = 2):
        self.columns = list(columns)
        self.cached_groups = cached_groups
        self._files: dict[str, pq.ParquetFile] = {}
        self._cache: dict[tuple[str, int], list[dict]] = {}
        self._lock = threading.Lock()

    def rows(self, group: RowGroup) -> list[dict]:
        key = (group.path, group.index)
        with self._lock:
            if key not in self._cache:
                if group.path not in self._files:
                    self._files[group.path] = _open(group.path)
                try:
                    table = self._files[group.path].read_row_group(group.index, columns=self.columns)
                except Exception as error:  # a truncated or corrupt shard: name it
                    raise OSError(f"cannot read row group {group.index} of {group.path}: {error}") from error
                while len(self._cache) >= self.cached_groups:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = _table_rows(table)
            return self._cache[key]


def _table_rows(table: pa.Table) -> list[dict]:
    columns = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_binary(column.type):
            columns[name] = [cell.as_buffer() for cell in column]
        else:
            columns[name] = column.to_pylist()
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


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

    def _batch(self, items: list[tuple[RowGroup, int, Augment]]) -> dict[str, torch.Tensor]:
        """Read, decode and augment one batch (one pool task), stacked in uint8 and made float once."""
        samples = [augment_sample(decode_row(self.reader.rows(group)[row], self.num_classes), self.policy, augment)
                   for group, row, augment in items]
        return finish(collate(samples))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        indices = self._indices()
        batches = iter(lambda: list(itertools.islice(indices, self.batch_size)), None)
        if self.threads <= 1:
            for items in batches:
                yield self._batch(items)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="uda-decode") as pool:
            pending: deque = deque()
            for items in batches:
                pending.append(pool.submit(self._batch, items))
                if len(pending) > max(self.prefetch, self.threads):
                    yield pending.popleft().result()


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
