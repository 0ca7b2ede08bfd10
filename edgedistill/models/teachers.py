"""Teachers: the registry of sources a user's teacher may come from (a torchvision state_dict, a timm checkpoint,
TorchScript, a torch.export program, an ONNX file, or an architecture trained here), each loaded, checked against the data
and frozen.

Like the students, every teacher takes RGB in [0, 1]; ``teacher.normalize`` puts a file teacher's own
normalisation inside it.
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
from torch import nn

from edgedistill.base.errors import InputError, first_line
from edgedistill.base.registry import Registry
from edgedistill.models import timm_zoo
from edgedistill.models.checkpoints import load_checkpoint, state_dict_mismatch
from edgedistill.models.students import DEFAULT_TEACHER_ARCH, Normalized, build_classifier


@dataclass(frozen=True)
class TeacherSource:
    """How a teacher source builds its network: ``load(cfg, num_classes, image_size)``, without normalisation.

    ``trained_here``: the source gives an untrained architecture that the pipeline's teacher stage trains
    (the only source that uses ``teacher.train``).
    ``takes_arch``: the source builds a torchvision architecture, so ``teacher.arch`` and ``teacher.small_input``
    mean something to it (``needs_arch``: it cannot do without ``arch``).
    ``what``: the file ``teacher.path`` must name, in words (``needs_path`` sources only).
    ``onnx_only``: the file is an ONNX model, which only ONNX Runtime runs (``teacher.runtime`` has no choice).
    ``timm``: ``teacher.arch`` is a timm model name, and the normalisation defaults to its pretrained configuration's.
    The recipe refuses, when it loads, a key the chosen source would ignore.
    """

    load: Callable[..., nn.Module]
    needs_path: bool
    needs_arch: bool
    trained_here: bool = False
    takes_arch: bool = False
    what: str = "a file"
    onnx_only: bool = False
    timm: bool = False


TEACHERS: Registry[TeacherSource] = Registry("teacher source")


def _load_state_dict_teacher(cfg, num_classes: int, image_size: int) -> nn.Module:
    net = build_classifier(cfg.arch, num_classes, image_size=image_size, small_input=cfg.small_input)
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
    return build_classifier(cfg.arch or DEFAULT_TEACHER_ARCH, num_classes, image_size=image_size, small_input=cfg.small_input)


TEACHERS.register("torchvision")(TeacherSource(_load_state_dict_teacher, needs_path=True, needs_arch=True, takes_arch=True,
                                                 what="a PyTorch state_dict file"))
TEACHERS.register("torchscript")(TeacherSource(_load_torchscript, needs_path=True, needs_arch=False, what="a TorchScript file"))
TEACHERS.register("export")(TeacherSource(_load_exported, needs_path=True, needs_arch=False, what="a torch.export program (.pt2)"))
TEACHERS.register("onnx")(TeacherSource(_load_onnx, needs_path=True, needs_arch=False, what="an ONNX model file",
                                                                  onnx_only=True))
TEACHERS.register("timm")(TeacherSource(timm_zoo.load_teacher, needs_path=True, needs_arch=True, timm=True,
                                          what="a timm checkpoint (.pth or .safetensors state_dict)"))
TEACHERS.register("train")(TeacherSource(_untrained, needs_path=False, needs_arch=False, trained_here=True, takes_arch=True))


def load_teacher(cfg, num_classes: int, image_size: int, mean, std) -> nn.Module:
    """The teacher of ``cfg.source`` taking RGB in [0, 1]; a loaded one is checked against the data and frozen.

    ``teacher.normalize`` puts the normalisation a file teacher expects inside it (a timm teacher's default: its
    pretrained configuration's); a teacher trained here gets the data's statistics (``mean``, ``std``) unless the
    recipe gives its own.
    """
    spec = TEACHERS.get(cfg.source)
    net = spec.load(cfg, num_classes, image_size)
    if cfg.normalize is not None:
        net = Normalized(net, cfg.normalize.mean, cfg.normalize.std)
    elif spec.timm:
        net = Normalized(net, *timm_zoo.pretrained_normalization(cfg.arch))
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


@contextmanager
def _quiet_logging() -> Iterator[None]:
    """Silence log records up to WARNING (torch logs tracebacks of errors it then raises) for a block."""
    old = logging.root.manager.disable
    logging.disable(max(old, logging.WARNING))
    try:
        yield
    finally:
        logging.disable(old)
