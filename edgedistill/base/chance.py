"""Chance level: the top-1 a model scores without having learnt anything, and the bar one that learnt must clear.

A classifier that learnt nothing can still score the share of the most frequent class (always answering it),
which on a long-tailed or unbalanced test set is far above 1/classes. The bar above it is the larger of
three standard errors of that share on this many images (so an honest guess does not clear it by luck) and a
tenth of the way from the guess to 100 % (so a model that barely moved off the guess does not either).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

SIGMAS = 3.0
GAP_SHARE = 0.1


@dataclass(frozen=True)
class ChanceBar:
    guess: float  # top-1 (%) of always answering the most frequent class
    bar: float  # the least top-1 (%) of a model that learnt something
    images: int
    classes: int

    def clears(self, top1: float) -> bool:
        return top1 >= self.bar

    def why(self, top1: float) -> str:
        """``top1`` against the bar, in words (for a message that says the model is at chance level)."""
        return (f"top-1 {top1:.2f}% is at chance level: always answering the most frequent class scores {self.guess:.2f}% "
                f"on these {self.images} test images ({self.classes} classes), and a model that learnt something needs at "
                f"least {self.bar:.2f}%")

    def to_dict(self) -> dict:
        return asdict(self)


def chance_bar(labels: np.ndarray, num_classes: int) -> ChanceBar:
    """The chance level of the test labels ``labels`` (int, (N,)) among ``num_classes`` classes."""
    labels = np.asarray(labels)
    n = len(labels)
    p = float(np.bincount(labels, minlength=num_classes).max() / n)
    bar = max(p + SIGMAS * math.sqrt(p * (1 - p) / n), p + GAP_SHARE * (1 - p))
    return ChanceBar(guess=round(100 * p, 2), bar=round(100 * bar, 2), images=n, classes=num_classes)
