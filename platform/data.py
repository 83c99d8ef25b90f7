"""`python -m platform.data`: prepare datasets as streamable Parquet.

    python -m platform.data convert DATASET SRC_DIR OUT_DIR [--limit N] [--workers N] [--lanemarking ignore|road]
                                                           [--size 512] [--codec zstd|png]
    python -m platform.data prepare TASK [--data-root DIR]     # synthetic tasks: generate; real: check
    python -m platform.data info DATASET_DIR                   # print a dataset's manifest

Conversion (platform/converters.py has the layouts and label maps):
- validates the source layout first (a wrong layout prints the expected tree) and fails with one line naming any
  missing or unreadable file or label ids outside the map;
- encodes samples in parallel worker processes, images and labels with `--codec` (default zstd: decodes about 15x
  faster than PNG, which is what limits the training stream, for about 1.7x the official PNGs' size on disk; png is
  the compact choice; see platform/datasets.py), and writes shards of `ROWS_PER_SHARD` rows in row groups of
  `ROWS_PER_GROUP`, each under a temporary name renamed when complete, so a shard is visible only once whole;
- is resumable: `OUT_DIR/.progress.json` lists the finished shards with their sample ids; an interrupted conversion
  continues with the next shard; it is idempotent: a finished dataset with the same source and options is left as is;
- writes `manifest.json` last (counts per split, class pixel histograms, image sizes, pixel spacing, label-map name,
  skipped samples with the reason, content fingerprint).
The dataset's name is the basename of OUT_DIR; tasks look datasets up by name under the data root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from platform import tasks
from platform.converters import CONVERTERS, ConversionError, Converter, Sample, Skip
from platform.datasets import (
    CODECS,
    IGNORE_INDEX,
    DatasetNotFoundError,
    Manifest,
    SplitInfo,
    damaged_shards,
    finalize,
    read_manifest,
    resolve_root,
    sample_row,
    write_shard,
)

ROWS_PER_SHARD = 256
ROWS_PER_GROUP = 16
PROGRESS = ".progress.json"


def _encode(job: tuple[str, Sample, dict[str, Any], int, str]) -> dict[str, Any]:
    """Load and encode one sample (runs in a worker process)."""
    name, sample, options, num_classes, codec = job
    converter = CONVERTERS[name]
    try:
        loaded = converter.load(sample, options)
    except Skip as skip:
        return {"skipped": {"id": sample.id, "split": sample.split, "reason": str(skip)}}
    row = sample_row(sample.id, loaded.image, loaded.label, loaded.image_labels, loaded.spacing_mm, codec)
    pixels = np.zeros(num_classes, dtype=np.int64)
    if loaded.label is not None:
        valid = loaded.label[loaded.label != IGNORE_INDEX]
        pixels = np.bincount(valid.ravel(), minlength=num_classes)[:num_classes]
    return {
        "row": row,
        "class_pixels": pixels.tolist(),
        "size": [int(row["height"]), int(row["width"])],
        "spacing": list(loaded.spacing_mm) if loaded.spacing_mm else None,
    }


def _shards(samples: list[Sample], shard_rows: int | None = None) -> dict[str, list[list[Sample]]]:
    """Samples grouped by split (in scan order), then cut into consecutive shards of `shard_rows`."""
    shard_rows = shard_rows or ROWS_PER_SHARD
    by_split: dict[str, list[Sample]] = {}
    for sample in samples:
        by_split.setdefault(sample.split, []).append(sample)
    return {
        split: [items[i : i + shard_rows] for i in range(0, len(items), shard_rows)]
        for split, items in by_split.items()
    }


def _write_json(path: str, payload: dict) -> None:
    with open(path + ".tmp", "w") as handle:
        json.dump(payload, handle)
    os.replace(path + ".tmp", path)


def convert(
    dataset: str,
    source: str,
    out: str,
    options: dict[str, Any] | None = None,
    limit: int | None = None,
    workers: int = 1,
    progress: bool = True,
    codec: str = "zstd",
) -> Manifest:
    converter = CONVERTERS[dataset]
    options = {**{k: v[0] for k, v in converter.options.items()}, **(options or {})}
    source, out = os.path.abspath(source), os.path.abspath(out)
    if not os.path.isdir(source):
        raise ConversionError(f"source directory not found: {source}")
    if codec not in CODECS:
        raise ConversionError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    signature = {"converter": dataset, "source": source, "options": options, "limit": limit, "codec": codec}
    root, name = os.path.dirname(out), os.path.basename(out)
    try:
        existing = read_manifest(root, name)
        if existing.source == signature:
            damaged = damaged_shards(root, existing, checksums=True)
            count = sum(s.count for s in existing.splits.values())
            if not damaged:
                print(
                    f"{out} is already converted ({count} images, {len(existing.shards)} shards verified); "
                    "nothing to do",
                    file=sys.stderr,
                )
                return existing
            return _repair(converter, dataset, source, out, options, limit, workers, codec, existing, damaged)
    except DatasetNotFoundError:
        pass
    samples = converter.scan(source, options)
    if limit:
        samples = [s for chunks in _shards(samples, shard_rows=limit).values() for s in chunks[0]]
    os.makedirs(out, exist_ok=True)
    state_path = os.path.join(out, PROGRESS)
    state = {"signature": signature, "shards": {}}
    if os.path.isfile(state_path):
        with open(state_path) as handle:
            previous = json.load(handle)
        if previous.get("signature") == signature:
            state = previous
    class_names = converter.class_names()
    plan = _shards(samples)
    total = len(samples)
    done = sum(len(info["ids"]) + len(info["skipped"]) for info in state["shards"].values())
    bar = _progress_bar(total, done, f"convert {dataset} → {name}", progress)
    try:
        with ProcessPoolExecutor(max(1, workers)) as pool:
            for split, chunks in plan.items():
                for index, chunk in enumerate(chunks):
                    relative = os.path.join(split, f"part-{index:05d}.parquet")
                    ids = [s.id for s in chunk]
                    recorded = state["shards"].get(relative)
                    if recorded and recorded["all_ids"] == ids and os.path.isfile(os.path.join(out, relative)):
                        continue  # finished in an earlier run
                    results = []
                    for result in pool.map(
                        _encode, [(dataset, s, options, len(class_names), codec) for s in chunk], chunksize=4
                    ):
                        results.append(result)
                        bar.update(1)
                    rows = [r["row"] for r in results if "row" in r]
                    if rows:
                        write_shard(os.path.join(out, relative), rows, ROWS_PER_GROUP)
                    state["shards"][relative] = {
                        "split": split,
                        "all_ids": ids,
                        "ids": [r["row"]["id"] for r in results if "row" in r],
                        "class_pixels": np.sum(
                            [r["class_pixels"] for r in results if "row" in r] or [[0] * len(class_names)], axis=0
                        ).tolist(),
                        "sizes": sorted({tuple(r["size"]) for r in results if "row" in r}),
                        "spacing": [r["spacing"] for r in results if r.get("spacing")][:1],
                        "has_labels": any(r["row"]["label"] is not None for r in results if "row" in r),
                        "has_image_labels": any(r["row"]["image_labels"] is not None for r in results if "row" in r),
                        "skipped": [r["skipped"] for r in results if "skipped" in r],
                        "written": bool(rows),
                    }
                    _write_json(state_path, state)
    finally:
        bar.close()
    manifest = _manifest(converter, name, options, signature, state, class_names)
    manifest = finalize(out, manifest)
    os.remove(state_path)
    for item in manifest.skipped:
        print(f"skipped {item['split']}/{item['id']}: {item['reason']}", file=sys.stderr)
    return manifest


def _repair(
    converter: Converter,
    dataset: str,
    source: str,
    out: str,
    options: dict[str, Any],
    limit: int | None,
    workers: int,
    codec: str,
    existing: Manifest,
    damaged: list[tuple[str, str]],
) -> Manifest:
    """Re-encode the samples of each damaged shard (the same scan, the same shard plan) and write it again; the
    encoding is deterministic, so the repaired shard must match the manifest's checksum."""
    samples = converter.scan(source, options)
    if limit:
        samples = [s for chunks in _shards(samples, shard_rows=limit).values() for s in chunks[0]]
    plan = {
        os.path.join(split, f"part-{i:05d}.parquet"): chunk
        for split, chunks in _shards(samples).items()
        for i, chunk in enumerate(chunks)
    }
    class_count = len(converter.class_names())
    with ProcessPoolExecutor(max(1, workers)) as pool:
        for relative, reason in damaged:
            print(f"repairing {relative} ({reason})", file=sys.stderr)
            jobs = [(dataset, s, options, class_count, codec) for s in plan[relative]]
            rows = [r["row"] for r in pool.map(_encode, jobs, chunksize=4) if "row" in r]
            write_shard(os.path.join(out, relative), rows, ROWS_PER_GROUP)
    still = damaged_shards(os.path.dirname(out), existing, checksums=True)
    if still:
        raise ConversionError(
            f"{still[0][0]} differs from the manifest after re-encoding ({still[0][1]}): the source changed since "
            f"the conversion; convert it again into a new folder"
        )
    print(f"{out}: {len(damaged)} damaged shard(s) rewritten and verified", file=sys.stderr)
    return existing


def _manifest(
    converter: Converter, name: str, options: dict, signature: dict, state: dict, class_names: tuple[str, ...]
) -> Manifest:
    splits: dict[str, SplitInfo] = {}
    skipped: list[dict] = []
    spacing = None
    for relative, info in sorted(state["shards"].items()):
        skipped.extend(info["skipped"])
        if not info["written"]:
            continue
        split = splits.setdefault(
            info["split"],
            SplitInfo(
                count=0,
                files=[],
                has_labels=False,
                has_image_labels=False,
                image_sizes=[],
                class_pixels=[0] * len(class_names),
            ),
        )
        split.count += len(info["ids"])
        split.files.append(relative)
        split.has_labels |= info["has_labels"]
        split.has_image_labels |= info["has_image_labels"]
        split.image_sizes = sorted({tuple(s) for s in split.image_sizes} | {tuple(s) for s in info["sizes"]})
        split.class_pixels = [a + b for a, b in zip(split.class_pixels, info["class_pixels"])]
        spacing = spacing or (info["spacing"][0] if info["spacing"] else None)
    for split in splits.values():
        split.image_sizes = [list(s) for s in split.image_sizes]
    return Manifest(
        name=name,
        num_classes=len(class_names),
        class_names=list(class_names),
        channels=converter.channels,
        label_map=converter.label_map(options),
        splits=splits,
        pixel_spacing_mm=None if spacing is None else float(np.mean(spacing)),
        source=signature,
        skipped=skipped,
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, done: int, description: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=description, unit="img", file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise ConversionError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m platform.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert_parser = commands.add_parser("convert", help="convert a dataset download to Parquet")
    convert_parser.add_argument("dataset", choices=sorted(CONVERTERS))
    convert_parser.add_argument("source")
    convert_parser.add_argument("out")
    convert_parser.add_argument("--limit", type=int, help="convert only the first N images of each split")
    convert_parser.add_argument(
        "--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="encoding processes (default: all cores)"
    )
    convert_parser.add_argument("--lanemarking", choices=("ignore", "road"), help="synthia only (default ignore)")
    convert_parser.add_argument("--size", type=int, help="montgomery and jsrt: output size (default 512)")
    convert_parser.add_argument(
        "--codec",
        choices=CODECS,
        default="zstd",
        help="how images and labels are stored: zstd (fast to decode, default) or png (compact)",
    )
    convert_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare_parser = commands.add_parser("prepare", help="generate a synthetic task's data, or check a real task's")
    prepare_parser.add_argument("task", choices=sorted(tasks.TASKS))
    prepare_parser.add_argument("--data-root", default=None)
    info_parser = commands.add_parser("info", help="print a dataset's manifest")
    info_parser.add_argument("dataset_dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "convert":
            options = {}
            if args.lanemarking:
                if args.dataset != "synthia":
                    raise ConversionError("--lanemarking applies to synthia only")
                options["lanemarking"] = args.lanemarking
            if args.size:
                if args.dataset not in ("montgomery", "jsrt"):
                    raise ConversionError("--size applies to montgomery and jsrt only")
                if args.size < 16 or args.size % 4:
                    raise ConversionError(f"--size must be a multiple of 4, at least 16 (got {args.size})")
                options["size"] = args.size
            if args.limit is not None and args.limit < 1:
                raise ConversionError(f"--limit must be >= 1 (got {args.limit})")
            manifest = convert(
                args.dataset,
                args.source,
                args.out,
                options,
                args.limit,
                args.workers,
                progress=not args.quiet,
                codec=args.codec,
            )
            counts = ", ".join(f"{split} {info.count}" for split, info in manifest.splits.items())
            print(f"{args.out}: {counts} images; {len(manifest.skipped)} skipped; {manifest.fingerprint}")
        elif args.command == "prepare":
            root = resolve_root(args.data_root or tasks.default_data_root())
            fingerprints = tasks.prepare(tasks.get(args.task), root)
            for dataset, fingerprint in fingerprints.items():
                print(f"{dataset}: {fingerprint}")
        else:
            directory = os.path.abspath(args.dataset_dir)
            print(read_manifest(os.path.dirname(directory), os.path.basename(directory)).to_json())
        return 0
    except (ConversionError, DatasetNotFoundError) as error:
        lines = str(error).splitlines()
        print(f"error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:  # the expected layout, for layout errors
            print(line, file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
