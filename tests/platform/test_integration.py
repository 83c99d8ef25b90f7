"""End to end through a real local Ray cluster, Ray Tune + Train, Optuna and MLflow SQLite stores (no mocks).

Each test runs the real command in a subprocess from a scratch directory, then inspects the MLflow store."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import textwrap
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

import methods
import search_spaces
from platform import checkpoints
from tests.conftest import python

pytestmark = pytest.mark.integration


def run_cli(module: str, args: list[str], cwd, env, timeout: int = 600, code: str | None = None):
    command = [python(), "-c", code] if code else [python(), "-m", module]
    out = subprocess.run(command + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return out


def store_args(tmp_path) -> list[str]:
    return ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage-path", str(tmp_path / "results")]


def runs_of(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("uda.sweep")]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_sweep_done_when_command(tmp_path, subprocess_env):
    """The issue's acceptance command: one parent run, two FINISHED children with val_target/miou and both
    checkpoints, loadable with torch.load(weights_only=True) into the method's modules."""
    out = run_cli(
        "platform.sweep",
        ["source_only", "--task", "synthetic-urban", "--num-samples", "2", "--max-steps", "20", *store_args(tmp_path)],
        tmp_path,
        subprocess_env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 trial(s) of 20 steps" in out.stdout and "expected duration" in out.stdout
    assert "Best configuration: learning_rate=" in out.stdout and "mlflow ui --backend-store-uri" in out.stdout
    client, parents, children = runs_of(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    fields = {f.name for f in __import__("dataclasses").fields(methods.get("source_only").hyperparams)}
    for child in children:
        assert fields <= set(child.data.params)
        assert {"method", "task", "seed", "code_version"} <= set(child.data.tags)
        assert any(k.startswith("dataset_fingerprint.") for k in child.data.tags)
        history = client.get_metric_history(child.info.run_id, "val_target/miou")
        assert [m.step for m in history] == [4, 8, 12, 16, 20]
        assert "val_target/iou/road" in child.data.metrics and "train/loss_seg_source" in child.data.metrics
        names = {a.path for a in client.list_artifacts(child.info.run_id, "checkpoints")}
        assert {"checkpoints/last.pt", "checkpoints/best_val_target_miou.pt"} <= names
        local = client.download_artifacts(child.info.run_id, "checkpoints", str(tmp_path / child.info.run_id))
        for kind in (checkpoints.LAST, checkpoints.BEST):
            state = torch.load(os.path.join(local, f"{kind}.pt"), weights_only=True)
            modules, meta = checkpoints.load_modules(os.path.join(local, f"{kind}.pt"))
            assert set(state) == set(modules.state_dict())
        best = json.load(open(os.path.join(local, "best_val_target_miou.json")))
        assert best["val_target/miou"] == pytest.approx(child.data.metrics["val_target/best_miou"])
    # the two configurations differ: the defaults first, then a sampled learning rate
    assert len({c.data.params["learning_rate"] for c in children}) == 2
    assert "sweep.json" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}


def test_non_finite_trial_fails_with_its_reason_and_the_sweep_goes_on(tmp_path, subprocess_env):
    code = textwrap.dedent("""
        import sys
        import search_spaces.source_only as space
        space.GRIDS["divergence"] = {"learning_rate": [1e6, 1e-2]}  # 1e6 diverges within a few steps
        from platform.cli import main
        raise SystemExit(main(sys.argv[1:]))
    """)
    out = run_cli(
        "",
        ["source_only", "--grid", "divergence", "--max-steps", "12", *store_args(tmp_path)],
        tmp_path,
        subprocess_env,
        code=code,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, parents, children = runs_of(tmp_path)
    by_lr = {float(c.data.params["learning_rate"]): c for c in children}
    assert by_lr[1e6].info.status == "FAILED"
    assert "NonFiniteLossError: train/loss_seg_source became nan" in by_lr[1e6].data.tags["uda.failure_reason"]
    assert by_lr[1e-2].info.status == "FINISHED" and parents[0].info.status == "FINISHED"
    assert "1 failed" in out.stdout and "became nan" in out.stdout


# `python -m platform.sweep ARGS` with Ctrl-C handled as in a terminal even when the test runner was started in the
# background of a script, where SIGINT is ignored and its children inherit that (Python then never raises
# KeyboardInterrupt: the sweep would ignore the test's Ctrl-C, as a background job should).
SWEEP_WITH_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'platform.sweep'; runpy.run_module('platform.sweep', run_name='__main__')"
)


def test_ctrl_c_leaves_no_run_running(tmp_path, subprocess_env):
    process = subprocess.Popen(
        [
            python(),
            "-c",
            SWEEP_WITH_CTRL_C,
            "source_only",
            "--max-steps",
            "2000",
            "--eval-every",
            "5",
            *store_args(tmp_path),
        ],
        cwd=tmp_path,
        env=subprocess_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if _metric_logged(tmp_path / "mlflow.db", "val_target/miou"):
                break
            time.sleep(2)
        else:
            pytest.fail("no trial reported in time")
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail("the sweep did not exit within 240 s of Ctrl-C; its threads:\n" + _stacks(process.pid))
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output[-3000:]
    _, parents, children = runs_of(tmp_path)
    assert parents[0].info.status == "KILLED"
    assert children and all(c.info.status in ("KILLED", "FINISHED", "FAILED") for c in children)
    assert "Continue: python -m platform.sweep source_only" in output


def _stacks(pid: int) -> str:
    """Every thread's Python stack of a live process (py-spy comes with ray[default]), for a hang's failure message."""
    spy = os.path.join(os.path.dirname(python()), "py-spy")
    dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    return (dump.stdout + dump.stderr)[-8000:]


def metric_steps(database, key: str) -> list[int]:
    """Read-only poll of a store that another process is still creating (an MlflowClient here would race it to
    create the schema): the steps at which `key` was logged by trials (child runs; a sweep's parent run gets its
    best trial's final metrics at its end), in order."""
    if not os.path.exists(database):
        return []
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as connection:
            return [
                row[0]
                for row in connection.execute(
                    "SELECT step FROM metrics WHERE key = ? AND run_uuid IN "
                    "(SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId') ORDER BY step",
                    (key,),
                )
            ]
    except sqlite3.Error:
        return []


def _metric_logged(database, key: str) -> bool:
    return bool(metric_steps(database, key))


def test_train_command_runs_both_seuda_stages(tmp_path, subprocess_env):
    """`platform.train` on a two-stage method: segmenter, then GANs with it frozen; lung metrics and translated
    samples reach MLflow."""
    out = run_cli(
        "platform.train",
        [
            "seuda",
            "--task",
            "synthetic-cxr",
            "--max-steps",
            "6",
            "--eval-every",
            "3",
            "--seed",
            "3",
            "--set",
            "lambda_sem=0.4",
            *store_args(tmp_path),
        ],
        tmp_path,
        subprocess_env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, parents, children = runs_of(tmp_path)
    assert len(parents) == 1 and len(children) == 1 and children[0].info.status == "FINISHED"
    run = children[0]
    assert run.data.params["lambda_sem"] == "0.4" and run.data.tags["seed"] == "3"
    assert run.data.tags["task"] == "synthetic-cxr"
    stages = [m.value for m in client.get_metric_history(run.info.run_id, "stage_index")]
    assert stages == [0.0, 1.0]  # an evaluation at the end of each stage
    assert {"val_target/dice/left_lung", "val_target/asd_undefined/right_lung", "train/loss_sem"} <= set(
        run.data.metrics
    )
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples/step-00000006")]
    assert sorted(samples) == ["samples/step-00000006/target.png", "samples/step-00000006/target_to_source.png"]
    assert not client.list_artifacts(run.info.run_id, "samples/step-00000003")  # stage 1 has nothing to translate


def test_two_trial_cscl_sweep(tmp_path, subprocess_env):
    out = run_cli(
        "platform.sweep",
        ["cscl", "--num-samples", "2", "--max-steps", "4", "--eval-every", "2", *store_args(tmp_path)],
        tmp_path,
        subprocess_env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, parents, children = runs_of(tmp_path)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {"train/loss_adv", "train/loss_reg", "train/pseudo_label_fraction"} <= set(children[0].data.metrics)
    assert children[0].data.params["xi1"] != children[1].data.params["xi1"]  # the defaults, then a sampled point


def test_tpe_search_with_asha(tmp_path, subprocess_env):
    out = run_cli(
        "platform.sweep",
        [
            "source_only",
            "--search",
            "tpe",
            "--num-samples",
            "3",
            "--scheduler",
            "asha",
            "--max-steps",
            "16",
            "--eval-every",
            "4",
            *store_args(tmp_path),
        ],
        tmp_path,
        subprocess_env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, parents, children = runs_of(tmp_path)
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    rates = sorted(float(c.data.params["learning_rate"]) for c in children)
    assert 0.01 in rates and len(set(rates)) == 3  # TPE evaluates the defaults first, then its own suggestions
    assert parents[0].data.params["sweep.mode"] == "tpe"


def test_ray_workers_import_platform_and_both_trial_runners_are_deterministic(tmp_path, subprocess_env, data_root):
    script = textwrap.dedent(f"""
        import json, ray
        from platform import cluster
        from platform.trainer import build_trainer
        cluster.connect()

        @ray.remote
        def probe():
            import platform, platform.metrics
            return hasattr(platform, "__path__"), platform.metrics.__name__, platform.system()

        result = build_trainer("source_only", task="synthetic-urban", seed=1, max_steps=6, eval_every=3,
                               storage_path={str(tmp_path)!r}, name="det", data_root={data_root!r}).fit()
        # the same configuration as an inline trial (the CLI's default for one worker), in the same Ray session
        from platform.cli import main
        code = main(["source_only", "--task", "synthetic-urban", "--seed", "1", "--max-steps", "6", "--eval-every",
                     "3", "--data-root", {data_root!r}, "--tracking-uri", "sqlite:///{tmp_path}/mlflow.db",
                     "--storage-path", {str(tmp_path / "results")!r}], single=True)
        print("RESULT" + json.dumps({{"probe": ray.get(probe.remote()), "inline_exit": code,
                                      "metrics": result.metrics}}))
    """)
    out = subprocess.run(
        [python(), "-c", script], cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    payload = json.loads(out.stdout.split("RESULT", 1)[1].splitlines()[0])
    assert payload["probe"][0] is True and payload["probe"][1] == "platform.metrics"
    trained = payload["metrics"]
    assert trained["step"] == 6
    # an inline trial runs the same loop in the Tune trial's process: the same evaluations, bit for bit, from two
    # runs in two processes (which two nondeterministic runs would not give; the training losses are not compared)
    assert payload["inline_exit"] == 0
    client, _, children = runs_of(tmp_path)
    assert len(children) == 1
    inline = {key: value for key, value in children[0].data.metrics.items() if key.startswith("val_target/")}
    assert inline and inline == {key: value for key, value in trained.items() if key.startswith("val_target/")}


def test_pbt_sweep_through_ray_and_mlflow_logs_the_history_and_its_exploits(tmp_path, subprocess_env):
    """A population of two inline cscl trials under --scheduler pbt, every evaluation a perturbation point: each run
    ends FINISHED with the whole budget and logs its PERTURBABLE hyperparameters as `hp/*` metrics at every
    evaluation; a member that exploited names the other trial in a tag and continues with perturbed values. Whether
    an exploit happens depends on the order in which the two report (Tune's asynchronous PBT compares with the
    other's last score), so it is checked where it happened; the exploit itself is tested deterministically in
    tests/platform/test_loop.py."""
    out = run_cli(
        "platform.sweep",
        ["cscl", "--scheduler", "pbt", "--num-samples", "2", "--max-steps", "8", "--eval-every", "2"]
        + store_args(tmp_path),
        tmp_path,
        subprocess_env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, parents, children = runs_of(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    trial_ids = {c.data.tags["uda.trial_id"] for c in children}
    perturbable = search_spaces.load("cscl").perturbable
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_target/miou")
        assert max(m.step for m in history) == 8  # the whole budget, whatever checkpoint it continued from
        hp = {}
        for name in perturbable:
            points = sorted(
                client.get_metric_history(child.info.run_id, f"hp/{name}"), key=lambda m: (m.step, m.timestamp)
            )
            assert {m.step for m in points} == {2, 4, 6, 8}
            hp[name] = points
        for tag, donor in child.data.tags.items():
            if not tag.startswith("uda.pbt.exploit.step-"):
                continue
            assert donor in trial_ids - {child.data.tags["uda.trial_id"]}
            step = int(tag.rsplit("-", 1)[1])
            if step < 8:  # it trained on after the exploit: with the donor's values, perturbed
                before = {name: [m.value for m in points if m.step <= step][-1] for name, points in hp.items()}
                after = {name: [m.value for m in points if m.step > step][0] for name, points in hp.items()}
                assert before != after
