"""platform/report.py: the aggregation on hand-made run records (values worked out by hand), and its command's
one-line errors on a real (empty or small) SQLite store."""

from __future__ import annotations

import math

import pytest

from platform import report
from platform.report import BEST, LAST, SOURCE_VAL, RunRecord, Stat, SweepInfo

TABLE1 = ({}, {"critical_transfer": False}, {"confidence_guided": False})
DEFAULTS = {"critical_transfer": True, "confidence_guided": True, "xi1": 0.3, "gamma": 0.25}


def run(seed, last, best, status="FINISHED", steps="200", **params):
    metrics = {LAST: last, BEST: best}
    metrics.update(params.pop("metrics", {}))
    values = {"seed": str(seed), "steps": steps, "critical_transfer": "True", "confidence_guided": "True"}
    values.update({k: str(v) for k, v in params.items()})
    return RunRecord(f"run-{seed}-{last}", f"seed {seed}", status, values, {"method": "cscl"}, metrics)


def table1_runs():
    return [
        run(0, 40.0, 42.0),
        run(1, 44.0, 45.0),
        run(0, 38.0, 41.0, critical_transfer=False),
        run(1, 39.0, 40.0, critical_transfer=False),
        run(2, 10.0, 10.0, status="FAILED", critical_transfer=False),
        run(0, 45.0, 46.0, confidence_guided=False),
        run(1, 47.0, 47.5, confidence_guided=False),
    ]


def info(task="synthetic-urban", **kwargs):
    values = {"name": "s", "run_id": "p", "method": "cscl", "task": task, "grid": "table1", "seeds": "0,1"}
    values |= {"points": TABLE1, "swept": ("critical_transfer", "confidence_guided"), "defaults": DEFAULTS}
    return SweepInfo(**(values | kwargs))


PAPER = {
    "table1": {
        "gta5-cityscapes": {
            "source": "Table 1",
            "classes": ("road", "car"),
            "rows": {
                "Ours": {"point": {}, "miou": 48.6, "iou": (89.6, 80.9)},
                "Ours-w/oTC": {"point": {"critical_transfer": False}, "miou": 46.7, "iou": (91.6, 81.5)},
                "Source only": {"method": "source_only", "miou": 36.6},
            },
        }
    }
}


def test_stat_is_mean_and_sample_std_over_the_defined_values():
    stat = Stat((40.0, 44.0, math.nan))
    assert (stat.mean, stat.n, stat.undefined) == (42.0, 2, 1)
    assert stat.std == pytest.approx(math.sqrt(8.0))  # ((40-42)² + (44-42)²) / (2-1) = 8
    assert stat.text() == "42.0 ± 2.8 (1 undefined)"
    assert Stat((5.0,)).std == 0.0 and Stat(()).text() == "n/a"


def test_runs_group_into_grid_rows_in_grid_order_failed_runs_counted_not_averaged():
    rows = report.group_runs(list(reversed(table1_runs())), info().swept, TABLE1, DEFAULTS)
    assert [r.label for r in rows] == ["defaults", "critical_transfer=False", "confidence_guided=False"]
    assert [len(r.runs) for r in rows] == [2, 2, 2] and rows[1].unfinished == 1
    assert rows[0].defaults and not rows[1].defaults
    assert rows[1].stat(LAST).mean == 38.5 and rows[1].stat(BEST).mean == 40.5
    retried = RunRecord("x", "x", "FAILED", {"seed": "3", "critical_transfer": "False"}, {"uda.retried": "y"}, {})
    assert report.group_runs([retried], info().swept, TABLE1, DEFAULTS) == []


def test_point_labels_and_defaults_detection():
    assert report.point_label({"xi1": 0.1, "gamma": 0.25}, DEFAULTS) == "xi1=0.1"
    assert report.point_label({"xi1": 0.3, "gamma": 0.25}, DEFAULTS) == "defaults"
    assert report.compact(0.00035) == "0.00035" and report.compact(1e-5) == "1e-5" and report.compact(10.0) == "10"


def test_synthetic_task_shows_our_row_differences_beside_the_papers():
    built = report.sweep_report(info(), table1_runs(), PAPER)
    main = built.tables[0]
    header = main.columns
    assert "paper Δ on gta5-cityscapes" in header and "ours − paper" not in header
    defaults, without_tc = main.rows[0], main.rows[1]
    assert defaults[header.index("mIoU (last)")] == "42.0 ± 2.8"  # 40, 44
    assert defaults[header.index("mIoU (best ckpt)†")] == "43.5 ± 2.1"  # 42, 45
    assert without_tc[header.index("n")] == "2 (+1 failed)"
    assert without_tc[header.index("Δ vs defaults")] == "-3.5"  # 38.5 - 42.0
    assert without_tc[header.index("paper Δ on gta5-cityscapes")] == "-1.9 (Ours-w/oTC − Ours)"  # 46.7-48.6
    assert main.rows[2][header.index("paper Δ on gta5-cityscapes")] == ""  # no paper row for w/oCG here
    assert without_tc[-1] == "38.0, 39.0"


def test_paper_task_shows_the_printed_numbers_and_our_difference():
    runs = [run(0, 30.0, 31.0, metrics={"val_target/iou/road": 70.0, "val_target/iou/car": 60.0}), run(1, 34.0, 35.0)]
    built = report.sweep_report(info(task="gta5-cityscapes"), runs, PAPER)
    main = built.tables[0]
    row = main.rows[0]
    assert row[main.columns.index("paper (Table 1)")] == "48.6"
    assert row[main.columns.index("ours − paper")] == "-16.6"  # 32.0 - 48.6
    per_class = next(t for t in built.tables if t.title.startswith("Per-class"))
    assert per_class.rows[0] == ["defaults", "70.0", "60.0"]
    assert per_class.rows[1] == ["  paper: Ours", "89.6", "80.9"]
    paper = next(t for t in built.tables if t.title.startswith("Paper vs ours"))
    assert paper.rows[0] == ["Ours", "defaults", "48.6", "32.0 ± 2.8", "-16.6"]
    assert paper.rows[1][3] == "not run"
    assert built.data["configurations"][0]["paper_row"] == "Ours"


def test_selection_rules_pick_by_their_own_data():
    runs = table1_runs()
    runs += [run(0, 50.0, 60.0, critical_transfer=False, confidence_guided=False)]  # best on target only
    swept = info().swept
    points = (*TABLE1, {"critical_transfer": False, "confidence_guided": False})
    rows = report.group_runs(runs, swept, points, DEFAULTS)
    assert (
        report.select(rows, report.RULES["oracle"]).configuration.label
        == "critical_transfer=False confidence_guided=False"
    )
    assert report.select(rows, report.RULES["defaults"]).score.mean == 42.0
    missing = report.select(rows, report.RULES["source-val"])
    assert missing.configuration is None and "--source-val" in missing.reason
    with_source = [run(0, 40.0, 41.0, metrics={SOURCE_VAL: 70.0}), run(0, 45.0, 46.0, confidence_guided=False)]
    with_source[1] = RunRecord(**{**with_source[1].__dict__, "metrics": {LAST: 45.0, BEST: 46.0, SOURCE_VAL: 60.0}})
    rows = report.group_runs(with_source, swept, TABLE1, DEFAULTS)
    picked = report.select(rows, report.RULES["source-val"])
    assert picked.configuration.label == "defaults" and picked.score.mean == 40.0  # scored on target, last ckpt


def test_lung_metrics_average_over_the_lungs_and_skip_undefined_asd():
    lungs = {"val_target/dice/left_lung": 80.0, "val_target/dice/right_lung": 90.0}
    first = run(
        0, 70.0, 71.0, metrics={**lungs, "val_target/asd_mm/left_lung": 3.0, "val_target/asd_mm/right_lung": 5.0}
    )
    second = run(1, 60.0, 61.0, metrics={**lungs, "val_target/asd_mm/left_lung": math.nan})
    assert first.value("dice") == 85.0 and first.value("asd_mm") == 4.0 and math.isnan(second.value("asd_mm"))
    built = report.sweep_report(info(points=({},), swept=()), [first, second], {})
    main = built.tables[0]
    assert main.columns[3:7] == [
        "mIoU (last)",
        "mIoU (best ckpt)†",
        "Dice, both lungs (last)",
        "ASD mm, both lungs (last)",
    ]
    assert main.rows[0][3:7] == ["65.0 ± 7.1", "66.0 ± 7.1", "85.0 ± 0.0", "4.00 (1 undefined)"]
    assert main.columns[7] == "Δ Dice vs defaults" and main.rows[0][-1] == "85.0, 85.0"
    lung = next(t for t in built.tables if t.title.startswith("Lung"))
    assert lung.rows[0][2] == "4.00 (1 undefined)"


def test_a_2d_product_grid_gets_a_heatmap_and_lines():
    points = tuple({"xi1": a, "gamma": b} for a in (0.1, 0.3) for b in (0.1, 0.25))
    runs = [
        RunRecord(f"r{i}{s}", "", "FINISHED", {"seed": str(s), "xi1": str(p["xi1"]), "gamma": str(p["gamma"])}, {},
                  {LAST: 10.0 * i + s, BEST: 10.0 * i + s})
        for i, p in enumerate(points) for s in (0, 1)
    ]  # fmt: skip
    rows = report.group_runs(runs, ("xi1", "gamma"), points, DEFAULTS)
    assert report.sensitivity_axes(rows) == [("xi1", [0.1, 0.3]), ("gamma", [0.1, 0.25])]
    plots = report.sensitivity_plots(rows, info(grid="fig3c"))
    assert sorted(plots) == ["sensitivity_xi1_gamma_heatmap.png", "sensitivity_xi1_gamma_lines.png"]
    assert all(png.startswith(b"\x89PNG") for png in plots.values())
    assert report.sensitivity_axes(rows[:3]) == []  # not a full product: no plot


def test_task_comparison_flags_rows_that_are_not_comparable():
    def trial(method, seed, last, steps, architecture="tiny", **params):
        values = {"seed": str(seed), "steps": steps, "architecture": architecture, **params}
        return RunRecord(f"{method}{seed}{steps}", "", "FINISHED", values, {"method": method}, {LAST: last, BEST: last})

    runs = [trial("source_only", s, v, "300") for s, v in ((0, 30.0), (1, 34.0))]
    runs += [trial("cscl", s, v, "200") for s, v in ((0, 40.0), (1, 44.0))]
    runs += [trial("adaptsegnet", s, v, "200") for s, v in ((0, 41.0), (1, 43.0))]
    runs += [trial("adaptsegnet", 0, 50.0, "200", lambda_adv="0.01", precision="fp32")]  # a run setting, not a label
    runs += [trial("source_only", 0, 31.0, "200")]  # another budget: a row of its own
    tiny = {"architecture": "tiny"}
    defaults = {"adaptsegnet": {"lambda_adv": "0.001", **tiny}, "source_only": tiny, "cscl": tiny}
    built = report.task_report("synthetic-urban", runs, report.RULES["defaults"], defaults)
    rows = {(r[0], r[4]): r for r in built.tables[0].rows}
    assert rows["source_only", "200"][-1] == "seeds 0 (most rows: 0,1)" and rows["source_only", "200"][2] == "31.0"
    rows = {r[0]: r for r in built.tables[0].rows if r[4] != "200" or r[0] != "source_only"}
    assert rows["source_only"][2] == "32.0 ± 2.8" and "budget 300 steps (most rows: 200)" in rows["source_only"][-1]
    assert rows["cscl"][-1] == "comparable" and rows["adaptsegnet"][1] == "defaults"
    assert rows["adaptsegnet"][2] == "42.0 ± 1.4" and rows["adaptsegnet"][6] == "2"
    oracle = report.task_report("synthetic-urban", runs, report.RULES["oracle"], defaults)
    assert {r[0]: r for r in oracle.tables[0].rows}["adaptsegnet"][1] == "lambda_adv=0.01"
    assert "rule: oracle" in oracle.tables[0].title
    # cscl trained without a tenth of its source images (--source-val 0.1): named, and flagged
    held = [trial("cscl", s, v, "200", source_val="0.1") for s, v in ((0, 48.0), (1, 50.0))]
    rows = {r[0]: r for r in report.task_report("synthetic-urban", runs[2:6] + held, report.RULES["oracle"], defaults)
            .tables[0].rows}  # fmt: skip
    assert rows["cscl"][1] == "defaults (source_val=0.1)" and rows["cscl"][2] == "49.0 ± 1.4"
    assert "source held out 0.1 (most rows: 0)" in rows["cscl"][-1] and rows["adaptsegnet"][-1] == "comparable"


def test_renderers_agree_on_the_numbers():
    built = report.sweep_report(info(), table1_runs(), PAPER)
    markdown = report.to_markdown(built)
    assert "| 1 | defaults (Ours) | 2 | 42.0 ± 2.8 | 43.5 ± 2.1 |" in markdown
    assert "<td>42.0 ± 2.8</td>" in report.to_html(built)
    csv_text = report.to_csv(built)
    assert "val_target/miou:mean" in csv_text.splitlines()[0] and "42.0000" in csv_text
    assert '"label": "defaults"' in report.to_json(built)


def test_every_paper_results_block_names_real_grid_points_and_metrics():
    import search_spaces
    from platform import tasks
    from platform.metrics import metric_key

    for method in ("cscl", "seuda", "tdtf", "slrt", "cirn"):
        space = search_spaces.load(method)
        for grid, by_task in report.paper_results(method).items():
            points = [{k: v for k, v in p.items() if k != "seed"} for p in space.grid_points(grid)]
            for task, entry in by_task.items():
                names = {metric_key(c) for c in tasks.get(task).info.class_names}
                assert set(entry.get("classes", ())) <= names, (method, grid, task)
                for name, row in entry["rows"].items():
                    assert "point" in row or "method" in row, (method, name)
                    if "point" in row:
                        assert dict(row["point"]) in points, (method, grid, task, name)
                    if "iou" in row:
                        values = [float(v) for v in row["iou"].split()]
                        assert len(values) == len(entry["classes"]), (method, name)
                        assert abs(sum(values) / len(values) - row["miou"]) < 0.1, (
                            method,
                            task,
                            name,
                        )  # rounded as printed


def test_command_errors_are_one_line_and_exit_2(tmp_path, capsys):
    missing = f"sqlite:///{tmp_path}/none.db"
    assert report.main(["some-sweep", "--tracking-uri", missing]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("cscl/synthetic-urban", artifact_location=f"file://{tmp_path}/a")
    assert report.main(["--tracking-uri", uri]) == 2
    assert "holds no sweeps" in capsys.readouterr().err
    parent = client.create_run(experiment, run_name="sweep-a", tags={"uda.sweep": "sweep-a", "method": "cscl"})
    client.log_param(parent.info.run_id, "task", "synthetic-urban")
    assert report.main(["sweep-b", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no sweep named 'sweep-b'" in err and "sweep-a" in err
    assert report.main(["--task", "synthetic-nowhere", "--tracking-uri", uri]) == 2
    assert "unknown task 'synthetic-nowhere'" in capsys.readouterr().err
    assert report.main(["--task", "synthetic-cxr", "--tracking-uri", uri]) == 2
    assert "no trials on task 'synthetic-cxr'" in capsys.readouterr().err
    assert report.main(["sweep-a", "--tracking-uri", uri]) == 0  # a sweep without trials yet: an empty table
    assert "sweep sweep-a" in capsys.readouterr().out


def test_pbt_population_shows_each_members_hyperparameter_history_and_exploits():
    members = [
        RunRecord("a", "lr · seed 0", "FINISHED", {"seed": "0"}, {"uda.pbt.exploit.step-00000020": "t2"},
                  {LAST: 40.0, BEST: 41.0, "hp/learning_rate": 0.012}),
        RunRecord("b", "lr · seed 1", "FINISHED", {"seed": "1"}, {}, {LAST: 45.0, BEST: 45.0}),
    ]  # fmt: skip
    histories = {"a": {"hp/learning_rate": [(10, 0.01), (20, 0.012), (30, 0.012)]}}
    built = report.sweep_report(info(scheduler="pbt", points=None, swept=()), members, {}, histories=histories)
    table = built.tables[-1]
    assert table.title.startswith("PBT population")
    assert table.rows[0][0] == "lr · seed 1"  # best last mIoU first
    assert table.rows[1][4:] == ["learning_rate: 0.01@10 → 0.012@20", "t2@20"]


def test_prediction_grid_rows_are_image_prediction_truth_in_the_tasks_colours():
    import torch

    from platform import tracking

    palette = tracking.label_palette(("road", "lesion"))
    assert palette[0].tolist() == [128, 64, 128] and palette[1].tolist() == [230, 25, 75]  # Cityscapes, fallback
    assert palette[-1].tolist() == [0, 0, 0]  # ignored pixels
    images = torch.ones(2, 1, 4, 4) * 0.5  # grey, one channel
    predictions = torch.zeros(2, 4, 4, dtype=torch.long)
    labels = torch.full((2, 4, 4), 255, dtype=torch.long)
    labels[:, 0, 0] = 1
    grid = tracking.prediction_grid(images, predictions, labels, palette)
    assert grid.shape == (512, 768, 3) and grid.dtype.name == "uint8"  # 4x4 frames enlarged to 256-pixel tiles
    assert grid[0, 0].tolist() == [128, 128, 128]  # image (grey 0.5)
    assert grid[0, 256].tolist() == [128, 64, 128]  # prediction: road
    assert grid[0, 512].tolist() == [230, 25, 75] and grid[100, 600].tolist() == [0, 0, 0]  # truth: lesion, ignored


def test_ui_command_and_links_open_the_model_training_view():
    from platform import tracking

    command = tracking.ui_command("sqlite:////data/mlflow.db")
    assert command.split()[0].endswith("mlflow") and "--backend-store-uri sqlite:////data/mlflow.db" in command
    assert tracking.ui_link("sqlite:////data/mlflow.db", "3") == (
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    )
    assert tracking.ui_link("http://mlflow:5000/", "3", "abc") == (
        "http://mlflow:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    )


def test_run_names_lead_with_the_swept_values():
    from platform.tuning import trial_label

    config = {"hp": {"xi1": 0.56, "xi2": 0.00035}, "seed": 0}
    assert trial_label(config, ("xi1", "xi2")) == "xi1=0.56 xi2=0.00035 · seed 0"
    assert trial_label({"hp": {}, "seed": 2}, ()) == "defaults · seed 2"
    assert trial_label(config, ("xi1", "xi2"), defaults=True) == "defaults · seed 0"


def test_sweep_info_reads_the_parents_settings_apart_from_its_hyperparameters():
    params = {"sweep.method": "cscl", "sweep.task": "synthetic-urban", "sweep.mode": "grid", "sweep.grid": "table1"}
    params |= {"sweep.seeds": "0,1", "sweep.overrides": '{"epochs": 2.0}', "sweep.scheduler": "", "batch_size": "8"}
    parent = RunRecord("p", "s", "FINISHED", params, {"uda.sweep": "s"}, {})
    info = report.sweep_info(parent, {})  # no sweep.json: the grid's points come from the search space
    assert (info.method, info.task, info.grid, info.seeds) == ("cscl", "synthetic-urban", "table1", "0,1")
    assert info.points[0] == {} and "critical_transfer" in info.swept
    assert info.defaults["epochs"] == 2.0 and info.defaults["xi1"] == 0.3  # the base overrides over the paper's
