import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from bigmodel.models import registry
from bigmodel.models.resnet import (BasicBlock, Bottleneck, ResNet, ResNetConfig, conv_side,
                                    init_weights, preset)


def tiny(seed: int = 0, **kw) -> ResNet:
    torch.manual_seed(seed)
    cfg = {"n_classes": 4, "layers": [1, 1], "width": 8, "stem": "small", "image_size": 8, **kw}
    return ResNet(ResNetConfig(**cfg))


def perturb_bn(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial BN affine parameters and running stats (zero-init makes branches vanish)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.5 * torch.rand(m.running_var.shape, generator=g))


@pytest.mark.parametrize("name, published", [
    ("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)])
def test_preset_parameter_counts_equal_torchvision(name, published):
    assert ResNet(preset(name, n_classes=1000)).num_params() == published


@pytest.mark.parametrize("name, gmacs", [("resnet18", 1.82), ("resnet50", 4.09)])
def test_forward_macs_at_224_match_published_figures(name, gmacs):
    model = ResNet(preset(name, n_classes=1000))
    macs = model.flops_per_image() / 3 / 2
    assert macs == pytest.approx(gmacs * 1e9, rel=0.03)


@pytest.mark.parametrize("block, stem", [("basic", "imagenet"), ("bottleneck", "small"),
                                         ("bottleneck", "imagenet")])
def test_analytic_flops_equal_macs_counted_on_a_real_forward_at_an_odd_size(block, stem):
    model = tiny(block=block, stem=stem, layers=[1, 2, 1], image_size=37).eval()
    macs = []

    def count(m, inputs, out):
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            macs.append(out[0].numel() * m.in_channels // m.groups * k)
        else:
            macs.append(m.in_features * m.out_features)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(count)
    with torch.no_grad():
        model(torch.rand(1, 3, 37, 37))
    assert model.flops_per_image() == 6 * sum(macs)


@pytest.mark.parametrize("n_stages", [1, 2, 3, 4])
def test_small_stem_keeps_the_side_and_each_later_stage_halves_it(n_stages):
    model = tiny(layers=[1] * n_stages, width=4, n_classes=5).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        maps, feats, logits = model.feature_maps(x), model.features(x), model(x)
    side = 32 // 2 ** (n_stages - 1)
    assert maps.shape == (2, 4 * 2 ** (n_stages - 1), side, side) == (2, model.out_channels,
                                                                     side, side)
    assert feats.shape == (2, model.out_channels)
    assert logits.shape == (2, 5)
    assert torch.allclose(model.fc(feats), logits, atol=1e-6)  # one code path, no dropout


def test_imagenet_stem_divides_the_side_by_4_and_bottleneck_widens_by_4():
    model = tiny(block="bottleneck", stem="imagenet", layers=[1, 1, 1, 1], width=4).eval()
    with torch.no_grad():
        maps = model.feature_maps(torch.rand(3, 3, 64, 64))
        logits = model(torch.rand(3, 3, 64, 64))
    assert maps.shape == (3, 4 * 8 * 4, 2, 2)
    assert model.out_channels == 128
    assert logits.shape == (3, 4)


def test_one_channel_images_work():
    model = tiny(in_channels=1, layers=[1, 1, 1], width=8).eval()
    assert model.mean.shape == model.std.shape == (1, 1, 1, 1)
    with torch.no_grad():
        maps = model.feature_maps(torch.rand(2, 1, 8, 8))
        logits = model(torch.rand(2, 1, 8, 8))
    assert maps.shape == (2, 32, 2, 2)
    assert logits.shape == (2, 4)


@pytest.mark.parametrize("block, c_in, planes, stride", [
    (BasicBlock, 8, 8, 1), (BasicBlock, 8, 16, 2), (Bottleneck, 8, 4, 1), (Bottleneck, 16, 8, 2)])
def test_every_block_starts_as_relu_of_its_shortcut(block, c_in, planes, stride):
    torch.manual_seed(0)
    b = block(c_in, planes, stride)
    init_weights(b)
    b.eval()
    x = torch.randn(2, c_in, 8, 8)
    with torch.no_grad():
        branch, out, short = b.branch(x), b(x), b.shortcut(x)
    assert not torch.equal(short, torch.zeros_like(short))
    assert torch.count_nonzero(branch) == 0
    assert torch.equal(out, F.relu(short))
    assert isinstance(b.shortcut, nn.Identity) == (stride == 1 and c_in == planes * b.expansion)


def test_blocks_inside_a_model_have_their_last_bn_zeroed_and_others_at_one():
    model = tiny(block="bottleneck", layers=[2, 1])
    for stage in model.stages:
        for b in stage:
            assert torch.count_nonzero(b.last_bn().weight) == 0
            assert torch.all(b.bn1.weight == 1) and torch.all(b.bn2.weight == 1)
            if not isinstance(b.shortcut, nn.Identity):
                assert torch.all(b.shortcut[1].weight == 1)


def test_forward_normalises_with_the_config_mean_and_std():
    mean, std = [0.2, 0.4, 0.6], [0.1, 0.2, 0.3]
    a = tiny(mean=mean, std=std)
    b = tiny(seed=5, mean=[0.0] * 3, std=[1.0] * 3)
    perturb_bn(a)
    b.load_state_dict(a.state_dict())  # mean/std are not in the state dict
    a.eval(), b.eval()
    x = torch.rand(2, 3, 8, 8)
    pre = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(a(x), b(pre), atol=1e-5)
        assert not torch.allclose(a(x), b(x), atol=1e-3)


def test_default_mean_and_std_are_one_half_per_channel():
    cfg = ResNetConfig(in_channels=2)
    assert cfg.mean == [0.5, 0.5] and cfg.std == [0.5, 0.5]
    ints = tiny(mean=[0, 0, 0], std=[1, 1, 1])  # as JSON may give them back
    assert ints.mean.dtype == ints.std.dtype == torch.float32


def test_reset_head_changes_the_output_width_and_keeps_the_backbone():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    model.reset_head(7)
    assert model.cfg.n_classes == 7 and model.fc.out_features == 7
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, 8, 8)).shape == (2, 7)


def test_frozen_backbone_train_step_moves_only_the_classifier():
    model = tiny(dropout=0.1)
    model.freeze_backbone()
    model.train()
    assert model.frozen and model.drop.training
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 4, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():  # weights, BN running stats and num_batches_tracked
        assert torch.equal(v, after[k]) != k.startswith("fc."), k
    assert {id(p) for p in model.head_parameters()} == {id(model.fc.weight), id(model.fc.bias)}
    assert all(not p.requires_grad for p in model.backbone_parameters())

    model.freeze_backbone(False)
    assert not model.frozen
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_backbone_and_head_parameters_partition_the_model():
    model = tiny()
    back, head = list(model.backbone_parameters()), list(model.head_parameters())
    assert len(back) + len(head) == len(list(model.parameters()))
    assert sum(p.numel() for p in back + head) == model.num_params()


def test_registry_round_trip_gives_identical_logits(tmp_path):
    model = tiny(block="bottleneck", mean=[0.3, 0.4, 0.5], std=[0.2, 0.25, 0.3], dropout=0.2)
    perturb_bn(model)
    registry.save(model, tmp_path, "resnet", "image_cls", model.cfg)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "mean" not in f.keys() and "std" not in f.keys()
    loaded, info = registry.load_backbone(tmp_path)
    assert isinstance(loaded, ResNet) and info["task"] == "image_cls"
    assert loaded.cfg == model.cfg
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.eval()(x))


@pytest.mark.parametrize("kw, name", [
    ({"block": "wide"}, "block"), ({"stem": "cifar"}, "stem"), ({"layers": []}, "layers"),
    ({"layers": [2, 0]}, "layers"), ({"mean": [0.5]}, "mean"), ({"std": [0.5, 0.5]}, "std"),
    ({"std": [0.5, 0.0, 0.5]}, "std"), ({"n_classes": 0}, "n_classes"), ({"width": 0}, "width"),
    ({"in_channels": 1, "mean": [0.5] * 3}, "mean"), ({"dropout": 1.0}, "dropout")])
def test_bad_config_values_raise_naming_the_field(kw, name):
    with pytest.raises(ValueError, match=rf"ResNetConfig\.{name} "):
        ResNetConfig(**kw)


def test_unknown_preset_raises_listing_the_known_ones():
    with pytest.raises(ValueError, match="resnet99.*resnet18, resnet34, resnet50"):
        preset("resnet99")


def test_preset_overrides_apply_and_do_not_alias_the_table():
    a = preset("resnet18", stem="small", n_classes=100)
    a.layers.append(9)
    b = preset("resnet18")
    assert (a.stem, a.n_classes, b.layers) == ("small", 100, [2, 2, 2, 2])


def test_conv_side_matches_pytorch_for_strides_and_paddings():
    for conv in [nn.Conv2d(1, 1, 7, 2, 3), nn.Conv2d(1, 1, 3, 2, 1), nn.MaxPool2d(3, 2, 1),
                 nn.Conv2d(1, 1, 1, 2)]:
        for side in (7, 8, 37):
            assert conv(torch.zeros(1, 1, side, side)).shape[-1] == conv_side(side, conv)


def test_training_overfits_a_fixed_batch():
    model = tiny(layers=[1, 1], width=8).train()
    torch.manual_seed(1)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
