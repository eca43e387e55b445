"""Sections of the report about single items: examples with spectrograms, A/B listening clips
(read from the clean and protected tars), ViSQOL MOS-LQO."""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.evaluation.report.figures import img, mos_figure, spectrogram_figure
from pipeline.evaluation.report.read import (
    CLIP_SECONDS,
    LISTEN_BUDGET_BYTES,
    MOS_HIGH,
    MOS_TARGET,
    SPECTRO_SECONDS,
    OutputData,
    ReportError,
    read_members,
)
from pipeline.evaluation.report.tables import fmt, html_table, percentiles
from pipeline.io.output import OutputFolder
from pipeline.io.shards import list_shards
from pipeline.records import SampleStatus

logger = logging.getLogger(__name__)


@dataclass
class Example:
    """One item shown with spectrograms or A/B players."""

    shard_id: str
    key: str
    input_member: str
    output_member: str
    delta_e: float
    snr_db: float
    why: str
    moslqo: float = float("nan")
    clip_start_s: float | None = None  # A/B clip start in the track, seconds (None: the middle)


def _example(data: OutputData, idx: int, why: str, clip_start_s: float | None = None) -> Example:
    c = data.columns
    mos = c.get("visqol_moslqo")
    return Example(
        shard_id=str(c["shard_id"][idx]),
        key=str(c["key"][idx]),
        input_member=str(c["input_member"][idx]),
        output_member=str(c["output_member"][idx]),
        delta_e=float(c["delta_e_mean"][idx]),
        snr_db=float(c["snr_db"][idx]),
        why=why,
        moslqo=float("nan") if mos is None or mos[idx] is None else float(mos[idx]),
        clip_start_s=clip_start_s,
    )


def _written_ok(data: OutputData) -> np.ndarray:
    c = data.columns
    return (c["status"] == SampleStatus.OK) & c["written"].astype(bool) & (c["output_member"] != "")


def pick_examples(data: OutputData, n: int) -> list[Example]:
    """Lowest, median and highest Δe among written ok items, then evenly spaced ones."""
    c = data.columns
    ok = np.flatnonzero(_written_ok(data) & np.isfinite(c["delta_e_mean"].astype(float)))
    if not ok.size or n <= 0:
        return []
    order = ok[np.argsort(c["delta_e_mean"][ok].astype(float), kind="stable")]
    picks = [(0, "lowest Δe"), (len(order) // 2, "median Δe"), (len(order) - 1, "highest Δe")]
    if n > 3:
        picks += [(round(p), "") for p in np.linspace(0, len(order) - 1, n)[1:-1]]
    chosen: list[Example] = []
    seen: set[int] = set()
    for position, why in picks:
        idx = int(order[position])
        if idx in seen:
            continue
        seen.add(idx)
        chosen.append(_example(data, idx, why))
        if len(chosen) >= n:
            break
    return chosen


def pick_listening(data: OutputData, n: int, clip_seconds: float = CLIP_SECONDS) -> list[Example]:
    """The `n` written ok items with the lowest ViSQOL MOS-LQO (clip: the middle of their worst
    excerpt), then the `n` with the lowest Δe mean (clip: the middle of the track), each item once."""
    if n <= 0:
        return []
    written = _written_ok(data)
    mos, de = data.floats("visqol_moslqo"), data.floats("delta_e_mean")
    starts, scores = data.lists("visqol_excerpt_starts_s"), data.lists("visqol_excerpt_moslqo")
    chosen: dict[int, Example] = {}
    by_mos = np.flatnonzero(written & np.isfinite(mos) & data.flags("visqol_measured"))
    for idx in by_mos[np.argsort(mos[by_mos], kind="stable")][:n]:
        clip = None
        if starts[idx] and len(starts[idx]) == len(scores[idx]):
            worst = starts[idx][int(np.argmin(scores[idx]))]
            clip = worst + (data.visqol_excerpt_seconds - clip_seconds) / 2  # centred on it (clip_bounds clamps)
        chosen[int(idx)] = _example(data, int(idx), "lowest MOS-LQO", clip)
    by_de = np.flatnonzero(written & np.isfinite(de))
    for idx in by_de[np.argsort(de[by_de], kind="stable")][:n]:
        if int(idx) in chosen:
            chosen[int(idx)].why += ", lowest Δe"
        else:
            chosen[int(idx)] = _example(data, int(idx), "lowest Δe")
    return list(chosen.values())


ItemRenderer = Callable[[Example, Any, Any], str]  # (item, clean DecodedAudio, protected DecodedAudio) -> HTML


def render_items(
    data: OutputData,
    clean_url: str,
    items: list[Example],
    storage_options: Mapping[str, Any] | None,
    render_item: ItemRenderer,
) -> dict[tuple[str, str], str]:
    """HTML for each item from its clean input member and its protected output member, read from
    the tars and decoded one item at a time; a problem becomes a warning paragraph for the items
    it touches, never an exception."""
    from pipeline.io.audio import decode

    out: dict[tuple[str, str], str] = {}
    try:
        clean_shards = {ref.shard_id: ref.url for ref in list_shards(clean_url, storage_options)}
    except Exception as exc:
        warning = f"<p class='warn'>Cannot list clean shards at {html.escape(clean_url)}: {html.escape(str(exc))}</p>"
        return {(ex.shard_id, ex.key): warning for ex in items}
    folder = OutputFolder(data.url, storage_options)
    by_shard: dict[str, list[Example]] = {}
    for ex in items:
        by_shard.setdefault(ex.shard_id, []).append(ex)
    for shard_id, shard_items in by_shard.items():
        try:
            if shard_id not in clean_shards:
                raise ReportError(f"no clean shard {shard_id}.tar under {clean_url}")
            clean = read_members(clean_shards[shard_id], {e.input_member for e in shard_items}, storage_options)
            protected = read_members(
                folder.url + f"/{shard_id}.tar", {e.output_member for e in shard_items}, storage_options
            )
            for ex in shard_items:
                if ex.input_member not in clean or ex.output_member not in protected:
                    out[(shard_id, ex.key)] = "<p class='warn'>member missing from a shard</p>"
                    continue
                x = decode(clean[ex.input_member], min_seconds=0.0)
                y = decode(protected[ex.output_member], min_seconds=0.0)
                if x.sample_rate != y.sample_rate:
                    out[(shard_id, ex.key)] = "<p class='warn'>sample rates differ</p>"
                    continue
                out[(shard_id, ex.key)] = render_item(ex, x, y)
        except Exception as exc:  # one unreadable shard must not sink the report
            logger.warning("clean vs protected for %s: %s", shard_id, exc)
            for ex in shard_items:
                out.setdefault(
                    (shard_id, ex.key),
                    f"<p class='warn'>{html.escape(type(exc).__name__)}: {html.escape(str(exc))}</p>",
                )
    return out


def _no_clean_note(data: OutputData, what: str) -> str:
    return (
        f"<p class='note'>Pass <code>--clean</code> with the input shards {html.escape(what)}: the output "
        "folder has no <code>_config.yaml</code> naming them (io.input).</p>"
    )


def examples_section(data: OutputData, clean_url: str | None, n: int, storage_options: Mapping[str, Any] | None) -> str:
    parts = ["<h2 id='spectrograms'>Clean vs protected</h2>"]
    examples = pick_examples(data, n)
    if not clean_url:
        parts.append(_no_clean_note(data, "to compare clean and protected audio"))
        return "\n".join(parts)
    if not examples:
        parts.append("<p class='note'>No written ok item to show.</p>")
        return "\n".join(parts)

    def spectrograms(ex: Example, x: Any, y: Any) -> str:
        title = f"{ex.shard_id} / {ex.key}: Δe {ex.delta_e:.3f}, SNR {ex.snr_db:.1f} dB ({ex.why or 'sample'})"
        return img(spectrogram_figure(x.samples, y.samples, x.sample_rate, title), title)

    figures = render_items(data, clean_url, examples, storage_options, spectrograms)
    parts.append(
        f"<p class='note'>First {SPECTRO_SECONDS:g} s of each track, channels averaged. "
        "δ's panel has its own colour scale. Dashed lines: where MusicLDM's and CLAP's mel front ends "
        "stop; δ above them never reaches that model.</p>"
    )
    for ex in examples:
        where = html.escape(f"{ex.shard_id}, {ex.why or 'sample'}")
        parts.append(f"<h3>{html.escape(ex.key)} <span class='note'>({where})</span></h3>")
        parts.append(figures.get((ex.shard_id, ex.key), ""))
    return "\n".join(parts)


def flac_clip(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    """[samples, channels] float32 -> FLAC bytes (PCM_16, or PCM_24 for sources finer than 16 bits)."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.clip(samples, -1.0, 1.0), rate, format="FLAC", subtype=subtype)
    return buffer.getvalue()


def audio_player(data: bytes, label: str) -> str:
    """One labelled HTML <audio> element with `data` (FLAC) embedded as base64."""
    b64 = base64.b64encode(data).decode("ascii")
    return (
        f"<div><span class='label'>{html.escape(label)}</span>"
        f"<audio controls preload='metadata' src='data:audio/flac;base64,{b64}'></audio></div>"
    )


def clip_bounds(n_samples: int, rate: int, clip_seconds: float, start_s: float | None) -> tuple[int, int]:
    """(start, stop) samples of a clip of `clip_seconds` from `start_s` (None: centred in the track),
    moved back inside a shorter track; the whole track when it is shorter than the clip."""
    length = min(n_samples, max(1, round(clip_seconds * rate)))
    start = round(start_s * rate) if start_s is not None else (n_samples - length) // 2
    start = min(max(0, start), n_samples - length)
    return start, start + length


def listening_section(
    data: OutputData,
    clean_url: str | None,
    n: int,
    clip_seconds: float,
    storage_options: Mapping[str, Any] | None,
    budget_bytes: int = LISTEN_BUDGET_BYTES,
) -> str:
    """A/B players (clean, protected) of the lowest-MOS-LQO and lowest-Δe items, FLAC clips of
    `clip_seconds`, at most `budget_bytes` of audio in all."""
    parts = ["<h2 id='listen'>Listen: clean (A) vs protected (B)</h2>"]
    items = pick_listening(data, n, clip_seconds)
    if n <= 0:
        parts.append("<p class='note'>Listening clips switched off (--listen 0).</p>")
        return "\n".join(parts)
    if not clean_url:
        parts.append(_no_clean_note(data, "to listen to clean and protected clips"))
        return "\n".join(parts)
    if not items:
        parts.append("<p class='note'>No written ok item to play.</p>")
        return "\n".join(parts)
    spent = [0]

    def players(ex: Example, x: Any, y: Any) -> str:
        rate = x.sample_rate
        n_samples = min(x.samples.shape[0], y.samples.shape[0])
        start, stop = clip_bounds(n_samples, rate, clip_seconds, ex.clip_start_s)
        subtype = "PCM_16" if x.subtype in ("PCM_16", "PCM_S8", "PCM_U8") and y.subtype == x.subtype else "PCM_24"
        a = flac_clip(x.samples[start:stop], rate, subtype)
        b = flac_clip(y.samples[start:stop], rate, subtype)
        if spent[0] + len(a) + len(b) > budget_bytes:
            return "<p class='note'>Left out: the page's audio budget is spent.</p>"
        spent[0] += len(a) + len(b)
        span = f"{start / rate:.1f}–{stop / rate:.1f} s of {n_samples / rate:.1f} s, {rate:,} Hz, FLAC {subtype}"
        return (
            f"<div class='ab'>{audio_player(a, 'A · clean')}{audio_player(b, 'B · protected')}"
            f"<span class='note'>{html.escape(span)}</span></div>"
        )

    clips = render_items(data, clean_url, items, storage_options, players)
    parts.append(
        f"<p class='note'>Clips of {clip_seconds:g} s, lossless (FLAC), cut from the clean input member and the "
        "written output member at the same samples. Lowest MOS-LQO items play the middle of their worst ViSQOL "
        "excerpt; lowest Δe items the middle of the track. Listen on headphones at a normal level.</p>"
    )
    for ex in items:
        figures = f"MOS-LQO {fmt(ex.moslqo, 2)}, Δe {fmt(ex.delta_e)}, SNR {fmt(ex.snr_db)} dB"
        where = html.escape(f"{ex.shard_id}, {ex.why}; {figures}")
        parts.append(f"<h3>{html.escape(ex.key)} <span class='note'>({where})</span></h3>")
        parts.append(clips.get((ex.shard_id, ex.key), ""))
    return "\n".join(parts)


def visqol_section(data: OutputData, top: int) -> str:
    """ViSQOL MOS-LQO against the target: histogram, measured / total, percentiles, lowest items."""
    c = data.columns
    ok = c["status"] == SampleStatus.OK
    mos = data.floats("visqol_moslqo")
    measured = ok & data.flags("visqol_measured") & np.isfinite(mos)
    total, n = int(ok.sum()), int(measured.sum())
    parts = [f"<h2 id='visqol'>Listening quality: ViSQOL MOS-LQO against the target ({MOS_TARGET:g})</h2>"]
    parts.append(
        "<p class='note'>ViSQOL v3, audio mode (48 kHz mono down-mix, protected against clean; 4.73 = "
        "indistinguishable). Each measured item's figure is its worst (lowest) excerpt; "
        "<code>visqol_excerpt_starts_s</code> says which excerpts were scored. Items are measured on a "
        "sample chosen by a hash of the key (<code>quality.visqol</code>, <code>visqol_share</code>).</p>"
    )
    if not n:
        parts.append(
            f"<p class='note'>No item has a ViSQOL figure (0 of {total:,} ok items measured): "
            "<code>quality.visqol</code> was off, or the manifests predate the column.</p>"
        )
        return "\n".join(parts)
    values = mos[measured]
    parts.append(img(mos_figure(values, n, total), "MOS-LQO histogram"))
    below = int(np.sum(values < MOS_TARGET))
    parts.append(
        html_table(
            ["", "value"],
            [
                ["ok items measured", f"{n:,} of {total:,} ({n / max(1, total):.1%})"],
                [f"measured items with MOS-LQO ≥ {MOS_TARGET:g} (target)", f"{n - below:,} ({1 - below / n:.1%})"],
                [f"measured items with MOS-LQO ≥ {MOS_HIGH:g}", f"{int(np.sum(values >= MOS_HIGH)):,}"],
            ],
            numeric=[False, True],
        )
    )
    parts.append(
        html_table(
            ["", "n", "min", "p5", "median", "p95", "max", "mean"],
            [["MOS-LQO (worst excerpt per item)", *percentiles(values)]],
        )
    )
    idx = np.flatnonzero(measured)
    lowest = idx[np.argsort(mos[idx], kind="stable")][:top]
    starts, segsnr = data.lists("visqol_excerpt_starts_s"), data.floats("segsnr_db")
    parts.append(f"<h3>Lowest MOS-LQO (top {top})</h3>")
    parts.append(
        html_table(
            ["shard", "key", "MOS-LQO", "excerpts at (s)", "Δe mean", "SNR dB", "seg. SNR dB", "format"],
            [
                [
                    c["shard_id"][i],
                    c["key"][i],
                    float(mos[i]),
                    ", ".join(f"{v:.1f}" for v in starts[i]),
                    float(c["delta_e_mean"][i]),
                    float(c["snr_db"][i]),
                    float(segsnr[i]),
                    c["output_format"][i],
                ]
                for i in lowest
            ],
            numeric=[False, False, True, False, True, True, True, False],
        )
    )
    return "\n".join(parts)
