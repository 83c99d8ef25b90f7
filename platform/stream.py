"""Streaming Parquet reader for training workers: each rank reads its own row groups, one row group at a time.

Reading, decoding and augmentation (resize, random scale, crop, flip) of a whole batch are one task in a pool of
threads, a few batches ahead of the training loop (zstd decompression, PIL's PNG decoder and torch's resizing release
the GIL, and two threads scale 2x on two cores). Images stay uint8 through the transform and are delivered as uint8:
the training loop makes them float on its device (`finish`); binary cells are zero-copy slices of memory-mapped
shards; the next row group is read ahead in a background thread. Measured against a PNG-folder DataLoader and a pure
decode loop in benchmarks/data_throughput.py. Why not Ray Data: see docs/architecture.md.

Order: for epoch e, the row groups of a split are permuted with a Generator seeded by (seed, e), identically on every
rank; rank r takes every world_size-th group of that permutation (so ranks read disjoint groups), then permutes the
rows inside each group and draws its flips with a Generator seeded by (seed, e, r). The order is a pure function of
(seed, epoch, rank), so a resumed trial skips the samples it already consumed at the index level, without reading
them, and sees exactly the batches it would have seen.

Memory stays bounded whatever the dataset size: three row groups (two being decoded, one read ahead), plus the
batches in flight. Paths may be local or any URI that pyarrow's filesystems understand (s3://, gs://, hdfs://); NFS
is a local path.

Held-out rows: a stream built with `exclude` (the source-validation slice, tasks.source_validation_rows) draws every
other row once per epoch, in the same order with the excluded ones left out, and never reads a row group that holds
only excluded rows.

Columns: a training stream is built with the columns it may read. The target training stream is built without
"label", so target pixel labels cannot reach a method, not even by mistake.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.nn import functional as F

from platform.datasets import IGNORE_INDEX, decode_array


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int
    num_rows: int
    offset: int = 0  # the group's first row in its split (row_groups)
    # a local shard's (size, mtime_ns, inode, ctime_ns) when it was listed: keys its rows in DECODED, so that a
    # rewritten shard (a repaired or regenerated dataset) is never served from memory; None for object-store shards
    version: tuple[int, ...] | None = None


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
    """The row groups of a split's shards in file order; `offset` is a group's first row in the split (so a sample's
    row index is offset + its row in the group: what `Batch.*_index` carries)."""
    groups = []
    offset = 0
    for path in files:
        metadata = _open(path).metadata
        version = None
        if "://" not in path:
            stat = os.stat(path)
            version = (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
        for i in range(metadata.num_row_groups):
            rows = metadata.row_group(i).num_rows
            groups.append(RowGroup(path, i, rows, offset, version))
            offset += rows
    return groups


def row_ids(files: Sequence[str]) -> list[str]:
    """The string `id` of every row of a split, by row index (`Batch.*_index` → the shards' sample id)."""
    ids: list[str] = []
    for path in files:
        ids.extend(_open(path).read(columns=["id"]).column("id").to_pylist())
    return ids


def labelled_rows(files: Sequence[str]) -> list[bool]:
    """Whether each row of a split has a pixel label (rows with image-level labels only have none), by row index."""
    labelled: list[bool] = []
    for path in files:
        labelled.extend(_open(path).read(columns=["label"]).column("label").is_valid().to_pylist())
    return labelled


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


@dataclass(frozen=True)
class Placement:
    """Where an augmented sample comes from in its (resized) image: the size after the random scale, the crop box
    (top, left, height, width; it may extend past the bottom and right edges, which are padded) and the flip."""

    size: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool

    @classmethod
    def of(cls, policy: Policy, augment: Augment, height: int, width: int) -> Placement:
        """The placement `augment` gives an image of (height, width) after the policy's resize."""
        if augment.scale != 1.0:
            height, width = max(1, round(height * augment.scale)), max(1, round(width * augment.scale))
        if policy.crop is None:
            return cls((height, width), (0, 0, height, width), augment.flip)
        crop_h, crop_w = policy.crop
        room_h, room_w = max(height, crop_h) - crop_h, max(width, crop_w) - crop_w
        top, left = int(augment.crop[0] * room_h), int(augment.crop[1] * room_w)
        return cls((height, width), (top, left, crop_h, crop_w), augment.flip)

    def as_tensors(self, scale: float) -> dict[str, torch.Tensor]:
        return {
            "aug_size": torch.tensor(self.size, dtype=torch.int64),
            "aug_scale": torch.tensor(scale, dtype=torch.float32),
            "aug_crop": torch.tensor(self.box, dtype=torch.int64),
            "aug_flip": torch.tensor(self.flip),
        }


def resize_map(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(C, H, W) or (H, W) → `size`, bilinear or nearest; uint8 stays uint8 (3x faster than float on CPU; bilinear
    differs from resizing in float by at most one grey level, the rounding); other integer types go through float."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    planar = x.ndim == 2
    batch = x[None, None] if planar else x[None]
    native = x.dtype == torch.uint8 or x.is_floating_point()
    work = batch if native else batch.double()
    if mode == "bilinear":
        resized = F.interpolate(work, size=size, mode="bilinear", align_corners=False)
    else:
        resized = F.interpolate(work, size=size, mode="nearest")
    resized = resized if native else resized.round().to(x.dtype)
    return resized[0, 0] if planar else resized[0]


def place_map(x: torch.Tensor, placement: Placement, mode: str, fill: float) -> torch.Tensor:
    """A map at the policy's size → the augmented sample's pixels: rescale to `placement.size`, crop `placement.box`
    (padding the bottom and right with `fill` where the box extends past the map), flip. The one transform that
    images (bilinear, 0), labels (nearest, 255) and the per-sample store's maps share, so that they stay aligned."""
    x = resize_map(x, placement.size, mode)
    top, left, crop_h, crop_w = placement.box
    height, width = x.shape[-2:]
    pad_h, pad_w = max(0, top + crop_h - height), max(0, left + crop_w - width)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), value=fill)
    if (top, left, crop_h, crop_w) != (0, 0, height, width):
        x = x[..., top : top + crop_h, left : left + crop_w]
    return x.flip(-1) if placement.flip else x


def _resize_sample(sample: dict[str, torch.Tensor], size: tuple[int, int], resize_label: bool) -> None:
    """Image bilinear, label nearest (see `resize_map`)."""
    if tuple(sample["image"].shape[-2:]) == tuple(size):
        return
    sample["image"] = resize_map(sample["image"], size, "bilinear")
    if "label" in sample and resize_label:
        sample["label"] = resize_map(sample["label"], size, "nearest")


def augment_sample(sample: dict[str, torch.Tensor], policy: Policy, augment: Augment) -> dict[str, torch.Tensor]:
    """Resize, scale, crop (labels padded with 255 where the crop is larger than the image), flip; the sample also
    gets its placement as tensors (`aug_size`, `aug_scale`, `aug_crop`, `aug_flip`: Batch.*_augmentation)."""
    if policy.size is not None:
        _resize_sample(sample, policy.size, True)
    height, width = sample["image"].shape[-2:]
    placement = Placement.of(policy, augment, height, width)
    sample["image"] = place_map(sample["image"], placement, "bilinear", 0)
    if "label" in sample:
        sample["label"] = place_map(sample["label"], placement, "nearest", IGNORE_INDEX)
    sample.update(placement.as_tensors(augment.scale))
    return sample


def decode_row(row: dict, num_classes: int) -> dict[str, torch.Tensor]:
    """A Parquet row → tensors before any transform: image (C, H, W) uint8, label (H, W) uint8, image_labels (K,)
    float32, spacing_mm (2,) float64. `finish` makes them model inputs.

    Where the label column was read but the row has none (a source image with image-level labels only), the label
    is all `IGNORE_INDEX`; where the image_labels column was read but the row has none and its label is known, the
    image-level labels are the classes present in the label."""
    image = _tensor(decode_array(row["image"]))
    sample = {"image": image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)}
    if row.get("label") is not None:
        sample["label"] = _tensor(decode_array(row["label"]))
    elif "label" in row:
        sample["label"] = torch.full(tuple(sample["image"].shape[-2:]), IGNORE_INDEX, dtype=torch.uint8)
    if row.get("spacing_mm") is not None:
        sample["spacing_mm"] = torch.tensor(row["spacing_mm"], dtype=torch.float64)
    classes = row.get("image_labels")
    if classes is None and "image_labels" in row and row.get("label") is not None:
        present = torch.bincount(sample["label"].flatten().long(), minlength=256)[:num_classes]
        classes = torch.nonzero(present).flatten().tolist()
    if classes is not None:
        vector = torch.zeros(num_classes)
        vector[list(classes)] = 1
        sample["image_labels"] = vector
    return sample


def _tensor(array: np.ndarray) -> torch.Tensor:
    """torch shares the array's memory; only a read-only array (PNG decoded by PIL) is copied first."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def finish(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model inputs: image float32 in [0, 1] (contiguous), label int64."""
    if sample["image"].dtype == torch.uint8:
        sample["image"] = sample["image"].contiguous().float().div_(255)
    if "label" in sample:
        sample["label"] = sample["label"].long()
    return sample


def decode_sample(
    row: dict, num_classes: int, size: tuple[int, int] | None, flip: bool, resize_label: bool = True
) -> dict[str, torch.Tensor]:
    """A Parquet row → model inputs (see `finish`), resized to `size` and flipped if asked."""
    return _prepare(decode_row(row, num_classes), size, flip, resize_label)


def _prepare(
    sample: dict[str, torch.Tensor], size: tuple[int, int] | None, flip: bool, resize_label: bool
) -> dict[str, torch.Tensor]:
    """decode_row's sample → model inputs: resized, flipped, `finish`ed (new tensors; the sample's are not
    modified, so that DECODED's stay as decoded)."""
    sample = dict(sample)
    if size is not None:
        _resize_sample(sample, size, resize_label)
    if flip:
        sample["image"] = sample["image"].flip(-1)
        if "label" in sample:
            sample["label"] = sample["label"].flip(-1)
    return finish(sample)


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


@dataclass(frozen=True)
class Split:
    """A split as DecodedRows knows it: its shards with their versions as listed (`RowGroup.version`), and its row
    count."""

    shards: tuple[tuple[str, tuple | None], ...]
    rows: int

    @classmethod
    def of(cls, groups: Sequence[RowGroup]) -> Split:
        return cls(tuple(dict.fromkeys((g.path, g.version) for g in groups)), sum(g.num_rows for g in groups))

    @property
    def local(self) -> bool:
        return all(version is not None for _, version in self.shards)


CACHE_ENV = "UDA_DECODED_CACHE_MB"
DEFAULT_CACHE_MB = 512


def cache_budget() -> int:
    """Bytes of decoded rows a process may keep (`UDA_DECODED_CACHE_MB`; 0 keeps none); ValueError naming the
    variable if it is not a number of megabytes."""
    text = os.environ.get(CACHE_ENV, str(DEFAULT_CACHE_MB))
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0:
        raise ValueError(f"{CACHE_ENV} must be a number of megabytes >= 0, e.g. {DEFAULT_CACHE_MB} (got {text!r})")
    return int(megabytes * 2**20)


class DecodedRows:
    """Rows decoded once and kept in this process's memory as `decode_row` gives them (uint8, before any resize or
    augmentation), for splits that fit the memory budget whole: every epoch of a training stream and every
    evaluation then skips zstd/PNG decoding, which a one-CPU trial does in its training thread (a sweep's trials that
    reuse a Tune process share them). A split (with the columns read) is admitted when its first row is decoded: its
    row count times that row's size is reserved if it fits in what is left of the budget, else the split is never
    kept and streams as before (a large dataset costs no memory here); a split never grows past its reservation.
    Only local shards are kept, and a shard listed with another size, modification time or inode (rewritten,
    repaired, regenerated) starts a new split and evicts the old one's rows. Thread-safe; a decoded sample is shared,
    never modified (`_prepare` and `augment_sample` make new tensors)."""

    def __init__(self, budget_bytes: int | None = None):
        self._budget = budget_bytes  # None: cache_budget() on first use
        self.reserved = 0
        self._kept: dict[tuple, list[int] | None] = {}  # (split, columns) → [reserved, stored] bytes, None: not kept
        self._rows: dict[tuple, dict[str, torch.Tensor]] = {}  # (split, columns, path, group, row, classes)
        self._lock = threading.Lock()

    @property
    def budget(self) -> int:
        if self._budget is None:
            self._budget = cache_budget()
        return self._budget

    def sample(self, split: Split, group: RowGroup, row: int, raw: dict, num_classes: int) -> dict[str, torch.Tensor]:
        """decode_row(raw) for row `row` of `group`, one of the row groups of `split`."""
        if not split.local:
            return decode_row(raw, num_classes)
        entry = (split, tuple(sorted(raw)))
        key = (*entry, group.path, group.index, row, num_classes)
        with self._lock:
            found = self._rows.get(key)
            refused = entry in self._kept and self._kept[entry] is None
        if found is not None:
            return found
        sample = decode_row(raw, num_classes)
        if refused:
            return sample
        size = sum(t.untyped_storage().nbytes() for t in sample.values())
        with self._lock:
            if entry not in self._kept:
                self._evict_older(split)
                need = split.rows * size
                fits = need <= self.budget - self.reserved
                self._kept[entry] = [need, 0] if fits else None
                self.reserved += need if fits else 0
            kept = self._kept[entry]
            if kept is not None and key not in self._rows and kept[1] + size <= kept[0]:
                self._rows[key] = sample
                kept[1] += size
        return sample

    def _evict_older(self, split: Split) -> None:
        """Drop the splits that list one of `split`'s shards with another version (caller holds the lock)."""
        paths = dict(split.shards)
        stale = [
            entry
            for entry in self._kept
            if any(path in paths and paths[path] != version for path, version in entry[0].shards)
        ]
        for entry in stale:
            kept = self._kept.pop(entry)
            self.reserved -= kept[0] if kept is not None else 0
        if stale:
            gone = set(stale)
            self._rows = {key: value for key, value in self._rows.items() if key[:2] not in gone}


DECODED = DecodedRows()  # this process's


class _RowGroupReader:
    """Reads and caches the last row groups it was asked for (the memory bound); safe to share between threads.

    A group is read once, by the first thread that asks for it, outside the lock: other threads keep decoding rows of
    cached groups meanwhile, and those that need the group being read wait for it. `read_ahead` starts reading a group
    in a background thread, so that the decoders find it ready. Local shards are memory-mapped, and binary cells
    (image, label) are handed out as zero-copy slices of the row group's data buffer rather than Python bytes: at GTA5
    size, copying them cost as much as decoding.
    """

    def __init__(self, columns: Sequence[str], cached_groups: int = 2):
        self.columns = list(columns)
        self.cached_groups = cached_groups
        self._files: dict[str, tuple[pq.ParquetFile, threading.Lock]] = {}
        self._cache: dict[tuple[str, int], Future] = {}
        self._lock = threading.Lock()
        self._ahead: ThreadPoolExecutor | None = None

    def rows(self, group: RowGroup) -> list[dict]:
        entry, owner = self._entry(group)
        if owner:
            self._load(group, entry)
        return entry.result()

    def read_ahead(self, group: RowGroup) -> None:
        entry, owner = self._entry(group)
        if owner:
            if self._ahead is None:
                self._ahead = ThreadPoolExecutor(1, thread_name_prefix="uda-read-ahead")
            self._ahead.submit(self._load, group, entry)

    def close(self) -> None:
        """Wait for a read in progress and stop the read-ahead thread (a later `read_ahead` starts a new one)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.shutdown(wait=True)

    def _entry(self, group: RowGroup) -> tuple[Future, bool]:
        """The group's cache entry, and whether the caller must load it (it is the first to ask)."""
        key = (group.path, group.index)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                return entry, False
            while len(self._cache) >= self.cached_groups:
                self._cache.pop(next(iter(self._cache)))  # waiting threads hold their own reference
            entry = self._cache[key] = Future()
            return entry, True

    def _load(self, group: RowGroup, entry: Future) -> None:
        try:
            with self._lock:
                if group.path not in self._files:
                    self._files[group.path] = (_open(group.path), threading.Lock())
                shard, shard_lock = self._files[group.path]
            with shard_lock:  # one read at a time per file: pyarrow does not promise a thread-safe ParquetFile
                table = shard.read_row_group(group.index, columns=self.columns)
            entry.set_result(_table_rows(table))
        except Exception as error:  # a truncated or corrupt shard: name it (and let a later call try again)
            with self._lock:
                if self._cache.get((group.path, group.index)) is entry:
                    del self._cache[(group.path, group.index)]
            if isinstance(error, OSError) and group.path in str(error):
                entry.set_exception(error)
            else:
                entry.set_exception(OSError(f"cannot read row group {group.index} of {group.path}: {error}"))


def _table_rows(table: pa.Table) -> list[dict]:
    columns = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_binary(column.type):
            columns[name] = [cell for chunk in column.chunks for cell in _binary_cells(chunk)]
        else:
            columns[name] = column.to_pylist()
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _binary_cells(chunk: pa.BinaryArray) -> list[pa.Buffer | None]:
    """The cells of a binary array as zero-copy slices of its data buffer (None where null)."""
    if len(chunk) == 0:
        return []
    _, offsets, data = chunk.buffers()
    ends = np.frombuffer(offsets, np.int32, count=len(chunk) + 1, offset=chunk.offset * 4)
    nulls = chunk.is_null().to_numpy(zero_copy_only=False) if chunk.null_count else np.zeros(len(chunk), bool)
    return [
        None if null else data.slice(int(start), int(end - start))
        for start, end, null in zip(ends[:-1], ends[1:], nulls)
    ]


class TrainStream:
    """Infinite iterator of training batches for one rank; see the module docstring for the order.

    Batches come as decoded: image (B, C, H, W) uint8, label (B, H, W) uint8 (plus image_labels, spacing_mm where
    read), each sample's row index in the split (`index`, (B,) int64) and its placement (`aug_size` (B, 2),
    `aug_scale` (B,), `aug_crop` (B, 4), `aug_flip` (B,): what `Batch.*_augmentation` carries). The consumer moves them to its device and calls `finish` there: a quarter of the bytes to copy to a GPU, and
    the float conversion of a whole batch (a fresh 4-byte-per-pixel allocation, page faults included) leaves the
    decode threads.
    """

    def __init__(
        self,
        files: Sequence[str],
        columns: Sequence[str],
        batch_size: int,
        num_classes: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        size: tuple[int, int] | None = None,
        hflip: bool = False,
        start_sample: int = 0,
        policy: Policy | None = None,
        threads: int = 2,
        prefetch: int = 2,
        exclude: Collection[int] = (),
    ):
        self.groups = row_groups(files)
        self.split = Split.of(self.groups)
        self.exclude = frozenset(exclude)  # row indices never drawn (the source-validation slice)
        if not self.groups:
            raise ValueError(f"no rows in {', '.join(files) or '(no files)'}")
        if len(self.groups) < world_size:
            raise ValueError(f"{len(self.groups)} row groups cannot be split over {world_size} workers")
        self.batch_size, self.num_classes, self.seed = batch_size, num_classes, seed
        self.rank, self.world_size = rank, world_size
        self.policy = policy or Policy(size=size, hflip=hflip)
        self.start_sample = start_sample
        self.threads, self.prefetch = threads, prefetch
        self.reader = _RowGroupReader(columns, cached_groups=3)  # the one being read ahead, two being decoded
        self.num_samples = sum(self._kept(g) for g in self.groups)
        if not self.num_samples:
            raise ValueError(f"every row of {', '.join(files)} is excluded")

    def _kept(self, group: RowGroup) -> int:
        """The rows of `group` the stream draws (all but the excluded ones)."""
        if not self.exclude:
            return group.num_rows
        return sum(1 for r in range(group.offset, group.offset + group.num_rows) if r not in self.exclude)

    def _epoch_groups(self, epoch: int) -> list[RowGroup]:
        shared = np.random.default_rng([self.seed, epoch])
        return [self.groups[g] for g in shared.permutation(len(self.groups))[self.rank :: self.world_size]]

    def _epoch_order(self, epoch: int) -> list[tuple[RowGroup, int, Augment]]:
        local = np.random.default_rng([self.seed, epoch, 1 + self.rank])
        order = []
        for group in self._epoch_groups(epoch):
            rows = local.permutation(group.num_rows)
            order.extend((group, int(r)) for r in rows if group.offset + int(r) not in self.exclude)
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

    def _group_sequence(self) -> Iterator[RowGroup]:
        """The row groups in the order `_indices` reads them (the samples of an epoch are grouped by row group)."""
        skip = self.start_sample
        for epoch in itertools.count():
            for group in self._epoch_groups(epoch):
                kept = self._kept(group)
                if skip >= kept:  # an excluded group (kept 0) is never read
                    skip -= kept
                    continue
                skip = 0
                yield group

    def _batch(self, items: list[tuple[RowGroup, int, Augment]]) -> dict[str, torch.Tensor]:
        """Read, decode and augment one batch (one pool task), stacked as it was decoded (uint8)."""
        samples = []
        for group, row, augment in items:
            decoded = DECODED.sample(self.split, group, row, self.reader.rows(group)[row], self.num_classes)
            sample = augment_sample(dict(decoded), self.policy, augment)
            sample["index"] = torch.tensor(group.offset + row, dtype=torch.int64)
            samples.append(sample)
        return collate(samples)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        indices = self._indices()
        batches = iter(lambda: list(itertools.islice(indices, self.batch_size)), None)
        sequence = self._group_sequence()
        current, following = next(sequence), next(sequence)

        def read_ahead(items: list[tuple[RowGroup, int, Augment]]) -> None:
            """When a batch starts a row group, start reading the one after it (a no-op if cached or under way)."""
            nonlocal current, following
            for group, _, _ in items:
                while group != current:
                    current, following = following, next(sequence)
            self.reader.read_ahead(following)

        try:
            if self.threads <= 1:  # decode in the caller's thread; reading still overlaps (I/O on NFS or s3://)
                for items in batches:
                    read_ahead(items)
                    yield self._batch(items)
                return
            with ThreadPoolExecutor(self.threads, thread_name_prefix="uda-decode") as pool:
                pending: deque = deque()
                for items in batches:
                    read_ahead(items)
                    pending.append(pool.submit(self._batch, items))
                    if len(pending) > max(self.prefetch, self.threads):
                        yield pending.popleft().result()
        finally:
            self.reader.close()


def first_rows(files: Sequence[str], columns: Sequence[str], count: int, skip: Collection[int] = ()) -> list[dict]:
    """The first `count` rows of a split, in file order, without the row indices in `skip`."""
    reader, rows, skip = _RowGroupReader(columns), [], frozenset(skip)
    for group in row_groups(files):
        kept = [row for i, row in enumerate(reader.rows(group)) if group.offset + i not in skip]
        rows.extend(kept[: count - len(rows)])
        if len(rows) >= count:
            break
    return rows


def eval_batches(
    files: Sequence[str],
    columns: Sequence[str],
    batch_size: int,
    num_classes: int,
    rank: int = 0,
    world_size: int = 1,
    size: tuple[int, int] | None = None,
    rows: Collection[int] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Every row of the split once (this rank's share: row groups g with g % world_size == rank), in file order, with
    each row's index in the split (`index`); only the row indices in `rows` where given (groups without one are not
    read).

    Images are resized to `size` (the resolution the model segments at); labels keep their full resolution, because
    evaluation is at label resolution. A batch only holds samples of one image size.
    """
    reader = _RowGroupReader(columns)
    batch: list[dict[str, torch.Tensor]] = []
    wanted = None if rows is None else frozenset(rows)
    groups = row_groups(files)
    split = Split.of(groups)
    for index, group in enumerate(groups):
        if index % world_size != rank:
            continue
        if wanted is not None and wanted.isdisjoint(range(group.offset, group.offset + group.num_rows)):
            continue
        for position, row in enumerate(reader.rows(group)):
            if wanted is not None and group.offset + position not in wanted:
                continue
            sample = _prepare(DECODED.sample(split, group, position, row, num_classes), size, False, False)
            sample["index"] = torch.tensor(group.offset + position, dtype=torch.int64)
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
