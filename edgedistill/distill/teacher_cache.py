"""Teacher logits of the training views, stored once and replayed exactly by later runs.

The view of training sample ``i`` in epoch ``e`` is a function of ``(seed, e, i)`` alone (its crop and flip
come from :func:`edgedistill.data.loading.sample_generator`), so the frozen teacher's logits for it are too. A run with
``distill.teacher_cache: FOLDER`` stores them per epoch; a later run with the same teacher (file and runtime),
data, seed, augmentation, batch size and software replays them instead of running the teacher. HE-DA's mixed
extras depend on r, which the budget controller may change, so they always go through the teacher live.

Exactness: the live path runs the teacher on the clean views alone (never concatenated with the extras), and
the cache stores those float32 logits as they are, so a replayed run trains on bit-identical teacher outputs.
The logits are not compressed: keeping only the top-k would change every temperature-softened distribution and
the energy (``−T·logsumexp(z/T)`` sums over all classes), so it could not be exact. The cost is stated when a
run starts: ``N × classes × 4`` bytes per epoch (CIFAR-100's 40k training images: 16 MB an epoch).

Layout: ``FOLDER/<key>/meta.json`` (what the key was made of) and one ``epoch_0003.rank0of1.npz`` (``index``,
``logits``) per epoch and rank, written atomically when a whole epoch has run. Another teacher, data, seed or
augmentation gives another key, hence another folder; a folder whose ``meta.json`` does not match its key, or
an epoch file that does not load or fit, is not replayed and is rebuilt by the run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from edgedistill.base import fsio

FORMAT = 1


def digest_split(images: np.ndarray | None, paths, labels: np.ndarray) -> str:
    """What the training images are: their pixels, or their files' paths, sizes and modification times."""
    h = hashlib.sha256(np.ascontiguousarray(labels).tobytes())
    if images is not None:
        h.update(np.ascontiguousarray(images).tobytes())
    else:
        for p in paths:
            st = Path(p).stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class LogitCache:
    """One run's view of a cache folder: ``lookup`` a batch's logits, ``record`` the ones computed live."""

    def __init__(self, folder: Path, key: dict, *, n_train: int, num_classes: int, rank: int = 0, world: int = 1):
        blob = json.dumps({"format": FORMAT, **key}, sort_keys=True)
        self.key = {"format": FORMAT, **key}
        self.dir = Path(folder) / hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.n_train, self.num_classes, self.rank, self.world = n_train, num_classes, rank, world
        self.hits = self.misses = 0  # batches replayed / computed live, over the run
        self._rows: np.ndarray | None = None  # index → row of the loaded epoch file (−1: absent)
        self._logits: np.ndarray | None = None
        self._recorded: list[tuple[np.ndarray, np.ndarray]] = []

    def open(self) -> None:
        """Create the key's folder; one whose meta.json disagrees with the key is emptied and rebuilt."""
        meta = self.dir / "meta.json"
        if meta.exists() and _read_json(meta) != self.key:
            shutil.rmtree(self.dir)
        if not meta.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            fsio.write_json(meta, self.key)

    def epoch_file(self, epoch: int) -> Path:
        return self.dir / f"epoch_{epoch:04d}.rank{self.rank}of{self.world}.npz"

    def cached_epochs(self, epochs: int) -> list[int]:
        return [e for e in range(epochs) if self.epoch_file(e).exists()]

    def bytes_per_epoch(self) -> int:
        per_rank = -(-self.n_train // self.world)
        return per_rank * (self.num_classes * 4 + 8)

    def begin_epoch(self, epoch: int) -> None:
        self._rows = self._logits = None
        self._recorded = []
        path = self.epoch_file(epoch)
        if not path.exists():
            return
        try:
            with np.load(path) as z:
                index, logits = z["index"], z["logits"]
        except Exception:  # noqa: BLE001 - a damaged file is not replayed; this epoch rewrites it
            return
        if logits.dtype != np.float32 or logits.shape != (len(index), self.num_classes) or index.min(initial=0) < 0 or index.max(initial=0) >= self.n_train:
            return
        rows = np.full(self.n_train, -1, dtype=np.int64)
        rows[index] = np.arange(len(index))
        self._rows, self._logits = rows, logits

    def lookup(self, indices: torch.Tensor) -> torch.Tensor | None:
        """The stored logits of these samples in this epoch, or None when any one of them is missing."""
        if self._rows is None:
            self.misses += 1
            return None
        rows = self._rows[indices.numpy()]
        if (rows < 0).any():
            self.misses += 1
            return None
        self.hits += 1
        return torch.from_numpy(self._logits[rows])

    def record(self, indices: torch.Tensor, logits: torch.Tensor) -> None:
        if self._rows is None:
            self._recorded.append((indices.numpy().copy(), logits.detach().float().cpu().numpy()))

    def end_epoch(self, epoch: int, whole: bool) -> None:
        """Store what this epoch computed, when it ran every step (a resumed epoch's record would be partial)."""
        if whole and self._recorded:
            index = np.concatenate([i for i, _ in self._recorded])
            logits = np.concatenate([z for _, z in self._recorded])
            with fsio.atomic_path(self.epoch_file(epoch)) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, index=index.astype(np.int64), logits=logits.astype(np.float32, copy=False))
        self._recorded = []


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
