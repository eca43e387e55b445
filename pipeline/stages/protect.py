"""Protect stage (accelerator): a Ray actor that holds one frozen encoder and runs PGD on the tracks
it is handed. Decode happens before it and encode/upload after it, in CPU stages that overlap."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from pipeline.config import PipelineConfig
from pipeline.encoder import load_encoder
from pipeline.engine import PGDParams
from pipeline.protect import Track, TrackProtector
from pipeline.stages import rows as R

logger = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA, fp32 on CPU (bf16 gradients are noisy at tiny δ; see docs)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


def build_protector(cfg: PipelineConfig) -> TrackProtector:
    """The encoder and attack of `cfg`, ready to protect tracks (used by the actor and the bench)."""
    enc = cfg.encoder
    encoder = load_encoder(
        enc.checkpoint,
        enc.amodel,
        sha256=enc.sha256,
        cache_dir=enc.cache_dir,
        hub_offline=enc.hub_offline,
        device=enc.device,
        storage_options=cfg.io.storage.storage_options(),
    )
    a = cfg.attack
    params = PGDParams(
        eps=a.eps,
        alpha=a.alpha,
        steps=a.steps,
        sigma=a.sigma,
        target_delta_e=a.target_delta_e,
        precision=resolve_precision(a.precision, encoder.device),
    )
    return TrackProtector(
        encoder,
        params,
        window_seconds=cfg.audio.window_seconds,
        overlap_seconds=cfg.audio.overlap_seconds,
        batch_windows=cfg.runtime.batch_windows,
        seed=a.seed,
    )


class ProtectActor:
    """map_batches callable class: loads the encoder once in __init__, then protects batches."""

    def __init__(self, cfg: PipelineConfig):
        threads = cfg.runtime.torch_threads or max(1, int(cfg.runtime.num_cpus_per_actor))
        torch.set_num_threads(threads)
        self.protector = build_protector(cfg)
        self.encoder_id = self.protector.encoder.encoder_id

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = R.batch_to_rows(batch)
        todo = [i for i, row in enumerate(rows) if row[R.STATUS] == "ok" and row[R.KIND] == R.KIND_SAMPLE]
        tracks = []
        for i in todo:
            row = rows[i]
            samples = np.frombuffer(row[R.PCM], dtype=np.float32).reshape(row[R.N_SAMPLES], row[R.CHANNELS])
            tracks.append(Track(row[R.KEY], samples.copy(), row[R.SAMPLE_RATE], row[R.OUT_SUBTYPE]))
        try:
            results = self.protector.protect(tracks) if tracks else []
        except Exception as exc:  # never lose the batch: every track gets an error row instead
            logger.exception("protect failed for a whole batch")
            results = [None] * len(tracks)
            for i in todo:
                rows[i].update({R.STATUS: "error", R.ERROR: f"pgd: {type(exc).__name__}: {exc}"})
        for row in rows:
            row[R.PCM] = b""
            row[R.ENCODER_ID] = self.encoder_id
            for name in R.STATS:
                row[name] = float("nan") if name != "seconds" else 0.0
        for i, result in zip(todo, results):
            if result is None:
                continue
            row = rows[i]
            if result.error:
                row.update({R.STATUS: "error", R.ERROR: result.error})
                continue
            row[R.PCM] = result.samples.tobytes()
            for name in R.STATS:
                row[name] = float(getattr(result, name))
        return R.rows_to_batch(rows, list(rows[0].keys()) if rows else list(batch.keys()))
