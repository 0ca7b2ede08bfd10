"""Many-, medium- and few-shot top-1: how long-tailed recognition is reported.

A class is *many-shot* with more than 100 training images, *medium-shot* with 20 to 100 and *few-shot* with fewer
than 20 (Liu et al., "Large-Scale Long-Tailed Recognition in an Open World", CVPR 2019; the split the CIFAR-100-LT
results of the Energy KD paper and its baselines are read against). A split whose classes all fall in one group is
not long-tailed in this sense, and gets no breakdown.
"""

from __future__ import annotations

import numpy as np

MANY_ABOVE, FEW_BELOW = 100, 20
GROUPS = ("many", "medium", "few")


def shot_groups(train_labels, num_classes: int) -> dict[str, list[int]] | None:
    """The classes of each group from the training labels, or None when they all fall in one group."""
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=num_classes)
    which = np.where(counts > MANY_ABOVE, 0, np.where(counts >= FEW_BELOW, 1, 2))
    groups = {g: np.flatnonzero(which == i).tolist() for i, g in enumerate(GROUPS)}
    return groups if sum(bool(c) for c in groups.values()) > 1 else None


def class_counts(predicted, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct, seen) per class: what a pass over the test images adds up, a batch at a time."""
    labels = np.asarray(labels, dtype=np.int64)
    hit = labels[np.asarray(predicted) == labels]
    return np.bincount(hit, minlength=num_classes), np.bincount(labels, minlength=num_classes)


def shot_top1(correct, seen, groups: dict[str, list[int]]) -> dict[str, float | None]:
    """Top-1 (percent) over the test images of each group's classes; None for a group with no test image."""
    correct, seen = np.asarray(correct), np.asarray(seen)
    out = {}
    for g, classes in groups.items():
        n = int(seen[classes].sum())
        out[g] = round(100.0 * int(correct[classes].sum()) / n, 4) if n else None
    return out
