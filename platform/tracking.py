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

import contextlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
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
DEFAULTS_TAG = "uda.defaults"  # "true" on the trial of the defaults configuration (nothing swept away from them)
SWEPT_TAG = "uda.swept"  # the trial's swept values, JSON
BEST_TAG = "uda.best_trial"  # on a sweep's parent run: the best trial's run name and id
# MLflow 3's UI opens an experiment of this kind on its runs table ("Model training"), not on the GenAI overview
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
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


UI_PORT = 5000  # `mlflow ui`'s default port


def mlflow_script() -> str:
    """The `mlflow` command of this interpreter's environment (the venv's own, so that it works in a fresh shell
    without activating anything); plain `mlflow` where the interpreter has none beside it."""
    path = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "mlflow")
    return path if os.path.isfile(path) else "mlflow"


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"{mlflow_script()} ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port {UI_PORT}"


def ui_link(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """A link that opens the experiment's runs table in MLflow 3's "Model training" view (`workflowType`, read from
    the URL by the UI; without it 3.17 opens on the GenAI overview), or one run's page."""
    base = (
        tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{UI_PORT}"
    )
    if run_id:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


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

    def experiment(self, name: str, description: str | None = None) -> str:
        """The experiment's id, created if new; its description (`mlflow.note.content`) and kind are set where
        missing (experiments created before they existed get them too)."""
        existing = self.client.get_experiment_by_name(name)
        tags = dict(existing.tags) if existing is not None else {}
        if existing is not None:
            experiment_id = existing.experiment_id
        else:
            root = local_artifact_root(self.uri)
            location = None
            if root is not None:
                location = "file://" + os.path.join(root, re.sub(r"[^0-9A-Za-z_.-]+", "_", name))
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        if description and NOTE_TAG not in tags:
            self.client.set_experiment_tag(experiment_id, NOTE_TAG, description)
        if tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            self.client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
        return experiment_id

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
    ) -> tuple[str, bool]:
        """The trial's child run and whether it existed: when Tune starts a trial again (same trial id under the same
        parent: a retry, a resumed sweep, PBT's exploit) its existing run is reused."""
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
            return run_id, True
        run = self.client.create_run(
            experiment_id, run_name=name, tags={PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, **tags}
        )
        self._log_params(run.info.run_id, params)
        return run.info.run_id, False

    def log_datasets(
        self, run_id: str, fingerprints: Mapping[str, str], data_root: str, contexts: Mapping[str, str]
    ) -> None:
        """Each dataset as an MLflow input (the runs table's Dataset column): digest = the manifest's fingerprint
        (its first 36 hex digits: MLflow's column holds 36; the whole one is in the profile and the run's
        `dataset_fingerprint.*` tags), source = the dataset's folder under the data root; `contexts`: dataset →
        "train", "validation", ..."""
        inputs = [
            DatasetInput(
                Dataset(
                    name,
                    fingerprint.removeprefix("sha256:")[:36],
                    "local" if "://" not in data_root else "uri",
                    f"{data_root.rstrip('/')}/{name}",
                    profile=json.dumps({"fingerprint": fingerprint}),
                ),
                tags=[InputTag("mlflow.data.context", contexts.get(name, "train"))],
            )
            for name, fingerprint in fingerprints.items()
        ]
        for attempt in range(3):  # never fails a trial: two runs that add a dataset at once race on the store
            try:  # (SQLite: "UNIQUE constraint failed: datasets..." for the second); the retry finds it there
                if inputs:
                    self.client.log_inputs(run_id, datasets=inputs)
                return
            except Exception as error:
                if attempt == 2:
                    logging.getLogger(__name__).warning("datasets not logged as MLflow inputs: %s", error)
                time.sleep(0.5 * (attempt + 1))

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

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_predictions(self, grid: np.ndarray, step: int) -> None:
        """The platform's prediction grid (`prediction_grid`) as `predictions/step-NNNNNNNN/target_val.png`."""
        with tempfile.TemporaryDirectory(prefix="uda-predictions-") as directory:
            Image.fromarray(np.asarray(grid, dtype=np.uint8)).save(os.path.join(directory, "target_val.png"))
            self.client.log_artifacts(self.run_id, directory, artifact_path=f"predictions/step-{step:08d}")

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


# ---------------------------------------------------------------------------------------------- prediction grids

# Label colours: the Cityscapes palette (cityscapesscripts) for classes of that name (the synthetic street scenes
# name theirs like Cityscapes'), else these, in class order; ignored pixels (255) black.
FALLBACK_PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))  # fmt: skip


def label_palette(class_names: tuple[str, ...] | list[str]) -> np.ndarray:
    """(K + 1, 3) uint8: one colour per class, the last one (black) for ignored pixels."""
    from cityscapesscripts.helpers.labels import labels

    cityscapes = {label.name: label.color for label in labels if 0 <= label.trainId < 255}
    colours = [
        cityscapes.get(name.replace("_", " "), FALLBACK_PALETTE[index % len(FALLBACK_PALETTE)])
        for index, name in enumerate(class_names)
    ]
    return np.array([*colours, (0, 0, 0)], dtype=np.uint8)


def prediction_grid(
    images: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor, palette: np.ndarray, widths=(256, 512)
) -> np.ndarray:
    """One row per image: image | prediction | ground truth, (rows · h, 3 · w, 3) uint8, each tile scaled to a width
    within `widths` (small synthetic frames enlarged, Cityscapes frames reduced).

    images (B, C, H', W') in [0, 1] (C = 1 or 3, any size: resized to the labels'); predictions and labels (B, H, W)
    class ids, 255 = ignored (drawn black)."""
    height, full_width = labels.shape[-2:]
    scale = min(max(widths[0], full_width), widths[1]) / full_width
    size = (max(1, round(height * scale)), max(1, round(full_width * scale)))
    pictures = torch.nn.functional.interpolate(images.detach().float().cpu(), size=size, mode="bilinear")
    pictures = pictures.expand(-1, 3, -1, -1) if pictures.shape[1] == 1 else pictures[:, :3]
    pictures = (pictures.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)

    def colour(maps: torch.Tensor) -> np.ndarray:
        small = torch.nn.functional.interpolate(maps[:, None].float().cpu(), size=size, mode="nearest")[:, 0]
        ids = small.long().numpy()
        return palette[np.where((ids >= 0) & (ids < len(palette) - 1), ids, len(palette) - 1)]

    rows = np.concatenate([pictures, colour(predictions), colour(labels)], axis=2)  # (B, h, 3w, 3)
    return rows.reshape(-1, rows.shape[2], 3)


# ---------------------------------------------------------------------------------------------- system metrics


@contextlib.contextmanager
def system_metrics(tracking_uri: str, run_id: str, interval_s: float = 10.0) -> Iterator[None]:
    """MLflow's system-metrics monitor (CPU, memory, disk, network; GPU where nvidia-ml-py finds one) logging
    `system/*` into the trial's run from a thread of this process, named by run id: no process-global active run.
    A monitor that cannot start never stops the trial."""
    monitor = None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop INFO lines
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri)
        monitor.start()
    except Exception:  # psutil missing or the platform unsupported: the trial goes on without system metrics
        monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()


def tags_for(method: str, task: str, seed: int, code: str, fingerprints: Mapping[str, str]) -> dict[str, str]:
    tags = {"method": method, "task": task, "seed": str(seed), "code_version": code}
    tags.update({f"dataset_fingerprint.{name}": value for name, value in fingerprints.items()})
    return tags
