"""A small synthetic music catalog (tonal + percussive + noise) written as WebDataset shards, for the
demo and the tests. Deterministic for a seed."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf


@dataclass(frozen=True)
class DemoTrack:
    """One synthetic track and how it is stored."""

    key: str
    seconds: float
    sample_rate: int  # Hz
    channels: int
    format: str  # libsndfile format: WAV, FLAC, OGG
    subtype: str  # PCM_16, PCM_24, FLOAT, VORBIS
    extension: str  # member extension
    tempo_bpm: float
    root_hz: float  # key of the chord
    seed: int | None = None  # synthesis seed offset (default: the track's position in its shard)


DEMO_CATALOG: tuple[tuple[DemoTrack, ...], ...] = (
    (
        DemoTrack("song-000", 12.0, 44100, 2, "FLAC", "PCM_16", "flac", 120, 220.0),
        DemoTrack("song-001", 6.0, 48000, 1, "WAV", "PCM_16", "wav", 90, 261.6),
        DemoTrack("song-002", 5.0, 22050, 2, "OGG", "VORBIS", "ogg", 140, 196.0),
    ),
    (
        DemoTrack("song-003", 4.0, 16000, 1, "WAV", "FLOAT", "wav", 100, 293.7),
        DemoTrack("song-004", 8.0, 32000, 2, "FLAC", "PCM_24", "flac", 75, 164.8),
        DemoTrack("song-005", 3.0, 44100, 2, "WAV", "PCM_16", "wav", 160, 329.6),
    ),
)


def synthesize(
    seconds: float, sample_rate: int, channels: int, tempo_bpm: float, root_hz: float, seed: int = 0
) -> np.ndarray:
    """A music-like clip, float32 [samples, channels], peak ≈ 0.7: a major chord with harmonics
    (tonal), kick + hi-hat on the beat (percussive), and a little pink-ish noise."""
    rng = np.random.default_rng(seed)
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    tonal = np.zeros(n)
    for ratio in (1.0, 1.25, 1.5):  # root, major third, fifth
        for harmonic, gain in ((1, 1.0), (2, 0.4), (3, 0.2)):
            freq = root_hz * ratio * harmonic
            if freq < sample_rate / 2:
                tonal += gain * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    tonal *= 0.5 + 0.5 * np.sin(2 * np.pi * (tempo_bpm / 240) * t) ** 2  # slow swell per bar
    beat = 60.0 / tempo_bpm
    phase = np.mod(t, beat)
    kick = np.sin(2 * np.pi * (50 + 100 * np.exp(-phase * 30)) * phase) * np.exp(-phase * 12)
    hat_phase = np.mod(t + beat / 2, beat)
    hat = rng.standard_normal(n) * np.exp(-hat_phase * 60)
    hat = np.diff(hat, prepend=0.0)  # crude high-pass
    noise = np.cumsum(rng.standard_normal(n)) * 1e-4
    noise -= np.convolve(noise, np.ones(256) / 256, mode="same")
    mono = 0.12 * tonal + 0.35 * kick + 0.08 * hat + noise
    out = np.stack([mono * (1.0 - 0.3 * c / max(1, channels - 1)) for c in range(channels)], axis=1)
    out *= 0.7 / max(1e-9, np.abs(out).max())
    return out.astype(np.float32)


def encode_track(track: DemoTrack, samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, track.sample_rate, format=track.format, subtype=track.subtype)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A plain tar of (name, bytes), as WebDataset writers make them."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))


def write_demo_catalog(
    folder: str | Path, seed: int = 0, catalog: Sequence[Sequence[DemoTrack]] = DEMO_CATALOG
) -> list[Path]:
    """Write `catalog` (default DEMO_CATALOG: one tuple of tracks per shard) as `shard-00000N.tar`
    files under `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard_index, tracks in enumerate(catalog):
        members: list[tuple[str, bytes]] = []
        for number, track in enumerate(tracks):
            samples = synthesize(
                track.seconds,
                track.sample_rate,
                track.channels,
                track.tempo_bpm,
                track.root_hz,
                seed + (number if track.seed is None else track.seed),
            )
            members.append((f"{track.key}.{track.extension}", encode_track(track, samples)))
            meta = {"title": f"Demo {track.key}", "tempo_bpm": track.tempo_bpm, "root_hz": track.root_hz}
            members.append((f"{track.key}.json", json.dumps(meta).encode()))
        path = folder / f"shard-{shard_index:06d}.tar"
        write_tar(path, members)
        paths.append(path)
    return paths
