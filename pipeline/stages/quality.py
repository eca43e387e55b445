"""Quality stage (CPU tasks, after the actor): segmental SNR, PESQ, STOI and ViSQOL of each
protected track (or segment of a long track) against its clean original, so the accelerator never
waits for them. The clean PCM travels on to the encode stage, which measures the written bytes
against it and then drops it.

ViSQOL (`quality.visqol`: off | sample | all) costs far more than the other figures, so by default
only a share of the items is measured, chosen by a hash of the item key (`quality.visqol_selected`),
on `quality.visqol_excerpts` excerpts of `quality.visqol_excerpt_seconds` spread over the track.
The segments of a long track are chosen together (they share the key) and split the track's
excerpts between them (`quality.visqol_owned_excerpts`); the writer keeps the worst
(stages/segments.py)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core import quality
from pipeline.records import SampleStatus
from pipeline.stages import rows as R
from pipeline.stages.segments import segment_plan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualitySettings:
    """What the quality stage needs of the config (plain values: shipped to Ray workers)."""

    segsnr: bool
    pesq: bool
    stoi: bool
    visqol: str = "off"  # off | sample | all (quality.visqol)
    visqol_share: float = 0.1  # sample mode: share of items measured
    visqol_excerpt_seconds: float = 10.0
    visqol_excerpts: int = 1
    segment_seconds: float = float("inf")  # audio.segment_seconds: how the read stage cut long tracks
    overlap_seconds: float = 1.0  # audio.overlap_seconds


def visqol_row_excerpts(row: dict[str, Any], settings: QualitySettings) -> list[tuple[int, int]]:
    """The excerpts (start in the track, length; samples) that this row measures: all of a whole
    track's, or the share of a long track's that falls to this segment."""
    rate, start, n = row[R.SAMPLE_RATE], int(row.get(R.SEGMENT_START) or 0), row[R.N_SAMPLES]
    track = int(row.get(R.TRACK_SAMPLES) or n)
    starts: tuple[int, ...] = (0,)
    length = n
    if int(row.get(R.SEGMENTS) or 1) > 1:
        plan = segment_plan(track, rate, settings.segment_seconds, settings.overlap_seconds)
        if start in plan.starts and n == min(plan.window, track - start):
            starts, length = plan.starts, plan.window
        else:  # not the read stage's plan (other settings): this segment measures what lies inside it
            logger.warning("segment %s of %s is not on the configured segment plan", row.get(R.SEGMENT), row[R.KEY])
            starts = (start,)
    return quality.visqol_owned_excerpts(
        track, start, length, starts, rate, settings.visqol_excerpt_seconds, settings.visqol_excerpts
    )


def quality_batch(batch: dict[str, Any], settings: QualitySettings) -> dict[str, Any]:
    """map_batches body: fills segsnr_db / pesq_wb / stoi / visqol_moslqo and the ViSQOL columns
    (R.VISQOL) of every row (the clean PCM stays for encode_batch)."""
    rows = R.batch_to_rows(batch)
    for row in rows:
        row.setdefault("visqol_moslqo", float("nan"))
        row.update({R.VISQOL_MEASURED: False, R.VISQOL_STARTS: "[]", R.VISQOL_SCORES: "[]"})
        if row[R.STATUS] == SampleStatus.OK and row[R.KIND] == R.KIND_SAMPLE and row[R.PCM] and row[R.CLEAN_PCM]:
            shape = (row[R.N_SAMPLES], row[R.CHANNELS])
            clean = np.frombuffer(row[R.CLEAN_PCM], dtype=np.float32).reshape(shape)
            protected = np.frombuffer(row[R.PCM], dtype=np.float32).reshape(shape)
            rate = row[R.SAMPLE_RATE]
            if settings.segsnr:
                row["segsnr_db"] = quality.segmental_snr_db(clean, protected, rate)
            if settings.pesq:
                row["pesq_wb"] = quality.pesq_wb(clean, protected, rate)
            if settings.stoi:
                row["stoi"] = quality.stoi(clean, protected, rate)
            if quality.visqol_selected(row[R.KEY], settings.visqol, settings.visqol_share):
                offset = int(row.get(R.SEGMENT_START) or 0)
                figure = quality.visqol_figure(clean, protected, rate, visqol_row_excerpts(row, settings), offset)
                row["visqol_moslqo"] = figure.moslqo
                row[R.VISQOL_MEASURED] = figure.measured
                row[R.VISQOL_STARTS] = json.dumps(list(figure.starts_s))
                row[R.VISQOL_SCORES] = json.dumps(list(figure.scores))
    return R.rows_to_batch(rows, list(rows[0].keys()) if rows else list(dict.fromkeys([*batch.keys(), *R.VISQOL])))
