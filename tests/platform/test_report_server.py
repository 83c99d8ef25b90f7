"""A tiny grid sweep (3 points x 2 seeds, 6 steps, a source-validation slice) against a real `mlflow server` on
127.0.0.1, checked through the REST client: the parent run holds the report (description, metrics, artifacts), the
children are named by their swept values with the defaults trial tagged, datasets are inputs, system metrics and
prediction grids are logged, the source-val rule has a pick, and `platform.report` over HTTP prints the same table as
over the server's SQLite file."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from platform.report import compact
from tests.conftest import python

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(tmp_path, subprocess_env):
    """`mlflow server` (SQLite backend, proxied artifacts); ready within 120 s or the test fails with its log; only
    this process (and its own process group: gunicorn/uvicorn workers) is stopped afterwards."""
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    command = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db"]
    command += ["--artifacts-destination", str(tmp_path / "artifacts")]
    process = subprocess.Popen(
        command, env=subprocess_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


def test_sweep_report_on_the_parent_run_and_the_same_table_over_http_and_sqlite(server, tmp_path, subprocess_env):
    env = dict(subprocess_env, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    sweep = [python(), "-m", "platform.sweep", "source_only", "--task", "synthetic-urban", "--grid", "lr"]
    sweep += ["--seeds", "0,1", "--max-steps", "6", "--eval-every", "3", "--name", "tiny", "--tracking-uri", server]
    sweep += ["--storage-path", str(tmp_path / "results"), "--source-val", "0.25"]
    out = subprocess.run(sweep, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "workflowType=machine_learning" in out.stdout and "step 6/6" in out.stdout
    assert "Trial status" not in out.stdout and "tensorboard" not in (out.stdout + out.stderr).lower()

    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("source_only/synthetic-urban")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "python -m platform.report" in experiment.tags["mlflow.note.content"]
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 6 and {c.info.status for c in children} == {"FINISHED"}

    note = parent.data.tags["mlflow.note.content"]
    assert "### Configurations" in note and "| 1 | learning_rate=0.003 | 2 |" in note
    assert "val_target/miou" in parent.data.metrics and "uda.best_trial" in parent.data.tags
    assert parent.data.params["sweep.grid"] == "lr" and parent.data.params["batch_size"] == "8"
    assert "learning_rate" in parent.data.params  # the best trial's swept value, under its field name
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/report.csv", "report/report.json"} <= artifacts
    assert "report/plots" in artifacts  # a 1-D product grid: the sensitivity lines
    # --source-val: every trial scores the held-out source slice, and the source-val rule has a pick
    assert all("val_source/miou" in c.data.metrics and c.data.params["source_val"] == "0.25" for c in children)
    assert parent.data.params["sweep.source_val"] == "0.25"
    by_point: dict[str, list[float]] = {}
    for c in children:
        label = (
            "defaults"
            if c.data.tags["uda.defaults"] == "true"
            else f"learning_rate={compact(float(c.data.params['learning_rate']))}"
        )
        by_point.setdefault(label, []).append(c.data.metrics["val_source/miou"])
    best = max(by_point, key=lambda label: statistics.mean(by_point[label]))  # the highest mean over the seeds
    (source_val_row,) = [line for line in note.splitlines() if line.startswith("| source-val |")]
    assert source_val_row.startswith(f"| source-val | {best} |"), (source_val_row, by_point)

    names = sorted(c.info.run_name for c in children)
    assert names[0].startswith("defaults · seed 0 · ") and names[-1].startswith("learning_rate=0.03 · seed 1 · ")
    assert sum(c.data.tags["uda.defaults"] == "true" for c in children) == 2
    child = children[0]
    inputs = {d.dataset.name: d for d in child.inputs.dataset_inputs}
    assert set(inputs) == {"synthetic-urban-source", "synthetic-urban-target"}
    digest = child.data.tags["dataset_fingerprint.synthetic-urban-source"].removeprefix("sha256:")[:36]
    assert inputs["synthetic-urban-source"].dataset.digest == digest
    assert any(k.startswith("system/cpu_utilization") for c in children for k in c.data.metrics)
    assert {a.path for a in client.list_artifacts(child.info.run_id, "predictions/step-00000006")} == {
        "predictions/step-00000006/target_val.png"
    }

    report = [python(), "-m", "platform.report", "tiny", "--tracking-uri"]
    over_http = subprocess.run(report + [server], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    direct = f"sqlite:///{tmp_path}/server.db"
    over_sqlite = subprocess.run(report + [direct], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert over_http.returncode == 0 and over_sqlite.returncode == 0, over_http.stderr[-2000:] + over_sqlite.stderr
    assert over_http.stdout == over_sqlite.stdout and "learning_rate=0.03" in over_http.stdout
    assert over_http.stdout == note  # the parent's description is the same report
