"""What a run promised about every file beyond its target's own gate: that it learnt something (it clears the
chance level of the test set) and that it fits the device target the student was picked for.

Pure over validation's rows. A file that breaks a promise fails a gate (exit 1, naming the file and the figure);
"what to ship" (:mod:`edgedistill.deploy.recommend`) only considers files that keep them.
"""

from __future__ import annotations

from typing import Any

from edgedistill.base.chance import ChanceBar


def chance_failures(row: dict, chance: ChanceBar, allow_weak: bool) -> list[str]:
    """A file whose test top-1 does not clear the bar, unless the recipe allows weak models."""
    top1 = row.get("test_top1")
    if allow_weak or top1 is None or chance.clears(top1):
        return []
    return [f"{chance.why(top1)} (validate.allow_weak: true lets it pass)"]


def target_check(row: dict, target: Any, threads: int) -> dict:
    """How the file of ``row`` stands against ``target`` (a ``student.target`` section), as
    ``{"meets": bool, "why": str, "failures": [str]}``.

    A file of another precision than the target's does not meet it but fails nothing: it is not the file the
    target was set for (an fp32 reference beside an int8 target). A file of the target's precision must be within
    ``max_size_mb`` and, when validation timed it as the target is set (batch 1 at ``threads`` threads),
    within ``max_latency_ms`` at its median; being over is a failure.
    """
    name = row["path"]
    if row.get("precision") != target.precision:
        return {"meets": False, "why": f"{name} is {row.get('precision')}; student.target.precision is {target.precision}",
                "failures": []}
    failures, notes = [], []
    size_mb = row["size_bytes"] / 1e6
    if target.max_size_mb is not None and size_mb > target.max_size_mb:
        failures.append(f"{name} is {size_mb:.3f} MB, over student.target.max_size_mb {target.max_size_mb:g}")
    latency = row.get("latency_ms_p50")
    if target.max_latency_ms is not None and latency is not None:
        if (target.batch, target.threads) != (1, threads):
            notes.append(f"latency not checked: validation times batch 1 at {threads} threads, the target is batch "
                         f"{target.batch} at {target.threads} (set validate.threads: {target.threads})")
        elif latency > target.max_latency_ms:
            failures.append(f"{name} takes {latency:.3g} ms per image at batch 1 (median), over student.target.max_latency_ms "
                            f"{target.max_latency_ms:g}")
    checked = [f"{size_mb:.3f} MB"] + ([f"{latency:.3g} ms"] if target.max_latency_ms is not None and latency is not None and not notes else [])
    why = "; ".join(failures) or f"{name} meets student.target ({', '.join(checked)})"
    return {"meets": not failures, "why": "; ".join([why, *notes]), "failures": failures}
