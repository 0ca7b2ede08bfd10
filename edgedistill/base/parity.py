"""When two runtimes' float32 logits count as the same: an absolute tolerance that grows with the logits' size.

float32 keeps about seven significant digits, so two correct runtimes that add the same terms in a different order
(fused kernels, another convolution algorithm) differ by an amount proportional to the values summed. On logits of
O(1) a fixed 1e-4 is a sound bar; on a confident model's logits of 10–30 the same rounding exceeds it and a fixed
bar would reject a faithful runtime. So ``atol`` holds up to logits of magnitude 1 and scales with the largest
|logit| above that: the bar stays absolute for small logits and relative (``atol`` of the largest) for large ones.
"""

from __future__ import annotations


def tolerance(atol: float, logit_scale: float) -> float:
    """The largest |Δ logit| accepted against a reference whose largest |logit| is ``logit_scale``."""
    return atol * max(1.0, logit_scale)


def within(max_abs_diff: float | None, atol: float, logit_scale: float) -> bool:
    """``max_abs_diff`` is finite and at most :func:`tolerance` (``None`` or NaN: not within)."""
    return max_abs_diff is not None and max_abs_diff <= tolerance(atol, logit_scale)


def describe(atol: float, logit_scale: float) -> str:
    """The bar in words, for an error: ``1e-04`` or ``0.0002 (1e-04 × the largest |logit|, 2)``."""
    bar = tolerance(atol, logit_scale)
    return f"{bar:.3g}" if logit_scale <= 1.0 else f"{bar:.3g} ({atol:g} × the largest |logit|, {logit_scale:.3g})"
