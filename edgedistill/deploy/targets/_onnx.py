"""What the ONNX targets share: their base class, the input / output contract, metadata, saving, and the
ONNX Runtime runner that validation uses for them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from edgedistill.deploy.targets._base import Target
from edgedistill.models.onnx_export import INPUT_NAME, NORMALIZATION_NOTE, OUTPUT_NAME
from edgedistill.data.transforms import hw

if TYPE_CHECKING:
    import numpy as np

class OnnxTarget(Target):
    """A target whose files[0] ONNX Runtime loads (``.onnx`` or ``.ort``): validated in a CPU session."""

    packages = ("onnx", "onnxruntime")
    format_name = "ONNX model"
    runtime_name = "ONNX Runtime"

    def open(self, path: Path, threads: int) -> "OrtRunner":
        return OrtRunner.load(path, threads)


def onnx_metadata(class_names: Sequence[str], image_size, mean, std, recipe_digest: str) -> dict[str, str]:
    """The ``metadata_props`` every exported file carries (all values are strings; lists and dicts are JSON).

    ``preprocessing`` is :func:`edgedistill.data.transforms.eval_preprocessing` of ``image_size``: the exact image
    preprocessing validation used (resize rule, crop, interpolation); docs/deploy.md's snippet applies it."""
    from edgedistill import __version__
    from edgedistill.data.transforms import eval_preprocessing

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
