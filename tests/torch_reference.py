"""PyTorch modules with the reference's architectures and state-dict layouts, for parity tests.

Written from the reference's documented structure (alinlab/L2T-ww
`models/resnet_cifar.py`, `models/vgg_cifar.py`, `models/resnet_ilsvrc.py`,
torchvision's ResNet layout); torchvision itself cannot be imported beside
torch 2.13 here. Every module's forward returns `(logits, taps)` with the taps
of our models (`l2t_jax.models.model_info(name).tap_channels`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "TorchBasicBlock",
    "TorchBottleneck",
    "TorchCResNet",
    "TorchVGGSmall",
    "TorchResNet",
    "make_torch_model",
    "perturb_",
]

VGG9_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class TorchBasicBlock(nn.Module):
    """torchvision BasicBlock: conv3x3(stride)-BN-ReLU-conv3x3-BN, + shortcut, ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class TorchBottleneck(nn.Module):
    """torchvision v1.5 Bottleneck: 1x1, 3x3(stride), 1x1 (x4), + shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def _down(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class TorchCResNet(nn.Module):
    """The reference's CResNet: ResNet-(6k+2) with `block1`, `blocks2`, `block3`, ... names.

    `n` is the reference's argument: each stage has 1 + n blocks (resnet32: n=4).
    `extras=True` also registers the reference's unused `alphas` (after `fc`).
    """

    def __init__(self, n: int, num_classes: int = 10, extras: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.block1 = TorchBasicBlock(16, 16)
        self.blocks2 = nn.Sequential(*[TorchBasicBlock(16, 16) for _ in range(n)])
        self.block3 = TorchBasicBlock(16, 32, 2, _down(16, 32, 2))
        self.blocks4 = nn.Sequential(*[TorchBasicBlock(32, 32) for _ in range(n)])
        self.block5 = TorchBasicBlock(32, 64, 2, _down(32, 64, 2))
        self.blocks6 = nn.Sequential(*[TorchBasicBlock(64, 64) for _ in range(n)])
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)
        if extras:
            self.alphas = nn.ParameterList([nn.Parameter(torch.rand(3, 1, 1, 1) * 0.1) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward_with_features`: the output of every residual block."""
        x = self.relu(self.bn1(self.conv1(x)))
        feats = []
        for stage in (
            [self.block1, *self.blocks2],
            [self.block3, *self.blocks4],
            [self.block5, *self.blocks6],
        ):
            for block in stage:
                x = block(x)
                feats.append(x)
        x = self.avgpool(x).flatten(1)
        return self.fc(x), feats


class TorchVGGSmall(nn.Module):
    """The reference's VGG_small with BN (`features` Sequential, `classifier` Linear).

    Taps are the inputs of the max-pools. `extras=True` registers the unused
    layers of the reference class in its order (`alphas`, `new_classifier`,
    `new_bn`, `w1..w3`, and `w` = ModuleList([w1, w2, w3]) sharing them).
    """

    def __init__(self, cfg: list = VGG9_CFG, num_classes: int = 10, extras: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)
        if extras:
            self.alphas = nn.ParameterList([nn.Parameter(torch.rand(3, 1, 1, 1) * 0.1) for _ in range(3)])
            self.new_classifier = nn.Linear(cin, num_classes)
            self.new_bn = nn.ModuleList([nn.BatchNorm2d(m.num_features) for m in self.features if isinstance(m, nn.BatchNorm2d)])
            self.w1 = nn.Linear(64, 16)
            self.w2 = nn.Linear(128, 32)
            self.w3 = nn.Linear(256, 64)
            self.w = nn.ModuleList([self.w1, self.w2, self.w3])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                feats.append(x)
            x = layer(x)
        x = F.avg_pool2d(x, x.size(3)).flatten(1)
        return self.classifier(x), feats


class TorchResNet(nn.Module):
    """torchvision-layout ResNet returning (logits, [stem ReLU, layer1, layer2, layer3, layer4])."""

    def __init__(self, block: type, layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AvgPool2d(7, stride=1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = _down(self.inplanes, planes * block.expansion, stride)
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        r1 = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(self.maxpool(r1))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        logits = self.fc(self.avgpool(f4).flatten(1))
        return logits, [r1, f1, f2, f3, f4]


def make_torch_model(name: str, num_classes: int, extras: bool = False) -> nn.Module:
    """The PyTorch twin of a registered l2t_jax model (any depth / VGG configuration)."""
    from l2t_jax.models import get_model, model_info

    family = model_info(name).family
    flax_model = get_model(name, 1)
    if family == "cifar_resnet":
        return TorchCResNet((flax_model.depth - 2) // 6 - 1, num_classes, extras)
    if family == "vgg":
        return TorchVGGSmall(list(flax_model.cfg), num_classes, extras)
    if family == "imagenet_resnet":
        block = TorchBottleneck if flax_model.bottleneck else TorchBasicBlock
        return TorchResNet(block, list(flax_model.layers), num_classes)
    raise ValueError(f"no PyTorch twin for {name} (family {family})")


@torch.no_grad()
def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Makes every BN non-trivial (affine, running stats, counters) and gives conv biases values.

    Conv weights are re-drawn with a variance that keeps activations O(1) through
    deep stacks, so relative comparisons stay meaningful.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.copy_(0.2 * torch.randn(c, generator=g))
            m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
        elif isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model
