"""Evaluation: equal to the official cityscapesscripts scorer, subsets from one matrix, the evaluate CLI."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
from cityscapesscripts.helpers.labels import id2label, trainId2label
from PIL import Image

from platform import checkpoints, evaluate, tasks
from platform.loop import LocalSession, TrialRunner, TrialSpec

FRAMES = ("frankfurt_000000_000294", "frankfurt_000000_000576", "lindau_000001_000019")


def _tree(root, rng, shape=(24, 40)):
    """Ground truth in the official gtFine layout, predictions in a flat folder named by CITY_SEQ_FRAME."""
    label_ids = np.array([i for i in id2label if i >= 0])
    pairs = []
    for frame in FRAMES:
        city = frame.split("_")[0]
        truth = rng.choice(label_ids, shape).astype(np.uint8)
        # a prediction that is right on about half the pixels and otherwise any labelId (ignored classes included)
        prediction = np.where(rng.random(shape) < 0.5, truth, rng.choice(label_ids, shape)).astype(np.uint8)
        truth_path = root / "gtFine" / "val" / city / f"{frame}_gtFine_labelIds.png"
        prediction_path = root / "pred" / f"{frame}_leftImg8bit.png"
        for path, array in ((truth_path, truth), (prediction_path, prediction)):
            os.makedirs(path.parent, exist_ok=True)
            Image.fromarray(array).save(path)
        pairs.append((str(prediction_path), str(truth_path)))
    return pairs


def test_folder_scores_equal_the_official_cityscapes_evaluator(tmp_path, monkeypatch):
    pairs = _tree(tmp_path, np.random.default_rng(0))
    for name, value in (
        ("evalInstLevelScore", False),
        ("JSONOutput", False),
        ("quiet", True),
        ("evalPixelAccuracy", False),
    ):
        monkeypatch.setattr(official.args, name, value)
    reference = official.evaluateImgLists([p for p, _ in pairs], [t for _, t in pairs], official.args)
    ours = evaluate.evaluate_folders(
        str(tmp_path / "pred"), str(tmp_path / "gtFine"), "labelIds", tasks.get("gta5-cityscapes")
    )
    for train_id in range(19):
        name = trainId2label[train_id].name
        assert ours[f"eval/iou/{name.replace(' ', '_')}"] == pytest.approx(
            reference["classScores"][name] * 100, abs=1e-9
        )
    assert ours["eval/miou"] == pytest.approx(reference["averageScoreClasses"] * 100, abs=1e-9)


def test_synthia_16_and_13_class_scores_come_from_one_matrix(tmp_path):
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 19, (32, 32)).astype(np.uint8)
    truth[:2] = 255
    prediction = np.where(rng.random((32, 32)) < 0.6, truth, rng.integers(0, 19, (32, 32))).astype(np.uint8)
    for folder, array in (("gt", truth), ("pred", prediction)):
        os.makedirs(tmp_path / folder)
        Image.fromarray(array).save(tmp_path / folder / "a.png")
    task = tasks.get("synthia-cityscapes")
    metrics = evaluate.evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"), "trainIds", task, "trainIds")
    valid = truth != 255
    ious = []
    for k in range(19):  # an independent per-class count
        tp = np.sum((prediction == k) & (truth == k) & valid)
        union = np.sum(((prediction == k) | (truth == k)) & valid)
        ious.append(100 * tp / union)
    sixteen = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
    thirteen = [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
    assert tuple(task.eval_classes) == tuple(sixteen)
    assert metrics["eval/miou"] == pytest.approx(np.mean([ious[k] for k in sixteen]))
    assert metrics["eval/miou13"] == pytest.approx(np.mean([ious[k] for k in thirteen]))
    assert "eval/iou/terrain" not in metrics  # trainId 9 is not one of SYNTHIA's 16


def test_a_missing_prediction_is_named(tmp_path, capsys):
    _tree(tmp_path, np.random.default_rng(2))
    os.remove(tmp_path / "pred" / f"{FRAMES[1]}_leftImg8bit.png")
    assert evaluate.main(["folders", str(tmp_path / "pred"), str(tmp_path / "gtFine")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{FRAMES[1]}_gtFine_labelIds.png" in err[0]


def test_the_checkpoint_command_reproduces_the_trial_evaluation(data_root, tmp_path, capsys):
    session = LocalSession()
    spec = TrialSpec(
        method="source_only",
        task="synthetic-urban",
        hyperparams={"architecture": "tiny", "learning_rate": 0.01, "batch_size": 4},
        seed=0,
        max_steps=3,
        eval_every=3,
        data_root=data_root,
    )
    runner = TrialRunner(spec, session)
    runner.run()
    meta = runner.reporter._checkpoint_meta(runner.trial.positions[0], session.reports[-1], 3)
    checkpoints.write_weights(str(tmp_path), checkpoints.BEST, runner.modules, meta)
    path = str(tmp_path / f"{checkpoints.BEST}.pt")
    metrics, _ = evaluate.evaluate_checkpoint(path, data_root=data_root)
    assert metrics["eval/best_val_target_miou/val/miou"] == pytest.approx(session.reports[-1]["val_target/miou"])
    assert evaluate.main(["checkpoint", path, "--no-log", "--data-root", data_root]) == 0
    assert "miou" in capsys.readouterr().out
    assert evaluate.main(["checkpoint", path, "--split", "test", "--data-root", data_root]) == 2
    assert "has no test split" in capsys.readouterr().err


def test_trainids_predictions_against_official_labelids_ground_truth(tmp_path):
    """The usual pairing (issue 19 item 9): a model writes trainIds, the official gtFine files are labelIds. The
    scores equal the labelIds-vs-labelIds scores of the same predictions."""
    pairs = _tree(tmp_path, np.random.default_rng(3))
    from cityscapesscripts.helpers.labels import id2label as table

    for prediction_path, _ in pairs:  # rewrite the predictions as trainIds (classes not evaluated → 255)
        label_ids = np.asarray(Image.open(prediction_path))
        train_ids = np.vectorize(lambda i: table[int(i)].trainId if 0 <= table[int(i)].trainId < 255 else 255)(
            label_ids
        )
        os.makedirs(tmp_path / "pred-train", exist_ok=True)
        Image.fromarray(train_ids.astype(np.uint8)).save(tmp_path / "pred-train" / os.path.basename(prediction_path))
    task = tasks.get("gta5-cityscapes")
    reference = evaluate.evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gtFine"), "labelIds", task)
    ours = evaluate.evaluate_folders(str(tmp_path / "pred-train"), str(tmp_path / "gtFine"), "trainIds", task)
    assert ours == pytest.approx(reference, abs=1e-9)
    # the old mistake, ground truth read as trainIds: one line naming the file and the flag, not a torch traceback
    code = evaluate.main(
        [
            "folders",
            str(tmp_path / "pred-train"),
            str(tmp_path / "gtFine"),
            "--format",
            "trainIds",
            "--gt-format",
            "trainIds",
        ]
    )
    assert code == 2


def test_checkpoint_command_errors_are_one_line(tmp_path, capsys, data_root):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    MlflowClient(store).search_experiments()  # an existing store without that run
    capsys.readouterr()
    for source, message in (
        (str(tmp_path / "missing" / "best_val_target_miou.pt"), "no such checkpoint file"),
        ("last.pt", "no such checkpoint file 'last.pt'"),
        ("0123456789abcdef0123456789abcdef", "no MLflow run '0123456789abcdef0123456789abcdef' in sqlite:///"),
        ("0123456789abcdef0123456789abcdef", "no MLflow store at sqlite:///"),
    ):
        uri = store if "store" not in message else f"sqlite:///{tmp_path / 'nowhere.db'}"
        assert evaluate.main(["checkpoint", source, "--tracking-uri", uri, "--data-root", data_root]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    # a damaged shard of a synthetic dataset is regenerated before use (real datasets: tests/platform/test_converters)
    session = LocalSession()
    spec = TrialSpec(
        method="source_only",
        task="synthetic-urban",
        hyperparams={"architecture": "tiny"},
        seed=0,
        max_steps=1,
        eval_every=1,
        data_root=data_root,
    )
    runner = TrialRunner(spec, session)
    runner.run()
    meta = runner.reporter._checkpoint_meta(runner.trial.positions[0], session.reports[-1], 1)
    checkpoints.write_weights(str(tmp_path), checkpoints.LAST, runner.modules, meta)
    damaged = tmp_path / "data"
    import shutil

    for name in ("synthetic-urban-source", "synthetic-urban-target"):
        shutil.copytree(os.path.join(data_root, name), damaged / name)
    shard = sorted((damaged / "synthetic-urban-target" / "val").iterdir())[0]
    whole = shard.read_bytes()
    shard.write_bytes(whole[:1000])
    assert evaluate.main(["checkpoint", str(tmp_path / "last.pt"), "--no-log", "--data-root", str(damaged)]) == 0
    assert shard.read_bytes() == whole
