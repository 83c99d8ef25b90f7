"""Data parallelism: N workers at batch B/N train like one worker at batch B (the DDP-equivalence test).

Two real processes joined by torch.distributed over gloo (what Ray Train sets up for CPU workers) run a method's
own stage step with the platform's synchronisation (platform/distributed.py: rank 0's initial weights broadcast,
gradients of every optimiser averaged before its step); one process runs the same steps on the whole batch. Data is
deterministic and has no ignored pixels, so that the mean loss over the whole batch equals the mean of the two halves'
losses; batch norm is frozen (per-worker batch statistics are a documented difference, see docs/architecture.md).

Stated tolerance, over the first four steps: losses agree to 1e-4 relative, parameters to 5e-5 absolute + 1e-4
relative (float32; the only difference is the order of the gradient sums, but Adam's normalised update turns that
noise on near-zero gradients into steps of up to its learning rate: 1.6e-5 measured on the discriminator). Without
the synchronisation the same workers differ by more than ten times that (the control test).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import methods
from methods.contract import Batch, StepContext
from platform import distributed, tasks

STEPS, BATCH = 4, 4
PARAMETER_ATOL, PARAMETER_RTOL = 5e-5, 1e-4
SYNTHETIC = {"architecture": "tiny", "freeze_batchnorm": True, "learning_rate": 0.1}  # large: steps must move things


def _data(info, steps: int, batch: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    return [
        Batch(
            source_image=torch.rand(batch, 3, 32, 48, generator=generator),
            source_label=torch.randint(0, info.num_classes, (batch, 32, 48), generator=generator),
            target_image=torch.rand(batch, 3, 32, 48, generator=generator),
        )
        for _ in range(steps)
    ]


def _train(rank: int, world_size: int, method_name: str, init_file: str, out: str, sync: bool = True) -> None:
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # different initial weights per rank: the broadcast must make them equal
    method = methods.get(method_name)
    hp = methods.make_hyperparams(method, {**SYNTHETIC, "batch_size": BATCH // world_size})
    info = tasks.get("synthetic-urban").info
    modules = method.build(hp, info)
    distributed.broadcast_parameters(modules)
    stage = method.stages(hp)[0]
    for name, module in modules.items():
        module.train(name in stage.trains)
        module.requires_grad_(name in stage.trains)
    optims = dict(stage.optimizers(hp, modules, STEPS))
    if sync:
        distributed.synchronise_gradients(optims.values())
    ctx = StepContext(
        hp=hp,
        info=info,
        modules=modules,
        optimizers={n: o.optimizer for n, o in optims.items()},
        state=method.init_state(hp, info),
        stage=stage.name,
        stage_step=0,
        stage_steps=STEPS,
        target_epoch=0,
        generator=torch.Generator().manual_seed(rank),
        device=torch.device("cpu"),
    )
    share = BATCH // world_size
    losses = []
    for step, batch in enumerate(_data(info, STEPS, BATCH)):
        ctx.stage_step = step
        mine = Batch(
            *(
                t[rank * share : (rank + 1) * share]
                for t in (batch.source_image, batch.source_label, batch.target_image)
            )
        )
        values = stage.step(ctx, mine)
        for optim in optims.values():
            if optim.scheduler is not None:
                optim.scheduler.step()
        names = sorted(values)
        local = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
        losses.append(dict(zip(names, (distributed.all_reduce_sum(local) / world_size).tolist())))
    if rank == 0:
        torch.save(
            {"losses": losses, "parameters": {k: v.detach().clone() for k, v in modules.state_dict().items()}}, out
        )
    if world_size > 1:
        dist.barrier()  # no rank tears gloo down while another still talks to it (seen: SIGABRT at exit in CI)
        dist.destroy_process_group()
        # The work is done and saved. Skip the interpreter's teardown: a rank has still died there now and then with
        # SIGABRT ("terminate called without an active exception": a C++ thread destroyed while joinable, in torch's
        # or gloo's static destructors), which made the spawn fail after a successful run.
        os._exit(0)


def _run(tmp_path, method_name: str, world_size: int, sync: bool = True) -> dict:
    out = str(tmp_path / f"{method_name}-{world_size}-{sync}.pt")
    if world_size == 1:
        _train(0, 1, method_name, "", out)
    else:
        mp.start_processes(
            _train,
            args=(world_size, method_name, str(tmp_path / f"init-{method_name}-{sync}"), out, sync),
            nprocs=world_size,
            start_method="spawn",
        )
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("method_name", ["source_only", "adaptsegnet"])
def test_two_workers_at_half_batch_train_like_one_worker_at_the_whole_batch(tmp_path, method_name, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    single, pair = _run(tmp_path, method_name, 1), _run(tmp_path, method_name, 2)
    assert len(single["losses"]) == len(pair["losses"]) == STEPS
    for step, (one, two) in enumerate(zip(single["losses"], pair["losses"])):
        assert one.keys() == two.keys()
        for name in one:
            assert two[name] == pytest.approx(one[name], rel=1e-4, abs=1e-6), f"{name} at step {step + 1}"
    trained = [k for k in single["parameters"] if single["parameters"][k].is_floating_point()]
    moved = [k for k in trained if not torch.equal(single["parameters"][k], _initial(method_name)[k])]
    assert moved, "the steps changed no parameter: the comparison would be vacuous"
    for key in trained:
        torch.testing.assert_close(
            pair["parameters"][key],
            single["parameters"][key],
            rtol=PARAMETER_RTOL,
            atol=PARAMETER_ATOL,
            msg=lambda m, key=key: f"{key}: {m}",
        )


def _initial(method_name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    method = methods.get(method_name)
    hp = methods.make_hyperparams(method, {**SYNTHETIC, "batch_size": BATCH})
    return method.build(hp, tasks.get("synthetic-urban").info).state_dict()


def test_workers_without_synchronisation_drift_apart(tmp_path, monkeypatch):
    """The control: the same two workers without gradient averaging do not match one worker, so the test above
    measures the synchronisation, not a coincidence of the data."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    single, unsynchronised = _run(tmp_path, "source_only", 1), _run(tmp_path, "source_only", 2, sync=False)
    assert unsynchronised["losses"][0] == pytest.approx(single["losses"][0], rel=1e-4)  # same start
    gaps = [
        (unsynchronised["parameters"][k] - v).abs().max().item()
        for k, v in single["parameters"].items()
        if v.is_floating_point()
    ]
    assert max(gaps) > 10 * PARAMETER_ATOL


@pytest.mark.parametrize("freeze", [False, True])
def test_sync_batchnorm_converts_trained_batch_norms_only_and_keeps_their_state(freeze):
    method = methods.get("source_only")
    hp = methods.make_hyperparams(method, {**SYNTHETIC, "freeze_batchnorm": freeze})
    modules = method.build(hp, tasks.get("synthetic-urban").info)
    before = {k: v.clone() for k, v in modules.state_dict().items()}
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in modules.modules())
    distributed.sync_batchnorm(modules)
    synced = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in modules.modules())
    assert norms > 0 and synced == (0 if freeze else norms)
    assert all(torch.equal(before[k], v) for k, v in modules.state_dict().items())
    if freeze:  # frozen batch norm stays in eval mode whatever train() says
        modules.train()
        assert not any(m.training for m in modules.modules() if isinstance(m, torch.nn.BatchNorm2d))
