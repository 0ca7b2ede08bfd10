"""Reliability through the real command line (see docs/reliability.md).

* bad input anywhere (recipe, files, data, teacher, device, run folder): exit 2, one line naming the key
  or file, no traceback;
* resume: a changed recipe is refused unless --force (interruption and exact resume: tests/test_resume.py);
* guards: corrupt checkpoints are reported, never loaded; checkpoints never run code; one process per folder.

Most cases run in-process with click's CliRunner (fast); a few go through ``python -m edgedistill`` in a
subprocess, as a user would.
"""

from __future__ import annotations

import copy
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import TINY
from PIL import Image

from edgedistill.cli import cli
from edgedistill.pipeline.folder import RunFolder

# One thread (in-process and in subprocesses): on a shared 2-core box two threads wait on each other.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "240"}



pytestmark = pytest.mark.usefixtures("isolated")


def write_recipe(folder: Path, name: str = "tiny", **sections) -> Path:
    """TINY with ``sections`` merged in (one level deep: ``data={"source": "npz"}`` updates data)."""
    raw = copy.deepcopy(TINY)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict) and not value.pop("_replace", False):
            raw[key].update(value)
        else:
            raw[key] = value
    raw["name"] = name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def invoke(*args) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(cli, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def assert_bad_input(output: str, exit_code: int, expected: list[str], where: str = "") -> str:
    """Exit 2; the last line is the one ``error:`` line holding every expected piece; no traceback."""
    assert exit_code == 2, f"{where}: exit {exit_code}\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.strip().splitlines() if line.strip()]
    last = lines[-1]
    assert last.startswith("error:") or last.startswith("Error:"), f"{where}: last line is not the error:\n{output[-3000:]}"
    for piece in expected:
        assert piece in last, f"{where}: {piece!r} not in {last!r}"
    return last


def python_m(*args, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgedistill", *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- fixtures: bad files and data


def _npz(path: Path, **arrays) -> Path:
    rng = np.random.default_rng(0)
    d = {
        "x_train": rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8),
        "y_train": np.arange(20) % 4,
        "x_test": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
        "y_test": np.arange(8) % 4,
    }
    d.update(arrays)
    np.savez(path, **{k: v for k, v in d.items() if v is not None})
    return path


def _imagefolder(root: Path, tweak=None) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    if tweak:
        tweak(root)
    return root


class _MeanLinear(torch.nn.Module):
    """Channel means → ``k`` logits: a teacher of any width."""

    def __init__(self, k: int):
        super().__init__()
        self.fc = torch.nn.Linear(3, k)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class _Flat32(torch.nn.Module):
    """Accepts only 3x32x32 images."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _identity_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])), str(path))
    return path


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """Every bad (and convertible) file the table below points at, made once."""
    import torchvision
    import warnings

    from edgedistill.models.students import build_classifier

    d = tmp_path_factory.mktemp("fx")
    # teachers
    (d / "garbage.onnx").write_bytes(b"this is not an ONNX protobuf")
    (d / "garbage.pt2").write_bytes(b"this is not a zip archive")
    (d / "garbage.ts").write_bytes(b"this is not TorchScript")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), d / "resnet18.pt")
    torch.save(build_classifier("resnet18", 5, image_size=8).state_dict(), d / "resnet18_5cls.pt")
    shutil.copy(d / "resnet18.pt", d / "trunc.pt")
    _truncate(d / "trunc.pt")
    (d / "empty.pt").write_bytes(b"")
    torch.save(torch.nn.Linear(2, 2), d / "module.pt")  # a pickled module: refused by weights_only=True
    torch.save([1, 2, 3], d / "list.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(_MeanLinear(5), torch.rand(1, 3, 8, 8)).save(str(d / "five.ts"))
        torch.jit.trace(_Flat32(), torch.rand(1, 3, 32, 32)).save(str(d / "flat32.ts"))
        static = torch.export.export(_MeanLinear(10).eval(), (torch.rand(2, 3, 8, 8),))  # batch fixed at 2
    torch.export.save(static, d / "static_batch.pt2")
    (d / "folder.onnx").mkdir()
    # data
    _npz(d / "labels_negative.npz", y_train=np.arange(20) % 4 - 1)
    _npz(d / "labels_too_big.npz", class_names=np.array(["a", "b", "c"]))
    _npz(d / "empty_test.npz", x_test=np.zeros((0, 8, 8, 3), np.uint8), y_test=np.zeros(0, np.int64))
    _npz(d / "float_images.npz", x_train=np.random.default_rng(0).random((20, 8, 8, 3)).astype(np.float32))
    _npz(d / "two_channels.npz", x_train=np.zeros((20, 8, 8, 2), np.uint8))
    _npz(d / "no_y_test.npz", y_test=None)
    _npz(d / "count_mismatch.npz", y_train=np.arange(19) % 4)
    (d / "fake.npz").write_bytes(b"PK but not really a zip")
    shutil.copy(d / "labels_negative.npz", d / "trunc.npz")
    _truncate(d / "trunc.npz", 0.9)
    (d / "no_cifar").mkdir()
    (d / "bad_cifar" / "cifar-10-batches-py").mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (d / "bad_cifar" / "cifar-10-batches-py" / name).write_bytes(b"not a pickle")
    (d / "a_file").write_text("not a folder")
    _identity_onnx(d / "tiny.onnx")  # a real (binary) ONNX model, to be given where a recipe belongs

    def empty_class(r):
        for p in (r / "train" / "b").iterdir():
            p.unlink()

    def truncated_png(r):
        _truncate(r / "train" / "a" / "0.png")

    _imagefolder(d / "if_empty_class", empty_class)
    _imagefolder(d / "if_text_as_png", lambda r: (r / "train" / "a" / "x.png").write_text("hello"))
    _imagefolder(d / "if_text_file", lambda r: (r / "train" / "a" / "notes.txt").write_text("hello"))
    _imagefolder(d / "if_extra_test_class", lambda r: (r / "test" / "c").mkdir())
    _imagefolder(d / "if_truncated_png", truncated_png)
    (d / "if_no_train").mkdir()
    _imagefolder(d / "if_gray", lambda r: Image.fromarray(np.full((8, 8), 128, np.uint8)).save(r / "train" / "a" / "gray.png"))
    _imagefolder(d / "if_rgba", lambda r: Image.fromarray(np.full((8, 8, 4), 128, np.uint8)).save(r / "train" / "b" / "rgba.png"))
    # recipes that are not recipes
    (d / "broken.yaml").write_text("data: [1, 2\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "python_tag.yaml").write_text(f"name: !!python/object/apply:os.system ['touch {d / 'pwned'}']\n")
    (d / "scalar.yaml").write_text("just a sentence\n")
    (d / "empty.yaml").write_bytes(b"")
    (d / "comments.yaml").write_text("# a recipe\n# (to be written)\n")
    (d / "braces.yaml").write_text("{}\n")
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (d / "latin1.yaml").write_bytes("name: caf\xe9\ndata: {source: digits}\n".encode("latin-1"))
    (d / "dup.yaml").write_text("data: {source: digits}\nseed: 1\ndata: {source: npz}\n")
    (d / "dup_nested.yaml").write_text("data:\n  source: digits\n  batch_size: 8\n  batch_size: 16\n")
    no_source = copy.deepcopy(TINY)
    del no_source["data"]["source"]
    (d / "no_source.yaml").write_text(yaml.safe_dump(no_source))
    unnamed = {k: v for k, v in TINY.items() if k != "name"}
    (d / "my recipe.yaml").write_text(yaml.safe_dump(unnamed))
    return d


def teacher(source: str, path: str, arch: str | None = None, **extra) -> dict:
    return {"_replace": True, "source": source, "path": path, **({"arch": arch} if arch else {}), **extra}


def data(source: str, root: str | None = None, **extra) -> dict:
    return {"source": source, **({"root": root} if root else {}), **extra}


def fresh_run_folder(tmp: Path, recipe_text: str | None = None) -> Path:
    """``tmp/runs/tiny`` as a run folder whose recipe.yaml is TINY resolved, and no stage has finished."""
    from edgedistill.recipe.schema import dump_recipe, validate_recipe

    run = tmp / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe_text if recipe_text is not None else dump_recipe(validate_recipe(copy.deepcopy(TINY))))
    return run


# Each case: (id, recipe, extra CLI args, pieces the one error line must hold).
# * recipe: sections merged into TINY (see write_recipe), or a callable (fx, tmp_path) → the arguments after the command;
# * extra args: a first "@stage" runs that stage instead of `run`; "--out tmp_path/runs" is added unless given;
# * pieces: "{fx}" / "{tmp}" stand for the fixture folder / the test's tmp_path; a piece starting with "!" must NOT be in the line;
# * the id's kind (before "/"): "run/" cases work on a run folder made beforehand; every other case must create nothing at all
#   (the --out folder does not exist afterwards).
BAD_INPUTS = [
    # ---- recipe files that are not recipes (issue items 2 and 3)
    ("recipe/file-missing", lambda fx, tmp: [fx / "nope.yaml"], [], ["nope.yaml", "not found"]),
    ("recipe/not-yaml", lambda fx, tmp: [fx / "broken.yaml"], [], ["broken.yaml", "line", "not valid YAML"]),
    ("recipe/not-a-mapping", lambda fx, tmp: [fx / "list.yaml"], [], ["list.yaml", "expected a mapping", "list"]),
    ("recipe/a-plain-string", lambda fx, tmp: [fx / "scalar.yaml"], [], ["scalar.yaml", "expected a mapping", "a string"]),
    ("recipe/python-tag-never-runs", lambda fx, tmp: [fx / "python_tag.yaml"], [], ["python_tag.yaml", "python/object/apply"]),
    ("recipe/folder-without-recipe-yaml", lambda fx, tmp: [fx / "no_cifar"], [], ["no_cifar", "a folder without recipe.yaml", "give a recipe file or a run folder"]),
    ("recipe/empty-file", lambda fx, tmp: [fx / "empty.yaml"], [], ["empty.yaml", "the recipe is empty", "recipes/quickstart.yaml"]),
    ("recipe/only-comments", lambda fx, tmp: [fx / "comments.yaml"], [], ["comments.yaml", "the recipe is empty"]),
    ("recipe/empty-mapping", lambda fx, tmp: [fx / "braces.yaml"], [], ["braces.yaml", "the recipe is empty"]),
    ("recipe/binary-file", lambda fx, tmp: [fx / "binary.yaml"], [], ["binary.yaml", "not a YAML recipe (not UTF-8 text)"]),
    ("recipe/latin-1-text", lambda fx, tmp: [fx / "latin1.yaml"], [], ["latin1.yaml", "not a YAML recipe (not UTF-8 text)"]),
    ("recipe/an-image", lambda fx, tmp: [fx / "if_gray" / "train" / "a" / "gray.png"], [], ["gray.png", "not a YAML recipe (not UTF-8 text)"]),
    ("recipe/an-onnx-model", lambda fx, tmp: [fx / "tiny.onnx"], [], ["tiny.onnx", "not a YAML recipe", ".onnx", "teacher.path"]),
    ("recipe/a-text-file-named-onnx", lambda fx, tmp: [fx / "garbage.onnx"], [], ["garbage.onnx", "not a YAML recipe", ".onnx"]),
    ("recipe/a-checkpoint", lambda fx, tmp: [fx / "resnet18.pt"], [], ["resnet18.pt", "not a YAML recipe", ".pt"]),
    ("recipe/a-pt2-program", lambda fx, tmp: [fx / "static_batch.pt2"], [], ["static_batch.pt2", "not a YAML recipe", ".pt2"]),
    ("recipe/an-npz-archive", lambda fx, tmp: [fx / "labels_negative.npz"], [], ["labels_negative.npz", "not a YAML recipe", "data.root"]),
    ("recipe/key-given-twice", lambda fx, tmp: [fx / "dup.yaml"], [], ["dup.yaml", "line 3", "key 'data' is given twice", "first on line 1"]),
    ("recipe/nested-key-given-twice", lambda fx, tmp: [fx / "dup_nested.yaml"], [], ["dup_nested.yaml", "key 'batch_size' is given twice"]),
    ("recipe/no-data-source", lambda fx, tmp: [fx / "no_source.yaml"], [], ["no_source.yaml", "data.source: not set", "what it distills"]),
    ("recipe/file-name-cannot-name-the-run", lambda fx, tmp: [fx / "my recipe.yaml"], [], ["my recipe.yaml", "name: not set", "'my recipe'"]),
    # ---- recipe keys and values
    ("recipe/unknown-key", {}, ["--set", "data.batch_sise=3"], ["data.batch_sise", "did you mean 'batch_size'"]),
    ("recipe/unknown-section", {"dat": {"source": "digits"}}, [], ["'dat'", "did you mean 'data'"]),
    ("recipe/section-is-a-value", {"data": 3}, [], ["data:", "expected a section of keys", "got 3"]),
    ("recipe/wrong-type", {}, ["--set", "data.batch_size=many"], ["data.batch_size", "integer", "'many'"]),
    ("recipe/r-above-0.5", {}, ["--set", "energy.fraction=0.7"], ["energy.fraction", "0.5", "0.7"]),
    ("recipe/T+t_minus<=0", {}, ["--set", "distill.loss.temperature=2", "--set", "distill.loss.t_minus=-2"], ["distill.loss.t_minus", "2.0 + -2.0", "must be > 0"]),
    ("recipe/empty-formats", {}, ["--set", "export.formats=[]"], ["export.formats", "at least 1"]),
    ("recipe/empty-parity-batches", {}, ["--set", "validate.parity_batches=[]"], ["validate.parity_batches", "at least 1"]),
    ("recipe/negative-epochs", {}, ["--set", "distill.epochs=-1"], ["distill.epochs", "greater than or equal to 1", "-1"]),
    ("recipe/teacher-epochs-zero", {}, ["--set", "teacher.train.epochs=0"], ["teacher.train.epochs", "greater than or equal to 1"]),
    ("recipe/unknown-student", {}, ["--set", "student.arch=mobilenetv2"], ["student.arch", "did you mean 'mobilenet_v2'"]),
    ("recipe/unknown-loss", {}, ["--set", "distill.loss.name=kdd"], ["distill.loss.name", "did you mean 'kd'"]),
    ("recipe/unknown-loss-param", {}, ["--set", "distill.loss.temprature=3"], ["distill.loss.temprature", "did you mean 'temperature'"]),
    ("recipe/unknown-data-source", {}, ["--set", "data.source=cifar"], ["data.source", "unknown data source 'cifar'", "known:"]),
    ("recipe/unknown-teacher-source", {}, ["--set", "teacher.source=onnxx"], ["teacher.source", "did you mean 'onnx'"]),
    ("recipe/unknown-augmentation", {}, ["--set", "augment.method=cutmx"], ["augment.method", "did you mean 'cutmix'"]),
    ("recipe/unknown-export-target", {}, ["--set", "export.formats=[fp32, int4]"], ["export.formats", "unknown export target 'int4'", "did you mean 'int8'"]),
    ("recipe/target-needs-another", {}, ["--set", "export.formats=[int8]"], ["export.formats:", "fp32 is required by int8", "!formats.formats"]),
    ("recipe/target-twice", {}, ["--set", "export.formats=[fp32, fp32]"], ["export.formats:", "duplicates", "!formats.formats"]),
    ("recipe/unknown-export-key", {}, ["--set", "export.edge=true"], ["export.edge", "unknown key", "formats"]),
    ("recipe/opset-too-old", {}, ["--set", "export.opset=13"], ["export.opset", "18", "13"]),
    ("recipe/auto-without-budget", {}, ["--set", "augment.fraction=auto"], ["augment.fraction", "'auto' needs a budget"]),
    ("recipe/budget-of-both-kinds", {"augment": {"fraction": "auto", "budget": {"max_overhead": 0.1, "max_minutes": 5}}}, [], ["augment.budget", "exactly one"]),
    ("recipe/budget-range-reversed", {"augment": {"fraction": "auto", "budget": {"max_overhead": 0.1, "range": [0.5, 0.1]}}}, [], ["augment.budget.range", "above"]),
    ("recipe/multistep-without-milestones", {}, ["--set", "distill.schedule.name=multistep"], ["distill.schedule.milestones", "at least one milestone"]),
    ("recipe/milestone-beyond-epochs", {"distill": {"schedule": {"name": "multistep", "milestones": [5]}}}, [], ["distill.schedule.milestones", "beyond epochs=2"]),
    ("recipe/warmup-not-below-epochs", {}, ["--set", "distill.schedule.warmup_epochs=2"], ["distill.schedule.warmup_epochs", "must be < epochs=2"]),
    ("recipe/image-size-too-small", {}, ["--set", "data.image_size=4"], ["data.image_size", "greater than or equal to 8", "got 4"]),
    # ---- messages in plain words: no regular expression, no union tag, no type or class name (issue item 4)
    ("words/name-with-a-slash", {}, ["--set", "name=a/b"], ["name:", "letters, digits", "'a/b'", "!pattern", "!^["]),
    ("words/union-of-bool-and-auto", {}, ["--set", "student.small_input=maybe"], ["student.small_input", "expected true, false or 'auto'", "'maybe'", "!bool"]),
    ("words/union-of-number-and-auto", {}, ["--set", "augment.fraction=half"], ["augment.fraction:", "expected a number or 'auto'", "'half'", "!constrained"]),
    ("words/choice", {}, ["--set", "energy.direction=backwards"], ["energy.direction", "expected 'paper' or 'reversed'", "'backwards'"]),
    ("words/optimizer-choice", {}, ["--set", "distill.optimizer.name=adam"], ["distill.optimizer.name", "expected 'sgd' or 'adamw'", "'adam'"]),
    ("words/calibration-choice", {}, ["--set", "export.int8.calibration.method=best"], ["export.int8.calibration.method", "'minmax', 'entropy', 'percentile' or 'auto'"]),
    ("words/not-a-file-path", {}, ["--set", "teacher.path=[1]"], ["teacher.path", "expected a file path", "!<class"]),
    ("words/list-item", {}, ["--set", "export.formats=[fp32, 3]"], ["export.formats[1]", "expected a string", "got 3"]),
    ("words/whole-number", {}, ["--set", "distill.epochs=1.5"], ["distill.epochs", "expected a whole number", "1.5"]),
    ("words/boolean", {}, ["--set", "data.hflip=maybe"], ["data.hflip", "expected true or false", "'maybe'"]),
    ("words/three-values", {"teacher": {"normalize": {"mean": [0.5, 0.5], "std": [1, 1, 1]}}}, [], ["teacher.normalize.mean", "expected 3 values", "[0.5, 0.5]", "!.2"]),
    ("words/missing-key", {"teacher": {"normalize": {"mean": [0.5, 0.5, 0.5]}}}, [], ["teacher.normalize.std", "missing"]),
    ("words/loss-parameter-type", {}, ["--set", "distill.loss.temperature=hot"], ["distill.loss.temperature", "expected a number", "'hot'", "!float"]),
    ("words/budget-flag", {"augment": {"fraction": "auto", "budget": {"max_overhead": 0.1, "strict": "maybe"}}}, [], ["augment.budget.strict", "expected true or false"]),
    # ---- keys that the rest of the recipe would silently ignore (issue item 2)
    ("ignored/root-for-digits", {"data": {"root": "{fx}/labels_negative.npz"}}, [], ["data.root", "would be ignored", "'digits' reads no files"]),
    ("ignored/root-without-source", {"data": {"_replace": True, "root": "{fx}/labels_negative.npz"}}, [], ["data.source", "not set, but data.root is"]),
    ("ignored/path-for-a-trained-teacher", {"teacher": {"path": "{fx}/resnet18.pt"}}, [], ["teacher.path", "would be ignored", "'train' trains its teacher here"]),
    ("ignored/arch-for-onnx", {"teacher": teacher("onnx", "{fx}/garbage.onnx", "resnet18")}, [], ["teacher.arch", "would be ignored", "'onnx'"]),
    ("ignored/arch-for-torchscript", {"teacher": teacher("torchscript", "{fx}/five.ts", "resnet18")}, [], ["teacher.arch", "would be ignored", "'torchscript'"]),
    ("ignored/arch-for-export", {"teacher": teacher("export", "{fx}/static_batch.pt2", "resnet18")}, [], ["teacher.arch", "would be ignored", "'export'"]),
    ("ignored/small-input-for-a-file-teacher", {"teacher": teacher("onnx", "{fx}/garbage.onnx", small_input=True)}, [], ["teacher.small_input", "would be ignored"]),
    ("ignored/train-for-a-file-teacher", {"teacher": teacher("torchscript", "{fx}/five.ts", train={"epochs": 3})}, [], ["teacher.train", "would be ignored", "only source 'train'"]),
    ("ignored/budget-with-a-fixed-fraction", {"augment": {"budget": {"max_overhead": 0.2}}}, [], ["augment.budget", "would be ignored", "fixed at 0.2", "fraction: auto"]),
    ("ignored/fraction-with-selection-all", {}, ["--set", "augment.selection=all"], ["augment.fraction", "would be ignored", "selection 'all'"]),
    ("ignored/selection-without-fraction", {"augment": {"fraction": 0, "selection": "low"}}, [], ["augment.selection", "augment.fraction is 0"]),
    ("ignored/weight-without-fraction", {"augment": {"fraction": 0, "weight": 0.5}}, [], ["augment.weight", "augment.fraction is 0"]),
    ("ignored/milestones-with-cosine", {}, ["--set", "distill.schedule.milestones=[1]"], ["distill.schedule.milestones", "would be ignored", "'cosine'"]),
    ("ignored/gamma-with-constant", {}, ["--set", "teacher.train.schedule={name: constant, gamma: 0.5}"], ["teacher.train.schedule.gamma", "would be ignored"]),
    ("ignored/momentum-with-adamw", {}, ["--set", "distill.optimizer={name: adamw, momentum: 0.5}"], ["distill.optimizer.momentum", "only sgd uses it"]),
    ("ignored/nesterov-with-adamw", {}, ["--set", "teacher.train.optimizer={name: adamw, nesterov: false}"], ["teacher.train.optimizer.nesterov", "only sgd uses it"]),
    ("ignored/shufflenet-width", {}, ["--set", "student.width=0.5"], ["student.width", "no width multiplier", "0.5"]),
    ("ignored/shufflenet-dropout", {}, ["--set", "student.dropout=0.1"], ["student.dropout", "would be ignored", "no dropout"]),
    ("ignored/calibration-without-int8", {}, ["--set", "export.int8.calibration.samples=64"], ["export.int8", "would be ignored", "no int8"]),
    ("ignored/int8-gate-without-int8", {}, ["--set", "validate.max_int8_drop=2"], ["validate.max_int8_drop", "would be ignored", "no int8"]),
    ("ignored/fp16-gate-without-fp16", {}, ["--set", "validate.max_fp16_drop=2"], ["validate.max_fp16_drop", "would be ignored", "no fp16"]),
    ("ignored/sync-bn-on-the-cpu", {}, ["--set", "distill.sync_bn=true"], ["distill.sync_bn", "would be ignored", "device is cpu"]),
    ("ignored/energy-direction-with-kd", {"energy": {"direction": "reversed"}}, ["--set", "distill.loss={name: kd}"], ["energy.direction", "would be ignored", "loss 'kd' uses no energy groups"]),
    # ---- files (teacher)
    ("file/teacher-missing", {"teacher": teacher("onnx", "{fx}/nope.onnx")}, [], ["teacher.path", "nope.onnx", "not found", "ONNX model file"]),
    ("file/teacher-is-a-folder", {"teacher": teacher("onnx", "{fx}/folder.onnx")}, [], ["teacher.path", "folder.onnx", "is a folder, expected an ONNX model file"]),
    ("file/pt2-is-a-folder", {"teacher": teacher("export", "{fx}/no_cifar")}, [], ["teacher.path", "no_cifar", "is a folder, expected a torch.export program"]),
    ("file/torchscript-missing", {"teacher": teacher("torchscript", "{fx}/nope.ts")}, [], ["teacher.path", "nope.ts", "not found", "TorchScript file"]),
    ("file/onnx-garbage", {"teacher": teacher("onnx", "{fx}/garbage.onnx")}, [], ["teacher.path", "garbage.onnx", "not a loadable ONNX model"]),
    ("file/torchscript-garbage", {"teacher": teacher("torchscript", "{fx}/garbage.ts")}, [], ["teacher.path", "garbage.ts", "not a TorchScript file"]),
    ("file/pt2-garbage", {"teacher": teacher("export", "{fx}/garbage.pt2")}, [], ["teacher.path", "garbage.pt2", "not a torch.export"]),
    ("file/pt2-is-a-state-dict", {"teacher": teacher("export", "{fx}/resnet18.pt")}, [], ["teacher.path", "resnet18.pt", "not a torch.export"]),
    ("file/state-dict-other-arch", {"teacher": teacher("torchvision", "{fx}/resnet18.pt", "mobilenet_v2")}, [], ["teacher.path", "resnet18.pt", "'mobilenet_v2'", "missing key", "another architecture"]),
    ("file/state-dict-other-classes", {"teacher": teacher("torchvision", "{fx}/resnet18_5cls.pt", "resnet18")}, [], ["resnet18_5cls.pt", "10 classes", "fc.weight (5, 512) in the file, (10, 512) in the model"]),
    ("file/checkpoint-truncated", {"teacher": teacher("torchvision", "{fx}/trunc.pt", "resnet18")}, [], ["trunc.pt", "corrupt, truncated"]),
    ("file/timm-checkpoint-other-classes", {"teacher": teacher("timm", "{fx}/resnet18_5cls.pt", "resnet18")}, [],
     ["teacher.path", "resnet18_5cls.pt", "does not fit timm model 'resnet18' with 10 classes", "fc.weight"]),
    ("file/timm-checkpoint-truncated", {"teacher": teacher("timm", "{fx}/trunc.pt", "resnet18")}, [], ["trunc.pt", "not a readable timm checkpoint"]),
    ("recipe/timm-unknown-teacher", {"teacher": teacher("timm", "{fx}/resnet18_5cls.pt", "resnet1")}, [], ["teacher.arch", "timm has no model 'resnet1'"]),
    ("file/checkpoint-empty", {"teacher": teacher("torchvision", "{fx}/empty.pt", "resnet18")}, [], ["empty.pt", "corrupt, truncated"]),
    ("file/checkpoint-pickled-module", {"teacher": teacher("torchvision", "{fx}/module.pt", "resnet18")}, [], ["module.pt", "pickled Python objects", "weights_only"]),
    ("file/checkpoint-not-a-dict", {"teacher": teacher("torchvision", "{fx}/list.pt", "resnet18")}, [], ["list.pt", "holds a list", "expected a state_dict"]),
    ("file/torchscript-as-state-dict", {"teacher": teacher("torchvision", "{fx}/five.ts", "resnet18")}, [], ["five.ts", "TorchScript archive", "teacher.source: torchscript"]),
    # ---- teacher does not fit the data, or is not described fully
    ("teacher/5-outputs-for-10-classes", {"teacher": teacher("torchscript", "{fx}/five.ts")}, [], ["teacher.path", "five.ts", "(2, 5)", "expected (2, 10)", "10 classes in the data"]),
    ("teacher/static-batch-export", {"teacher": teacher("export", "{fx}/static_batch.pt2")}, [], ["teacher.path", "static_batch.pt2", "batch of 3", "dynamic batch axis"]),
    ("teacher/input-size", {"teacher": teacher("torchscript", "{fx}/flat32.ts")}, [], ["teacher.path", "flat32.ts", "3x8x8", "cannot be multiplied"]),
    ("teacher/unknown-torchvision-arch", {"teacher": teacher("torchvision", "{fx}/resnet18.pt", "resnet1000")}, [], ["teacher.arch", "'resnet1000'", "did you mean"]),
    ("teacher/unknown-arch-to-train", {}, ["--set", "teacher.arch=resnet1000"], ["teacher.arch", "'resnet1000'", "or a torchvision classifier"]),
    ("teacher/file-source-without-path", {"teacher": {"_replace": True, "source": "onnx"}}, [], ["teacher.path", "'onnx' needs a file path", "ONNX model file"]),
    ("teacher/torchvision-without-arch", {"teacher": teacher("torchvision", "{fx}/resnet18.pt")}, [], ["teacher.arch", "needs an architecture name"]),
    # ---- data
    ("data/npz-missing", {"data": data("npz", "{fx}/nope.npz")}, [], ["data.root", "nope.npz", "not found", "a .npz file"]),
    ("data/npz-no-root", {"data": data("npz")}, [], ["data.root", "'npz' needs a .npz file"]),
    ("data/npz-root-is-a-folder", {"data": data("npz", "{fx}/no_cifar")}, [], ["data.root", "no_cifar", "is a folder, expected a .npz file", "!not found"]),
    ("data/cifar-root-is-a-file", {"data": data("cifar10", "{fx}/a_file")}, [], ["data.root", "a_file", "is a file, expected a folder", "CIFAR-10", "!not found"]),
    ("data/cifar-root-missing", {"data": data("cifar100", "{fx}/nope")}, [], ["data.root", "nope", "not found", "CIFAR-100"]),
    ("data/cifar-no-root", {"data": data("cifar100")}, [], ["data.root", "'cifar100' needs a folder"]),
    ("data/imagefolder-root-is-a-file", {"data": data("imagefolder", "{fx}/a_file")}, [], ["data.root", "a_file", "is a file, expected a folder with train/ and test/"]),
    ("data/imagefolder-no-root", {"data": data("imagefolder")}, [], ["data.root", "'imagefolder' needs a folder"]),
    ("data/npz-garbage", {"data": data("npz", "{fx}/fake.npz")}, [], ["data.root", "fake.npz", "not a .npz file"]),
    ("data/npz-truncated", {"data": data("npz", "{fx}/trunc.npz")}, [], ["data.root", "trunc.npz", "truncated"]),
    ("data/npz-labels-negative", {"data": data("npz", "{fx}/labels_negative.npz")}, [], ["labels_negative.npz", "y_train", "0..3", "-1..2"]),
    ("data/npz-labels-out-of-range", {"data": data("npz", "{fx}/labels_too_big.npz")}, [], ["labels_too_big.npz", "y_train", "0..2", "0..3"]),
    ("data/npz-empty-split", {"data": data("npz", "{fx}/empty_test.npz")}, [], ["empty_test.npz", "empty split", "test 0"]),
    ("data/npz-float-images", {"data": data("npz", "{fx}/float_images.npz")}, [], ["float_images.npz", "x_train", "uint8", "float32"]),
    ("data/npz-two-channels", {"data": data("npz", "{fx}/two_channels.npz")}, [], ["two_channels.npz", "x_train", "(N, H, W, 3)", "(20, 8, 8, 2)"]),
    ("data/npz-missing-array", {"data": data("npz", "{fx}/no_y_test.npz")}, [], ["no_y_test.npz", "lacks y_test"]),
    ("data/npz-count-mismatch", {"data": data("npz", "{fx}/count_mismatch.npz")}, [], ["count_mismatch.npz", "20/8 images but 19/8 labels"]),
    ("data/cifar-files-corrupt", {"data": data("cifar10", "{fx}/bad_cifar")}, [], ["data.root", "bad_cifar/cifar-10-batches-py", "cannot read the CIFAR10 files", "corrupt"]),
    ("data/cifar-files-missing", {"data": data("cifar10", "{fx}/no_cifar")}, [], ["data.root", "no_cifar/cifar-10-batches-py", "data_batch_1", "never downloads"]),
    ("data/imagefolder-empty-class", {"data": data("imagefolder", "{fx}/if_empty_class")}, [], ["data.root", "train/b", "has no images"]),
    ("data/imagefolder-text-named-png", {"data": data("imagefolder", "{fx}/if_text_as_png")}, [], ["data.root", "x.png", "not a readable image"]),
    ("data/imagefolder-non-image-file", {"data": data("imagefolder", "{fx}/if_text_file")}, [], ["data.root", "notes.txt", "not an image"]),
    ("data/imagefolder-extra-test-class", {"data": data("imagefolder", "{fx}/if_extra_test_class")}, [], ["data.root", "test", "not in train/: c"]),
    ("data/imagefolder-no-train", {"data": data("imagefolder", "{fx}/if_no_train")}, [], ["data.root", "train", "no class folders"]),
    ("data/imagefolder-truncated-png-in-worker", {"data": data("imagefolder", "{fx}/if_truncated_png", num_workers=1)}, [], ["data.root", "0.png", "could not be decoded"]),
    # ---- devices
    ("device/cuda-without-gpu", {}, ["--set", "device=cuda"], ["device", "'cuda'", "no CUDA device"]),
    ("device/cuda-index", {}, ["--set", "device=cuda:3"], ["device", "'cuda:3'"]),
    ("device/unknown-kind", {}, ["--set", "device=gpu"], ["device:", "expected auto, cpu, cuda or cuda:N, got 'gpu'", "!(cuda(", "!pattern"]),
    ("device/bad-index", {}, ["--set", "device=cuda:x"], ["device:", "expected auto, cpu, cuda or cuda:N, got 'cuda:x'"]),
    ("device/upper-case", {}, ["--set", "device=CPU"], ["device:", "got 'CPU'"]),
    # ---- the command line: --set, --out, --onnx, options
    ("cli/set-without-equals", {}, ["--set", "nonsense"], ["--set", "nonsense", "key.path=value"]),
    ("cli/set-without-key", {}, ["--set", "=3"], ["--set", "key.path=value"]),
    ("cli/set-empty-key-part", {}, ["--set", "data..root=x"], ["--set", "data..root", "empty part"]),
    ("cli/set-into-a-value", {}, ["--set", "seed.x=1"], ["--set seed.x", "'seed' is a value"]),
    ("cli/set-into-a-list", {}, ["--set", "export.formats.0=fp16"], ["--set export.formats.0", "'formats' is a value"]),
    ("cli/set-key-twice-in-a-value", {}, ["--set", "data={source: npz, source: digits}"], ["--set data", "key 'source' is given twice"]),
    ("cli/set-unknown-section", {}, ["--set", "dataa.source=npz"], ["'dataa'", "did you mean 'data'"]),
    ("cli/set-section-to-a-value", {}, ["--set", "teacher=onnx"], ["teacher:", "expected a section of keys", "'onnx'"]),
    ("cli/set-relative-root-missing", {}, ["--set", "data.source=npz", "--set", "data.root=nope.npz"], ["data.root", "nope.npz not found"]),
    ("cli/out-is-a-file", {}, ["--out", "{fx}/a_file"], ["--out", "a_file"]),
    ("cli/out-under-a-file", {}, ["--out", "{fx}/a_file/runs"], ["a_file"]),
    ("cli/unknown-option", {}, ["--sett", "seed=1"], ["--sett"]),
    ("cli/resume-for-a-stage-that-does-not-train", {}, ["@plan", "--resume"], ["--resume"]),
    ("cli/onnx-missing", {}, ["@validate", "--onnx", "{fx}/nope.onnx"], ["--onnx", "nope.onnx"]),
    ("cli/onnx-is-a-folder", {}, ["@validate", "--onnx", "{fx}/folder.onnx"], ["--onnx", "folder.onnx"]),
    ("cli/onnx-garbage", {}, ["@validate", "--onnx", "{fx}/garbage.onnx"], ["--onnx", "garbage.onnx", "not a loadable ONNX model"]),
    ("cli/onnx-is-a-recipe", {}, ["@validate", "--onnx", "{fx}/broken.yaml"], ["--onnx", "broken.yaml", "not a loadable ONNX model"]),
    # ---- stages out of order, from a recipe file: refused before anything is created
    ("stage/score-before-teacher", {}, ["@score"], ["stage 'teacher' has not finished", "'edgedistill teacher {tmp}/tiny.yaml'", "'edgedistill run {tmp}/tiny.yaml --resume'"]),
    ("stage/distill-before-score", {}, ["@distill"], ["stage 'score' has not finished", "'edgedistill score "]),
    ("stage/export-before-distill", {}, ["@export"], ["stage 'distill' has not finished", "'edgedistill distill "]),
    ("stage/validate-before-export", {}, ["@validate"], ["stage 'export' has not finished", "'edgedistill export "]),
    ("stage/report-before-anything", {}, ["@report"], ["nothing to report yet: no stage has finished"]),
    # ---- a run folder given as the recipe argument (the folder exists beforehand)
    ("run/distill-on-a-fresh-run-folder", lambda fx, tmp: [fresh_run_folder(tmp)], ["@distill"], ["{tmp}/runs/tiny", "stage 'score' has not finished", "'edgedistill score {tmp}/runs/tiny'"]),
    ("run/report-on-a-fresh-run-folder", lambda fx, tmp: [fresh_run_folder(tmp)], ["@report"], ["{tmp}/runs/tiny", "nothing to report yet: no stage has finished"]),
    ("run/out-with-a-run-folder", lambda fx, tmp: [fresh_run_folder(tmp)], ["@report", "--out", "{tmp}/elsewhere"], ["--out", "is a run folder already"]),
    ("run/run-folder-with-an-empty-recipe", lambda fx, tmp: [fresh_run_folder(tmp, "")], ["@teacher"], ["runs/tiny/recipe.yaml", "the recipe is empty"]),
    ("run/run-folder-with-a-bad-recipe", lambda fx, tmp: [fresh_run_folder(tmp, "data: {source: digits}\nseed: -1\n")], ["@teacher"], ["runs/tiny/recipe.yaml", "seed", "greater than or equal to 0"]),
]

KINDS = {"recipe", "words", "ignored", "file", "teacher", "data", "device", "cli", "stage", "run"}


def _fill(value, fxdir: Path, tmp: Path | None = None):
    if isinstance(value, str):
        value = value.replace("{fx}", str(fxdir))
        return value.replace("{tmp}", str(tmp)) if tmp is not None else value
    if isinstance(value, dict):
        return {k: _fill(v, fxdir, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, fxdir, tmp) for v in value]
    return value


def bad_input_args(case, fxdir: Path, tmp_path: Path) -> tuple[list[str], list[str]]:
    """The command line of a case, and the pieces its error line must (or, with a leading "!", must not) hold."""
    case_id, sections, extra, expected = case
    extra = _fill(list(extra), fxdir, tmp_path)
    command = "run"
    if extra and extra[0].startswith("@"):
        command, extra = extra[0][1:], extra[1:]
    if callable(sections):
        args = [command, *sections(fxdir, tmp_path)]
    else:
        args = [command, write_recipe(tmp_path, **_fill(copy.deepcopy(sections), fxdir, tmp_path))]
    if "--out" not in extra and not case_id.startswith("run/"):
        extra = [*extra, "--out", tmp_path / "runs"]
    return [str(a) for a in [*args, *extra]], _fill(list(expected), fxdir, tmp_path)


def _out_folder(args: list[str]) -> Path | None:
    return Path(args[args.index("--out") + 1]) if "--out" in args else None


def check_bad_input(case_id: str, output: str, exit_code: int, expected: list[str], args: list[str], out_existed: bool) -> str:
    """assert_bad_input, the pieces that must not be in the line, and nothing created under --out."""
    line = assert_bad_input(output, exit_code, [p for p in expected if not p.startswith("!")], case_id)
    for piece in (p[1:] for p in expected if p.startswith("!")):
        assert piece not in line, f"{case_id}: {piece!r} should not be in {line!r}"
    out = _out_folder(args)
    if out is not None and not out_existed and not case_id.startswith("run/"):
        made = sorted(str(p) for p in out.rglob("*")) if out.is_dir() else []
        assert not out.exists(), f"{case_id}: bad input created {out} ({made[:5]})"
    return line


def test_the_table_is_big_enough():
    assert len(BAD_INPUTS) >= 80
    ids = [case[0] for case in BAD_INPUTS]
    assert len(set(ids)) == len(ids), "case ids are unique"
    kinds = {case_id.split("/")[0] for case_id in ids}
    assert kinds == KINDS, kinds ^ KINDS
    for kind in KINDS:
        assert sum(i.startswith(f"{kind}/") for i in ids) >= 3, kind
    # every data source and every teacher source has a case, and so has every issue item
    from edgedistill.data.sources import DATA_SOURCES
    from edgedistill.models.teachers import TEACHERS

    text = repr(BAD_INPUTS)
    for name in DATA_SOURCES.names():
        assert f"'{name}'" in text, f"no case for data source {name}"
    for name in TEACHERS.names():
        assert f"'{name}'" in text, f"no case for teacher source {name}"
    for case_id in ("recipe/empty-file", "ignored/root-for-digits", "recipe/binary-file", "recipe/an-onnx-model", "data/npz-root-is-a-folder",
                    "recipe/target-needs-another", "device/unknown-kind"):
        assert case_id in ids, case_id


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(case, fx, tmp_path, capfd):
    args, expected = bad_input_args(case, fx, tmp_path)
    out_folder = _out_folder(args)
    out_existed = out_folder is not None and out_folder.exists()
    result = invoke(*args)
    out = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        out += "".join(traceback.format_exception(result.exception))
    check_bad_input(case[0], out, result.exit_code, expected, args, out_existed)
    captured = capfd.readouterr()  # what bypassed click's capture (library loggers, warnings)
    assert "Traceback" not in captured.err + captured.out
    assert not (fx / "pwned").exists(), "a recipe executed code"


# A few of the same through a real process: `python -m edgedistill` (main(), exit codes, stderr).
SUBPROCESS_CASES = ["recipe/unknown-key", "recipe/an-onnx-model", "recipe/binary-file", "file/onnx-garbage", "device/cuda-without-gpu", "cli/out-is-a-file"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_through_a_real_process(case_id, fx, tmp_path):
    case = next(c for c in BAD_INPUTS if c[0] == case_id)
    args, expected = bad_input_args(case, fx, tmp_path)
    out_folder = _out_folder(args)
    out_existed = out_folder is not None and out_folder.exists()
    proc = python_m(*args, cwd=tmp_path)
    line = check_bad_input(case_id, proc.stderr, proc.returncode, expected, args, out_existed)
    assert line.count("\n") == 0
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == "", "messages belong on stderr"


def test_debug_shows_the_traceback(fx, tmp_path):
    args, _ = bad_input_args(next(c for c in BAD_INPUTS if c[0] == "file/onnx-garbage"), fx, tmp_path)
    result = invoke(*args, "--debug")
    assert result.exit_code == 2
    assert "Traceback" in result.output and "InputError" in result.output


@pytest.mark.parametrize("folder, name", [("if_gray", "gray.png"), ("if_rgba", "rgba.png")])
def test_convertible_images_are_converted_with_a_warning(folder, name, fx, tmp_path):
    recipe = write_recipe(tmp_path, data=data("imagefolder", str(fx / folder)))
    result = invoke("teacher", recipe, "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "WARNING" in text and "not RGB" in text and "converted to RGB" in text
    assert "1 images" in text


# ---------------------------------------------------------------- a prepared run folder (teacher, score, plan done)

# 64 training images in batches of 8: 8 steps an epoch. (Interruption and resume: tests/test_resume.py.)
PREP = {"data": {"batch_size": 8}, "distill": {"epochs": 8, "optimizer": {"lr": 0.01}}, "validate": {"atol": 0.01}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """``<base>/runs/tiny`` after teacher, score and plan, and the recipe at ``<base>/tiny.yaml``."""
    base = tmp_path_factory.mktemp("prepared")
    recipe = write_recipe(base, **copy.deepcopy(PREP))
    for stage in ("teacher", "score", "plan"):
        result = invoke(stage, recipe, "--out", base / "runs")
        assert result.exit_code == 0, result.output
    return base


def clone(prepared: Path, dest: Path) -> tuple[Path, Path]:
    """A private copy of the prepared folder: (recipe, run folder)."""
    shutil.copytree(prepared, dest)
    return dest / "tiny.yaml", dest / "runs" / "tiny"


def leftover_temp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*.tmp")]


# ---------------------------------------------------------------- checkpoints that must not be loaded, file modes


def test_truncated_checkpoint_is_reported_not_loaded(prepared, tmp_path):
    recipe, run = clone(prepared, tmp_path / "w")
    last = run / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.randn(256, 256)}, "epoch": 1, "step": 0}, last)
    _truncate(last)
    before = last.read_bytes()
    result = invoke("run", recipe, "--out", run.parent, "--resume")
    assert_bad_input(result.output, result.exit_code, [str(last), "corrupt, truncated"])
    assert last.read_bytes() == before, "the corrupt checkpoint is kept for inspection, not overwritten"
    assert not (run / "stages" / "distill.done").exists()


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_checkpoints_never_run_code(prepared, tmp_path):
    recipe, run = clone(prepared, tmp_path / "w")
    marker = tmp_path / "pwned"
    last = run / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _Evil(marker)}, last)
    result = invoke("distill", recipe, "--out", run.parent, "--resume")
    assert_bad_input(result.output, result.exit_code, [str(last), "weights_only"])
    assert not marker.exists()


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX file modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_of_any_new_file(umask, mode, tmp_path):
    """Temp files are private (0600); the artifact they become must not be, or a serving account cannot read it."""
    from edgedistill.base import fsio

    old = os.umask(umask)
    try:
        fsio.write_json(tmp_path / "a.json", {"x": 1})
        with fsio.atomic_path(tmp_path / "b.bin") as tmp:
            torch.save({"w": torch.zeros(2)}, tmp)
    finally:
        os.umask(old)
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("a.json", "b.bin")] == [mode, mode]


# ---------------------------------------------------------------- the run folder: lock, changed recipe, reuse


def test_second_process_is_refused_by_the_lock(prepared, tmp_path):
    recipe, run = clone(prepared, tmp_path / "w")
    env_before = (run / "env.json").read_bytes()
    recipe_before = (run / "recipe.yaml").read_bytes()
    with RunFolder(run).lock():  # this test is the "other process"
        proc = python_m("distill", recipe, "--out", run.parent, "--resume", "--force", "--set", "seed=5", cwd=tmp_path)
        assert (run / ".lock").read_text() == str(os.getpid())
    line = assert_bad_input(proc.stderr, proc.returncode, [str(run / ".lock"), f"pid {os.getpid()}", "another edgedistill process"])
    assert "wait for it" in line
    # refused before touching anything: the other process's recipe and environment are intact
    assert (run / "env.json").read_bytes() == env_before
    assert (run / "recipe.yaml").read_bytes() == recipe_before


def test_the_lock_file_of_a_dead_process_is_no_lock(prepared, tmp_path):
    recipe, run = clone(prepared, tmp_path / "w")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(str(dead.pid))  # what kill -9 leaves: the file, but no process holding its flock
    result = invoke("report", recipe, "--out", run.parent)
    assert result.exit_code == 0, result.output
    assert not (run / ".lock").exists()


def test_changed_recipe_on_resume_is_refused_naming_the_keys(prepared, tmp_path):
    recipe, run = clone(prepared, tmp_path / "w")
    result = invoke("run", recipe, "--out", run.parent, "--resume", "--set", "distill.epochs=3", "--set", "seed=1")
    line = assert_bad_input(result.output, result.exit_code, ["recipe differs", "distill.epochs", "seed", "--force"])
    assert "data.batch_size" not in line
    # a stage command is held to the same rule
    result = invoke("plan", recipe, "--out", run.parent, "--set", "augment.profile_steps=2")
    assert_bad_input(result.output, result.exit_code, ["augment.profile_steps"])
    # --force accepts the change, says so, and records the new recipe
    result = invoke("plan", recipe, "--out", run.parent, "--set", "augment.profile_steps=2", "--force")
    assert result.exit_code == 0, result.output
    assert "recipe changed (augment.profile_steps)" in flat(result.output)
    assert yaml.safe_load((run / "recipe.yaml").read_text())["augment"]["profile_steps"] == 2


def test_run_refuses_a_folder_with_finished_work_but_reuses_a_failed_start(prepared, fx, tmp_path):
    recipe, run = clone(prepared, tmp_path / "w")
    result = invoke("run", recipe, "--out", run.parent)
    assert_bad_input(result.output, result.exit_code, [str(run), "already holds a run", "--resume"])
    # a run that failed on bad input before finishing anything leaves nothing to protect:
    # fixing the recipe and running again needs neither --resume nor --force
    bad = write_recipe(tmp_path / "other", name="fresh", data=data("npz", str(fx / "fake.npz")))
    result = invoke("teacher", bad, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    good = write_recipe(tmp_path / "other", name="fresh")
    result = invoke("teacher", good, "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output


def test_redoing_a_stage_invalidates_the_later_ones(prepared, tmp_path):
    recipe, run = clone(prepared, tmp_path / "w")
    assert (run / "stages" / "plan.done").exists()
    result = invoke("score", recipe, "--out", run.parent)
    assert result.exit_code == 0, result.output
    assert (run / "stages" / "score.done").exists() and (run / "stages" / "teacher.done").exists()
    assert not (run / "stages" / "plan.done").exists(), "plan was made from the old energy scores"


def test_non_finite_loss_stops_with_the_step_and_the_parts(prepared, tmp_path):
    recipe, run = clone(prepared, tmp_path / "w")
    result = invoke("distill", recipe, "--out", run.parent, "--force", "--set", "distill.optimizer.lr=1e30", "--set", "distill.optimizer.momentum=0")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    line = flat(result.output)
    assert "non-finite loss at epoch" in line and "step" in line and "kd=" in line
    last = run / "checkpoints" / "last.pt"
    assert (str(last) in line) if last.exists() else ("no checkpoint was written yet" in line)
    assert not (run / "stages" / "distill.done").exists()
    assert not leftover_temp_files(run)
