"""The sweep's console: one line per trial evaluation and one when a trial ends, instead of Tune's tables.

Tune's own output (`RunConfig(verbose=...)`) prints a status table with cut-off config dicts every few seconds and a
TensorBoard hint that does not apply (our results are in MLflow); the sweep runs it silent and registers
`ProgressLines`, a Tune callback in the driver, which prints what a researcher watches:

    [3/8] 2f1c4_00002  critical_transfer=False · seed 0   step 40/200   mIoU 31.2   best 33.0
    [3/8] 2f1c4_00002  critical_transfer=False · seed 0   finished: mIoU 35.1 (best 35.4) in 212 s
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from ray.tune import Callback

from platform.report import BEST, LAST, compact


def point_key(point: Mapping[str, Any]) -> str:
    return json.dumps(dict(point), sort_keys=True, default=str)


class ProgressLines(Callback):
    """`totals`: the trial length in steps per swept point (`point_key`); `defaults`: every hyperparameter's value
    when nothing is swept (to name the defaults trial); `num_trials`: the sweep's trial count (0: unknown)."""

    def __init__(
        self,
        totals: Mapping[str, int],
        defaults: Mapping[str, Any],
        num_trials: int = 0,
        stream: TextIO | None = None,
    ):
        self.totals, self.defaults, self.num_trials = dict(totals), dict(defaults), num_trials
        self.stream = stream
        self._order: dict[str, int] = {}
        self._started: dict[str, float] = {}
        self._last: dict[str, Mapping[str, Any]] = {}

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def _head(self, trial: Any) -> str:
        number = self._order.setdefault(trial.trial_id, len(self._order) + 1)
        of = f"/{self.num_trials}" if self.num_trials else ""
        config = trial.config or {}
        point = dict(config.get("hp", {}))
        changed = {k: v for k, v in point.items() if str(self.defaults.get(k)) != str(v)}
        label = " ".join(f"{k}={compact(v)}" for k, v in changed.items()) or "defaults"
        return f"[{number}{of}] {trial.trial_id}  {label} · seed {config.get('seed', '?')}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._started.setdefault(trial.trial_id, time.monotonic())
        self._print(f"{self._head(trial)}   started")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._last[trial.trial_id] = result
        total = self.totals.get(point_key((trial.config or {}).get("hp", {})))
        step = result.get("step", "?")
        self._print(
            f"{self._head(trial)}   step {step}{f'/{total}' if total else ''}   mIoU {_f(result.get(LAST))}   "
            f"best {_f(result.get(BEST))}"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = self._last.get(trial.trial_id, {})
        seconds = time.monotonic() - self._started.get(trial.trial_id, time.monotonic())
        self._print(
            f"{self._head(trial)}   finished: mIoU {_f(result.get(LAST))} (best {_f(result.get(BEST))}) "
            f"in {seconds:.0f} s"
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason = str(getattr(trial, "error_msg", "") or "").strip().splitlines()
        self._print(f"{self._head(trial)}   FAILED{': ' + reason[-1][:200] if reason else ''}")


def _f(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"
