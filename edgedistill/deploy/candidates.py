"""The picker's timing table, measured here: every candidate student built untrained, exported as the export stage
exports it (and quantised for an int8 target), then timed in ONNX Runtime with the target's threads and batch.

Untrained weights give the same graph, and so the same speed, as trained ones; after one training step on random
images (:func:`as_trained`) also the same file size. int8 is calibrated on random images for the same reason (the
ranges change numbers, not which kernels run). The export, its metadata and the quantisation settings are the
export stage's, so a candidate's file is the size the trained student's will be. This machine's CPU stands in
for the device: the table ranks candidates the way the device would when both run the same kernels (an x86
server for an x86 server, an ARM CPU for an ARM CPU), but an NPU or a CPU with other int8 / fp16 kernels can
rank them differently, and absolute milliseconds carry over only to the same kind of CPU (docs/recipe.md).
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from edgedistill.base.errors import InputError
from edgedistill.models.macs import model_stats
from edgedistill.models.students import build_student
from edgedistill.deploy.pick import candidate_specs, label
from edgedistill.data.transforms import hw
from edgedistill.deploy.targets._onnx import OrtRunner
from edgedistill.models.onnx_export import export_onnx
from edgedistill.deploy.targets.int8 import quantize_int8
from edgedistill.base.timing import interleaved, spread

ROUNDS = 7
ROUND_SECONDS = 0.15
CALIBRATION_IMAGES = 16


def time_candidates(archs: Sequence[str], target: Any, *, num_classes: int, image_size, mean, std, small_input="auto",
                    metadata: Mapping[str, str], calibration_method: str = "minmax", seed: int = 0, rounds: int = ROUNDS,
                    round_seconds: float = ROUND_SECONDS, progress: Callable[[str], None] = lambda _: None) -> dict:
    """The timing table of every (arch, width) of ``archs`` for ``target`` (a ``student.target`` section):
    ``{"target", "settings", "rows": [{"arch", "width", "parameters", "macs", "size_mb", "latency_ms": spread}],
    "skipped": [{"arch", "width", "reason"}]}`` (a candidate that does not build at this size or export).

    ``metadata`` and ``calibration_method``: what the export stage will give the student's files."""
    h, w = hw(image_size)
    rng = np.random.default_rng(seed)
    x = rng.random((target.batch, 3, h, w), dtype=np.float32)
    rows, runners, skipped = [], {}, []
    with tempfile.TemporaryDirectory(prefix="edgedistill-pick-") as td:
        for i, (arch, width) in enumerate(candidate_specs(archs)):
            torch.manual_seed(seed)
            row = {"arch": arch, "width": width}
            calibration = rng.random((CALIBRATION_IMAGES, 3, h, w), dtype=np.float32)
            progress(f"exporting {label(row)}")
            path = Path(td) / f"c{i}.onnx"
            try:
                model = build_student(arch, num_classes, image_size=image_size, mean=mean, std=std, width=width,
                                      small_input=small_input)
                as_trained(model, calibration, num_classes)
                row.update(model_stats(model, image_size))
                export_onnx(model, path, image_size=image_size, metadata=metadata)
                if target.precision == "int8":
                    quantize_int8(path, path.with_suffix(".int8.onnx"), calibration, calibration_method)
                    path = path.with_suffix(".int8.onnx")
            except InputError as e:  # an architecture this input size or the exporter refuses: not a candidate here
                skipped.append({"arch": arch, "width": width, "reason": str(e)})
                progress(f"skipped {label(row)}: {e}")
                continue
            row["size_mb"] = round(path.stat().st_size / 1e6, 4)
            runners[len(rows)] = OrtRunner.load(path, target.threads)
            rows.append(row)
        progress(f"timing {len(rows)} candidates, {rounds} interleaved rounds")
        samples = interleaved({i: (lambda r=r: r.run_once(x)) for i, r in runners.items()}, rounds=rounds,
                              min_seconds=round_seconds, warmup=3)
    for i, row in enumerate(rows):
        row["latency_ms"] = spread([1000.0 * s for s in samples[i]])
    return {"target": target.model_dump(), "rows": rows, "skipped": skipped,
            "settings": {"rounds": rounds, "round_seconds": round_seconds, "image_size": list(hw(image_size)),
                         "num_classes": num_classes, "machine": platform.processor() or platform.machine(),
                         "torch_threads": torch.get_num_threads()}}


def as_trained(model: torch.nn.Module, images: np.ndarray, num_classes: int) -> torch.nn.Module:
    """One training step of a fresh ``model`` on ``images`` (random labels), then evaluation mode.

    Its file is then the size a trained student's is. A fresh network holds many equal tensors (zero biases, unit BN
    scales, zero BN means that fold into zero biases), which the exporter and ONNX Runtime store once: untrained,
    mobilenet_v3_small ×0.5 at 16 px exported 0.526 MB in int8, trained 0.612 MB, so the picker chose it for a
    0.6 MB target that its trained file missed. After one step no two tensors are alike, and the graph is unchanged.
    """
    model.train()
    x = torch.from_numpy(images)
    labels = torch.arange(len(x)) % num_classes
    torch.nn.functional.cross_entropy(model(x), labels).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.01 * p.grad)
                p.grad = None
    return model.eval()
