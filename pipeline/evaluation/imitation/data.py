"""MusicLDM's data view: 16 kHz crops, the log-mel front end (and Griffin-Lim back), CLAP conditions."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.evaluation.imitation.catalog import CatalogItem
from pipeline.evaluation.imitation.config import EMBED_DIM, MODELS, ImitationConfig, MelSection

# ------------------------------------------------------------------------- MusicLDM's data view


class MelFrontEnd:
    """16 kHz crops -> log-mel [B, n_mels, frames] as AudioLDM/MusicLDM compute it: torch.stft
    magnitude (Hann, centred, reflect padding), librosa's Slaney mel filter bank, log(max(·, 1e-5))."""

    def __init__(self, mel: MelSection):
        import librosa

        self.cfg = mel
        basis = librosa.filters.mel(
            sr=mel.sample_rate, n_fft=mel.n_fft, n_mels=mel.n_mels, fmin=mel.fmin, fmax=mel.fmax
        )
        self.basis = torch.from_numpy(basis).float()
        self.window = torch.hann_window(mel.win)
        self.crop = round(mel.crop_seconds * mel.sample_rate)
        self.frames = self.crop // mel.hop
        self._pinv: np.ndarray | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            x.float(),
            self.cfg.n_fft,
            self.cfg.hop,
            self.cfg.win,
            self.window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        ).abs()
        mel = torch.matmul(self.basis, spec)[..., : self.frames]
        return torch.log(mel.clamp(min=1e-5))

    def normalise(self, logmel: torch.Tensor) -> torch.Tensor:
        return (logmel - self.cfg.norm_mean) / self.cfg.norm_std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cfg.norm_std + self.cfg.norm_mean

    def griffin_lim(self, logmel: np.ndarray, iters: int, inverse: str = "pinv") -> np.ndarray:
        """log-mel [n_mels, frames] -> waveform [crop]: mel -> linear magnitude (`nnls`: librosa's
        non-negative least squares, as librosa.feature.inverse.mel_to_audio does; `pinv`: the
        filter bank's pseudo-inverse clipped at 0, ~100× faster), then librosa.griffinlim."""
        import librosa

        c = self.cfg
        logmel = np.clip(logmel.astype(np.float64), np.log(1e-5), 6.0)  # an untrained model's output stays finite
        mel = np.exp(logmel)
        mel = np.concatenate([mel, mel[:, -1:]], axis=1)  # the centred STFT's last frame, trimmed by __call__
        basis = self.basis.numpy().astype(np.float64)
        if inverse == "nnls":
            magnitude = librosa.feature.inverse.mel_to_stft(
                mel, sr=c.sample_rate, n_fft=c.n_fft, power=1.0, fmin=c.fmin, fmax=c.fmax
            )
        else:
            if self._pinv is None:
                self._pinv = np.linalg.pinv(basis)
            magnitude = np.maximum(self._pinv @ mel, 0.0)
        audio = librosa.griffinlim(
            magnitude,
            n_iter=iters,
            hop_length=c.hop,
            win_length=c.win,
            n_fft=c.n_fft,
            window="hann",
            center=True,
            length=self.crop,
            random_state=0,
        )
        return audio.astype(np.float32)


def peak_normalise(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(axis=-1, keepdims=True)
    return (centred / np.maximum(np.abs(centred).max(axis=-1, keepdims=True), 1e-8) * 0.5).astype(np.float32)


def to_rate(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return x.astype(np.float32)
    import julius

    with torch.no_grad():
        return julius.resample_frac(torch.from_numpy(x.astype(np.float32)), rate, target).numpy()


def crops_of(x: np.ndarray, length: int, count: int) -> list[np.ndarray]:
    """`count` evenly spaced crops of `length` samples (zero-padded when the track is shorter)."""
    if x.shape[0] < length:
        x = np.pad(x, (0, length - x.shape[0]))
    starts = np.linspace(0, x.shape[0] - length, count).round().astype(int) if count > 1 else [0]
    return [x[s : s + length] for s in starts]


@torch.no_grad()
def clap_embed(encoder, waves: np.ndarray, rate: int, batch: int) -> torch.Tensor:
    """CLAP embeddings [N, 512] of mono crops [N, samples] at `rate`, the MusicLDM way: resample to
    48 kHz (julius) and repeat-pad to 10 s (`ClapView`), fp32."""
    from pipeline.encoders.base import ClapView

    view = ClapView(rate).to(encoder.device)
    out = []
    for begin in range(0, len(waves), batch):
        x = torch.from_numpy(np.ascontiguousarray(waves[begin : begin + batch]))[:, None].to(encoder.device)
        lengths = torch.full((x.shape[0],), x.shape[-1], device=encoder.device)
        out.append(encoder.model(view(x, lengths)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, EMBED_DIM)


def prepare(cfg: ImitationConfig, items: list[CatalogItem], encoder, front: MelFrontEnd) -> dict[str, Any]:
    """Per variant: crops (16 kHz, peak-normalised), their log-mel and CLAP condition."""
    m = cfg.mel
    data: dict[str, Any] = {"keys": [i.key for i in items], "styles": [i.style for i in items]}
    for variant in MODELS:
        waves = []
        for item in items:
            audio = to_rate(getattr(item, variant), item.rate, m.sample_rate)
            waves.extend(crops_of(audio, front.crop, m.crops_per_track))
        stacked = np.stack(waves)
        if m.peak_normalise:
            stacked = peak_normalise(stacked)
        data[f"{variant}/wave"] = torch.from_numpy(stacked)
        data[f"{variant}/logmel"] = front(torch.from_numpy(stacked))
        data[f"{variant}/cond"] = clap_embed(encoder, stacked, m.sample_rate, cfg.encoder.batch)
    data["delta_e_protect"] = torch.tensor([i.delta_e_protect for i in items], dtype=torch.float64)
    return data
