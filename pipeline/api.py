"""The Python API, without Ray: protect one array or one file with the settings of a config.

    from pipeline.api import protect_array, protect_file
    protected, figures = protect_array(samples, 44_100)          # samples: float32 [samples, channels]
    figures = protect_file("in.flac", "out.flac", load_config("job.yaml"))

The same `build_protector` builds the TrackProtector of the Ray actors, the evaluation commands and
the benchmark from a config, so a track protected here and in a job with the same settings and
seed is the same. A whole track is held in memory here; the job (`unlearnable protect`) cuts long
tracks into segments instead (docs/architecture.md)."""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from typing import Any

import numpy as np
import torch

from pipeline.config import STRENGTH_MARGIN_DB, PipelineConfig, config_from_dict
from pipeline.core.engine import PGDParams
from pipeline.core.protect import Track, TrackProtector
from pipeline.encoders.load import (
    LoadedEncoder,
    emulated_precision_note,
    load_configured_encoder,
    native_low_precision,
)
from pipeline.io.audio import (
    LOSSY_FORMATS,
    check_written,
    decode,
    encode,
    output_format_for,
    probe_bitrate_kbps,
)
from pipeline.io.storage import open_url

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
    built from a config (protect actor, API, bench, frontier, imitation). `encoders` already loaded
    are used as they are (default: load cfg.encoder.checkpoint and its ensemble)."""
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
        fixed_shape=a.fixed_shape,
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


class ProtectError(RuntimeError):
    """A track that could not be protected or written; the message says why."""


def protect_array(
    samples: np.ndarray,
    sample_rate: int,
    config: PipelineConfig | None = None,
    *,
    subtype: str = "FLOAT",
    protector: TrackProtector | None = None,
    key: str = "array",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Protect one track.

    Args:
        samples: float32 [samples, channels] (or [samples] mono), full scale 1.0.
        sample_rate: Hz.
        config: attack, encoder and audio settings (default: the code's defaults, which use a
            RANDOM encoder: set encoder.checkpoint for real protection).
        subtype: the libsndfile subtype the result will be written in (PCM_16, PCM_24, FLOAT...):
            the protected samples lie on its grid, within attack.eps of the input.
        protector: reuse one across calls (build_protector(config)) instead of loading the encoder
            each time.

    Returns:
        (protected float32 [samples, channels], figures: Δe, cosine, L∞, SNR, NMR... as in the
        manifest, plus encoder_id and random_encoder).

    Raises:
        ProtectError: the attack failed on this track.
    """
    array = np.asarray(samples, dtype=np.float32)
    mono = array.ndim == 1
    array = np.ascontiguousarray(array[:, None] if mono else array)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"samples must be [samples, channels] with at least one sample, got shape {samples.shape}")
    if not np.isfinite(array).all():
        raise ValueError("samples must be finite (NaN or Inf found)")
    protector = protector or build_protector(config or config_from_dict({}))
    [result] = protector.protect([Track(key, array, int(sample_rate), subtype)])
    if result.error or result.samples is None:
        raise ProtectError(f"{key}: {result.error or 'no result'}")
    figures = {k: v for k, v in dataclasses.asdict(result).items() if k not in ("samples", "key", "error")}
    figures["encoder_id"] = "+".join(e.encoder_id for e in protector.encoders)
    figures["random_encoder"] = any(e.is_random for e in protector.encoders)
    protected = result.samples[:, 0] if mono else result.samples
    return protected, figures


def protect_file(
    source: str,
    destination: str,
    config: PipelineConfig | None = None,
    *,
    protector: TrackProtector | None = None,
) -> dict[str, Any]:
    """Protect one audio file (a local path or any fsspec URL) into `destination`, in the same
    format family and subtype as the tar mode writes (a lossy input becomes FLAC unless
    audio.lossy_output is `same`; then the written file's extension follows the format). The
    written bytes are decoded again and measured against the input.

    Returns:
        the figures of protect_array plus input_format, output_format, output (the path written),
        linf_written (max |written − input|) and eps_bound_holds.
    """
    cfg = config or config_from_dict({})
    options = cfg.io.storage.storage_options()
    with open_url(source, "rb", options) as f:
        data = f.read()
    decoded = decode(data)
    extension = posixpath.splitext(source)[1].lstrip(".").lower()
    bitrate = probe_bitrate_kbps(data, decoded.duration_s) if decoded.format in LOSSY_FORMATS else 0
    out = output_format_for(decoded.format, decoded.subtype, extension, cfg.audio.lossy_output, bitrate)
    protected, figures = protect_array(
        decoded.samples, decoded.sample_rate, cfg, subtype=out.subtype, protector=protector, key=source
    )
    payload = encode(protected, decoded.sample_rate, out)
    check = check_written(payload, decoded.samples, protected, decoded.sample_rate, out, cfg.attack.eps)
    stem, wanted = posixpath.splitext(destination)
    if wanted.lstrip(".").lower() != out.extension:
        destination = f"{stem}.{out.extension}"
    with open_url(destination, "wb", options) as f:
        f.write(payload)
    figures.update(
        input_format=f"{decoded.format}/{decoded.subtype}",
        output_format=out.label,
        output=destination,
        linf_written=check.linf,
        eps_bound_holds=check.bound_holds,
    )
    return figures
