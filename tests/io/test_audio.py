"""Decode/encode round trips across formats, rates, channels; quantisation keeps |x' - x| ≤ ε."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.demo import synthesize
from pipeline.io.audio import AudioDecodeError, decode, encode, output_format_for, quantize_within
from tests.factories import encode_audio

CASES = [
    ("WAV", "PCM_16", "wav", 44100, 2),
    ("WAV", "PCM_24", "wav", 48000, 1),
    ("WAV", "FLOAT", "wav", 16000, 1),
    ("WAV", "PCM_U8", "wav", 8000, 1),
    ("FLAC", "PCM_16", "flac", 22050, 2),
    ("FLAC", "PCM_24", "flac", 96000, 6),
    ("AIFF", "PCM_16", "aiff", 32000, 2),
]


@pytest.mark.parametrize(("fmt", "subtype", "ext", "rate", "channels"), CASES)
def test_protected_round_trip_keeps_format_and_bound(fmt, subtype, ext, rate, channels, rng) -> None:
    eps = 0.003
    clean_bytes = encode_audio(synthesize(0.5, rate, channels, 120, 220.0), rate, fmt, subtype)
    clean = decode(clean_bytes)
    assert (clean.sample_rate, clean.channels, clean.format, clean.subtype) == (rate, channels, fmt, subtype)
    out = output_format_for(clean.format, clean.subtype, ext)
    assert (out.format, out.subtype, out.extension) == (fmt, subtype, ext)
    attacked = clean.samples + rng.uniform(-2 * eps, 2 * eps, clean.samples.shape).astype(np.float32)
    protected = quantize_within(clean.samples, attacked, eps, out.subtype)
    written = decode(encode(protected, rate, out))
    assert written.samples.shape == clean.samples.shape
    assert (written.sample_rate, written.format, written.subtype) == (rate, fmt, subtype)
    np.testing.assert_array_equal(written.samples, protected)  # exact: values were on the grid
    assert np.abs(written.samples.astype(np.float64) - clean.samples).max() <= eps + 1e-7


def test_lossy_input_becomes_flac_within_eps(rng) -> None:
    clean = decode(encode_audio(synthesize(1.0, 22050, 2, 120, 220.0), 22050, "OGG", "VORBIS"))
    out = output_format_for(clean.format, clean.subtype, "ogg")
    assert (out.format, out.extension) == ("FLAC", "flac")
    eps = 0.002
    protected = quantize_within(
        clean.samples, clean.samples + rng.uniform(-eps, eps, clean.samples.shape), eps, out.subtype
    )
    written = decode(encode(protected, 22050, out))
    assert np.abs(written.samples.astype(np.float64) - clean.samples).max() <= eps + 1e-7


def test_quantize_respects_full_scale() -> None:
    clean = np.array([[32767 / 32768], [-1.0]], dtype=np.float32)
    protected = quantize_within(clean, clean + np.array([[0.01], [-0.01]], dtype=np.float32), 0.003, "PCM_16")
    assert protected.max() <= 32767 / 32768 and protected.min() >= -1.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"RIFF\x00\x00garbage" * 10, "not decodable"),
    ],
)
def test_decode_errors_are_specific(data: bytes, message: str) -> None:
    with pytest.raises(AudioDecodeError, match=message):
        decode(data)


def test_decode_refuses_nan_and_too_short() -> None:
    bad = np.zeros((4000, 1), dtype=np.float32)
    bad[10] = np.nan
    with pytest.raises(AudioDecodeError, match="non-finite"):
        decode(encode_audio(bad, 16000, "WAV", "FLOAT"))
    with pytest.raises(AudioDecodeError, match="too short"):
        decode(encode_audio(np.zeros((100, 1), dtype=np.float32), 16000, "WAV", "PCM_16"))


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg binary")
def test_aac_in_m4a_decodes_through_ffmpeg_and_is_written_as_flac() -> None:
    """libsndfile cannot read AAC: the bytes are probed (not guessed from a name) and decoded by
    ffmpeg at their own rate and channels; the output format is FLAC (or AAC again under `same`)."""
    from pipeline.io.audio import codec_lag, ffmpeg_encode

    clean = synthesize(2.0, 44_100, 2, 120, 220.0)
    decoded = decode(ffmpeg_encode(clean, 44_100, "aac", 128))
    assert (decoded.format, decoded.subtype, decoded.sample_rate, decoded.channels) == ("AAC", "AAC", 44_100, 2)
    assert 88_200 <= decoded.samples.shape[0] <= 88_200 + 4096  # encoder priming and padding at most
    lag = codec_lag(clean, decoded.samples)  # the encoder's priming samples, if the decoder kept them
    aligned = decoded.samples[max(lag, 0) :][:80_000, 0]
    assert np.corrcoef(aligned, clean[max(-lag, 0) :][: len(aligned), 0])[0, 1] > 0.95  # the same music
    assert output_format_for("AAC", "AAC", "m4a").label == "FLAC/PCM_16"
    assert output_format_for("AAC", "AAC", "m4a", "same", 128).label == "AAC/AAC@128kbps"
    with pytest.raises(AudioDecodeError, match="not decodable audio"):
        decode(b"\x00\x00\x00\x18ftypM4A " + b"\x00" * 400)  # an M4A header with no audio
