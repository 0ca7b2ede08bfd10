"""What to ship: for every kind of deployment, the fastest validated variant that passed its gates.

Pure over validation's rows (``validation.json`` ``variants``): each row says which kinds it is meant for
(``deploy_to``, from its export target) and carries its per-round timing samples. A CPU server is judged on
throughput at ``throughput_batch``, an edge device on batch-1 latency. When a smaller variant measured slower
here, the line says so, by how much (a ratio taken round by round), and why it may still be the choice on the
device: the target's own account of where it pays off. With a ``student.target``, only files that meet it
(precision included, :func:`edgedistill.deploy.promises.target_check`) are considered, and a kind none meets says so.
An int8 file that keeps layers in float to hold its accuracy (:mod:`edgedistill.deploy.int8_fallback`) says how many.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from edgedistill.base.timing import fmt_spread, per_round_ratio, spread

KIND_NAMES = {"server": "server CPU", "edge": "edge device"}
# per kind: (the row's samples, higher is better); kinds not listed here are judged like "edge"
CRITERIA = {"server": ("images_per_second_samples", True), "edge": ("latency_ms_samples", False)}


def _note(name: str) -> str:
    from edgedistill.deploy.targets import TARGETS

    return TARGETS.get(name).device_note() if name in TARGETS else ""


def recommend(variants: Mapping[str, dict], note: Callable[[str], str] = _note, target: Any = None) -> list[dict]:
    """One recommendation per deployment kind named by any row's ``deploy_to``; ``target``: the recipe's
    ``student.target`` (rows then carry ``target``: how each file stands against it)."""
    kinds = [k for k in KIND_NAMES if any(k in r.get("deploy_to", ()) for r in variants.values())]
    kinds += sorted({k for r in variants.values() for k in r.get("deploy_to", ())} - set(kinds))
    return [_one(kind, variants, note, target) for kind in kinds]


def describe_target(target: Any) -> str:
    """``int8, ≤ 0.6 MB, ≤ 3 ms`` for a ``student.target``."""
    limits = [target.precision]
    if target.max_size_mb is not None:
        limits.append(f"≤ {target.max_size_mb:g} MB")
    if target.max_latency_ms is not None:
        limits.append(f"≤ {target.max_latency_ms:g} ms")
    return ", ".join(limits)


def _one(kind: str, variants: Mapping[str, dict], note: Callable[[str], str], target: Any) -> dict:
    key, higher = CRITERIA.get(kind, CRITERIA["edge"])
    kind_name = KIND_NAMES.get(kind, kind)
    meant = {n: r for n, r in variants.items() if kind in r.get("deploy_to", ())}
    ok = {n: r for n, r in meant.items() if r.get("passed") and r.get(key)}
    if target is not None and ok:
        ok = {n: r for n, r in ok.items() if r["target"]["meets"]}
        if not ok:
            missed = [r["target"]["why"] for r in meant.values() if "target" in r]
            return {"kind": kind, "variant": None, "line": f"{kind_name}: nothing to ship that meets student.target "
                                                               f"({describe_target(target)}): {'; '.join(missed)}"}
    if not ok:
        return {"kind": kind, "variant": None, "line": f"{kind_name}: nothing to ship: no variant meant for it "
                                                           f"({', '.join(meant)}) passed its gates"}
    median = {n: spread(r[key])["median"] for n, r in ok.items()}
    best = max(ok, key=median.get) if higher else min(ok, key=median.get)
    r = ok[best]
    figure = (f"{fmt_spread(spread(r[key]), '{:,.0f}')} img/s at the validation batch" if higher
              else f"{fmt_spread(spread(r[key]))} ms per image at batch 1")
    fallback = (", quantisation-aware trained" if r.get("qat") else "") + (
        f", {len(r['float_layers'])} layer{'s' * (len(r['float_layers']) != 1)} kept in float to hold its accuracy"
        if r.get("float_layers") else "")
    line = (f"{kind_name}: ship {best} ({r['path']}{fallback}): {r['size_bytes'] / 1e6:.2f} MB, {r['test_top1']:.2f}% top-1, {figure}")
    torch_ratio = r.get("speedup_vs_torch")
    if higher and torch_ratio:
        line += f", {fmt_spread(torch_ratio, '{:.2f}')}× PyTorch eager"
    slower = []
    for n, o in ok.items():
        if n == best or not o["size_bytes"] < r["size_bytes"]:
            continue
        # how many times slower the smaller one is, round by round
        ratio = spread(per_round_ratio(r[key], o[key]) if higher else per_round_ratio(o[key], r[key]))
        if ratio["median"] <= 1.0:  # as fast within the rounds' noise: nothing to explain
            continue
        slower.append({"variant": n, "smaller_by": round(r["size_bytes"] / o["size_bytes"], 2), "slower_by": ratio, "note": note(n)})
        line += (f". {n} is {r['size_bytes'] / o['size_bytes']:.1f}× smaller but {fmt_spread(ratio, '{:.2f}')}× slower on this "
                 f"machine; it may still be the one for the device: {note(n) or 'its runtime there decides'}")
    return {"kind": kind, "variant": best, "path": r["path"], "size_bytes": r["size_bytes"], "test_top1": r["test_top1"],
            "criterion": key, "figure": spread(r[key]), "slower_here": slower, "line": line}
