"""Students (compact torchvision networks) and teachers (any source a user is likely to have).

Every model here takes float32 RGB pixels in [0, 1], NCHW, and returns logits: the input
normalisation lives inside the model, so a checkpoint, an ONNX file and the data loaders can
never disagree about it.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torchvision
from torch import nn

from edgedistill.errors import InputError, first_line
from edgedistill.registry import Registry


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


# ---------------------------------------------------------------- students

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
    _default_bn_momentum(net)
    return Normalized(net, mean, std)


def _default_bn_momentum(net: nn.Module) -> None:
    """torchvision's MobileNetV3 uses BN momentum 0.01, tuned for long ImageNet schedules; with the
    few hundred steps of a short distillation its running statistics never converge and evaluation
    collapses to one class. PyTorch's default 0.1 works for short and long schedules alike."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1


def build_torchvision(arch: str, num_classes: int, *, image_size: int, small_input: bool | str = "auto") -> nn.Module:
    """Any torchvision classifier by name (a student name works too), with a small-input stem when asked."""
    if arch in STUDENTS:
        return STUDENTS.get(arch)(num_classes, 1.0, small_input_wanted(small_input, image_size), 0.2)
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        from edgedistill.registry import did_you_mean

        raise InputError(f"teacher.arch: '{arch}' is not a torchvision classifier{did_you_mean(arch, known)}")
    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if small_input_wanted(small_input, image_size) and isinstance(getattr(net, "conv1", None), nn.Conv2d):
        # ResNet-style stem: 3x3 stride-1 conv, no max-pool (the usual CIFAR adaptation).
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    return net


# ---------------------------------------------------------------- teachers


def teacher_arch_problem(arch: str) -> str | None:
    """Why ``teacher.arch`` names no architecture :func:`build_torchvision` can build (one line), or None."""
    if arch in STUDENTS:
        return None
    known = torchvision.models.list_models(module=torchvision.models)
    if arch in known:
        return None
    from edgedistill.registry import did_you_mean

    return f"'{arch}' is not a torchvision classifier{did_you_mean(arch, known)}; see torchvision.models.list_models()"


@dataclass(frozen=True)
class TeacherSource:
    """How a teacher source builds its network: ``load(cfg, num_classes, image_size)``, without normalisation.

    ``trained_here``: the source gives an untrained architecture that the pipeline's teacher stage trains
    (the only source that uses ``teacher.train``).
    ``takes_arch``: the source builds a torchvision architecture, so ``teacher.arch`` and ``teacher.small_input``
    mean something to it (``needs_arch``: it cannot do without ``arch``).
    ``what``: the file ``teacher.path`` must name, in words (``needs_path`` sources only).
    ``onnx_only``: the file is an ONNX model, which only ONNX Runtime runs (``teacher.runtime`` has no choice).
    The recipe refuses, when it loads, a key the chosen source would ignore.
    """

    load: Callable[..., nn.Module]
    needs_path: bool
    needs_arch: bool
    trained_here: bool = False
    takes_arch: bool = False
    what: str = "a file"
    onnx_only: bool = False


TEACHERS: Registry[TeacherSource] = Registry("teacher source")


def _load_state_dict_teacher(cfg, num_classes: int, image_size: int) -> nn.Module:
    net = build_torchvision(cfg.arch, num_classes, image_size=image_size, small_input=cfg.small_input)
    state = load_checkpoint(cfg.path)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise InputError(f"teacher.path: {cfg.path} holds a {type(state).__name__}, expected a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    problem = state_dict_mismatch(net, state)
    if problem:
        raise InputError(f"teacher.path: {cfg.path} does not fit teacher.arch '{cfg.arch}' with {num_classes} classes at {image_size} px: {problem}")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise InputError(f"teacher.path: {cfg.path} does not fit teacher.arch '{cfg.arch}' ({first_line(e, 200)})") from None
    return net


def load_state(net: nn.Module, state, what: str) -> nn.Module:
    """``net.load_state_dict(state)``; a state of another shape is one InputError line naming ``what`` (a file)."""
    if not isinstance(state, dict):
        raise InputError(f"{what}: holds a {type(state).__name__}, expected a state_dict")
    problem = state_dict_mismatch(net, state)
    if problem:
        raise InputError(f"{what}: does not fit the model this recipe builds ({problem}); was it written with another recipe?")
    net.load_state_dict(state)
    return net


def state_dict_mismatch(net: nn.Module, state: dict) -> str:
    """'' when ``state`` fits ``net``; else one line: missing / unexpected keys and shape mismatches, a few named."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in own if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in resized]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:2])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:2])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) (e.g. {'; '.join(shapes[:2])})")
    if not parts:
        return ""
    hint = ""
    if missing and unexpected and len(missing) + len(unexpected) > 4:
        hint = "; the file holds another architecture"
    elif any(own[k].ndim == 4 and own[k].shape[2:] != state[k].shape[2:] for k in resized):
        hint = "; a convolution kernel differs (the stem?): check teacher.small_input"
    return "; ".join(parts) + hint


def _load_torchscript(cfg, num_classes: int, image_size: int) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = torch.jit.load(str(cfg.path), map_location="cpu")
    except Exception as e:
        raise InputError(f"teacher.path: {cfg.path} is not a TorchScript file ({first_line(e, 200)})") from None
    return net


def _load_exported(cfg, num_classes: int, image_size: int) -> nn.Module:
    import zipfile

    if not zipfile.is_zipfile(cfg.path):
        raise InputError(f"teacher.path: {cfg.path} is not a torch.export (.pt2) program (not a zip archive)")
    try:
        # torch.export.load logs a traceback before raising on a file it cannot read: keep it quiet.
        with _quiet_logging(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = torch.export.load(str(cfg.path)).module()
    except Exception as e:
        raise InputError(f"teacher.path: {cfg.path} is not a torch.export (.pt2) program ({first_line(e, 200)})") from None
    return _ExportedModule(net)


class _ExportedModule(nn.Module):
    """An exported program has no train/eval switch; keep ``.eval()`` and ``.to()`` harmless."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def train(self, mode: bool = True):
        self.training = mode  # the flag only: the graph itself was captured in one mode
        return self

    def forward(self, x):
        return self.net(x)


class OnnxTeacher(nn.Module):
    """A black-box teacher run by ONNX Runtime on the CPU: logit distillation needs only its outputs."""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # ORT's threads spin-wait after a run by default, taking the cores from the student's step that follows
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise InputError(f"teacher.path: {path} is not a loadable ONNX model ({first_line(e, 200)})") from None
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)


def _load_onnx(cfg, num_classes: int, image_size: int) -> nn.Module:
    return OnnxTeacher(cfg.path)


def _untrained(cfg, num_classes: int, image_size: int) -> nn.Module:
    """The architecture the teacher stage trains inside the pipeline."""
    return build_torchvision(cfg.arch or DEFAULT_TEACHER_ARCH, num_classes, image_size=image_size, small_input=cfg.small_input)


TEACHERS.register("torchvision")(TeacherSource(_load_state_dict_teacher, needs_path=True, needs_arch=True, takes_arch=True,
                                                 what="a PyTorch state_dict file"))
TEACHERS.register("torchscript")(TeacherSource(_load_torchscript, needs_path=True, needs_arch=False, what="a TorchScript file"))
TEACHERS.register("export")(TeacherSource(_load_exported, needs_path=True, needs_arch=False, what="a torch.export program (.pt2)"))
TEACHERS.register("onnx")(TeacherSource(_load_onnx, needs_path=True, needs_arch=False, what="an ONNX model file",
                                                                  onnx_only=True))
TEACHERS.register("train")(TeacherSource(_untrained, needs_path=False, needs_arch=False, trained_here=True, takes_arch=True))


def load_teacher(cfg, num_classes: int, image_size: int, mean, std) -> nn.Module:
    """The teacher of ``cfg.source`` taking RGB in [0, 1]; a loaded one is checked against the data and frozen.

    ``teacher.normalize`` puts the normalisation a file teacher expects inside it; a teacher trained here gets
    the data's statistics (``mean``, ``std``) unless the recipe gives its own.
    """
    spec = TEACHERS.get(cfg.source)
    net = spec.load(cfg, num_classes, image_size)
    if cfg.normalize is not None:
        net = Normalized(net, cfg.normalize.mean, cfg.normalize.std)
    elif spec.trained_here:
        net = Normalized(net, mean, std)
    if not spec.trained_here:
        check_output_classes(net, num_classes, image_size, f"teacher.path: {cfg.path}")
        freeze(net)
    return net


def check_output_classes(net: nn.Module, num_classes: int, image_size: int, what: str) -> None:
    """Two probe batches (2 and 3 images): the input size, a dynamic batch axis and the output width must fit."""
    net.eval()
    for batch in (2, 3):
        try:
            with torch.no_grad():
                out = net(torch.rand(batch, 3, image_size, image_size))
        except Exception as e:
            reason = first_line(e, 200)
            hint = ""
            if "Guard failed" in reason or "invalid dimensions" in reason.lower():
                hint = "; was it exported with a fixed batch size? export it with a dynamic batch axis"
            raise InputError(f"{what}: the model does not accept a batch of {batch} 3x{image_size}x{image_size} images ({reason}){hint}") from None
        if out.ndim != 2 or out.shape[1] != num_classes or out.shape[0] != batch:
            raise InputError(
                f"{what}: the model outputs shape {tuple(out.shape)} for {batch} images, "
                f"expected ({batch}, {num_classes}) for {num_classes} classes in the data"
            )


def freeze(net: nn.Module) -> nn.Module:
    """The teacher never learns: eval mode (frozen BN statistics) and no gradients."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def load_checkpoint(path) -> dict:
    """``torch.load`` with ``weights_only=True``: a checkpoint can never run code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "received a zip file that looks like a TorchScript archive"
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a PyTorch checkpoint file") from None
    except Exception as e:
        text = str(e)
        if "TorchScript archive" in text:
            raise InputError(f"{path}: is a TorchScript archive, not a checkpoint (for a teacher use teacher.source: torchscript)") from None
        if "Weights only load failed" in text:
            raise InputError(
                f"{path}: holds pickled Python objects (a whole model?), which are never loaded (weights_only=True); "
                "save model.state_dict() instead"
            ) from None
        raise InputError(f"{path}: corrupt, truncated or not a PyTorch checkpoint ({first_line(e, 200)})") from None


@contextmanager
def _quiet_logging() -> Iterator[None]:
    """Silence log records up to WARNING (torch logs tracebacks of errors it then raises) for a block."""
    old = logging.root.manager.disable
    logging.disable(max(old, logging.WARNING))
    try:
        yield
    finally:
        logging.disable(old)
