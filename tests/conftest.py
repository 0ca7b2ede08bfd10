from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_NPZ = SHARED / "data" / "cifar100-real" / "cifar100_train40k_test10k.npz"
TEACHER_DIR = SHARED / "teachers" / "cifar100_resnet56"

needs_shared = pytest.mark.skipif(not CIFAR_NPZ.exists(), reason="needs ../shared (real CIFAR-100 data and teacher)")
