import pytest

import methods
from platform import config
from platform.config import UsageError


def source_only():
    return methods.get("source_only")


def test_overrides_are_typed_by_the_hyperparams_fields():
    parsed = config.parse_overrides(source_only(), ["learning_rate=0.02", "batch_size=4", "architecture=tiny"])
    assert parsed == {"learning_rate": 0.02, "batch_size": 4, "architecture": "tiny"}
    assert isinstance(parsed["batch_size"], int)


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("learning_rate", "malformed --set 'learning_rate': expected key=value"),
        ("=3", "malformed --set '=3'"),
        (
            "lr=0.1",
            "unknown hyperparameter 'lr' for source_only; valid: architecture, backbone_weights, freeze_batchnorm, learning_rate",
        ),
        ("batch_size=four", "invalid value for batch_size: 'four' is not a int"),
        ("learning_rate=nan", "invalid value for learning_rate"),
    ],
)
def test_bad_overrides_name_the_problem(assignment, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.parse_overrides(source_only(), [assignment])


def test_out_of_range_value_is_rejected_with_the_valid_range():
    with pytest.raises(UsageError, match=r"learning_rate must be > 0 \(got -1.0\)"):
        config.resolve("source_only", overrides={"learning_rate": -1.0})


def test_unknown_method_and_task_list_valid_choices():
    with pytest.raises(UsageError, match=f"unknown method 'nope'; valid: {', '.join(sorted(methods.REGISTRY))}$"):
        config.resolve("nope")
    with pytest.raises(UsageError, match="unknown task 'mars' for source_only; valid: synthetic-urban"):
        config.resolve("source_only", "mars")


def test_defaults_come_from_the_search_space():
    resolved = config.resolve("source_only")
    assert resolved.task.name == resolved.space.default_task == "synthetic-urban"
    assert resolved.base["architecture"] == "tiny"
    # source_only's stage defines the trial's length (num_steps, 300 on the synthetic tasks): nothing to scale to
    assert resolved.max_steps is None and resolved.eval_every is None
    assert config.resolve("source_only", max_steps=20).max_steps == 20


def test_grid_points_expand_and_each_is_validated():
    resolved = config.resolve("source_only")
    sweep = config.plan_sweep(resolved, "lr", None, None, (0, 1), [])
    assert [p["learning_rate"] for p in sweep.points] == [3e-3, 1e-2, 3e-2]
    assert sweep.num_trials == 6 and sweep.mode == "grid"
    with pytest.raises(UsageError, match="unknown grid 'fig9' for source_only; valid: lr"):
        config.plan_sweep(resolved, "fig9", None, None, (0,), [])


def test_set_conflicting_with_a_swept_key_is_an_error():
    resolved = config.resolve("source_only", overrides={"learning_rate": 0.5})
    with pytest.raises(UsageError, match="--set learning_rate conflicts with the sweep"):
        config.plan_sweep(resolved, "lr", None, None, (0,), ["learning_rate"])


def test_random_search_starts_with_the_defaults_and_is_reproducible():
    resolved = config.resolve("source_only")
    first = config.plan_sweep(resolved, None, None, 3, (0,), [])
    again = config.plan_sweep(resolved, None, None, 3, (0,), [])
    assert first.mode == "random" and first.points == again.points
    assert first.points[0] == {"learning_rate": resolved.base["learning_rate"]}
    low, high = resolved.space.ranges["learning_rate"][1:]
    assert all(low <= p["learning_rate"] <= high for p in first.points[1:])
    assert len({p["learning_rate"] for p in first.points}) == 3


def test_sweep_option_combinations():
    resolved = config.resolve("source_only")
    with pytest.raises(UsageError, match="--grid and --search are exclusive"):
        config.plan_sweep(resolved, "lr", "tpe", None, (0,), [])
    assert config.plan_sweep(resolved, "lr", None, 2, (0, 1), []).num_trials == 3 * 2 * 2  # grid repeats
    with pytest.raises(UsageError, match="--num-samples must be >= 1"):
        config.plan_sweep(resolved, None, "tpe", 0, (0,), [])
    tpe = config.plan_sweep(resolved, None, "tpe", 4, (0, 1), [])
    assert tpe.num_trials == 8


def test_seeds():
    assert config.parse_seeds("0,1, 2") == (0, 1, 2)
    for text in ("a,b", "", "1,1"):
        with pytest.raises(UsageError, match="malformed --seeds"):
            config.parse_seeds(text)


def test_grid_with_seed_axis(monkeypatch):
    resolved = config.resolve("source_only")
    monkeypatch.setitem(resolved.space.grids, "stability", {"learning_rate": [0.01], "seed": [3, 4, 5]})
    sweep = config.plan_sweep(resolved, "stability", None, None, (0,), [])
    assert sweep.seeds == (3, 4, 5) and sweep.points == ({"learning_rate": 0.01},)


def test_trial_runner_is_inline_for_one_worker_unless_train_is_asked_for():
    assert config.trial_runner("auto", 1) == "inline" and config.trial_runner("auto", 2) == "train"
    assert config.trial_runner("train", 1) == "train" and config.trial_runner("inline", 1) == "inline"


def test_trial_resources_and_concurrency_count_the_same_cpus_for_both_runners():
    from platform import cluster

    driver = cluster.TRIAL_DRIVER_CPUS
    assert cluster.trial_resources(False, 2, 1, 1) == {"CPU": driver}  # the Train workers ask for their own
    assert cluster.trial_resources(True, 1, 2, 0) == {"CPU": driver + 2}
    assert cluster.trial_resources(True, 1, 1, 0.5) == {"CPU": driver + 1, "GPU": 0.5}
    # a local 2-core cluster has 3 logical CPUs (one for the drivers' token shares): two 1-CPU trials at a time
    local = cluster.Resources(cpus=3, gpus=0)
    assert cluster.max_concurrent_trials(local, 1, 1, 0) == 2
    assert cluster.max_concurrent_trials(local, 2, 1, 0) == 1
    assert cluster.max_concurrent_trials(cluster.Resources(cpus=64, gpus=8), 1, 4, 1) == 8


def test_imagenet_backbones_are_required_on_paper_tasks_unless_random_is_asked_for(monkeypatch):
    """Issue 19 item 2: a method that starts from ImageNet must not silently train a paper task from random weights."""
    import dataclasses

    from methods.contract import RANDOM_INIT

    record = dataclasses.replace(methods.get("cscl"), imagenet_backbone=True)
    monkeypatch.setattr(methods, "REGISTRY", {**methods.REGISTRY, "cscl": record})
    with pytest.raises(config.UsageError) as error:
        config.resolve("cscl", "gta5-cityscapes")
    message = str(error.value)
    assert "\n" not in message and "--set backbone_weights=/path/to/resnet101-63fe2227.pth" in message
    assert f"backbone_weights={RANDOM_INIT}" in message
    with pytest.raises(config.UsageError, match="vgg16-397923af.pth"):
        config.resolve("cscl", "gta5-cityscapes", {"architecture": "fcn8s_vgg16"})
    config.resolve("cscl", "gta5-cityscapes", {"backbone_weights": RANDOM_INIT})  # explicit opt-out
    config.resolve("cscl", "synthetic-urban")  # synthetic tasks train the tiny network from scratch
    assert not methods.get("seuda").imagenet_backbone  # SeUDA's segmenter trains from scratch, as its paper does
