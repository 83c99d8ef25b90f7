"""Dataset converters: an official download (or a documented folder layout) → Parquet shards + manifest.

`python -m platform.data convert DATASET SRC_DIR OUT_DIR` (platform/data.py) drives them. A converter knows its
source layout (`scan`, which checks it and shows the expected tree when it is wrong), how to read one sample
(`load`: image uint8, label as class ids of the target label map, image-level labels) and its label map. Label maps
to Cityscapes trainIds come from the official `cityscapesscripts` table.

Layouts (see ../shared/reference/datasets.md):

    gta5        SRC/images/NNNNN.png, SRC/labels/NNNNN.png (Cityscapes labelIds)                → split train
    synthia     SRC/RGB/NNNNNNN.png, SRC/GT/LABELS/NNNNNNN.png (16-bit, class in channel 0)       → split train
    cityscapes  SRC/leftImg8bit/{train,val}/CITY/*_leftImg8bit.png,
                SRC/gtFine/{train,val}/CITY/*_gtFine_labelIds.png                                 → train, val
    nthu        SRC/Images/Train/*.{png,jpg}, SRC/Images/Test/*.{png,jpg},
                SRC/Labels/Test/<stem>_eval.png (Cityscapes trainIds, 255 ignore)                 → train, test
    endoscopy   SRC/images/[SPLIT/]*.{png,jpg}, SRC/masks/[SPLIT/]<stem>.png (0 normal, 1 disease, 255 ignore;
                optional), SRC/image_labels.csv (optional: image,lesion with lesion 0/1)           → SPLIT or train
    montgomery  SRC/CXR_png/MCUCXR_####_{0,1}.png, SRC/ManualMask/{leftMask,rightMask}/<same name>  → train, val, test
    jsrt        SRC/All247images/JPC{LN,NN}###.IMG (2048x2048, 16-bit big-endian, 12-bit content),
                SRC/scratch/fold{1,2}/masks/{left lung,right lung}/JPC*.gif (SCR, 1024x1024)     → train, val, test

Decisions, documented once here:
- SYNTHIA lanemarking (id 22): `--lanemarking ignore` (default; AdaptSegNet, ADVENT, CLAN, CSCL's baselines) maps it
  to 255, `--lanemarking road` maps it to road (CRST). The label-map name in the manifest records the choice.
- Image/label size mismatch (GTA5 ships a few): the sample is skipped and listed in the manifest's `skipped` with
  both sizes; it is never resized to fit, which would misalign it.
- Chest X-rays are converted at `--size` (default 512, SeUDA's): images bilinear, masks nearest. JSRT's raw images
  (2048x2048) and SCR masks (1024x1024) are both resampled to that size, which resolves their resolution mismatch;
  raw values are clipped to 4095, inverted (4095 - x) and scaled linearly to 8 bits: SeUDA prints "resized to
  512x512, and rescaled to [0, 255]" and nothing else, and equalising JSRT's histograms (the common JSRT
  preprocessing, option `equalise=True`) would remove much of the intensity shift its Table 1 measures. Pixel spacing (mm) of the converted pixels is stored per image: Montgomery 0.0875 mm at native
  resolution (images are 4020x4892 or 4892x4020, so rows and columns differ after resizing), JSRT 0.175 mm.
- Montgomery and JSRT have no official split: a 7:1:2 train/val/test split (SeUDA) drawn with a fixed seed over the
  sorted image names.
- Lung classes: 0 background, 1 left lung, 2 right lung (the patient's left and right; the right lung appears on
  the image's left side).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from platform.datasets import IGNORE_INDEX


class ConversionError(ValueError):
    """A problem with the source data; the message is one line (plus the expected layout for layout errors)."""


@dataclass(frozen=True)
class Sample:
    id: str
    split: str
    image: str
    labels: tuple[str, ...] = ()  # label file(s); several for masks stored per class (lungs)
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Loaded:
    image: np.ndarray  # uint8 (H, W) or (H, W, 3)
    label: np.ndarray | None  # uint8 class ids (H, W), 255 ignore
    image_labels: list[int] | None = None
    spacing_mm: tuple[float, float] | None = None


class Skip(Exception):
    """A sample that cannot be converted faithfully (e.g. image and label sizes differ); reported, not fatal."""


def _read_rgb(path: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise ConversionError(f"missing image: {path}") from None
    except OSError as error:
        raise ConversionError(f"unreadable image {path}: {error}") from None


def _read_label(path: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except FileNotFoundError:
        raise ConversionError(f"missing label: {path}") from None
    except OSError as error:
        raise ConversionError(f"unreadable label {path}: {error}") from None
    if array.ndim != 2:
        raise ConversionError(f"label {path} has {array.shape[2]} channels; expected a single-channel id image")
    return array


def _check_same_size(sample: Sample, image: np.ndarray, label: np.ndarray) -> None:
    if image.shape[:2] != label.shape[:2]:
        raise Skip(f"image {image.shape[1]}x{image.shape[0]} but label {label.shape[1]}x{label.shape[0]}")


def _lookup(table: np.ndarray, ids: np.ndarray, path: str, valid: str) -> np.ndarray:
    """Map raw ids through a 65536-entry table whose invalid entries are -1; unknown ids raise, naming the file."""
    mapped = table[ids]
    if (mapped < 0).any():
        unknown = sorted(set(np.unique(ids[mapped < 0]).tolist()))
        raise ConversionError(f"label ids {unknown[:10]} in {path} are outside the {valid} map")
    return mapped.astype(np.uint8)


def _table(mapping: dict[int, int], valid_ids: range | list[int]) -> np.ndarray:
    table = np.full(65536, -1, dtype=np.int32)
    for raw in valid_ids:
        table[raw] = mapping.get(raw, IGNORE_INDEX)
    return table


# ------------------------------------------------------------------------------------------------- label maps


def cityscapes_label_ids() -> tuple[dict[int, int], list[int]]:
    """labelId → trainId (255 for classes not evaluated) and the valid labelIds, from the official table."""
    from cityscapesscripts.helpers.labels import labels

    mapping = {
        label.id: (label.trainId if 0 <= label.trainId < 255 else IGNORE_INDEX) for label in labels if label.id >= 0
    }
    return mapping, sorted(mapping)


def cityscapes_class_names() -> tuple[str, ...]:
    from cityscapesscripts.helpers.labels import labels

    by_train_id = {label.trainId: label.name for label in labels if 0 <= label.trainId < 255}
    return tuple(by_train_id[i] for i in range(len(by_train_id)))


# SYNTHIA class id → Cityscapes trainId (datasets.md; the table every SYNTHIA→Cityscapes code base uses).
SYNTHIA_TO_TRAIN_ID = {
    3: 0,
    4: 1,
    2: 2,
    21: 3,
    5: 4,
    7: 5,
    15: 6,
    9: 7,
    6: 8,
    16: 9,
    1: 10,
    10: 11,
    17: 12,
    8: 13,
    18: 14,
    19: 15,
    20: 16,
    12: 17,
    11: 18,
}
SYNTHIA_LANEMARKING = 22


def _imread_any(path: str) -> np.ndarray:
    """Read a PNG at its own bit depth, channels in file order (R, G, B). Measured here: Pillow 13, and imageio and
    scikit-image through it, read SYNTHIA's 16-bit RGB labels as 8-bit (the high byte: every class id becomes 0);
    OpenCV reads 16 bits (in B, G, R order, reversed here)."""
    import cv2

    if not os.path.isfile(path):
        raise ConversionError(f"missing label: {path}")
    array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ConversionError(f"unreadable label {path}: not a decodable image")
    return array[..., ::-1] if array.ndim == 3 else array


# ------------------------------------------------------------------------------------------------- converters


@dataclass(frozen=True)
class Converter:
    name: str
    layout: str  # the expected tree, shown when the source does not match
    class_names: Callable[[], tuple[str, ...]]
    channels: int
    label_map: Callable[[dict[str, Any]], str]
    scan: Callable[[str, dict[str, Any]], list[Sample]]
    load: Callable[[Sample, dict[str, Any]], Loaded]
    options: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # option → (default, other valid values...)

    def layout_error(self, source: str, problem: str) -> ConversionError:
        return ConversionError(f"{source} is not a {self.name} download: {problem}. Expected:\n{self.layout}")


def _files(directory: str, pattern: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    regex = re.compile(pattern)
    return sorted(f for f in os.listdir(directory) if regex.fullmatch(f))


# --- GTA5


def _gta5_scan(source: str, options: dict) -> list[Sample]:
    images = _files(os.path.join(source, "images"), r"\d+\.png")
    if not images:
        raise CONVERTERS["gta5"].layout_error(source, "no images/NNNNN.png")
    return [
        Sample(os.path.splitext(f)[0], "train", os.path.join(source, "images", f), (os.path.join(source, "labels", f),))
        for f in images
    ]


def _cityscapes_ids_load(sample: Sample, options: dict) -> Loaded:
    mapping, valid = cityscapes_label_ids()
    image = _read_rgb(sample.image)
    raw = _read_label(sample.labels[0])
    _check_same_size(sample, image, raw)
    return Loaded(image, _lookup(_table(mapping, valid), raw, sample.labels[0], "Cityscapes labelId"))


# --- SYNTHIA


def _synthia_scan(source: str, options: dict) -> list[Sample]:
    images = _files(os.path.join(source, "RGB"), r"\d+\.png")
    if not images:
        raise CONVERTERS["synthia"].layout_error(source, "no RGB/NNNNNNN.png")
    return [
        Sample(
            os.path.splitext(f)[0], "train", os.path.join(source, "RGB", f), (os.path.join(source, "GT", "LABELS", f),)
        )
        for f in images
    ]


def _synthia_load(sample: Sample, options: dict) -> Loaded:
    image = _read_rgb(sample.image)
    raw = _imread_any(sample.labels[0])
    if raw.ndim == 3:
        raw = raw[..., 0]  # the class id is in the first channel
    _check_same_size(sample, image, raw)
    mapping = dict(SYNTHIA_TO_TRAIN_ID)
    if options["lanemarking"] == "road":
        mapping[SYNTHIA_LANEMARKING] = SYNTHIA_TO_TRAIN_ID[3]
    return Loaded(image, _lookup(_table(mapping, range(23)), raw.astype(np.int64), sample.labels[0], "SYNTHIA class"))


# --- Cityscapes


def _cityscapes_scan(source: str, options: dict) -> list[Sample]:
    samples = []
    for split in ("train", "val"):
        root = os.path.join(source, "leftImg8bit", split)
        if not os.path.isdir(root):
            raise CONVERTERS["cityscapes"].layout_error(source, f"no leftImg8bit/{split}/")
        for city in sorted(os.listdir(root)):
            for name in _files(os.path.join(root, city), r".+_leftImg8bit\.png"):
                stem = name[: -len("_leftImg8bit.png")]
                samples.append(
                    Sample(
                        stem,
                        split,
                        os.path.join(root, city, name),
                        (os.path.join(source, "gtFine", split, city, f"{stem}_gtFine_labelIds.png"),),
                    )
                )
    if not samples:
        raise CONVERTERS["cityscapes"].layout_error(source, "no *_leftImg8bit.png under leftImg8bit/{train,val}/CITY/")
    return samples


# --- NTHU


def _nthu_scan(source: str, options: dict) -> list[Sample]:
    samples = []
    for split, folder in (("train", "Train"), ("test", "Test")):
        names = _files(os.path.join(source, "Images", folder), r".+\.(png|jpg)")
        if not names:
            raise CONVERTERS["nthu"].layout_error(source, f"no images in Images/{folder}/")
        for name in names:
            stem = os.path.splitext(name)[0]
            labels = (os.path.join(source, "Labels", folder, f"{stem}_eval.png"),) if split == "test" else ()
            samples.append(Sample(stem, split, os.path.join(source, "Images", folder, name), labels))
    return samples


def _nthu_load(sample: Sample, options: dict) -> Loaded:
    image = _read_rgb(sample.image)
    if not sample.labels:
        return Loaded(image, None)
    raw = _read_label(sample.labels[0])
    _check_same_size(sample, image, raw)
    table = _table({i: i for i in range(19)}, list(range(19)) + [IGNORE_INDEX])
    return Loaded(image, _lookup(table, raw, sample.labels[0], "Cityscapes trainId"))


# --- endoscopy (generic folder layout)


def _endoscopy_scan(source: str, options: dict) -> list[Sample]:
    images_root = os.path.join(source, "images")
    if not os.path.isdir(images_root):
        raise CONVERTERS["endoscopy"].layout_error(source, "no images/")
    splits = [d for d in sorted(os.listdir(images_root)) if os.path.isdir(os.path.join(images_root, d))]
    weak = _read_image_labels(os.path.join(source, "image_labels.csv"))
    samples = []
    for split in splits or [""]:
        for name in _files(os.path.join(images_root, split), r".+\.(png|jpg|jpeg)"):
            stem = os.path.splitext(name)[0]
            mask = os.path.join(source, "masks", split, f"{stem}.png")
            labels = (mask,) if os.path.isfile(mask) else ()
            samples.append(
                Sample(
                    stem, split or "train", os.path.join(images_root, split, name), labels, {"lesion": weak.get(stem)}
                )
            )
    if not samples:
        raise CONVERTERS["endoscopy"].layout_error(source, "no images in images/ or images/SPLIT/")
    return samples


def _read_image_labels(path: str) -> dict[str, int]:
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"image", "lesion"} <= set(reader.fieldnames):
            raise ConversionError(f"{path} must have the columns image,lesion (got {reader.fieldnames})")
        out = {}
        for row in reader:
            if row["lesion"] not in ("0", "1"):
                raise ConversionError(f"{path}: lesion must be 0 or 1 (got {row['lesion']!r} for {row['image']})")
            out[os.path.splitext(row["image"])[0]] = int(row["lesion"])
        return out


def _endoscopy_load(sample: Sample, options: dict) -> Loaded:
    image = _read_rgb(sample.image)
    label = None
    if sample.labels:
        raw = _read_label(sample.labels[0])
        _check_same_size(sample, image, raw)
        label = _lookup(_table({0: 0, 1: 1}, [0, 1, IGNORE_INDEX]), raw, sample.labels[0], "endoscopy mask (0, 1, 255)")
    lesion = sample.extra.get("lesion")
    if lesion is None and label is not None:
        lesion = int((label == 1).any())
    return Loaded(image, label, None if lesion is None else ([0, 1] if lesion else [0]))


# --- chest X-rays


def _split_7_1_2(samples: list[Sample]) -> list[Sample]:
    """SeUDA's 7:1:2 train/val/test split, drawn with a fixed seed over the sorted ids."""
    order = np.random.default_rng(0).permutation(len(samples))
    train_end, val_end = int(round(0.7 * len(samples))), int(round(0.8 * len(samples)))
    split_of = {
        int(i): ("train" if rank < train_end else "val" if rank < val_end else "test") for rank, i in enumerate(order)
    }
    return [Sample(s.id, split_of[i], s.image, s.labels, s.extra) for i, s in enumerate(samples)]


def _resize(array: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    image = Image.fromarray(array)
    return np.asarray(image.resize((size, size), Image.NEAREST if nearest else Image.BILINEAR))


def _montgomery_scan(source: str, options: dict) -> list[Sample]:
    names = _files(os.path.join(source, "CXR_png"), r"MCUCXR_\d{4}_[01]\.png")
    if not names:
        raise CONVERTERS["montgomery"].layout_error(source, "no CXR_png/MCUCXR_####_{0,1}.png")
    return _split_7_1_2(
        [
            Sample(
                os.path.splitext(n)[0],
                "",
                os.path.join(source, "CXR_png", n),
                (os.path.join(source, "ManualMask", "leftMask", n), os.path.join(source, "ManualMask", "rightMask", n)),
            )
            for n in names
        ]
    )


def _lung_label(sample: Sample, left: np.ndarray, right: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    for mask in (left, right):
        if mask.shape[:2] != shape:
            raise Skip(f"image {shape[1]}x{shape[0]} but mask {mask.shape[1]}x{mask.shape[0]}")
    label = np.zeros(shape, dtype=np.uint8)
    label[left > 0] = 1
    label[right > 0] = 2
    return label


def _montgomery_load(sample: Sample, options: dict) -> Loaded:
    size = int(options["size"])
    try:
        with Image.open(sample.image) as handle:
            image = np.asarray(handle.convert("L"))
    except FileNotFoundError:
        raise ConversionError(f"missing image: {sample.image}") from None
    except OSError as error:
        raise ConversionError(f"unreadable image {sample.image}: {error}") from None
    left, right = (_read_label(p) for p in sample.labels)
    label = _lung_label(sample, left, right, image.shape)
    spacing = (0.0875 * image.shape[0] / size, 0.0875 * image.shape[1] / size)
    return Loaded(_resize(image, size, False), _resize(label, size, True), spacing_mm=spacing)


JSRT_SIZE = 2048


def _jsrt_scan(source: str, options: dict) -> list[Sample]:
    names = _files(os.path.join(source, "All247images"), r"JPC(LN|NN)\d{3}\.IMG")
    if not names:
        raise CONVERTERS["jsrt"].layout_error(source, "no All247images/JPC{LN,NN}###.IMG")
    samples = []
    for name in names:
        stem = os.path.splitext(name)[0]
        masks = []
        for lung in ("left lung", "right lung"):
            found = [os.path.join(source, "scratch", fold, "masks", lung, f"{stem}.gif") for fold in ("fold1", "fold2")]
            existing = [p for p in found if os.path.isfile(p)]
            masks.append(existing[0] if existing else found[0])
        samples.append(Sample(stem, "", os.path.join(source, "All247images", name), tuple(masks)))
    return _split_7_1_2(samples)


def jsrt_preprocess(raw: np.ndarray, equalise: bool = False) -> np.ndarray:
    """12-bit raw values → 8-bit: clip to 4095, invert, rescale linearly to [0, 255] (SeUDA Sec. 3); `equalise`:
    histogram-equalise instead of the linear rescaling (skimage; the common JSRT preprocessing)."""
    inverted = (4095 - np.clip(raw.astype(np.int32), 0, 4095)).astype(np.float64) / 4095.0
    if equalise:
        from skimage import exposure

        inverted = exposure.equalize_hist(inverted)
    return np.round(inverted * 255).astype(np.uint8)


def _jsrt_load(sample: Sample, options: dict) -> Loaded:
    size = int(options["size"])
    expected = JSRT_SIZE * JSRT_SIZE * 2
    try:
        data = open(sample.image, "rb").read()
    except FileNotFoundError:
        raise ConversionError(f"missing image: {sample.image}") from None
    if len(data) != expected:
        raise ConversionError(
            f"{sample.image} has {len(data)} bytes; a JSRT image is {JSRT_SIZE}x{JSRT_SIZE} 16-bit "
            f"big-endian ({expected} bytes)"
        )
    raw = np.frombuffer(data, dtype=">u2").reshape(JSRT_SIZE, JSRT_SIZE)
    image = _resize(jsrt_preprocess(raw, bool(options.get("equalise", False))), size, False)
    left, right = (_read_label(p) for p in sample.labels)
    if left.shape != right.shape:
        raise Skip(f"left mask {left.shape} but right mask {right.shape}")
    label = _lung_label(sample, left, right, left.shape)
    spacing = 0.175 * JSRT_SIZE / size
    return Loaded(image, _resize(label, size, True), spacing_mm=(spacing, spacing))


# ------------------------------------------------------------------------------------------------- table


def _layout(text: str) -> str:
    return "\n".join("  " + line for line in text.strip("\n").splitlines())


CONVERTERS: dict[str, Converter] = {
    c.name: c
    for c in (
        Converter(
            "gta5",
            _layout("""
SRC/
  images/00001.png ...   (RGB)
  labels/00001.png ...   (Cityscapes labelIds)"""),
            cityscapes_class_names,
            3,
            lambda o: "cityscapes-trainIds",
            _gta5_scan,
            _cityscapes_ids_load,
        ),
        Converter(
            "synthia",
            _layout("""
SRC/
  RGB/0000000.png ...
  GT/LABELS/0000000.png ...   (16-bit, class id in the first channel)"""),
            cityscapes_class_names,
            3,
            lambda o: f"synthia-to-cityscapes-trainIds(lanemarking={o['lanemarking']})",
            _synthia_scan,
            _synthia_load,
            {"lanemarking": ("ignore", "road")},
        ),
        Converter(
            "cityscapes",
            _layout("""
SRC/
  leftImg8bit/{train,val}/CITY/CITY_SEQ_FRAME_leftImg8bit.png
  gtFine/{train,val}/CITY/CITY_SEQ_FRAME_gtFine_labelIds.png"""),
            cityscapes_class_names,
            3,
            lambda o: "cityscapes-trainIds",
            _cityscapes_scan,
            _cityscapes_ids_load,
        ),
        Converter(
            "nthu",
            _layout("""
SRC/   (one city: Rome, Rio, Tokyo or Taipei)
  Images/Train/*.png|jpg
  Images/Test/*.png|jpg
  Labels/Test/<image stem>_eval.png   (Cityscapes trainIds, 255 ignore)"""),
            cityscapes_class_names,
            3,
            lambda o: "cityscapes-trainIds",
            _nthu_scan,
            _nthu_load,
        ),
        Converter(
            "endoscopy",
            _layout("""
SRC/
  images/[SPLIT/]*.png|jpg
  masks/[SPLIT/]<image stem>.png   (optional; 0 normal, 1 disease, 255 ignore)
  image_labels.csv                 (optional; columns image,lesion with lesion 0 or 1)"""),
            lambda: ("normal", "disease"),
            3,
            lambda o: "endoscopy",
            _endoscopy_scan,
            _endoscopy_load,
        ),
        Converter(
            "montgomery",
            _layout("""
SRC/   (MontgomerySet)
  CXR_png/MCUCXR_####_{0,1}.png
  ManualMask/leftMask/MCUCXR_####_{0,1}.png
  ManualMask/rightMask/MCUCXR_####_{0,1}.png"""),
            lambda: ("background", "left lung", "right lung"),
            1,
            lambda o: f"lungs(size={o['size']})",
            _montgomery_scan,
            _montgomery_load,
            {"size": (512,)},
        ),
        Converter(
            "jsrt",
            _layout("""
SRC/
  All247images/JPCLN001.IMG ... JPCNN093.IMG   (2048x2048, 16-bit big-endian)
  scratch/fold1/masks/left lung/JPCLN001.gif ...   (SCR masks; fold1 or fold2)
  scratch/fold1/masks/right lung/JPCLN001.gif ..."""),
            lambda: ("background", "left lung", "right lung"),
            1,
            lambda o: f"lungs(size={o['size']})",
            _jsrt_scan,
            _jsrt_load,
            {"size": (512,), "equalise": (False, True)},  # equalise: histogram equalisation (not SeUDA's reading)
        ),
    )
}
