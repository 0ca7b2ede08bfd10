"""Which layers break an int8 file, and which to keep in float: per-layer sensitivity and automatic float fallback.

Both are judged on held-out training images (``export.int8.held_out``: class-balanced, none of them a calibration
image), against the float student's logits:

* **changed**: the share of images whose top-1 answer the int8 file changes. It bounds the top-1 points the file can
  lose on those images (an answer that did not change cannot turn wrong), so it is what the fallback holds under
  ``validate.max_int8_drop``: validation then measures the real drop on the test set, with the same gate.
* **SQNR** of the logits, ``10·log10(Σ z² / Σ (z_int8 − z)²)`` in dB: how much of the output is quantisation noise.

**Sensitivity**: every quantisable layer quantised alone, the rest in float, ranked by SQNR (lowest first: the layer
whose quantisation adds the most noise), then by answers changed. **Fallback**: when the whole int8 file changes too
many answers, the smallest number k of the most sensitive layers kept in float that brings it under the limit, found
by doubling k and then bisecting (a few builds, not one per k), and checked by building it. Each target keeps layers
in float by its own mechanism (ONNX Runtime: nodes excluded from quantisation; PT2E: modules left unannotated).

The search needs only that more layers in float never hurts much; the final file is built and judged, so a
non-monotone step costs a few extra layers in float, never a wrong claim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Judgement:
    changed: float  # % of held-out images whose top-1 answer differs from the float model's
    top1: float  # % of them right
    sqnr_db: float

    def to_dict(self) -> dict:
        return {k: round(v, 4) if math.isfinite(v) else v for k, v in asdict(self).items()}


def judge(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> Judgement:
    """``logits`` of a quantised variant against the float ``reference`` on the same images."""
    logits, reference = np.asarray(logits, np.float64), np.asarray(reference, np.float64)
    noise = float(np.sum((logits - reference) ** 2))
    sqnr = math.inf if noise == 0 else 10 * math.log10(float(np.sum(reference ** 2)) / noise)
    pred = logits.argmax(1)
    return Judgement(changed=100.0 * float(np.mean(pred != reference.argmax(1))), top1=100.0 * float(np.mean(pred == labels)),
                     sqnr_db=sqnr)


def rank(layers: Sequence[str], alone: Sequence[Judgement]) -> list[int]:
    """Layer positions, most sensitive first: lowest SQNR quantised alone, then most answers changed, then graph order."""
    return sorted(range(len(layers)), key=lambda i: (alone[i].sqnr_db, -alone[i].changed, i))


def closest(judged: dict[str, Judgement]) -> str:
    """The name of the variant closest to the float model: fewest answers changed, then highest SQNR (a few hundred
    held-out images often tie on answers), then the first named."""
    names = list(judged)
    return min(names, key=lambda n: (judged[n].changed, -judged[n].sqnr_db, names.index(n)))


def smallest_fitting(n: int, fits: Callable[[int], bool]) -> int | None:
    """The smallest k in 1..n with ``fits(k)`` (k = 0 is the caller's plain int8 file, known not to fit), assuming that
    a k that fits stays fitting for larger k; None when even k = n does not. Doubling, then bisection: about
    2·log2(k) calls of ``fits``."""
    lo, hi = 0, 1  # invariant: lo does not fit; hi is the candidate
    while not fits(min(hi, n)):
        if hi >= n:
            return None
        lo, hi = hi, 2 * hi
    hi = min(hi, n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


@dataclass
class Int8Fit:
    """A target's int8 file fitted to the limit. ``build(float_layers)`` writes the file with those layers kept in
    float and returns its held-out logits (the last call's file is the one that stays); ``only(layer)`` returns the
    held-out logits of a file, written elsewhere, with that layer alone quantised."""

    layers: list[str]
    build: Callable[[frozenset[str]], np.ndarray]
    only: Callable[[str], np.ndarray]
    reference: np.ndarray
    labels: np.ndarray

    def run(self, limit: float, fallback: bool, sensitivity: bool, progress: Callable[[str], None] = lambda _: None) -> dict:
        """What export.json records of the int8 file: its judgement, the sensitivity table (when asked for or needed)
        and the layers kept in float (empty when the plain file fits, or fallback is off)."""
        plain = judge(self.build(frozenset()), self.reference, self.labels)
        out = {"limit": limit, "int8": plain.to_dict(), "float_layers": [], "fits": plain.changed <= limit}
        if not (sensitivity or (fallback and not out["fits"])):
            return out
        progress(f"int8 sensitivity: {len(self.layers)} layers, one at a time")
        alone = [judge(self.only(layer), self.reference, self.labels) for layer in self.layers]
        order = rank(self.layers, alone)
        out["sensitivity"] = [{"layer": self.layers[i], "position": i, **alone[i].to_dict()} for i in order]
        if not fallback or out["fits"]:
            return out
        tried: dict[int, Judgement] = {}

        def fits(k: int) -> bool:
            tried[k] = judge(self.build(frozenset(self.layers[i] for i in order[:k])), self.reference, self.labels)
            progress(f"int8 fallback: {k} layer{'s' if k > 1 else ''} in float → {tried[k].changed:.2f} % of answers changed")
            return tried[k].changed <= limit

        k = smallest_fitting(len(order), fits)
        k = len(order) if k is None else k
        final = judge(self.build(frozenset(self.layers[i] for i in order[:k])), self.reference, self.labels)
        out.update(float_layers=[self.layers[i] for i in order[:k]], fallback=final.to_dict(), fits=final.changed <= limit,
                   tried={str(j): t.to_dict() for j, t in sorted(tried.items())})
        return out
