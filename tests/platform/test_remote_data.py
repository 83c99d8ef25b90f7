"""Datasets on an object store: a data root given as s3://bucket/data is read through pyarrow's S3 client.

The store is a local S3-compatible server (moto's, started here as its own process and spoken to over HTTP by
pyarrow's real S3 client, exactly as it would speak to AWS or MinIO); credentials and endpoint come from the standard
AWS environment variables, as on a cluster.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest
import torch

from platform import tasks
from platform.datasets import DatasetNotFoundError, read_manifest, split_files
from platform.loop import LocalSession, TrialRunner, TrialSpec
from platform.stream import TrainStream, eval_batches
from tests.platform.services import moto_server

pytestmark = pytest.mark.integration

BUCKET = "uda-test"
DATASETS = ("synthetic-urban-source", "synthetic-urban-target")


@pytest.fixture(scope="module")
def s3_root(data_root: str) -> str:
    with moto_server() as (endpoint, _):
        tasks.prepare(tasks.get("synthetic-urban"), data_root)
        # the constructor does not read AWS_ENDPOINT_URL (from_uri, which the platform uses, does)
        host = endpoint.split("://", 1)[1]
        filesystem = pafs.S3FileSystem(allow_bucket_creation=True, endpoint_override=host, scheme="http")
        filesystem.create_dir(BUCKET)
        for dataset in DATASETS:
            pafs.copy_files(
                os.path.join(data_root, dataset),
                f"{BUCKET}/data/{dataset}",
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=filesystem,
            )
        yield f"s3://{BUCKET}/data"


def test_manifest_and_shards_are_read_from_the_object_store(s3_root, data_root):
    for dataset in DATASETS:
        assert read_manifest(s3_root, dataset) == read_manifest(data_root, dataset)
    remote = split_files(s3_root, "synthetic-urban-source", "train")
    assert remote and all(path.startswith(f"{s3_root}/synthetic-urban-source/") for path in remote)
    local = split_files(data_root, "synthetic-urban-source", "train")
    streams = [
        iter(TrainStream(files, ["image", "label"], 4, 7, seed=3, hflip=True, threads=2)) for files in (remote, local)
    ]
    for _ in range(3):
        a, b = (next(stream) for stream in streams)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    files = [split_files(root, "synthetic-urban-target", "val") for root in (s3_root, data_root)]
    for a, b in zip(*(eval_batches(f, ["image", "label"], 16, 7) for f in files)):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_a_trial_trains_and_evaluates_from_an_s3_data_root(s3_root, data_root):
    def run(root: str) -> dict[str, float]:
        spec = TrialSpec(
            method="source_only",
            task="synthetic-urban",
            hyperparams={"architecture": "tiny"},
            seed=0,
            max_steps=3,
            eval_every=3,
            data_root=root,
        )
        return TrialRunner(spec, LocalSession()).run()

    remote, local = run(s3_root), run(data_root)
    assert remote["val_target/miou"] == local["val_target/miou"]
    assert remote["val_target/pixel_accuracy"] == local["val_target/pixel_accuracy"]


def test_a_dataset_missing_from_the_store_names_the_root(s3_root):
    with pytest.raises(DatasetNotFoundError, match=f"not prepared under {s3_root}"):
        tasks.prepare(tasks.get("gta5-cityscapes"), s3_root)
    with pytest.raises(DatasetNotFoundError, match="generated on a local data root only"):
        tasks.prepare(tasks.get("synthetic-cxr"), s3_root)
