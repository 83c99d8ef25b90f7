"""MLflow tracking: one experiment per (method, task), one parent run per sweep, one child run per trial.

Who writes what:
- the sweep driver creates the experiment (with an explicit artifact location for local stores, because MLflow
  resolves relative artifact roots against the cwd of whoever creates the experiment), the parent run holding the
  sweep definition, and at the end reconciles every child with Tune's outcome so that no run stays RUNNING;
- each trial's Tune function (the Train driver) creates or, on resume, finds its child run (keyed by the Tune trial
  id) with every hyperparameter as a param and the tags, and ends it FINISHED or FAILED with the reason;
- rank 0 of the trial's Train workers logs metrics at every evaluation and the adapted checkpoints as artifacts.
All of them use `MlflowClient` with explicit run ids: no process-global active run.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from platform import checkpoints

PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "uda.sweep"
TRIAL_TAG = "uda.trial_id"
REASON_TAG = "uda.failure_reason"
NOTE_TAG = "mlflow.note.content"
RETRIED_TAG = "uda.retried"  # a failed trial run again as a new trial by `--resume --retry-failed`
TERMINAL = {"FINISHED", "FAILED", "KILLED"}


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else an absolute SQLite file in the current directory (trial processes change cwd)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"


def local_artifact_root(tracking_uri: str) -> str | None:
    """For a local SQLite store: `mlartifacts/` beside the database file. None for servers (they decide)."""
    match = re.match(r"sqlite:///(.+)$", tracking_uri)
    if not match:
        return None
    database = match.group(1)
    return os.path.join(os.path.dirname(os.path.abspath(database)), "mlartifacts")


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1"


def code_version(repository: str) -> str:
    """`git describe --always --dirty` of the repository, or "unknown" outside a git checkout (e.g. a Ray job)."""
    try:
        out = subprocess.run(
            ["git", "-C", repository, "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


class Tracker:
    """Driver-side MLflow operations (sweep driver and per-trial Tune functions)."""

    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)

    def experiment(self, name: str) -> str:
        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        root = local_artifact_root(self.uri)
        location = None
        if root is not None:
            location = "file://" + os.path.join(root, re.sub(r"[^0-9A-Za-z_.-]+", "_", name))
        return self.client.create_experiment(name, artifact_location=location)

    def start_sweep(
        self,
        experiment_id: str,
        name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        artifacts: Mapping[str, str],
    ) -> str:
        """The parent run: sweep parameters as params, the full sweep definition as text artifacts."""
        run = self.client.create_run(experiment_id, run_name=name, tags={SWEEP_TAG: name, **tags})
        self._log_params(run.info.run_id, params)
        for filename, text in artifacts.items():
            self.client.log_text(run.info.run_id, text, filename)
        return run.info.run_id

    def find_sweep(self, experiment_id: str, name: str) -> str | None:
        runs = self.client.search_runs(
            [experiment_id], f"tags.`{SWEEP_TAG}` = '{name}' and attributes.run_name = '{name}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def start_trial(
        self,
        experiment_id: str,
        parent_run_id: str,
        trial_id: str,
        name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
    ) -> str:
        """The trial's child run; on resume (same trial id under the same parent) the existing run is reused."""
        existing = self.client.search_runs(
            [experiment_id],
            f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
            max_results=1,
        )
        if existing:
            run_id = existing[0].info.run_id
            for tag in (REASON_TAG, NOTE_TAG):  # a failed trial run again: its old failure no longer describes it
                if tag in existing[0].data.tags:
                    self.client.delete_tag(run_id, tag)
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            experiment_id, run_name=name, tags={PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, **tags}
        )
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def end(self, run_id: str, status: str, reason: str | None = None) -> None:
        if reason:
            self.client.set_tag(run_id, REASON_TAG, reason[:5000])
            self.client.set_tag(run_id, NOTE_TAG, f"{status}: {reason}"[:5000])
        self.client.set_terminated(run_id, status=status)

    def children(self, experiment_id: str, parent_run_id: str) -> list:
        return self.client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10000)

    def close_open_children(self, experiment_id: str, parent_run_id: str, status: str, reason: str) -> int:
        """End every child still RUNNING (or SCHEDULED) with `status`; returns how many were closed."""
        closed = 0
        for run in self.children(experiment_id, parent_run_id):
            if run.info.status not in TERMINAL:
                self.end(run.info.run_id, status, reason)
                closed += 1
        return closed

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(key, _param_value(value)) for key, value in sorted(params.items())]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])


class TrialLogger:
    """Rank-0 worker logging into an existing child run (implements platform.loop.RunLogger)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and math.isfinite(float(value))
        ]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def log_checkpoint(self, kind: str, modules: nn.ModuleDict, meta: Mapping[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="uda-weights-") as directory:
            checkpoints.write_weights(directory, kind, modules, meta)
            self.client.log_artifacts(self.run_id, directory, artifact_path=checkpoints.ARTIFACT_DIR)

    def log_images(self, images: Mapping[str, torch.Tensor], step: int) -> None:
        """Each named batch (B, C, H, W) in [0, 1] as one PNG strip under `samples/step-NNNNNNNN/<name>.png`."""
        with tempfile.TemporaryDirectory(prefix="uda-samples-") as directory:
            for name, batch in images.items():
                strip = torch.cat(list(batch.detach().cpu().clamp(0, 1)), dim=-1)  # (C, H, B*W)
                array = (strip.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(
                    os.path.join(directory, f"{name}.png")
                )
            self.client.log_artifacts(self.run_id, directory, artifact_path=f"samples/step-{step:08d}")


def tags_for(method: str, task: str, seed: int, code: str, fingerprints: Mapping[str, str]) -> dict[str, str]:
    tags = {"method": method, "task": task, "seed": str(seed), "code_version": code}
    tags.update({f"dataset_fingerprint.{name}": value for name, value in fingerprints.items()})
    return tags
