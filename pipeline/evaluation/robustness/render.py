"""The robustness results as a Markdown table (runs side by side) and a PNG plot."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

from pipeline.evaluation.extra import require
from pipeline.evaluation.robustness.runner import RobustnessRow


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if not math.isfinite(value) else f"{value:.{digits}f}"


def _grouped(rows: list[RobustnessRow]) -> tuple[list[str], list[str], dict[tuple[str, str], list[RobustnessRow]]]:
    runs = list(dict.fromkeys(r.run for r in rows))
    attacks = list(dict.fromkeys(r.attack for r in rows))
    groups: dict[tuple[str, str], list[RobustnessRow]] = {}
    for row in rows:
        groups.setdefault((row.run, row.attack), []).append(row)
    return runs, attacks, groups


def summary_table(rows: list[RobustnessRow], target: float, timing: dict | None = None) -> str:
    """Markdown: per attack, median MOS-LQO of the attacked protected audio and the attack's own
    Δe on clean audio, then per run the median Δe retained (attacked protected vs attacked clean
    over Δe before) and the share of items whose attacked Δe is ≥ `target`; with two or more runs a
    last column `gain` = retained(last run) − retained(first run). Unmeasured attacks say why.
    `timing` (optional): {"eot_views": run -> views, "manifest": run -> s per step and window from
    the run's manifests, "measured": run -> s per step from the interleaved timing}."""
    runs, attacks, groups = _grouped(rows)
    timing = timing or {}
    nan = float("nan")
    head = []
    for run in runs:
        ok = [r for a in attacks for r in groups.get((run, a), []) if not r.error]
        before = _median([r.delta_e_before for r in ok])
        items = len({r.key for r in groups.get((run, attacks[0]), [])}) if attacks else 0
        views = timing.get("eot_views", {}).get(run)
        head.append(
            f"- `{run}`: {items} items, median Δe before attacks {_fmt(before)}"
            + (f", EOT views {list(views)}" if views else "")
            + f"; s per PGD step and window: {_fmt(timing.get('measured', {}).get(run, nan), 2)} measured "
            f"(interleaved, fwd+bwd), {_fmt(timing.get('manifest', {}).get(run, nan), 2)} in the protect run"
        )
    cols = ["attack", "MOS-LQO", "Δe attack alone"]
    for run in runs:
        cols += [f"retained `{run}`", f"≥ {target:g} `{run}`"]
    gain = len(runs) >= 2
    if gain:
        cols.append(f"gain `{runs[-1]}` − `{runs[0]}`")
    lines = [*head, "", "| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for attack in attacks:
        every = [r for run in runs for r in groups.get((run, attack), [])]
        ok = [r for r in every if not r.error]
        if not ok:
            why = every[0].error if every else ""
            lines.append(f"| {attack} | {why[:90]} |" + " |" * (len(cols) - 2))
            continue
        cells = [
            attack,
            _fmt(_median([r.mos_lqo for r in ok]), 2),
            _fmt(_median([r.delta_e_attack_on_clean for r in ok])),
        ]
        retained: list[float] = []
        for run in runs:
            mine = [r for r in groups.get((run, attack), []) if not r.error]
            value = _median([r.retained for r in mine])
            retained.append(value)
            share = float(np.mean([r.above_target for r in mine])) if mine else float("nan")
            cells += [_fmt(value, 2), "–" if not math.isfinite(share) else f"{share:.0%}"]
        if gain:
            cells.append(_fmt(retained[-1] - retained[0], 2))
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\nretained = Δe(CLAP(A(x)), CLAP(A(x+δ))) / Δe(CLAP(x), CLAP(x+δ)), first 10 s window, median over "
        "items; MOS-LQO: ViSQOL v3 of A(x+δ) against x (length-changing attacks are scored against the "
        "unstretched x and read low for that reason); Δe attack alone = Δe(CLAP(x), CLAP(A(x)))."
    )
    return "\n".join(lines) + "\n" + note


def plot_png(rows: list[RobustnessRow], random_weights: bool) -> bytes:
    """Horizontal bars: median retained Δe per attack, one bar per run; PNG bytes."""
    figure = require("matplotlib.figure", "unlearnable robustness").Figure
    runs, attacks, groups = _grouped(rows)
    measured = [a for a in attacks if any(not r.error for run in runs for r in groups.get((run, a), []))]
    fig = figure(
        figsize=(8, 0.22 * max(len(measured), 4) * max(1, len(runs)) ** 0.5 + 1.2), dpi=100, layout="constrained"
    )
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(runs))
    ys = np.arange(len(measured))
    for i, run in enumerate(runs):
        values = [_median([r.retained for r in groups.get((run, a), []) if not r.error]) for a in measured]
        ax.barh(ys + i * height, [v if math.isfinite(v) else 0.0 for v in values], height, label=run)
    ax.set_yticks(ys + height * (len(runs) - 1) / 2, measured, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("median Δe retained: Δe(A(x), A(x+δ)) / Δe(x, x+δ)")
    title = "Δe retained under the attack suite"
    if random_weights:
        title += " (RANDOM CLAP WEIGHTS)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
