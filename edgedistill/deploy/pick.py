"""``student.arch: auto``: the student with the most capacity that fits the device target, chosen over a timing table.

The decision is pure: :func:`pick` takes the measured table (one row per candidate: its MACs, file size and the
spread of its latency, see :mod:`edgedistill.deploy.candidates`) and the target, and returns the choice with the reason
for it, or refuses in one line naming the fastest candidate's figures (the table and plot that show a choice are in
:mod:`edgedistill.deploy.pick_view`). Capacity is counted in MACs: among students that fit, the one that computes
most per image has the most room to learn from the teacher.

A candidate fits when its *median* latency (one inference call of ``target.batch`` images with
``target.threads`` threads) is at most ``max_latency_ms`` less ``headroom`` (a share of it, 10 % unless set) and
its file is at most ``max_size_mb`` (10^6 bytes). The headroom is there because the choice is measured again later,
in validation and on the device: a median just under the limit lands over it about every other time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from edgedistill.base.errors import InputError
from edgedistill.base.timing import fmt_spread
from edgedistill.models.students import fixed_width

CHOICE_FILE = "student_choice.json"
PLOT_FILE = "student_choice.png"
# Width multipliers tried for every family that has one (ShuffleNetV2's and timm's width is the model's name).
WIDTH_GRID = (0.35, 0.5, 0.75, 1.0)


def widths_of(arch: str) -> tuple[float, ...]:
    """The widths the picker tries for ``arch`` (the same rule as the recipe's ``student.width`` check)."""
    return (1.0,) if fixed_width(arch) else WIDTH_GRID


def candidate_specs(archs: Sequence[str]) -> list[tuple[str, float]]:
    """Every (arch, width) pair the picker measures."""
    return [(arch, w) for arch in archs for w in widths_of(arch)]


def label(row: dict) -> str:
    return row["arch"] if len(widths_of(row["arch"])) == 1 else f"{row['arch']} ×{row['width']:g}"


def misses(row: dict, target: Any) -> list[str]:
    """Why ``row`` does not fit ``target`` (empty: it fits)."""
    out = []
    if target.max_latency_ms is not None and row["latency_ms"]["median"] > latency_allowed(target):
        out.append(f"latency {row['latency_ms']['median']:.3g} ms > {latency_allowed(target):.3g}")
    if target.max_size_mb is not None and row["size_mb"] > target.max_size_mb:
        out.append(f"size {row['size_mb']:.3g} MB > {target.max_size_mb:g}")
    return out


def latency_allowed(target: Any) -> float:
    """The longest median latency that fits: ``max_latency_ms`` less the headroom."""
    return target.max_latency_ms * (1 - target.headroom)


def describe_target(target: Any) -> str:
    headroom = f" less {target.headroom:.0%} headroom" if target.headroom else ""
    limits = [f"max_latency_ms {target.max_latency_ms:g}{headroom}" if target.max_latency_ms is not None else "",
              f"max_size_mb {target.max_size_mb:g}" if target.max_size_mb is not None else ""]
    return (", ".join(x for x in limits if x)
            + f"; {target.precision}, batch {target.batch}, {target.threads} thread{'s' if target.threads > 1 else ''}")


def pick(rows: Sequence[dict], target: Any) -> dict:
    """The candidate with the most MACs among those that fit (ties: the faster one), the table with each row's
    ``fits`` and ``misses``, and the reason. No candidate fits: :class:`InputError` naming the fastest one."""
    if not rows:
        raise ValueError("pick: no candidates")
    table = [{**r, "misses": misses(r, target)} for r in rows]
    for r in table:
        r["fits"] = not r["misses"]
    fits = [r for r in table if r["fits"]]
    if not fits:
        fastest = min(table, key=lambda r: (r["latency_ms"]["median"], r["size_mb"]))
        smallest = min(table, key=lambda r: r["size_mb"])
        raise InputError(
            f"student.target: none of the {len(table)} candidates fits ({describe_target(target)}); the fastest, "
            f"{label(fastest)}, measured {fmt_spread(fastest['latency_ms'])} ms and {fastest['size_mb']:.3g} MB here"
            + (f" (the smallest, {label(smallest)}, {smallest['size_mb']:.3g} MB)" if smallest is not fastest else "")
            + "; loosen the target or run where it is meant for")
    best = max(fits, key=lambda r: (r["macs"], -r["latency_ms"]["median"]))
    best["chosen"] = True
    reason = (f"{label(best)}: the most MACs ({best['macs'] / 1e6:.3g} M) of the {len(fits)} of {len(table)} candidates "
              f"that fit {describe_target(target)}; it measured {fmt_spread(best['latency_ms'])} ms and {best['size_mb']:.3g} MB")
    return {"arch": best["arch"], "width": best["width"], "reason": reason, "choice": best,
            "candidates": sorted(table, key=lambda r: r["macs"])}


def chosen_student(path: Path) -> tuple[str, float]:
    """(arch, width) in the pick stage's ``student_choice.json``."""
    choice = json.loads(Path(path).read_text())
    return choice["arch"], float(choice["width"])
