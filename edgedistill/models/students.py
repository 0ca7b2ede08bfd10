"""Students: the registry of compact networks a run may distill into, and the builder of a teacher's architecture
(a student's, a CIFAR ResNet or a torchvision classifier).

Every model takes float32 RGB pixels in [0, 1], NCHW, and returns logits: the input normalisation lives inside
the model (:class:`Normalized`), so a checkpoint, an ONNX file and the data loaders can never disagree about it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torchvision
from torch import nn

from edgedistill.base.errors import InputError, RecipeError
from edgedistill.base.registry import Registry
from edgedistill.models import timm_zoo
from edgedistill.models.cifar_resnet import DEPTHS, build_cifar_resnet


class Normalized(nn.Module):
    """``net((x - mean) / std)``: keeps preprocessing inside the exported graph."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def small_input_wanted(small_input: bool | str, image_size: int) -> bool:
    """'auto' → a stride-1 stem for images of 64 pixels or less (CIFAR-like)."""
    return image_size <= 64 if small_input == "auto" else bool(small_input)


STUDENTS: Registry[Callable[..., nn.Module]] = Registry("student architecture")
DEFAULT_TEACHER_ARCH = "resnet18"


def _stride1(conv: nn.Conv2d) -> None:
    conv.stride = (1, 1)


@STUDENTS.register("mobilenet_v2")
def _mobilenet_v2(num_classes: int, width: float, small_input: bool, dropout: float) -> nn.Module:
    net = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width, dropout=dropout)
    if small_input:
        _stride1(net.features[0][0])
    return net


def _mobilenet_v3(builder):
    def build(num_classes: int, width: float, small_input: bool, dropout: float) -> nn.Module:
        net = builder(num_classes=num_classes, width_mult=width, dropout=dropout)
        if small_input:
            _stride1(net.features[0][0])
        return net

    return build


STUDENTS.register("mobilenet_v3_small")(_mobilenet_v3(torchvision.models.mobilenet_v3_small))
STUDENTS.register("mobilenet_v3_large")(_mobilenet_v3(torchvision.models.mobilenet_v3_large))


def _shufflenet(builder):
    def build(num_classes: int, width: float, small_input: bool, dropout: float) -> nn.Module:
        # ShuffleNetV2's width is its variant name (x0_5 … x2_0); it has no dropout.
        if width != 1.0:
            raise InputError(f"student.width: ShuffleNetV2 has no width option (pick shufflenet_v2_x0_5 … x2_0), got {width}")
        net = builder(num_classes=num_classes)
        if small_input:
            _stride1(net.conv1[0])
            net.maxpool = nn.Identity()
        return net

    return build


for _name in ("x0_5", "x1_0", "x1_5", "x2_0"):
    STUDENTS.register(f"shufflenet_v2_{_name}")(_shufflenet(getattr(torchvision.models, f"shufflenet_v2_{_name}")))

STUDENTS.register_family(timm_zoo.PREFIX, timm_zoo.student_builder, f"a timm model, with the timm extra: {timm_zoo.INSTALL}")


def zoo() -> list[str]:
    """Every student ``edgedistill list`` shows and ``student.arch: auto`` considers: the registered ones, then the
    curated timm ones when timm is installed."""
    return [*STUDENTS.names(), *timm_zoo.curated_archs()]


def allows_small_stem(arch: str) -> bool:
    """Whether ``arch`` can take a stride-1 stem for small images (every torchvision student can)."""
    if arch.startswith(timm_zoo.PREFIX):
        return bool(timm_zoo.small_stem_convs(timm_zoo.create(timm_zoo.model_name(arch), num_classes=10)))
    return arch in STUDENTS


def fixed_width(arch: str) -> bool:
    """A family whose width is its name (ShuffleNetV2's variants, timm's models): ``student.width`` stays 1."""
    return arch.startswith(("shufflenet_v2", timm_zoo.PREFIX))


def build_student(
    arch: str,
    num_classes: int,
    *,
    image_size: int,
    mean,
    std,
    width: float = 1.0,
    small_input: bool | str = "auto",
    dropout: float = 0.2,
) -> nn.Module:
    net = STUDENTS.get(arch)(num_classes, width, small_input_wanted(small_input, image_size), dropout)
    if arch.startswith(timm_zoo.PREFIX):
        timm_zoo.check_input(net, arch, image_size)
    _default_bn_momentum(net)
    return Normalized(net, mean, std)


def _default_bn_momentum(net: nn.Module) -> None:
    """torchvision's MobileNetV3 uses BN momentum 0.01, tuned for long ImageNet schedules; with the
    few hundred steps of a short distillation its running statistics never converge and evaluation
    collapses to one class. PyTorch's default 0.1 works for short and long schedules alike."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1


def build_classifier(arch: str, num_classes: int, *, image_size: int, small_input: bool | str = "auto") -> nn.Module:
    """A teacher architecture by name: a student's (timm's ``timm/<name>`` included), a CIFAR ResNet
    (:mod:`edgedistill.models.cifar_resnet`) or any torchvision classifier, with a small-input stem when asked (a CIFAR ResNet has one by design)."""
    if arch in STUDENTS or arch.startswith(timm_zoo.PREFIX):
        return STUDENTS.get(arch)(num_classes, 1.0, small_input_wanted(small_input, image_size), 0.2)
    if arch in DEPTHS:
        return build_cifar_resnet(arch, num_classes)
    if problem := teacher_arch_problem(arch):
        raise InputError(f"teacher.arch: {problem}")
    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if small_input_wanted(small_input, image_size) and isinstance(getattr(net, "conv1", None), nn.Conv2d):
        # ResNet-style stem: 3x3 stride-1 conv, no max-pool (the usual CIFAR adaptation).
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    return net


def teacher_arch_problem(arch: str) -> str | None:
    """Why ``teacher.arch`` names no architecture :func:`build_classifier` can build (one line), or None."""
    if arch in STUDENTS or arch in DEPTHS:
        return None
    if arch.startswith(timm_zoo.PREFIX):
        try:
            timm_zoo.model_name(arch)
        except RecipeError as e:
            return str(e)
        return None
    known = torchvision.models.list_models(module=torchvision.models)
    if arch in known:
        return None
    from edgedistill.base.registry import did_you_mean

    return (f"'{arch}' is not a student, a CIFAR ResNet ({', '.join(DEPTHS)}), timm/<name> or a torchvision classifier"
            f"{did_you_mean(arch, [*DEPTHS, *known])}; see torchvision.models.list_models()")
