import dataclasses
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from platform import synthetic, tasks
from platform.datasets import SCHEMA, DatasetNotFoundError, decode_array, encode_array, read_manifest, split_files
from platform.loop import DataFeed
from platform.stream import Augment, Policy, TrainStream, augment_sample, decode_row, eval_batches, finish, row_groups

PLACEMENT = {"aug_size", "aug_scale", "aug_crop", "aug_flip"}  # every augmented sample says where it came from


def test_synthetic_samples_are_deterministic_and_seed_dependent():
    a = synthetic.generate("synthetic-urban-target", 3, "train", seed=0)
    b = synthetic.generate("synthetic-urban-target", 3, "train", seed=0)
    c = synthetic.generate("synthetic-urban-target", 3, "train", seed=1)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_synthetic_tasks_have_the_promised_content(data_root):
    for task in (t for t in tasks.TASKS.values() if t.synthetic):
        tasks.prepare(task, data_root)
        source = read_manifest(data_root, task.source_train.dataset)
        target = read_manifest(data_root, task.target_train.dataset)
        assert source.num_classes == task.info.num_classes and source.channels == task.info.in_channels
        # every class occurs in both domains, and the label distributions differ (label shift)
        for manifest in (source, target):
            assert all(count > 0 for count in manifest.splits["train"].class_pixels), manifest.name
        p = np.array(source.splits["train"].class_pixels, float)
        q = np.array(target.splits["train"].class_pixels, float)
        assert np.abs(p / p.sum() - q / q.sum()).sum() > 0.02
        assert source.fingerprint.startswith("sha256:") and source.fingerprint != target.fingerprint
    assert len(tasks.TASKS["synthetic-urban"].info.class_names) >= 6


def test_endoscopy_has_image_level_labels_and_lesion_free_images(data_root):
    files = split_files(data_root, "synthetic-endoscopy-target", "train")
    table = pq.read_table(files, columns=["image_labels", "label"])
    labels = table.column("image_labels").to_pylist()
    assert all(present is not None for present in labels)
    assert 0.2 < sum(present == [0] for present in labels) / len(labels) < 0.5
    for image_labels, png in zip(labels[:50], table.column("label").to_pylist()[:50]):
        assert (1 in image_labels) == bool((decode_array(png) == 1).any())


def test_shards_follow_the_schema_and_the_manifest(data_root):
    manifest = read_manifest(data_root, "synthetic-cxr-source")
    files = split_files(data_root, "synthetic-cxr-source", "train")
    assert pq.read_schema(files[0]).equals(SCHEMA, check_metadata=False)
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == manifest.splits["train"].count
    assert manifest.pixel_spacing_mm is not None and manifest.channels == 1
    assert not any(name.endswith(".tmp") for name in os.listdir(os.path.dirname(files[0])))


def test_missing_dataset_names_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="python -m platform.data convert gta5 SRC_DIR"):
        tasks.prepare(tasks.get("gta5-cityscapes"), str(tmp_path))


def _ids(stream, batches):
    it = iter(stream)
    out = []
    for _ in range(batches):
        batch = next(it)
        out.extend(batch["image"].flatten(1)[:, :64].sum(1).tolist())
    return out


def _stream(files, **kwargs):
    defaults = {"columns": ["image", "label"], "batch_size": 4, "num_classes": 7, "seed": 0}
    return TrainStream(files, **{**defaults, **kwargs})


def test_ranks_read_disjoint_row_groups_each_epoch(data_root):
    files = split_files(data_root, "synthetic-urban-source", "train")
    groups = row_groups(files)
    per_epoch = len(groups) * groups[0].num_rows
    streams = [_stream(files, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        orders = [{(g.path, g.index) for g, _, _ in s._epoch_order(epoch)} for s in streams]
        assert orders[0].isdisjoint(orders[1])
        assert len(orders[0] | orders[1]) == len(groups)
    assert sum(len(s._epoch_order(0)) for s in streams) == per_epoch


def test_order_is_reshuffled_per_epoch_and_reproducible(data_root):
    files = split_files(data_root, "synthetic-urban-source", "train")
    stream = _stream(files)
    first, second = stream._epoch_order(0), stream._epoch_order(1)
    key = lambda order: [(g.index, row) for g, row, _ in order]
    assert key(first) != key(second)
    assert key(first) == key(_stream(files)._epoch_order(0))


def test_resuming_at_a_sample_index_gives_the_same_batches(data_root):
    files = split_files(data_root, "synthetic-urban-source", "train")
    straight = _ids(_stream(files, hflip=True), 6)
    resumed = _ids(_stream(files, hflip=True, start_sample=3 * 4), 3)
    assert resumed == straight[12:]


def test_target_training_stream_carries_no_pixel_labels(data_root):
    """The loop builds the target stream with these columns; labels cannot come through."""
    from platform.loop import LocalSession, TrialRunner, TrialSpec

    spec = TrialSpec(
        method="source_only",
        task="synthetic-endoscopy",
        hyperparams={"architecture": "tiny"},
        seed=0,
        max_steps=1,
        eval_every=1,
        data_root=data_root,
    )
    runner = TrialRunner(spec, LocalSession())
    adapted = dataclasses.replace(runner.stages[0], uses_target=True)
    feed = DataFeed(runner.trial, adapted, runner.progress)
    batch = next(feed.target)
    assert set(batch) - PLACEMENT == {"image", "image_labels", "index"}
    assert batch["image_labels"].shape == (1, 2)
    assert feed.next_batch(None, {}).target_image_label.shape == (1, 2)


def test_eval_batches_cover_the_split_once_at_label_resolution(data_root):
    files = split_files(data_root, "synthetic-urban-target", "val")
    total = sum(
        b["image"].shape[0]
        for r in range(2)
        for b in eval_batches(files, ["image", "label"], 16, 7, rank=r, world_size=2)
    )
    assert total == read_manifest(data_root, "synthetic-urban-target").splits["val"].count
    batch = next(eval_batches(files, ["image", "label"], 16, 7, size=(32, 64)))
    assert batch["image"].shape[-2:] == (32, 64) and batch["label"].shape[-2:] == (64, 128)


def _coordinate_sample(height=6, width=10):
    """An image whose channels hold each pixel's row and column, and a label that is a function of both."""
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.stack([rows, columns, torch.zeros_like(rows)]).float()
    return {"image": image, "label": (rows * width + columns) % 250}


def test_crop_and_flip_move_image_and_label_together():
    sample = augment_sample(_coordinate_sample(), Policy(crop=(4, 5), hflip=True), Augment(flip=True, crop=(0.5, 1.0)))
    assert sample["image"].shape == (3, 4, 5) and sample["label"].shape == (4, 5)
    rows, columns = sample["image"][0].long(), sample["image"][1].long()
    assert torch.equal(sample["label"], (rows * 10 + columns) % 250)
    assert rows[0, 0] == 1  # top = int(0.5 * (6 - 4))
    assert columns[0, 0] == 9 and columns[0, -1] == 5  # left = 10 - 5, then flipped


def test_a_crop_larger_than_the_image_pads_labels_with_ignore():
    sample = augment_sample(_coordinate_sample(), Policy(crop=(8, 12)), Augment())
    assert sample["image"].shape == (3, 8, 12)
    assert (sample["label"][6:] == 255).all() and (sample["label"][:, 10:] == 255).all()
    assert (sample["image"][:, 6:] == 0).all()


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (5, 7, 1)])
@pytest.mark.parametrize("codec", ["png", "zstd"])
def test_codecs_round_trip_uint8_arrays_exactly(codec, shape):
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    if codec == "png" and len(shape) == 3 and shape[2] == 1:
        array = array[..., 0]  # PNG stores grey as 2-D
    assert np.array_equal(decode_array(encode_array(array, codec)), array)


def test_unknown_codec_and_non_uint8_arrays_are_refused():
    with pytest.raises(ValueError, match="unknown codec 'jpeg'; choose one of png, zstd"):
        encode_array(np.zeros((2, 2), np.uint8), "jpeg")
    with pytest.raises(ValueError, match="only uint8"):
        encode_array(np.zeros((2, 2), np.int64), "zstd")


def test_uint8_resize_is_within_one_grey_level_of_float_resize():
    image = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    label = np.random.default_rng(2).integers(0, 19, (37, 53), dtype=np.uint8)
    row = {"image": encode_array(image, "zstd"), "label": encode_array(label, "zstd")}
    fast = finish(augment_sample(decode_row(row, 19), Policy(size=(20, 30)), Augment()))
    float_image = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    reference = torch.nn.functional.interpolate(float_image, size=(20, 30), mode="bilinear", align_corners=False)[0]
    assert fast["image"].dtype == torch.float32 and fast["label"].dtype == torch.int64
    assert (fast["image"] - reference).abs().max() <= 1 / 255 + 1e-6
    rows, columns = (torch.arange(20) * 37 // 20), (torch.arange(30) * 53 // 30)  # nearest: floor(i * in / out)
    assert torch.equal(fast["label"], torch.from_numpy(label).long()[rows][:, columns])


def test_resize_then_random_scale_keep_labels_as_class_ids():
    sample = augment_sample(_coordinate_sample(), Policy(size=(12, 20), scale_range=(0.5, 1.5)), Augment(scale=0.5))
    assert sample["image"].shape == (3, 6, 10) and sample["label"].shape == (6, 10)
    assert sample["label"].dtype == torch.int64
    assert set(sample["label"].unique().tolist()) <= set(range(60))  # nearest: no interpolated ids


def test_threaded_decoding_gives_the_same_batches_as_serial(data_root):
    files = split_files(data_root, "synthetic-urban-source", "train")
    policy = Policy(hflip=True, scale_range=(0.75, 1.25), crop=(32, 64))
    batches = []
    for threads in (1, 3):
        stream = iter(TrainStream(files, ["id", "image", "label"], 4, 7, seed=0, policy=policy, threads=threads))
        batches.append([next(stream) for _ in range(3)])
    for serial, threaded in zip(*batches):
        assert torch.equal(serial["image"], threaded["image"]) and torch.equal(serial["label"], threaded["label"])


def test_binary_cells_are_zero_copy_slices_with_nulls_and_offsets():
    import pyarrow as pa

    from platform.stream import _binary_cells

    array = pa.array([b"ab", None, b"", b"cdef", b"g"], pa.binary())
    sliced = array.slice(1, 4)  # a non-zero offset into the offsets buffer
    cells = _binary_cells(sliced)
    assert [None if c is None else c.to_pybytes() for c in cells] == [None, b"", b"cdef", b"g"]
    data = array.buffers()[2]
    assert data.address <= cells[2].address < data.address + data.size  # a view into the array's data, no copy


def test_stream_batches_are_uint8_and_finish_makes_model_inputs(data_root):
    files = split_files(data_root, "synthetic-urban-source", "train")
    raw = next(iter(_stream(files, threads=2)))
    assert raw["image"].dtype == torch.uint8 and raw["label"].dtype == torch.uint8
    inputs = finish(dict(raw))
    assert inputs["image"].dtype == torch.float32 and inputs["label"].dtype == torch.int64
    assert torch.equal(inputs["image"], raw["image"].float() / 255)
    assert inputs["image"].max() <= 1 and torch.equal(inputs["label"], raw["label"].long())


def test_training_batches_reach_the_method_as_float_images_and_int64_labels(data_root):
    from platform.loop import LocalSession, TrialRunner, TrialSpec

    spec = TrialSpec(
        method="source_only",
        task="synthetic-urban",
        hyperparams={"architecture": "tiny"},
        seed=0,
        max_steps=1,
        eval_every=1,
        data_root=data_root,
    )
    runner = TrialRunner(spec, LocalSession())
    feed = DataFeed(runner.trial, dataclasses.replace(runner.stages[0], uses_target=True), runner.progress)
    batch = feed.next_batch(None, {})
    assert batch.source_image.dtype == torch.float32 and batch.target_image.dtype == torch.float32
    assert batch.source_label.dtype == torch.int64
    assert 0 <= float(batch.source_image.min()) and float(batch.source_image.max()) <= 1


def test_group_sequence_is_the_order_in_which_samples_read_row_groups(data_root):
    import itertools

    files = split_files(data_root, "synthetic-urban-source", "train")
    for start in (0, 5, 3 * len(row_groups(files)) * row_groups(files)[0].num_rows + 7):
        stream = _stream(files, start_sample=start)
        read = [g for g, _ in itertools.groupby(g for g, _, _ in itertools.islice(stream._indices(), 400))]
        assert list(itertools.islice(stream._group_sequence(), len(read))) == read


def test_each_row_group_is_read_once_by_concurrent_threads_and_read_ahead(data_root):
    from concurrent.futures import ThreadPoolExecutor

    from platform.stream import _RowGroupReader

    files = split_files(data_root, "synthetic-urban-source", "train")
    groups = row_groups(files)[:2]
    reader = _RowGroupReader(["image"], cached_groups=2)
    reads = []
    original = pq.ParquetFile.read_row_group

    def counting(self, index, *args, **kwargs):
        reads.append(index)
        return original(self, index, *args, **kwargs)

    pq.ParquetFile.read_row_group = counting
    try:
        reader.read_ahead(groups[1])
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(reader.rows, [groups[0]] * 4 + [groups[1]] * 4))
        reader.close()
    finally:
        pq.ParquetFile.read_row_group = original
    assert len(reads) == 2  # eight asks and a read-ahead, two reads
    assert all(r is results[0] for r in results[:4]) and all(r is results[4] for r in results[4:])
    expected = pq.ParquetFile(groups[0].path).read_row_group(groups[0].index, columns=["image"]).column(0).to_pylist()
    assert [row["image"].to_pybytes() for row in results[0]] == expected


def _counting_decoder(monkeypatch) -> list:
    """Count decode_row calls in the stream module (the work DecodedRows saves)."""
    from platform import stream as stream_module

    calls, real = [], stream_module.decode_row
    monkeypatch.setattr(stream_module, "decode_row", lambda row, k: calls.append(1) or real(row, k))
    return calls


def test_a_split_that_fits_the_budget_is_decoded_once_and_batches_do_not_change(data_root, monkeypatch):
    """Two epochs of augmented batches (flip, scale, crop: new tensors from the kept ones) and two evaluation passes
    are bit for bit those of streams that decode every row every time, and each row is decoded once."""
    from platform import stream as stream_module

    tasks.prepare(tasks.get("synthetic-urban"), data_root)

    files = split_files(data_root, "synthetic-urban-source", "train")
    rows = sum(g.num_rows for g in row_groups(files))
    policy = Policy(hflip=True, scale_range=(0.75, 1.25), crop=(32, 64))
    calls = _counting_decoder(monkeypatch)
    runs = {}
    for name, budget in (("off", 0), ("kept", 512 * 2**20)):
        monkeypatch.setattr(stream_module, "DECODED", stream_module.DecodedRows(budget))
        calls.clear()
        stream = iter(TrainStream(files, ["image", "label"], 50, 7, seed=0, policy=policy))
        batches = [next(stream) for _ in range(2 * rows // 50)]  # two epochs
        passes = [list(eval_batches(files, ["image", "label"], 64, 7)) for _ in range(2)]
        runs[name] = (batches, passes, len(calls), stream_module.DECODED.reserved)
    (off, off_passes, off_calls, _), (kept, kept_passes, kept_calls, used) = runs["off"], runs["kept"]
    # every draw decoded (the stream decodes a few batches ahead), against each row once for the stream and the
    # evaluations together (the same columns of the same shards)
    assert off_calls >= 4 * rows and kept_calls == rows
    assert 0 < used <= 512 * 2**20
    for a, b in zip(off + [x for p in off_passes for x in p], kept + [x for p in kept_passes for x in p]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_split_larger_than_the_budget_is_never_kept(data_root, monkeypatch):
    from platform import stream as stream_module

    tasks.prepare(tasks.get("synthetic-urban"), data_root)

    files = split_files(data_root, "synthetic-urban-source", "train")
    rows = sum(g.num_rows for g in row_groups(files))
    row_bytes = 3 * 64 * 128 + 64 * 128  # an image and its label, uint8
    monkeypatch.setattr(stream_module, "DECODED", stream_module.DecodedRows(row_bytes * rows // 2))
    calls = _counting_decoder(monkeypatch)
    for _ in range(2):
        list(eval_batches(files, ["image", "label"], 64, 7))
    assert len(calls) == 2 * rows and stream_module.DECODED.reserved == 0


def test_a_rewritten_shard_is_read_again_not_served_from_memory(data_root, tmp_path, monkeypatch):
    """A repaired or regenerated shard has another size or modification time: its rows are decoded anew."""
    import shutil

    from platform import stream as stream_module

    tasks.prepare(tasks.get("synthetic-urban"), data_root)

    monkeypatch.setattr(stream_module, "DECODED", stream_module.DecodedRows(512 * 2**20))
    shard = tmp_path / "part-00000.parquet"
    shutil.copy(split_files(data_root, "synthetic-urban-source", "val")[0], shard)
    before = next(eval_batches([str(shard)], ["image", "label"], 4, 7))["image"]
    other = split_files(data_root, "synthetic-urban-target", "val")[0]
    shutil.copy(other, tmp_path / "next.parquet")
    os.replace(tmp_path / "next.parquet", shard)
    after = next(eval_batches([str(shard)], ["image", "label"], 4, 7))["image"]
    expected = next(eval_batches([other], ["image", "label"], 4, 7))["image"]
    assert not torch.equal(before, after) and torch.equal(after, expected)


def test_two_splits_that_each_fit_but_not_together_keep_only_the_first(data_root, monkeypatch):
    """The budget is reserved when a split is admitted: a second split that no longer fits streams as before."""
    from platform import stream as stream_module

    tasks.prepare(tasks.get("synthetic-urban"), data_root)
    source = split_files(data_root, "synthetic-urban-source", "train")
    target = split_files(data_root, "synthetic-urban-target", "train")
    rows = sum(g.num_rows for g in row_groups(source))
    row_bytes = 3 * 64 * 128 + 64 * 128
    monkeypatch.setattr(stream_module, "DECODED", stream_module.DecodedRows(int(1.6 * rows * row_bytes)))
    calls = _counting_decoder(monkeypatch)
    for files in (source, target, source, target):
        list(eval_batches(files, ["image", "label"], 64, 7))
    assert stream_module.DECODED.reserved == rows * row_bytes  # the source split's, the first admitted
    assert len(calls) == rows + 2 * sum(g.num_rows for g in row_groups(target))
