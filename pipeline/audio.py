"""Audio bytes <-> float32 arrays (soundfile/libsndfile), output format choice, and quantisation that
keeps the ε bound. No torch, no Ray, no storage.

Arrays are float32 [samples, channels], full scale 1.0, at the track's own sample rate.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import soundfile as sf


class AudioDecodeError(ValueError):
    """Bytes that are not decodable audio; the message says why."""


class AudioEncodeError(ValueError):
    """An array that cannot be written in the requested format."""


# Integer PCM subtypes and their bit depth: written via int32 so that no float scaling of
# libsndfile's touches the values (it reads with 1/2^(b-1) but writes with 2^(b-1)-1).
PCM_BITS = {"PCM_S8": 8, "PCM_U8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32}
FLOAT_SUBTYPES = {"FLOAT", "DOUBLE"}
LOSSY_FORMATS = {"MP3", "OGG"}  # re-encoding these would add noise far above ε
LOSSY_FALLBACK = ("FLAC", "PCM_16", "flac")


@dataclass(frozen=True)
class DecodedAudio:
    """A decoded track: samples float32 [samples, channels] plus what is needed to write it back."""

    samples: np.ndarray
    sample_rate: int  # Hz
    format: str  # libsndfile major format, e.g. "WAV", "FLAC", "OGG", "MP3"
    subtype: str  # e.g. "PCM_16", "FLOAT", "VORBIS"

    @property
    def duration_s(self) -> float:
        return self.samples.shape[0] / self.sample_rate

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])


@dataclass(frozen=True)
class OutputFormat:
    """How a protected track is written: libsndfile format/subtype and the member extension."""

    format: str
    subtype: str
    extension: str

    @property
    def label(self) -> str:
        return f"{self.format}/{self.subtype}"


def decode(data: bytes, min_seconds: float = 0.1) -> DecodedAudio:
    """Decode audio bytes (WAV, FLAC, Ogg Vorbis/Opus, MP3, AIFF, ...) at their own rate/channels.

    Raises:
        AudioDecodeError: empty, undecodable, non-finite, or shorter than `min_seconds`.
    """
    if not data:
        raise AudioDecodeError("empty member (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            fmt, subtype, rate = f.format, f.subtype, int(f.samplerate)
            # libsndfile reads a WAV cut inside its data chunk as a shorter track; its header says so.
            truncated = re.search(r"^data\s*:\s*\d+ \(should be \d+\)", f.extra_info, re.M)
            samples = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        reason = exc.error_string if isinstance(exc, sf.LibsndfileError) else str(exc)  # no object addresses
        raise AudioDecodeError(f"not decodable audio ({reason})") from exc
    if truncated:
        raise AudioDecodeError("truncated: data chunk shorter than its header declares")
    if rate <= 0:
        raise AudioDecodeError(f"invalid sample rate {rate}")
    if samples.shape[0] < max(1, round(min_seconds * rate)):
        raise AudioDecodeError(f"too short: {samples.shape[0]} samples at {rate} Hz (< {min_seconds} s)")
    if not np.isfinite(samples).all():
        raise AudioDecodeError("non-finite samples (NaN or Inf)")
    if fmt in LOSSY_FORMATS:
        # Lossy decoders overshoot full scale; any PCM writer would clip there anyway.
        np.clip(samples, -1.0, 1.0, out=samples)
    return DecodedAudio(np.ascontiguousarray(samples), rate, fmt, subtype)


def output_format_for(fmt: str, subtype: str, extension: str) -> OutputFormat:
    """Keep the format family and subtype where that can hold the ε bound; lossy inputs become
    FLAC PCM_16 (the member extension changes and the manifest records it)."""
    if fmt in LOSSY_FORMATS:
        return OutputFormat(*LOSSY_FALLBACK)
    if subtype in PCM_BITS or subtype in FLOAT_SUBTYPES:
        return OutputFormat(fmt, subtype, extension)
    # companded / ADPCM subtypes (ULAW, ALAW, IMA_ADPCM, ...): not a uniform grid, write PCM_16.
    return OutputFormat(fmt, "PCM_16", extension)


def quantize_within(clean: np.ndarray, protected: np.ndarray, eps: float, subtype: str) -> np.ndarray:
    """Round `protected` to the output subtype's sample grid without leaving |x' - x| ≤ ε.

    For integer PCM each sample goes to the nearest grid point inside [x-ε, x+ε] ∩ [-1, 1 - 2^-(b-1)];
    that interval always holds a grid point when ε ≥ one step or x is itself on the grid. Float
    subtypes only get δ clipped to ε in float32. Shapes: [samples, channels] (any matching shape).
    """
    clean = clean.astype(np.float32, copy=False)
    if subtype not in PCM_BITS:
        delta = np.clip(protected.astype(np.float32) - clean, -eps, eps)
        return clean + delta
    scale = float(2 ** (PCM_BITS[subtype] - 1))
    x = clean.astype(np.float64) * scale
    lo = np.maximum(np.ceil(x - eps * scale - 1e-9), -scale)
    hi = np.minimum(np.floor(x + eps * scale + 1e-9), scale - 1)
    q = np.rint(protected.astype(np.float64) * scale)
    q = np.minimum(np.maximum(q, lo), hi)
    # Where the interval is empty (ε below one step and x off-grid) fall back to the nearest point.
    empty = lo > hi
    if empty.any():
        q[empty] = np.clip(np.rint(x[empty]), -scale, scale - 1)
    return (q / scale).astype(np.float32)


def encode(samples: np.ndarray, sample_rate: int, out: OutputFormat) -> bytes:
    """Write float32 [samples, channels] as `out`. Integer subtypes are written from int32 so that
    values already on the grid (see quantize_within) are stored exactly."""
    if samples.ndim != 2:
        raise AudioEncodeError(f"expected [samples, channels], got shape {samples.shape}")
    buffer = io.BytesIO()
    if out.subtype in PCM_BITS:
        bits = PCM_BITS[out.subtype]
        scale = float(2 ** (bits - 1))
        ints = np.clip(np.rint(samples.astype(np.float64) * scale), -scale, scale - 1).astype(np.int64)
        data: np.ndarray = (ints << (32 - bits)).astype(np.int32)
    else:
        data = samples.astype(np.float64 if out.subtype == "DOUBLE" else np.float32)
    try:
        sf.write(buffer, data, sample_rate, format=out.format, subtype=out.subtype)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioEncodeError(f"cannot write {out.label} at {sample_rate} Hz: {exc}") from exc
    return buffer.getvalue()
