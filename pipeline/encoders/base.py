"""What every CLAP audio encoder here shares: CLAP's rate and window (48 kHz, 10 s), the
embedder protocol, laion-clap's clip fill and fusion crops, the FFT power spectrogram, the
front-end digest, and `ClapView`, the differentiable 48 kHz mono view CLAP takes of a track.

Both backends embed a clip as their library does (`get_audio_embedding_from_data` in laion.py,
`ClapFeatureExtractor` + `get_audio_features` in hf.py), except that the library's random
choices are fixed: a clip longer than 10 s is cut to its first 10 s (rand_trunc), and fusion's three
crops start at the middle of each third of the possible starts (`fusion_crop_starts`). See
docs/encoders.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

CLAP_RATE = 48_000  # Hz
CLAP_SAMPLES = 480_000  # one 10 s window at 48 kHz
EMBED_DIM = 512
PADDINGS = ("repeatpad", "repeat", "pad")
RANDOM_WARNING = (
    "RANDOM CLAP WEIGHTS ({spec}): this encoder protects NOTHING. Its Δe figures only show that "
    "the machinery runs. Point encoder.checkpoint at a real laion-clap checkpoint for protection."
)


def set_hub_offline() -> None:
    """HF_HUB_OFFLINE=1 (and TRANSFORMERS_OFFLINE=1) for this process, before anything imports
    huggingface_hub: laion-clap's package import fetches tokenizers from the hub and retries for
    minutes without a network; transformers and diffusers ask the hub too. The one place it is set."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be fetched, verified or loaded; the message says which and why."""


class AudioEmbedder(Protocol):
    """What the PGD side needs of an encoder: 48 kHz mono windows [B, 480000] -> unit vectors [B, D]."""

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor: ...


def power_spectrogram(waveform: torch.Tensor, window: torch.Tensor, hop: int) -> torch.Tensor:
    """|STFT|² of [B, samples] -> [B, frames, n_fft/2 + 1], n_fft = len(window), frames centred
    (reflect padding by n_fft/2), as librosa / torchlibrosa / transformers compute it.

    Frames by `unfold` + `rfft` rather than `torch.stft`: the same numbers, and a backward ~1.5×
    cheaper on CPU (torch.stft's goes through a complex overlap-add)."""
    n_fft = window.shape[-1]
    padded = F.pad(waveform[:, None], (n_fft // 2, n_fft // 2), mode="reflect")[:, 0]
    spec = torch.fft.rfft(padded.unfold(-1, n_fft, hop) * window)  # [B, frames, n_fft/2 + 1]
    return spec.real**2 + spec.imag**2


def fill_clip(clip: torch.Tensor, max_samples: int, padding: str = "repeatpad") -> torch.Tensor:
    """A clip [n ≤ max_samples] -> [max_samples] as laion-clap / ClapFeatureExtractor fill it:
    `repeatpad` tiles it ⌊max/n⌋ times then zero-pads, `repeat` tiles it and cuts, `pad` zero-pads."""
    n = clip.shape[-1]
    if n >= max_samples:
        return clip[..., :max_samples]
    if n == 0:
        return clip.new_zeros(max_samples)
    if padding == "repeatpad":
        clip = clip.repeat(max_samples // n)
    elif padding == "repeat":
        clip = clip.repeat(max_samples // n + 1)[:max_samples]
    elif padding != "pad":
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return F.pad(clip, (0, max_samples - clip.shape[-1]))


def clips(waveform: torch.Tensor, lengths: torch.Tensor | None) -> list[torch.Tensor]:
    """Rows of [B, samples] cut to their real lengths [B] (all of each row when None)."""
    if lengths is None:
        return list(waveform)
    return [w[: int(n)] for w, n in zip(waveform, lengths)]


def fusion_crop_starts(total_frames: int, chunk_frames: int) -> tuple[int, int, int]:
    """Fusion's three crop starts (frames) for a mel of `total_frames` > `chunk_frames`: the
    libraries split the possible starts into thirds (np.array_split) and draw one in each at
    random; this takes the middle of each third (an empty third falls back to 0, as theirs do)."""
    import numpy as np

    thirds = np.array_split(np.arange(total_frames - chunk_frames + 1), 3)
    return tuple(int(t[len(t) // 2]) if len(t) else 0 for t in thirds)  # type: ignore[return-value]


def front_end_digest(settings: Mapping[str, Any]) -> str:
    """8 hex digits naming a front end's settings (sorted JSON, sha256), for encoder_id `#fe=`."""
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()[:8]


class ClapView(nn.Module):
    """Track-domain windows -> CLAP's input: down-mix to mono, resample to 48 kHz (julius'
    windowed sinc, differentiable), then repeat-pad short windows and zero-fill as laion-clap does
    (`repeatpad`), or crop to 480,000 samples (the first 10 s).

    `full_track=True` skips the fill and the crop: [B, samples at 48 kHz], for an encoder's
    `forward(x, lengths)` to fill, cut or fuse as its own library does.
    """

    def __init__(self, source_rate: int, full_track: bool = False):
        super().__init__()
        import julius

        self.source_rate = int(source_rate)
        self.full_track = full_track
        self.resample = julius.ResampleFrac(self.source_rate, CLAP_RATE) if source_rate != CLAP_RATE else None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, channels, samples] at `source_rate`, lengths [B] real samples -> [B, 480000]."""
        mono = x.float().mean(dim=1)
        if self.resample is not None:
            mono = self.resample(mono)
        if self.full_track:
            return mono
        if mono.shape[-1] < CLAP_SAMPLES:
            mono = F.pad(mono, (0, CLAP_SAMPLES - mono.shape[-1]))
        mono = mono[..., :CLAP_SAMPLES]
        if lengths is None:
            return mono
        n48 = (lengths.to(mono.device) * CLAP_RATE // self.source_rate).clamp(1, CLAP_SAMPLES)
        if bool((n48 >= CLAP_SAMPLES).all()):
            return mono
        t = torch.arange(CLAP_SAMPLES, device=mono.device)
        index = t[None, :] % n48[:, None]
        filled = t[None, :] < (CLAP_SAMPLES // n48 * n48)[:, None]
        return mono.gather(1, index) * filled
