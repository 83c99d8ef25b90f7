"""`python -m platform.evaluate`: score an adapted checkpoint, or a folder of prediction PNGs.

    python -m platform.evaluate checkpoint PATH_OR_RUN_ID [--which best|last] [--split val|test] [--no-log]
                                          [--tracking-uri URI] [--data-root DIR] [--batch-size N]
    python -m platform.evaluate folders PREDICTIONS GROUND_TRUTH [--format labelIds|trainIds] [--task TASK]

checkpoint: PATH is an adapted-weights file (`checkpoints/best_val_target_miou.pt` or `last.pt` with its JSON
sidecar); RUN_ID is an MLflow run whose `checkpoints/` artifacts are downloaded (`--which`, default best). The model
is scored on the task's target validation split (or `--split test`, where the task has one) at the labels' full
resolution, and the metrics are logged to the run that produced the checkpoint as `eval/<which>/<split>/...`.

folders: every label PNG under GROUND_TRUTH is paired with the prediction PNG under PREDICTIONS that has the same
relative path, or, for Cityscapes names, the same CITY_SEQ_FRAME prefix (how cityscapesscripts pairs them).
`--format labelIds` (default) reads both as Cityscapes labelIds and maps them with the official table; predictions
of classes that are not evaluated count as false negatives of the true class, like the official evaluator.
`--format trainIds` reads trainIds (255 ignore). `--task` chooses the class set and subsets (default
gta5-cityscapes: the 19 classes; synthia-cityscapes: 16 and 13; cityscapes-nthu-*: 13).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from platform import checkpoints, tasks
from platform.converters import cityscapes_label_ids
from platform.datasets import DatasetNotFoundError, resolve_root, split_files
from platform.metrics import confusion_matrix, segmentation_metrics


class EvaluationError(ValueError):
    pass


def evaluate_checkpoint(
    weights: str, split: str = "val", data_root: str | None = None, batch_size: int = 8
) -> tuple[dict[str, float], dict]:
    import methods
    from methods.contract import StagePosition
    from platform.loop import evaluate_split

    modules, meta = checkpoints.load_modules(weights)
    task = tasks.get(meta["task"])
    target = task.target_test if split == "test" else task.target_val
    if target is None:
        raise EvaluationError(f"task {task.name} has no test split; use --split val")
    root = resolve_root(data_root or tasks.default_data_root())
    tasks.prepare(task, root)
    method = methods.get(meta["method"])
    hp = methods.make_hyperparams(method, meta["hyperparams"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate_split(
        method,
        hp,
        modules.to(device),
        task,
        split_files(root, target.dataset, target.split),
        StagePosition(meta["stage"], meta.get("stage_index", 0), meta.get("round", 0)),
        batch_size,
        0,
        1,
        device,
        prefix=f"eval/{meta['kind']}/{split}",
    )
    return metrics, meta


def _weights(source: str, which: str, tracking_uri: str | None) -> str:
    """A weights file on disk, or the `which` checkpoint of MLflow run `source`, downloaded."""
    if os.path.isfile(source):
        return source
    if source.endswith(".pt") or os.sep in source:
        raise EvaluationError(f"no such checkpoint file {source!r} (give a .pt path or an MLflow run id)")
    return _download(source, which, tracking_uri)


def _download(run_id: str, which: str, tracking_uri: str | None) -> str:
    from mlflow.tracking import MlflowClient

    from platform import tracking

    kind = checkpoints.BEST if which == "best" else checkpoints.LAST
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or tracking.default_tracking_uri()
    if uri.startswith("sqlite:///") and not os.path.isfile(uri[len("sqlite:///") :]):
        raise EvaluationError(f"no MLflow store at {uri} (check --tracking-uri, or give the checkpoint's .pt path)")
    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise EvaluationError(f"no MLflow run {run_id!r} in {uri} (check the run id and --tracking-uri)") from None
    directory = tempfile.mkdtemp(prefix="uda-eval-")
    for suffix in (".pt", ".json"):
        try:
            client.download_artifacts(run_id, f"{checkpoints.ARTIFACT_DIR}/{kind}{suffix}", directory)
        except (MlflowException, OSError):
            raise EvaluationError(
                f"MLflow run {run_id} has no {checkpoints.ARTIFACT_DIR}/{kind}{suffix} (a trial run logs it at its "
                "first evaluation; a sweep's parent run has none)"
            ) from None
    return os.path.join(directory, checkpoints.ARTIFACT_DIR, f"{kind}.pt")


# ---------------------------------------------------------------------------------------------------- folders


_CITYSCAPES_KEY = re.compile(r"([A-Za-z]+_\d{6}_\d{6})")


def _pngs(root: str) -> dict[str, str]:
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith(".png"):
                found[os.path.relpath(os.path.join(directory, name), root)] = os.path.join(directory, name)
    return found


def pair_files(predictions: str, ground_truth: str) -> list[tuple[str, str]]:
    truth = {k: v for k, v in _pngs(ground_truth).items() if "instanceIds" not in k and "color" not in k}
    predicted = _pngs(predictions)
    by_key = {}
    for relative, path in predicted.items():
        match = _CITYSCAPES_KEY.search(os.path.basename(relative))
        if match:
            by_key.setdefault(match.group(1), path)
    pairs = []
    for relative, path in sorted(truth.items()):
        if relative in predicted:
            pairs.append((predicted[relative], path))
            continue
        match = _CITYSCAPES_KEY.search(os.path.basename(relative))
        if match and match.group(1) in by_key:
            pairs.append((by_key[match.group(1)], path))
            continue
        raise EvaluationError(
            f"no prediction for {path} (expected {os.path.join(predictions, relative)} or a file "
            "named with the same CITY_SEQ_FRAME)"
        )
    if not pairs:
        raise EvaluationError(f"no label PNG found under {ground_truth}")
    return pairs


def _to_train_ids(label_format: str, num_classes: int):
    """labelIds → trainIds through the official table (255 = not evaluated); trainIds are checked to be < K or 255."""
    if label_format == "labelIds":
        mapping, _ = cityscapes_label_ids()
        table = np.full(256, 255, dtype=np.int64)
        for label_id, train_id in mapping.items():
            table[label_id] = train_id
        return lambda array, path: table[array]

    def checked(array: np.ndarray, path: str) -> np.ndarray:
        values = array.astype(np.int64)
        bad = np.unique(values[(values >= num_classes) & (values != 255)])
        if bad.size:
            raise EvaluationError(
                f"{path} holds ids {bad[:5].tolist()} that are not trainIds (0-{num_classes - 1}, 255): is it in "
                "labelIds? then use --format labelIds (predictions) or --gt-format labelIds (ground truth)"
            )
        return values

    return checked


def evaluate_folders(
    predictions: str, ground_truth: str, label_format: str, task: tasks.Task, truth_format: str = "labelIds"
) -> dict[str, float]:
    """`label_format`: the predictions' ids; `truth_format`: the ground truth's (the official files: labelIds)."""
    num_classes = task.info.num_classes
    predicted_to_train = _to_train_ids(label_format, num_classes)
    truth_to_train = _to_train_ids(truth_format, num_classes)
    matrix = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64)
    for prediction_path, truth_path in pair_files(predictions, ground_truth):
        prediction, truth = _read(prediction_path), _read(truth_path)
        if prediction.shape != truth.shape:
            raise EvaluationError(
                f"{prediction_path} is {prediction.shape[1]}x{prediction.shape[0]} but "
                f"{truth_path} is {truth.shape[1]}x{truth.shape[0]}"
            )
        predicted = predicted_to_train(prediction, prediction_path)
        predicted[predicted == 255] = num_classes  # a class that is not evaluated: the void column
        matrix += confusion_matrix(
            torch.from_numpy(predicted), torch.from_numpy(truth_to_train(truth, truth_path)), num_classes, void=True
        )
    return segmentation_metrics(matrix, task.info.class_names, "eval", task.eval_classes, task.class_subsets)


def _read(path: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except OSError as error:
        raise EvaluationError(f"cannot read {path}: {error}") from None
    if array.ndim != 2:
        raise EvaluationError(f"{path} has several channels; expected a single-channel id image")
    return array


# ---------------------------------------------------------------------------------------------------- report


def table(metrics: dict[str, float]) -> str:
    rows = []
    for key, value in sorted(metrics.items()):
        if "/iou/" in key or "/dice/" in key or "/asd_mm/" in key or "/recall/" in key or "/precision/" in key:
            rows.append(f"  {key.split('/', 1)[1]:40s} {value:7.2f}")
    summary = [
        f"  {key:40s} {value:7.2f}"
        for key, value in sorted(metrics.items())
        if key.rsplit("/", 1)[-1].startswith("miou") or key.endswith("pixel_accuracy")
    ]
    return "\n".join(rows + summary)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise EvaluationError(f"{message} (see --help)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m platform.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    checkpoint = commands.add_parser("checkpoint")
    checkpoint.add_argument("source", help="adapted-weights .pt file, or an MLflow run id")
    checkpoint.add_argument("--which", choices=("best", "last"), default="best")
    checkpoint.add_argument("--split", choices=("val", "test"), default="val")
    checkpoint.add_argument("--no-log", action="store_true", help="do not log the metrics to the MLflow run")
    checkpoint.add_argument("--tracking-uri")
    checkpoint.add_argument("--data-root")
    checkpoint.add_argument("--batch-size", type=int, default=8)
    folders = commands.add_parser("folders")
    folders.add_argument("predictions")
    folders.add_argument("ground_truth")
    folders.add_argument(
        "--format", choices=("labelIds", "trainIds"), default="labelIds", help="the predictions' ids (default labelIds)"
    )
    folders.add_argument(
        "--gt-format",
        choices=("labelIds", "trainIds"),
        default="labelIds",
        help="the ground truth's ids (default labelIds: the official gtFine files)",
    )
    folders.add_argument("--task", default="gta5-cityscapes", choices=sorted(tasks.TASKS))
    try:
        args = parser.parse_args(argv)
        if args.command == "folders":
            task = tasks.get(args.task)
            metrics = evaluate_folders(args.predictions, args.ground_truth, args.format, task, args.gt_format)
            print(table(metrics))
            return 0
        weights = _weights(args.source, args.which, args.tracking_uri)
        metrics, meta = evaluate_checkpoint(weights, args.split, args.data_root, args.batch_size)
        print(f"{meta['method']} on {meta['task']} ({meta['kind']} checkpoint, step {meta['step']}), {args.split}:")
        print(table(metrics))
        run_id = meta.get("mlflow_run_id") or (None if os.path.isfile(args.source) else args.source)
        if run_id and not args.no_log:
            from platform.tracking import TrialLogger, default_tracking_uri

            TrialLogger(args.tracking_uri or default_tracking_uri(), run_id).log_metrics(
                {k: v for k, v in metrics.items() if not math.isnan(v)}, int(meta["step"])
            )
            print(f"logged to MLflow run {run_id}")
        return 0
    except (EvaluationError, DatasetNotFoundError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a truncated or corrupt shard (named by platform.stream), an unreadable file
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
