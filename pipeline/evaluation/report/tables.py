"""HTML building blocks of the report: number formatting, tables, small Markdown, percentiles."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.evaluation.report.figures import finite


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "–"
        magnitude = abs(value)
        if value != 0 and (magnitude >= 1e6 or magnitude < 0.1):
            return f"{value:.{digits}g}"  # 0.00298, 1.23e+07
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        return f"{value:.{digits}f}"
    return str(value)


def fmt_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    if numeric is None:
        numeric = [
            all(isinstance(r[i], (int, float, np.number)) for r in rows if r[i] is not None)
            for i in range(len(headers))
        ]
    head = "".join(
        f'<th class="{"num" if n else ""}">{html.escape(h)}</th>' for h, n in zip(headers, numeric, strict=True)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"num" if n else ""}">{html.escape(fmt(v))}</td>' for v, n in zip(row, numeric, strict=True)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_to_html(text: str) -> str:
    """Headings, pipe tables and paragraphs of a small Markdown file (everything escaped)."""
    parts: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in block[1:] if not all(set(c) <= set("-: ") for c in r)]
            parts.append(html_table(block[0], body, numeric=[False] * len(block[0])))
            continue
        if line.startswith("#"):
            level = min(6, len(line) - len(line.lstrip("#")) + 2)
            parts.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            parts.append(f"<p>{html.escape(line)}</p>")
        i += 1
    return "\n".join(parts)


def percentiles(values: np.ndarray) -> list[Any]:
    v = finite(values)
    if not v.size:
        return [0, *([float("nan")] * 6)]
    p = np.percentile(v, [5, 50, 95])
    return [
        int(v.size),
        float(v.min()),
        float(p[0]),
        float(p[1]),
        float(p[2]),
        float(v.max()),
        float(v.mean()),
    ]
