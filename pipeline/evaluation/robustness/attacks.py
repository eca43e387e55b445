"""The attack suite: what a purifying attacker (or a training pipeline) does to protected music.

Parameter ranges follow the watermark/protection benchmarks (AudioMarkBench, RAW-Bench): MP3
8-320 kbps, Opus 6-96, AAC, Vorbis; time stretch 0.8-1.25; pitch shift ±2 semitones; reverb;
compression and limiting; EQ shelves and peaks; low/high-pass; noise at 40-10 dB SNR;
smoothing; re-quantisation; spectral-gating denoising; sample-rate round trips; a training
pipeline's chain (16 kHz round trip + peak normalisation + random crop).

Implementations are maintained libraries: the ffmpeg binary for codecs
(pipeline.io.audio.codec_round_trip), Spotify's pedalboard for time stretch, pitch shift,
reverb, compressor, limiter and EQ filters, noisereduce for spectral gating, soxr for resampling,
scipy for Butterworth low/high-pass and the moving average. Added white noise, re-quantisation
and peak normalisation are one line of numpy each (no library adds anything there).

Every attack maps [samples, channels] float32 at `rate` to (samples', rate'): the length changes
under time stretch, the rate under the training chain. Random attacks take a seed so that the clean
and the protected item see the same draw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.evaluation.extra import require
from pipeline.io.audio import AudioEncodeError, codec_round_trip

AttackFn = Callable[[np.ndarray, int, int], tuple[np.ndarray, int]]  # (samples, rate, seed) -> (samples, rate)
WHAT = "unlearnable robustness"


class AttackError(RuntimeError):
    """An attack could not run (e.g. ffmpeg missing or refusing the input)."""


@dataclass(frozen=True)
class AttackSpec:
    """One attack at one strength: `name` is unique (`family_strength`), `library` says what runs it."""

    name: str
    family: str
    strength: str
    library: str
    fn: AttackFn


def ffmpeg_round_trip(samples: np.ndarray, rate: int, codec: str, kbps: int) -> np.ndarray:
    """Encode with the real ffmpeg encoder and decode back: float32 of the input's shape."""
    try:
        return codec_round_trip(samples, rate, codec, kbps)
    except AudioEncodeError as exc:
        raise AttackError(str(exc)) from exc


def resample_round_trip(samples: np.ndarray, rate: int, via: int) -> np.ndarray:
    """soxr round trip rate -> via -> rate, same length (zero-padded or cut)."""
    import soxr

    back = soxr.resample(soxr.resample(samples, rate, via), via, rate).astype(np.float32)
    out = np.zeros_like(samples)
    n = min(len(back), len(samples))
    out[:n] = back[:n]
    return out


def butter(samples: np.ndarray, rate: int, cutoff_hz: float, kind: str, order: int = 8) -> np.ndarray:
    """Zero-phase Butterworth low- or high-pass (scipy.signal.sosfiltfilt)."""
    signal = require("scipy.signal", WHAT)
    if cutoff_hz >= rate / 2:
        return samples
    sos = signal.butter(order, cutoff_hz, btype=kind, fs=rate, output="sos")
    return signal.sosfiltfilt(sos, samples, axis=0).astype(np.float32)


def white_noise(samples: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    """Gaussian white noise at `snr_db` below the item's mean power."""
    power = float(np.mean(samples.astype(np.float64) ** 2))
    noise = np.random.default_rng(seed).standard_normal(samples.shape) * np.sqrt(power / 10 ** (snr_db / 10))
    return (samples + noise).astype(np.float32)


def requantise(samples: np.ndarray, bits: int) -> np.ndarray:
    """Round to a `bits`-bit grid (full scale ±1)."""
    levels = 2.0 ** (bits - 1)
    return (np.clip(np.round(samples * levels), -levels, levels - 1) / levels).astype(np.float32)


def smooth(samples: np.ndarray, width: int) -> np.ndarray:
    """Moving average over `width` samples (scipy.ndimage.uniform_filter1d)."""
    ndimage = require("scipy.ndimage", WHAT)
    return ndimage.uniform_filter1d(samples, width, axis=0).astype(np.float32)


def peak_normalise(samples: np.ndarray) -> np.ndarray:
    """AudioLDM-lineage loaders: (x − mean) / max|x| · 0.5."""
    centred = samples - samples.mean(axis=0, keepdims=True)
    return (centred / max(float(np.abs(centred).max()), 1e-8) * 0.5).astype(np.float32)


def pedal(samples: np.ndarray, rate: int, *plugins) -> np.ndarray:
    """Run pedalboard plugins over [samples, channels]; same length."""
    board = require("pedalboard", WHAT).Pedalboard(list(plugins))
    out = board(np.ascontiguousarray(samples.T, dtype=np.float32), rate)
    return out.T[: len(samples)].astype(np.float32)


def time_stretch(samples: np.ndarray, rate: int, factor: float, semitones: float = 0.0) -> np.ndarray:
    """pedalboard.time_stretch (Rubber Band): factor > 1 is faster (shorter)."""
    pb = require("pedalboard", WHAT)
    out = pb.time_stretch(np.ascontiguousarray(samples.T, dtype=np.float32), rate, factor, semitones)
    return out.T.astype(np.float32)


def spectral_gate(samples: np.ndarray, rate: int, stationary: bool) -> np.ndarray:
    """noisereduce's spectral gating, full reduction, per channel."""
    nr = require("noisereduce", WHAT)
    out = nr.reduce_noise(y=samples.T, sr=rate, stationary=stationary, n_jobs=1)
    return np.asarray(out, dtype=np.float32).reshape(samples.shape[1], -1).T[: len(samples)]


def training_chain(samples: np.ndarray, rate: int, seed: int, to: int = 16_000) -> tuple[np.ndarray, int]:
    """What a training loader does: soxr to `to` Hz, peak normalisation, a random crop dropping
    0-0.24 s of the start (MusicLDM's 10.24 s crop vs CLAP's 10 s)."""
    import soxr

    down = soxr.resample(samples, rate, to).astype(np.float32)
    offset = int(np.random.default_rng(seed).integers(0, int(0.24 * to) + 1))
    return peak_normalise(down[offset:]), to


def _same_rate(fn: Callable[[np.ndarray, int, int], np.ndarray]) -> AttackFn:
    return lambda x, rate, seed: (fn(x, rate, seed), rate)


def _suite() -> list[AttackSpec]:
    specs: list[AttackSpec] = []

    def add(family: str, strength: str, library: str, fn: Callable[[np.ndarray, int, int], np.ndarray]) -> None:
        specs.append(AttackSpec(f"{family}_{strength}", family, strength, library, _same_rate(fn)))

    for codec, rates in {
        "mp3": (8, 32, 64, 128, 320),
        "opus": (6, 16, 32, 64, 96),
        "aac": (32, 64, 128),
        "vorbis": (48, 96, 192),
    }.items():
        for kbps in rates:
            add(codec, str(kbps), "ffmpeg", lambda x, r, s, c=codec, k=kbps: ffmpeg_round_trip(x, r, c, k))
    for via in (8_000, 11_025, 16_000, 22_050, 32_000, 44_100):
        add("resample", f"{via // 1000}k", "soxr", lambda x, r, s, v=via: resample_round_trip(x, r, v))
    for cutoff in (2_000, 4_000, 8_000):
        add("lowpass", f"{cutoff // 1000}k", "scipy", lambda x, r, s, c=cutoff: butter(x, r, c, "low"))
    for cutoff in (200, 500, 1_000):
        add("highpass", str(cutoff), "scipy", lambda x, r, s, c=cutoff: butter(x, r, c, "high"))
    for snr in (40, 30, 20, 10):
        add("noise", f"{snr}db", "numpy", lambda x, r, s, d=snr: white_noise(x, d, s))
    for factor in (0.8, 0.9, 1.1, 1.25):
        add("stretch", str(factor), "pedalboard", lambda x, r, s, f=factor: time_stretch(x, r, f))
    for semis in (-2, -1, 1, 2):
        add("pitch", f"{semis:+d}", "pedalboard", lambda x, r, s, n=semis: time_stretch(x, r, 1.0, float(n)))

    def pb(name: str, **kw):
        return getattr(require("pedalboard", WHAT), name)(**kw)

    for room in (0.25, 0.5, 0.9):
        add(
            "reverb",
            str(room),
            "pedalboard",
            lambda x, r, s, m=room: pedal(x, r, pb("Reverb", room_size=m, wet_level=0.33)),
        )
    for thr, ratio in ((-20, 4), (-30, 8)):
        add(
            "compressor",
            f"{thr}db_{ratio}to1",
            "pedalboard",
            lambda x, r, s, t=thr, q=ratio: pedal(x, r, pb("Compressor", threshold_db=t, ratio=q)),
        )
    for thr in (-6, -12):
        add("limiter", f"{thr}db", "pedalboard", lambda x, r, s, t=thr: pedal(x, r, pb("Limiter", threshold_db=t)))
    for gain in (-6, 6):
        add(
            "lowshelf",
            f"{gain:+d}db",
            "pedalboard",
            lambda x, r, s, g=gain: pedal(x, r, pb("LowShelfFilter", cutoff_frequency_hz=200, gain_db=g)),
        )
        add(
            "highshelf",
            f"{gain:+d}db",
            "pedalboard",
            lambda x, r, s, g=gain: pedal(x, r, pb("HighShelfFilter", cutoff_frequency_hz=4000, gain_db=g)),
        )
        add(
            "peak",
            f"{gain:+d}db",
            "pedalboard",
            lambda x, r, s, g=gain: pedal(x, r, pb("PeakFilter", cutoff_frequency_hz=1000, gain_db=g, q=1.0)),
        )
    for width in (3, 7, 15):
        add("smooth", str(width), "scipy", lambda x, r, s, w=width: smooth(x, w))
    for bits in (12, 8):
        add("quantise", f"{bits}bit", "numpy", lambda x, r, s, b=bits: requantise(x, b))
    add("denoise", "stationary", "noisereduce", lambda x, r, s: spectral_gate(x, r, True))
    add("denoise", "nonstationary", "noisereduce", lambda x, r, s: spectral_gate(x, r, False))
    specs.append(
        AttackSpec("chain_train16k", "chain", "train16k", "soxr+numpy", lambda x, r, s: training_chain(x, r, s))
    )
    specs.append(
        AttackSpec(
            "chain_mp3_64_train16k",
            "chain",
            "mp3_64+train16k",
            "ffmpeg+soxr+numpy",
            lambda x, r, s: training_chain(ffmpeg_round_trip(x, r, "mp3", 64), r, s),
        )
    )
    return specs


SUITE: dict[str, AttackSpec] = {spec.name: spec for spec in _suite()}
MUSICLDM_VIEW = "musicldm_view"  # applied in CLAP's 48 kHz domain (pipeline.core.views.musicldm), not to the file
QUICK = (
    "mp3_64",
    "opus_32",
    "aac_64",
    "resample_16k",
    "lowpass_8k",
    "noise_20db",
    "stretch_0.9",
    "pitch_+2",
    "reverb_0.5",
    "compressor_-20db_4to1",
    "highshelf_-6db",
    "denoise_stationary",
    "chain_train16k",
)


def resolve(names: list[str] | None, neural: list[str]) -> list[str]:
    """Attack names from a comma list: `all`, `quick`, family names (`mp3`: every strength) and
    single attacks; `neural` are the names of the neural attacks that are known."""
    if not names or names == ["all"]:
        return [*SUITE, MUSICLDM_VIEW, *neural]
    out: list[str] = []
    for name in names:
        if name == "quick":
            out += QUICK
        elif name in SUITE or name == MUSICLDM_VIEW or name in neural:
            out.append(name)
        elif any(s.family == name for s in SUITE.values()):
            out += [s.name for s in SUITE.values() if s.family == name]
        else:
            raise ValueError(
                f"unknown attack {name!r}; known: all, quick, families, {[*SUITE, MUSICLDM_VIEW, *neural]}"
            )
    return list(dict.fromkeys(out))
