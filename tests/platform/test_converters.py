"""Converters: tiny trees in each real layout, converted and read back pixel by pixel; bad input named clearly."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from cityscapesscripts.helpers.labels import id2label
from PIL import Image

from platform import converters, data
from platform.converters import ConversionError
from platform.datasets import decode_array, read_manifest, split_files
from platform.stream import eval_batches

RNG = np.random.default_rng(0)
LABEL_IDS = np.array(sorted(id2label))  # every Cityscapes labelId (-1, license plate, never appears in labelIds)
LABEL_IDS = LABEL_IDS[LABEL_IDS >= 0]


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _png16(path, array):
    """A 16-bit PNG written byte by byte from the PNG spec, independent of any imaging library (SYNTHIA's labels)."""
    height, width, channels = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, {1: 0, 3: 2}[channels], 0, 0, 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as file:
        file.write(
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
        )


def _rgb(h, w):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _train_ids(label_ids: np.ndarray) -> np.ndarray:
    """The official table, applied pixel by pixel (independently of the converter's lookup table)."""
    out = np.vectorize(lambda i: id2label[int(i)].trainId)(label_ids)
    return np.where((out < 0) | (out == 255), 255, out).astype(np.uint8)


def _rows(out_dir, split):
    root, name = os.path.dirname(out_dir), os.path.basename(out_dir)
    rows = []
    for path in split_files(root, name, split):
        rows.extend(pq.read_table(path).to_pylist())
    return {row["id"]: row for row in rows}


def _convert(dataset, source, out, **kwargs):
    return data.convert(dataset, str(source), str(out), progress=False, workers=1, **kwargs)


@pytest.mark.parametrize("codec", ["zstd", "png"])
def test_gta5_round_trip_and_size_mismatch_is_reported_not_misaligned(tmp_path, capsys, codec):
    expected = {}
    for index, (h, w) in enumerate([(12, 20), (12, 20), (10, 16)]):
        stem = f"{index + 1:05d}"
        image, labels = _rgb(h, w), RNG.choice(LABEL_IDS, (h, w)).astype(np.uint8)
        _png(tmp_path / "gta5" / "images" / f"{stem}.png", image)
        _png(tmp_path / "gta5" / "labels" / f"{stem}.png", labels if index < 2 else labels[:-1])  # 00003 mismatched
        expected[stem] = (image, _train_ids(labels))
    manifest = _convert("gta5", tmp_path / "gta5", tmp_path / "out" / "gta5", codec=codec)
    rows = _rows(str(tmp_path / "out" / "gta5"), "train")
    assert set(rows) == {"00001", "00002"}
    assert manifest.source["codec"] == codec
    for stem, row in rows.items():
        assert row["image"].startswith(b"UDAZ" if codec == "zstd" else b"\x89PNG")
        assert np.array_equal(decode_array(row["image"]), expected[stem][0])
        assert np.array_equal(decode_array(row["label"]), expected[stem][1])
    assert manifest.skipped == [{"id": "00003", "split": "train", "reason": "image 16x10 but label 16x9"}]
    assert "skipped train/00003: image 16x10 but label 16x9" in capsys.readouterr().err
    assert manifest.label_map == "cityscapes-trainIds" and manifest.num_classes == 19
    assert manifest.splits["train"].count == 2 and manifest.splits["train"].image_sizes == [[12, 20]]
    histogram = np.bincount(
        np.concatenate([e[1][e[1] != 255] for s, e in expected.items() if s != "00003"]), minlength=19
    )
    assert manifest.splits["train"].class_pixels == histogram.tolist()


@pytest.mark.parametrize("lanemarking, lane_train_id", [("ignore", 255), ("road", 0)])
def test_synthia_16bit_multichannel_labels_and_lanemarking_option(tmp_path, lanemarking, lane_train_id):
    image = _rgb(8, 10)
    classes = RNG.integers(0, 23, (8, 10)).astype(np.uint16)
    classes[0, :3] = 22  # lanemarking
    label = np.stack([classes, RNG.integers(0, 60000, (8, 10)), RNG.integers(0, 60000, (8, 10))], -1).astype(np.uint16)
    _png(tmp_path / "synthia" / "RGB" / "0000000.png", image)
    _png16(str(tmp_path / "synthia" / "GT" / "LABELS" / "0000000.png"), label)
    manifest = _convert(
        "synthia", tmp_path / "synthia", tmp_path / f"synthia-{lanemarking}", options={"lanemarking": lanemarking}
    )
    row = _rows(str(tmp_path / f"synthia-{lanemarking}"), "train")["0000000"]
    mapping = {**converters.SYNTHIA_TO_TRAIN_ID, 22: lane_train_id}
    expected = np.vectorize(lambda c: mapping.get(int(c), 255))(classes).astype(np.uint8)
    assert np.array_equal(decode_array(row["label"]), expected)
    assert manifest.label_map == f"synthia-to-cityscapes-trainIds(lanemarking={lanemarking})"


def _cityscapes_tree(root):
    expected = {}
    for split, city, frame in (("train", "aachen", "000019"), ("val", "frankfurt", "000294")):
        stem = f"{city}_000000_{frame}"
        image, labels = _rgb(8, 16), RNG.choice(LABEL_IDS, (8, 16)).astype(np.uint8)
        _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
        _png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", labels)
        expected[(split, stem)] = (image, labels)
    return expected


def test_cityscapes_round_trip_uses_the_official_table(tmp_path):
    expected = _cityscapes_tree(tmp_path / "cs")
    manifest = _convert("cityscapes", tmp_path / "cs", tmp_path / "cityscapes")
    assert set(manifest.splits) == {"train", "val"}
    for (split, stem), (image, labels) in expected.items():
        row = _rows(str(tmp_path / "cityscapes"), split)[stem]
        assert np.array_equal(decode_array(row["image"]), image)
        assert np.array_equal(decode_array(row["label"]), _train_ids(labels))


def test_nthu_train_has_no_labels_and_test_keeps_train_ids(tmp_path):
    root = tmp_path / "Rome"
    train_image, test_image = _rgb(8, 16), _rgb(8, 16)
    _png(root / "Images" / "Train" / "a.png", train_image)
    Image.fromarray(test_image).save(root / "Images" / "Train" / "b.jpg", quality=95)
    _png(root / "Images" / "Test" / "c.png", test_image)
    labels = RNG.choice(np.array([0, 1, 2, 6, 255], dtype=np.uint8), (8, 16))
    _png(root / "Labels" / "Test" / "c_eval.png", labels)
    _convert("nthu", root, tmp_path / "nthu-rome")
    train = _rows(str(tmp_path / "nthu-rome"), "train")
    assert set(train) == {"a", "b"} and all(r["label"] is None for r in train.values())
    assert np.array_equal(
        decode_array(train["b"]["image"]), np.asarray(Image.open(root / "Images" / "Train" / "b.jpg"))
    )
    assert np.array_equal(decode_array(_rows(str(tmp_path / "nthu-rome"), "test")["c"]["label"]), labels)


def test_endoscopy_generic_layout_with_image_level_labels(tmp_path):
    root = tmp_path / "enteroscope"
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 1
    mask[0, 0] = 255
    _png(root / "images" / "test" / "x1.png", _rgb(8, 8))
    _png(root / "masks" / "test" / "x1.png", mask)
    _png(root / "images" / "train" / "u1.png", _rgb(8, 8))
    _png(root / "images" / "train" / "u2.png", _rgb(8, 8))
    (root / "image_labels.csv").write_text("image,lesion\nu1.png,1\nu2.png,0\n")
    _convert("endoscopy", root, tmp_path / "endoscopy-enteroscope")
    train = _rows(str(tmp_path / "endoscopy-enteroscope"), "train")
    assert train["u1"]["image_labels"] == [0, 1] and train["u2"]["image_labels"] == [0]
    assert train["u1"]["label"] is None
    test = _rows(str(tmp_path / "endoscopy-enteroscope"), "test")["x1"]
    assert np.array_equal(decode_array(test["label"]), mask) and test["image_labels"] == [0, 1]


def test_montgomery_lungs_resized_with_per_image_spacing(tmp_path):
    root = tmp_path / "MontgomerySet"
    names = [f"MCUCXR_{i:04d}_{i % 2}.png" for i in range(10)]
    for name in names:
        image = RNG.integers(0, 256, (40, 48), dtype=np.uint8)
        left, right = np.zeros((40, 48), np.uint8), np.zeros((40, 48), np.uint8)
        left[5:30, 28:40], right[5:30, 6:20] = 255, 255
        _png(root / "CXR_png" / name, image)
        _png(root / "ManualMask" / "leftMask" / name, left)
        _png(root / "ManualMask" / "rightMask" / name, right)
    manifest = _convert("montgomery", root, tmp_path / "montgomery", options={"size": 32})
    assert {s: i.count for s, i in manifest.splits.items()} == {"train": 7, "val": 1, "test": 2}
    row = next(iter(_rows(str(tmp_path / "montgomery"), "train").values()))
    label = decode_array(row["label"])
    expected = np.zeros((40, 48), np.uint8)
    expected[5:30, 28:40], expected[5:30, 6:20] = 1, 2
    assert np.array_equal(label, np.asarray(Image.fromarray(expected).resize((32, 32), Image.NEAREST)))
    assert row["spacing_mm"] == pytest.approx([0.0875 * 40 / 32, 0.0875 * 48 / 32])
    assert manifest.label_map == "lungs(size=32)"


def test_jsrt_big_endian_raw_and_scr_gif_masks_in_folders_with_spaces(tmp_path):
    root = tmp_path / "JSRT"
    os.makedirs(root / "All247images")
    raw = RNG.integers(0, 4096, (2048, 2048)).astype(">u2")
    raw.tofile(root / "All247images" / "JPCLN001.IMG")
    masks = {}
    for lung, columns in (("left lung", slice(600, 900)), ("right lung", slice(100, 400))):
        mask = np.zeros((1024, 1024), np.uint8)
        mask[200:800, columns] = 255
        os.makedirs(root / "scratch" / "fold1" / "masks" / lung)
        Image.fromarray(mask).save(root / "scratch" / "fold1" / "masks" / lung / "JPCLN001.gif")
        masks[lung] = mask
    manifest = _convert("jsrt", root, tmp_path / "jsrt", options={"size": 64})
    row = next(iter(next(iter(_rows(str(tmp_path / "jsrt"), s) for s in manifest.splits)).values()))
    expected_image = np.asarray(
        Image.fromarray(converters.jsrt_preprocess(raw.astype(np.uint16))).resize((64, 64), Image.BILINEAR)
    )
    assert np.array_equal(decode_array(row["image"]), expected_image)
    label = np.zeros((1024, 1024), np.uint8)
    label[masks["left lung"] > 0], label[masks["right lung"] > 0] = 1, 2
    assert np.array_equal(
        decode_array(row["label"]), np.asarray(Image.fromarray(label).resize((64, 64), Image.NEAREST))
    )
    assert row["spacing_mm"] == pytest.approx([0.175 * 2048 / 64] * 2)
    inverted = converters.jsrt_preprocess(np.array([[0, 4095, 9999, 2048]], dtype=np.uint16))
    assert inverted.tolist() == [[255, 0, 0, 127]]  # inverted, clipped at 4095, rescaled linearly (SeUDA Sec. 3)
    assert manifest.source["options"] == {"size": 64, "equalise": False}


def test_jsrt_histogram_equalisation_is_an_option(tmp_path):
    """The common JSRT preprocessing equalises the histogram; SeUDA prints only "rescaled to [0, 255]"."""
    from skimage import exposure

    root = tmp_path / "JSRT"
    os.makedirs(root / "All247images")
    raw = (RNG.beta(2, 5, (2048, 2048)) * 4095).astype(">u2")  # a skewed histogram, which equalisation flattens
    raw.tofile(root / "All247images" / "JPCNN001.IMG")
    for lung in ("left lung", "right lung"):
        os.makedirs(root / "scratch" / "fold1" / "masks" / lung)
        Image.fromarray(np.zeros((1024, 1024), np.uint8)).save(
            root / "scratch" / "fold1" / "masks" / lung / "JPCNN001.gif"
        )
    linear = converters.jsrt_preprocess(raw.astype(np.uint16))
    equalised = converters.jsrt_preprocess(raw.astype(np.uint16), equalise=True)
    expected = exposure.equalize_hist((4095 - raw.astype(np.float64)) / 4095.0)
    assert np.array_equal(equalised, np.round(expected * 255).astype(np.uint8))
    assert abs(float(equalised.mean()) - 127.5) < abs(float(linear.mean()) - 127.5)  # the shift is gone
    manifest = _convert("jsrt", root, tmp_path / "jsrt", options={"size": 64, "equalise": True})
    row = next(iter(next(iter(_rows(str(tmp_path / "jsrt"), s) for s in manifest.splits)).values()))
    assert np.array_equal(
        decode_array(row["image"]), np.asarray(Image.fromarray(equalised).resize((64, 64), Image.BILINEAR))
    )


# ------------------------------------------------------------------ bad input


def test_wrong_layout_shows_the_expected_tree(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert data.main(["convert", "gta5", str(tmp_path / "x"), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"error: {tmp_path / 'x'} is not a gta5 download: no images/NNNNN.png. Expected:"
    assert err[1:] == ["  SRC/", "    images/00001.png ...   (RGB)", "    labels/00001.png ...   (Cityscapes labelIds)"]


def test_missing_label_and_unreadable_image_name_the_file(tmp_path):
    _png(tmp_path / "g" / "images" / "00001.png", _rgb(4, 4))
    with pytest.raises(ConversionError, match=f"missing label: {tmp_path / 'g' / 'labels' / '00001.png'}"):
        _convert("gta5", tmp_path / "g", tmp_path / "o1")
    _png(tmp_path / "g" / "labels" / "00001.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "g" / "images" / "00001.png").write_bytes(b"not a png")
    with pytest.raises(ConversionError, match=f"unreadable image {tmp_path / 'g' / 'images' / '00001.png'}"):
        _convert("gta5", tmp_path / "g", tmp_path / "o2")


def test_label_ids_outside_the_map_are_named(tmp_path):
    _png(tmp_path / "g" / "images" / "00001.png", _rgb(4, 4))
    labels = np.full((4, 4), 7, np.uint8)
    labels[0, 0], labels[1, 1] = 40, 99
    _png(tmp_path / "g" / "labels" / "00001.png", labels)
    with pytest.raises(
        ConversionError, match=r"label ids \[40, 99\] in .*00001.png are outside the Cityscapes labelId map"
    ):
        _convert("gta5", tmp_path / "g", tmp_path / "o")


def test_interrupted_conversion_resumes_and_a_partial_dataset_is_never_visible(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "ROWS_PER_SHARD", 2)
    for index in range(5):
        _png(tmp_path / "g" / "images" / f"{index:05d}.png", _rgb(4, 4))
        _png(tmp_path / "g" / "labels" / f"{index:05d}.png", np.full((4, 4), 7, np.uint8))
    (tmp_path / "g" / "labels" / "00003.png").write_bytes(b"broken")  # the second shard fails
    out = tmp_path / "root" / "gta5"
    with pytest.raises(ConversionError, match="unreadable label"):
        _convert("gta5", tmp_path / "g", out)
    assert (out / "train" / "part-00000.parquet").exists() and not (out / "manifest.json").exists()
    assert not any(name.endswith(".tmp") for name in os.listdir(out / "train"))
    with pytest.raises(Exception, match="not prepared"):
        read_manifest(str(tmp_path / "root"), "gta5")
    first_shard = os.stat(out / "train" / "part-00000.parquet").st_mtime_ns
    _png(tmp_path / "g" / "labels" / "00003.png", np.full((4, 4), 7, np.uint8))  # fixed: run again
    manifest = _convert("gta5", tmp_path / "g", out)
    assert os.stat(out / "train" / "part-00000.parquet").st_mtime_ns == first_shard  # not redone
    assert manifest.splits["train"].count == 5 and len(manifest.splits["train"].files) == 3
    assert not (out / data.PROGRESS).exists()
    again = _convert("gta5", tmp_path / "g", out)  # idempotent
    assert again.fingerprint == manifest.fingerprint
    assert os.stat(out / "train" / "part-00000.parquet").st_mtime_ns == first_shard


def test_a_truncated_shard_is_named_at_read_time(tmp_path):
    for index in range(3):
        _png(tmp_path / "g" / "images" / f"{index:05d}.png", _rgb(4, 4))
        _png(tmp_path / "g" / "labels" / f"{index:05d}.png", np.full((4, 4), 7, np.uint8))
    _convert("gta5", tmp_path / "g", tmp_path / "r" / "gta5")
    shard = tmp_path / "r" / "gta5" / "train" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])
    with pytest.raises(OSError, match="part-00000.parquet"):
        list(eval_batches([str(shard)], ["image", "label"], 2, 19))


def test_limit_converts_the_first_images_of_each_split(tmp_path):
    for index in range(4):
        _png(tmp_path / "g" / "images" / f"{index:05d}.png", _rgb(4, 4))
        _png(tmp_path / "g" / "labels" / f"{index:05d}.png", np.full((4, 4), 7, np.uint8))
    manifest = _convert("gta5", tmp_path / "g", tmp_path / "lim", limit=2)
    assert manifest.splits["train"].count == 2
    assert set(_rows(str(tmp_path / "lim"), "train")) == {"00000", "00001"}


def test_a_damaged_shard_is_named_before_a_sweep_and_convert_again_repairs_it(tmp_path, capsys):
    """Issue 19 item 7: the manifest records each shard's size and checksum; preparing a task checks the sizes and
    names a damaged shard with the command that repairs it; `convert` again verifies the checksums and rewrites it."""
    from platform import tasks
    from platform.datasets import DamagedDatasetError, damaged_shards, read_manifest

    for index in range(3):
        _png(tmp_path / "g" / "images" / f"{index:05d}.png", _rgb(4, 4))
        _png(tmp_path / "g" / "labels" / f"{index:05d}.png", np.full((4, 4), 7, np.uint8))
    manifest = _convert("gta5", tmp_path / "g", tmp_path / "r" / "gta5")
    shard = tmp_path / "r" / "gta5" / "train" / "part-00000.parquet"
    assert manifest.shards["train/part-00000.parquet"]["bytes"] == shard.stat().st_size
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) // 2])
    task = tasks.get("gta5-cityscapes")
    with pytest.raises(DamagedDatasetError) as error:
        tasks._check_shards(str(tmp_path / "r"), read_manifest(str(tmp_path / "r"), "gta5"))
    message = str(error.value)
    assert "has a damaged shard train/part-00000.parquet" in message and "\n" not in message
    assert f"python -m platform.data convert gta5 {tmp_path / 'g'} {tmp_path / 'r' / 'gta5'} --codec zstd" in message
    assert task.source_train.dataset == "gta5"
    # same size, one byte changed: sizes pass (cheap), checksums do not
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert damaged_shards(str(tmp_path / "r"), manifest) == []
    assert damaged_shards(str(tmp_path / "r"), manifest, checksums=True)[0][0] == "train/part-00000.parquet"
    shard.write_bytes(original[:100])
    capsys.readouterr()
    repaired = _convert("gta5", tmp_path / "g", tmp_path / "r" / "gta5")
    assert "repairing train/part-00000.parquet" in capsys.readouterr().err
    assert shard.read_bytes() == original and repaired.fingerprint == manifest.fingerprint
    _convert("gta5", tmp_path / "g", tmp_path / "r" / "gta5")
    assert "1 shards verified); nothing to do" in capsys.readouterr().err
