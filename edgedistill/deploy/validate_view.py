"""Showing a validation of :mod:`edgedistill.deploy.validate`: the terminal table of its ``validation.json``.
Kept apart so that the validation itself stays about measuring."""

from __future__ import annotations

from typing import Mapping

from edgedistill.base.timing import fmt_spread, spread_of


def validation_table(results: Mapping):
    """A rich Table: variant · size · top-1 · Δ vs PyTorch · latency ms [95 %] · img/s [95 %] · × PyTorch · status."""
    from rich.table import Table

    settings = results.get("settings", {})
    title = "Validation of the exported models (CPU"
    if settings.get("threads"):
        title += f", {settings['threads']} threads"
    if settings.get("throughput_batch"):
        title += f", img/s at batch {settings['throughput_batch']}"
    table = Table(title=title + ")")
    for col, justify in (("variant", "left"), ("size", "right"), ("top-1", "right"), ("Δ vs PyTorch", "right"),
                         ("batch-1 ms [95 %]", "right"), ("img/s [95 %]", "right"), ("× PyTorch", "right"), ("status", "left")):
        table.add_column(col, justify=justify)
    if results.get("torch_top1") is not None:
        table.add_row("pytorch (eager)", "–", _fmt(results["torch_top1"], "{:.2f}%"), "–", "–",
                      fmt_spread(spread_of(results, "torch_images_per_second"), "{:,.0f}"),
                      "1", "reference")
    for name, r in results.get("variants", {}).items():
        status = "✅" if r.get("passed") else "❌ " + "; ".join(r.get("failures") or [])
        table.add_row(
            name,
            _fmt_size(r.get("size_bytes")),
            _fmt(r.get("test_top1"), "{:.2f}%"),
            _fmt(r.get("delta_top1"), "{:+.2f}"),
            fmt_spread(spread_of(r, "latency_ms")),
            fmt_spread(spread_of(r, "images_per_second"), "{:,.0f}"),
            _fmt((r.get("speedup_vs_torch") or {}).get("median"), "{:.2f}×"),
            status,
        )
    return table


def _fmt(v, spec: str) -> str:
    return "–" if v is None else spec.format(v)


def _fmt_size(n) -> str:
    """Decimal units, as ``student.target.max_size_mb`` and the ship line count them."""
    if n is None:
        return "–"
    for unit in ("B", "kB", "MB"):
        if round(n, 1) < 1000:  # as printed: 999,950 bytes is 1.0 MB, not 1000.0 kB
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
