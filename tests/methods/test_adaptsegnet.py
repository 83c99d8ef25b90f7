import copy
import math

import pytest
import torch

from methods import adaptsegnet
from methods.contract import Batch, StepContext, TaskInfo

INFO = TaskInfo(num_classes=3, in_channels=3, class_names=("a", "b", "c"))


def test_losses_by_hand():
    # source = label 0 in the reference code: BCE-with-logits against 0 is softplus(x)
    d_target = torch.tensor([[[[0.0, 1.0]]]])
    assert adaptsegnet.adversarial_loss(d_target).item() == pytest.approx(
        (math.log(2) + math.log(1 + math.exp(1))) / 2, rel=1e-6
    )
    d_source = torch.tensor([[[[2.0]]]])
    d_target = torch.tensor([[[[-1.0]]]])
    expected = 0.5 * (math.log(1 + math.exp(2.0)) + math.log(1 + math.exp(1.0)))  # softplus(2) + softplus(-(-1))
    assert adaptsegnet.discriminator_loss(d_source, d_target).item() == pytest.approx(expected, rel=1e-6)


def test_output_map_is_a_softmax_at_image_size():
    maps = adaptsegnet.output_map(torch.randn(2, 3, 4, 8), (16, 32))
    assert maps.shape == (2, 3, 16, 32)
    assert torch.allclose(maps.sum(1), torch.ones(2, 16, 32))


def _context(hp, modules):
    optims = adaptsegnet.optimizers(hp, modules, 10)
    return StepContext(
        hp=hp,
        info=INFO,
        modules=modules,
        optimizers={n: o.optimizer for n, o in optims.items()},
        state={},
        stage="adapt",
        stage_step=0,
        stage_steps=10,
        target_epoch=0,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
    )


def test_discriminator_update_comes_from_its_own_loss_only():
    torch.manual_seed(0)
    hp = adaptsegnet.Hyperparams(
        architecture="tiny", freeze_batchnorm=False, learning_rate=0.01, batch_size=2, lambda_adv=10.0
    )  # a large λ_adv: any leak of L_adv into D's step would show
    modules = adaptsegnet.build(hp, INFO)
    reference = copy.deepcopy(modules)
    batch = Batch(
        source_image=torch.rand(2, 3, 64, 64),
        source_label=torch.randint(0, 3, (2, 64, 64)),
        target_image=torch.rand(2, 3, 64, 64),
    )
    modules.train()
    reference.train()
    losses = adaptsegnet.train_step(_context(hp, modules), batch)
    assert set(losses) == {"loss_seg_source", "loss_adv_target", "loss_d"}

    # Reference D step: L_D on the outputs of the segmenter as it was before its own update.
    ref_opt = _context(hp, reference).optimizers["discriminator"]
    from methods.shared.segmenter import imagenet_normalise

    with torch.no_grad():
        source = reference["segmenter"](imagenet_normalise(batch.source_image))
        target = reference["segmenter"](imagenet_normalise(batch.target_image))
    d = reference["discriminator"]
    loss_d = adaptsegnet.discriminator_loss(
        d(adaptsegnet.output_map(source, (64, 64))), d(adaptsegnet.output_map(target, (64, 64)))
    )
    ref_opt.zero_grad()
    loss_d.backward()
    ref_opt.step()
    assert loss_d.item() == pytest.approx(losses["loss_d"].item(), rel=1e-5)
    for (name, ours), theirs in zip(
        modules["discriminator"].named_parameters(), reference["discriminator"].parameters()
    ):
        assert torch.allclose(ours, theirs, atol=1e-7), name
    assert not torch.equal(modules["segmenter"].classifier.weight, reference["segmenter"].classifier.weight)
