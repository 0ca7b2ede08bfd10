"""Timing that holds on a shared machine: warm-up, repeated rounds interleaved across what is compared, medians
with their spread, and ratios taken round by round.

A single timed run of one variant, then of the next, lets a neighbour's job slow one of them and not the other.
Here every callable runs once per *round*, in an order rotated from round to round, so a stall hits the variants
of that round alike; each round gives one sample per callable (its mean seconds per call in that round), and a
figure is the median of the rounds with the central 95 % of them as its spread. Not the interquartile range: on a
virtual machine whose speed drifts, the median of a validation repeated a minute later mostly lands outside the
first one's IQR, so an IQR overstates how well a figure repeats (measured in docs/deploy.md). A ratio (int8 vs
fp32, ONNX Runtime vs PyTorch) is computed inside each round and then summarised, never as a ratio of two medians
taken apart.

Pure Python over an injected clock, so the tests run on a fake one.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Hashable, Mapping, Sequence, TypeVar

K = TypeVar("K", bound=Hashable)


def interleaved(calls: Mapping[K, Callable[[], object]], *, rounds: int, min_seconds: float = 0.0,
                min_calls: int | Mapping[K, int] = 1, warmup: int | Mapping[K, int] = 1,
                clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] = lambda: None) -> dict[K, list[float]]:
    """Seconds per call of every callable, one sample per round.

    Each callable gets ``warmup`` untimed calls first (lazy allocation, kernel selection, caches). In each of the
    ``rounds`` rounds every callable runs at least ``min_calls`` times and for at least ``min_seconds``; round ``i``
    starts at callable ``i mod n`` so that none always runs first. ``warmup`` and ``min_calls`` may be given per
    callable. ``sync`` is called before every reading of the clock, so that work a device still has queued (CUDA)
    is counted where it was asked for.
    """
    names = list(calls)
    per = {name: (_of(warmup, name), _of(min_calls, name)) for name in names}
    for name in names:
        for _ in range(per[name][0]):
            calls[name]()
    samples: dict[K, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            sync()
            fn, least, n, t0 = calls[name], per[name][1], 0, clock()
            while True:
                fn()
                n += 1
                sync()
                elapsed = clock() - t0
                if n >= least and elapsed >= min_seconds:
                    break
            samples[name].append(elapsed / n)
    return samples


def _of(value: int | Mapping[K, int], name: K) -> int:
    return value[name] if isinstance(value, Mapping) else value


def spread(samples: Sequence[float], digits: int = 4) -> dict:
    """``{"median", "lo", "hi", "n"}``: the median and the central 95 % of the samples (their 2.5th and 97.5th
    percentiles, interpolated linearly between order statistics; one sample: all equal)."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        raise ValueError("spread of no samples")
    cuts = statistics.quantiles(xs, n=40, method="inclusive") if len(xs) > 1 else [xs[0]]
    return {"median": round(statistics.median(xs), digits), "lo": round(cuts[0], digits), "hi": round(cuts[-1], digits), "n": len(xs)}


def per_round_ratio(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """``num[i] / den[i]`` for every round both were measured in."""
    if len(num) != len(den):
        raise ValueError(f"ratio of {len(num)} and {len(den)} rounds: the samples come from different measurements")
    return [a / b for a, b in zip(num, den)]


def within(value: float, s: Mapping) -> bool:
    """``value`` lies inside the stated spread ``[lo, hi]`` of ``s``."""
    return s["lo"] <= value <= s["hi"]


def fmt_spread(s: Mapping | None, spec: str = "{:.3g}") -> str:
    """'0.215 [0.21–0.22]': the median and the central 95 % of the rounds; the median alone when no spread is
    known (``lo`` None), '–' when there is no figure. The one 'median [lo–hi]' formatter of the package."""
    if s is None or s.get("median") is None:
        return "–"
    median = spec.format(s["median"])
    return median if s.get("lo") is None else f"{median} [{spec.format(s['lo'])}–{spec.format(s['hi'])}]"


def spread_of(row: Mapping, key: str) -> dict | None:
    """The spread of a figure that a result row stores flat, as validation writes it: the median under ``key``
    (or ``key_p50``) and ``[lo, hi]`` under ``key_interval``. No median: None; no interval: ``lo`` = ``hi`` = None."""
    median = row.get(key)
    if median is None or isinstance(median, Mapping):
        median = row.get(f"{key}_p50")
    if median is None:
        return None
    lo, hi = row.get(f"{key}_interval") or (None, None)
    return {"median": median, "lo": lo, "hi": hi}
