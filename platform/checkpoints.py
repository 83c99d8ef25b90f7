"""Checkpoints: the full training state (for resume) and the adapted weights (what researchers download).

Two kinds of files, both loadable with `torch.load(path, weights_only=True)`:

- `training_state.pt` inside each Ray Train checkpoint directory: modules, the running stage's optimisers and
  schedules, the method's state, the loop's progress and random state. Only the platform reads it, to resume.
- The adapted weights logged to MLflow under `checkpoints/`: `last.pt` (the model at the latest evaluation) and
  `best_val_target_miou.pt` (the model at the evaluation with the highest target-validation mIoU; selecting it used
  target labels, so say so when reporting it). Each is the `state_dict()` of the method's `nn.ModuleDict` and comes
  with a JSON sidecar (`last.json`, `best_val_target_miou.json`) naming the method, task, hyperparameters, step and
  metric, which is all `load_modules` needs to rebuild the modules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import methods
from methods.contract import weights_file_fields
from platform import tasks

TRAINING_STATE = "training_state.pt"
LAST = "last"
BEST = "best_val_target_miou"
KEPT = 2  # resume checkpoints Ray Train and Tune keep per trial (every one under PBT: platform/cli.py)
ARTIFACT_DIR = "checkpoints"


def save_training_state(directory: str, state: Mapping[str, Any]) -> str:
    path = os.path.join(directory, TRAINING_STATE)
    torch.save(dict(state), path)
    return path


def load_training_state(directory: str) -> dict[str, Any]:
    return torch.load(os.path.join(directory, TRAINING_STATE), map_location="cpu", weights_only=True)


def write_weights(directory: str, kind: str, modules: nn.ModuleDict, meta: Mapping[str, Any]) -> list[str]:
    """Write `<kind>.pt` (state dict) and `<kind>.json` (metadata) into `directory`; returns both paths."""
    weights = os.path.join(directory, f"{kind}.pt")
    sidecar = os.path.join(directory, f"{kind}.json")
    torch.save({k: v.detach().cpu() for k, v in modules.state_dict().items()}, weights)
    with open(sidecar, "w") as handle:
        json.dump({"kind": kind, **meta}, handle, indent=2, sort_keys=True, default=str)
    return [weights, sidecar]


def load_modules(weights_path: str) -> tuple[nn.ModuleDict, dict[str, Any]]:
    """Rebuild a method's modules from an adapted-weights file and its JSON sidecar (same folder, same stem)."""
    with open(os.path.splitext(weights_path)[0] + ".json") as handle:
        meta = json.load(handle)
    method = methods.get(meta["method"])
    # The checkpoint holds every weight: do not read the initialisation files the run started from.
    cleared = dict.fromkeys(weights_file_fields(method.hyperparams), "")
    hp = methods.make_hyperparams(method, {**meta["hyperparams"], **cleared})
    modules = method.build(hp, tasks.get(meta["task"]).info)
    modules.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return modules, meta
