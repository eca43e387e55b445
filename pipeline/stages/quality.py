"""Quality stage (CPU tasks, after the actor): segmental SNR, PESQ and STOI of each protected
track against its clean original, so the accelerator never waits for them. The clean PCM travels
on to the encode stage, which measures the written bytes against it and then drops it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import quality
from pipeline.stages import rows as R


@dataclass(frozen=True)
class QualitySettings:
    segsnr: bool
    pesq: bool
    stoi: bool


def quality_batch(batch: dict[str, Any], settings: QualitySettings) -> dict[str, Any]:
    """map_batches body: fills segsnr_db / pesq_wb / stoi (the clean PCM stays for encode_batch)."""
    rows = R.batch_to_rows(batch)
    for row in rows:
        if row[R.STATUS] == "ok" and row[R.KIND] == R.KIND_SAMPLE and row[R.PCM] and row[R.CLEAN_PCM]:
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
    return R.rows_to_batch(rows, list(rows[0].keys()) if rows else list(batch.keys()))
