"""Image classifiers used by thorn's federated clients and server.

Every model has the same constructor signature
``__init__(self, in_channels: int, num_classes: int, image_size: int)`` because
Hydra builds them through ``_target_`` with exactly those three keyword
arguments. ``MODEL_CLASSES`` maps the config names to the classes.

The module also offers small helpers that attacks and defenses share:
``count_parameters``, ``last_conv_layer_name`` (pruning defenses act on the
last convolution) and ``trainable_state_keys`` (aggregation/clipping rules
should only touch learned weights, not BatchNorm statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODEL_CLASSES",
    "VGG11",
    "LeNet",
    "PreActResNet18",
    "ResNet18",
    "SimpleCNN",
    "count_parameters",
    "last_conv_layer_name",
    "trainable_state_keys",
]


def _check_common(in_channels: int, num_classes: int, image_size: int) -> None:
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")


# --------------------------------------------------------------------------- LeNet


class LeNet(nn.Module):
    """LeNet-5 style network (conv-pool-conv-pool-fc-fc-fc) for 28x28 or 32x32 inputs."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        _check_common(in_channels, num_classes, image_size)
        # Spatial size after each stage: padding=2 keeps the first conv size-preserving,
        # the second 5x5 conv is unpadded (-4), each max-pool halves (floor).
        side = ((image_size // 2) - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet needs image_size >= 12, got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


# ----------------------------------------------------------------------- SimpleCNN


class SimpleCNN(nn.Module):
    """The SDFC ``simple_cnn`` backbone, layer for layer.

    conv1(3->6,5) ReLU pool, conv2(6->16,5) ReLU pool, fc1(400->120) ReLU,
    fc2(120->84) ReLU, l1(84->84) ReLU, l2(84->256), cls(256->num_classes).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        _check_common(in_channels, num_classes, image_size)
        # fc1 is hard-wired to 16*5*5 = 400 inputs in SDFC; other shapes would silently
        # change the architecture, so reject them instead of adapting.
        if in_channels != 3 or image_size != 32:
            raise ValueError(
                "the SDFC simple_cnn needs 3x32x32 inputs, got "
                f"{in_channels}x{image_size}x{image_size}; set model.input_size=32 "
                "model.input_channels=3 so thorn's preprocessing resizes/repeats channels"
            )
        self.conv1 = nn.Conv2d(3, 6, kernel_size=5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.l1 = nn.Linear(84, 84)
        self.l2 = nn.Linear(84, 256)
        self.cls = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = F.relu(self.l1(x))
        # No activation between l2 and cls: this matches the SDFC code.
        x = self.l2(x)
        return self.cls(x)


# ------------------------------------------------------------------------- ResNets


class BasicBlock(nn.Module):
    """Post-activation residual block (two 3x3 convs) of ResNet-18/34."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # 1x1 projection only when the shape changes; otherwise the identity keeps
        # the parameter count at the canonical ~11.17M.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (BN-ReLU-conv twice), He et al. 2016 "Identity Mappings"."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # As in the paper, a projection shortcut takes the pre-activated input, while
        # an identity shortcut carries the raw input untouched.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


_RESNET18_LAYERS = (2, 2, 2, 2)
_RESNET_WIDTHS = (64, 128, 256, 512)


def _make_stages(block: type[nn.Module], in_planes: int) -> nn.ModuleList:
    stages = []
    for i, (planes, blocks) in enumerate(zip(_RESNET_WIDTHS, _RESNET18_LAYERS, strict=True)):
        # The first stage keeps the resolution (CIFAR stem already has stride 1);
        # the others downsample by 2 in their first block.
        strides = [1 if i == 0 else 2] + [1] * (blocks - 1)
        layers = []
        for s in strides:
            layers.append(block(in_planes, planes, s))
            in_planes = planes
        stages.append(nn.Sequential(*layers))
    return nn.ModuleList(stages)


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stride-1 stem, no max-pool, BasicBlocks [2,2,2,2]."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        _check_common(in_channels, num_classes, image_size)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = _make_stages(BasicBlock, 64)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        # Adaptive pooling makes the head independent of image_size (28 or 32).
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * BasicBlock.expansion, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


class PreActResNet18(nn.Module):
    """CIFAR-style pre-activation ResNet-18 (He et al. 2016, identity mappings)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        _check_common(in_channels, num_classes, image_size)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        stages = _make_stages(PreActBlock, 64)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        # Blocks end with a conv, so one final BN-ReLU is needed before pooling.
        self.bn = nn.BatchNorm2d(512)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * PreActBlock.expansion, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


# ---------------------------------------------------------------------------- VGG

_VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """CIFAR-style VGG-11 with BatchNorm and a single linear classifier (512 -> classes).

    For sizes not divisible by 32 a max-pool is skipped whenever the feature map
    is already 1x1 (28x28: 28->14->7->3->1, the fifth pool is dropped), and an
    ``AdaptiveAvgPool2d(1)`` precedes the classifier, so any image_size >= 16 works.
    For 32x32 inputs the network is the usual CIFAR VGG-11.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        _check_common(in_channels, num_classes, image_size)
        layers: list[nn.Module] = []
        channels, side = in_channels, image_size
        for v in _VGG11_CFG:
            if v == "M":
                # Pooling a 1x1 map would produce an empty tensor.
                if side >= 2:
                    layers.append(nn.MaxPool2d(2, 2))
                    side //= 2
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(out)


# ------------------------------------------------------------------------ helpers

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "lenet": LeNet,
    "simple_cnn": SimpleCNN,
    "resnet18": ResNet18,
    "vgg11": VGG11,
    "preact_resnet18": PreActResNet18,
}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def last_conv_layer_name(model: nn.Module) -> str | None:
    """Qualified name of the last ``nn.Conv2d`` in module registration order, or None."""
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            name = module_name
    return name


def trainable_state_keys(model: nn.Module) -> list[str]:
    """``state_dict`` keys that are trainable parameters, in state_dict order.

    Buffers (BatchNorm ``running_mean``/``running_var``/``num_batches_tracked``)
    and frozen parameters are excluded.
    """
    # remove_duplicate=False so a tied weight appears under every name state_dict uses.
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return [k for k in model.state_dict() if k in trainable]


# ------------------------------------------------- CNNs of Wu et al. (federated pruning)
# Wu, Yang, Zhu, Mitra (arXiv 2011.01767) name "2 conv + 2 FC" (MNIST) and "3 conv + 2 FC"
# (Fashion-MNIST) models; the widths and kernel sizes are not in the text available to us, so these
# are [INFERRED]: the MNIST one is the FedAvg paper's CNN (5x5 convs of 32 and 64 channels, FC 512).
# Neither is in MODEL_CLASSES (tests/test_models.py pins that registry); conf/model/ names them.


class CNN2Conv2FC(nn.Module):
    """conv(5x5, 32)-ReLU-pool, conv(5x5, 64)-ReLU-pool, fc 512-ReLU, fc classes (McMahan et al. 2017)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        _check_common(in_channels, num_classes, image_size)
        side = image_size // 2 // 2  # padding 2 keeps each 5x5 conv size-preserving; two 2x2 pools
        if side < 1:
            raise ValueError(f"CNN2Conv2FC needs image_size >= 4, got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * side * side, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class CNN3Conv2FC(nn.Module):
    """Three 3x3 conv(32, 64, 64)-ReLU-pool stages, fc 128-ReLU, fc classes."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        _check_common(in_channels, num_classes, image_size)
        side = image_size // 2 // 2 // 2  # padding 1 keeps each 3x3 conv size-preserving; three 2x2 pools
        if side < 1:
            raise ValueError(f"CNN3Conv2FC needs image_size >= 8, got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * side * side, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = self.pool(F.relu(self.conv3(x)))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)
