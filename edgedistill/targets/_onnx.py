"""What the ONNX targets share: their base class, the input / output contract, metadata, saving, and the
ONNX Runtime runner that validation uses for them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from edgedistill.fsio import atomic_path
from edgedistill.targets._base import Target, hw

if TYPE_CHECKING:
    import numpy as np
    import onnx

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
NORMALIZATION_NOTE = "inside the model: feed RGB float32 in [0,1], NCHW"


class OnnxTarget(Target):
    """A target whose files[0] ONNX Runtime loads (``.onnx`` or ``.ort``): validated in a CPU session."""

    packages = ("onnx", "onnxruntime")
    format_name = "ONNX model"
    runtime_name = "ONNX Runtime"

    def open(self, path: Path, threads: int) -> "OrtRunner":
        return OrtRunner.load(path, threads)


def onnx_metadata(class_names: Sequence[str], image_size, mean, std, recipe_digest: str) -> dict[str, str]:
    """The ``metadata_props`` every exported file carries (all values are strings; lists and dicts are JSON).

    ``preprocessing`` is :func:`edgedistill.transforms.eval_preprocessing` of ``image_size``: the exact image
    preprocessing validation used (resize rule, crop, interpolation); docs/deploy.md's snippet applies it."""
    from edgedistill import __version__
    from edgedistill.transforms import eval_preprocessing

    h, w = hw(image_size)
    return {
        "class_names": json.dumps([str(c) for c in class_names]),
        "num_classes": str(len(class_names)),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_size": json.dumps([3, h, w]),
        "input_layout": "NCHW",
        "input_dtype": "float32",
        "input_range": "[0, 1]",
        "mean": json.dumps([float(v) for v in mean]),
        "std": json.dumps([float(v) for v in std]),
        "normalization": NORMALIZATION_NOTE,
        "preprocessing": json.dumps(eval_preprocessing((h, w))),
        "recipe_digest": str(recipe_digest),
        "edgedistill_version": __version__,
    }


def read_metadata(path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file as a dict (weights are not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def set_metadata(model: "onnx.ModelProto", metadata: Mapping[str, str]) -> None:
    """Add ``metadata`` to the model's ``metadata_props`` (same key: the new value wins)."""
    merged = {p.key: p.value for p in model.metadata_props}
    merged.update({str(k): str(v) for k, v in metadata.items()})
    del model.metadata_props[:]
    for k, v in merged.items():
        model.metadata_props.add(key=k, value=v)


def save_model(model: "onnx.ModelProto", path: Path, metadata: Mapping[str, str] | None = None, *, full_check: bool = False) -> None:
    """Stamp producer and ``metadata``, run the ONNX checker and write one self-contained file atomically."""
    import onnx

    from edgedistill import __version__

    set_metadata(model, metadata or {})
    model.producer_name, model.producer_version = "edgedistill", __version__
    onnx.checker.check_model(model, full_check=full_check)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp), save_as_external_data=False)


def make_session(path, threads: int):
    """A CPU InferenceSession with ``threads`` intra-op threads and one inter-op thread (.onnx or .ort).

    Its threads spin only while a run is in progress: by default they go on spinning after it, and when
    several sessions are timed in turns (the variants in validation, the candidates of a pick) the previous
    session's spinning threads take the cores from the one being timed, inflating its batch-1 latency.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OrtRunner:
    """Runs an ORT session on NCHW batches, splitting into the model's fixed batch size if it has one."""

    def __init__(self, session):
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.shape = list(inp.shape)
        self.fixed_batch = self.shape[0] if self.shape and isinstance(self.shape[0], int) and self.shape[0] > 0 else None

    @classmethod
    def load(cls, path, threads: int) -> "OrtRunner":
        return cls(make_session(path, threads))

    def incompatible(self, chw) -> str | None:
        if len(self.shape) != 4:
            return f"input '{self.input_name}' has rank {len(self.shape)}, expected NCHW"
        for want, got in zip(self.shape[1:], chw):
            if isinstance(want, int) and want > 0 and want != got:
                return f"input '{self.input_name}' expects shape {self.shape}, test images are {list(chw)}"
        return None

    def run_once(self, x: "np.ndarray") -> "np.ndarray":
        return self.session.run(None, {self.input_name: x})[0]

    def run(self, x: "np.ndarray", batch: int) -> "np.ndarray":
        import numpy as np

        step = self.fixed_batch or batch
        outs = []
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            if self.fixed_batch and len(chunk) < step:  # pad the last chunk of a fixed-batch model
                pad = np.concatenate([chunk, np.repeat(chunk[-1:], step - len(chunk), axis=0)])
                outs.append(self.run_once(pad)[: len(chunk)])
            else:
                outs.append(self.run_once(chunk))
        return np.concatenate(outs).astype(np.float32, copy=False)
