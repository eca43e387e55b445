"""Shared fixtures: synthetic audio and shards, one random HTSAT-tiny encoder, one local Ray."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def audio_bytes(
    seconds: float, rate: int, channels: int, fmt: str = "WAV", subtype: str = "PCM_16", seed: int = 0
) -> bytes:
    """A short music-like clip encoded with libsndfile."""
    from pipeline.demo import synthesize

    samples = synthesize(seconds, rate, channels, tempo_bpm=120, root_hz=220.0, seed=seed)
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of (name, bytes) members."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def read_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.fixture(scope="session")
def tiny_encoder():
    """Random HTSAT-tiny (seed 0) on CPU, built once per test session."""
    import torch

    from pipeline.encoders.load import load_encoder

    torch.set_num_threads(2)
    return load_encoder("random:HTSAT-tiny:0", device="cpu")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
