"""The per-sample target store: per-image maps a `TargetPass` computes (pseudo labels, superpixels, confidences),
kept outside `training_state.pt` and read back by every training step at the rows of its batch.

Layout of one pass's maps (a *version*), under the trial's store root, which lives in the trial's storage (the sweep's
storage path, a shared filesystem or an object store on clusters):

    <store root>/pass-<global step>-<stage index>/
        <map>.rank-<r>.bin         the maps of rank r's rows, raw, in the map's dtype, one after another
        <map>.rank-<r>.index.npy   (rows, 5) int64: row index in the split, byte offset, channels, height, width
        COMPLETE                   written by rank 0 when every rank's parts are there (a version without it is
                                   incomplete and never read)

Each rank computes the maps of its own share of the target set (the pass is sharded like evaluation) and writes its
parts; after a barrier, every rank opens every part, because every rank streams different rows each epoch. Reading
is by memory map, so a reader's memory stays bounded whatever the split's size (the OS pages maps in and out). Where
the store root is a URI (s3://...), parts are written to a local cache, uploaded, and the parts of other ranks are
downloaded to the local cache before they are mapped.

A checkpoint records the version in force (`training_state.pt` → "store"), so that a trial restored from it, on
this node or another, reads the maps computed by the model of that time. After each checkpoint the loop keeps the
versions that the checkpoints Ray or Tune still keep name, and the one in use, and deletes the rest (`prune`: rank 0
in the store, every rank in its local cache); a trial that keeps every checkpoint (PBT) keeps every version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow.fs as pafs
import torch

from methods.contract import SampleMap
from platform.datasets import is_uri

COMPLETE = "COMPLETE"
_NUMPY = {
    torch.uint8: np.uint8,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.bool: np.bool_,
}


def version_name(global_step: int, stage_index: int) -> str:
    return f"pass-{global_step:08d}-{stage_index}"


def _numpy_dtype(spec: SampleMap) -> np.dtype:
    if spec.dtype not in _NUMPY:
        raise ValueError(f"SampleMap dtype {spec.dtype} is not supported; use one of {sorted(map(str, _NUMPY))}")
    return np.dtype(_NUMPY[spec.dtype])


def local_cache(root: str) -> str:
    """Where parts of a URI store root live on this node (a local store root is its own cache)."""
    if not is_uri(root):
        return root
    digest = hashlib.sha256(root.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "uda-store", digest)


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(root):
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), root


class StoreWriter:
    """Writes one rank's maps of one version (`add` per batch, then `close`)."""

    def __init__(self, root: str, version: str, specs: Mapping[str, SampleMap], rank: int):
        self.root, self.version, self.specs, self.rank = root, version, dict(specs), rank
        self.directory = os.path.join(local_cache(root), version)
        os.makedirs(self.directory, exist_ok=True)
        self._files = {name: open(self._part(name, ".bin"), "wb") for name in self.specs}
        self._index: dict[str, list[tuple[int, int, int, int, int]]] = {name: [] for name in self.specs}
        self._offsets = dict.fromkeys(self.specs, 0)

    def _part(self, name: str, suffix: str) -> str:
        return os.path.join(self.directory, f"{name}.rank-{self.rank}{suffix}")

    def add(self, name: str, indices: torch.Tensor, maps: torch.Tensor) -> None:
        """maps (B, H, W) or (B, C, H, W) for the rows `indices` (B,)."""
        spec = self.specs[name]
        expected = 3 if spec.channels == 0 else 4
        if maps.ndim != expected or (spec.channels and maps.shape[1] != spec.channels):
            shape = "(B, H, W)" if spec.channels == 0 else f"(B, {spec.channels}, H, W)"
            raise ValueError(f"target pass output {name!r} must be {shape} per SampleMap (got {tuple(maps.shape)})")
        array = maps.detach().cpu().to(spec.dtype).numpy().astype(_numpy_dtype(spec), copy=False)
        for index, item in zip(indices.tolist(), array):
            data = np.ascontiguousarray(item).tobytes()
            channels = item.shape[0] if item.ndim == 3 else 0
            self._files[name].write(data)
            self._index[name].append((int(index), self._offsets[name], channels, *item.shape[-2:]))
            self._offsets[name] += len(data)

    def close(self) -> None:
        for name, handle in self._files.items():
            handle.close()
            np.save(self._part(name, ".index.npy"), np.asarray(self._index[name], dtype=np.int64).reshape(-1, 5))
        if is_uri(self.root):
            filesystem, base = _filesystem(self.root)
            target = f"{base}/{self.version}"
            filesystem.create_dir(target, recursive=True)
            for name in self.specs:
                for suffix in (".bin", ".index.npy"):
                    part = os.path.basename(self._part(name, suffix))
                    pafs.copy_files(self._part(name, suffix), f"{target}/{part}", destination_filesystem=filesystem)


def mark_complete(root: str, version: str, specs: Mapping[str, SampleMap], world_size: int) -> None:
    """Rank 0, after every rank closed its writer: the version may be read."""
    text = json.dumps({"maps": sorted(specs), "world_size": world_size})
    filesystem, base = _filesystem(root)
    with filesystem.open_output_stream(f"{base}/{version}/{COMPLETE}") as stream:
        stream.write(text.encode())


def prune(root: str, keep: set[str], in_store: bool) -> None:
    """Delete every version (complete or not) but those in `keep`: from the store itself where `in_store` (rank 0),
    and from this node's local cache of a URI store (every rank)."""
    if in_store:
        filesystem, base = _filesystem(root)
        if filesystem.get_file_info(base).type != pafs.FileType.NotFound:
            for info in filesystem.get_file_info(pafs.FileSelector(base)):
                if info.type == pafs.FileType.Directory and info.base_name not in keep:
                    filesystem.delete_dir(f"{base}/{info.base_name}")
    cache = local_cache(root)
    if is_uri(root) and os.path.isdir(cache):
        for name in os.listdir(cache):
            if name not in keep:
                shutil.rmtree(os.path.join(cache, name), ignore_errors=True)


def versions(root: str) -> list[str]:
    """Complete versions under the store root, oldest first."""
    filesystem, base = _filesystem(root)
    if filesystem.get_file_info(base).type == pafs.FileType.NotFound:
        return []
    found = filesystem.get_file_info(pafs.FileSelector(base))
    names = sorted(info.base_name for info in found if info.type == pafs.FileType.Directory)
    return [name for name in names if exists(root, name)]


def exists(root: str, version: str) -> bool:
    filesystem, base = _filesystem(root)
    return filesystem.get_file_info(f"{base}/{version}/{COMPLETE}").type == pafs.FileType.File


class SampleStore:
    """Read access to one complete version: `read(name, indices)` → the rows' maps as numpy arrays."""

    def __init__(self, root: str, version: str, specs: Mapping[str, SampleMap]):
        if not exists(root, version):
            raise FileNotFoundError(f"per-sample store version {version} is not complete under {root}")
        self.root, self.version, self.specs = root, version, dict(specs)
        filesystem, base = _filesystem(root)
        with filesystem.open_input_stream(f"{base}/{version}/{COMPLETE}") as stream:
            world_size = json.loads(stream.read().decode())["world_size"]
        directory = os.path.join(local_cache(root), version)
        self._rows: dict[str, dict[int, tuple[np.memmap, int, tuple[int, ...]]]] = {}
        self._dtypes: dict[str, np.dtype] = {}
        for name, spec in self.specs.items():
            dtype, rows = _numpy_dtype(spec), {}
            for rank in range(world_size):
                data_path = os.path.join(directory, f"{name}.rank-{rank}.bin")
                index_path = os.path.join(directory, f"{name}.rank-{rank}.index.npy")
                if is_uri(root) and not (os.path.isfile(data_path) and os.path.isfile(index_path)):
                    self._download(filesystem, f"{base}/{version}", directory, name, rank)
                index = np.load(index_path)
                data = np.memmap(data_path, dtype=np.uint8, mode="r") if os.path.getsize(data_path) else None
                for row, offset, channels, height, width in index.tolist():
                    shape = (channels, height, width) if channels else (height, width)
                    rows[row] = (data, offset, shape)
            self._rows[name], self._dtypes[name] = rows, dtype

    @staticmethod
    def _download(filesystem: pafs.FileSystem, remote: str, directory: str, name: str, rank: int) -> None:
        os.makedirs(directory, exist_ok=True)
        for suffix in (".bin", ".index.npy"):
            part = f"{name}.rank-{rank}{suffix}"
            pafs.copy_files(f"{remote}/{part}", os.path.join(directory, part), source_filesystem=filesystem)

    def __len__(self) -> int:
        return len(next(iter(self._rows.values()))) if self._rows else 0

    def read(self, name: str, indices: Sequence[int]) -> list[np.ndarray]:
        dtype, rows, out = self._dtypes[name], self._rows[name], []
        for index in indices:
            if index not in rows:
                raise KeyError(f"per-sample store {self.version} has no {name!r} for target row {index}")
            data, offset, shape = rows[index]
            count = int(np.prod(shape))
            out.append(np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape))
        return out
