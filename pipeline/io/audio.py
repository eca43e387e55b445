"""Audio bytes <-> float32 arrays (soundfile/libsndfile; lossy re-encoding with the ffmpeg binary),
output format choice, quantisation that keeps the ε bound, and the check of what was written.
No torch, no Ray, no storage.

Arrays are float32 [samples, channels], full scale 1.0, at the track's own sample rate.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
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
LOSSY_FORMATS = {"MP3", "OGG", "AAC"}  # re-encoding these would add noise far above ε
LOSSY_FALLBACK = ("FLAC", "PCM_16", "flac")
LOSSY_POLICIES = ("flac", "same")  # audio.lossy_output


@dataclass(frozen=True)
class LossyCodec:
    """An ffmpeg encoder that writes one lossy codec (outputs under `lossy_output: same`, codec views)."""

    name: str  # mp3 | vorbis | opus | aac (also the codec view's name: mp3_128, opus_96, ...)
    encoder: str  # ffmpeg encoder
    muxer: str  # ffmpeg output format
    suffix: str  # file suffix of the temporary output
    min_kbps: int
    max_kbps: int


LOSSY_CODECS: dict[str, LossyCodec] = {
    "mp3": LossyCodec("mp3", "libmp3lame", "mp3", ".mp3", 8, 320),
    "vorbis": LossyCodec("vorbis", "libvorbis", "ogg", ".ogg", 32, 500),
    "opus": LossyCodec("opus", "libopus", "ogg", ".opus", 6, 510),
    "aac": LossyCodec("aac", "aac", "ipod", ".m4a", 8, 512),
}
# libsndfile (format, subtype) of a decoded lossy input -> the codec that re-encodes it under `same`.
# Anything else lossy (MPEG layer I/II, ...) becomes FLAC whatever the policy.
SAME_CODEC = {
    ("MP3", "MPEG_LAYER_III"): "mp3",
    ("OGG", "VORBIS"): "vorbis",
    ("OGG", "OPUS"): "opus",
    ("AAC", "AAC"): "aac",
}
MAX_CODEC_LAG = 4096  # samples searched either way when aligning a lossy output to its input
FLOAT_LSB = 2.0**-23  # float32 spacing just below 1.0 (×2): the rounding slack of float subtypes


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
    """How a protected track is written: libsndfile format/subtype and the member extension; with
    `bitrate_kbps` > 0 a lossy re-encode in the codec of (format, subtype) by ffmpeg (`same` policy)."""

    format: str
    subtype: str
    extension: str
    bitrate_kbps: int = 0

    @property
    def codec(self) -> LossyCodec | None:
        """The lossy codec written, None for lossless (libsndfile) outputs."""
        name = SAME_CODEC.get((self.format, self.subtype)) if self.bitrate_kbps > 0 else None
        return LOSSY_CODECS[name] if name else None

    @property
    def lossy(self) -> bool:
        return self.codec is not None

    @property
    def label(self) -> str:
        """e.g. "FLAC/PCM_16", "MP3/MPEG_LAYER_III@128kbps" (the manifest's output_format)."""
        base = f"{self.format}/{self.subtype}"
        return f"{base}@{self.bitrate_kbps}kbps" if self.bitrate_kbps > 0 else base


def decode(data: bytes, min_seconds: float = 0.1) -> DecodedAudio:
    """Decode audio bytes (WAV, FLAC, Ogg Vorbis/Opus, MP3, AIFF, ... with libsndfile; AAC in
    M4A/MP4/ADTS with the ffmpeg binary, which libsndfile cannot read) at their own rate/channels.

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
        aac = _decode_aac(data)  # probed, not guessed from a name: None unless ffprobe finds AAC
        if aac is None:
            raise AudioDecodeError(f"not decodable audio ({reason})") from exc
        fmt, subtype, rate, samples = "AAC", "AAC", aac[0], aac[1]
        truncated = None
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


def _decode_aac(data: bytes) -> tuple[int, np.ndarray] | None:
    """(rate, float32 [samples, channels]) of AAC bytes (M4A/MP4, ADTS) decoded by ffmpeg at their
    own rate and channels; None when ffprobe finds no AAC stream or ffmpeg is missing. The bytes go
    to a temporary file, not a pipe: an M4A whose index (moov) follows the audio needs seeking."""
    if shutil.which("ffprobe") is None or shutil.which("ffmpeg") is None:
        return None
    with tempfile.TemporaryDirectory(prefix="unlearnable-decode-") as tmp:
        path = os.path.join(tmp, "in")
        with open(path, "wb") as f:
            f.write(data)
        try:
            probe_args = ["-v", "error", "-select_streams", "a:0", "-show_entries"]
            probe_args += ["stream=codec_name,sample_rate,channels", "-of", "json", path]
            streams = json.loads(_run_ffmpeg("ffprobe", probe_args, b"", 30.0) or b"{}").get("streams") or []
            if not streams or streams[0].get("codec_name") != "aac":
                return None
            rate, channels = int(streams[0]["sample_rate"]), int(streams[0]["channels"])
            args = ["-hide_banner", "-nostats", "-loglevel", "error", "-nostdin", "-i", path, "-map", "0:a:0"]
            args += ["-f", "f32le", "-ac", str(channels), "-ar", str(rate), "pipe:1"]
            raw = _run_ffmpeg("ffmpeg", args, b"", ffmpeg_timeout(len(data) / 2000.0))
        except (AudioEncodeError, ValueError, KeyError):
            return None
    if rate <= 0 or channels <= 0:
        return None
    samples = np.frombuffer(raw, dtype="<f4")
    return rate, samples[: len(samples) // channels * channels].reshape(-1, channels).copy()


def output_format_for(
    fmt: str, subtype: str, extension: str, lossy_output: str = "flac", bitrate_kbps: int = 0
) -> OutputFormat:
    """Keep the format family and subtype where that can hold the ε bound. Lossy inputs become
    FLAC PCM_16 (the member extension changes and the manifest records it), or, with
    `lossy_output="same"` and a known `bitrate_kbps`, are re-encoded in their own codec at that
    bitrate (same extension; no ε bound: the encode stage measures the L∞ actually written)."""
    if lossy_output not in LOSSY_POLICIES:
        raise ValueError(f"lossy_output must be one of {LOSSY_POLICIES}, got {lossy_output!r}")
    if fmt in LOSSY_FORMATS:
        codec = SAME_CODEC.get((fmt, subtype))
        if lossy_output == "same" and codec and bitrate_kbps > 0:
            spec = LOSSY_CODECS[codec]
            return OutputFormat(fmt, subtype, extension, int(min(max(bitrate_kbps, spec.min_kbps), spec.max_kbps)))
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
    values already on the grid (see quantize_within) are stored exactly; lossy outputs go through
    ffmpeg (see `ffmpeg_encode`)."""
    if samples.ndim != 2:
        raise AudioEncodeError(f"expected [samples, channels], got shape {samples.shape}")
    if out.bitrate_kbps > 0:
        if out.codec is None:
            raise AudioEncodeError(f"no lossy encoder for {out.format}/{out.subtype}")
        return ffmpeg_encode(samples, sample_rate, out.codec, out.bitrate_kbps)
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


# ------------------------------------------------------------------------------- lossy codecs (ffmpeg)


def ffmpeg_timeout(duration_s: float) -> float:
    """Seconds one ffmpeg call on a track of `duration_s` may take (encoders run ≫ real time)."""
    return 60.0 + 2.0 * duration_s


def _run_ffmpeg(tool: str, args: list[str], data: bytes | memoryview, timeout: float) -> bytes:
    """Run ffmpeg/ffprobe (no shell) with `data` on stdin; its stdout. AudioEncodeError on failure."""
    binary = shutil.which(tool)
    if binary is None:
        raise AudioEncodeError(f"{tool} not found (apt-get install ffmpeg)")
    try:
        done = subprocess.run([binary, *args], input=data, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AudioEncodeError(f"{tool} timed out after {timeout:g} s") from exc
    except OSError as exc:
        raise AudioEncodeError(f"{tool} could not run: {exc}") from exc
    if done.returncode != 0:
        # ffmpeg names its objects by address ("[libvorbis @ 0x55..]"): dropped, so messages are stable.
        message = re.sub(r" @ 0x[0-9a-fA-F]+", "", done.stderr.decode("utf-8", "replace")).strip().splitlines()
        raise AudioEncodeError(f"{tool} exit {done.returncode}: {' | '.join(message[-3:])[:300]}")
    return done.stdout


def _codec(codec: LossyCodec | str) -> LossyCodec:
    if isinstance(codec, LossyCodec):
        return codec
    if codec not in LOSSY_CODECS:
        raise AudioEncodeError(f"unknown lossy codec {codec!r}; known: {sorted(LOSSY_CODECS)}")
    return LOSSY_CODECS[codec]


def _encode_to(path: str, samples: np.ndarray, rate: int, codec: LossyCodec, kbps: int, timeout: float) -> None:
    pcm = np.ascontiguousarray(samples, dtype="<f4")
    args = ["-hide_banner", "-nostats", "-loglevel", "error", "-f", "f32le", "-ar", str(rate)]
    args += ["-ac", str(pcm.shape[1]), "-i", "pipe:0", "-map_metadata", "-1", "-c:a", codec.encoder]
    args += ["-b:a", f"{kbps}k", "-fflags", "+bitexact", "-flags:a", "+bitexact", "-f", codec.muxer, "-y", path]
    _run_ffmpeg("ffmpeg", args, memoryview(pcm).cast("B"), timeout)


def ffmpeg_encode(
    samples: np.ndarray, rate: int, codec: LossyCodec | str, kbps: int, timeout: float | None = None
) -> bytes:
    """float32 [samples, channels] -> bytes of `codec` at `kbps` (real ffmpeg encoder, CBR/ABR).

    PCM goes in through a pipe (no copy of the track); the coded file comes out through a temporary
    file, not a pipe: only a seekable output gets the LAME/Xing header that carries the encoder
    delay and padding, so that decoders (ffmpeg, mpg123 in libsndfile) trim them and the output is
    sample-aligned with its input (a piped MP3 starts ~1105 samples late and runs long).
    Deterministic: bitexact flags, no metadata. Raises AudioEncodeError (missing ffmpeg, encoder
    error, timeout)."""
    spec = _codec(codec)
    limit = timeout if timeout is not None else ffmpeg_timeout(samples.shape[0] / rate)
    with tempfile.TemporaryDirectory(prefix="unlearnable-codec-") as tmp:
        path = os.path.join(tmp, "out" + spec.suffix)
        _encode_to(path, samples, rate, spec, kbps, limit)
        with open(path, "rb") as f:
            return f.read()


def codec_round_trip(
    samples: np.ndarray, rate: int, codec: LossyCodec | str, kbps: int, timeout: float | None = None
) -> np.ndarray:
    """Encode with ffmpeg and decode back with ffmpeg: float32 of the input's shape (decoded length
    cut or zero-padded to it). Used by the codec EOT views (`pipeline.core.views`)."""
    spec = _codec(codec)
    limit = timeout if timeout is not None else ffmpeg_timeout(samples.shape[0] / rate)
    channels = samples.shape[1]
    with tempfile.TemporaryDirectory(prefix="unlearnable-codec-") as tmp:
        path = os.path.join(tmp, "out" + spec.suffix)
        _encode_to(path, samples, rate, spec, kbps, limit)
        args = ["-hide_banner", "-nostats", "-loglevel", "error", "-nostdin", "-i", path]
        args += ["-f", "f32le", "-ac", str(channels), "-ar", str(rate), "pipe:1"]
        raw = _run_ffmpeg("ffmpeg", args, b"", limit)
    decoded = np.frombuffer(raw, dtype="<f4").reshape(-1, channels)
    out = np.zeros(samples.shape, dtype=np.float32)
    n = min(len(decoded), len(out))
    out[:n] = decoded[:n]
    return out


def probe_bitrate_kbps(data: bytes, duration_s: float, timeout: float = 30.0) -> int:
    """The audio bitrate of a lossy member in kbps: ffprobe's stream (else container) bit_rate, read
    through a pipe; where ffprobe is missing or reports none (Opus from a pipe), the member's size
    over its duration (which counts tags and container overhead too). 0 when unknown."""
    try:
        args = ["-v", "error", "-show_entries", "stream=codec_type,bit_rate:format=bit_rate", "-of", "json"]
        info = json.loads(_run_ffmpeg("ffprobe", [*args, "-i", "pipe:0"], data, timeout) or b"{}")
        audio = [s for s in info.get("streams", []) if s.get("codec_type") == "audio"]
        for value in (audio[0].get("bit_rate") if audio else None, info.get("format", {}).get("bit_rate")):
            if value not in (None, "", "N/A") and float(value) > 0:
                return max(1, round(float(value) / 1000))
    except (AudioEncodeError, ValueError, TypeError):
        pass
    if duration_s > 0 and data:
        return max(1, round(len(data) * 8 / duration_s / 1000))
    return 0


# ------------------------------------------------------------------------------ what was written


def lsb(subtype: str) -> float:
    """One step of the subtype's sample grid (full scale 1.0); float subtypes: float32 rounding slack."""
    return 2.0 ** -(PCM_BITS[subtype] - 1) if subtype in PCM_BITS else FLOAT_LSB


def codec_lag(reference: np.ndarray, decoded: np.ndarray, max_lag: int = MAX_CODEC_LAG, excerpt: int = 1 << 18) -> int:
    """The lag L (|L| ≤ max_lag) with decoded[i + L] ≈ reference[i]: argmax of the cross-correlation
    of the channel means over the same excerpt (up to `excerpt` samples from the middle of the
    track) of both, by FFT, each lag's sum divided by its overlap. Lag 0 wins unless another lag
    correlates more than 1 % better (periodic music would otherwise pick a whole period); 0 for
    silence."""
    n = min(reference.shape[0], decoded.shape[0])
    length = min(excerpt, n)
    start = (n - length) // 2
    a = reference[start : start + length].mean(axis=1, dtype=np.float64)
    b = decoded[start : start + length].mean(axis=1, dtype=np.float64)
    max_lag = min(max_lag, length - 1)
    if max_lag <= 0 or not a.any() or not b.any():
        return 0
    size = 1 << int(np.ceil(np.log2(2 * length)))
    corr = np.fft.irfft(np.fft.rfft(b, size) * np.conj(np.fft.rfft(a, size)), size)  # [L] = Σ b[i + L] a[i]
    lags = np.arange(-max_lag, max_lag + 1)
    values = corr[lags % size] / (length - np.abs(lags))
    best = int(np.argmax(values))
    if values[max_lag] >= values[best] - 0.01 * abs(values[best]):
        return 0
    return int(lags[best])


def aligned_linf(reference: np.ndarray, decoded: np.ndarray, lag: int = 0, chunk: int = 1 << 20) -> float:
    """max |decoded[i + lag] − reference[i]| over the samples both have, in chunks (no whole-track
    temporaries). NaN when they do not overlap."""
    first = max(0, -lag)
    last = min(reference.shape[0], decoded.shape[0] - lag)
    if last <= first:
        return float("nan")
    linf = 0.0
    for begin in range(first, last, chunk):
        end = min(begin + chunk, last)
        d = decoded[begin + lag : end + lag].astype(np.float64) - reference[begin:end]
        linf = max(linf, float(np.abs(d).max(initial=0.0)))
    return linf


@dataclass(frozen=True)
class WrittenCheck:
    """The written bytes decoded again and compared with the clean input (see `check_written`)."""

    linf: float  # max |decoded output − clean input| after alignment (NaN: no clean reference)
    lag: int  # samples the decoded output was shifted by to align (0 for lossless outputs)
    exact: bool  # the decoded output equals the protected PCM sample for sample
    bound_holds: bool  # lossless, same length, and linf ≤ ε + 1 LSB of the output grid


def check_written(
    data: bytes,
    clean: np.ndarray | None,
    protected: np.ndarray,
    rate: int,
    out: OutputFormat,
    eps: float,
    chunk: int = 1 << 20,
) -> WrittenCheck:
    """Decode `data` (as a consumer would, with libsndfile) and measure it against the clean input.

    Lossless outputs are compared sample for sample (no alignment; the length must match). Lossy
    outputs are aligned first: the encoder writes a seekable file whose LAME/Ogg header carries
    the encoder delay and padding, so the decoder already trims them; `codec_lag` (cross-correlation
    over ±MAX_CODEC_LAG samples) is the safety net for a decoder that does not. The ε bound is
    never claimed for a lossy output. Raises AudioEncodeError when the bytes do not decode back to
    the same rate and channel count."""
    try:
        decoded = decode(data, min_seconds=0.0)
    except AudioDecodeError as exc:
        raise AudioEncodeError(f"written {out.label} does not decode: {exc}") from exc
    if decoded.sample_rate != rate or decoded.channels != protected.shape[1]:
        raise AudioEncodeError(
            f"written {out.label} decodes as {decoded.channels} ch at {decoded.sample_rate} Hz, "
            f"not {protected.shape[1]} ch at {rate} Hz"
        )
    got = decoded.samples
    same_length = got.shape[0] == protected.shape[0]
    exact = same_length and not out.lossy
    if exact:
        for begin in range(0, got.shape[0], chunk):
            if not np.array_equal(got[begin : begin + chunk], protected[begin : begin + chunk]):
                exact = False
                break
    if clean is None or clean.size == 0:
        return WrittenCheck(float("nan"), 0, exact, False)
    lag = codec_lag(clean, got) if out.lossy else 0
    linf = aligned_linf(clean, got, lag, chunk)
    holds = not out.lossy and same_length and math.isfinite(eps) and linf <= eps + lsb(out.subtype)
    return WrittenCheck(linf, lag, exact, bool(holds))
