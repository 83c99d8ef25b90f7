"""Bad input: one clear line, exit code 2, nothing started (no Ray, no MLflow store, no results directory)."""

from __future__ import annotations

import os
import subprocess

import pytest
import ray

import methods
from platform import cli
from tests.conftest import python

CASES = [
    (["nope"], f"unknown method 'nope'; valid: {', '.join(sorted(methods.REGISTRY))}\n"),
    (["source_only", "--task", "mars"], "unknown task 'mars' for source_only; valid: synthetic-urban"),
    (["source_only", "--grid", "fig9"], "unknown grid 'fig9' for source_only; valid: lr"),
    (
        ["source_only", "--set", "lr=0.1"],
        "unknown hyperparameter 'lr' for source_only; valid: architecture, backbone_weights",
    ),
    (["source_only", "--set", "learning_rate=-1"], "learning_rate must be > 0 (got -1.0)"),
    (["source_only", "--set", "batch_size=0"], "batch_size must be >= 1 (got 0)"),
    (
        ["source_only", "--set", "architecture=deeplabv3_resnet50", "--set", "batch_size=1"],
        "deeplabv3_resnet50 needs batch_size >= 2 per worker",
    ),
    (["source_only", "--set", "learning_rate"], "malformed --set 'learning_rate': expected key=value"),
    (["source_only", "--seeds", "0,x"], "malformed --seeds '0,x'"),
    (["source_only", "--max-steps", "0"], "--max-steps must be >= 1"),
    (["source_only", "--workers", "0"], "--workers must be >= 1"),
    (["source_only", "--retry-failed"], "--retry-failed applies to --resume only"),
    (["source_only", "--resume", "--name", "nosuch"], "--resume: no sweep named 'nosuch' under"),
    (["source_only", "--workers", "2", "--sync-batchnorm"], "--sync-batchnorm needs GPU workers"),
    (
        ["source_only", "--trial-runner", "inline", "--workers", "2"],
        "--trial-runner inline trains in one process: use --workers 1, or --trial-runner train (or auto) for 2 workers",
    ),
    (["source_only", "--trial-runner", "local"], "argument --trial-runner: invalid choice: 'local'"),
    (["source_only", "--search", "grid"], "argument --search: invalid choice: 'grid'"),
    (["source_only", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["source_only", "--grid", "lr", "--set", "learning_rate=0.1"], "--set learning_rate conflicts with the sweep"),
    (["source_only", "--source-val", "1"], "--source-val must be a fraction in [0, 1), e.g. 0.1 (got 1)"),
    (["source_only", "--source-val", "x"], "argument --source-val: invalid float value: 'x'"),
    # a slice no image of the synthetic-urban source falls into (checked after the data is prepared)
    (["source_only", "--source-val", "1e-9"], "--source-val 1e-09 holds out 0 of the 800 pixel-labelled"),
]


@pytest.mark.parametrize("argv, message", CASES)
def test_bad_input_is_one_line_exit_2_and_starts_nothing(argv, message, tmp_path, capsys, data_root):
    store, storage = tmp_path / "mlflow.db", tmp_path / "results"
    code = cli.main(
        argv + ["--tracking-uri", f"sqlite:///{store}", "--storage-path", str(storage), "--data-root", data_root]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not store.exists() and not storage.exists() and not ray.is_initialized()


def test_missing_dataset_names_the_command_that_prepares_it(tmp_path, capsys):
    empty = tmp_path / "data"
    code = cli.main(
        [
            "source_only",
            "--task",
            "gta5-cityscapes",
            "--set",
            "backbone_weights=random",  # past the ImageNet-weights check, which comes first
            "--data-root",
            str(empty),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--storage-path",
            str(tmp_path / "r"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "dataset 'gta5' for task gta5-cityscapes is not prepared" in err
    assert f"python -m platform.data convert gta5 SRC_DIR {empty}/gta5" in err
    assert not (tmp_path / "mlflow.db").exists() and not ray.is_initialized()


@pytest.mark.parametrize(
    "method, task",
    [
        ("source_only", "cityscapes-nthu-rome"),
        ("source_only", "synthia-cityscapes"),
        ("source_only", "endoscopy"),
        ("source_only", "montgomery-jsrt"),
        ("adaptsegnet", "synthia-cityscapes"),
        ("adaptsegnet", "cityscapes-nthu-rome"),
    ],
)
def test_max_steps_is_honoured_on_every_pair_the_audit_found_unrunnable(tmp_path, capsys, method, task):
    """Issue 19: these pairs said "no step budget ...; pass --max-steps N" although --max-steps was passed. With an
    empty data root the CLI now gets past the budget to the data check (the budget itself: test_registry)."""
    code = cli.main(
        [method, "--task", task, "--max-steps", "5", "--set", "backbone_weights=random"]
        + ["--data-root", str(tmp_path / "data"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
        + ["--storage-path", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "is not prepared" in err and "step budget" not in err, err


def test_the_real_command_exits_2(subprocess_env, tmp_path):
    out = subprocess.run(
        [python(), "-m", "platform.sweep", "no_such_method"],
        cwd=tmp_path,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    valid = ", ".join(sorted(methods.REGISTRY))
    assert out.stderr.strip().splitlines() == [f"error: unknown method 'no_such_method'; valid: {valid}"]
    assert os.listdir(tmp_path) == []


def test_train_command_rejects_sweep_options(subprocess_env, tmp_path):
    out = subprocess.run(
        [python(), "-m", "platform.train", "source_only", "--grid", "lr"],
        cwd=tmp_path,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "unrecognized arguments: --grid lr" in out.stderr


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "python -m platform.sweep source_only --task synthetic-urban --grid lr" in capsys.readouterr().out


def test_weights_files_are_checked_before_anything_starts(tmp_path, capsys, data_root):
    common = [
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--storage-path",
        str(tmp_path / "r"),
        "--data-root",
        data_root,
        "--set",
        "architecture=deeplabv2_resnet101",
    ]
    code = cli.main(["source_only", "--set", f"backbone_weights={tmp_path / 'nope.pth'}", *common])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"backbone_weights: no such file '{tmp_path / 'nope.pth'}'" in err
    import torch

    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "vgg_like.pth")
    code = cli.main(["source_only", "--set", f"backbone_weights={tmp_path / 'vgg_like.pth'}", *common])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert (
        "cannot be loaded" in err
        and "missing keys: conv1.weight" in err
        and "unexpected keys: features.0.weight" in err
    )
    assert not (tmp_path / "mlflow.db").exists() and not ray.is_initialized()


def _saved_sweep(tmp_path, argv):
    args = cli.build_parser(False).parse_args(argv)
    cli.save_sweep_args(args, str(tmp_path / "results"), "s1")
    return ["--resume", "--name", "s1", "--storage-path", str(tmp_path / "results")]


def test_resume_continues_with_the_settings_the_sweep_started_with(tmp_path):
    resume = _saved_sweep(tmp_path, ["source_only", "--max-steps", "20", "--set", "weight_decay=0.1", "--workers", "2"])
    args = cli.resume_args(
        cli.build_parser(False).parse_args(["source_only", "--task", "synthetic-urban", *resume, "--retry-failed"]),
        single=False,
    )
    assert args.max_steps == 20 and args.overrides == ["weight_decay=0.1"] and args.workers == 2
    assert args.resume and args.retry_failed and args.name == "s1"


def test_resume_with_a_different_setting_is_one_line_exit_2(tmp_path, capsys):
    resume = _saved_sweep(tmp_path, ["source_only", "--max-steps", "20"])
    store = tmp_path / "mlflow.db"
    code = cli.main(["source_only", *resume, "--max-steps", "30", "--tracking-uri", f"sqlite:///{store}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and not store.exists() and not ray.is_initialized()
    assert (
        "--resume continues sweep 's1' with the settings it started with; drop --max-steps 30 (the sweep has 20)" in err
    )


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("where", ["tracking", "storage", "address", "cache"])
def test_unreachable_services_fail_fast_before_ray_starts(where, tmp_path, capsys, data_root, monkeypatch):
    """Issue 19 item 6: an MLflow server that does not answer, a storage path that cannot be written, a Ray head
    that does not answer (and a decoded-row budget that is not a number): one line, exit 2, no Ray, no MLflow
    store, no results folder, within seconds."""
    import time

    if where == "cache":
        monkeypatch.setenv("UDA_DECODED_CACHE_MB", "lots")

    store, storage = tmp_path / "mlflow.db", tmp_path / "results"
    (tmp_path / "a-file").write_text("not a folder")
    tracking = f"http://127.0.0.1:{_free_port()}" if where == "tracking" else f"sqlite:///{store}"
    storage_path = str(tmp_path / "a-file" / "results") if where == "storage" else str(storage)
    address = ["--address", f"127.0.0.1:{_free_port()}"] if where == "address" else []
    started = time.monotonic()
    code = cli.main(
        ["source_only", "--max-steps", "2", "--tracking-uri", tracking, "--storage-path", storage_path, *address]
        + ["--data-root", data_root]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    expected = {
        "tracking": "cannot reach the MLflow tracking server at http://127.0.0.1:",
        "storage": f"--storage-path {storage_path} cannot be written",
        "address": "cannot reach the Ray cluster at 127.0.0.1:",
        "cache": "UDA_DECODED_CACHE_MB must be a number of megabytes >= 0, e.g. 512 (got 'lots')",
    }[where]
    assert expected in err, err
    assert time.monotonic() - started < 60  # bounded waits, not Ray's own retries for minutes
    assert not store.exists() and not storage.exists() and not ray.is_initialized()


def test_placement_decision_on_fixed_and_growing_clusters():
    """What no node can ever hold is an error on a fixed cluster; a cluster that may grow gets a bounded wait."""
    from platform import preflight
    from platform.config import UsageError

    two_cpus = [{"CPU": 3.0}]  # a local 2-core cluster: one logical CPU more for the trial drivers' tokens
    three_workers = preflight.trial_request(False, 3, 1, 0, 0.01)
    assert preflight.placement(three_workers, two_cpus, may_grow=False) == "never"
    assert preflight.placement(three_workers, two_cpus, may_grow=True) == "wait"
    assert preflight.placement(preflight.trial_request(False, 2, 1, 0, 0.01), two_cpus, False) == "ok"
    assert preflight.placement(preflight.trial_request(True, 1, 3, 0, 0.01), two_cpus, False) == "never"  # 3.01
    gpu = preflight.trial_request(True, 1, 1, 1, 0.01)
    assert preflight.placement(gpu, two_cpus, False) == "never"
    assert preflight.placement(gpu, [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}], False) == "ok"
    spread = preflight.trial_request(False, 2, 4, 1, 0.01)  # two GPU workers fit only on two nodes
    assert preflight.fits(spread, [{"CPU": 5.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}])
    assert not preflight.fits(spread, [{"CPU": 9.0, "GPU": 1.0}])
    with pytest.raises(
        UsageError,
        match=r"a trial asks for 1 x \{CPU: 0.01\} \+ 3 x \{CPU: 1\} \(3.01 CPU in all\) and the cluster has 1 node\(s\): 3 CPU",
    ):
        preflight.check_placement(three_workers, lambda: two_cpus, may_grow=False)
    warnings, nodes = [], [two_cpus, two_cpus, [{"CPU": 3.0}, {"CPU": 2.0}]]  # a node joins on the third look
    preflight.check_placement(
        three_workers,
        lambda: nodes.pop(0) if len(nodes) > 1 else nodes[0],
        may_grow=True,
        wait_s=5,
        pause_s=0.01,
        warn=warnings.append,
    )
    assert len(warnings) == 1 and "waiting up to 5 s for the autoscaler" in warnings[0]
    with pytest.raises(UsageError):
        preflight.check_placement(
            three_workers, lambda: two_cpus, may_grow=True, wait_s=0.05, pause_s=0.01, warn=warnings.append
        )


@pytest.mark.integration
def test_workers_no_node_can_hold_fail_in_one_line_and_stop_ray(tmp_path, capsys, data_root):
    """--workers 3 on this 2-core machine's local cluster: Train's worker group used to time out and retry for ten
    minutes; now one line and exit 2 before any trial, with the local Ray stopped and no MLflow store."""
    store, storage = tmp_path / "mlflow.db", tmp_path / "results"
    code = cli.main(
        [
            "source_only",
            "--workers",
            "3",
            "--max-steps",
            "2",
            "--tracking-uri",
            f"sqlite:///{store}",
            "--storage-path",
            str(storage),
            "--data-root",
            data_root,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0 and "a trial asks for" in err and "lower --workers" in err, err
    assert not store.exists() and not storage.exists() and not ray.is_initialized()


@pytest.mark.parametrize("why", ["joined cluster", "async MLflow"])
def test_the_command_exits_normally_where_atexit_handlers_have_work(why, monkeypatch):
    """`exit_command` skips the interpreter's teardown (os._exit) only after stopping a local cluster it started with
    synchronous MLflow logging; a joined cluster (Tune's atexit handler removes the sweep's trainable from it) or
    MLFLOW_ENABLE_ASYNC_LOGGING (MLflow's atexit handler drains its queue) gets a normal exit with the same code."""
    from platform import cluster

    monkeypatch.setattr(cluster, "started_local", why != "joined cluster")
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "true" if why == "async MLflow" else "false")
    with pytest.raises(SystemExit) as exit:
        cli.exit_command(3)
    assert exit.value.code == 3
