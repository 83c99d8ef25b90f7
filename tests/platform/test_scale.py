# Runs after test_integration.py on purpose (file order): in this session the Ctrl-C test hung whenever these ran first.
"""Cluster scale, for real: a Ray head started with `ray start --head` on 127.0.0.1 and a sweep submitted to it with
`ray job submit --working-dir .`, as on a remote cluster."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest

from tests.conftest import REPOSITORY_ROOT
from tests.platform.services import descendants, wait_until
from tests.platform.test_integration import metric_steps, runs_of

pytestmark = pytest.mark.integration


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ray(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _stop_own_ray(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop the head this test started, and only it: SIGTERM to its `ray start --block` (which shuts down the
    processes it started), then SIGKILL to whatever of them is left: its descendants and the processes that run in
    its own temp dir. Never `ray stop`, which stops every Ray process on the machine (a user's, another test run's)."""
    import psutil

    children = descendants(head.pid)
    head.terminate()
    try:  # a graceful stop waits up to 30 s on busy workers: everything left is killed below anyway
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        head.kill()
    leftovers = {p.pid: p for p in children if p.is_running()}
    for process in psutil.process_iter(["pid", "cmdline"]):
        if temp_dir in " ".join(process.info["cmdline"] or []):
            leftovers[process.pid] = process
    for process in leftovers.values():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def ray_head(subprocess_env):
    """A head node of its own (temp dir, free ports, dashboard on loopback, Ray's token auth as Ray sets it up),
    started with `ray start --head --block` and stopped afterwards by stopping exactly its processes."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    # free ports for everything the head binds, so that another Ray cluster on this machine (a user's, another test
    # run's) cannot take them: the dashboard agent's default 52365 taken means no job can ever be submitted
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics = _free_ports(7)
    env = dict(subprocess_env)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])  # `python` = this venv
    env["RAY_AUTH_MODE"] = "token"
    log = open(os.path.join(temp_dir, "head.log"), "w")
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    arguments = [
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--include-dashboard",
        "true",
        "--ray-client-server-port",
        str(client),
        "--dashboard-agent-listen-port",
        str(agent_http),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(runtime_env),
        "--metrics-export-port",
        str(metrics),
        "--num-cpus",
        "3",
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
    ]
    head = subprocess.Popen([ray, *arguments], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env["UDA_TEST_RAY_ADDRESS"] = f"127.0.0.1:{gcs}"  # for drivers that join this head with --address
    try:

        def ready() -> bool:
            import urllib.error
            import urllib.request

            assert head.poll() is None, open(os.path.join(temp_dir, "head.log")).read()[-3000:]
            if _ray("status", "--address", f"127.0.0.1:{gcs}", env=env, timeout=60).returncode != 0:
                return False
            try:  # the dashboard (job submission) comes up after the GCS; any HTTP answer (401: token auth) is up
                with urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=5):
                    return True
            except urllib.error.HTTPError:
                return True
            except OSError:
                return False

        wait_until(ready, "the Ray head")
        env["UDA_TEST_RAY_HEAD_PID"] = str(head.pid)  # the head's processes are its descendants
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        _stop_own_ray(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


AGENT_NOT_READY = ("No available agent to submit job", "try again later", "Failed to connect to Ray at address")


def _submit(*args: str, env: dict, attempts: int = 30, pause_s: float = 10.0) -> subprocess.CompletedProcess:
    """`ray job submit`, again after a pause while the head's job agent is not up yet (bounded)."""
    import time

    for attempt in range(attempts):
        submitted = _ray(*args, env=env, timeout=600)
        output = submitted.stdout + submitted.stderr
        if submitted.returncode == 0 or not any(text in output for text in AGENT_NOT_READY) or attempt + 1 == attempts:
            return submitted
        time.sleep(pause_s)
    raise AssertionError("unreachable")


def test_ray_job_submit_with_working_dir_runs_a_sweep(ray_head, tmp_path, data_root):
    env, dashboard = ray_head
    submitted = _submit(
        "job",
        "submit",
        "--address",
        dashboard,
        "--working-dir",
        REPOSITORY_ROOT,
        "--",
        "python",
        "-m",
        "platform.sweep",
        "source_only",
        "--task",
        "synthetic-urban",
        "--num-samples",
        "1",
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--data-root",
        data_root,
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--storage-path",
        str(tmp_path / "results"),
        env=env,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in (submitted.stdout + submitted.stderr).lower()
    _, parents, children = runs_of(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert "val_target/miou" in children[0].data.metrics


@pytest.fixture
def mlflow_server(tmp_path, subprocess_env):
    """A real `mlflow server` on 127.0.0.1: SQLite backend, artifacts proxied to a local directory."""
    import time
    import urllib.request

    (port,) = _free_ports(1)
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    log = open(tmp_path / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [
            mlflow,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],
        env=subprocess_env,
        stdout=log,
        stderr=subprocess.STDOUT,
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
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "mlflow-server.log").read_text()
            time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_tracking_to_an_mlflow_server(mlflow_server, tmp_path, subprocess_env):
    from mlflow.tracking import MlflowClient

    from tests.platform.test_integration import run_cli

    out = run_cli(
        "platform.train",
        [
            "source_only",
            "--task",
            "synthetic-urban",
            "--max-steps",
            "4",
            "--eval-every",
            "2",
            "--tracking-uri",
            mlflow_server,
            "--storage-path",
            str(tmp_path / "results"),
        ],
        tmp_path,
        subprocess_env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("source_only/synthetic-urban")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 2 and len(children) == 1 and all(r.info.status == "FINISHED" for r in runs)
    assert [m.step for m in client.get_metric_history(children[0].info.run_id, "val_target/miou")] == [2, 4]
    # the rank-0 worker uploaded the checkpoints through the server into its artifact store
    names = {a.path for a in client.list_artifacts(children[0].info.run_id, "checkpoints")}
    assert {"checkpoints/last.pt", "checkpoints/best_val_target_miou.pt"} <= names
    stored = [f for _, _, files in os.walk(tmp_path / "server-artifacts") for f in files]
    assert "last.pt" in stored


# The process that runs a trial's training loop: a Ray Train worker, or (inline) the Tune trial's own process.
TRAINING_PROCESS = {"train": "ray::RayTrainWorker", "inline": "ray::ImplicitFunc"}


def _training_pids(runner: str, driver: int) -> list[int]:
    """The training processes among the descendants of this test's own driver (never another run's)."""
    return [p.pid for p in descendants(driver) if TRAINING_PROCESS[runner] in " ".join(p.cmdline())]


@pytest.mark.parametrize("runner", ["train", "inline"])
def test_a_killed_training_process_resumes_from_its_checkpoint(tmp_path, subprocess_env, runner):
    """train: Ray Train restarts the worker group from its latest checkpoint; inline: Tune restarts the trial from
    its latest checkpoint. Either way the MLflow run continues (one run, FINISHED)."""
    import signal
    import time

    from tests.conftest import python
    from tests.platform.test_integration import store_args

    process = subprocess.Popen(
        [
            python(),
            "-m",
            "platform.train",
            "source_only",
            "--task",
            "synthetic-urban",
            "--max-steps",
            "120",
            "--eval-every",
            "20",
            "--max-failures",
            "1",
            "--trial-runner",
            runner,
            *store_args(tmp_path),
        ],
        cwd=tmp_path,
        env=subprocess_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    killed = []
    try:
        deadline = time.monotonic() + 300
        while not [s for s in metric_steps(tmp_path / "mlflow.db", "val_target/miou") if s >= 40]:
            assert process.poll() is None and time.monotonic() < deadline, "the trial did not reach step 40"
            time.sleep(0.5)
        killed = _training_pids(runner, process.pid)
        assert len(killed) == 1
        os.kill(killed[0], signal.SIGKILL)
        output, _ = process.communicate(timeout=400)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    _, _, children = runs_of(tmp_path)
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    steps = metric_steps(tmp_path / "mlflow.db", "val_target/miou")
    # resumed from a checkpoint, not from step 0: every evaluation through the last step is there, and at most the
    # one evaluation after the last checkpoint Ray Train (or Tune) had registered when the process died is done twice
    assert sorted(set(steps)) == list(range(20, 121, 20)) and steps == sorted(steps), steps
    assert len(steps) - len(set(steps)) <= 1 and steps.count(20) == 1, steps


def _finished_children(database) -> int:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as connection:
            return connection.execute(
                "SELECT COUNT(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE t.key = 'mlflow.parentRunId' AND r.status = 'FINISHED'"
            ).fetchone()[0]
    except sqlite3.Error:
        return 0


# Two CPUs per trial on the head's 3 CPUs, so that trials run one at a time: two Ray Train workers, or one inline
# trial with two CPUs; an inline trial has no worker start-up, so it gets more steps to be killed in the middle of.
ONE_TRIAL_AT_A_TIME = {
    "train": ["--workers", "2", "--max-steps", "12"],
    "inline": ["--cpus-per-worker", "2", "--max-steps", "40"],
}


@pytest.mark.parametrize("runner", ["train", "inline"])
def test_a_killed_sweep_driver_resumes_without_rerunning_finished_trials(ray_head, tmp_path, data_root, runner):
    """The driver is SIGKILLed while trial 2 of 2 runs (trial 1 finished); `--resume` on the same cluster finishes
    trial 2 from its checkpoint, does not train trial 1 again, keeps the sweep's limit of one trial at a time (issue
    20 item 5) and leaves no MLflow run RUNNING."""
    import signal
    import threading
    import time

    env, _ = ray_head
    database = tmp_path / "mlflow.db"
    common = [
        "--data-root",
        data_root,
        "--tracking-uri",
        f"sqlite:///{database}",
        "--storage-path",
        str(tmp_path / "results"),
        "--address",
        env["UDA_TEST_RAY_ADDRESS"],
    ]
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "platform.sweep",
            "source_only",
            "--task",
            "synthetic-urban",
            "--num-samples",
            "2",
            "--eval-every",
            "4",
            *ONE_TRIAL_AT_A_TIME[runner],
            "--trial-runner",
            runner,
            "--name",
            "killed",
            *common,
        ],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    budget = int(ONE_TRIAL_AT_A_TIME[runner][-1])
    try:
        deadline = time.monotonic() + 480
        # kill once trial 1 has finished and trial 2 has reported (and checkpointed) at least once
        while not (
            _finished_children(database) == 1 and len(metric_steps(database, "val_target/miou")) >= budget // 4 + 1
        ):
            assert driver.poll() is None, "the sweep ended before it could be killed mid-way"
            assert time.monotonic() < deadline, "trial 2 never reported while trial 1 was finished"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    from tests.platform.test_integration import runs_of

    _, _, children = runs_of(tmp_path)
    first = next(r for r in children if r.info.status == "FINISHED")
    head, most, done = int(env["UDA_TEST_RAY_HEAD_PID"]), [0], threading.Event()

    def watch() -> None:  # Ray Train trials: how many controllers run at once on the head while the sweep resumes
        while not done.is_set():
            controllers = [p for p in descendants(head) if "TrainController" in " ".join(_cmdline(p))]
            most[0] = max(most[0], len(controllers))
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        resumed = subprocess.run(
            [sys.executable, "-m", "platform.sweep", "source_only", "--resume", "--name", "killed", *common],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        done.set()
        watcher.join(timeout=5)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # the resumed sweep keeps its limit of one trial at a time (two CPUs per trial on the head's three); the watcher
    # sees the resumed Ray Train trial's controller (inline trials have none)
    assert most[0] == (1 if runner == "train" else 0), f"{most[0]} Ray Train controllers ran at once"
    client, parents, children = runs_of(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    # Trial 1 is not trained again. Tune snapshots its experiment state every few seconds, so a trial that finished
    # just before the kill may be restored from its final checkpoint: it then only evaluates once more at its end.
    again = [m.step for m in client.get_metric_history(first.info.run_id, "val_target/miou")]
    assert sorted(set(again)) == list(range(4, budget + 1, 4)) and again == sorted(again), again
    assert len(again) - len(set(again)) <= 1 and again.count(4) == 1, again
    second = next(r for r in children if r.info.run_id != first.info.run_id)
    steps = [m.step for m in client.get_metric_history(second.info.run_id, "val_target/miou")]
    assert steps[-1] == budget and steps[0] == 4  # trial 2 continued to the end of its own budget


def test_the_slot_keeper_lets_one_of_three_restored_trials_train_at_a_time(tmp_path, subprocess_env):
    """Issue 20 item 5, at the mechanism a resumed sweep relies on: Tune applies max_concurrent_trials to the trials
    its searcher suggests, not to those it restores, so every trial of a resumed sweep holds one of the sweep's
    SlotKeeper slots while it trains (tuning.run_trial). Three unfinished trials, started at once as Tune restores
    them, in three Ray processes on a real local cluster, a limit of one: never more than one trains, and all three
    finish; a trial that asks again (a retried trial) keeps its own slot. Made a no-op, `trial_slot` fails this (the
    three spans overlap). The end-to-end resume, and that it keeps its limit, is the killed-driver test above."""
    script = textwrap.dedent("""
        import json, time, ray
        from platform import cluster, tuning
        cluster.connect()
        name = tuning.slot_keeper_name("capped")
        keeper = tuning.SlotKeeper.options(name=name, namespace=tuning.SLOTS_NAMESPACE).remote(1)

        @ray.remote(num_cpus=0)
        def restored_trial(trial_id):
            with tuning.trial_slot(name, trial_id, pause_s=0.05):
                started = time.time()
                again = ray.get(keeper.acquire.remote(trial_id))  # a retried trial asks again: its own slot
                time.sleep(1.0)
                return started, time.time(), again

        spans = ray.get([restored_trial.remote(f"trial-{i}") for i in range(3)])
        print("RESULT" + json.dumps({"spans": spans, "held": ray.get(keeper.held.remote())}))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.split("RESULT", 1)[1].splitlines()[0])
    spans = sorted(result["spans"])
    assert len(spans) == 3
    for (_, ended, _), (started, _, _) in zip(spans, spans[1:]):
        assert started >= ended, f"two trials trained at once with a limit of one: {spans}"
    assert all(again for _, _, again in spans)
    assert result["held"] == 0  # every slot given back


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:
        return []
