"""Two nodes, for real (issue 20 item 6): a Ray cluster of two worker nodes on this machine (`ray.cluster_utils`:
separate raylets and object stores, a head without CPUs), sweeps joining it with --address as they would a remote
cluster, and the storage path on the local S3-compatible server, so that checkpoints and per-sample stores are read
back from the object store and never from a node's disk by accident.

- a `--workers 2` trial with one worker per node gives the same metrics as two workers on one machine;
- the node that runs a trial is killed mid-trial: the trial restarts on the surviving node from its latest
  checkpoint and finishes with all its steps, its MLflow run ends FINISHED and records the restart, the other trial
  is not affected, nothing is left RUNNING, and the sweep's summary and report are complete.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.platform.services import descendants, moto_server, wait_until
from tests.platform.test_integration import metric_steps, runs_of
from tests.platform.test_scale import _finished_children

pytestmark = pytest.mark.integration


@pytest.fixture
def s3(tmp_path):
    with moto_server() as (endpoint, env):
        import pyarrow.fs as pafs

        host = endpoint.split("://", 1)[1]
        pafs.S3FileSystem(
            endpoint_override=host, scheme="http", access_key="test", secret_key="test", allow_bucket_creation=True
        ).create_dir("uda-nodes")
        yield env, "s3://uda-nodes/results"


def _cluster(node_cpus: list[int]):
    from ray.cluster_utils import Cluster

    # a lost node is declared dead after 2 missed health checks a second apart (Ray's default: 5, 3 s apart)
    config = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": config})
    nodes = [cluster.add_node(num_cpus=cpus) for cpus in node_cpus]
    cluster.wait_for_nodes()
    return cluster, nodes


def _sweep(args: list[str], cwd, env, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "platform.sweep", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kwargs,
    )


def _running_on(node, title: str) -> list[int]:
    """PIDs of processes titled `title` (ray::RayTrainWorker, ray::ImplicitFunc) that run on `node`."""
    return [p.pid for p in descendants(node.all_processes["raylet"][0].process.pid) if title in _title(p)]


def _title(process) -> str:
    try:
        return " ".join(process.cmdline())
    except Exception:
        return ""


def _train_rank(rank: int, init_file: str, spec: dict, out: str) -> None:
    """One of two data-parallel workers on this machine, joined by gloo, running the trial's loop; rank 0 saves the
    final evaluation."""
    import os

    import torch
    import torch.distributed as dist

    from platform.loop import LocalSession, TrialRunner, TrialSpec

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    session = LocalSession()
    session.rank, session.world_size = rank, 2  # what Ray Train's context gives a worker
    final = TrialRunner(TrialSpec.from_dict(spec), session).run()
    if rank == 0:
        torch.save({k: v for k, v in final.items() if k.startswith("val_target/")}, out)
    dist.barrier()
    os._exit(0)  # as tests/platform/test_distributed.py: no gloo teardown at exit


def test_data_parallel_workers_on_two_nodes_train_like_on_one(tmp_path, subprocess_env, s3, data_root, monkeypatch):
    """The same `--workers 2` trial: through the CLI on two nodes (one worker each), and as two gloo workers on this
    machine running the trial's loop with the TrialSpec the sweep builds (the task defaults, seed 0): the same
    target-validation metrics."""
    import torch
    import torch.multiprocessing as mp

    import search_spaces
    from platform.loop import TrialSpec

    env = {**subprocess_env, **s3[0]}
    # two nodes: the token CPU of the trial's driver and one worker fit on node A (2 CPUs), the other worker only on
    # node B (1 CPU)
    cluster, (node_a, node_b) = _cluster([2, 1])
    seen = {"a": 0, "b": 0}
    try:
        driver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "platform.train",
                "source_only",
                "--workers",
                "2",
                "--max-steps",
                "6",
                "--eval-every",
                "3",
                "--data-root",
                data_root,
                "--address",
                cluster.address,
                "--tracking-uri",
                f"sqlite:///{tmp_path}/mlflow.db",
                "--storage-path",
                s3[1],
            ],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        while driver.poll() is None:
            seen["a"] = max(seen["a"], len(_running_on(node_a, "RayTrainWorker")))
            seen["b"] = max(seen["b"], len(_running_on(node_b, "RayTrainWorker")))
            time.sleep(0.25)
        output = driver.stdout.read()
    finally:
        cluster.shutdown()
    assert driver.returncode == 0, output[-3000:]
    assert seen == {"a": 1, "b": 1}  # one worker per node
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    child = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    two_nodes = {k: v for k, v in child.data.metrics.items() if k.startswith("val_target/")}

    defaults = search_spaces.load("source_only").task_defaults["synthetic-urban"]
    spec = TrialSpec("source_only", "synthetic-urban", defaults, 0, max_steps=6, eval_every=3, data_root=data_root)
    out = str(tmp_path / "one-machine.pt")
    monkeypatch.setenv("PYTHONPATH", subprocess_env["PYTHONPATH"])  # the spawned workers import our `platform`
    mp.start_processes(_train_rank, args=(str(tmp_path / "init"), spec.to_dict(), out), nprocs=2, start_method="spawn")
    one_machine = torch.load(out, weights_only=True)
    assert two_nodes.keys() == one_machine.keys()
    for key, value in one_machine.items():
        assert two_nodes[key] == pytest.approx(value, abs=1e-9), key


def test_a_lost_node_restarts_its_trial_on_the_other_node(tmp_path, subprocess_env, s3, data_root):
    """Two trials, one per node (two CPUs each on three-CPU nodes); one node is killed once both trials have a checkpoint."""
    env = {**subprocess_env, **s3[0]}
    cluster, nodes = _cluster([3, 3])
    database = tmp_path / "mlflow.db"
    budget = 160  # long enough (about 8 s after the second report) that the kill lands mid-trial
    try:
        driver = _sweep(
            [
                "source_only",
                "--num-samples",
                "2",
                "--cpus-per-worker",
                "2",
                "--max-steps",
                str(budget),
                "--eval-every",
                "20",
                "--max-failures",
                "2",
                "--address",
                cluster.address,
                "--data-root",
                data_root,
                "--tracking-uri",
                f"sqlite:///{database}",
                "--storage-path",
                s3[1],
                "--name",
                "lost-node",
            ],
            tmp_path,
            env,
        )
        # MLflow gets a report's metrics before Tune gets its checkpoint, so a trial's step-40 metrics say its
        # step-20 checkpoint is in the bucket: the kill waits for both trials' second report
        wait_until(
            lambda: metric_steps(database, "val_target/miou").count(40) == 2 or driver.poll() is not None,
            "both trials' second report",
            timeout_s=600,
            pause_s=0.25,
        )
        assert driver.poll() is None, driver.stdout.read()[-3000:]
        victim = next(node for node in nodes if _running_on(node, "ImplicitFunc"))
        assert _finished_children(database) == 0  # the kill lands while both trials still train
        cluster.remove_node(victim, allow_graceful=False)
        output, _ = driver.communicate(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
        cluster.shutdown()
    assert driver.returncode == 0, output[-3000:]
    client, parents, children = runs_of(tmp_path)
    assert parents[0].info.status == "FINISHED" and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in children)
    restarted = [r for r in children if r.data.tags.get("uda.restarts")]
    assert len(restarted) == 1 and restarted[0].data.tags["uda.restarts"] == "1"  # the other trial: not affected
    for run in children:  # every trial reached its whole budget, the restarted one from a checkpoint (not from step 0)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_target/miou")]
        assert steps[-1] == budget and sorted(set(steps)) == list(range(20, budget + 1, 20)), steps
        assert steps.count(20) == 1, steps
    assert "Sweep lost-node: FINISHED. 2 trial(s) finished, 0 failed" in output
    report = subprocess.run(
        [sys.executable, "-m", "platform.report", "lost-node", "--tracking-uri", f"sqlite:///{database}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0 and "2 finished run(s)" in report.stdout, report.stdout[-2000:]
