"""Protect stage (accelerator): a Ray actor that holds one frozen encoder and runs PGD on the tracks
it is handed. Decode happens before it and encode/upload after it, in CPU stages that overlap."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import torch

from pipeline.api import build_protector
from pipeline.config import PipelineConfig
from pipeline.core.protect import Track
from pipeline.records import SampleStatus, error_kind
from pipeline.stages import rows as R
from pipeline.stages.metrics import ActorMetrics

logger = logging.getLogger(__name__)


class ProtectActor:
    """map_batches callable class: loads the encoder once in __init__, then protects batches."""

    def __init__(self, cfg: PipelineConfig):
        threads = cfg.runtime.torch_threads or max(1, int(cfg.runtime.num_cpus_per_actor))
        torch.set_num_threads(threads)
        self.protector = build_protector(cfg)
        self.encoder_id = "+".join(e.encoder_id for e in self.protector.encoders)
        self.metrics = ActorMetrics()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = R.batch_to_rows(batch)
        todo = [i for i, row in enumerate(rows) if row[R.STATUS] == SampleStatus.OK and row[R.KIND] == R.KIND_SAMPLE]
        tracks, tracked = [], []
        for i in todo:
            row = rows[i]
            try:
                samples = np.frombuffer(row[R.PCM], dtype=np.float32).reshape(row[R.N_SAMPLES], row[R.CHANNELS])
                # Read-only view of the row's buffer: the protector never writes to the clean track.
                # Segments of one long track draw their δ₀ from distinct seeds.
                seed_key = row[R.KEY] if int(row.get(R.SEGMENTS) or 1) == 1 else f"{row[R.KEY]}\x00{row[R.SEGMENT]}"
                tracks.append(Track(seed_key, samples, row[R.SAMPLE_RATE], row[R.OUT_SUBTYPE]))
                tracked.append(i)
            except (ValueError, TypeError) as exc:
                row.update({R.STATUS: SampleStatus.ERROR, R.ERROR: f"input: malformed PCM row: {exc}"})
        todo = tracked
        try:
            results = self.protector.protect(tracks) if tracks else []
        except Exception as exc:  # never lose the batch: every track gets an error row instead
            logger.exception("protect failed for a whole batch")
            results = [None] * len(tracks)
            for i in todo:
                rows[i].update({R.STATUS: SampleStatus.ERROR, R.ERROR: f"pgd: {type(exc).__name__}: {exc}"})
        for row in rows:
            row[R.CLEAN_PCM] = row[R.PCM] if row[R.STATUS] == SampleStatus.OK else b""
            row[R.PCM] = b""
            row[R.ENCODER_ID] = self.encoder_id
            row[R.DELTA_E_BY_ENCODER] = "{}"
            for name in R.STATS:
                row[name] = float("nan") if name != "seconds" else 0.0
        for i, result in zip(todo, results):
            if result is None:
                continue
            row = rows[i]
            if result.error:
                row.update({R.STATUS: SampleStatus.ERROR, R.ERROR: result.error, R.CLEAN_PCM: b""})
                continue
            row[R.PCM] = result.samples.tobytes()
            for name in R.STATS:  # quality-stage figures (segsnr, pesq, stoi) stay NaN here
                row[name] = float(getattr(result, name, float("nan")))
            row[R.DELTA_E_BY_ENCODER] = json.dumps(result.delta_e_by_encoder, sort_keys=True)
        self._record_metrics(rows, todo, results)
        return R.rows_to_batch(rows, list(rows[0].keys()) if rows else list(batch.keys()))

    def _record_metrics(self, rows: list[dict[str, Any]], todo: list[int], results: list[Any]) -> None:
        done = [r for r in results if r is not None and not r.error]
        errors: dict[str, int] = {}
        for i in todo:
            if rows[i][R.STATUS] == SampleStatus.ERROR:
                kind = error_kind(rows[i][R.ERROR])
                errors[kind] = errors.get(kind, 0) + 1
        self.metrics.batch_done(
            windows=sum(r.n_windows for r in done),
            seconds=sum(r.seconds for r in done),
            steps=round(sum(r.steps_mean * r.n_windows for r in done if math.isfinite(r.steps_mean))),
            errors=errors,
        )
