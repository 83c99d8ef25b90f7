"""The shared building blocks: shapes, published parameter counts, torchvision compatibility, gradients everywhere."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from torch import nn

from methods.contract import TaskInfo
from methods.shared import backbones, discriminators, gan, optim
from methods.shared.backbones import VGG16, WeightsMismatchError, count_parameters, load_pretrained, resnet50, resnet101
from methods.shared.segmenter import ARCHITECTURES, DeepLabV2ASPP, Features, ImageClassifier, build_segmenter

FIXTURE = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "torchvision_state_dicts.json")))
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
INFO = TaskInfo(num_classes=5, in_channels=3, class_names=tuple("abcde"))


def _shapes(module: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "name, build",
    [
        ("resnet50", lambda: resnet50(num_classes=1000)),
        ("resnet101", lambda: resnet101(num_classes=1000)),
        ("vgg16", lambda: VGG16(num_classes=1000)),
    ],
)
def test_backbones_match_torchvision_names_shapes_and_counts(name, build):
    model = build()
    published = {"resnet50": 25_557_032, "resnet101": 44_549_160, "vgg16": 138_357_544}[name]
    assert count_parameters(model) == published == FIXTURE["models"][name]["parameters"]
    assert _shapes(model) == FIXTURE["models"][name]["state_dict"]  # recorded from torchvision 0.29.1


@pytest.mark.skipif(
    not HAS_TORCHVISION,
    reason="torchvision cannot be installed beside the CPU torch wheel here; the key/shape fixture test covers CI",
)
def test_state_dicts_load_both_ways_with_torchvision(tmp_path):
    import torchvision

    for name, ours in (("resnet50", resnet50(num_classes=1000)), ("vgg16", VGG16(num_classes=1000))):
        theirs = getattr(torchvision.models, name)(weights=None)
        torch.save(theirs.state_dict(), tmp_path / "theirs.pth")
        load_pretrained(ours, str(tmp_path / "theirs.pth"))
        theirs.load_state_dict(ours.state_dict(), strict=True)
        x = torch.rand(1, 3, 64, 64)
        assert torch.equal(ours.eval()(x), theirs.eval()(x))


def test_a_saved_state_dict_loads_back_by_path_and_the_encoder_ignores_only_the_classifier(tmp_path):
    source = resnet50(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "imagenet.pth")
    encoder = resnet50(output_stride=8)
    load_pretrained(encoder, str(tmp_path / "imagenet.pth"), ignore_prefixes=("fc.",))
    assert torch.equal(encoder.layer4[2].conv3.weight, source.layer4[2].conv3.weight)
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, tmp_path / "wrapped.pth")
    load_pretrained(resnet50(num_classes=1000), str(tmp_path / "wrapped.pth"))  # DataParallel / Lightning wrappers


def test_a_wrong_weights_file_names_the_keys(tmp_path):
    torch.save(resnet50(num_classes=1000).state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(WeightsMismatchError, match=r"missing keys: layer3\.6\.conv1\.weight"):
        load_pretrained(resnet101(), str(tmp_path / "resnet50.pth"), ignore_prefixes=("fc.",))
    torch.save(VGG16(num_classes=1000).state_dict(), tmp_path / "vgg.pth")
    with pytest.raises(WeightsMismatchError, match=r"unexpected keys: features\.0\.weight"):
        load_pretrained(resnet50(), str(tmp_path / "vgg.pth"))
    state = resnet50(num_classes=1000).state_dict()
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    torch.save(state, tmp_path / "grey.pth")
    with pytest.raises(
        WeightsMismatchError, match=r"shape mismatches: conv1\.weight \(64, 1, 7, 7\) vs \(64, 3, 7, 7\)"
    ):
        load_pretrained(resnet50(num_classes=1000), str(tmp_path / "grey.pth"))
    with pytest.raises(FileNotFoundError, match="backbone weights file not found"):
        load_pretrained(resnet50(), str(tmp_path / "nope.pth"))


def test_fcn8s_takes_vgg_imagenet_weights_with_fc6_fc7_as_convolutions(tmp_path):
    vgg = VGG16(num_classes=1000)
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    segmenter = build_segmenter("fcn8s_vgg16", INFO, backbone_weights=str(tmp_path / "vgg16.pth"))
    assert torch.equal(segmenter.encoder.fc6.weight.flatten(1), vgg.classifier[0].weight)
    assert torch.equal(segmenter.encoder.features[28].weight, vgg.features[28].weight)


@pytest.mark.parametrize("stride, size", [(8, 8), (16, 4), (32, 2)])
def test_output_stride_by_dilation(stride, size):
    assert resnet50(output_stride=stride).eval()(torch.rand(1, 3, 64, 64)).shape == (1, 2048, size, size)


def test_frozen_batchnorm_keeps_statistics_and_affine_parameters():
    model = backbones.freeze_batchnorm(resnet50(output_stride=8))
    model.train()
    bn = model.layer1[0].bn1
    before = (bn.running_mean.clone(), bn.weight.clone())
    model(torch.rand(2, 3, 32, 32) * 10).sum().backward()
    assert not bn.training and torch.equal(bn.running_mean, before[0])
    assert bn.weight.grad is None and model.layer1[0].conv1.weight.grad is not None


def test_deeplabv2_aspp_sums_four_dilated_branches():
    head = DeepLabV2ASPP(8, 3)
    features = Features(torch.rand(1, 8, 30, 30))
    expected = sum(branch(features.main) for branch in head.branches)
    assert len(head.branches) == 4 and [b.dilation[0] for b in head.branches] == [6, 12, 18, 24]
    assert torch.allclose(head(features), expected)
    two = DeepLabV2ASPP(8, 3, first_two_branches=True)
    two.load_state_dict(head.state_dict())
    assert torch.allclose(two(features), head.branches[0](features.main) + head.branches[1](features.main))
    assert not ARCHITECTURES["deeplabv2_resnet101"](INFO, freeze_bn=False).classifier.first_two_branches


def test_every_architecture_shapes_and_gradients_reach_every_parameter():
    for name in ARCHITECTURES:
        info = TaskInfo(3, 1, ("bg", "left lung", "right lung")) if name == "seuda_resnet101" else INFO
        segmenter = build_segmenter(name, info, freeze_bn=False)
        images = torch.rand(2, info.in_channels, 64, 96)
        features = segmenter.encode(images)
        logits = segmenter.classify(features)
        assert features.main.shape[1] == segmenter.feature_channels, name
        assert logits.shape[:2] == (2, info.num_classes), name
        assert logits.shape[-2:] == (64 // segmenter.output_stride, 96 // segmenter.output_stride), name
        # a random linear functional: non-zero gradients even where heads start at zero (FCN score layers)
        ((logits * torch.randn_like(logits)).sum() + features.main.mean()).backward()
        dead = [n for n, p in segmenter.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        # the widely copied early-return ASPP leaves its last two branches untrained: that is the bug it reproduces
        expected = (
            [f"classifier.branches.{i}.{p}" for i in (2, 3) for p in ("weight", "bias")]
            if name.endswith("aspp_first_two")
            else []
        )
        assert dead == expected, (name, dead[:5])


def test_grey_images_feed_imagenet_backbones_and_seuda_widths():
    segmenter = build_segmenter("deeplabv2_resnet101", TaskInfo(3, 1, ("a", "b", "c")))
    assert segmenter(torch.rand(1, 1, 32, 32)).shape == (1, 3, 4, 4)
    seuda = build_segmenter("seuda_resnet101", TaskInfo(3, 1, ("a", "b", "c")))
    widths = [seuda.encoder.conv1.out_channels] + [
        layer[0].conv1.out_channels
        for layer in (seuda.encoder.layer1, seuda.encoder.layer2, seuda.encoder.layer3, seuda.encoder.layer4)
    ]
    assert widths == [32, 32, 64, 128, 256]
    assert [seuda.encoder.layer3[1].conv2.dilation[0], seuda.encoder.layer4[1].conv2.dilation[0]] == [2, 4]


def test_image_classifier_head():
    head = ImageClassifier(16, 2)
    features = Features(torch.rand(3, 16, 5, 7, requires_grad=True))
    out = head(features)
    assert out.shape == (3, 2)
    expected = features.main.mean((2, 3)) @ head.fc.weight.flatten(1).T + head.fc.bias
    assert torch.allclose(out, expected, atol=1e-6)


def test_cyclegan_generator_and_patchgan_counts_shapes_and_size_check():
    generator, patch = gan.ResnetGenerator(), gan.PatchDiscriminator()
    assert count_parameters(generator) == 11_378_179 and count_parameters(patch) == 2_764_737
    small = gan.ResnetGenerator(blocks=6, ngf=8)
    assert small(torch.rand(1, 3, 36, 20) * 2 - 1).shape == (1, 3, 36, 20)
    assert patch(torch.rand(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # 70x70 receptive fields
    with pytest.raises(ValueError, match="sizes divisible by 4 \\(got 30x20\\)"):
        small(torch.rand(1, 3, 30, 20))
    grey = gan.ResnetGenerator(in_channels=1, out_channels=1, ngf=8, blocks=2)
    out = grey(torch.rand(1, 1, 16, 16))
    out.mean().backward()
    assert all(p.grad is not None for p in grey.parameters()) and out.abs().max() <= 1


def test_gan_losses_by_hand():
    prediction = torch.tensor([[0.5, 1.0], [0.0, 2.0]])
    assert gan.lsgan_loss(prediction, True).item() == pytest.approx((0.25 + 0 + 1 + 1) / 4)
    assert gan.lsgan_loss(prediction, False).item() == pytest.approx((0.25 + 1 + 0 + 4) / 4)
    logits = torch.tensor([0.0, 2.0])
    expected_real = (torch.log(torch.tensor(2.0)) + torch.log(1 + torch.exp(torch.tensor(-2.0)))) / 2
    assert gan.vanilla_gan_loss(logits, True).item() == pytest.approx(expected_real.item(), rel=1e-6)
    expected_fake = (torch.log(torch.tensor(2.0)) + torch.log(1 + torch.exp(torch.tensor(2.0)))) / 2
    assert gan.vanilla_gan_loss(logits, False).item() == pytest.approx(expected_fake.item(), rel=1e-6)


def test_image_pool_fills_then_swaps_half_the_time():
    pool = gan.ImagePool(size=3)
    generator = torch.Generator().manual_seed(0)
    first = torch.arange(3.0).view(3, 1, 1, 1)
    assert torch.equal(pool.query(first, generator), first)  # filling: returned as given
    assert len(pool.images) == 3
    returned_old = 0
    for value in range(100, 300):
        out = pool.query(torch.full((1, 1, 1, 1), float(value)), generator)
        returned_old += out.item() != value
        assert len(pool.images) == 3
    assert 70 < returned_old < 130  # a fair coin over 200 queries
    assert torch.equal(gan.ImagePool(0).query(first, generator), first)
    assert all(t.shape == (1, 1, 1, 1) for t in pool.state())


def test_discriminators():
    x = torch.rand(2, 7, 64, 96)
    for build, channels, kernel in (
        (discriminators.output_space_discriminator, [64, 128, 256, 512, 1], 4),
        (discriminators.slrt_discriminator, [16, 32, 64, 64, 1], 3),
        (discriminators.tdtf_feature_discriminator, [16, 32, 64, 64, 1], 4),
    ):
        model = build(7)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == channels
        assert all(c.kernel_size == (kernel, kernel) and c.stride == (2, 2) for c in convs)
        relus = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
        assert len(relus) == 4 and all(r.negative_slope == 0.2 for r in relus)
        out = model(x)
        assert out.shape == (2, 1, 2, 3)
        out.mean().backward()
        assert all(p.grad is not None for p in model.parameters())
    assert discriminators.tdtf_feature_discriminator(7)(x).min() >= 0  # sigmoid output


def test_schedules():
    def rates(make, steps):
        parameter = nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([parameter], lr=1.0)
        schedule = make(optimizer)
        values = []
        for _ in range(steps):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return values

    assert rates(lambda o: optim.exponential_decay(o, 0.7, 3), 7) == pytest.approx([1, 1, 1, 0.7, 0.7, 0.7, 0.49])
    assert rates(lambda o: optim.linear_decay(o, 2, 4), 7) == pytest.approx([1, 1, 1, 0.75, 0.5, 0.25, 0])


def test_head_parameters_train_at_ten_times_the_backbone_rate():
    segmenter = build_segmenter("tiny", INFO)
    sgd = optim.segmenter_sgd(segmenter, 0.01, 0.9, 5e-4, 10.0)
    assert [g["lr"] for g in sgd.param_groups] == [0.01, 0.1]
    assert {id(p) for p in sgd.param_groups[1]["params"]} == {id(p) for p in segmenter.head_parameters()}
