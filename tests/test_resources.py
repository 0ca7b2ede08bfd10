"""Resources that run out (a full disk, memory for a batch that does not fit) end with exit 3 and one line naming
the file or the key to change; nothing is half-written, and ``--resume`` finishes once the resource is back."""

from __future__ import annotations

import errno

import pytest
import torch
from test_cli import invoke, write_recipe

from edgedistill.base import errors
from edgedistill.base.errors import OUT_OF_RESOURCES, InputError, ResourceExhausted, user_error

pytestmark = pytest.mark.usefixtures("isolated")

TORCH_SHORT_WRITE = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4096")
FSYNC_ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failure", [TORCH_SHORT_WRITE, FSYNC_ENOSPC], ids=["torch-short-write", "oserror-without-path"])
def test_a_full_disk_during_a_checkpoint_is_exit_3_naming_the_file_and_resume_finishes(tmp_path, monkeypatch, failure):
    recipe = write_recipe(tmp_path)
    real_save = torch.save

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the bytes that fitted are there: a half-written temp file
        if isinstance(failure, OSError):
            raise OSError(failure.errno, failure.strerror)
        raise RuntimeError(str(failure))

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    result = invoke("teacher", recipe, "--out", tmp_path / "runs")
    last = tmp_path / "runs" / "tiny" / "checkpoints" / "teacher" / "last.pt"
    assert result.exit_code == OUT_OF_RESOURCES, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-2].startswith(f"error: {last}: no space left to write it (") and "MB free on its file system" in lines[-2]
    assert lines[-1] == f"  resume with: edgedistill teacher {recipe} --out {tmp_path / 'runs'} --resume"
    assert "Traceback" not in result.output
    assert not last.exists() and not list(last.parent.glob(".*.tmp")), "the failed write left nothing behind"

    monkeypatch.setattr(torch, "save", real_save)  # the disk has room again
    result = invoke("teacher", recipe, "--out", tmp_path / "runs", "--resume")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "tiny" / "stages" / "teacher.done").exists()


def test_out_of_memory_is_exit_3_naming_the_batch_size_keys(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path)

    def allocate(ctx, name):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 80000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr("edgedistill.pipeline.run.run_stage", allocate)
    result = invoke("teacher", recipe, "--out", tmp_path / "runs", "--set", "data.batch_size=4096")
    assert result.exit_code == OUT_OF_RESOURCES, result.output
    assert "error: out of memory (" in result.output and "lower data.batch_size" in result.output
    assert "data.eval_batch_size" in result.output and "Traceback" not in result.output
    assert "resume with: edgedistill teacher" in result.output


def test_which_exceptions_are_the_users_and_which_are_bugs(tmp_path):
    cuda_oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)")
    assert isinstance(user_error(cuda_oom), ResourceExhausted)
    assert isinstance(user_error(MemoryError()), ResourceExhausted)
    quota = user_error(OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "a" / "b.onnx")))
    assert isinstance(quota, ResourceExhausted) and str(quota).startswith(f"{tmp_path / 'a' / 'b.onnx'}: no space left")
    missing = user_error(FileNotFoundError(errno.ENOENT, "No such file or directory", "/nope/x.pt"))
    assert isinstance(missing, InputError) and str(missing) == "/nope/x.pt: No such file or directory"
    for bug in (ValueError("a bug"), RuntimeError("shape mismatch"), OSError("no filename: a bug too")):
        assert user_error(bug) is None, bug
    assert errors.disk_full(TORCH_SHORT_WRITE) and not errors.disk_full(RuntimeError("unexpected token"))
