"""Showing the student choice of :mod:`edgedistill.deploy.pick`: the terminal table, the target in words, and the
latency-vs-MACs plot. Kept apart so that the picker itself stays pure."""

from __future__ import annotations

from edgedistill.base.timing import fmt_spread
from edgedistill.deploy.pick import describe_target, label


def pick_table(result: dict):
    from rich.table import Table

    t = Table(title=f"student candidates ({describe_target_dict(result['target'])})")
    for col in ("student", "params", "MACs", "size MB", "latency ms [95 %]", ""):
        t.add_column(col, justify="left" if col in ("student", "") else "right")
    for r in result["candidates"]:
        mark = "◀ chosen" if r.get("chosen") else ("fits" if r["fits"] else "; ".join(r["misses"]))
        t.add_row(label(r), f"{r['parameters'] / 1e6:.2f} M", f"{r['macs'] / 1e6:.1f} M", f"{r['size_mb']:.2f}",
                  fmt_spread(r["latency_ms"]), mark)
    for r in result.get("skipped", ()):
        t.add_row(label(r), "", "", "", "", f"not a candidate: {r['reason']}")
    return t


def describe_target_dict(target: dict) -> str:
    """:func:`describe_target` of the ``target`` a choice file records (the section's ``model_dump``)."""
    from types import SimpleNamespace

    return describe_target(SimpleNamespace(**target))


def choice_plot(result: dict) -> bytes:
    """Latency vs MACs of every candidate (the central 95 % of the rounds as error bars), the target's latency line, the choice ringed."""
    from edgedistill.base.plots import png, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    rows, target = result["candidates"], result["target"]
    for fits, color, name in ((True, "tab:green", "fits"), (False, "tab:red", "does not fit")):
        sel = [r for r in rows if r["fits"] == fits]
        if sel:
            ys = [r["latency_ms"]["median"] for r in sel]
            err = [[y - r["latency_ms"]["lo"] for y, r in zip(ys, sel)], [r["latency_ms"]["hi"] - y for y, r in zip(ys, sel)]]
            ax.errorbar([r["macs"] / 1e6 for r in sel], ys, yerr=err, fmt="o", color=color, label=name, ms=5, capsize=2)
    for r in rows:
        ax.annotate(label(r), (r["macs"] / 1e6, r["latency_ms"]["median"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    c = result["choice"]
    ax.scatter([c["macs"] / 1e6], [c["latency_ms"]["median"]], s=220, facecolors="none", edgecolors="black", label="chosen")
    if target.get("max_latency_ms") is not None:
        ax.axhline(target["max_latency_ms"], color="gray", ls="--", lw=1, label="max_latency_ms")
        if target.get("headroom"):
            ax.axhline(target["max_latency_ms"] * (1 - target["headroom"]), color="gray", ls=":", lw=1,
                       label=f"less {target['headroom']:.0%} headroom: a median above does not fit")
    if target.get("max_size_mb") is not None:
        ax.plot([], [], " ", label=f"max_size_mb {target['max_size_mb']:g} (size per row in student_choice.json)")
    ax.set_xscale("log")
    ax.set_xlabel("MACs per image (millions)")
    ax.set_ylabel(f"latency per call, ms (batch {target['batch']}, {target['threads']} threads, {target['precision']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return png(fig)
