"""The run's story: ``report.md`` with tables and plots, and rich tables for the terminal.

Everything here reads the run folder's files (the public contract), never in-memory state, so
``edgedistill report`` can re-render any finished or partial run.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from edgedistill.base import fsio
from edgedistill.deploy.int8_view import SENSITIVITY_FILE, SENSITIVITY_PLOT, sensitivity_lines
from edgedistill.distill.qat import QAT_FILE
from edgedistill.base.plots import png, pyplot
from edgedistill.base.timing import fmt_spread, spread_of
from edgedistill.pipeline.folder import SKIPPED_FILE

# ---------------------------------------------------------------- terminal tables


def energy_table(info: dict) -> Table:
    t = Table(title=f"energy groups (T_E={info['temperature']:g}, r={info['fraction']:g})")
    for col in ("group", "size", "mean energy", "mean teacher confidence", "teacher accuracy"):
        t.add_column(col, justify="right" if col != "group" else "left")
    for name, g in info["groups"].items():
        if g["size"]:
            t.add_row(name, str(g["size"]), f"{g['mean_energy']:.3f}", f"{g['mean_confidence']:.3f}", f"{g['teacher_accuracy']:.1f}%")
        else:
            t.add_row(name, "0", "–", "–", "–")
    return t


def plan_table(plan: dict) -> Table:
    budget = plan.get("budget") or {}
    title = "HE-DA cost plan"
    if budget.get("max_overhead") is not None:
        title += f" (budget: +{100 * budget['max_overhead']:.0f}% epoch time)"
    elif budget.get("max_minutes") is not None:
        title += f" (budget: {budget['max_minutes']:g} min)"
    t = Table(title=title)
    for col in ("r", "epoch s", "overhead", "total min", ""):
        t.add_column(col, justify="right")
    for row in plan["curve"]:
        mark = "◀ chosen" if plan["fraction"] is not None and abs(row["r"] - plan["fraction"]) < 1e-9 else ""
        over = _over_budget(row, budget)
        t.add_row(f"{row['r']:.2f}", f"{row['epoch_seconds']:.2f}", f"{100 * row['overhead']:+.1f}%", f"{row['total_minutes']:.2f}", mark or ("over budget" if over else ""))
    return t


def _over_budget(row: dict, budget: dict) -> bool:
    if budget.get("max_overhead") is not None:
        return row["overhead"] > budget["max_overhead"] + 1e-9
    if budget.get("max_minutes") is not None:
        return row["total_minutes"] > budget["max_minutes"] + 1e-9
    return False


def budget_line(budget: dict) -> str:
    """One terminal line: what the budget was, what was spent, and the verdict."""
    return f"budget: {budget['verdict']} · r per epoch: {' '.join(f'{r:g}' for r in budget['fractions'])}"


def _budget_section(budget: dict) -> list[str]:
    pred = budget["prediction"]
    goal = budget.get("budget") or {}
    kind = (f"+{100 * goal['max_overhead']:.0f}% over the same run without extras" if goal.get("max_overhead") is not None
            else f"{goal['max_minutes']:g} min of distillation" if goal.get("max_minutes") is not None else "none")
    lines = ["## Budget (distillation)", "", f"Budget: {kind}. **{budget['verdict']}**.", "",
             "| | seconds |", "| --- | ---: |", f"| spent (distill stage, wall time) | {budget['spent_seconds']:.1f} |"]
    if budget.get("allowed_seconds") is not None:
        lines.append(f"| allowed | {budget['allowed_seconds']:.1f} |")
    lines.append(f"| a-priori prediction (plan, r = {pred['fraction'] or 0:g}) | {60 * pred['predicted_total_minutes']:.1f} |")
    lines += ["", "r per epoch: " + ", ".join(f"{r:g}" for r in budget["fractions"]) + ".", ""]
    return lines


def summary_table(run: Path) -> Table:
    t = Table(title=f"edgedistill · {run.name}")
    t.add_column("what")
    t.add_column("value", justify="right")
    for what, value in _headline(run):
        t.add_row(what, value)
    return t


# ---------------------------------------------------------------- report.md


def _load(run: Path, name: str):
    p = run / name
    if not p.exists():
        return None
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return json.loads(p.read_text())


def _headline(run: Path) -> list[tuple[str, str]]:
    rows = []
    teacher, metrics, plan, val = _load(run, "teacher.json"), _load(run, "metrics.jsonl"), _load(run, "plan.json"), _load(run, "validation.json")
    if teacher:
        rows.append(("teacher test top-1", f"{teacher['test_top1']:.2f}%"))
    if metrics:
        rows.append(("student test top-1 (PyTorch)", f"{metrics[-1]['test_top1']:.2f}%"))
        rows.append(("distillation time", f"{sum(m['epoch_seconds'] for m in metrics) / 60:.1f} min"))
    budget = _load(run, "budget.json")
    if budget:
        rows.append(("HE-DA r per epoch", " ".join(f"{r:g}" for r in budget["fractions"]) or "–"))
        rows.append(("budget", budget["verdict"]))
    elif plan:
        rows.append(("HE-DA fraction r (planned)", "none" if not plan["fraction"] else f"{plan['fraction']:.2f}"))
    for name, v in (val or {}).get("variants", {}).items():
        if v.get("test_top1") is not None:
            ms = "–" if v.get("latency_ms_p50") is None else f"{v['latency_ms_p50']:.3g} ms"
            rows.append((f"{name} ONNX top-1 · batch-1 median", f"{v['test_top1']:.2f}% · {ms} · {'✅' if v.get('passed') else '❌'}"))
    rows += [(f"ship ({r['kind']})", r["variant"] or "nothing passed") for r in (val or {}).get("recommendations", [])]
    return rows


def training_plot(metrics: list[dict], teacher_top1: float | None) -> bytes:
    plt = pyplot()

    epochs = [m["epoch"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    ax1.plot(epochs, [m["train_loss"] for m in metrics], marker="o", ms=3)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax2.plot(epochs, [m["test_top1"] for m in metrics], marker="o", ms=3, label="student")
    if teacher_top1 is not None:
        ax2.axhline(teacher_top1, color="gray", ls="--", lw=1, label="teacher")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test top-1 (%)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def write_report(run: Path, r) -> dict:
    """Write ``run/report.md`` (and its plots) for the recipe ``r`` from the run folder's files."""
    teacher, energy, plan = _load(run, "teacher.json"), _load(run, "energy.json"), _load(run, "plan.json")
    metrics, val, export = _load(run, "metrics.jsonl"), _load(run, "validation.json"), _load(run, "export.json")
    choice = _load(run, "student_choice.json")
    student = f"{choice['arch']} ×{choice['width']:g}, picked for the target" if choice else r.student.arch
    lines = [f"# edgedistill report: {r.name}", ""]
    lines += [
        f"Teacher `{r.teacher.source}`{f' ({r.teacher.arch})' if r.teacher.arch else ''} → student `{student}` "
        f"with loss `{r.distill.loss.name}` on `{r.data.source}` data; device `{plan['device'] if plan else '?'}`.",
        "",
        "| what | value |",
        "| --- | --- |",
        *[f"| {a} | {b} |" for a, b in _headline(run)],
        "",
    ]
    lines += _checks_section(teacher, energy, val, _load(run, SKIPPED_FILE))
    if choice:
        lines += _choice_section(choice)
    if val:
        lines += _compression_section(run, teacher, val, _load(run, "baseline.json"))
    if energy:
        lines += [
            "## Energy of the training set",
            "",
            f"`E = −T·logsumexp(z/T)` with T = {energy['temperature']:g}; fraction r = {energy['fraction']:g}; "
            f"thresholds E_low = {energy['threshold_low']:.3f}, E_high = {energy['threshold_high']:.3f}.",
            "",
            "| group | size | mean energy | mean teacher confidence | teacher accuracy |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, g in energy["groups"].items():
            cells = [f"{g['mean_energy']:.3f}", f"{g['mean_confidence']:.3f}", f"{g['teacher_accuracy']:.1f}%"] if g["size"] else ["–"] * 3
            lines.append(f"| {name} | {g['size']} | " + " | ".join(cells) + " |")
        lines += ["", "![energy histogram](energy_hist.png)", "", "![lowest and highest energy images](energy_gallery.png)", ""]
    if plan:
        lines += ["## Compute plan (HE-DA)", "", f"Chosen r: **{plan['fraction']:g}** — {plan['reason']}.", ""]
        lines += ["| r | predicted epoch s | overhead | total min |", "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {row['r']:.2f} | {row['epoch_seconds']:.2f} | {100 * row['overhead']:+.1f}% | {row['total_minutes']:.2f} |" for row in plan["curve"]]
        lines.append("")
    budget = _load(run, "budget.json")
    if budget:
        lines += _budget_section(budget)
    if metrics:
        fsio.write_bytes(run / "training.png", training_plot(metrics, teacher and teacher.get("test_top1")))
        lines += ["## Distillation", "", "![training curves](training.png)", "", "| epoch | train loss | test top-1 | epoch s | img/s | lr |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {m['epoch']} | {m['train_loss']:.4f} | {m['test_top1']:.2f}% | {m['epoch_seconds']:.1f} | {m['images_per_second']:.0f} | {m['lr']:.4g} |" for m in metrics]
        lines.append("")
    lines += _long_tail_section(teacher, metrics, val)
    if val:
        lines += _validation_section(val, export)
    lines += _int8_sections(run)
    fsio.write_text(run / "report.md", "\n".join(lines) + "\n")
    return {"report": str(run / "report.md")}


def _int8_sections(run: Path) -> list[str]:
    """Quantisation-aware training (qat.json) and the per-layer sensitivity of the int8 files, where the run has them."""
    out = _qat_section(qat, _load(run, "qat_metrics.jsonl")) if (qat := _load(run, QAT_FILE)) else []
    if judged := _load(run, SENSITIVITY_FILE):
        out += ["## int8: which layers break it", "",
                "Judged on held-out training images against the float student (edgedistill/deploy/int8_fallback.py); "
                "answers changed bound the top-1 points the file can lose there.", "", *sensitivity_lines(judged), ""]
        if (run / SENSITIVITY_PLOT).exists():
            out += [f"![per-layer sensitivity]({SENSITIVITY_PLOT})", ""]
    return out


def _qat_section(qat: dict, metrics: list[dict] | None) -> list[str]:
    """What the qat stage decided and, when it trained, what int8 looks like before and after (simulated, held out)."""
    out = ["## Quantisation-aware training", "", f"export.int8.method: {qat['method']} ({qat['granularity']}): "
           + ("trained" if qat["trained"] else "not trained") + f" — {qat['reason']}.", ""]
    if qat["ptq"] is not None:
        out += ["| held-out images | float student | int8 after distillation | int8 after QAT |", "| ---: | ---: | ---: | ---: |",
                f"| {qat['held_out_images']} | {qat['float_top1']:.2f}% | {qat['ptq']['top1']:.2f}% (SQNR {qat['ptq']['sqnr_db']:.1f} dB) | "
                + (f"{qat['qat']['top1']:.2f}%" if qat.get("qat") else "–") + " |", "",
                "int8 simulated in PyTorch (torchao's x86 scheme); the files are validated below in their runtimes.", ""]
    if metrics:
        out += ["| epoch | train loss | test top-1 (simulated int8) | BN frozen | observers frozen | epoch s |", "| ---: | ---: | ---: | --- | --- | ---: |"]
        out += [f"| {m['epoch']} | {m['train_loss']:.4f} | {m['test_top1']:.2f}% | {'yes' if m['bn_frozen'] else 'no'} | "
                f"{'yes' if m['observers_frozen'] else 'no'} | {m['epoch_seconds']:.1f} |" for m in metrics]
        out.append("")
    return out


def _long_tail_section(teacher: dict | None, metrics: list[dict] | None, val: dict | None) -> list[str]:
    """Many-, medium- and few-shot top-1 (:mod:`edgedistill.base.shots`), for a long-tailed training split only."""
    rows = [("teacher", teacher), ("student (PyTorch, last epoch)", metrics[-1] if metrics else None)]
    rows += [(f"`{v['path']}`", v) for v in (val or {}).get("variants", {}).values()]
    rows = [(name, r) for name, r in rows if r and r.get("shot_top1")]
    if not rows:
        return []
    groups = list(rows[0][1]["shot_top1"])
    sizes = (val or {}).get("shot_classes")
    head = [f"{g} ({sizes[g]} classes)" if sizes else g for g in groups]
    out = ["## Long tail: top-1 by shot group", "",
           "The training split is long-tailed: a class is many-shot with more than 100 training images, medium-shot "
           "with 20 to 100, few-shot with fewer than 20 (the test split is balanced).", "",
           "| model | overall | " + " | ".join(head) + " |", "| --- | ---: |" + " ---: |" * len(groups)]
    for name, r in rows:
        cells = ["–" if r["shot_top1"][g] is None else f"{r['shot_top1'][g]:.2f}%" for g in groups]
        out.append(f"| {name} | {r['test_top1']:.2f}% | " + " | ".join(cells) + " |")
    return out + [""]


def _checks_section(teacher: dict | None, energy: dict | None, val: dict | None, skipped: list[dict] | None) -> list[str]:
    """Whether the run learnt from something and produced something: the images it left out, the teacher and every
    file against the test set's chance level, the energy groups apart, every file against ``student.target``."""
    rows = []
    if skipped:
        shown = "; ".join(f"`{Path(s['path']).name}`" for s in skipped[:3]) + (" …" if len(skipped) > 3 else "")
        rows.append(("unreadable images left out", f"{len(skipped)} ({shown}; all in {SKIPPED_FILE})", "⚠️ data.on_bad_image: skip"))
    if teacher and teacher.get("chance"):
        c = teacher["chance"]
        rows.append(("teacher above chance", f"{teacher['test_top1']:.2f}% (chance {c['guess']:.2f}%, bar {c['bar']:.2f}%)",
                     "✅" if teacher["test_top1"] >= c["bar"] else "⚠️ allowed (teacher.allow_weak)"))
    if energy and "groups_apart" in energy:
        rows.append(("energy groups apart", f"E_low {energy['threshold_low']:.3f} · E_high {energy['threshold_high']:.3f}",
                     "✅" if energy["groups_apart"] else "⚠️ the teacher is about as unsure of every image"))
    for name, v in (val or {}).get("variants", {}).items():
        if val.get("chance") and v.get("test_top1") is not None:
            ok = v["test_top1"] >= val["chance"]["bar"]
            rows.append((f"{name} above chance", f"{v['test_top1']:.2f}% (bar {val['chance']['bar']:.2f}%)",
                         "✅" if ok else "❌" if not val["settings"].get("allow_weak") else "⚠️ allowed (validate.allow_weak)"))
        if v.get("target"):
            meets = v["target"]["meets"]
            rows.append((f"{name} meets student.target", v["target"]["why"],
                         "✅" if meets else "❌" if v["target"]["failures"] else "– another precision"))
    if not rows:
        return []
    return ["## Checks", "", "| check | measured | status |", "| --- | --- | --- |", *[f"| {a} | {b} | {c} |" for a, b, c in rows], ""]


def _validation_section(val: dict, export: dict | None) -> list[str]:
    """Every variant of validation.json, the files of every target and any NNAPI / CoreML coverage in export.json."""
    torch_ips = val.get("torch_images_per_second")
    out = ["## Exported models (validated on the CPU)", ""]
    settings = val.get("settings", {})
    out += [f"Latency: one image (batch 1); throughput: batch {settings.get('throughput_batch', '?')}; threads: {settings.get('threads', '?')}; "
            f"median [central 95 %] of {settings.get('rounds', '?')} rounds interleaved across the variants and PyTorch eager, "
            "ratios taken round by round.", ""]
    out += ["| variant | file | size | top-1 | Δ vs PyTorch | max abs diff | batch-1 ms | img/s | × PyTorch img/s | status |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, v in val.get("variants", {}).items():
        def f(key, fmt="{:.2f}"):
            x = v.get(key)
            return fmt.format(x) if isinstance(x, (int, float)) else "–"

        size = f"{v['size_bytes'] / 1e6:.2f} MB" if v.get("size_bytes") else "–"
        speedup = fmt_spread(v["speedup_vs_torch"], "{:.2f}") + "×" if v.get("speedup_vs_torch") else "–"
        status = "✅" if v.get("passed") else "❌ " + "; ".join(v.get("failures", []))
        out.append(f"| {name} | `{v.get('path', '?')}` | {size} | {f('test_top1')}% | {f('delta_top1', '{:+.2f}')} | {f('max_abs_diff', '{:.2e}')} | "
                   f"{fmt_spread(spread_of(v, 'latency_ms'))} | {fmt_spread(spread_of(v, 'images_per_second'), '{:,.0f}')} | {speedup} | {status} |")
    if torch_ips:
        out += ["", f"PyTorch eager: {fmt_spread(spread_of(val, 'torch_images_per_second'), '{:,.0f}')} img/s at the same batch size and thread count."]
    if val.get("recommendations"):
        out += ["", "### What to ship", "", *[f"- {rec['line']}" for rec in val["recommendations"]]]
    variants = (export or {}).get("variants", {})
    if any(info.get("files") for info in variants.values()):
        out += ["", "Files written by each export target:", ""]
        out += [f"- **{name}**: " + ", ".join(f"`{f}`" for f in info["files"]) for name, info in variants.items() if info.get("files")]
    coverage = {n: i["usability"] for n, i in variants.items() if i.get("usability")}
    for name, usability in coverage.items():
        out += ["", f"### {name}: NNAPI / CoreML coverage (ONNX Runtime Mobile)", ""]
        if "error" in usability:
            out.append(f"The usability check failed: {usability['error']}")
            continue
        out += ["| execution provider | supported nodes | partitions | suitability | unsupported ops |", "| --- | ---: | ---: | --- | --- |"]
        for ep, u in usability.items():
            unsupported = ", ".join(u.get("unsupported_ops", [])) or "–"
            out.append(f"| {ep} | {u['supported_nodes']}/{u['nodes']} | {u['partitions']} | {u.get('suitability', '–')} | {unsupported} |")
    return out + [""]


def _choice_section(choice: dict) -> list[str]:
    from edgedistill.deploy.pick import label
    from edgedistill.deploy.pick_view import describe_target_dict

    out = ["## Student choice (student.arch: auto)", "", f"Target: {describe_target_dict(choice['target'])}. Chosen: **{choice['reason']}**.",
           "", "Each candidate was exported untrained and timed in ONNX Runtime on this machine "
           f"({choice['settings']['machine']}), {choice['settings']['rounds']} interleaved rounds.", "",
           "| student | params | MACs | size MB | latency ms [95 %] | |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in choice["candidates"]:
        mark = "**chosen**" if r.get("chosen") else ("fits" if r["fits"] else "; ".join(r["misses"]))
        out.append(f"| {label(r)} | {r['parameters'] / 1e6:.2f} M | {r['macs'] / 1e6:.1f} M | {r['size_mb']:.2f} | "
                   f"{fmt_spread(r['latency_ms'])} | {mark} |")
    return out + ["", "![latency vs MACs of the candidates](student_choice.png)", ""]


def _compression_section(run: Path, teacher: dict | None, val: dict, baseline: dict | None) -> list[str]:
    """Teacher vs student: parameters, MACs, file size, eager throughput, accuracy; the no-teacher baseline; the
    accuracy / latency / size of every variant (plot)."""
    models = val.get("models", {})
    t, s = models.get("teacher") or {}, models.get("student") or {}
    variants = val.get("variants", {})
    files = ", ".join(f"{v['size_bytes'] / 1e6:.2f} MB ({n})" for n, v in variants.items() if v.get("size_bytes"))
    tpath = Path(teacher["path"]) if teacher and teacher.get("path") else None
    tsize = f"{tpath.stat().st_size / 1e6:.2f} MB (`{tpath.name}`)" if tpath and tpath.is_file() else "–"

    def num(v, scale=1e6, unit=" M"):
        return "–" if v is None else f"{v / scale:.3g}{unit}"

    def times(a, b):
        return f"{a / b:.3g}×" if a and b else "–"

    ttop1, stop1 = (teacher or {}).get("test_top1"), val.get("torch_top1")
    out = ["## Compression: teacher vs student", "", "| | teacher | student | teacher / student |", "| --- | ---: | ---: | ---: |",
           f"| parameters | {num(t.get('parameters'))} | {num(s.get('parameters'))} | {times(t.get('parameters'), s.get('parameters'))} |",
           f"| MACs per image | {num(t.get('macs'))} | {num(s.get('macs'))} | {times(t.get('macs'), s.get('macs'))} |",
           f"| file size | {tsize} | {files or '–'} | |",
           f"| PyTorch eager img/s (CPU, validation batch) | {fmt_spread(spread_of(t, 'images_per_second'), '{:,.0f}')} | "
           f"{fmt_spread(spread_of(val, 'torch_images_per_second'), '{:,.0f}')} | student: {times(val.get('torch_images_per_second'), t.get('images_per_second'))} the teacher's |",
           f"| test top-1 | {'–' if ttop1 is None else f'{ttop1:.2f}%'} | {'–' if stop1 is None else f'{stop1:.2f}%'} | "
           f"{'–' if None in (ttop1, stop1) else f'{round(stop1 - ttop1, 2) + 0.0:+.2f} points'} |"]
    if baseline:
        gain = f"{round(stop1 - baseline['test_top1'], 2) + 0.0:+.2f} points" if stop1 is not None else "–"
        out.append(f"| student trained with {baseline['loss'].upper()} only (no teacher, same schedule) | | {baseline['test_top1']:.2f}% | "
                   f"distillation added {gain} |")
    points = {n: v for n, v in variants.items() if v.get("test_top1") is not None and v.get("latency_ms_p50") is not None}
    if points:
        fsio.write_bytes(run / "variants.png", variants_plot(points))
        out += ["", "![accuracy vs latency vs size of every variant](variants.png)"]
    return out + [""]


def variants_plot(variants: dict) -> bytes:
    """Test top-1 vs batch-1 latency (the central 95 % of the rounds as error bars) of every variant; the marker's area is its file size."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    biggest = max(v["size_bytes"] or 1 for v in variants.values())
    for name, v in variants.items():
        x, (lo, hi) = v["latency_ms_p50"], v.get("latency_ms_interval") or [v["latency_ms_p50"]] * 2
        ax.errorbar([x], [v["test_top1"]], xerr=[[x - lo], [hi - x]], fmt="none", ecolor="gray", capsize=2)
        ax.scatter([x], [v["test_top1"]], s=40 + 600 * (v["size_bytes"] or 0) / biggest, alpha=0.6,
                   marker="o" if v.get("passed") else "x")
        ax.annotate(f"{name} · {(v['size_bytes'] or 0) / 1e6:.2f} MB", (x, v["test_top1"]), fontsize=7, xytext=(6, 4), textcoords="offset points")
    ax.set_xlabel("latency, ms per image (batch 1, median and central 95 %)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("every exported variant (marker area: file size; x: failed its gate)", fontsize=9)
    fig.tight_layout()
    return png(fig)
