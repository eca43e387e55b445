"""Partial coverage: a catalog is rarely protected whole on day one.

`--protected-share 25,50,80,100` trains one more imitator per share s < 100 % (`protected@25`,
...) on a training set in which round(s × n) of each style's n tracks are protected and the rest
are clean; 0 % is the `clean` model and 100 % the `protected` one. The covered tracks are the
first of one seeded shuffle per style, so a smaller share's tracks are a subset of a larger
share's. No audio is recomputed: the mixed training set takes the prepared clean and protected
crops, log-mels and CLAP conditions row by row.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from pipeline.evaluation.imitation.metrics import median


def share_name(share: float) -> str:
    """`protected@25` for 0.25."""
    return f"protected@{round(100 * share)}"


def parse_shares(text: str) -> tuple[float, ...]:
    """'25,50,80,100' (percent) -> (0.25, 0.5, 0.8, 1.0); each in (0, 100]."""
    shares = tuple(float(part) / 100 for part in text.split(",") if part.strip())
    if not shares or any(not 0 < s <= 1 for s in shares):
        raise ValueError(f"--protected-share wants percentages in (0, 100], got {text!r}")
    return shares


def covered_items(styles: list[str], share: float, seed: int) -> list[bool]:
    """Per item: whether it is protected at `share` (round(share × n) of each style's n tracks)."""
    covered = [False] * len(styles)
    for style in sorted(set(styles)):
        members = [i for i, s in enumerate(styles) if s == style]
        random.Random(f"{seed}:{style}").shuffle(members)
        for i in members[: round(share * len(members))]:
            covered[i] = True
    return covered


def add_coverage(data: dict[str, Any], shares: tuple[float, ...], crops_per_track: int, seed: int) -> list[str]:
    """Add `protected@<pct>/{wave,logmel,cond,covered}` to `data` for each share < 1; returns the
    new model names (in the order of `shares`)."""
    names: list[str] = []
    for share in shares:
        if share >= 1.0:
            continue
        name = share_name(share)
        covered = torch.tensor(covered_items(list(data["styles"]), share, seed))
        rows = covered.repeat_interleave(crops_per_track)
        for part in ("wave", "logmel", "cond"):
            clean, protected = data[f"clean/{part}"], data[f"protected/{part}"]
            mask = rows.view(-1, *([1] * (clean.dim() - 1)))
            data[f"{name}/{part}"] = torch.where(mask, protected, clean)
        data[f"{name}/covered"] = covered
        names.append(name)
    return names


def is_covered(data: dict[str, Any], model: str, index: int) -> bool:
    """Whether track `index` was protected in `model`'s training data."""
    if model == "protected":
        return True
    key = f"{model}/covered"
    return bool(data[key][index]) if key in data else False


def coverage_table(rows: list[dict], shares: tuple[float, ...]) -> list[dict]:
    """Per coverage (0 % = clean, each share, 100 % = protected): median centred similarity of the
    conditional generations (protecting and held-out encoder) over all tracks, over the covered
    and the uncovered ones, and the style-match rate."""
    levels = [(0.0, "clean"), *[(s, share_name(s)) for s in shares if s < 1], (1.0, "protected")]
    out = []
    for share, model in levels:
        group = [r for r in rows if r["model"] == model and r["mode"] == "conditional"]
        if not group:
            continue
        covered = [r for r in group if r["covered"]]
        uncovered = [r for r in group if not r["covered"]]
        out.append(
            {
                "share": share,
                "model": model,
                "tracks": len(group),
                "covered": len(covered),
                "centred_protecting": median([r["sim_protecting_centred"] for r in group]),
                "centred_held_out": median([r["sim_held_out_centred"] for r in group]),
                "centred_protecting_covered": median([r["sim_protecting_centred"] for r in covered]),
                "centred_protecting_uncovered": median([r["sim_protecting_centred"] for r in uncovered]),
                "style_match_protecting": sum(r["style_match_protecting"] for r in group) / len(group),
            }
        )
    return out


def coverage_markdown(table: list[dict]) -> str:
    """The coverage table as Markdown (empty string without rows)."""
    if not table:
        return ""
    lines = [
        "Coverage: imitation (conditional prompts, centred cosine to the original) against the share of each "
        "style's tracks protected in the imitator's training set.",
        "",
        "| protected share | model | tracks (covered) | centred (prot.) | centred (held-out) | centred, covered "
        "| centred, uncovered | style match (prot.) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: float) -> str:
        return "–" if v != v else f"{v:.3f}"

    for r in table:
        lines.append(
            f"| {r['share']:.0%} | {r['model']} | {r['tracks']} ({r['covered']}) | {f(r['centred_protecting'])} | "
            f"{f(r['centred_held_out'])} | {f(r['centred_protecting_covered'])} | "
            f"{f(r['centred_protecting_uncovered'])} | {r['style_match_protecting']:.0%} |"
        )
    return "\n".join(lines)
