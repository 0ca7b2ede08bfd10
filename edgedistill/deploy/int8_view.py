"""Showing what :mod:`edgedistill.deploy.int8_fallback` found: ``int8_sensitivity.json``'s plot and the report's lines."""

from __future__ import annotations

SENSITIVITY_FILE = "int8_sensitivity.json"
SENSITIVITY_PLOT = "int8_sensitivity.png"


def sensitivity_of(export_summary: dict) -> dict:
    """Each int8 variant's held-out judgement (export.json → variants → held_out), by variant name."""
    return {name: info["held_out"] for name, info in export_summary.get("variants", {}).items() if "held_out" in info}


def sensitivity_plot(results: dict) -> bytes:
    """Per int8 variant with a sensitivity table: each layer's logit SQNR when quantised alone, in graph order; the
    layers fallback kept in float in orange."""
    from edgedistill.base.plots import png, pyplot

    ranked = {name: r for name, r in results.items() if r.get("sensitivity")}
    plt = pyplot()
    fig, axes = plt.subplots(len(ranked), 1, figsize=(8, 2.6 * len(ranked)), dpi=110, squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], ranked.items()):
        rows = sorted(r["sensitivity"], key=lambda row: row["position"])
        kept = set(r["float_layers"])
        ax.bar(range(len(rows)), [min(row["sqnr_db"], 80.0) for row in rows], width=0.8,
               color=["tab:orange" if row["layer"] in kept else "tab:blue" for row in rows])
        ax.set_title(f"{name}: logit SQNR with one layer quantised ({len(kept)} kept in float, orange)", fontsize=9)
        ax.set_ylabel("SQNR (dB)")
        ax.set_xlabel("layer, in graph order")
    fig.tight_layout()
    return png(fig)


def sensitivity_lines(results: dict, top: int = 10) -> list[str]:
    """Markdown for the report: per int8 variant, the held-out judgement before and after fallback and the most
    sensitive layers."""
    out = []
    for name, r in results.items():
        plain, after = r["int8"], r.get("fallback")
        line = (f"- **{name}**: all layers in int8 changed {plain['changed']:.2f} % of the held-out answers "
                f"(limit {r['limit']:g} %, SQNR {plain['sqnr_db']:.1f} dB)")
        if after is not None:
            line += (f"; with {len(r['float_layers'])} layers in float, {after['changed']:.2f} % (SQNR {after['sqnr_db']:.1f} dB)"
                     + ("" if r["fits"] else ": still over the limit, every layer tried"))
        out.append(line + ".")
        if r.get("sensitivity"):
            out += ["", "  | rank | layer | SQNR alone (dB) | answers changed alone | kept in float |", "  | ---: | --- | ---: | ---: | :-: |"]
            out += [f"  | {i + 1} | `{row['layer']}` | {row['sqnr_db']:.1f} | {row['changed']:.2f} % | {'yes' if row['layer'] in r['float_layers'] else ''} |"
                    for i, row in enumerate(r["sensitivity"][:top])]
            out.append("")
    return out
