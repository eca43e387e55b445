"""Hugging Face `transformers` CLAP audio encoder (the CLAP that diffusers' MusicLDM ships), with a
differentiable torch front end matching `ClapFeatureExtractor` (which is numpy).

Only the audio half is ever built (`ClapAudioModelWithProjection`); a full `ClapModel`
checkpoint loads into it (same `audio_model.*` / `audio_projection.*` names, text keys ignored).
The mel filter bank is transformers' own `mel_filter_bank` (Slaney scale and norm, as the
extractor uses for `rand_trunc`), not re-derived; the STFT (`encoder.power_spectrogram`, an FFT
of unfolded frames) uses the extractor's periodic Hann window, reflect padding and power 2, then
10·log10 with the same 1e-10 floors.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.encoder import power_spectrogram

CLAP_RATE = 48_000
N_FFT = 1024
HOP = 480
N_MELS = 64
F_MIN, F_MAX = 0.0, 14_000.0
MEL_FLOOR = 1e-10  # transformers' spectrogram(mel_floor) and power_to_db(min_value)

# Audio tower sizes: "base" is MusicLDM's (HTSAT-base: depths 2,2,12,2, patch embeds 128).
HF_AUDIO_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "depths": [2, 2, 2, 2],
        "patch_embeds_hidden_size": 32,
        "hidden_size": 256,
        "num_attention_heads": [2, 4, 8, 16],
    },
    "base": {
        "depths": [2, 2, 12, 2],
        "patch_embeds_hidden_size": 128,
        "hidden_size": 1024,
        "num_attention_heads": [4, 8, 16, 32],
    },
}


class HFClapAudioEncoder(nn.Module):
    """48 kHz mono [B, 480000] -> unit-norm [B, 512] through a transformers CLAP audio tower.

    The front end runs in fp32 with autocast off; the tower follows the caller's autocast.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.model = model
        filters = mel_filter_bank(
            num_frequency_bins=N_FFT // 2 + 1,
            num_mel_filters=N_MELS,
            min_frequency=F_MIN,
            max_frequency=F_MAX,
            sampling_rate=CLAP_RATE,
            norm="slaney",
            mel_scale="slaney",
        )
        self.register_buffer("mel_filters", torch.from_numpy(filters).float(), persistent=False)  # [freq, mels]
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True), persistent=False)
        self.amodel = "hf"
        self.freeze()

    def freeze(self) -> HFClapAudioEncoder:
        self.eval()
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> HFClapAudioEncoder:
        """Always stays in eval mode."""
        return super().train(False)

    def features(self, waveform: torch.Tensor) -> torch.Tensor:
        """ClapFeatureExtractor's `rand_trunc` log-mel of a 10 s window: [B, 480000] -> [B, 1, 1001, 64]."""
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            power = power_spectrogram(waveform.float(), self.window, HOP)  # [B, frames, freq]
            mel = (power @ self.mel_filters).clamp(min=MEL_FLOOR)
            return (10.0 * torch.log10(mel))[:, None]

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        features = self.features(waveform)
        is_longer = torch.zeros(waveform.shape[0], 1, dtype=torch.bool, device=waveform.device)
        out = self.model(input_features=features, is_longer=is_longer)
        return F.normalize(out.audio_embeds.float(), dim=-1)


def random_hf_model(preset: str, seed: int) -> nn.Module:
    """A `ClapAudioModelWithProjection` with deterministic random weights for a preset size."""
    from transformers import ClapAudioConfig, ClapAudioModelWithProjection

    if preset not in HF_AUDIO_PRESETS:
        raise ValueError(f"unknown hf preset {preset!r}; known: {sorted(HF_AUDIO_PRESETS)}")
    config = ClapAudioConfig(enable_fusion=False, projection_dim=512, **HF_AUDIO_PRESETS[preset])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClapAudioModelWithProjection(config)


def load_hf_model(source: str, cache_dir: str, storage_options: dict | None = None) -> nn.Module:
    """`from_pretrained` on a local folder, a remote folder (any fsspec URL: copied to the cache
    once) or a hub repo id `org/repo` (needs encoder.hub_offline=false)."""
    from transformers import ClapAudioModelWithProjection

    local = Path(source.removeprefix("file://")).expanduser()
    if "://" in source and not source.startswith("file://"):
        import hashlib

        import fsspec

        target = Path(cache_dir).expanduser() / hashlib.sha256(source.encode()).hexdigest()[:16]
        if not (target / "config.json").is_file():
            options = dict(storage_options or {}) if source.startswith("s3://") else {}
            fs, path = fsspec.core.url_to_fs(source, **options)
            partial = target.with_suffix(".partial")
            shutil.rmtree(partial, ignore_errors=True)
            fs.get(path.rstrip("/") + "/", str(partial), recursive=True)
            os.replace(partial, target)
        local = target
    if local.is_dir():
        return ClapAudioModelWithProjection.from_pretrained(str(local))
    return ClapAudioModelWithProjection.from_pretrained(source)  # a hub repo id
