"""Protect stage (accelerator): a Ray actor that holds one frozen encoder and runs PGD on the tracks
it is handed. Decode happens before it and encode/upload after it, in CPU stages that overlap."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import torch

from pipeline.config import STRENGTH_MARGIN_DB, PipelineConfig
from pipeline.core.engine import PGDParams
from pipeline.core.protect import Track, TrackProtector
from pipeline.encoders.load import (
    LoadedEncoder,
    emulated_precision_note,
    load_configured_encoder,
    native_low_precision,
)
from pipeline.records import SampleStatus, error_kind
from pipeline.stages import rows as R
from pipeline.stages.metrics import ActorMetrics

logger = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA, fp32 on CPU (bf16 gradients are noisy at tiny δ; see docs). An explicit
    bf16/fp16 on a device that only emulates it is kept, with a warning."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and native_low_precision(device) else "fp32"
    slow = emulated_precision_note(device, precision)
    if slow:
        logger.warning("attack.precision=%s: %s. Use attack.precision auto or fp32.", precision, slow)
    return precision


def build_protector(cfg: PipelineConfig, encoders: list[LoadedEncoder] | None = None) -> TrackProtector:
    """The encoder(s) and attack of `cfg`, ready to protect tracks: the one way a TrackProtector is
    built from a config (protect actor, bench, frontier, imitation). `encoders` already loaded are
    used as they are (default: load cfg.encoder.checkpoint and its ensemble)."""
    enc = cfg.encoder
    if encoders is None:
        options = cfg.io.storage.storage_options()
        encoders = [load_configured_encoder(enc, options, spec) for spec in (enc.checkpoint, *enc.ensemble)]
    a = cfg.attack
    params = PGDParams(
        eps=a.eps,
        alpha=a.alpha,
        steps=a.steps,
        sigma=a.sigma,
        target_delta_e=a.target_delta_e,
        precision=resolve_precision(a.precision, encoders[0].device),
    )
    return TrackProtector(
        encoders,
        params,
        window_seconds=cfg.audio.window_seconds,
        overlap_seconds=cfg.audio.overlap_seconds,
        batch_windows=cfg.runtime.batch_windows,
        seed=a.seed,
        perceptual=a.perceptual,
        eot_views=a.eot_views,
        measure_musicldm=cfg.quality.musicldm_view,
        measure_masking=cfg.quality.masking,
        ensemble=a.ensemble,
        passband_hz=a.passband_hz,
        margin_db=STRENGTH_MARGIN_DB[a.strength],
        lr=a.lr,
    )


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
