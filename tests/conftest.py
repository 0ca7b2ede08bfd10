from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_NPZ = SHARED / "data" / "cifar100-real" / "cifar100_train40k_test10k.npz"
TEACHER_DIR = SHARED / "teachers" / "cifar100_resnet56"

# The smallest full pipeline: digits at 8 px, tiny subsets, one or two epochs (CLI and reliability tests). Its teacher
# and student may well be at chance level after so little training, which the allow_weak keys accept
# (tests/test_sanity.py checks that without them such a run stops).
TINY = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "data": {"source": "digits", "image_size": 8, "batch_size": 16, "eval_batch_size": 64, "train_limit": 64, "test_limit": 32},
    "teacher": {"source": "train", "arch": "shufflenet_v2_x0_5", "train": {"epochs": 1, "optimizer": {"lr": 0.05}},
                "allow_weak": True},
    "student": {"arch": "shufflenet_v2_x0_5"},
    "energy": {"fraction": 0.2},
    "distill": {"epochs": 2, "optimizer": {"lr": 0.05}, "loss": {"name": "energy_kd"}},
    "augment": {"fraction": 0.2, "profile_steps": 1},
    "export": {"formats": ["fp32"]},
    "validate": {"latency_runs": 2, "threads": 1, "parity_batches": [1, 2], "throughput_batch": 4, "rounds": 3, "seconds": 0.05,
                 "allow_weak": True},
}

@pytest.fixture
def one_torch_thread():
    """One torch thread for a test that trains or times: two busy-waiting threads on a shared 2-core machine make
    such tests several times slower (modules use it with ``pytestmark = pytest.mark.usefixtures(...)``)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


needs_shared = pytest.mark.skipif(not CIFAR_NPZ.exists(), reason="needs ../shared (real CIFAR-100 data and teacher)")


@pytest.fixture(scope="module")
def isolated():
    """Leave no trace for later test modules: one torch thread here; RNG states and the 'edgedistill'
    logger (the CLI's setup_logging stops it propagating, which would hide records from caplog) restored."""
    import logging
    import random

    logger = logging.getLogger("edgedistill")
    saved_logger = (list(logger.handlers), logger.propagate, logger.level)
    saved_rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(saved_rng[0])
    np.random.set_state(saved_rng[1])
    random.setstate(saved_rng[2])
    logger.handlers[:], logger.propagate = saved_logger[0], saved_logger[1]
    logger.setLevel(saved_logger[2])
