"""edge: a batch-1 model for ONNX Runtime Mobile, in ORT format, and how much NNAPI / CoreML could run.

Writes ``student.b1.ort`` (what validation runs, in ONNX Runtime like any model), ``student.b1.onnx``
(``student.onnx`` with the batch fixed to 1, what NNAPI / CoreML want) and
``student.b1.required_operators.config`` (to build a size-reduced ORT). Its info's ``usability`` says
how many nodes the NNAPI (Android) and CoreML (iOS) execution providers could take, in how many partitions.
Gate: PyTorch parity, like fp32.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from edgedistill.base.errors import InputError, first_line
from edgedistill.base.fsio import atomic_path
from edgedistill.deploy.targets._base import BuildContext, log, register
from edgedistill.data.transforms import hw
from edgedistill.base.console import quiet
from edgedistill.deploy.targets._onnx import OnnxTarget, read_metadata
from edgedistill.models.onnx_export import save_model


@register
class Edge(OnnxTarget):
    name = "edge"
    files = ("student.b1.ort", "student.b1.onnx", "student.b1.required_operators.config")
    requires = ("fp32",)
    format_name = "ORT-format model"
    deploy_to = ("edge",)  # batch 1, ORT format: for ONNX Runtime Mobile and minimal builds

    def build(self, ctx: BuildContext) -> dict:
        ort_path, b1_path, config_path = (ctx.out_dir / f for f in self.files)
        make_batch_fixed(ctx.file_of("fp32"), b1_path, (1, 3, *hw(ctx.image_size)))
        convert_to_ort(b1_path, ort_path, config_path)
        try:
            usability = mobile_usability(b1_path)
        except Exception as e:  # noqa: BLE001 - the summary is advisory; the files above are what matter
            log.warning("ORT mobile usability check failed on %s (%s)", b1_path.name, first_line(e))
            usability = {"error": first_line(e)}
        info = {"b1_onnx": b1_path.name, "b1_size_bytes": b1_path.stat().st_size, "ort": ort_path.name,
                "ort_size_bytes": ort_path.stat().st_size, "required_operators_config": config_path.name,
                "usability": usability}
        return info


def make_batch_fixed(src, dst, shape: Sequence[int]) -> None:
    """Copy of ``src`` whose input has the fixed ``shape`` (output shapes re-inferred)."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    model = onnx.load(str(src))
    make_input_shape_fixed(model.graph, model.graph.input[0].name, list(shape))
    fix_output_shapes(model)
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    save_model(model, Path(dst), {**read_metadata(src), "batch": str(shape[0])}, full_check=True)


def convert_to_ort(onnx_path, ort_path, config_path) -> None:
    """ONNX → ORT format with onnxruntime.tools.convert_onnx_models_to_ort (fixed optimisations, generic CPU).

    Runs in a temp folder and copies the ``.ort`` file and the required-operators config to ``ort_path``
    and ``config_path`` atomically.
    """
    onnx_path = Path(onnx_path)
    with tempfile.TemporaryDirectory(prefix="edgedistill-ort-") as td:
        try:
            with quiet():
                from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

                convert_onnx_models_to_ort(onnx_path, output_dir=Path(td), optimization_styles=[OptimizationStyle.Fixed])
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{onnx_path.name}: conversion to ORT format failed ({first_line(e)})") from None
        made = sorted(Path(td).rglob("*"))
        for suffix, dst in ((".ort", ort_path), (".required_operators.config", config_path)):
            src = next((p for p in made if p.name.endswith(suffix)), None)
            if src is None:
                raise InputError(f"{onnx_path.name}: conversion to ORT format wrote no {suffix} file")
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)


def mobile_usability(onnx_path) -> dict:
    """How much of the model ORT Mobile's NNAPI (Android) and CoreML (iOS) EPs could take.

    Calls the partition checks behind ``python -m onnxruntime.tools.check_onnx_model_mobile_usability``
    on the model optimised to ORT's basic level, as that tool does.
    """
    import onnx

    with quiet():
        from onnxruntime.tools.mobile_helpers import usability_checker as uc
        from onnxruntime.tools.onnx_model_utils import optimize_model

        with tempfile.TemporaryDirectory(prefix="edgedistill-usability-") as td:
            optimized = Path(td) / Path(onnx_path).name
            optimize_model(Path(onnx_path), optimized)
            model = onnx.shape_inference.infer_shapes(onnx.load(str(optimized)), strict_mode=True)
        checks = {
            "nnapi": lambda: uc.check_nnapi_partitions(model, require_fixed_input_sizes=True),
            "coreml_mlprogram": lambda: uc.check_coreml_partitions(model, True, "coreml_supported_mlprogram_ops.md"),
            "coreml_neuralnetwork": lambda: uc.check_coreml_partitions(model, True, "coreml_supported_neuralnetwork_ops.md"),
        }
        out = {}
        for key, check in checks.items():
            info = check()
            out[key] = {"nodes": int(info.num_nodes), "supported_nodes": int(info.num_supported_nodes),
                        "partitions": int(info.num_partitions), "unsupported_ops": sorted(info.unsupported_ops),
                        "suitability": info.suitability().name}
    return out
