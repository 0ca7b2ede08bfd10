"""The CIFAR ResNets of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016, section 4.2): a 3×3
stem and three stages of n basic blocks at widths 16, 32 and 64 (depth 6n + 2), for 32-pixel images.

They are the teachers of the CIFAR distillation literature (ResNet-56 in the Energy KD paper's CIFAR-100 and
CIFAR-100-LT tables) and what torchvision does not have. Shortcuts that change shape are 1×1 convolutions with
BatchNorm (option B of the paper), as in the shared CIFAR-100 teacher.
"""

from __future__ import annotations

from torch import nn

DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}  # name → blocks per stage


def _conv_bn(cin: int, cout: int, kernel: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), *_conv_bn(cout, cout, 3, 1))
        self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(3, 16, 3, 1), nn.ReLU(inplace=True)]
        cin = 16
        for i, width in enumerate((16, 32, 64)):
            for b in range(blocks):
                layers.append(_Block(cin, width, 2 if i and not b else 1))
                cin = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.features(x))


def build_cifar_resnet(name: str, num_classes: int) -> CifarResNet:
    return CifarResNet(DEPTHS[name], num_classes)
