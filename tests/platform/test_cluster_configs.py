"""The configs in cluster/: the launcher YAML against Ray's own schema, the KubeRay manifests' shape, and the
security defaults (loopback dashboards, no credentials)."""

from __future__ import annotations

import os
import re

import yaml
from ray.autoscaler._private.util import validate_config

from tests.conftest import REPOSITORY_ROOT

CLUSTER = os.path.join(REPOSITORY_ROOT, "cluster")


def _load_all(name):
    with open(os.path.join(CLUSTER, name)) as handle:
        return list(yaml.safe_load_all(handle))


def test_launcher_yaml_validates_against_rays_schema_and_installs_the_project():
    (config,) = _load_all("cluster.yaml")
    validate_config(config)  # raises jsonschema.ValidationError / ValueError on a bad config
    gpu = config["available_node_types"]["worker.gpu"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0 and gpu["max_workers"] > 0
    assert config["available_node_types"][config["head_node_type"]]["resources"]["GPU"] == 0
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "PYTHONPATH=$HOME/uda" in setup
    assert all(
        "PYTHONPATH=$HOME/uda" in c
        for c in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]
    )
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]


def test_kuberay_manifests_have_gpu_workers_a_shared_volume_and_the_project_on_pythonpath():
    cluster, claim = _load_all("kuberay-raycluster.yaml")
    (job,) = _load_all("kuberay-rayjob.yaml")
    assert (cluster["kind"], claim["kind"], job["kind"]) == ("RayCluster", "PersistentVolumeClaim", "RayJob")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            (container,) = pod["spec"]["containers"]
            assert {"name": "PYTHONPATH", "value": "/opt/uda"} in container["env"]
            assert any(m["mountPath"] == "/shared" for m in container["volumeMounts"])
        worker = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job["spec"]["entrypoint"].startswith("python -m platform.sweep cscl")


def test_no_credentials_in_cluster_configs_or_docs():
    pattern = re.compile(r"(AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]\s*\S+|password\s*[:=]\s*\S+)", re.I)
    for name in os.listdir(CLUSTER):
        with open(os.path.join(CLUSTER, name)) as handle:
            assert not pattern.search(handle.read()), name


def test_the_guides_sweep_commands_parse_with_the_cli():
    """Every complete `python -m platform.sweep ...` command of the cluster guide uses options the CLI has."""
    import shlex

    from platform import cli

    with open(os.path.join(CLUSTER, "README.md")) as handle:
        text = re.sub(r"\\\n\s*", " ", handle.read())  # join shell continuation lines
    spans = [re.sub(r"\s+", " ", span) for span in re.findall(r"`([^`]+)`", text)]  # inline code, unfolded
    blocks = [line for line in text.splitlines() if line.startswith("    ")]  # indented code blocks
    commands = [
        part.split("python -m platform.sweep ", 1)[1] for part in spans + blocks if "python -m platform.sweep " in part
    ]
    commands = [c for c in commands if not c.strip().startswith("...")]
    assert len(commands) >= 3
    for command in commands:
        argv = shlex.split(command.replace("<sweep name>", "NAME"))
        cli.build_parser(False).parse_args(argv)  # exits (SystemExit) on an unknown option
