"""Method contract v2 through the real loop, each feature on a tiny method written for the test (methods/contract.py):

1. sample identity: every batch names its rows and how each was resized, cropped and flipped;
2. the per-sample target store: maps a pass computes per image come back aligned with every augmented crop, survive
   a resume (or are rebuilt when gone), and are sharded over two workers that each read every row;
3. the stage lifecycle: `on_start` once per stage (not on resume), stage index and rounds, optimiser scopes;
4. budgets (share, steps, epochs; --max-steps scaling) with the split sizes in TaskInfo;
5. collectives: state updated from each rank's loss stays identical on two gloo workers;
6. source images with image-level labels only;
7. `samples` gets source images too; and MLflow gets one point per metric key and step.

The data are two small datasets written here in the platform's own Parquet layout (40 training rows per domain in
row groups of 8, 32x48 images), with a task that scales, crops and flips.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import types
from collections import Counter
from types import MappingProxyType

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import methods
from methods import contract
from methods.contract import Batch, Method, Optim, SampleImages, SampleMap, Stage, StepContext, TargetPass, TaskInfo
from platform import budgets, loop, store, tasks
from platform.datasets import IGNORE_INDEX, Manifest, SplitWriter, finalize, sample_row, split_files
from platform.stream import Placement, Policy, TrainStream, decode_row, place_map, row_groups, row_ids
from platform.tasks import Split, Task

CLASSES = ("a", "b", "c")
SIZE = (32, 48)
ROWS = {"train": 40, "weak": 8, "val": 16}


# ---------------------------------------------------------------------------------------------------- data, task


def _write(root: str, name: str, splits: dict[str, int], seed: int) -> None:
    if os.path.isfile(os.path.join(root, name, "manifest.json")):
        return
    out = os.path.join(root, name)
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(seed)
    infos = {}
    for split, count in splits.items():
        writer = SplitWriter(out, split, len(CLASSES), rows_per_group=8, rows_per_file=16)
        for index in range(count):
            label = rng.integers(0, len(CLASSES), SIZE).astype(np.uint8)
            image = (rng.random((*SIZE, 3)) * 255).astype(np.uint8)
            image[..., 0] = label * 100  # learnable: the class is in the red channel
            weak = split == "weak"
            present = sorted({int(c) for c in np.unique(label)})
            row = sample_row(
                f"{split}-{index}", image, None if weak else label, present if weak else None, None, "zstd"
            )
            writer.add(row, label=None if weak else label)
        infos[split] = writer.close()
    manifest = Manifest(name=name, num_classes=3, class_names=list(CLASSES), channels=3, label_map=name, splits=infos)
    finalize(out, manifest)


def _task(name: str, **changes) -> Task:
    base = Task(
        name=name,
        description="contract v2 probe",
        info=TaskInfo(num_classes=3, in_channels=3, class_names=CLASSES),
        source_train=Split("probe-source", "train"),
        target_train=Split("probe-target", "train"),
        target_val=Split("probe-target", "val"),
        hflip=True,
        train_scale_range=(0.6, 1.4),  # below 32/48 of the size the 32x40 crop is padded
        train_crop=(32, 40),
    )
    return dataclasses.replace(base, **changes)


WEAK = _task(
    "probe-weak",
    source_weak=Split("probe-source", "weak"),
    info=TaskInfo(num_classes=3, in_channels=3, class_names=CLASSES, source_image_labels=True),
)


@pytest.fixture(scope="module")
def probe_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("probe-data"))
    _write(root, "probe-source", {"train": 40, "weak": 8, "val": 16}, seed=1)
    _write(root, "probe-target", {"train": 40, "val": 16}, seed=2)
    return root


# ---------------------------------------------------------------------------------------------------- the probe method


@dataclasses.dataclass(frozen=True)
class Hyperparams:
    batch_size: int = 4
    budget: str = "steps"  # steps | shares | epochs
    store_images: bool = True
    reduce_state: bool = True
    rounds: int = 1


CALLS: Counter = Counter()  # collect calls, factory calls (one process; the two-worker test counts in state)
SEEN: list = []  # (stage position) of every predict call


def _build(hp: Hyperparams, info: TaskInfo) -> nn.ModuleDict:
    return nn.ModuleDict({"net": nn.Conv2d(3, info.num_classes, 1), "teacher": nn.Conv2d(3, info.num_classes, 1)})


def _optimizers(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> dict[str, Optim]:
    CALLS[f"factory:{num_steps}"] += 1
    sgd = torch.optim.SGD(modules["net"].parameters(), lr=0.1)
    return {"net": Optim(sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1 - s / num_steps))}


def _collect(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    CALLS["collect"] += len(images)
    ctx.state["collected"] = ctx.state.get("collected", 0) + len(images)
    out = {"count": torch.ones(len(images))}
    if ctx.hp.store_images:  # the pass stores each image itself (uint8, bilinear like the image)
        out["image"] = (images * 255).round().to(torch.uint8)
        out["mark"] = torch.full((len(images), *images.shape[-2:]), 7, dtype=torch.uint8)  # nearest, fill 255
    return out


def _update(ctx: StepContext, gathered: dict[str, torch.Tensor]) -> dict:
    return {"pass_rows": int(gathered["count"].sum()), "passes": ctx.state.get("passes", 0) + 1}


def _on_start(ctx: StepContext) -> dict:
    ctx.modules["teacher"].load_state_dict(ctx.modules["net"].state_dict())  # a frozen-teacher snapshot
    starts = dict(ctx.state.get("starts", {}))
    starts[ctx.stage] = starts.get(ctx.stage, 0) + 1
    return {"starts": starts}


def _step(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    optimizer = ctx.optimizers["net"]
    optimizer.zero_grad()
    loss = F.cross_entropy(ctx.modules["net"](batch.source_image), batch.source_label, ignore_index=IGNORE_INDEX)
    loss.backward()
    optimizer.step()
    if "image" in batch.target_extras:  # item 2: the stored image, placed like the batch's target crop
        gap = (batch.target_extras["image"].float() / 255 - batch.target_image).abs().max()
        ctx.state["misalignment"] = max(ctx.state.get("misalignment", 0.0), float(gap))
        ctx.state["aligned_steps"] = ctx.state.get("aligned_steps", 0) + 1
        mark, padded = batch.target_extras["mark"], (batch.target_image == 0).all(1)  # padding: 0 in every channel
        wrong = int((mark != torch.where(padded, 255, 7)).sum())
        ctx.state["mark_errors"] = ctx.state.get("mark_errors", 0) + wrong
        ctx.state["padded_pixels"] = ctx.state.get("padded_pixels", 0) + int(padded.sum())
    share = ctx.all_reduce_mean(loss.detach()) if ctx.hp.reduce_state else loss.detach()  # item 5
    ctx.state["lam"] = torch.maximum(ctx.state.get("lam", torch.tensor(0.0)), 0.5 * share)
    return {"loss": loss.detach(), "other": loss.detach() * 2}


def _stages(hp: Hyperparams) -> tuple[Stage, ...]:
    if hp.budget == "shares":
        return (
            Stage("a", ("net",), contract.share(0.25), _optimizers, _step),
            Stage("b", ("net",), contract.share(0.75), _optimizers, _step),
        )
    if hp.budget == "epochs":
        return (
            Stage("a", ("net",), contract.epochs(1, of="target"), _optimizers, _step),
            Stage("b", ("net",), contract.epochs(0.5), _optimizers, _step),
        )
    passes = TargetPass(
        "stage_start",
        _collect,
        _update,
        store={
            "image": SampleMap(torch.uint8, "bilinear", fill=0, channels=3),
            "mark": SampleMap(torch.uint8, "nearest", fill=255),
        }
        if hp.store_images
        else {},
    )
    stages: list[Stage] = []
    for _ in range(hp.rounds):
        stages.append(
            Stage("a", ("net",), contract.steps(3), _optimizers, _logged(_step), target_pass=passes, on_start=_on_start)
        )
        stages.append(Stage("b", ("net",), contract.steps(2), _optimizers, _logged(_step), optimizer_scope="s"))
    return tuple(stages)


def _logged(step):
    def run(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
        out = step(ctx, batch)
        lr = ctx.optimizers["net"].param_groups[0]["lr"]
        ctx.state["log"] = [*ctx.state.get("log", []), [ctx.stage, ctx.stage_index, ctx.round, ctx.stage_step, lr]]
        return out

    return run


def _predict(hp: Hyperparams, modules: nn.ModuleDict, images: torch.Tensor, stage) -> torch.Tensor:
    SEEN.append(tuple(stage))
    return modules["net"](images)


def _samples(hp: Hyperparams, modules: nn.ModuleDict, images: SampleImages, stage) -> dict[str, torch.Tensor]:
    return {"target": images.target, "source": images.source}


PROBE = Method(
    name="probe",
    paper="a test double of contract v2",
    hyperparams=Hyperparams,
    build=_build,
    stages=_stages,
    predict=_predict,
    tasks=("probe-crop", "probe-weak"),
    samples=_samples,
)


def install() -> None:
    """Register the probe method and tasks (also called in spawned workers, which start from fresh registries)."""
    methods.REGISTRY = MappingProxyType({**methods.REGISTRY, "probe": PROBE})
    tasks.TASKS.update({"probe-crop": _task("probe-crop"), "probe-weak": WEAK})


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setattr(methods, "REGISTRY", methods.REGISTRY)
    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    install()
    CALLS.clear()
    SEEN.clear()


def _spec(root: str, store_root: str | None = None, **hyperparams) -> loop.TrialSpec:
    return loop.TrialSpec(
        method="probe",
        task="probe-crop",
        hyperparams=hyperparams,
        seed=0,
        max_steps=None,
        eval_every=1000,
        data_root=root,
        store_root=store_root,
    )


class RecordingLogger:
    def __init__(self):
        self.points: list[tuple[str, int]] = []
        self.images: dict[int, dict] = {}

    def log_metrics(self, metrics, step):
        self.points.extend((key, step) for key in metrics)

    def log_checkpoint(self, kind, modules, meta):
        pass

    def log_images(self, images, step):
        self.images[step] = {name: batch.shape for name, batch in images.items()}


# ---------------------------------------------------------------------------------------------------- 1. identity


def test_every_sample_names_its_row_and_its_placement(probe_root):
    """Re-decoding a batch's rows by index and placing them as the batch says gives back the batch's pixels."""
    files = split_files(probe_root, "probe-target", "train")
    policy = Policy(None, True, (0.6, 1.4), (32, 40))
    stream = iter(TrainStream(files, ["image"], batch_size=8, num_classes=3, seed=5, policy=policy, threads=2))
    rows = {g.offset + i: row for g in row_groups(files) for i, row in enumerate(_rows(g))}
    ids = row_ids(files)
    assert len(ids) == 40 and ids[13] == "train-13"  # an index maps back to the shard's string id
    seen, padded, flipped = set(), 0, 0
    for _ in range(10):  # two epochs: every row once per epoch
        batch = next(stream)
        for k, index in enumerate(batch["index"].tolist()):
            placement = Placement(
                tuple(batch["aug_size"][k].tolist()), tuple(batch["aug_crop"][k].tolist()), bool(batch["aug_flip"][k])
            )
            expected = place_map(decode_row(rows[index], 3)["image"], placement, "bilinear", 0)
            assert torch.equal(expected, batch["image"][k]), index
            seen.add(index)
            padded += placement.size[0] < 32
            flipped += placement.flip
            assert 0.6 <= float(batch["aug_scale"][k]) <= 1.4
    assert seen == set(range(40)) and padded > 0 and 0 < flipped < 80


def _rows(group):
    from platform.stream import _RowGroupReader

    return _RowGroupReader(["image"]).rows(group)


# ---------------------------------------------------------------------------------------------------- 2. store


def test_stored_maps_come_back_aligned_with_every_augmented_crop(probe_root, tmp_path):
    runner = loop.TrialRunner(_spec(probe_root, str(tmp_path / "store")), loop.LocalSession())
    runner.run()
    state = runner.state
    assert state["pass_rows"] == 40 and state["passes"] == 1  # gathered over the whole target set
    assert state["aligned_steps"] == 3 and state["misalignment"] == 0.0  # exact: same uint8 resize, crop, flip
    assert state["padded_pixels"] > 0 and state["mark_errors"] == 0  # a nearest map: its fill exactly on the padding
    versions = store.versions(str(tmp_path / "store"))
    assert len(versions) == 1 and versions[0].startswith("pass-00000000-0")
    kept = os.listdir(tmp_path / "store" / versions[0])
    assert {"image.rank-0.bin", "image.rank-0.index.npy", "COMPLETE"} <= set(kept)
    reader = store.SampleStore(str(tmp_path / "store"), versions[0], {"image": SampleMap(torch.uint8, channels=3)})
    assert len(reader) == 40 and reader.read("image", [7])[0].shape == (3, *SIZE)


def test_the_store_survives_a_resume_and_is_rebuilt_when_gone(probe_root, tmp_path, caplog):
    straight = loop.TrialRunner(_spec(probe_root, str(tmp_path / "a")), loop.LocalSession())
    straight.run()
    sessions = loop.LocalSession(checkpoint_root=str(tmp_path / "ckpt"))
    # a LocalSession keeps every checkpoint, so the store keeps every version (as under PBT)
    spec = dataclasses.replace(_spec(probe_root, str(tmp_path / "b")), eval_every=2, checkpoints_kept=None)
    loop.TrialRunner(spec, sessions).run()
    # restart at the step-2 checkpoint (inside stage "a", after its pass), as after a killed worker
    CALLS.clear()
    resumed = loop.TrialRunner(spec, loop.LocalSession(resume_from=str(tmp_path / "ckpt" / "step-00000002")))
    resumed.run()
    assert CALLS["collect"] == 0 and resumed.state["passes"] == 1  # the checkpoint's version was read back
    assert resumed.state["misalignment"] == 0.0 and resumed.state["starts"] == {"a": 1}  # no second on_start
    assert resumed.evaluations[-1]["val_target/miou"] == straight.evaluations[-1]["val_target/miou"]
    shutil.rmtree(tmp_path / "b")  # the store is lost (e.g. storage cleaned): the pass runs again
    again = loop.TrialRunner(spec, loop.LocalSession(resume_from=str(tmp_path / "ckpt" / "step-00000002")))
    with caplog.at_level("WARNING"):
        again.run()
    assert again.state["passes"] == 2 and again.state["misalignment"] == 0.0 and "runs again" in caplog.text


# ---------------------------------------------------------------------------------------------------- 3. lifecycle


def test_stage_lifecycle_rounds_and_optimizer_scopes(probe_root, tmp_path):
    logger = RecordingLogger()
    spec = dataclasses.replace(_spec(probe_root, str(tmp_path / "s"), rounds=2, store_images=False), eval_every=9)
    runner = loop.TrialRunner(spec, loop.LocalSession(checkpoint_root=str(tmp_path / "ckpt")), logger)
    runner.run()
    log = runner.state["log"]
    positions = [tuple(entry[:3]) for entry in log]
    assert positions == [("a", 0, 0)] * 3 + [("b", 1, 0)] * 2 + [("a", 2, 1)] * 3 + [("b", 3, 1)] * 2
    assert runner.state["starts"] == {"a": 2}  # once per stage that declares it, each round
    # "a" builds fresh optimisers per round (3 steps each); scope "s" one set for all of its 4 steps, continuing
    assert CALLS["factory:3"] == 2 and CALLS["factory:4"] == 1
    lr_b = [entry[4] for entry in log if entry[0] == "b"]
    assert lr_b == pytest.approx([0.1 * (1 - s / 4) for s in range(4)])  # lr 0.1, linear to 0 over the scope
    assert [e[4] for e in log[:3]] == pytest.approx([0.1, 0.1 * 2 / 3, 0.1 / 3])
    assert SEEN[-1] == ("b", 3, 1) and ("a", 2, 1) in SEEN  # predict is told the stage, its index and round
    # resumed inside the second "b" (after its first step): the scope's schedule continues, no on_start again
    resumed = loop.TrialRunner(spec, loop.LocalSession(resume_from=_checkpoint_at(tmp_path / "ckpt", 9)))
    resumed.run()
    assert [e[4] for e in resumed.state["log"] if e[0] == "b"] == pytest.approx(lr_b)
    assert resumed.state["starts"] == {"a": 2}


def _checkpoint_at(root, step: int) -> str:
    return str(root / f"step-{step:08d}")


def test_teacher_snapshot_on_start_equals_the_student_and_stays_frozen(probe_root, tmp_path):
    runner = loop.TrialRunner(_spec(probe_root, str(tmp_path / "t"), store_images=False), loop.LocalSession())
    trial = runner.trial
    entered = loop.enter_stage(trial, 0, loop.Optimisers(trial), runner.state, runner.generator)
    loop.start_stage(entered)
    assert torch.equal(trial.modules["teacher"].weight, trial.modules["net"].weight)
    assert not trial.modules["teacher"].weight.requires_grad and not trial.modules["teacher"].training


# ---------------------------------------------------------------------------------------------------- 4. budgets


def test_budgets_share_steps_epochs_and_scaling(probe_root):
    info = tasks.runtime_info(_task("probe-crop"), probe_root)
    assert (info.source_train_size, info.target_train_size) == (40, 40)
    assert tasks.runtime_info(WEAK, probe_root).source_train_size == 48  # pixel- and image-labelled rows
    shares = _stages(Hyperparams(budget="shares"))
    assert budgets.stage_steps(shares, info, 4, 1, 10) == [2, 8]  # round(0.25·10), the remainder
    with pytest.raises(budgets.BudgetError, match="no length is set"):
        budgets.stage_steps(shares, info, 4, 1, None)
    by_epochs = _stages(Hyperparams(budget="epochs"))
    assert budgets.stage_steps(by_epochs, info, 4, 1, None) == [10, 5]  # 1 target epoch, 0.5 source epochs at 4
    assert budgets.stage_steps(by_epochs, info, 4, 2, None) == [5, 3]  # global batch 8: ceil(20 / 8) = 3
    assert budgets.stage_steps(by_epochs, info, 4, 1, 6) == [4, 2]  # --max-steps scales proportionally
    assert budgets.scale_budget([1000, 1], 5) == [4, 1]  # a short stage keeps one step
    with pytest.raises(budgets.BudgetError, match="no step for some"):
        budgets.scale_budget([3, 2], 1)
    mixed = (shares[0], by_epochs[1])
    with pytest.raises(budgets.BudgetError, match="mix shares"):
        budgets.stage_steps(mixed, info, 4, 1, 10)
    with pytest.raises(ValueError, match="exactly one"):
        contract.Budget(share=0.5, steps=3)


def test_epoch_counters_follow_each_split(probe_root):
    runner = loop.TrialRunner(
        dataclasses.replace(_spec(probe_root, None, budget="epochs"), task="probe-weak"), loop.LocalSession()
    )
    trial = runner.trial
    assert trial.budgets == [10, 6]  # 1 target epoch (40 / 4), 0.5 source epochs of 48 rows (ceil 6)
    assert loop.epochs_consumed(trial, 12) == (1, 1) and loop.epochs_consumed(trial, 9) == (0, 0)


# ---------------------------------------------------------------------------------------------------- 5. collectives


def _worker(rank: int, root: str, init: str, out: str, reduce_state: bool, store_root: str) -> None:
    install()
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    torch.set_num_threads(1)

    class Session(loop.LocalSession):
        pass

    session = Session()
    session.rank, session.world_size = rank, 2
    spec = dataclasses.replace(_spec(root, store_root, reduce_state=reduce_state), seed=0)
    runner = loop.TrialRunner(spec, session)
    runner.run()
    torch.save(
        {
            "lam": runner.state["lam"],
            "misalignment": runner.state["misalignment"],
            "aligned": runner.state["aligned_steps"],
            "rows": runner.state["pass_rows"],
            "collected": runner.state["collected"],
        },
        f"{out}.{rank}",
    )
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip gloo's teardown (see test_distributed.py)


@pytest.mark.parametrize("reduce_state", [True, False])
def test_state_reduced_in_the_step_stays_identical_across_workers(probe_root, tmp_path, reduce_state, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    out = str(tmp_path / "result")
    mp.start_processes(
        _worker,
        args=(probe_root, str(tmp_path / "init"), out, reduce_state, str(tmp_path / "store")),
        nprocs=2,
        start_method="spawn",
    )
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    # the store: each rank computed its half of the target set, both read every row of it, exactly aligned
    assert [r["collected"] for r in ranks] == [24, 16] and all(r["rows"] == 40 for r in ranks)
    assert all(r["misalignment"] == 0.0 and r["aligned"] == 3 for r in ranks)
    parts = sorted(os.listdir(tmp_path / "store" / store.versions(str(tmp_path / "store"))[0]))
    assert "image.rank-0.bin" in parts and "image.rank-1.bin" in parts
    if reduce_state:
        assert torch.equal(ranks[0]["lam"], ranks[1]["lam"])
    else:  # the control: each rank's own loss moves its own copy
        assert not torch.equal(ranks[0]["lam"], ranks[1]["lam"])


# ---------------------------------------------------------------------------------------------------- 6. weak source


def test_source_rows_with_image_labels_only_stream_with_every_pixel_ignored(probe_root):
    runner = loop.TrialRunner(
        dataclasses.replace(_spec(probe_root, None, store_images=False), task="probe-weak"), loop.LocalSession()
    )
    feed = loop.DataFeed(runner.trial, runner.trial.stages[0], runner.progress)
    weak = pixel = 0
    for _ in range(12):  # one source epoch of 48 rows
        batch = feed.next_batch(None, {})
        for k, index in enumerate(batch.source_index.tolist()):
            labels, present = batch.source_label[k], batch.source_image_label[k]
            if index >= 40:  # rows of the image-labelled split come after the pixel-labelled one
                weak += 1
                assert bool((labels == IGNORE_INDEX).all()) and present.sum() >= 1
            else:  # a pixel-labelled row's image labels are the classes of its (whole, unaugmented) mask
                pixel += 1
                assert set(labels[labels != IGNORE_INDEX].unique().tolist()) <= set(
                    torch.nonzero(present)[:, 0].tolist()
                )
    assert weak == 8 and pixel == 40
    assert batch.target_image_label is None  # the task has none on target


# ---------------------------------------------------------------------------------------------------- 7. samples, logs


def test_samples_get_source_images_and_mlflow_gets_one_point_per_key_and_step(probe_root, tmp_path):
    logger = RecordingLogger()
    spec = dataclasses.replace(_spec(probe_root, str(tmp_path / "s"), store_images=False), eval_every=2)
    runner = loop.TrialRunner(dataclasses.replace(spec, log_every=2), loop.LocalSession(), logger)
    runner.run()
    duplicates = [point for point, count in Counter(logger.points).items() if count > 1]
    assert not duplicates
    assert ("train/loss", 2) in logger.points and ("train/loss", 3) in logger.points  # stage "a" ends at step 3
    assert logger.images[2] == {"target": (4, 3, *SIZE), "source": (4, 3, *SIZE)}
    first = runner.evaluator.sample_images().source[0]
    row = decode_row(_rows(row_groups(split_files(probe_root, "probe-source", "train"))[0])[0], 3)
    assert torch.equal(first, row["image"].float() / 255)  # unaugmented, in [0, 1]


# ---------------------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_steps_and_predict_run_under_the_trials_precision(probe_root, tmp_path, precision):
    """--precision: every step under torch.autocast, `ctx.full_precision()` blocks in float32, fp16 through the
    platform's gradient scaler (`ctx.backward`, `ctx.step`), predictions scored in float32."""
    seen = {}

    def step(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
        net, optimizer = ctx.modules["net"], ctx.optimizers["net"]
        logits = net(batch.source_image)
        with ctx.full_precision():
            exact = net(batch.source_image.float())
            loss = F.cross_entropy(logits.float(), batch.source_label, ignore_index=IGNORE_INDEX)
        seen.setdefault("dtypes", (logits.dtype, exact.dtype, loss.dtype))
        optimizer.zero_grad()
        ctx.backward(loss)
        seen.setdefault("scale", None if ctx.scaler is None else ctx.scaler.get_scale())
        ctx.step("net")
        return {"loss": loss.detach()}

    spec = dataclasses.replace(_spec(probe_root, str(tmp_path / "p"), store_images=False), precision=precision)
    runner = loop.TrialRunner(spec, loop.LocalSession())
    runner.stages = tuple(dataclasses.replace(stage, step=step) for stage in runner.stages)
    final = runner.run()
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    assert seen["dtypes"] == (half, torch.float32, torch.float32)
    assert (seen["scale"] is None) == (precision == "bf16")  # fp16's loss scale, from the platform's scaler
    assert 0 <= final["val_target/miou"] <= 100 and torch.isfinite(torch.tensor(final["train/loss"]))


def test_a_batch_moves_with_its_augmentations_and_extras():
    augmentation = contract.Augmentation(
        size=torch.tensor([[8, 8]]), scale=torch.ones(1), crop=torch.tensor([[0, 0, 4, 4]]), flip=torch.tensor([True])
    )
    batch = Batch(
        source_image=torch.zeros(1, 3, 4, 4),
        source_label=torch.zeros(1, 4, 4, dtype=torch.long),
        target_image=torch.ones(1, 3, 4, 4),
        source_augmentation=augmentation,
        target_augmentation=augmentation,
        target_extras=MappingProxyType({"map": torch.full((1, 4, 4), 7, dtype=torch.int16)}),
    )
    moved = batch.to(torch.device("cpu"))
    assert torch.equal(moved.target_augmentation.crop, augmentation.crop) and moved.target_augmentation.flip.item()
    assert moved.target_extras["map"].dtype == torch.int16 and int(moved.target_extras["map"][0, 0, 0]) == 7
    assert moved.source_index is None and torch.equal(moved.target_image, batch.target_image)


def _store_versions(root, *steps):
    specs = {"m": SampleMap(torch.uint8)}
    for step in steps:
        version = store.version_name(step, 0)
        writer = store.StoreWriter(root, version, specs, rank=0)
        writer.add("m", torch.tensor([0]), torch.zeros(1, 2, 2, dtype=torch.uint8))
        writer.close()
        store.mark_complete(root, version, specs, world_size=1)
    return [store.version_name(step, 0) for step in steps]


@pytest.mark.parametrize("kept", [2, None])
def test_store_versions_live_as_long_as_a_kept_checkpoint_names_them(tmp_path, kept):
    root = str(tmp_path / "store")
    trial = types.SimpleNamespace(spec=types.SimpleNamespace(checkpoints_kept=kept), rank=0)
    passes = loop.TargetPasses(trial, root)
    (v80,) = _store_versions(root, 80)
    passes.checkpointed(v80)  # the checkpoint at step 100 names pass 80
    v120, v140, v160 = _store_versions(root, 120, 140, 160)  # three passes before the next evaluation
    assert store.versions(root) == [v80, v120, v140, v160]  # a pass alone deletes nothing: step 100 still needs v80
    passes.extras = store.SampleStore(root, v160, {"m": SampleMap(torch.uint8)})
    passes.checkpointed(v160)  # the checkpoint at step 180: Ray keeps it and the one at 100
    assert store.versions(root) == ([v80, v160] if kept else [v80, v120, v140, v160])
    passes.checkpointed(v160)  # the one at 200: the checkpoint at 100 is gone, and v80 with it
    assert store.versions(root) == ([v160] if kept else [v80, v120, v140, v160])
    restored = loop.TargetPasses(trial, root)  # a restart from the checkpoint at 200, which a killed attempt outlived
    (v220,) = _store_versions(root, 220)
    restored.checkpointed(v160, prune=False)
    restored.extras = None
    restored.checkpointed(v160)  # the first checkpoint after the restart: the killed attempt's v220 goes
    assert store.versions(root) == ([v160] if kept else [v80, v120, v140, v160, v220])


def _finite_worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    losses = {"loss": torch.tensor(float("nan") if rank == 1 else 1.0)}
    message = "no error"
    try:
        loop.Reporter.check_finite(None, losses, types.SimpleNamespace(name="s"), 7)
    except loop.NonFiniteLossError as error:
        message = str(error)
    with open(f"{out}.{rank}", "w") as handle:
        handle.write(message)
    dist.barrier()  # both reach it: neither is left waiting in a collective the other skipped
    dist.destroy_process_group()
    os._exit(0)


def test_a_non_finite_loss_on_one_worker_stops_every_worker_at_the_same_step(tmp_path):
    out = str(tmp_path / "result")
    mp.start_processes(_finite_worker, args=(str(tmp_path / "init"), out), nprocs=2, start_method="spawn")
    messages = [open(f"{out}.{rank}").read() for rank in range(2)]
    assert messages[1] == "train/loss became nan at step 7 (stage 's'); the trial stops here"
    assert messages[0] == "a loss of another worker became non-finite at step 7; the trial stops"
