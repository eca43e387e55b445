"""Protect several decoded uploads in one PGD call and encode each back in its format family.
No Ray: the Serve replica (service/app.py) calls `UploadProtector.protect` from its batch method,
and the fast tests call it directly.

The windows of every upload in a call share the TrackProtector's batches (grouped by rate ×
channels), which is what makes concurrent uploads cheaper than one after the other. Figures are
those of `pipeline.api.protect_file` (the same TrackProtector and written-bytes check)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.api import build_protector
from pipeline.config import PipelineConfig
from pipeline.core.protect import Track, TrackProtector
from pipeline.core.quality import visqol_excerpts, visqol_moslqo
from pipeline.encoders.base import RANDOM_WARNING
from pipeline.io.audio import (
    LOSSY_FORMATS,
    AudioEncodeError,
    DecodedAudio,
    check_written,
    encode,
    output_format_for,
    probe_bitrate_kbps,
)
from pipeline.service.limits import UploadRejected

logger = logging.getLogger(__name__)

MEDIA_TYPES = {
    "flac": "audio/flac",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "ogg": "audio/ogg",
    "opus": "audio/ogg",
    "m4a": "audio/mp4",
    "aiff": "audio/aiff",
}
# libsndfile major format -> the extension written back (the upload has no file name).
EXTENSIONS = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3", "AIFF": "aiff", "AAC": "m4a"}


@dataclass
class Upload:
    """One decoded upload waiting for its batch."""

    key: str  # request id (logs, window seeds)
    decoded: DecodedAudio
    data_size: int  # bytes uploaded
    bitrate_kbps: int = 0  # lossy inputs: their bitrate (audio.lossy_output same)


@dataclass
class Delivered:
    """A protected upload: the bytes to send back and its figures."""

    payload: bytes
    media_type: str
    extension: str
    figures: dict[str, Any] = field(default_factory=dict)


def prepare_upload(key: str, data: bytes, decoded: DecodedAudio, cfg: PipelineConfig) -> Upload:
    """An Upload of decoded bytes; probes a lossy input's bitrate only when it will be re-encoded."""
    bitrate = 0
    if decoded.format in LOSSY_FORMATS and cfg.audio.lossy_output == "same":
        bitrate = probe_bitrate_kbps(data, decoded.duration_s)
    return Upload(key, decoded, len(data), bitrate)


class UploadProtector:
    """The replica's encoder and attack (built once by `build_protector`), protecting batches of
    uploads.

    Example::

        protector = UploadProtector(cfg)
        [result] = protector.protect([prepare_upload("r1", data, decode_upload(data, cfg.service), cfg)])
    """

    def __init__(self, cfg: PipelineConfig, protector: TrackProtector | None = None):
        self.cfg = cfg
        self.protector = protector or build_protector(cfg)
        self.encoder_id = "+".join(e.encoder_id for e in self.protector.encoders)
        self.random_encoder = any(e.is_random for e in self.protector.encoders)
        self.config_hash = cfg.output_hash()
        if self.random_encoder:
            logger.warning(RANDOM_WARNING.format(spec=cfg.encoder.checkpoint))

    def protect(self, uploads: list[Upload]) -> list[Delivered | UploadRejected]:
        """Protect every upload in one TrackProtector call (their windows share PGD batches); one
        result per upload, in order. A failure is confined to its upload (a 500/422 JSON error)."""
        outs = []
        for upload in uploads:
            d = upload.decoded
            extension = EXTENSIONS.get(d.format, d.format.lower())
            outs.append(
                output_format_for(d.format, d.subtype, extension, self.cfg.audio.lossy_output, upload.bitrate_kbps)
            )
        tracks = [Track(u.key, u.decoded.samples, u.decoded.sample_rate, o.subtype) for u, o in zip(uploads, outs)]
        started = time.perf_counter()
        results = self.protector.protect(tracks)
        seconds = time.perf_counter() - started
        delivered: list[Delivered | UploadRejected] = []
        for upload, out, result in zip(uploads, outs, results):
            if result.error or result.samples is None:
                logger.warning("upload %s failed: %s", upload.key, result.error or "no result")
                delivered.append(UploadRejected(500, "protect_failed", "the attack failed on this upload"))
                continue
            try:
                delivered.append(self._deliver(upload, out, result, seconds, len(uploads)))
            except AudioEncodeError as exc:
                logger.warning("upload %s: encode failed: %s", upload.key, exc)
                delivered.append(UploadRejected(500, "encode_failed", f"cannot write {out.label}"))
        return delivered

    def _deliver(self, upload: Upload, out, result, batch_seconds: float, batch_size: int) -> Delivered:
        d = upload.decoded
        payload = encode(result.samples, d.sample_rate, out)
        check = check_written(payload, d.samples, result.samples, d.sample_rate, out, self.cfg.attack.eps)
        figures = {k: v for k, v in dataclasses.asdict(result).items() if k not in ("samples", "key", "error")}
        figures.update(
            encoder_id=self.encoder_id,
            random_encoder=self.random_encoder,
            config_hash=self.config_hash,
            input_format=f"{d.format}/{d.subtype}",
            output_format=out.label,
            linf_written=check.linf,
            eps_bound_holds=check.bound_holds,
            duration_s=d.duration_s,
            batch_uploads=batch_size,
            batch_seconds=batch_seconds,
            mos_lqo=self._mos_lqo(d, result.samples),
        )
        return Delivered(payload, MEDIA_TYPES.get(out.extension, "application/octet-stream"), out.extension, figures)

    def _mos_lqo(self, decoded: DecodedAudio, protected: np.ndarray) -> float:
        """ViSQOL MOS-LQO of one excerpt when quality.visqol is `all` (NaN otherwise: not measured)."""
        q = self.cfg.quality
        if q.visqol != "all":
            return float("nan")
        [(start, length)] = visqol_excerpts(decoded.samples.shape[0], decoded.sample_rate, q.visqol_excerpt_seconds, 1)
        window = slice(start, start + length)
        return visqol_moslqo(decoded.samples[window], protected[window], decoded.sample_rate)


def json_figures(figures: dict[str, Any]) -> dict[str, Any]:
    """Figures with NaN/±Inf as None (strict JSON)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return {k: clean(v) for k, v in figures.items()}


HEADER_FIGURES = {
    "X-Delta-E": "delta_e_mean",
    "X-Delta-E-Min": "delta_e_min",
    "X-Delta-E-MusicLDM": "delta_e_musicldm",
    "X-SNR-dB": "snr_db",
    "X-NMR-dB": "nmr_db",
    "X-MOS-LQO": "mos_lqo",
    "X-Linf-Written": "linf_written",
}


def figure_headers(figures: dict[str, Any]) -> dict[str, str]:
    """Response headers of a protected upload: numeric figures (absent when not measured), encoder
    id, config hash, output format, whether the ε bound holds and whether the encoder is random."""
    headers = {}
    for header, name in HEADER_FIGURES.items():
        value = figures.get(name)
        if isinstance(value, float) and math.isfinite(value):
            headers[header] = f"{value:.6g}"
    headers["X-Encoder-Id"] = str(figures["encoder_id"])
    headers["X-Config-Hash"] = str(figures["config_hash"])
    headers["X-Output-Format"] = str(figures["output_format"])
    headers["X-Eps-Bound-Holds"] = "true" if figures["eps_bound_holds"] else "false"
    headers["X-Random-Encoder"] = "true" if figures["random_encoder"] else "false"
    return headers
