"""Reliability through the real command line (see docs/reliability.md).

* bad input anywhere (recipe, files, data, teacher, device, run folder): exit 2, one line naming the key
  or file, no traceback;
* interruption: SIGINT → checkpoint + exit 130 + the command that resumes; SIGKILL loses at most an epoch;
* resume: bit-identical weights on the CPU; a changed recipe is refused unless --force;
* guards: corrupt checkpoints are reported, never loaded; checkpoints never run code; one process per folder.

Most cases run in-process with click's CliRunner (fast); a few go through ``python -m edgedistill`` in a
subprocess, as a user would, and the interruption tests must (signals, kill -9).
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import TINY
from PIL import Image

from edgedistill.cli import cli
from edgedistill.folder import RunFolder

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


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """Every bad (and convertible) file the table below points at, made once."""
    import torchvision
    import warnings

    from edgedistill.models import build_torchvision

    d = tmp_path_factory.mktemp("fx")
    # teachers
    (d / "garbage.onnx").write_bytes(b"this is not an ONNX protobuf")
    (d / "garbage.pt2").write_bytes(b"this is not a zip archive")
    (d / "garbage.ts").write_bytes(b"this is not TorchScript")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), d / "resnet18.pt")
    torch.save(build_torchvision("resnet18", 5, image_size=8).state_dict(), d / "resnet18_5cls.pt")
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
    return d


def teacher(source: str, path: str, arch: str | None = None) -> dict:
    return {"_replace": True, "source": source, "path": path, **({"arch": arch} if arch else {})}


def data(source: str, root: str | None = None, **extra) -> dict:
    return {"source": source, **({"root": root} if root else {}), **extra}


# (id, sections for the recipe or a callable building the args, extra CLI args, pieces the error line must hold)
# "{fx}" in a piece or a path is replaced with the fixture folder.
BAD_INPUTS = [
    # ---- recipe
    ("recipe/unknown-key", {}, ["--set", "data.batch_sise=3"], ["data.batch_sise", "did you mean 'batch_size'"]),
    ("recipe/wrong-type", {}, ["--set", "data.batch_size=many"], ["data.batch_size", "integer", "'many'"]),
    ("recipe/r-above-0.5", {}, ["--set", "energy.fraction=0.7"], ["energy.fraction", "0.5", "0.7"]),
    ("recipe/T+t_minus<=0", {}, ["--set", "distill.loss.temperature=2", "--set", "distill.loss.t_minus=-2"], ["distill.loss.t_minus", "2.0 + -2.0", "must be > 0"]),
    ("recipe/empty-formats", {}, ["--set", "export.formats=[]"], ["export.formats", "at least 1"]),
    ("recipe/empty-parity-batches", {}, ["--set", "validate.parity_batches=[]"], ["validate.parity_batches", "at least 1"]),
    ("recipe/negative-epochs", {}, ["--set", "distill.epochs=-1"], ["distill.epochs", "greater than or equal to 1", "-1"]),
    ("recipe/unknown-student", {}, ["--set", "student.arch=mobilenetv2"], ["student.arch", "did you mean 'mobilenet_v2'"]),
    ("recipe/unknown-loss-param", {}, ["--set", "distill.loss.temprature=3"], ["distill.loss.temprature", "did you mean 'temperature'"]),
    ("recipe/set-without-equals", {}, ["--set", "nonsense"], ["--set", "nonsense", "key.path=value"]),
    ("recipe/set-into-a-value", {}, ["--set", "seed.x=1"], ["--set seed.x", "'seed' is a value"]),
    ("recipe/file-missing", lambda fx: [fx / "nope.yaml"], [], ["nope.yaml", "not found"]),
    ("recipe/not-yaml", lambda fx: [fx / "broken.yaml"], [], ["broken.yaml", "line", "not valid YAML"]),
    ("recipe/not-a-mapping", lambda fx: [fx / "list.yaml"], [], ["list.yaml", "expected a mapping", "list"]),
    ("recipe/python-tag-never-runs", lambda fx: [fx / "python_tag.yaml"], [], ["python_tag.yaml", "python/object/apply"]),
    ("recipe/is-a-folder", lambda fx: [fx / "no_cifar"], [], ["no_cifar", "is a directory"]),
    # ---- files (teacher)
    ("file/teacher-missing", {"teacher": teacher("onnx", "{fx}/nope.onnx")}, [], ["teacher.path", "nope.onnx", "not found"]),
    ("file/teacher-is-a-folder", {"teacher": teacher("onnx", "{fx}/folder.onnx")}, [], ["teacher.path", "is a folder, expected a file", "folder.onnx"]),
    ("file/onnx-garbage", {"teacher": teacher("onnx", "{fx}/garbage.onnx")}, [], ["teacher.path", "garbage.onnx", "not a loadable ONNX model"]),
    ("file/torchscript-garbage", {"teacher": teacher("torchscript", "{fx}/garbage.ts")}, [], ["teacher.path", "garbage.ts", "not a TorchScript file"]),
    ("file/pt2-garbage", {"teacher": teacher("export", "{fx}/garbage.pt2")}, [], ["teacher.path", "garbage.pt2", "not a torch.export"]),
    ("file/pt2-is-a-state-dict", {"teacher": teacher("export", "{fx}/resnet18.pt")}, [], ["teacher.path", "resnet18.pt", "not a torch.export"]),
    ("file/state-dict-other-arch", {"teacher": teacher("torchvision", "{fx}/resnet18.pt", "mobilenet_v2")}, [], ["teacher.path", "resnet18.pt", "'mobilenet_v2'", "missing key", "another architecture"]),
    ("file/state-dict-other-classes", {"teacher": teacher("torchvision", "{fx}/resnet18_5cls.pt", "resnet18")}, [], ["resnet18_5cls.pt", "10 classes", "fc.weight (5, 512) in the file, (10, 512) in the model"]),
    ("file/checkpoint-truncated", {"teacher": teacher("torchvision", "{fx}/trunc.pt", "resnet18")}, [], ["trunc.pt", "corrupt, truncated"]),
    ("file/checkpoint-empty", {"teacher": teacher("torchvision", "{fx}/empty.pt", "resnet18")}, [], ["empty.pt", "corrupt, truncated"]),
    ("file/checkpoint-pickled-module", {"teacher": teacher("torchvision", "{fx}/module.pt", "resnet18")}, [], ["module.pt", "pickled Python objects", "weights_only"]),
    ("file/checkpoint-not-a-dict", {"teacher": teacher("torchvision", "{fx}/list.pt", "resnet18")}, [], ["list.pt", "holds a list", "expected a state_dict"]),
    ("file/torchscript-as-state-dict", {"teacher": teacher("torchvision", "{fx}/five.ts", "resnet18")}, [], ["five.ts", "TorchScript archive", "teacher.source: torchscript"]),
    ("file/out-under-a-file", {}, ["--out", "{fx}/a_file/runs"], ["a_file"]),
    # ---- teacher does not fit the data
    ("teacher/5-outputs-for-10-classes", {"teacher": teacher("torchscript", "{fx}/five.ts")}, [], ["teacher.path", "five.ts", "(2, 5)", "expected (2, 10)", "10 classes in the data"]),
    ("teacher/static-batch-export", {"teacher": teacher("export", "{fx}/static_batch.pt2")}, [], ["teacher.path", "static_batch.pt2", "batch of 3", "dynamic batch axis"]),
    ("teacher/input-size", {"teacher": teacher("torchscript", "{fx}/flat32.ts")}, [], ["teacher.path", "flat32.ts", "3x8x8", "cannot be multiplied"]),
    ("teacher/unknown-torchvision-arch", {"teacher": teacher("torchvision", "{fx}/resnet18.pt", "resnet1000")}, [], ["teacher.arch", "'resnet1000'", "did you mean"]),
    # ---- data
    ("data/npz-missing", {"data": data("npz", "{fx}/nope.npz")}, [], ["data.root", "nope.npz", "not found"]),
    ("data/npz-no-root", {"data": data("npz")}, [], ["data.root", "'npz' needs a .npz file"]),
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
    ("device/unknown-kind", {}, ["--set", "device=gpu"], ["device", "auto|cpu|cuda", "'gpu'"]),
    # ---- run folder
    ("run/stage-out-of-order", {}, ["@distill"], ["stage 'plan' has not finished", "'edgedistill plan "]),
]


def _fill(value, fxdir: Path):
    if isinstance(value, str):
        return value.replace("{fx}", str(fxdir))
    if isinstance(value, dict):
        return {k: _fill(v, fxdir) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, fxdir) for v in value]
    return value


def bad_input_args(case, fxdir: Path, tmp_path: Path) -> tuple[list[str], list[str]]:
    _, sections, extra, expected = case
    extra = _fill(list(extra), fxdir)
    command = "run"
    if extra and extra[0].startswith("@"):
        command, extra = extra[0][1:], extra[1:]
    if callable(sections):
        args = [command, *sections(fxdir)]
    else:
        args = [command, write_recipe(tmp_path, **_fill(copy.deepcopy(sections), fxdir))]
    if "--out" not in extra:
        extra = [*extra, "--out", tmp_path / "runs"]
    return [str(a) for a in [*args, *extra]], _fill(list(expected), fxdir)


def test_the_table_is_big_enough():
    assert len(BAD_INPUTS) >= 25
    kinds = {case[0].split("/")[0] for case in BAD_INPUTS}
    assert {"recipe", "file", "data", "teacher", "device", "run"} <= kinds


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(case, fx, tmp_path, capfd):
    args, expected = bad_input_args(case, fx, tmp_path)
    result = invoke(*args)
    out = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        out += "".join(traceback.format_exception(result.exception))
    assert_bad_input(out, result.exit_code, expected, case[0])
    captured = capfd.readouterr()  # what bypassed click's capture (library loggers, warnings)
    assert "Traceback" not in captured.err + captured.out
    assert not (fx / "pwned").exists(), "a recipe executed code"


# A few of the same through a real process: `python -m edgedistill` (main(), exit codes, stderr).
SUBPROCESS_CASES = ["recipe/unknown-key", "file/onnx-garbage", "device/cuda-without-gpu"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_through_a_real_process(case_id, fx, tmp_path):
    case = next(c for c in BAD_INPUTS if c[0] == case_id)
    args, expected = bad_input_args(case, fx, tmp_path)
    proc = python_m(*args, cwd=tmp_path)
    line = assert_bad_input(proc.stderr, proc.returncode, expected, case_id)
    assert line.count("\n") == 0
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

# 64 training images in batches of 8: 8 steps an epoch, 8 epochs. Long enough for a signal to land mid-training.
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


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The student weights of an uninterrupted ``distill`` from the prepared folder."""
    recipe, run = clone(prepared, tmp_path_factory.mktemp("reference") / "w")
    result = invoke("distill", recipe, "--out", run.parent)
    assert result.exit_code == 0, result.output
    return load_student(run)


def load_student(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "student.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def start(args: list, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgedistill", *map(str, args)], cwd=cwd, env=ENV,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    """Until ``path`` exists (written atomically, so complete); fail if the process ends first."""
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended (exit {proc.returncode}) before {path.name} appeared:\n{err[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def leftover_temp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*.tmp")]


# ---------------------------------------------------------------- interruption and resume (fast: the distill stage)


def test_sigint_during_distill_saves_exits_130_and_prints_the_resume_command(prepared, reference, tmp_path):
    recipe, run = clone(prepared, tmp_path / "w")
    args = ["distill", "tiny.yaml", "--out", "runs"]
    proc = start(args, cwd=tmp_path / "w")
    wait_for(run / "checkpoints" / "last.pt", proc)  # epoch 1 finished: training is under way
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert "SIGINT: finishing this step" in err
    expected = shlex.join(["edgedistill", *args, "--resume"])
    assert f"resume with: {expected}" in err, err[-2000:]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert 1 <= ckpt["epoch"] < 8, "interrupted mid-training"
    assert not (run / "stages" / "distill.done").exists()
    assert not (run / ".lock").exists(), "the lock is released on the way out"
    # run exactly the printed command (in-process, same working directory), then compare with the uninterrupted run
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "w")
        result = invoke(*shlex.split(expected)[1:])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    assert "resuming at epoch" in result.output
    assert_same_weights(load_student(run), reference)
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 9))


def test_sigkill_during_distill_loses_at_most_the_epoch(prepared, reference, tmp_path):
    recipe, run = clone(prepared, tmp_path / "w")
    proc = start(["distill", recipe, "--out", run.parent], cwd=tmp_path)
    wait_for(run / "checkpoints" / "last.pt", proc)
    time.sleep(0.1)  # somewhere in the next epoch (or in the middle of writing a checkpoint)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # every artifact on disk is complete: the checkpoint, the metrics, the markers
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] >= 1 and ckpt["step"] == 0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    for marker in (run / "stages").glob("*.done"):
        json.loads(marker.read_text())
    assert (run / ".lock").exists()  # the dead process could not remove it: it is stale, and replaced
    result = invoke("distill", recipe, "--out", run.parent, "--resume")
    assert result.exit_code == 0, result.output
    assert_same_weights(load_student(run), reference)
    assert not (run / ".lock").exists()
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 9))


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
    from edgedistill import fsio

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


# ---------------------------------------------------------------- the whole pipeline, killed and resumed (slow)


def _pipeline(tmp_path: Path, name: str) -> tuple[Path, Path, list[str]]:
    folder = tmp_path / name
    write_recipe(folder, **copy.deepcopy(PREP))
    return folder, folder / "runs" / "tiny", ["run", "tiny.yaml", "--out", "runs"]


@pytest.fixture(scope="module")
def full_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    folder, run, args = _pipeline(tmp_path_factory.mktemp("full"), "ref")
    proc = python_m(*args, cwd=folder, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_student(run)


@pytest.mark.slow
def test_full_run_killed_with_sigkill_resumes_to_the_same_weights(full_reference, tmp_path):
    folder, run, args = _pipeline(tmp_path, "killed")
    proc = start(args, cwd=folder)
    wait_for(run / "checkpoints" / "last.pt", proc, timeout=300)  # distill has finished an epoch
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "stages" / "distill.done").exists()
    resumed = python_m(*args, "--resume", cwd=folder, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for stage in ("teacher", "score", "plan"):
        assert f"{stage}: already done, skipped" in resumed.stderr
    assert_same_weights(load_student(run), full_reference)
    assert (run / "report.md").exists() and (run / "student.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_full_run_interrupted_resumes_with_the_printed_command(sig, full_reference, tmp_path):
    folder, run, args = _pipeline(tmp_path, "interrupted")
    proc = start(args, cwd=folder)
    wait_for(run / "checkpoints" / "last.pt", proc, timeout=300)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    command = shlex.join(["edgedistill", *args, "--resume"])
    assert f"resume with: {command}" in err
    # run the printed command verbatim, with `edgedistill` being this interpreter's module
    resumed = subprocess.run([sys.executable, "-m", "edgedistill", *shlex.split(command)[1:]], cwd=folder, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch" in resumed.stderr
    assert_same_weights(load_student(run), full_reference)
