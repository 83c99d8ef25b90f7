"""The source-validation slice (`--source-val`): a hashed, deterministic part of the labelled source training split
that no stream trains on and every evaluation scores as `val_source/*` (issue 18 item 2: the report's source-val
rule selects by it)."""

from __future__ import annotations

import dataclasses
import itertools

import pyarrow.parquet as pq
import pytest
import torch

import search_spaces
from platform import tasks
from platform.datasets import read_manifest, split_files
from platform.loop import DataFeed, LocalSession, TrialRunner, TrialSpec
from platform.metrics import confusion_matrix, segmentation_metrics
from platform.stream import TrainStream, decode_sample, eval_batches, row_groups, row_ids

URBAN = tasks.get("synthetic-urban")


def test_held_out_compares_the_ids_hash_with_the_fraction():
    # SHA-256("abc") = ba7816bf 8f01cfea ... (the FIPS 180-2 test vector): 0xba7816bf8f01cfea / 2^64 = 0.728395
    assert tasks.held_out("abc", 0.7284) and not tasks.held_out("abc", 0.7283)
    ids = [f"sample-{i:05d}" for i in range(4000)]
    small = {i for i in ids if tasks.held_out(i, 0.05)}
    large = {i for i in ids if tasks.held_out(i, 0.2)}
    assert small < large  # nested: a smaller fraction's slice lies inside a larger one's
    assert 720 <= len(large) <= 880  # 800 expected, binomial sd 25
    assert not any(tasks.held_out(i, 0.0) for i in ids)


def test_the_slice_is_the_rows_whose_ids_are_held_out(data_root):
    tasks.prepare(URBAN, data_root)
    ids = row_ids(split_files(data_root, "synthetic-urban-source", "train"))
    rows = tasks.source_validation_rows(URBAN, data_root, 0.25)
    assert rows == tuple(i for i, sample_id in enumerate(ids) if tasks.held_out(sample_id, 0.25))
    assert 0 < len(rows) < len(ids)
    full = read_manifest(data_root, "synthetic-urban-source").splits["train"].count
    assert tasks.runtime_info(URBAN, data_root, 0.25).source_train_size == full - len(rows)
    with pytest.raises(ValueError, match="holds out 0 of the"):
        tasks.source_validation_rows(URBAN, data_root, 1e-9)


def _stream(files, **kwargs):
    return TrainStream(files, ["image", "label"], batch_size=4, num_classes=7, seed=0, **kwargs)


def test_a_stream_never_draws_an_excluded_row_and_draws_every_other_once_per_epoch(data_root):
    tasks.prepare(URBAN, data_root)
    files = split_files(data_root, "synthetic-urban-source", "train")
    groups = row_groups(files)
    # a hashed slice plus every row of the second row group (a group the stream must skip entirely)
    first = groups[1]
    exclude = set(tasks.source_validation_rows(URBAN, data_root, 0.25)) | set(
        range(first.offset, first.offset + first.num_rows)
    )
    stream = _stream(files, exclude=exclude)
    total = sum(g.num_rows for g in groups)
    kept = total - len(exclude)
    assert stream.num_samples == kept
    for epoch in range(2):
        drawn = [g.offset + row for g, row, _ in stream._epoch_order(epoch)]
        assert sorted(drawn) == sorted(set(range(total)) - exclude)
    # the row groups the reader is told to read ahead are the ones the samples come from, from any start
    for start in (0, 5, kept + 3):
        resumed = _stream(files, exclude=exclude, start_sample=start)
        read = [g for g, _ in itertools.groupby(g for g, _, _ in itertools.islice(resumed._indices(), 3 * kept))]
        assert first not in read
        assert list(itertools.islice(resumed._group_sequence(), len(read))) == read
    # decoded batches: the indices of the straight stream, and a resumed one continues it
    straight = [next(b) for b in [iter(stream)] for _ in range(kept // 4 + 3)]
    indices = torch.cat([b["index"] for b in straight]).tolist()
    assert not set(indices) & exclude
    resumed = iter(_stream(files, exclude=exclude, start_sample=8))
    assert torch.equal(next(resumed)["index"], straight[2]["index"])


def test_eval_batches_read_exactly_the_given_rows(data_root):
    tasks.prepare(URBAN, data_root)
    files = split_files(data_root, "synthetic-urban-source", "train")
    rows = tasks.source_validation_rows(URBAN, data_root, 0.25)
    seen = [
        i
        for rank in range(2)
        for batch in eval_batches(files, ["image", "label"], 16, 7, rank=rank, world_size=2, rows=rows)
        for i in batch["index"].tolist()
    ]
    assert sorted(seen) == list(rows)


def test_a_trial_trains_without_its_slice_and_scores_it_as_val_source(data_root):
    spec = TrialSpec(
        method="source_only",
        task="synthetic-urban",
        hyperparams=dict(search_spaces.load("source_only").task_defaults["synthetic-urban"]),
        seed=0,
        max_steps=30,  # enough for predictions that depend on the input size
        eval_every=30,
        data_root=data_root,
        source_val=0.25,
    )
    session = LocalSession()
    runner = TrialRunner(spec, session)
    trial = runner.trial
    # source images at another size than target ones (both native 64x128 here): the slice is segmented at this one
    trial.task = dataclasses.replace(trial.task, source_size=(32, 64))
    holdout = tasks.source_validation_rows(URBAN, data_root, 0.25)
    assert trial.source_holdout == holdout
    full = read_manifest(data_root, "synthetic-urban-source").splits["train"].count
    assert trial.info.source_train_size == full - len(holdout)
    # more than an epoch of the loop's own source stream: no held-out image among them
    feed = DataFeed(trial, trial.stages[0], runner.progress)
    drawn = {int(i) for _ in range(full // 8 + 2) for i in next(feed.source)["index"]}
    assert not drawn & set(holdout) and len(drawn) == full - len(holdout)
    metrics = runner.run()
    # an independent recomputation over the held-out ids, read straight from the shards
    ids = set(row_ids(trial.files["source_val"]))
    held = {i for i in ids if tasks.held_out(i, 0.25)}
    matrix = torch.zeros(7, 7, dtype=torch.int64)
    with torch.no_grad():
        trial.modules.eval()
        for path in trial.files["source_val"]:
            for row in pq.read_table(path, columns=["id", "image", "label"]).to_pylist():
                if row["id"] in held:
                    sample = decode_sample(row, 7, (32, 64), flip=False, resize_label=False)
                    logits = trial.method.predict(trial.hp, trial.modules, sample["image"][None], trial.positions[-1])
                    logits = torch.nn.functional.interpolate(logits, size=(64, 128), mode="bilinear")
                    matrix += confusion_matrix(logits.argmax(1), sample["label"][None], 7, 255)
    expected = segmentation_metrics(matrix, trial.info.class_names, "val_source")
    assert metrics["val_source/miou"] == pytest.approx(expected["val_source/miou"], abs=1e-9)
    assert session.reports[-1]["val_source/miou"] == metrics["val_source/miou"]
    assert metrics["val_source/miou"] != pytest.approx(metrics["val_target/miou"])


def test_an_empty_lung_worker_still_gathers_a_tensor_of_the_right_width():
    from platform.metrics import LUNG_METRICS, LungMetrics

    lungs = LungMetrics(("background", "left_lung", "right_lung"))
    assert lungs.tensor().shape == (0, 2 * len(LUNG_METRICS))


def _evaluate_cxr_slice(rank: int, world_size: int, init_file: str, data_root: str, rows: tuple, out: str) -> None:
    """Score `rows` of synthetic-cxr's source split with a seeded tiny source_only model, on `world_size` workers."""
    import os

    import torch.distributed as dist

    import methods
    from platform import loop

    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    task = tasks.get("synthetic-cxr")
    method = methods.get("source_only")
    hp = methods.make_hyperparams(method, {"architecture": "tiny"})
    info = tasks.runtime_info(task, data_root)
    torch.manual_seed(0)
    modules = method.build(hp, info)
    position = loop.stage_positions(tuple(method.stages(hp)))[-1]
    files = split_files(data_root, "synthetic-cxr-source", "train")
    metrics = loop.evaluate_split(
        method, hp, modules, task, files, position, 4, rank, world_size, torch.device("cpu"), "val_source", rows=rows
    )
    if rank == 0:
        torch.save(metrics, out)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)  # as tests/platform/test_distributed.py: no gloo teardown at exit


def test_two_workers_score_a_slice_that_one_of_them_holds_no_row_of(data_root, tmp_path):
    """eval_batches gives rank r the row groups g % 2 == r: a slice inside group 0 leaves rank 1 with no image. Both
    still meet in the confusion matrix's all-reduce and the lung scores' all-gather, and agree with one worker."""
    import torch.multiprocessing as mp

    tasks.prepare(tasks.get("synthetic-cxr"), data_root)
    group = row_groups(split_files(data_root, "synthetic-cxr-source", "train"))[0]
    rows = tuple(range(group.offset, group.offset + min(3, group.num_rows)))
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    _evaluate_cxr_slice(0, 1, "", data_root, rows, one)
    mp.start_processes(
        _evaluate_cxr_slice,
        args=(2, str(tmp_path / "init"), data_root, rows, two),
        nprocs=2,
        start_method="spawn",
    )
    single, pair = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert "val_source/dice/left_lung" in single
    assert single.keys() == pair.keys()
    for key, value in single.items():
        assert pair[key] == pytest.approx(value, nan_ok=True), key


def test_images_with_image_level_labels_only_are_never_held_out(tmp_path):
    """The endoscopy source split mixes masked gastroscope images and images with image-level labels only (SLRT's
    weak source images): only masked ones can be scored, so only they are held out; the others keep training."""
    import numpy as np

    from tests.platform.test_converters import _convert, _png, _rgb

    source = tmp_path / "gastroscope"
    masked = [f"m{i:02d}" for i in range(8)]
    weak = [f"w{i:02d}" for i in range(8)]
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 1
    for name in masked + weak:
        _png(source / "images" / "train" / f"{name}.png", _rgb(8, 8))
    for name in masked:
        _png(source / "masks" / "train" / f"{name}.png", mask)
    (source / "image_labels.csv").write_text("image,lesion\n" + "".join(f"{n}.png,1\n" for n in weak))
    _convert("endoscopy", source, tmp_path / "data" / "endoscopy-gastroscope")
    root, task = str(tmp_path / "data"), tasks.get("endoscopy")
    files = split_files(root, "endoscopy-gastroscope", "train")
    ids = row_ids(files)
    hashed = {i for i, sample_id in enumerate(ids) if tasks.held_out(sample_id, 0.5)}
    assert {ids[i][0] for i in hashed} == {"m", "w"}  # the hash alone would take both kinds
    rows = tasks.source_validation_rows(task, root, 0.5)
    assert set(rows) == {i for i in hashed if ids[i].startswith("m")}
