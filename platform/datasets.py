"""Datasets on disk: Parquet shards plus a manifest, the one layout that every task reads, real or synthetic.

    <root>/<dataset>/manifest.json
    <root>/<dataset>/<split>/part-00000.parquet, part-00001.parquet, ...

One row per image:

    id            string        stable sample id (the original file stem)
    image         binary        encoded uint8 array (see Codecs): RGB, or grey for single-channel sets
    label         binary        encoded uint8 class ids (trainIds), 255 = ignore; null where the split has none
    image_labels  list<int16>   class ids present at image level (weak labels); null where the set defines none
    height, width int32         image size in pixels
    spacing_mm    list<float32> pixel size (row, column) in millimetres (medical sets); null elsewhere

Shards are written under a temporary name and renamed when complete; the manifest is written last, so a dataset
without `manifest.json` is incomplete by definition and never read. The manifest records counts, class pixel
histograms, image sizes, pixel spacing (medical sets) and a content fingerprint (sha256 over the shards) that every
MLflow run records as a tag.

Codecs (`encode_array(array, codec)`; `decode_array` recognises either from the bytes, so readers never need to know):

    png    PNG, compression level 1 (compact: about the size of the official files)
    zstd   b"UDAZ", height, width, channels as little-endian uint32 (channels 0 = a 2-D array), then the raw uint8
           array compressed with Zstandard. Decodes several times faster than PNG (no inflate + unfilter pass in
           Python's PIL, and pyarrow's decompressor releases the GIL) at a larger size on disk; the converters'
           default because decoding is what limits the stream (benchmarks/data_throughput.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

FORMAT_VERSION = 1
IGNORE_INDEX = 255

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.binary()),
        pa.field("image_labels", pa.list_(pa.int16())),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("spacing_mm", pa.list_(pa.float32())),
    ]
)


# Cells are already compressed (PNG or zstd) and unique: Parquet compression and dictionary encoding would only cost
# time (a dictionary page of a row group's images had to be decoded before any image could be read).
_WRITE_OPTIONS = {"compression": "none", "use_dictionary": False}


class DatasetNotFoundError(FileNotFoundError):
    def __str__(self) -> str:
        return str(self.args[0])


class DamagedDatasetError(DatasetNotFoundError):
    """A shard is missing, truncated or altered; the message names it and the command that repairs it."""


@dataclass
class SplitInfo:
    count: int
    files: list[str]  # relative to the dataset directory
    has_labels: bool
    has_image_labels: bool
    image_sizes: list[list[int]]  # distinct (height, width) pairs
    class_pixels: list[int]  # pixels per class id over the split (ignore excluded)


@dataclass
class Manifest:
    name: str
    num_classes: int
    class_names: list[str]
    channels: int
    label_map: str  # which mapping produced the class ids (e.g. "cityscapes-trainIds")
    splits: dict[str, SplitInfo]
    fingerprint: str = ""
    pixel_spacing_mm: float | None = None
    source: dict[str, Any] = field(default_factory=dict)  # how it was produced (converter, generator + seed)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # samples left out, with the reason
    format_version: int = FORMAT_VERSION
    # every shard's size and checksum, {relative path: {"bytes": n, "sha256": hex}}: `damaged_shards` compares them
    # (sizes before every sweep, checksums when `convert` runs again); empty in manifests written before 2026-12
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        raw["splits"] = {name: SplitInfo(**info) for name, info in raw["splits"].items()}
        return cls(**raw)


def is_uri(path: str) -> bool:
    """A path for one of pyarrow's filesystems (s3://bucket/data, gs://..., hdfs://...) rather than a local one."""
    return "://" in path


def resolve_root(root: str) -> str:
    """A data root as the workers must see it: local paths absolute (trial processes change directory), URIs as given."""
    return root if is_uri(root) else os.path.abspath(os.path.expanduser(root))


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if is_uri(root) else os.path.join(root, *parts)


def dataset_dir(root: str, dataset: str) -> str:
    return join(root, dataset)


def _read_text(path: str) -> str | None:
    """The file's text, or None if it does not exist (local path or URI)."""
    if not is_uri(path):
        if not os.path.isfile(path):
            return None
        with open(path) as handle:
            return handle.read()
    import pyarrow.fs as pafs

    filesystem, inner = pafs.FileSystem.from_uri(path)
    if filesystem.get_file_info(inner).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(inner) as handle:
        return handle.read().decode()


def read_manifest(root: str, dataset: str) -> Manifest:
    """The dataset's manifest under `root` (a local directory or a URI such as s3://bucket/data)."""
    text = _read_text(join(dataset_dir(root, dataset), "manifest.json"))
    if text is None:
        raise DatasetNotFoundError(f"dataset {dataset!r} is not prepared under {root} (no {dataset}/manifest.json)")
    return Manifest.from_json(text)


def split_files(root: str, dataset: str, split: str) -> list[str]:
    manifest = read_manifest(root, dataset)
    if split not in manifest.splits:
        raise DatasetNotFoundError(f"dataset {dataset!r} has no split {split!r}; it has {', '.join(manifest.splits)}")
    return [join(dataset_dir(root, dataset), *f.split("/")) for f in manifest.splits[split].files]


CODECS = ("png", "zstd")
_ZSTD_MAGIC = b"UDAZ"
_ZSTD_HEADER = struct.Struct("<4sIII")


def encode_array(array: np.ndarray, codec: str = "png") -> bytes:
    """uint8 (H, W) or (H, W, C) → bytes in `codec` (see the module docstring)."""
    if array.dtype != np.uint8:
        raise ValueError(f"only uint8 arrays are stored (got {array.dtype})")
    if codec == "png":
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()
    if codec == "zstd":
        height, width = array.shape[:2]
        channels = array.shape[2] if array.ndim == 3 else 0
        body = pa.compress(np.ascontiguousarray(array), codec="zstd", asbytes=True)
        return _ZSTD_HEADER.pack(_ZSTD_MAGIC, height, width, channels) + body
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def decode_array(data: bytes) -> np.ndarray:
    """Bytes from `encode_array` (either codec) → the uint8 array (writable for zstd, read-only for PNG)."""
    if data[:4] == _ZSTD_MAGIC:
        _, height, width, channels = _ZSTD_HEADER.unpack_from(data)
        shape = (height, width, channels) if channels else (height, width)
        size = height * width * max(channels, 1)
        body = memoryview(data)[_ZSTD_HEADER.size :]
        return np.frombuffer(pa.decompress(body, decompressed_size=size, codec="zstd"), dtype=np.uint8).reshape(shape)
    return np.asarray(Image.open(io.BytesIO(data)))


def sample_row(
    sample_id: str,
    image: np.ndarray,
    label: np.ndarray | None,
    image_labels: Iterable[int] | None,
    spacing_mm: tuple[float, float] | None = None,
    codec: str = "png",
) -> dict[str, Any]:
    return {
        "id": sample_id,
        "image": encode_array(image, codec),
        "label": None if label is None else encode_array(label, codec),
        "image_labels": None if image_labels is None else [int(c) for c in image_labels],
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "spacing_mm": None if spacing_mm is None else [float(v) for v in spacing_mm],
    }


def write_shard(path: str, rows: list[dict[str, Any]], rows_per_group: int) -> None:
    """One complete shard: written under a temporary name, renamed when whole (a shard is visible only complete)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with pq.ParquetWriter(path + ".tmp", SCHEMA, **_WRITE_OPTIONS) as writer:
        for start in range(0, len(rows), rows_per_group):
            writer.write_table(pa.Table.from_pylist(rows[start : start + rows_per_group], schema=SCHEMA))
    os.replace(path + ".tmp", path)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class SplitWriter:
    """Writes one split as shards of `rows_per_file` rows in row groups of `rows_per_group` (streaming granularity)."""

    def __init__(self, out_dir: str, split: str, num_classes: int, rows_per_group: int = 32, rows_per_file: int = 1024):
        self.out_dir, self.split, self.num_classes = out_dir, split, num_classes
        self.rows_per_group, self.rows_per_file = rows_per_group, rows_per_file
        self.files: list[str] = []
        self.count = 0
        self.has_labels = self.has_image_labels = False
        self.sizes: set[tuple[int, int]] = set()
        self.class_pixels = np.zeros(num_classes, dtype=np.int64)
        self._pending: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)

    def add(self, row: Mapping[str, Any], label: np.ndarray | None = None) -> None:
        """Append one row (from `sample_row`); pass the decoded label to count class pixels without re-decoding."""
        self._pending.append(dict(row))
        self.count += 1
        self.sizes.add((row["height"], row["width"]))
        self.has_labels |= row["label"] is not None
        self.has_image_labels |= row["image_labels"] is not None
        if label is not None:
            valid = label[label != IGNORE_INDEX]
            self.class_pixels += np.bincount(valid.ravel(), minlength=self.num_classes)[: self.num_classes]
        if len(self._pending) >= self.rows_per_group:
            self._flush_group()

    def _flush_group(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._open_file()
        self._writer.write_table(pa.Table.from_pylist(self._pending, schema=SCHEMA))
        self._rows_in_file += len(self._pending)
        self._pending = []
        if self._rows_in_file >= self.rows_per_file:
            self._close_file()

    def _open_file(self) -> None:
        name = f"part-{len(self.files):05d}.parquet"
        self._current = os.path.join(self.out_dir, self.split, name)
        self._writer = pq.ParquetWriter(self._current + ".tmp", SCHEMA, **_WRITE_OPTIONS)
        self._rows_in_file = 0

    def _close_file(self) -> None:
        assert self._writer is not None
        self._writer.close()
        os.replace(self._current + ".tmp", self._current)
        self.files.append(os.path.relpath(self._current, self.out_dir))
        self._writer = None

    def close(self) -> SplitInfo:
        self._flush_group()
        if self._writer is not None:
            self._close_file()
        return SplitInfo(
            count=self.count,
            files=self.files,
            has_labels=self.has_labels,
            has_image_labels=self.has_image_labels,
            image_sizes=sorted([list(s) for s in self.sizes]),
            class_pixels=self.class_pixels.tolist(),
        )


def finalize(out_dir: str, manifest: Manifest) -> Manifest:
    """Fingerprint the shards, record each one's size and checksum, and write manifest.json last (atomically): from
    here on the dataset is complete."""
    digest = hashlib.sha256()
    manifest.shards = {}
    for split in sorted(manifest.splits):
        for relative in manifest.splits[split].files:
            path = os.path.join(out_dir, relative)
            checksum = _file_sha256(path)
            digest.update(relative.encode())
            digest.update(checksum.encode())
            manifest.shards[relative] = {"bytes": os.path.getsize(path), "sha256": checksum}
    manifest.fingerprint = "sha256:" + digest.hexdigest()
    temporary = os.path.join(out_dir, "manifest.json.tmp")
    with open(temporary, "w") as handle:
        handle.write(manifest.to_json())
    os.replace(temporary, os.path.join(out_dir, "manifest.json"))
    return manifest


def damaged_shards(root: str, manifest: Manifest, checksums: bool = False) -> list[tuple[str, str]]:
    """(relative path, what is wrong) for every shard of the dataset whose file is missing or whose size (and, with
    `checksums`, sha256) differs from the manifest's record. Sizes cost one stat per shard (local) or one metadata
    request (URIs); checksums read every byte."""
    base = dataset_dir(root, manifest.name)
    damaged = []
    for relative, record in sorted(manifest.shards.items()):
        path = join(base, *relative.split("/"))
        size = _size(path)
        if size is None:
            damaged.append((relative, "missing"))
        elif size != record["bytes"]:
            damaged.append((relative, f"{size} bytes, the manifest says {record['bytes']}"))
        elif checksums and not is_uri(path) and _file_sha256(path) != record["sha256"]:
            damaged.append((relative, "its checksum differs from the manifest's"))
    return damaged


def _size(path: str) -> int | None:
    if not is_uri(path):
        return os.path.getsize(path) if os.path.isfile(path) else None
    import pyarrow.fs as pafs

    filesystem, inner = pafs.FileSystem.from_uri(path)
    info = filesystem.get_file_info(inner)
    return info.size if info.type == pafs.FileType.File else None


def iter_rows(path: str, columns: list[str]) -> Iterator[dict[str, Any]]:
    """All rows of one shard (used by tests and small tools; training reads through platform.stream)."""
    table = pq.read_table(path, columns=columns)
    yield from table.to_pylist()
