"""Tests for task.models: shapes, exact parameter counts, helpers, determinism, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from task.models import (
    MODEL_CLASSES,
    VGG11,
    LeNet,
    PreActResNet18,
    ResNet18,
    SimpleCNN,
    count_parameters,
    last_conv_layer_name,
    trainable_state_keys,
)

ALL_MODELS = [LeNet, SimpleCNN, ResNet18, PreActResNet18, VGG11]
GENERIC_MODELS = [LeNet, ResNet18, PreActResNet18, VGG11]


def _conv(cin: int, cout: int, k: int, bias: bool = True) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def _fc(fin: int, fout: int) -> int:
    return fin * fout + fout


def test_model_classes_registry() -> None:
    assert MODEL_CLASSES == {
        "lenet": LeNet,
        "simple_cnn": SimpleCNN,
        "resnet18": ResNet18,
        "vgg11": VGG11,
        "preact_resnet18": PreActResNet18,
    }


@pytest.mark.parametrize("cls", GENERIC_MODELS)
@pytest.mark.parametrize(("channels", "size", "classes"), [(1, 28, 10), (3, 32, 7)])
def test_output_shape(cls: type[nn.Module], channels: int, size: int, classes: int) -> None:
    model = cls(in_channels=channels, num_classes=classes, image_size=size)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


def test_simple_cnn_shape_and_rejects_other_inputs() -> None:
    model = SimpleCNN(in_channels=3, num_classes=10, image_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="3x32x32"):
        SimpleCNN(in_channels=1, num_classes=10, image_size=28)
    with pytest.raises(ValueError, match="3x32x32"):
        SimpleCNN(in_channels=3, num_classes=10, image_size=28)
    with pytest.raises(ValueError, match="3x32x32"):
        SimpleCNN(in_channels=1, num_classes=10, image_size=32)


def test_simple_cnn_exact_layers_and_count() -> None:
    model = SimpleCNN(in_channels=3, num_classes=10, image_size=32)
    expected = (
        _conv(3, 6, 5)  # conv1: 456
        + _conv(6, 16, 5)  # conv2: 2416
        + _fc(400, 120)  # fc1: 48120
        + _fc(120, 84)  # fc2: 10164
        + _fc(84, 84)  # l1: 7140
        + _fc(84, 256)  # l2: 21760
        + _fc(256, 10)  # cls: 2570
    )
    assert expected == 92626
    assert count_parameters(model) == expected

    linears = {
        name: (m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    assert linears == {"fc1": (400, 120), "fc2": (120, 84), "l1": (84, 84), "l2": (84, 256), "cls": (256, 10)}
    convs = {
        name: (m.in_channels, m.out_channels, m.kernel_size, m.padding)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }
    assert convs == {"conv1": (3, 6, (5, 5), (0, 0)), "conv2": (6, 16, (5, 5), (0, 0))}


def test_simple_cnn_no_activation_between_l2_and_cls() -> None:
    # The head after l1 is relu -> l2 -> cls with no ReLU on l2's output, as in SDFC.
    torch.manual_seed(0)
    model = SimpleCNN(in_channels=3, num_classes=10, image_size=32)
    captured: dict[str, torch.Tensor] = {}
    model.l1.register_forward_hook(lambda _m, _i, o: captured.setdefault("l1", o))
    out = model(torch.randn(4, 3, 32, 32))
    l2_out = model.l2(torch.relu(captured["l1"]))
    assert (l2_out < 0).any()  # otherwise a ReLU after l2 would go unnoticed
    assert torch.allclose(out, model.cls(l2_out))


def test_lenet_param_count() -> None:
    model = LeNet(in_channels=1, num_classes=10, image_size=28)
    # 28 -(pad 2 conv)-> 28 -pool-> 14 -conv5-> 10 -pool-> 5, so fc1 sees 16*5*5.
    expected = _conv(1, 6, 5) + _conv(6, 16, 5) + _fc(400, 120) + _fc(120, 84) + _fc(84, 10)
    assert expected == 61706
    assert count_parameters(model) == expected
    # 32x32: 32 -> 16 -> 12 -> 6, so fc1 sees 16*6*6.
    model32 = LeNet(in_channels=3, num_classes=10, image_size=32)
    assert model32.fc1.in_features == 16 * 6 * 6


def test_resnet18_param_count() -> None:
    n = count_parameters(ResNet18(in_channels=3, num_classes=10, image_size=32))
    assert 11_000_000 <= n <= 11_300_000


def test_preact_resnet18_param_count() -> None:
    n = count_parameters(PreActResNet18(in_channels=3, num_classes=10, image_size=32))
    assert 11_000_000 <= n <= 11_300_000


def test_vgg11_skips_pool_for_28() -> None:
    pools28 = sum(isinstance(m, nn.MaxPool2d) for m in VGG11(1, 10, 28).modules())
    pools32 = sum(isinstance(m, nn.MaxPool2d) for m in VGG11(3, 10, 32).modules())
    assert (pools28, pools32) == (4, 5)
    assert VGG11(3, 10, 32).classifier.in_features == 512


def test_count_parameters_ignores_frozen() -> None:
    model = LeNet(in_channels=1, num_classes=10, image_size=28)
    model.fc3.weight.requires_grad_(False)
    assert count_parameters(model) == 61706 - 84 * 10


def test_trainable_state_keys_resnet_excludes_buffers() -> None:
    model = ResNet18(in_channels=3, num_classes=10, image_size=32)
    keys = trainable_state_keys(model)
    state_keys = list(model.state_dict())
    assert keys == [k for k in state_keys if k in set(keys)]  # state_dict order kept
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in keys)
    assert "bn1.weight" in keys and "bn1.bias" in keys
    assert "linear.weight" in keys
    assert sum(model.state_dict()[k].numel() for k in keys) == count_parameters(model)
    assert len(keys) < len(state_keys)


def test_trainable_state_keys_lenet_is_all() -> None:
    model = LeNet(in_channels=1, num_classes=10, image_size=28)
    assert trainable_state_keys(model) == list(model.state_dict())


def test_last_conv_layer_name() -> None:
    assert last_conv_layer_name(LeNet(1, 10, 28)) == "conv2"
    assert last_conv_layer_name(SimpleCNN(3, 10, 32)) == "conv2"
    vgg = VGG11(3, 10, 32)
    name = last_conv_layer_name(vgg)
    convs = [n for n, m in vgg.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8
    assert name == convs[-1] == "features.25"
    assert isinstance(vgg.get_submodule(name), nn.Conv2d)
    assert vgg.get_submodule(name).out_channels == 512
    assert last_conv_layer_name(ResNet18(3, 10, 32)) == "layer4.1.conv2"
    assert last_conv_layer_name(PreActResNet18(3, 10, 32)) == "layer4.1.conv2"
    assert last_conv_layer_name(nn.Linear(2, 2)) is None


@pytest.mark.parametrize(
    ("cls", "channels", "size"),
    [(LeNet, 1, 28), (SimpleCNN, 3, 32), (ResNet18, 1, 28), (VGG11, 3, 28), (PreActResNet18, 3, 32)],
)
def test_deterministic_init(cls: type[nn.Module], channels: int, size: int) -> None:
    torch.manual_seed(123)
    a = cls(in_channels=channels, num_classes=10, image_size=size).state_dict()
    torch.manual_seed(123)
    b = cls(in_channels=channels, num_classes=10, image_size=size).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(124)
    c = cls(in_channels=channels, num_classes=10, image_size=size).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    ("cls", "channels", "size"),
    [(LeNet, 1, 28), (SimpleCNN, 3, 32), (ResNet18, 3, 32), (VGG11, 1, 28), (PreActResNet18, 1, 28)],
)
def test_gradient_step_changes_all_parameters(cls: type[nn.Module], channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = cls(in_channels=channels, num_classes=10, image_size=size)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, channels, size, size)
    y = torch.tensor([0, 1])
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    unchanged = sorted(set(before) - set(changed))
    assert not unchanged, f"SGD step left {unchanged} unchanged"


@pytest.mark.parametrize("cls", ALL_MODELS)
def test_invalid_arguments(cls: type[nn.Module]) -> None:
    with pytest.raises(ValueError):
        cls(in_channels=3, num_classes=1, image_size=32)
