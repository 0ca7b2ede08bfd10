"""How big a model is: its parameters and its multiply-accumulates for one image, counted by PyTorch's own
``FlopCounterMode`` (convolutions, depthwise included, and matrix products; it counts 2 FLOPs per MAC)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgedistill.data.transforms import hw
from edgedistill.models.timm_zoo import reparameterize


def parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def macs(model: nn.Module, image_size) -> int | None:
    """MACs of one forward pass on one ``image_size`` image (CPU, eval copy); ``None`` when PyTorch sees no
    operation it can count (a wrapped ONNX model, say): the count would be a false zero."""
    net = copy.deepcopy(model).cpu().float().eval()
    h, w = hw(image_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, h, w))
    flops = counter.get_total_flops()
    return int(flops // 2) or None


def model_stats(model: nn.Module, image_size) -> dict:
    """``{"parameters", "macs"}`` of ``model`` at ``image_size`` (parameters ``None`` for a model holding none), in
    the form it is exported in: a reparameterisable network (MobileOne, FastViT, RepViT) fused, as it ships."""
    net = copy.deepcopy(model).cpu().float().eval()
    reparameterize(net)
    return {"parameters": parameters(net) or None, "macs": macs(net, image_size)}
