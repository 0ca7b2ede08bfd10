"""Reading weights: ``torch.load`` that never runs code, and a state_dict fitted to a model with a one-line
reason when it does not fit."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from edgedistill.base.errors import InputError, first_line


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
