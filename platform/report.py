"""`python -m platform.report`: the tables a researcher reads, from the MLflow store (local SQLite or a server).

    python -m platform.report SWEEP [--tracking-uri URI] [--format md|html|csv|json] [--out DIR]
    python -m platform.report --task TASK [--rule oracle|source-val|defaults] [...]
    python -m platform.report                  # lists the sweeps in the store

`SWEEP` (a sweep's name or its parent run id) gives the sweep's table: one row per configuration (grid point or
sampled configuration), mean ± std over seeds with n, the last-checkpoint target mIoU and the best-checkpoint one (the
best evaluation on target validation: selected with target labels, labelled as such), the task's subset means
(SYNTHIA's 13 of 16), per-class IoU, the lung metrics of the chest X-ray tasks; where the sweep's grid reproduces a
paper table (`PAPER_RESULTS` in `search_spaces/<method>.py`), the paper's numbers beside ours: on the paper's task
the printed values and our difference to them, on another task (a synthetic one) the paper's differences between
the same rows (e.g. w/oTC − Ours), labelled with the paper's task, next to ours, so that orderings can be compared.
Product grids with one or two swept axes also get sensitivity plots (`--out DIR`, PNG).

Model selection is said out loud (DomainBed reports each rule separately): which configuration a researcher would pick
depends on the data allowed to pick it. Every report shows, for each rule, the pick and its target score:
- `oracle`: the configuration and checkpoint with the best target-validation mIoU (uses target labels: an upper
  bound, not a result an unsupervised method can claim);
- `source-val`: the configuration with the best mIoU on the held-out source slice (`val_source/miou`, logged by trials
  of a sweep run with `--source-val FRACTION`: those source images are never trained on, so no source image is both
  trained on and used to select), scored at its last checkpoint;
- `defaults`: the paper-default configuration's last checkpoint (no selection at all).
`--task TASK` compares every method's runs on one task under one rule (named in the table), with flags where rows are
not comparable (different budget, backbone, seeds or held-out source slice).

Everything here is pure functions over `RunRecord`s (tested on hand-made records); only `load_*` and `main` talk to
MLflow, through `MlflowClient` with explicit run ids.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import html
import io
import json
import math
import os
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PREFIX = "val_target/"
LAST = "val_target/miou"
BEST = "val_target/best_miou"
SOURCE_VAL = "val_source/miou"
LUNG_METRICS = ("dice", "recall", "precision", "asd_mm")  # platform.metrics.LUNG_METRICS (not imported: no torch)
SWEEP_TAG, PARENT_TAG, TRIAL_TAG = "uda.sweep", "mlflow.parentRunId", "uda.trial_id"
RETRIED_TAG, DEFAULTS_TAG, POINT_TAG = "uda.retried", "uda.defaults", "uda.point"
EXPLOIT = "uda.pbt.exploit.step-"  # loop.TrialRunner: a PBT member restored from another trial's checkpoint
# What a child run's params hold besides the method's hyperparameters (tuning.run_trial)
RUN_PARAMS = ("seed", "steps", "stage_steps", "max_steps", "eval_every", "workers", "precision", "source_val")


class ReportError(ValueError):
    """Bad input (unknown sweep or task, empty store): one line, exit code 2."""


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RunRecord:
    """What the report reads of one MLflow run: latest metric values, params and tags as MLflow holds them."""

    run_id: str
    name: str
    status: str
    params: Mapping[str, str]
    tags: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_run(cls, run: Any) -> RunRecord:
        return cls(
            run.info.run_id,
            run.info.run_name or "",
            run.info.status,
            dict(run.data.params),
            dict(run.data.tags),
            dict(run.data.metrics),
        )

    @property
    def seed(self) -> str:
        return self.params.get("seed", self.tags.get("seed", "?"))

    def value(self, metric: str) -> float:
        """A metric (`val_target/...` or `val_source/...`), or a lung metric averaged over the lungs (`dice`,
        `asd_mm`, ...: the papers' "average over both lungs"); NaN where the run has none."""
        if metric in self.metrics:
            return float(self.metrics[metric])
        if metric in LUNG_METRICS:
            values = [v for k, v in self.metrics.items() if k.startswith(f"{PREFIX}{metric}/")]
            return statistics.mean(values) if values and all(v == v for v in values) else math.nan
        return math.nan


@dataclass(frozen=True)
class Stat:
    """Mean ± sample standard deviation over the defined values; NaN values (an undefined ASD) left out, counted."""

    values: tuple[float, ...]

    @property
    def defined(self) -> tuple[float, ...]:
        return tuple(v for v in self.values if v == v)

    @property
    def n(self) -> int:
        return len(self.defined)

    @property
    def undefined(self) -> int:
        return len(self.values) - self.n

    @property
    def mean(self) -> float:
        return statistics.mean(self.defined) if self.defined else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.defined) if self.n > 1 else (0.0 if self.n == 1 else math.nan)

    def text(self, digits: int = 1) -> str:
        if not self.n:
            return "n/a"
        out = f"{self.mean:.{digits}f}" + (f" ± {self.std:.{digits}f}" if self.n > 1 else "")  # no spread from one
        return out + (f" ({self.undefined} undefined)" if self.undefined else "")


def _num(value: float, digits: int = 1, signed: bool = False) -> str:
    if value is None or value != value:
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------- configurations


def _same(value: Any, text: str | None) -> bool:
    """A typed value (a grid's) against a param as MLflow holds it (a string)."""
    return text is not None and str(value) == text


def compact(value: Any) -> str:
    """A swept value as run names and tables show it: 0.00035 → 3.5e-4, True, 10."""
    if isinstance(value, float):
        text = f"{value:.3g}"
        if "e" in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        return text
    return str(value)


def _typed(text: str) -> Any:
    """A param string back to a number or bool where it is one (for labels, sorting and plots)."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def is_defaults(point: Mapping[str, Any], defaults: Mapping[str, Any]) -> bool:
    """A point is the defaults configuration when it changes nothing: every swept value equals the default."""
    return all(key in defaults and str(defaults[key]) == str(value) for key, value in point.items())


def point_label(point: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> str:
    """`xi1=0.3 gamma=0.25`, or `defaults` for a point that changes nothing; the defaults' own values left out."""
    if defaults is not None and is_defaults(point, defaults):
        return "defaults"
    shown = {k: v for k, v in point.items() if defaults is None or str(defaults.get(k)) != str(v)}
    return " ".join(f"{key}={compact(value)}" for key, value in shown.items()) or "defaults"


def match_point(params: Mapping[str, str], points: Sequence[Mapping[str, Any]]) -> int | None:
    """The index of the grid point a run's params realise: the most specific point whose every value the run has
    (a list grid's `{}` row matches any run; `{"critical_transfer": False}` only its own)."""
    best, best_keys = None, -1
    for index, point in enumerate(points):
        if all(_same(value, params.get(key)) for key, value in point.items()) and len(point) > best_keys:
            best, best_keys = index, len(point)
    return best


@dataclass
class Configuration:
    """One row of a sweep's table: the runs of one configuration over seeds."""

    label: str
    point: dict[str, Any]  # the swept values (typed: from the sweep's definition, else from params)
    runs: list[RunRecord]  # finished runs
    index: int | None = None  # position in the grid (its row order)
    defaults: bool = False
    unfinished: int = 0  # failed or killed runs of this configuration (not in the statistics)

    def stat(self, metric: str) -> Stat:
        return Stat(tuple(run.value(metric) for run in self.runs))

    @property
    def seeds(self) -> tuple[str, ...]:
        return tuple(sorted((run.seed for run in self.runs), key=lambda s: (len(s), s)))

    @property
    def steps(self) -> str:
        return ",".join(sorted({run.params.get("steps", "?") for run in self.runs})) or "?"


def group_runs(
    runs: Sequence[RunRecord],
    swept: Sequence[str],
    points: Sequence[Mapping[str, Any]] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> list[Configuration]:
    """Runs → configurations. With the sweep's `points`, a run belongs to the point it realises (grid order kept);
    without, runs are grouped by their swept params. Retried runs (replaced by a new trial) are left out; failed and
    killed runs are counted, not averaged."""
    defaults = defaults or {}
    groups: dict[Any, Configuration] = {}
    for run in runs:
        if RETRIED_TAG in run.tags:
            continue
        index = match_point(run.params, points) if points else None
        if index is not None:
            key: Any = ("point", index)
            point = dict(points[index])
        else:
            point = {k: _typed(run.params[k]) for k in swept if k in run.params}
            key = ("params", tuple(sorted((k, run.params[k]) for k in swept if k in run.params)))
        if key not in groups:
            marked = run.tags.get(DEFAULTS_TAG)
            groups[key] = Configuration(
                label=point_label(point, defaults),
                point=point,
                runs=[],
                index=index,
                defaults=marked == "true" if marked is not None else (not point or is_defaults(point, defaults)),
            )
        if run.status == "FINISHED":
            groups[key].runs.append(run)
        else:
            groups[key].unfinished += 1
    configurations = list(groups.values())
    configurations.sort(key=lambda c: c.index if c.index is not None else math.inf)
    return configurations


def rank(configurations: Sequence[Configuration], metric: str = BEST) -> list[Configuration]:
    """The top ones first (TPE and random sweeps): by the mean of `metric`, configurations without it last."""
    return sorted(configurations, key=lambda c: -c.stat(metric).mean if c.stat(metric).n else math.inf)


# ---------------------------------------------------------------------------------------------- selection rules


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    choose_by: str | None  # the metric a configuration is picked by (None: the defaults configuration)
    score: str  # the target metric reported for the pick


RULES = {
    "oracle": Rule(
        "oracle",
        "oracle: the configuration and checkpoint with the best target-validation mIoU (uses target labels: an "
        "upper bound, not an unsupervised result)",
        BEST,
        BEST,
    ),
    "source-val": Rule(
        "source-val",
        "source validation: the configuration with the best mIoU on the held-out source slice, its last checkpoint "
        "(no target labels)",
        SOURCE_VAL,
        LAST,
    ),
    "defaults": Rule(
        "defaults", "defaults: the paper-default configuration's last checkpoint (no selection)", None, LAST
    ),
}


@dataclass(frozen=True)
class Selection:
    rule: Rule
    configuration: Configuration | None
    reason: str = ""  # why there is no pick

    @property
    def score(self) -> Stat:
        return self.configuration.stat(self.rule.score) if self.configuration else Stat(())


def select(configurations: Sequence[Configuration], rule: Rule) -> Selection:
    scored = [c for c in configurations if c.runs]
    if rule.choose_by is None:
        pick = next((c for c in scored if c.defaults), None)
        return Selection(rule, pick, "" if pick else "no finished run of the defaults configuration")
    candidates = [c for c in scored if c.stat(rule.choose_by).n]
    if not candidates:
        reason = "no finished run has " + rule.choose_by
        if rule.choose_by == SOURCE_VAL:
            reason += " (trials log it when their sweep holds out a source slice: platform.sweep ... --source-val 0.1)"
        return Selection(rule, None, reason)
    return Selection(rule, max(candidates, key=lambda c: c.stat(rule.choose_by).mean))


# ---------------------------------------------------------------------------------------------- paper numbers


def paper_results(method: str) -> dict[str, Any]:
    """`PAPER_RESULTS` of search_spaces/<method>.py ({} when it has none): {grid: {task: entry}}, an entry being
    {"source": citation, "classes": (...), "metric": headline, "rows": {paper row name: {"point" | "method": ...,
    metric: value, "iou": per-class tuple}}}."""
    import importlib

    try:
        module = importlib.import_module(f"search_spaces.{method}")
    except ModuleNotFoundError:
        return {}
    return dict(getattr(module, "PAPER_RESULTS", {}))


def paper_value(entry: Mapping[str, Any], row: Mapping[str, Any], metric: str) -> float:
    """A paper row's value of one of our metric names (without `val_target/`): `miou`, `iou/<class>` (from the
    row's per-class tuple), `dice/right_lung`, or a lung average (`dice`: the mean over the lungs printed)."""
    if metric in row:
        return float(row[metric])
    if metric.startswith("iou/") and "iou" in row:
        classes = list(entry.get("classes", ()))
        name = metric.split("/", 1)[1]
        values = row["iou"].split() if isinstance(row["iou"], str) else row["iou"]  # a table row as printed
        return float(values[classes.index(name)]) if name in classes else math.nan
    if metric in LUNG_METRICS:
        values = [float(v) for k, v in row.items() if k.startswith(f"{metric}/")]
        return statistics.mean(values) if values else math.nan
    return math.nan


def paper_row(entry: Mapping[str, Any], point: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """The paper row that a grid point reproduces (same keys, same values), or None."""
    for name, row in entry.get("rows", {}).items():
        if "point" in row and dict(row["point"]).keys() == dict(point).keys():
            if all(str(row["point"][k]) == str(v) for k, v in point.items()):
                return name, row
    return None


def paper_reference(entry: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """The paper row differences are taken against: the defaults row (point {}), else the first point row."""
    rows = [(n, r) for n, r in entry.get("rows", {}).items() if "point" in r]
    return next(((n, r) for n, r in rows if not r["point"]), rows[0] if rows else None)


# ---------------------------------------------------------------------------------------------- tables


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    title: str
    lines: list[str]  # what it is: sweep, task, budget, seeds
    tables: list[Table]
    data: dict[str, Any]  # machine-readable (json, csv)
    plots: dict[str, bytes] = field(default_factory=dict)  # file name → PNG


@dataclass(frozen=True)
class SweepInfo:
    name: str
    run_id: str
    method: str
    task: str
    mode: str = "grid"
    grid: str = ""
    seeds: str = ""
    experiment: str = ""
    points: tuple[Mapping[str, Any], ...] | None = None
    swept: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)  # every hyperparameter's value when nothing is swept
    subsets: tuple[str, ...] = ()  # the task's subset means (miou13)
    scheduler: str = ""  # asha, pbt or "" (none)


def sweep_report(
    info: SweepInfo,
    runs: Sequence[RunRecord],
    paper: Mapping[str, Any] | None = None,
    baselines: Sequence[RunRecord] = (),
    histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]] | None = None,
) -> Report:
    """The sweep's report from its child runs (pure). `paper`: the method's PAPER_RESULTS; `baselines`: finished
    source_only runs on the same task (any experiment) for the "vs source_only" line; `histories` (PBT): per run id,
    each `hp/<name>` metric's (step, value) points."""
    configurations = group_runs(runs, info.swept, info.points, info.defaults)
    if info.mode in ("random", "tpe"):
        configurations = rank(configurations)
    entries = dict((paper or {}).get(info.grid, {})) if info.grid else {}
    own = entries.pop(info.task, None)
    # the paper's row differences only where the paper prints at least two of this grid's rows on that task
    entries = {t: e for t, e in entries.items() if sum("point" in r for r in e.get("rows", {}).values()) > 1}
    lung = any(run.value("dice") == run.value("dice") for c in configurations for run in c.runs)
    headline = "dice" if lung else "miou"
    reference = next((c for c in configurations if c.defaults and c.runs), None)
    if reference is None:
        reference = next((c for c in configurations if c.runs), None)

    main = _main_table(info, configurations, headline, reference, own, entries)
    tables = [main, _selection_table(configurations)]
    if lung:
        tables.append(_lung_table(configurations, own))
    per_class = _per_class_table(configurations, own)
    if per_class is not None:
        tables.append(per_class)
    if own is not None:
        tables.append(_paper_table(configurations, own))
    baseline = _baseline_table(info, configurations, baselines, headline, own, entries, paper or {})
    if baseline is not None:
        tables.append(baseline)
    if info.scheduler == "pbt":
        tables.append(population_table(runs, histories or {}))
    finished = sum(len(c.runs) for c in configurations)
    unfinished = sum(c.unfinished for c in configurations)
    lines = [
        f"{info.method} on {info.task}, sweep `{info.name}` (parent run {info.run_id}"
        + (f", experiment {info.experiment!r}" if info.experiment else "")
        + ")",
        f"{_mode_words(info)}; seeds {info.seeds or ', '.join(sorted({r.seed for r in runs}))}; budget "
        f"{_steps_words(configurations)}; {finished} finished run(s)"
        + (f", {unfinished} failed or killed (left out)" if unfinished else ""),
    ]
    data = {
        "sweep": dataclasses.asdict(info) | {"points": list(info.points or ())},
        "configurations": [_configuration_data(c, own) for c in configurations],
        "selection": {
            s.rule.name: {
                "configuration": s.configuration.label if s.configuration else None,
                "metric": s.rule.score,
                "mean": s.score.mean,
                "std": s.score.std,
                "n": s.score.n,
                "reason": s.reason,
            }
            for s in (select(configurations, rule) for rule in RULES.values())
        },
    }
    report = Report(f"{info.method} on {info.task}: sweep {info.name}", lines, tables, data)
    report.plots = sensitivity_plots(configurations, info)
    return report


def _mode_words(info: SweepInfo) -> str:
    if info.mode == "grid":
        return f"grid `{info.grid}`" if info.grid else "one configuration"
    return f"{info.mode} search over {', '.join(info.swept)}"


def _steps_words(configurations: Sequence[Configuration]) -> str:
    steps = sorted({c.steps for c in configurations if c.runs})
    return (" / ".join(steps) + " steps") if steps else "?"


def _main_table(
    info: SweepInfo,
    configurations: Sequence[Configuration],
    headline: str,
    reference: Configuration | None,
    own: Mapping[str, Any] | None,
    others: Mapping[str, Any],
) -> Table:
    lung = headline == "dice"  # chest X-rays: the papers' Dice and ASD over both lungs beside the mIoU
    columns = ["#", "configuration", "n", "mIoU (last)", "mIoU (best ckpt)†"]
    columns += ["Dice, both lungs (last)", "ASD mm, both lungs (last)"] if lung else []
    columns += [f"{name} (last)" for name in info.subsets]
    columns += ["source-val mIoU (last)"] if any(c.stat(SOURCE_VAL).n for c in configurations) else []
    columns += [(f"Δ {'Dice ' if lung else ''}vs {reference.label}") if reference else "Δ"]
    if own is not None:
        columns += [f"paper ({own.get('source', '')})", "ours − paper"]
    for task in others:
        columns += [f"paper Δ on {task}"]
    columns += ["per seed (last)"]
    base = reference.stat(_metric(headline)).mean if reference else math.nan
    rows = []
    for number, configuration in enumerate(configurations, 1):
        last = configuration.stat(_metric(headline))
        row = [str(number), _name(configuration, own or next(iter(others.values()), None))]
        row += [str(last.n) + (f" (+{configuration.unfinished} failed)" if configuration.unfinished else "")]
        row += [configuration.stat(LAST).text(), configuration.stat(BEST).text()]
        row += [last.text(), configuration.stat("asd_mm").text(2)] if lung else []
        row += [configuration.stat(f"{PREFIX}{name}").text() for name in info.subsets]
        if "source-val mIoU (last)" in columns:
            row.append(configuration.stat(SOURCE_VAL).text())
        row.append("" if configuration is reference else _num(last.mean - base, signed=True))
        if own is not None:
            found = paper_row(own, configuration.point)
            printed = paper_value(own, found[1], headline) if found else math.nan
            row += [_num(printed, 2 if headline == "dice" else 1), _num(last.mean - printed, signed=True)]
        for entry in others.values():
            row.append(_paper_delta(entry, configuration.point, headline))
        row.append(", ".join(_num(run.value(_metric(headline))) for run in _by_seed(configuration.runs)))
        rows.append(row)
    notes = [
        "mean ± sample std over seeds; n = finished runs; last = the final evaluation on target validation",
        "† best ckpt = the best evaluation on target validation: selected with target labels (an upper bound)",
    ]
    if reference is not None:
        notes.append(f"Δ = ours minus the `{reference.label}` row, last checkpoint")
    if others:
        notes.append(
            "paper Δ = the paper's difference between the same two rows on its own task (as printed), beside ours "
            "on this task: compare the orderings, not the values; "
            + "; ".join(f"{task}: {entry.get('source', '')}" for task, entry in others.items())
        )
    if own is not None:
        notes.append("paper = the paper's printed number for this row; ours − paper uses our last checkpoint")
    return Table("Configurations", columns, rows, notes)


def _metric(headline: str) -> str:
    return LAST if headline == "miou" else headline


def _name(configuration: Configuration, entry: Mapping[str, Any] | None) -> str:
    name = configuration.label
    found = paper_row(entry, configuration.point) if entry else None
    return f"{name} ({found[0]})" if found and found[0] != name else name


def _by_seed(runs: Sequence[RunRecord]) -> list[RunRecord]:
    return sorted(runs, key=lambda r: (len(r.seed), r.seed))


def _paper_delta(entry: Mapping[str, Any], point: Mapping[str, Any], headline: str) -> str:
    found, reference = paper_row(entry, point), paper_reference(entry)
    if not found or not reference:
        return ""
    if found[0] == reference[0]:
        return "(reference)"
    metric = headline if paper_value(entry, found[1], headline) == paper_value(entry, found[1], headline) else "miou"
    delta = paper_value(entry, found[1], metric) - paper_value(entry, reference[1], metric)
    return f"{_num(delta, signed=True)} ({found[0]} − {reference[0]})"


def _selection_table(configurations: Sequence[Configuration]) -> Table:
    rows = []
    for rule in RULES.values():
        selection = select(configurations, rule)
        if selection.configuration is None:
            rows.append([rule.name, "", "", selection.reason])
            continue
        metric = "best ckpt" if rule.score == BEST else "last ckpt"
        rows.append(
            [rule.name, selection.configuration.label, f"{selection.score.text()} ({metric})", rule.description]
        )
    return Table(
        "Model selection: the pick under each rule and its target-validation mIoU",
        ["rule", "pick", "target mIoU", "what it may use"],
        rows,
    )


def _lung_table(configurations: Sequence[Configuration], own: Mapping[str, Any] | None) -> Table:
    lungs = sorted(
        {k.split("/")[-1] for c in configurations for r in c.runs for k in r.metrics if k.startswith(f"{PREFIX}dice/")}
    )
    columns = ["configuration", "Dice (%)", "ASD (mm)"]
    columns += [f"{m} {lung}" for lung in lungs for m in ("Dice", "recall", "precision", "ASD")]
    rows = []
    for configuration in configurations:
        row = [configuration.label, configuration.stat("dice").text(), configuration.stat("asd_mm").text(2)]
        for lung in lungs:
            for metric in LUNG_METRICS:
                row.append(configuration.stat(f"{PREFIX}{metric}/{lung}").text(2 if metric == "asd_mm" else 1))
        rows.append(row)
        found = paper_row(own, configuration.point) if own else None
        if found:
            paper = ["  paper: " + found[0], _num(paper_value(own, found[1], "dice"), 2)]
            paper.append(_num(paper_value(own, found[1], "asd_mm"), 2))
            paper += [_num(paper_value(own, found[1], f"{m}/{lung}"), 2) for lung in lungs for m in LUNG_METRICS]
            rows.append(paper)
    notes = ["last checkpoint; per image, then averaged over images; ASD undefined where a prediction is empty"]
    return Table("Lung metrics (last checkpoint, mean ± std over seeds)", columns, rows, notes)


def _per_class_table(configurations: Sequence[Configuration], own: Mapping[str, Any] | None) -> Table | None:
    classes = list(
        dict.fromkeys(
            k[len(PREFIX) + 4 :]
            for c in configurations
            for r in c.runs
            for k in r.metrics
            if k.startswith(PREFIX + "iou/")
        )
    )
    if not classes:
        return None
    rows = []
    for configuration in configurations:
        rows.append([configuration.label] + [_num(configuration.stat(f"{PREFIX}iou/{k}").mean) for k in classes])
        found = paper_row(own, configuration.point) if own else None
        if found:
            rows.append(["  paper: " + found[0]] + [_num(paper_value(own, found[1], f"iou/{k}")) for k in classes])
    return Table("Per-class IoU (last checkpoint, mean over seeds)", ["configuration", *classes], rows)


def _paper_table(configurations: Sequence[Configuration], own: Mapping[str, Any]) -> Table:
    rows = []
    headline = own.get("metric", "miou")
    for name, row in own.get("rows", {}).items():
        ours = next((c for c in configurations if "point" in row and paper_row(own, c.point) == (name, row)), None)
        if "method" in row:
            rows.append([name, f"method {row['method']}", _num(paper_value(own, row, headline)), "", ""])
            continue
        value = paper_value(own, row, headline)
        if ours is None:
            rows.append([name, point_label(row["point"]), _num(value), "not run", ""])
            continue
        stat = ours.stat(_metric(headline))
        rows.append([name, ours.label, _num(value), stat.text(), _num(stat.mean - value, signed=True)])
    return Table(
        f"Paper vs ours: {own.get('source', '')}",
        ["paper row", "our configuration", f"paper {headline}", f"ours {headline} (last)", "ours − paper"],
        rows,
    )


def _baseline_table(
    info: SweepInfo,
    configurations: Sequence[Configuration],
    baselines: Sequence[RunRecord],
    headline: str,
    own: Mapping[str, Any] | None,
    others: Mapping[str, Any],
    paper: Mapping[str, Any],
) -> Table | None:
    """The defaults row against source_only runs of the same task in the store, by budget."""
    defaults = next((c for c in configurations if c.defaults and c.runs), None)
    if not baselines or defaults is None:
        return None
    by_steps: dict[str, list[RunRecord]] = {}
    for run in baselines:
        by_steps.setdefault(run.params.get("steps", "?"), []).append(run)
    ours = defaults.stat(_metric(headline))
    rows = []
    for steps, runs in sorted(by_steps.items(), key=lambda item: _typed(item[0]) if item[0] != "?" else 0):
        stat = Stat(tuple(r.value(_metric(headline)) for r in runs))
        flag = "" if steps == defaults.steps else f"different budget (ours {defaults.steps} steps)"
        seeds = sorted({r.seed for r in runs})
        if seeds != sorted(defaults.seeds):
            flag = "; ".join(filter(None, [flag, f"seeds {','.join(seeds)} vs ours {','.join(defaults.seeds)}"]))
        rows.append(["source_only", steps, stat.text(), _num(ours.mean - stat.mean, signed=True), flag or "comparable"])
    notes = [f"{info.method} row: `{defaults.label}`, {ours.text()} at {defaults.steps} steps (last checkpoint)"]
    for task, entry in ({info.task: own} if own else others).items():
        rows_ = entry.get("rows", {})
        baseline = next(((n, r) for n, r in rows_.items() if r.get("method") == "source_only"), None)
        reference = paper_reference(entry)
        if baseline and reference:
            delta = paper_value(entry, reference[1], headline) - paper_value(entry, baseline[1], headline)
            notes.append(f"paper on {task}: {reference[0]} − {baseline[0]} = {_num(delta, signed=True)}")
    return Table(
        f"Against source_only on {info.task} (runs in this store, any experiment)",
        ["baseline", "steps", f"{headline} (last)", f"{info.method} defaults − baseline", "comparable?"],
        rows,
        notes,
    )


def population_table(runs: Sequence[RunRecord], histories: Mapping[str, Mapping[str, Sequence[tuple]]]) -> Table:
    """PBT's final population: each member's scores and the history of the hyperparameters PBT changed
    (`hp/<name>` at each evaluation, a change shown as value@step), and whose checkpoints it took (exploit tags)."""
    rows = []
    for run in sorted(runs, key=lambda r: -r.value(LAST) if r.value(LAST) == r.value(LAST) else math.inf):
        changes = []
        for name, points in sorted(histories.get(run.run_id, {}).items()):
            steps, last = [], None
            for step, value in sorted(points):
                if value != last:
                    steps.append(f"{compact(float(value))}@{step}")
                    last = value
            changes.append(f"{name.removeprefix('hp/')}: " + " → ".join(steps))
        exploits = [f"{v}@{int(k.rsplit('-', 1)[1])}" for k, v in sorted(run.tags.items()) if k.startswith(EXPLOIT)]
        rows.append(
            [run.name, run.seed, _num(run.value(LAST)), _num(run.value(BEST)), "; ".join(changes), ", ".join(exploits)]
        )
    return Table(
        "PBT population (final members, best last mIoU first)",
        [
            "member",
            "seed",
            "mIoU (last)",
            "mIoU (best ckpt)†",
            "hyperparameters (value@step)",
            "exploited (trial@step)",
        ],
        rows,
        ["a member continues from another's checkpoint when it exploits; its hyperparameters are then perturbed"],
    )


def _configuration_data(configuration: Configuration, own: Mapping[str, Any] | None) -> dict[str, Any]:
    metrics = sorted({k for r in configuration.runs for k in r.metrics if k.startswith(("val_target/", "val_source/"))})
    metrics += [m for m in LUNG_METRICS if configuration.stat(m).n]
    found = paper_row(own, configuration.point) if own else None
    return {
        "label": configuration.label,
        "point": configuration.point,
        "index": configuration.index,
        "defaults": configuration.defaults,
        "n": len(configuration.runs),
        "unfinished": configuration.unfinished,
        "seeds": list(configuration.seeds),
        "steps": configuration.steps,
        "runs": [r.run_id for r in _by_seed(configuration.runs)],
        "metrics": {
            m: {"mean": s.mean, "std": s.std, "n": s.n, "values": list(s.values)}
            for m in metrics
            for s in [configuration.stat(m)]
        },
        "paper_row": found[0] if found else None,
    }


# ---------------------------------------------------------------------------------------------- task comparison


def _configuration_key(run: RunRecord) -> tuple:
    return tuple(sorted((k, v) for k, v in run.params.items() if k != "seed"))


def task_report(task: str, runs: Sequence[RunRecord], rule: Rule, defaults: Mapping[str, Mapping[str, Any]]) -> Report:
    """Every method's runs on one task: each method's pick under `rule`, flagged where rows differ in budget,
    backbone or seeds. `defaults`: per method, every hyperparameter's task-default value (to find the defaults
    configuration when the runs carry no defaults tag)."""
    by_method: dict[tuple[str, str], list[RunRecord]] = {}  # one row per method and budget
    for run in runs:
        if RETRIED_TAG not in run.tags:
            by_method.setdefault((run.tags.get("method", "?"), run.params.get("steps", "?")), []).append(run)
    picks = []
    for (method, _), method_runs in sorted(
        by_method.items(), key=lambda item: (item[0][0], _sort_key(_typed(item[0][1])))
    ):
        groups: dict[tuple, list[RunRecord]] = {}
        for run in method_runs:
            groups.setdefault(_configuration_key(run), []).append(run)
        configurations = []
        for key, group in groups.items():
            params = dict(key)
            known = defaults.get(method)  # the method's hyperparameters (other params are run settings: precision)
            values = {k: v for k, v in params.items() if k not in RUN_PARAMS and (not known or k in known)}
            is_default = any(r.tags.get(DEFAULTS_TAG) == "true" for r in group) or (
                method in defaults and is_defaults(values, defaults[method])
            )
            varied = {k: v for k, v in values.items() if str(defaults.get(method, {}).get(k)) != v}
            label = "defaults" if is_default else (" ".join(f"{k}={v}" for k, v in varied.items()) or "defaults")
            if params.get("source_val"):  # trained without its held-out source slice: other training data
                label += f" (source_val={params['source_val']})"
            finished = [r for r in group if r.status == "FINISHED"]
            configurations.append(
                Configuration(
                    label,
                    {k: _typed(v) for k, v in varied.items()},
                    finished,
                    defaults=is_default,
                    unfinished=len(group) - len(finished),
                )
            )
        selection = select(configurations, rule)
        picks.append((method, configurations, selection))
    rows, data = [], []
    chosen = [(m, s.configuration) for m, _, s in picks if s.configuration is not None]

    def common(values: list[str]) -> str | None:
        return Counter(values).most_common(1)[0][0] if values else None

    steps_common = common([c.steps for _, c in chosen])
    arch_common = common([_architecture(c) for _, c in chosen])
    seeds_common = common([",".join(c.seeds) for _, c in chosen])
    held_common = common([_source_val(c) for _, c in chosen])
    for method, configurations, selection in picks:
        pick = selection.configuration
        if pick is None:
            rows.append([method, "", "", "", "", "", "", selection.reason])
            continue
        flags = []
        if pick.steps != steps_common:
            flags.append(f"budget {pick.steps} steps (most rows: {steps_common})")
        if _architecture(pick) != arch_common:
            flags.append(f"backbone {_architecture(pick)} (most rows: {arch_common})")
        if ",".join(pick.seeds) != seeds_common:
            flags.append(f"seeds {','.join(pick.seeds)} (most rows: {seeds_common})")
        if _source_val(pick) != held_common:
            flags.append(f"source held out {_source_val(pick)} (most rows: {held_common})")
        score = selection.score
        rows.append(
            [
                method,
                pick.label,
                score.text(),
                str(score.n),
                pick.steps,
                _architecture(pick),
                str(len(configurations)),
                "; ".join(flags) or "comparable",
            ]
        )
        data.append(
            {
                "method": method,
                "configuration": pick.label,
                "mean": score.mean,
                "std": score.std,
                "n": score.n,
                "seeds": list(pick.seeds),
                "steps": pick.steps,
                "architecture": _architecture(pick),
                "configurations": len(configurations),
                "flags": flags,
                "runs": [r.run_id for r in pick.runs],
            }
        )
    table = Table(
        f"Methods on {task}, rule: {rule.description}",
        ["method", "pick", "target mIoU", "n", "steps", "backbone", "configurations run", "comparable?"],
        rows,
        [
            f"one rule for every row: {rule.name}; mean ± sample std over seeds; a flag marks a row whose budget, "
            "backbone, seeds or held-out source slice differ from most rows",
        ],
    )
    lines = [f"Comparison on {task}: every finished trial in the store whose task tag is {task}"]
    return Report(f"Methods on {task}", lines, [table], {"task": task, "rule": rule.name, "methods": data})


def _architecture(configuration: Configuration) -> str:
    return ",".join(sorted({r.params.get("architecture", "?") for r in configuration.runs})) or "?"


def _source_val(configuration: Configuration) -> str:
    """The fraction of source images its runs held out (--source-val; "0" for none): other training data."""
    return ",".join(sorted({r.params.get("source_val", "0") for r in configuration.runs})) or "0"


# ---------------------------------------------------------------------------------------------- plots


def sensitivity_axes(configurations: Sequence[Configuration]) -> list[tuple[str, list[Any]]]:
    """The swept axes with more than one value, when the configurations are their full product (Fig. 3c/3d)."""
    keys = list(dict.fromkeys(k for c in configurations for k in c.point))
    axes = []
    for key in keys:
        values = sorted({c.point.get(key) for c in configurations}, key=_sort_key)
        if len(values) > 1:
            axes.append((key, values))
    if not axes or len(axes) > 2 or any(set(c.point) != set(keys) for c in configurations):
        return []
    if math.prod(len(v) for _, v in axes) != len(configurations):
        return []
    return axes


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def sensitivity_plots(configurations: Sequence[Configuration], info: SweepInfo) -> dict[str, bytes]:
    """PNG files: a line per value of the second axis over the first (seed spread as bars and dots) and, for two axes,
    a heatmap of the mean with mean ± std in each cell."""
    axes = sensitivity_axes(configurations)
    if not axes or not any(c.runs for c in configurations):
        return {}
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    def lookup(values: Mapping[str, Any]) -> Configuration | None:
        return next((c for c in configurations if all(str(c.point.get(k)) == str(v) for k, v in values.items())), None)

    plots = {}
    (x_key, x_values), rest = axes[0], axes[1:]
    series = rest[0][1] if rest else [None]
    figure, axis = plt.subplots(figsize=(5.5, 4))
    positions = list(range(len(x_values)))
    for value in series:
        means, stds = [], []
        for x_index, x in enumerate(x_values):
            configuration = lookup({x_key: x, **({rest[0][0]: value} if rest else {})})
            stat = configuration.stat(LAST) if configuration else Stat(())
            means.append(stat.mean)
            stds.append(stat.std if stat.n > 1 else 0.0)
            axis.scatter([x_index] * stat.n, stat.defined, s=10, alpha=0.5)
        label = f"{rest[0][0]}={compact(value)}" if rest else "mean ± std over seeds"
        axis.errorbar(positions, means, yerr=stds, marker="o", capsize=3, label=label)
    axis.set_xticks(positions, [compact(x) for x in x_values])
    axis.set_xlabel(x_key)
    axis.set_ylabel("target-val mIoU (last checkpoint)")
    axis.set_title(f"{info.method} on {info.task}: {info.grid or info.name}", fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    plots[f"sensitivity_{x_key}" + (f"_{rest[0][0]}" if rest else "") + "_lines.png"] = _png(figure)
    if rest:
        (y_key, y_values) = rest[0]
        grid = [[math.nan] * len(x_values) for _ in y_values]
        text = [[""] * len(x_values) for _ in y_values]
        for i, y in enumerate(y_values):
            for j, x in enumerate(x_values):
                configuration = lookup({x_key: x, y_key: y})
                stat = configuration.stat(LAST) if configuration else Stat(())
                grid[i][j] = stat.mean
                text[i][j] = f"{stat.mean:.1f}\n± {stat.std:.1f}" if stat.n else "n/a"
        figure, axis = plt.subplots(figsize=(5.5, 4.5))
        image = axis.imshow(grid, cmap="viridis", origin="lower")
        for i in range(len(y_values)):
            for j in range(len(x_values)):
                axis.text(j, i, text[i][j], ha="center", va="center", color="white", fontsize=8)
        axis.set_xticks(range(len(x_values)), [compact(x) for x in x_values])
        axis.set_yticks(range(len(y_values)), [compact(y) for y in y_values])
        axis.set_xlabel(x_key)
        axis.set_ylabel(y_key)
        axis.set_title(f"{info.method} on {info.task}: {info.grid or info.name} (mean ± std, last)", fontsize=9)
        figure.colorbar(image, ax=axis, label="target-val mIoU")
        plots[f"sensitivity_{x_key}_{y_key}_heatmap.png"] = _png(figure)
    return plots


def _png(figure: Any) -> bytes:
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(report: Report) -> str:
    out = [f"## {report.title}", "", *report.lines, ""]
    for table in report.tables:
        out += [f"### {table.title}", ""]
        out.append("| " + " | ".join(_md_cell(c) for c in table.columns) + " |")
        out.append("|" + "---|" * len(table.columns))
        out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
        out += [""] + [f"- {note}" for note in table.notes] + ([""] if table.notes else [])
    if report.plots:
        out += ["Plots: " + ", ".join(f"`plots/{name}`" for name in report.plots), ""]
    return "\n".join(out).rstrip() + "\n"


def to_html(report: Report) -> str:
    escape = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{escape(report.title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;text-align:right}"
        "td:nth-child(-n+2),th{text-align:left}th{background:#f3f3f3}</style></head><body>",
        f"<h2>{escape(report.title)}</h2>",
    ]
    out += [f"<p>{escape(line)}</p>" for line in report.lines]
    for table in report.tables:
        out.append(f"<h3>{escape(table.title)}</h3><table><tr>")
        out += [f"<th>{escape(c)}</th>" for c in table.columns]
        out.append("</tr>")
        for row in table.rows:
            out.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>")
        out.append("</table>")
        out += ["<ul>"] + [f"<li>{escape(n)}</li>" for n in table.notes] + ["</ul>"] if table.notes else []
    for name in report.plots:
        out.append(f"<p><img src='plots/{escape(name)}' alt='{escape(name)}'></p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def to_csv(report: Report) -> str:
    """One row per configuration (sweep) or method (task comparison) with raw numbers."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if "configurations" in report.data:
        metrics = sorted({m for c in report.data["configurations"] for m in c["metrics"]})
        writer.writerow(
            ["configuration", "defaults", "n", "seeds", "steps", "paper_row"]
            + [f"{m}:{s}" for m in metrics for s in ("mean", "std", "n")]
        )
        for c in report.data["configurations"]:
            row = [c["label"], c["defaults"], c["n"], " ".join(c["seeds"]), c["steps"], c["paper_row"] or ""]
            for m in metrics:
                value = c["metrics"].get(m, {})
                row += [_raw(value.get("mean")), _raw(value.get("std")), value.get("n", 0)]
            writer.writerow(row)
    else:
        writer.writerow(["method", "configuration", "mean", "std", "n", "seeds", "steps", "architecture", "flags"])
        for m in report.data.get("methods", []):
            writer.writerow(
                [m["method"], m["configuration"], _raw(m["mean"]), _raw(m["std"]), m["n"], " ".join(m["seeds"])]
                + [m["steps"], m["architecture"], "; ".join(m["flags"])]
            )
    return buffer.getvalue()


def _raw(value: float | None) -> str:
    return "" if value is None or value != value else f"{value:.4f}"


def to_json(report: Report) -> str:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean({"title": report.title, "lines": report.lines, **report.data}), indent=2) + "\n"


RENDERERS: dict[str, Callable[[Report], str]] = {"md": to_markdown, "html": to_html, "csv": to_csv, "json": to_json}
EXTENSIONS = {"md": "report.md", "html": "report.html", "csv": "report.csv", "json": "report.json"}


def write(report: Report, directory: str) -> list[str]:
    """Every format and the plots into `directory`; returns the paths written."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for kind, name in EXTENSIONS.items():
        path = os.path.join(directory, name)
        with open(path, "w") as out:
            out.write(RENDERERS[kind](report))
        paths.append(path)
    if report.plots:
        os.makedirs(os.path.join(directory, "plots"), exist_ok=True)
        for name, png in report.plots.items():
            path = os.path.join(directory, "plots", name)
            with open(path, "wb") as out:
                out.write(png)
            paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- MLflow


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def check_store(tracking_uri: str) -> None:
    """A SQLite store must exist (reading must not create an empty one); a server must answer."""
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///") :]
        if not os.path.isfile(path):
            raise ReportError(f"no MLflow store at {path} (run a sweep first, or pass --tracking-uri)")
    elif tracking_uri.startswith(("http://", "https://")):
        from platform import preflight
        from platform.config import UsageError

        try:
            preflight.check_tracking(tracking_uri)
        except UsageError as error:
            raise ReportError(str(error)) from None


def _all_runs(client: Any, filter_string: str) -> list[Any]:
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs, token = [], None
    while experiments:
        page = client.search_runs(experiments, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def list_sweeps(client: Any) -> list[RunRecord]:
    parents = [RunRecord.from_run(r) for r in _all_runs(client, f"tags.`{SWEEP_TAG}` != ''")]
    return [p for p in parents if PARENT_TAG not in p.tags and p.tags.get(SWEEP_TAG) == p.name]


def find_sweep(client: Any, sweep: str) -> RunRecord:
    """A parent run by its id or its sweep name (the latest of that name)."""
    from mlflow.exceptions import MlflowException

    if len(sweep) == 32 and all(ch in "0123456789abcdef" for ch in sweep):
        try:
            run = RunRecord.from_run(client.get_run(sweep))
            if SWEEP_TAG in run.tags and PARENT_TAG not in run.tags:
                return run
        except MlflowException:
            pass
    known = list_sweeps(client)
    matches = [p for p in known if p.name == sweep]
    if matches:
        return matches[0]  # search_runs orders by start time, the latest first
    known = list_sweeps(client)
    if not known:
        raise ReportError("the store holds no sweeps yet (run python -m platform.sweep first)")
    names = ", ".join(p.name for p in known[:8]) + (", ..." if len(known) > 8 else "")
    raise ReportError(f"no sweep named {sweep!r} in this store; sweeps: {names}")


def sweep_definition(client: Any, parent: RunRecord) -> dict[str, Any]:
    """The parent's sweep.json (points, ranges), or {} where it cannot be read."""
    try:
        with tempfile.TemporaryDirectory(prefix="uda-report-") as directory:
            path = client.download_artifacts(parent.run_id, "sweep.json", directory)
            with open(path) as handle:
                return json.load(handle)
    except Exception:  # an older sweep or an artifact store this process cannot read: params are enough
        return {}


def sweep_info(parent: RunRecord, definition: Mapping[str, Any], experiment: str = "") -> SweepInfo:
    params = {**{k.removeprefix("sweep."): v for k, v in parent.params.items()}, **definition}
    method = str(params.get("method") or parent.tags.get("method", "?"))
    task = str(params.get("task") or parent.tags.get("task", "?"))
    mode, grid = str(params.get("mode", "grid")), str(params.get("grid") or "")
    points = definition.get("points")
    if points is None and mode == "grid" and grid:
        try:
            import search_spaces

            points = search_spaces.load(method).grid_points(grid)
            points = [{k: v for k, v in p.items() if k != "seed"} for p in points]
        except ValueError:
            points = None
    swept = (
        tuple(definition.get("ranges", {}))
        if mode == "tpe"
        else tuple(dict.fromkeys(k for p in points or () for k in p))
    )
    overrides = params.get("overrides") or "{}"
    base = json.loads(overrides) if isinstance(overrides, str) else dict(overrides)
    return SweepInfo(
        name=parent.name,
        run_id=parent.run_id,
        method=method,
        task=task,
        mode=mode,
        grid=grid,
        seeds=str(params.get("seeds", "")),
        experiment=experiment,
        points=tuple(points) if points is not None and mode != "tpe" else None,
        swept=swept,
        defaults=_defaults(method, base),
        subsets=_subsets(task),
        scheduler=str(params.get("scheduler") or ""),
    )


def _defaults(method: str, base: Mapping[str, Any]) -> dict[str, Any]:
    """Every hyperparameter's value when nothing is swept: the paper defaults under the sweep's base overrides."""
    try:
        import methods

        hyperparams = methods.get(method).hyperparams
        fields = {f.name: getattr(hyperparams(), f.name) for f in dataclasses.fields(hyperparams)}
        return {**fields, **base}
    except Exception:  # a method no longer registered: the runs' tags and the base overrides still say enough
        return dict(base)


def _subsets(task: str) -> tuple[str, ...]:
    try:
        from platform import tasks

        return tuple(name for name, _ in tasks.get(task).class_subsets)
    except (ValueError, ImportError):
        return ()


def load_sweep_report(tracking_uri: str, sweep: str) -> Report:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # sweep.json: one small file
    client = _client(tracking_uri)
    parent = find_sweep(client, sweep)
    experiment = client.get_experiment(client.get_run(parent.run_id).info.experiment_id)
    definition = sweep_definition(client, parent)
    info = sweep_info(parent, definition, experiment.name)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.run_id}'", max_results=10000)
    baselines = []
    if info.method != "source_only":
        baselines = [
            RunRecord.from_run(r)
            for r in _all_runs(client, f"tags.method = 'source_only' and tags.task = '{info.task}'")
            if PARENT_TAG in r.data.tags and r.info.status == "FINISHED" and RETRIED_TAG not in r.data.tags
        ]
    records = [RunRecord.from_run(r) for r in runs]
    histories = {}
    if info.scheduler == "pbt":
        for run in records:
            histories[run.run_id] = {
                key: [(m.step, m.value) for m in client.get_metric_history(run.run_id, key)]
                for key in run.metrics
                if key.startswith("hp/")
            }
    return sweep_report(info, records, paper_results(info.method), baselines, histories)


NOTE_LIMIT = 7500  # MLflow keeps tag values up to 8,000 characters
NOTE_TAG, REASON_TAG, BEST_TAG = "mlflow.note.content", "uda.failure_reason", "uda.best_trial"  # platform.tracking


def log_to_parent(tracking_uri: str, parent_id: str, status: str = "FINISHED") -> Report:
    """The sweep's report on its parent run, read back from the store: the description (`mlflow.note.content`) is the
    report in Markdown (the first tables where it is too long), the artifacts `report/` every format and the plots,
    the metrics and the `uda.best_trial` tag the best trial's (best evaluation on target val), and the swept values of
    that trial the parent's params under their field names where not logged yet. Run again, it refreshes them."""
    import time

    from mlflow.entities import Metric, Param

    built = load_sweep_report(tracking_uri, parent_id)
    client = _client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="uda-report-") as directory:
        write(built, directory)
        client.log_artifacts(parent_id, directory, artifact_path="report")
    markdown = to_markdown(built)
    if len(markdown) > NOTE_LIMIT:
        markdown = to_markdown(dataclasses.replace(built, tables=built.tables[:2], plots={}))
        markdown += "\nThe full report: artifacts `report/report.md`.\n"
    parent = client.get_run(parent_id)
    if status != "FINISHED":
        markdown = f"**{status}**: {parent.data.tags.get(REASON_TAG, '')}\n\n{markdown}"
    client.set_tag(parent_id, NOTE_TAG, markdown[:NOTE_LIMIT])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'FINISHED'"
    )
    scored = [r for r in children if BEST in r.data.metrics and RETRIED_TAG not in r.data.tags]
    if scored:
        best = max(scored, key=lambda r: r.data.metrics[BEST])
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in best.data.metrics.items() if k.startswith("val_") and v == v]
        for start in range(0, len(metrics), 1000):
            client.log_batch(parent_id, metrics=metrics[start : start + 1000])
        client.set_tag(parent_id, BEST_TAG, f"{best.info.run_name} ({best.info.run_id})")
        swept = json.loads(best.data.tags.get("uda.swept", "{}"))
        keys = set(built.data["sweep"].get("swept") or ()) | set(swept)
        values = {k: best.data.params[k] for k in keys if k in best.data.params and k not in parent.data.params}
        if values:
            client.log_batch(parent_id, params=[Param(k, v) for k, v in values.items()])
    return built


def load_task_report(tracking_uri: str, task: str, rule: str) -> Report:
    from platform import tasks

    try:
        tasks.get(task)
    except ValueError as error:
        raise ReportError(str(error)) from None
    client = _client(tracking_uri)
    runs = [
        RunRecord.from_run(r)
        for r in _all_runs(client, f"tags.task = '{task}'")
        if PARENT_TAG in r.data.tags  # trials, not sweeps
    ]
    if not runs:
        raise ReportError(
            f"no trials on task {task!r} in this store (run python -m platform.sweep METHOD --task {task})"
        )
    defaults = {}
    for method in {r.tags.get("method", "?") for r in runs}:
        defaults[method] = {k: str(v) for k, v in _task_defaults(method, task).items()}
    return task_report(task, runs, RULES[rule], defaults)


def _task_defaults(method: str, task: str) -> dict[str, Any]:
    try:
        import search_spaces

        return _defaults(method, search_spaces.load(method).task_defaults.get(task, {}))
    except ValueError:
        return {}


# ---------------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise ReportError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m platform.report",
        description="Tables from the MLflow store: a sweep's configurations (mean ± std over seeds, paper numbers, "
        "selection rules) or every method on one task.",
        epilog="examples:\n  python -m platform.report cscl-synthetic-urban-grid-table1-20261201-101500\n"
        "  python -m platform.report --task synthetic-urban --rule defaults\n"
        "  python -m platform.report SWEEP --tracking-uri http://127.0.0.1:5000 --out reports/table1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep", nargs="?", help="sweep name or parent run id (omit to list the sweeps)")
    parser.add_argument("--task", help="compare every method's runs on this task instead")
    parser.add_argument("--rule", choices=tuple(RULES), default="oracle", help="--task: selection rule (oracle)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--format", choices=tuple(RENDERERS), default="md", help="what goes to stdout (md)")
    parser.add_argument("--out", help="also write report.{md,html,csv,json} and plots/*.png into this folder")
    parser.add_argument(
        "--log",
        action="store_true",
        help="SWEEP: also (re)write the report onto the sweep's parent run (description, artifacts, best metrics), "
        "as every sweep does when it ends",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        # tracking.default_tracking_uri, without importing torch for it
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"
        if args.sweep and args.task:
            raise ReportError("give a SWEEP or --task TASK, not both")
        check_store(uri)
        if args.task:
            report = load_task_report(uri, args.task, args.rule)
        elif args.sweep:
            report = load_sweep_report(uri, args.sweep)
            if args.log:
                parent = find_sweep(_client(uri), args.sweep)
                report = log_to_parent(uri, parent.run_id, parent.status)
        else:
            sweeps = list_sweeps(_client(uri))
            if not sweeps:
                raise ReportError(f"the store {uri} holds no sweeps yet (run python -m platform.sweep first)")
            for parent in sweeps:
                print(
                    f"{parent.name}  {parent.status}  {parent.tags.get('method', '?')} on {parent.tags.get('task', '?')}  ({parent.run_id})"
                )
            return 0
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(RENDERERS[args.format](report))
    if args.out:
        for path in write(report, args.out):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
