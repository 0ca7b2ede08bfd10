"""Quantisation-aware training: the distilled student with simulated int8, trained on with the run's own objective.

Post-training int8 rounds weights the float training never saw rounded; a few epochs with the rounding simulated in
the forward pass ("fake quantisation", straight-through gradients) let the weights settle where the rounding hurts
least (Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
CVPR 2018). Here the loss is the run's distillation objective: Energy KD with its per-sample temperatures, the teacher's
logits replayed from the logit cache, HE-DA as the budget left it (Kim et al., KBS 2024), so the teacher guides the
quantised student as it guided the float one.

The simulation is PyTorch's PT2E flow (``torch.export`` → ``prepare_qat_pt2e``) with the scheme every int8 target of
this tool shares: asymmetric 8-bit activations per tensor, symmetric int8 weights per output channel (or per tensor,
``export.int8.granularity``), convolution and BatchNorm folded as inference will fold them. Where activations are
rounded is the first int8 target's (``qat_target``): ExecuTorch's XNNPACKQuantizer rounds more points than torchao's
x86 scheme (MobileNetV3-small: 109 against 65). Measured there (KD / Energy KD, one seed), QAT against XNNPACK's
points brought its simulation within 0.03 / 0.14 of the ExecuTorch file (1.01 / 0.66 with the x86 scheme) and gained
the ExecuTorch file 0.34 / 0.22 points and LiteRT's 0.17 / 0.29, while ONNX Runtime's lost 0.49 / 0.32: each file
gains most from QAT against its own scheme. The weights are rounded to
the coarsest grid among the run's int8 targets (ONNX Runtime's files use 7 of the 8 bits): a finer grid only rounds
less than the one trained against. Measured on MobileNetV3-small (CIFAR-100-real, one seed, three losses), moving QAT
from the 8-bit grid to the 7-bit one gained the ONNX file 0.07 to 0.39 points and moved the PT2E files by -0.19 to
+0.11: the ONNX file's remaining gap to the simulation (about 1 point) is not the grid. Two schedule points from
Krishnamoorthi ("Quantizing deep convolutional networks for efficient inference", 2018, §3.2): BatchNorm stops
updating its statistics after ``freeze_bn_after`` epochs (the folded weights stop moving under the quantiser), and
the range observers stop after ``freeze_observers_after`` (the last epochs train against fixed grids).

What leaves this module is a float state dict for the student's own architecture (:meth:`FakeQuantStudent.float_state`):
every int8 target then quantises the QAT weights its own way (ONNX Runtime's QDQ, PT2E for ExecuTorch and LiteRT),
calibrated as a post-training student would be, and is judged by the same held-out check and validation gates.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from edgedistill.distill.train import LoopHook

QAT_FILE, QAT_STUDENT_FILE = "qat.json", "student.qat.pt"
#: the largest batch the traced graph accepts (training, evaluation and calibration batches alike)
MAX_BATCH = 4096
#: the traced ops that behave differently in training, and the position of their training flag
MODE_FLAGS = {"aten.batch_norm.default": 5, "aten.dropout.default": 2, "aten.dropout_.default": 2}


def quantizer(per_channel: bool, weight_grid: tuple[int, int] = (-127, 127), base=None):
    """The QAT quantizer: ``base``, the run's PT2E int8 target's own quantizer in QAT mode (ExecuTorch's
    XNNPACKQuantizer: the quantisation points its file will have), or without one torchao's
    x86 scheme (uint8 asymmetric activations, symmetric int8 weights: ONNX Runtime's U8S8), per output channel or, for
    ``per_tensor``, one weight scale a layer; the weights rounded to the integers of ``weight_grid`` (the coarsest of
    the run's int8 targets: ONNX Runtime's 7-bit (-64, 64), the PT2E quantizers' (-127, 127))."""
    if base is None:
        from torchao.quantization.pt2e import FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer, get_default_x86_inductor_quantization_config

        config = get_default_x86_inductor_quantization_config(is_qat=True)
        if not per_channel:
            config = dataclasses.replace(config, weight=dataclasses.replace(
                config.weight, qscheme=torch.per_tensor_symmetric, ch_axis=None,
                observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=2**-12)))
        base = X86InductorQuantizer().set_global(config)
    config, (low, high) = base.global_config, weight_grid
    return base.set_global(dataclasses.replace(config, weight=dataclasses.replace(config.weight, quant_min=low, quant_max=high)))


def qat_train_config(distill, qat):
    """The training settings of the qat stage: distillation's optimiser at ``qat.lr_scale`` of its learning rate,
    cosine to zero without warm-up, in float32 (the fake quantisers' scale arithmetic is not autocast-safe), eager and
    NCHW (a traced graph is neither compiled again nor re-laid out)."""
    optimizer = distill.optimizer.model_copy(update={"lr": distill.optimizer.lr * qat.lr_scale})
    schedule = distill.schedule.model_copy(update={"name": "cosine", "warmup_epochs": 0.0, "milestones": []})
    return distill.model_copy(update={"epochs": qat.epochs, "optimizer": optimizer, "schedule": schedule,
                                      "amp": False, "channels_last": False, "compile": False})


class FakeQuantStudent(nn.Module):
    """The student as a traced graph with fake quantisation by ``quantizer`` (:func:`quantizer`), trainable by the
    ordinary loop.

    ``train()`` / ``eval()`` set the training flag of the graph's dropout and BatchNorm ops (a traced graph has no
    modules to switch), BatchNorm's off for good once :meth:`freeze_bn` was called. (Not torchao's
    ``move_exported_model_to_eval``: its pattern rewrite of an in-place dropout rewires the graph wrongly, measured
    on torchvision's MobileNetV3: logits of 10 for 0.01.) The observers' on/off flags are buffers, so a checkpoint
    restores them."""

    def __init__(self, student: nn.Module, image_size: tuple[int, int], quantizer):
        super().__init__()
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

        self.keys = tuple(student.state_dict())
        _nudge_zero_bn_weights(student)
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        example = torch.rand(2, 3, *image_size, generator=torch.Generator().manual_seed(0))
        traced = torch.export.export(student.train(), (example,), dynamic_shapes=({0: batch},)).module()
        settings = {_stat(n): n.args[6:8] for n in _batch_norms(traced)}
        self.graph = prepare_qat_pt2e(traced, quantizer)
        _restore_bn_settings(self.graph, settings)
        self.bn_frozen = False
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> "FakeQuantStudent":
        self.training = mode  # (not the graph's train(): an exported graph refuses it; its ops carry the mode)
        self._set_flags()
        return self

    def freeze_bn(self) -> None:
        """BatchNorm uses its running statistics from now on, in training too (they stop updating)."""
        self.bn_frozen = True
        self._set_flags()

    def freeze_observers(self) -> None:
        from torchao.quantization.pt2e import disable_observer

        self.graph.apply(disable_observer)

    def _set_flags(self) -> None:
        changed = False
        for node in self.graph.graph.nodes:
            op = str(node.target) if node.op == "call_function" else None
            if op not in MODE_FLAGS:
                continue
            at, on = MODE_FLAGS[op], self.training and not (self.bn_frozen and "batch_norm" in op)
            if node.args[at] is not on:
                node.args = (*node.args[:at], on, *node.args[at + 1:])
                changed = True
        if changed:
            self.graph.recompile()

    @torch.no_grad()
    def calibrate(self, images: np.ndarray, batch: int = 64) -> None:
        """Set the observers' ranges from ``images`` (float32 (N, 3, H, W) in [0, 1]) in evaluation mode: the grids
        QAT starts from are a post-training student's."""
        was = self.training
        self.eval()
        for i in range(0, len(images), batch):
            self.graph(torch.from_numpy(images[i:i + batch]))
        self.train(was)

    def float_state(self) -> dict[str, torch.Tensor]:
        """The student's own state dict (weights and BatchNorm statistics) as QAT left it: what the int8 targets quantise."""
        state = self.graph.state_dict()
        return {k: state[k].detach().clone() for k in self.keys}


def _batch_norms(graph: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in graph.graph.nodes if n.op == "call_function" and str(n.target) == "aten.batch_norm.default"]


def _stat(bn: torch.fx.Node) -> str:
    """A BatchNorm op's name: its running variance's (``net.features.0.1.running_var``)."""
    return bn.args[4].target


def _nudge_zero_bn_weights(net: nn.Module, to: float = 1e-6) -> None:
    """BatchNorm weights of exactly 0 become ``to``: the QAT rewrite of convolution + BatchNorm divides by them (the
    whole network's output turns NaN: timm's RepViT initialises its residual branches' last BatchNorm at 0). What the
    channel puts out moves by ``to`` times its normalised input, far below int8's rounding."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.masked_fill_(m.weight == 0, to)


def _restore_bn_settings(graph: torch.fx.GraphModule, settings: dict[str, tuple[float, float]]) -> None:
    """Put each BatchNorm's own momentum and eps back where torchao's convolution + BatchNorm rewrite (0.18) wrote its
    defaults (0.1, 1e-5): in the op and in the ``running_var + eps`` that scales the folded weights. torchvision's
    MobileNetV3 uses eps 1e-3; with 1e-5 instead its fake-quantised copy computed other logits (by 880 on logits of 1)."""
    for bn in _batch_norms(graph):
        momentum, eps = settings[_stat(bn)]
        bn.args = (*bn.args[:6], momentum, eps, *bn.args[8:])
        for user in list(bn.args[4].users):
            if user.op == "call_function" and str(user.target) == "aten.add.Tensor" and user.args[0] is bn.args[4]:
                user.args = (user.args[0], eps)
    graph.recompile()


class QatSchedule(LoopHook):
    """Freezes BatchNorm from epoch ``freeze_bn_after`` (0-based: after that many epochs) and the observers from
    ``freeze_observers_after``. A function of the epoch alone, so a resumed run re-applies exactly what it had."""

    def __init__(self, model: FakeQuantStudent, freeze_bn_after: int, freeze_observers_after: int):
        self.model, self.bn_after, self.observers_after = model, freeze_bn_after, freeze_observers_after

    def begin_epoch(self, epoch: int, step: int = 0) -> None:
        if epoch >= self.bn_after:
            self.model.freeze_bn()
        if epoch >= self.observers_after:
            self.model.freeze_observers()

    def end_epoch(self, epoch: int) -> dict:
        return {"bn_frozen": self.model.bn_frozen, "observers_frozen": epoch >= self.observers_after}
