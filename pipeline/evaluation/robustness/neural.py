"""Neural purifiers as attacks, each loaded from a local checkpoint (none can be downloaded here).

- `encodec`: a neural codec round trip, transformers' EncodecModel (`save_pretrained` folder,
  e.g. facebook/encodec_24khz or _48khz), bandwidth = the model's highest unless
  `ROBUSTNESS_ENCODEC_KBPS` is set;
- `demucs`: source separation and remix (the sum of the separated stems: what the separator
  keeps of the mixture), the `demucs` package's model files in a local folder (`NAME=DIR`,
  with DIR holding e.g. htdemucs.yaml + weights, as `demucs.pretrained.get_model(repo=DIR)` reads);
- `musicldm_vae`: the imitator's own autoencoder, a diffusers MusicLDM/AudioLDM pipeline folder:
  log-mel (16 kHz, 64 bins, hop 160) -> VAE encode/decode -> its HiFi-GAN vocoder.

A diffusion purifier that noises and denoises with a waveform diffusion model (DiffWave /
AudioPure) has no code path here: no maintained package loads such a checkpoint offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.evaluation.extra import require

NEURAL = ("encodec", "demucs", "musicldm_vae")
WHAT = "unlearnable robustness (neural attacks)"


def _resample(x: np.ndarray, rate: int, to: int) -> np.ndarray:
    import soxr

    return x if rate == to else soxr.resample(x, rate, to).astype(np.float32)


class NeuralAttacks:
    """Neural attacks by name, each model loaded once from `checkpoints[name]` (a local path)."""

    def __init__(self, checkpoints: dict[str, str]):
        unknown = [n for n in checkpoints if n not in NEURAL]
        if unknown:
            raise ValueError(f"no neural attack named {unknown}; known: {list(NEURAL)}")
        self.checkpoints = dict(checkpoints)
        self._models: dict[str, object] = {}

    def available(self, name: str) -> bool:
        """Whether `name` has a local checkpoint that exists."""
        path = self.checkpoints.get(name)
        return bool(path) and Path(path).exists()

    def why(self, name: str) -> str:
        """Why `name` is not measured (no checkpoint given, or the path is missing)."""
        if name not in self.checkpoints:
            return f"needs a local checkpoint: --checkpoint {name}=PATH"
        return f"checkpoint {self.checkpoints[name]} not found"

    def run(self, name: str, samples: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
        """Attack [samples, channels] float32 at `rate`; returns (samples', rate')."""
        if name not in self._models:
            self._models[name] = getattr(self, f"_load_{name}")(self.checkpoints[name])
        return getattr(self, f"_run_{name}")(self._models[name], samples, rate)

    # ---------------------------------------------------------------------------------- encodec

    @staticmethod
    def _load_encodec(path: str):
        transformers = require("transformers", WHAT)
        return transformers.EncodecModel.from_pretrained(path).eval()

    @staticmethod
    def _run_encodec(model, samples: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
        import torch

        sr, channels = model.config.sampling_rate, model.config.audio_channels
        x = _resample(samples, rate, sr)
        bandwidth = float(os.environ.get("ROBUSTNESS_ENCODEC_KBPS", max(model.config.target_bandwidths)))
        if channels == 1:  # a mono codec codes each channel on its own
            columns = [x[:, [c]] for c in range(x.shape[1])]
        else:
            columns = [x if x.shape[1] == channels else np.repeat(x[:, :1], channels, axis=1)]
        outs = []
        for col in columns:
            with torch.no_grad():
                inp = torch.from_numpy(np.ascontiguousarray(col.T))[None]  # [1, channels, samples]
                codes = model.encode(inp, bandwidth=bandwidth)
                audio = model.decode(codes.audio_codes, codes.audio_scales)[0]  # [1, channels, samples']
            outs.append(audio[0].T.numpy()[: len(col)])
        return np.concatenate(outs, axis=1).astype(np.float32), sr

    # ----------------------------------------------------------------------------------- demucs

    @staticmethod
    def _load_demucs(path: str):
        pretrained = require("demucs.pretrained", WHAT)
        folder, _, model_name = path.partition("::")
        return pretrained.get_model(model_name or "htdemucs", repo=Path(folder))

    @staticmethod
    def _run_demucs(model, samples: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
        import torch

        apply = require("demucs.apply", WHAT).apply_model
        x = _resample(samples, rate, model.samplerate)
        if x.shape[1] == 1:
            x = np.repeat(x, 2, axis=1)
        with torch.no_grad():
            stems = apply(model, torch.from_numpy(np.ascontiguousarray(x.T))[None], device="cpu")[0]
        return stems.sum(dim=0).T.numpy().astype(np.float32), model.samplerate

    # ----------------------------------------------------------------------------- musicldm_vae

    @staticmethod
    def _load_musicldm_vae(path: str):
        diffusers = require("diffusers", WHAT)
        return diffusers.DiffusionPipeline.from_pretrained(path)

    @staticmethod
    def _run_musicldm_vae(pipe, samples: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
        import torch

        librosa = require("librosa", WHAT)
        mono = _resample(samples.mean(axis=1), rate, 16_000)
        mel = librosa.feature.melspectrogram(
            y=mono, sr=16_000, n_fft=1024, hop_length=160, win_length=1024, n_mels=64, fmin=0, fmax=8000, power=1.0
        )
        log_mel = torch.from_numpy(np.log(np.clip(mel, 1e-5, None)).T.astype(np.float32))  # [frames, 64]
        frames = log_mel.shape[0] - log_mel.shape[0] % 4
        with torch.no_grad():
            latents = pipe.vae.encode(log_mel[None, None, :frames]).latent_dist.mode()
            recon = pipe.vae.decode(latents).sample[0, 0]  # [frames, 64]
            audio = pipe.vocoder(recon[None]).squeeze().numpy()
        out = audio[: len(mono)].astype(np.float32)[:, None]
        return np.repeat(out, samples.shape[1], axis=1), 16_000
