"""Students and teachers from timm (the ``timm`` extra): ``student.arch: timm/<name>`` in timm's own naming, and
``teacher.source: timm`` with a local checkpoint.

Any timm classifier builds (with ``num_classes``, nothing downloaded); :data:`CURATED` is the edge families that
``edgedistill list`` and ``student.arch: auto`` consider and that the registry tests build, train and export. A
timm network's width is its name (``mobilenetv4_conv_small_050``, ``lcnet_075``), as ShuffleNetV2's is.

Small inputs get the torchvision students' treatment: every convolution timm names as the model's first
(``pretrained_cfg["first_conv"]``; several for the multi-branch stems of MobileOne and FastViT) that has stride 2 is
made stride 1, so a 32-px image keeps 2x more resolution through the network. An architecture whose first
convolution has no stride 2 does not allow it (:func:`small_stem_convs` is empty).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable

from torch import nn

from edgedistill.base.errors import InputError, RecipeError, first_line
from edgedistill.base.registry import did_you_mean

PREFIX = "timm/"
INSTALL = "pip install 'edgedistill[timm]'"

#: edge families of the last years, one or two sizes each (timm's names); every one builds at 32 and 224 px and its
#: fp32 ONNX file matches PyTorch within validation's parity bar (MobileNetV4-hybrid does not: docs/students.md)
CURATED = (
    "mobilenetv4_conv_small_050",
    "mobilenetv4_conv_small",
    "mobilenetv4_conv_medium",
    "efficientnet_lite0",
    "ghostnetv2_100",
    "repvit_m0_9",
    "mobileone_s0",
    "fastvit_t8",
    "lcnet_050",
    "lcnet_100",
    "hardcorenas_a",
)


def installed() -> bool:
    return importlib.util.find_spec("timm") is not None


def curated_archs() -> list[str]:
    """``timm/<name>`` of every curated student, or none without the extra."""
    return [PREFIX + n for n in CURATED] if installed() else []


@functools.cache
def _model_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def model_name(arch: str) -> str:
    """The timm name in ``timm/<name>`` (or a bare name), checked: the extra is installed and timm has the model."""
    name = arch.removeprefix(PREFIX)
    if not installed():
        raise RecipeError(f"{arch} is a timm model and timm is not installed ({INSTALL})")
    if name not in _model_names():
        raise RecipeError(f"timm has no model '{name}'{did_you_mean(name, sorted(_model_names()))}; see timm.list_models()")
    return name


def student_builder(arch: str) -> Callable[..., nn.Module]:
    """A student registry entry for ``timm/<name>``: ``build(num_classes, width, small_input, dropout)``."""
    name = model_name(arch)

    def build(num_classes: int, width: float, small_input: bool, dropout: float) -> nn.Module:
        if width != 1.0:
            raise InputError(f"student.width: a timm student's width is its name (e.g. lcnet_050, lcnet_100), got {width:g}")
        net = create(name, num_classes, drop_rate=dropout)
        if small_input:
            small_stem(net, arch)
        return net

    return build


def check_input(net: nn.Module, arch: str, image_size) -> None:
    """One probe batch at the data's size: a timm architecture may need more pixels than the data has (GhostNetV2's
    attention pools feature maps that 16-px images leave at 1x1), and training should not be what finds out."""
    import torch

    from edgedistill.data.transforms import hw

    h, w = hw(image_size)
    mode = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(2, 3, h, w))
    except RuntimeError as e:
        raise InputError(f"student.arch: {arch} does not take {h}x{w} images ({first_line(e, 160)}); "
                         "use a larger data.image_size or another student") from None
    net.train(mode)


def create(name: str, num_classes: int, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def small_stem_convs(net: nn.Module) -> list[nn.Conv2d]:
    """The stride-2 convolutions among the ones timm names as ``net``'s first (empty: no small stem possible)."""
    names = getattr(net, "pretrained_cfg", {}).get("first_conv") or ()
    modules = dict(net.named_modules())
    convs = [modules.get(n) for n in ((names,) if isinstance(names, str) else names)]
    return [c for c in convs if isinstance(c, nn.Conv2d) and tuple(c.stride) == (2, 2)]


def small_stem(net: nn.Module, arch: str) -> None:
    convs = small_stem_convs(net)
    if not convs:
        raise InputError(f"student.small_input: {arch} has no stride-2 first convolution to make stride 1; set small_input: false")
    modules = dict(net.named_modules())
    for name, conv in ((n, m) for n, m in modules.items() if any(m is c for c in convs)):
        conv.stride = (1, 1)
        # a reparameterisable block (MobileOne, FastViT) builds its fused convolution from its own ``stride``
        parts = name.split(".")
        for depth in range(1, len(parts)):
            block = modules[".".join(parts[:depth])]
            if getattr(block, "stride", None) in (2, (2, 2)):
                block.stride = 1 if block.stride == 2 else (1, 1)


def load_teacher(cfg, num_classes: int, image_size: int) -> nn.Module:
    """``teacher.source: timm``: the architecture with the data's classes and the checkpoint read by timm's own
    ``load_state_dict`` (a ``.pth`` or ``.safetensors`` state_dict, its EMA weights when it has them; nothing is
    downloaded), checked key by key so that a checkpoint of another model or class count is named as such."""
    from timm.models import load_state_dict

    from edgedistill.models.checkpoints import state_dict_mismatch

    name = model_name(cfg.arch)
    net = create(name, num_classes)
    try:
        state = load_state_dict(str(cfg.path))
    except Exception as e:  # noqa: BLE001 - a file timm cannot read is the user's file's problem, whatever the reason
        raise InputError(f"teacher.path: {cfg.path} is not a readable timm checkpoint ({type(e).__name__}: {first_line(e, 200)})") from None
    if problem := state_dict_mismatch(net, state):
        raise InputError(f"teacher.path: {cfg.path} does not fit timm model '{name}' with {num_classes} classes: {problem}")
    net.load_state_dict(state)
    return net


def pretrained_normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the timm model's pretrained configuration declares (ImageNet's for most)."""
    import timm

    cfg = timm.get_pretrained_cfg(model_name(arch))
    return tuple(cfg.mean), tuple(cfg.std)


def reparameterize(net: nn.Module) -> int:
    """Fuse ``net``'s training-time branches in place for inference (RepViT, MobileOne, FastViT: timm's
    ``reparameterize_model``); the number of modules that fuse (0: nothing to do, timm not even imported)."""
    count = sum(1 for m in net.modules() if any(hasattr(m, a) for a in ("fuse", "reparameterize", "switch_to_deploy")))
    if count:
        from timm.utils.model import reparameterize_model

        reparameterize_model(net, inplace=True)
    return count
