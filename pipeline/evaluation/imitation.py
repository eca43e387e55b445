"""Imitation test: train a MusicLDM-shaped model on clean, protected and noise-control audio and
measure how well each imitates the catalog when prompted with the CLEAN track's CLAP embedding.

`unlearnable imitate --clean URL --protected URL --config configs/imitation-cpu.yaml --out URL`
(or `--make-catalog N`: a synthetic catalog of distinct styles, protected in memory).

What is built (all plain torch + diffusers, no MusicLDM weights):

- data, MusicLDM's loader settings: mono 16 kHz, peak normalisation (x − mean)/max|x|·0.5, a crop
  of `mel.crop_seconds`, STFT magnitude (torch.stft, Hann 1024, hop 160) → librosa's Slaney mel
  filter bank (64 bins, 0–8 kHz) → log(max(·, 1e-5)), as AudioLDM/MusicLDM compute it;
- condition: the CLAP audio embedding of that crop the MusicLDM way (16 → 48 kHz with julius,
  10 s repeat-pad via `ClapView(16000)`), with the protecting encoder (the imitator's CLAP);
  standardised with the training set's own mean/std; 10 % replaced by a learned null vector;
- model: diffusers `UNet2DModel` on the normalised log-mel (1 channel, 64 × frames; MusicLDM
  diffuses a VAE latent instead: here there is no VAE), condition → Linear/SiLU/Linear → the
  time-embedding size → `class_embed_type="identity"` (added to the time embedding, like
  MusicLDM's FiLM path); `DDPMScheduler` (ε-prediction) for training, `DDIMScheduler` to sample;
- three models with the same seed, initialisation, batches, timesteps and noise: clean (x, e(x)),
  protected (x', e(x')), noise control (x + n, e(x + n)), n ~ U(−ε, ε);
- generation: per track one sample prompted with e(x) of the CLEAN crop (the imitator's prompt)
  and one unconditional sample from the same initial noise; mel → audio by Griffin-Lim
  (`librosa.feature.inverse.mel_to_audio`);
- metrics: cosine(CLAP(generated), CLAP(original crop)) with the protecting encoder and with a
  held-out encoder not used for protection, raw and centred on the catalog's mean embedding,
  nearest-style match, log-mel L1 (frame-wise and of the time-averaged profile).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from pipeline.config import ConfigError, StorageConfig, apply_override, build_dataclass

logger = logging.getLogger(__name__)

RANDOM_NOTE = "NOTE: with random CLAP weights this validates the mechanism and the harness, not real-world protection."
REAL_NOTE = "Imitation test with real CLAP weights (see the encoder rows below)."
MODELS = ("clean", "protected", "noise")
MODES = ("conditional", "unconditional")
EMBED_DIM = 512
AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus", "oga", "aiff", "aif")


# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class EncoderSection:
    """The protecting encoder (= the imitator's CLAP) and a held-out one used only for metrics."""

    checkpoint: str = "random:HTSAT-tiny:0"
    amodel: str = "HTSAT-base"
    sha256: str | None = None
    held_out: str = "random:HTSAT-tiny:1"  # an encoder NOT used for protection (metrics only)
    held_out_amodel: str = "HTSAT-base"
    held_out_sha256: str | None = None
    cache_dir: str = "~/.cache/music-unlearnable/checkpoints"
    hub_offline: bool = True
    device: str = "auto"
    batch: int = 8  # CLAP windows per forward


@dataclass(frozen=True)
class CatalogSection:
    """The synthetic catalog of `--make-catalog N` (N tracks spread over `styles` styles)."""

    styles: int = 4  # at most len(STYLES)
    seconds: float = 2.56
    sample_rate: int = 16_000
    seed: int = 0


@dataclass(frozen=True)
class AttackSection:
    """PGD settings used to protect the synthetic catalog (and ε for the noise control)."""

    eps: float = 0.003
    alpha: float = 0.0006
    steps: int = 12
    sigma: float = 0.00075
    target_delta_e: float = 10.0  # no early stop by default
    precision: str = "fp32"
    seed: int = 0
    eot_views: tuple[str, ...] = ("clean48k",)
    batch_windows: int = 8


@dataclass(frozen=True)
class MelSection:
    """MusicLDM's data settings."""

    sample_rate: int = 16_000
    n_mels: int = 64
    n_fft: int = 1024
    hop: int = 160
    win: int = 1024
    fmin: float = 0.0
    fmax: float = 8000.0
    crop_seconds: float = 2.56  # MusicLDM: 10.24
    crops_per_track: int = 1  # evenly spaced crops per training track
    peak_normalise: bool = True  # AudioLDM-lineage loaders: (x − mean)/max|x|·0.5
    norm_mean: float = -6.5  # log-mel → (log-mel − mean)/std for the diffusion model
    norm_std: float = 3.5


@dataclass(frozen=True)
class ModelSection:
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    norm_num_groups: int = 8
    mid_attention: bool = False
    attention_head_dim: int = 8
    cond_dropout: float = 0.1  # share of training conditions replaced by the learned null vector


@dataclass(frozen=True)
class TrainSection:
    steps: int = 400
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20
    seed: int = 0
    precision: str = "bf16"  # bf16 | fp32 (autocast around the UNet)
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # LDM's schedule
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    checkpoint_every: int = 100
    threads: int = 2


@dataclass(frozen=True)
class SampleSection:
    steps: int = 25  # DDIM steps
    guidance_scale: float = 1.0  # classifier-free guidance (1.0: none)
    eta: float = 0.0
    batch: int = 16
    griffin_lim_iters: int = 32
    mel_inverse: str = "pinv"  # mel -> linear magnitude before Griffin-Lim: pinv (fast) | nnls (librosa's mel_to_stft)
    seed: int = 0


@dataclass(frozen=True)
class ImitationConfig:
    """The imitation test's configuration (a YAML file + `--set section.key=value`)."""

    encoder: EncoderSection = field(default_factory=EncoderSection)
    catalog: CatalogSection = field(default_factory=CatalogSection)
    attack: AttackSection = field(default_factory=AttackSection)
    mel: MelSection = field(default_factory=MelSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    target: float = 0.3  # style-similarity target: protection works where similarity < target
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self, *sections: str) -> str:
        """12 hex digits of the settings in `sections` that change results (thread counts, batch
        sizes of inference, devices, checkpoint cadence, the number of training steps and progress
        bars are left out, so a run resumes with them changed)."""
        data = self.to_dict()
        # train.steps too: the learning rate is constant after warm-up and the batch generator's
        # state is checkpointed, so a longer run continues a shorter one exactly.
        ignored = {"train": ("threads", "checkpoint_every", "steps"), "encoder": ("batch", "device", "cache_dir")}
        for section, keys in ignored.items():
            for key in keys:
                data[section].pop(key, None)
        blob = json.dumps({s: data[s] for s in sections}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def load_imitation_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ImitationConfig:
    tree: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = loaded or {}
    for override in overrides:
        apply_override(tree, override)
    cfg = build_dataclass(ImitationConfig, tree)
    checks = [
        (cfg.catalog.styles >= 1 and cfg.catalog.styles <= len(STYLES), f"catalog.styles must be 1..{len(STYLES)}"),
        (cfg.mel.crop_seconds > 0, "mel.crop_seconds must be > 0"),
        (cfg.mel.crops_per_track >= 1, "mel.crops_per_track must be >= 1"),
        (cfg.mel.fmax <= cfg.mel.sample_rate / 2, "mel.fmax must be <= mel.sample_rate / 2"),
        (len(cfg.model.down_block_types) == len(cfg.model.block_out_channels), "model.down_block_types length"),
        (len(cfg.model.up_block_types) == len(cfg.model.block_out_channels), "model.up_block_types length"),
        (0 <= cfg.model.cond_dropout < 1, "model.cond_dropout must be in [0, 1)"),
        (cfg.train.steps >= 0 and cfg.train.batch_size >= 1, "train.steps >= 0 and train.batch_size >= 1"),
        (cfg.train.precision in ("fp32", "bf16"), "train.precision must be fp32|bf16"),
        (cfg.sample.steps >= 1, "sample.steps must be >= 1"),
        (cfg.sample.mel_inverse in ("pinv", "nnls"), "sample.mel_inverse must be pinv|nnls"),
        (0 < cfg.attack.eps < 1, "attack.eps must be in (0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    frames = round(cfg.mel.crop_seconds * cfg.mel.sample_rate) // cfg.mel.hop
    factor = 2 ** (len(cfg.model.block_out_channels) - 1)
    if frames % factor or cfg.mel.n_mels % factor:
        raise ConfigError(f"mel frames ({frames}) and n_mels must be divisible by {factor} (UNet downsampling)")
    return cfg


# -------------------------------------------------------------------------------- synthetic music


@dataclass(frozen=True)
class Style:
    name: str
    tempo_bpm: float
    root_hz: float
    scale: tuple[int, ...]  # semitones of the scale
    harmonics: int  # brightness
    rolloff: float  # harmonic amplitude ∝ rolloff**(h-1)
    envelope: str  # pad | pluck
    notes_per_beat: int
    kick: float
    hat: float
    snare: float


MAJOR, MINOR, PENTA = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10), (0, 3, 5, 7, 10)
STYLES: tuple[Style, ...] = (
    Style("ambient-pad", 68, 110.0, MAJOR, 3, 0.3, "pad", 1, 0.0, 0.0, 0.0),
    Style("fast-bright-pluck", 160, 440.0, MINOR, 10, 0.8, "pluck", 4, 0.5, 0.5, 0.3),
    Style("mid-tempo-keys", 100, 220.0, MAJOR, 5, 0.5, "pluck", 2, 0.4, 0.15, 0.0),
    Style("drum-heavy", 128, 82.4, PENTA, 2, 0.2, "pluck", 1, 0.9, 0.7, 0.6),
    Style("slow-minor-strings", 80, 146.8, MINOR, 8, 0.7, "pad", 1, 0.2, 0.0, 0.0),
    Style("high-bells", 112, 880.0, PENTA, 4, 0.6, "pluck", 2, 0.0, 0.3, 0.0),
    Style("bass-groove", 96, 55.0, MINOR, 6, 0.6, "pluck", 2, 0.6, 0.2, 0.4),
    Style("organ-chords", 120, 196.0, MAJOR, 12, 0.9, "pad", 1, 0.3, 0.3, 0.0),
)


def synthesize_style(style: Style, seconds: float, rate: int, seed: int) -> np.ndarray:
    """One track of `style`, float32 [samples, 1], peak 0.7: a melody in the style's key, tempo,
    timbre and envelope over its drum pattern; the seed picks the notes, phases and a ±3 % tempo."""
    rng = np.random.default_rng(seed)
    n = round(seconds * rate)
    t = np.arange(n) / rate
    tempo = style.tempo_bpm * (1 + rng.uniform(-0.03, 0.03))
    beat = 60.0 / tempo
    step = beat / style.notes_per_beat
    tonal = np.zeros(n)
    for start_index in range(math.ceil(seconds / step)):
        start = start_index * step
        begin, end = round(start * rate), min(n, round((start + step * (4 if style.envelope == "pad" else 1.5)) * rate))
        if begin >= n:
            break
        local = t[begin:end] - start
        degree = style.scale[rng.integers(len(style.scale))] + 12 * int(rng.integers(0, 2))
        freq = style.root_hz * 2 ** (degree / 12)
        env = (
            np.minimum(local / 0.3, 1.0) * np.exp(-local * 0.8)
            if style.envelope == "pad"
            else np.exp(-local * 9.0) * np.minimum(local / 0.003, 1.0)
        )
        note = np.zeros_like(local)
        for h in range(1, style.harmonics + 1):
            if freq * h < rate / 2:
                note += style.rolloff ** (h - 1) * np.sin(2 * np.pi * freq * h * local + rng.uniform(0, 2 * np.pi))
        tonal[begin:end] += env * note
    phase = np.mod(t, beat)
    kick = np.sin(2 * np.pi * (45 + 110 * np.exp(-phase * 30)) * phase) * np.exp(-phase * 10)
    hat_phase = np.mod(t + beat / 2, beat / 2)
    hat = np.diff(rng.standard_normal(n) * np.exp(-hat_phase * 80), prepend=0.0)
    snare_phase = np.mod(t + beat, 2 * beat)
    snare = rng.standard_normal(n) * np.exp(-snare_phase * 25)
    mono = 0.5 * tonal / max(1e-9, np.abs(tonal).max()) + style.kick * kick + 0.3 * style.hat * hat
    mono += 0.3 * style.snare * snare
    mono *= 0.7 / max(1e-9, np.abs(mono).max())
    return mono.astype(np.float32)[:, None]


# ------------------------------------------------------------------------------------- catalogs


@dataclass
class CatalogItem:
    """One training track in three versions, mono at `rate`, float32 [samples]."""

    key: str
    style: str
    rate: int
    clean: np.ndarray
    protected: np.ndarray
    noise: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    delta_e_protect: float = float("nan")  # the protector's own Δe of the written audio


def load_encoder_for(cfg: ImitationConfig, which: str):
    from pipeline.encoders.load import load_encoder

    e = cfg.encoder
    spec, amodel, sha = (
        (e.checkpoint, e.amodel, e.sha256)
        if which == "protecting"
        else (e.held_out, e.held_out_amodel, e.held_out_sha256)
    )
    return load_encoder(
        spec,
        amodel,
        sha256=sha,
        cache_dir=e.cache_dir,
        hub_offline=e.hub_offline,
        device=e.device,
        storage_options=cfg.storage.storage_options(),
    )


def make_catalog(cfg: ImitationConfig, n_tracks: int, encoder) -> list[CatalogItem]:
    """`n_tracks` synthetic tracks over `catalog.styles` styles, protected with TrackProtector."""
    from pipeline.core.engine import PGDParams
    from pipeline.core.protect import Track, TrackProtector

    c, a = cfg.catalog, cfg.attack
    tracks, styles = [], []
    for i in range(n_tracks):
        style = STYLES[i % c.styles]
        samples = synthesize_style(style, c.seconds, c.sample_rate, seed=c.seed * 100_003 + i)
        tracks.append(Track(f"track-{i:04d}", samples, c.sample_rate, "FLOAT"))
        styles.append(style.name)
    params = PGDParams(a.eps, a.alpha, a.steps, a.sigma, a.target_delta_e, a.precision)
    protector = TrackProtector(
        encoder,
        params,
        batch_windows=a.batch_windows,
        seed=a.seed,
        eot_views=a.eot_views,
        measure_musicldm=False,
        measure_masking=False,
    )
    started = time.perf_counter()
    results = protector.protect(tracks)
    logger.info("protected %d tracks in %.1f s", len(tracks), time.perf_counter() - started)
    items = []
    for track, style, result in zip(tracks, styles, results):
        if result.error or result.samples is None:
            raise RuntimeError(f"protection failed for {track.key}: {result.error}")
        items.append(
            CatalogItem(
                track.key,
                style,
                c.sample_rate,
                track.samples[:, 0],
                result.samples[:, 0],
                delta_e_protect=result.delta_e_mean,
            )
        )
    return items


def _audio_members(url: str, storage_options: dict) -> dict[str, tuple[bytes, dict]]:
    """key -> (audio bytes, json metadata) of every shard at `url` (folder, glob or .tar)."""
    from pipeline.io.shards import list_shards, read_samples

    out: dict[str, tuple[bytes, dict]] = {}
    for ref in list_shards(url, storage_options):
        samples, error = read_samples(ref.url, storage_options)
        if error:
            logger.warning("%s: %s", ref.url, error)
        for sample in samples:
            if sample.error:
                continue
            audio, meta = None, {}
            for name, data in zip(sample.names, sample.data):
                ext = name.rsplit(".", 1)[-1].lower()
                if ext in AUDIO_EXTENSIONS and audio is None:
                    audio = data
                elif ext == "json":
                    try:
                        meta = json.loads(data)
                    except ValueError:
                        meta = {}
            if audio is not None:
                out[sample.key] = (audio, meta if isinstance(meta, dict) else {})
    return out


def _mono(samples: np.ndarray) -> np.ndarray:
    return samples.mean(axis=1).astype(np.float32)


def load_catalog(clean_url: str, protected_url: str, storage_options: dict) -> list[CatalogItem]:
    """Clean and protected WebDataset shards matched by key; the style is the clean item's json
    `style` (else `genre`, else empty)."""
    from pipeline.io.audio import decode

    clean = _audio_members(clean_url, storage_options)
    protected = _audio_members(protected_url, storage_options)
    items = []
    for key in sorted(set(clean) & set(protected)):
        a, b = decode(clean[key][0]), decode(protected[key][0])
        if a.sample_rate != b.sample_rate:
            logger.warning("%s: clean %d Hz vs protected %d Hz; skipped", key, a.sample_rate, b.sample_rate)
            continue
        n = min(a.samples.shape[0], b.samples.shape[0])
        meta = clean[key][1]
        style = str(meta.get("style", meta.get("genre", "")))
        items.append(CatalogItem(key, style, a.sample_rate, _mono(a.samples[:n]), _mono(b.samples[:n])))
    if not items:
        raise FileNotFoundError(f"no keys in common between {clean_url} ({len(clean)}) and {protected_url}")
    return items


def add_noise_control(items: list[CatalogItem], eps: float, seed: int) -> None:
    """noise = clean + U(−ε, ε), per track seeded by key (same L∞ as the protection)."""
    for item in items:
        digest = hashlib.sha256(f"{seed}\x00{item.key}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        item.noise = np.clip(item.clean + rng.uniform(-eps, eps, item.clean.shape), -1, 1).astype(np.float32)


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


# -------------------------------------------------------------------------------------- the model


class ConditionedUNet(nn.Module):
    """diffusers UNet2DModel with a CLAP embedding as its class embedding: the embedding is
    standardised (training-set mean/std), dropped to a learned null vector, projected to the
    time-embedding size and added to the time embedding (`class_embed_type="identity"`)."""

    def __init__(self, cfg: ModelSection, n_mels: int, frames: int, num_train_timesteps: int):
        super().__init__()
        from diffusers import UNet2DModel

        time_dim = cfg.block_out_channels[0] * 4  # UNet2DModel's time-embedding size
        self.unet = UNet2DModel(
            sample_size=(n_mels, frames),
            in_channels=1,
            out_channels=1,
            block_out_channels=tuple(cfg.block_out_channels),
            down_block_types=tuple(cfg.down_block_types),
            up_block_types=tuple(cfg.up_block_types),
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups,
            add_attention=cfg.mid_attention,
            attention_head_dim=cfg.attention_head_dim,
            class_embed_type="identity",
            num_train_timesteps=num_train_timesteps,
        )
        self.cond_proj = nn.Sequential(nn.Linear(EMBED_DIM, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.null = nn.Parameter(torch.randn(EMBED_DIM) * 0.5)
        self.register_buffer("cond_mean", torch.zeros(EMBED_DIM))
        self.register_buffer("cond_std", torch.ones(()))

    def set_condition_stats(self, conds: torch.Tensor) -> None:
        self.cond_mean.copy_(conds.mean(0))
        self.cond_std.copy_((conds - conds.mean(0)).pow(2).sum(-1).mean().sqrt().clamp(min=1e-6) / EMBED_DIM**0.5)

    def condition(self, e: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        z = (e - self.cond_mean) / self.cond_std
        return torch.where(drop[:, None], self.null.expand_as(z), z)

    def forward(self, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, class_labels=self.cond_proj(self.condition(e, drop))).sample


def build_scheduler(cfg: TrainSection):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        clip_sample=False,
        prediction_type="epsilon",
    )


def build_model(cfg: ImitationConfig, front: MelFrontEnd) -> ConditionedUNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return ConditionedUNet(cfg.model, cfg.mel.n_mels, front.frames, cfg.train.num_train_timesteps)


def _autocast(precision: str):
    import contextlib

    if precision == "bf16":
        return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _save(folder, name: str, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    folder.write_atomic(name, buffer.getvalue())


def _load(folder, name: str) -> Any | None:
    try:
        with folder.fs.open(folder.key(name), "rb") as f:
            return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None


def train_model(
    cfg: ImitationConfig, name: str, data: dict[str, Any], front: MelFrontEnd, device: torch.device, folder
) -> tuple[ConditionedUNet, list[float]]:
    """Train one model on `name`'s (log-mel, CLAP) pairs; resumes from `ckpt-<name>.pt` when its
    config digest matches. Batches, timesteps, noise and condition drops come from one generator
    seeded by train.seed: identical for the three models."""
    from tqdm.auto import tqdm

    t = cfg.train
    model = build_model(cfg, front).to(device)
    x0_all = front.normalise(data[f"{name}/logmel"])[:, None]  # [N, 1, mels, frames]
    conds = data[f"{name}/cond"]
    model.set_condition_stats(conds.to(device))
    scheduler = build_scheduler(t)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(t.seed)
    losses: list[float] = []
    start = 0
    digest = cfg.digest("mel", "model", "train", "catalog", "attack", "encoder")
    ckpt_name = f"ckpt-{name}.pt"
    saved = _load(folder, ckpt_name)
    if saved is not None and saved.get("digest") == digest:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        losses, start = list(saved["losses"]), int(saved["step"])
        logger.info("%s: resumed at step %d", name, start)
    elif saved is not None:
        logger.warning("%s: checkpoint is from another configuration; training from scratch", name)

    def lr_at(step: int) -> float:
        return t.lr * min(1.0, (step + 1) / max(1, t.warmup_steps))

    n = x0_all.shape[0]
    model.train()
    bar = tqdm(range(start, t.steps), desc=f"train {name}", disable=not cfg.progress, initial=start, total=t.steps)
    for step in bar:
        index = torch.randint(0, n, (t.batch_size,), generator=generator)
        timesteps = torch.randint(0, t.num_train_timesteps, (t.batch_size,), generator=generator)
        noise = torch.randn((t.batch_size, *x0_all.shape[1:]), generator=generator)
        drop = torch.rand(t.batch_size, generator=generator) < cfg.model.cond_dropout
        x0 = x0_all[index].to(device)
        noisy = scheduler.add_noise(x0, noise.to(device), timesteps.to(device))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with _autocast(t.precision):
            predicted = model(noisy, timesteps.to(device), conds[index].to(device), drop.to(device))
        loss = torch.nn.functional.mse_loss(predicted.float(), noise.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        done = step + 1
        if t.checkpoint_every > 0 and (done % t.checkpoint_every == 0 or done == t.steps):
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "losses": losses,
                "step": done,
                "digest": digest,
            }
            _save(folder, ckpt_name, state)
    bar.close()
    model.eval()
    return model, losses


@torch.no_grad()
def sample_mels(
    cfg: ImitationConfig,
    model: ConditionedUNet,
    prompts: torch.Tensor,
    conditional: bool,
    front: MelFrontEnd,
    device: torch.device,
    desc: str,
) -> torch.Tensor:
    """DDIM samples, one per prompt row, as log-mel [N, n_mels, frames]. The initial noise of row
    i is seeded by (sample.seed, i): the same for every model and for both modes."""
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    s = cfg.sample
    scheduler = DDIMScheduler.from_config(build_scheduler(cfg.train).config)
    scheduler.set_timesteps(s.steps)
    out = []
    shape = (1, cfg.mel.n_mels, front.frames)
    batches = range(0, prompts.shape[0], s.batch)
    bar = tqdm(total=len(batches) * s.steps, desc=desc, disable=not cfg.progress)
    for begin in batches:
        e = prompts[begin : begin + s.batch].to(device)
        b = e.shape[0]
        x = torch.stack(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(s.seed * 1_000_003 + begin + i))
                for i in range(b)
            ]
        ).to(device)
        cond_drop = torch.full((b,), not conditional, device=device)
        null_drop = torch.ones(b, dtype=torch.bool, device=device)
        guided = conditional and s.guidance_scale != 1.0
        for timestep in scheduler.timesteps:
            tt = torch.full((b,), int(timestep), device=device)
            with _autocast(cfg.train.precision):
                if guided:
                    both = model(
                        torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([e, e]), torch.cat([cond_drop, null_drop])
                    ).float()
                    eps_c, eps_u = both.chunk(2)
                    eps = eps_u + s.guidance_scale * (eps_c - eps_u)
                else:
                    eps = model(x, tt, e, cond_drop).float()
            x = scheduler.step(eps, timestep, x, eta=s.eta).prev_sample
            bar.update(1)
        out.append(front.denormalise(x[:, 0]).float().cpu())
    bar.close()
    return torch.cat(out)


# ----------------------------------------------------------------------------------------- metrics


def _cos(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy()


def _centred(a: torch.Tensor, b: torch.Tensor, mean: torch.Tensor) -> np.ndarray:
    return _cos(a - mean, b - mean)


def _style_match(generated: torch.Tensor, reference: torch.Tensor, styles: list[str], mean: torch.Tensor) -> np.ndarray:
    """Does the nearest style centroid (centred cosine) of each generated embedding equal its track's style?"""
    names = sorted(set(styles))
    labels = np.array(styles)
    centroids = torch.stack([reference[torch.from_numpy(labels == n)].mean(0) for n in names]) - mean
    sims = torch.nn.functional.normalize(generated - mean, dim=-1) @ torch.nn.functional.normalize(centroids, dim=-1).T
    return np.array([names[i] for i in sims.argmax(-1).tolist()]) == labels


def _write_png(folder, summary_rows: list[dict], rows: list[dict], target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("sim_protecting", "cosine, protecting encoder"),
        ("sim_held_out", "cosine, held-out encoder"),
        ("sim_protecting_centred", "centred cosine, protecting encoder"),
        ("sim_held_out_centred", "centred cosine, held-out encoder"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (column, title) in zip(axes.flat, panels):
        groups, labels = [], []
        for model in MODELS:
            for mode in MODES:
                values = [r[column] for r in rows if r["model"] == model and r["mode"] == mode]
                groups.append(values)
                labels.append(f"{model}\n{'cond' if mode == 'conditional' else 'uncond'}")
        ax.boxplot(groups, tick_labels=labels, showmeans=True)
        ax.axhline(target, color="red", linestyle="--", linewidth=1, label=f"target {target}")
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=8)
    fig.suptitle("Style similarity of generated crops to the original (per track)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    folder.write_atomic("similarity.png", buffer.getvalue())


def _median(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return float(np.median(finite)) if finite else float("nan")


def summarise(rows: list[dict], target: float) -> list[dict]:
    out = []
    for model in (*MODELS, "reference"):
        for mode in (*MODES, "griffin_lim"):
            group = [r for r in rows if r["model"] == model and r["mode"] == mode]
            if not group:
                continue
            out.append(
                {
                    "model": model,
                    "mode": mode,
                    "tracks": len(group),
                    **{
                        f"median_{c}": _median([r[c] for r in group])
                        for c in (
                            "sim_protecting",
                            "sim_held_out",
                            "sim_protecting_centred",
                            "sim_held_out_centred",
                            "mel_l1",
                            "mel_profile_l1",
                        )
                    },
                    "style_match_protecting": float(np.mean([r["style_match_protecting"] for r in group])),
                    "style_match_held_out": float(np.mean([r["style_match_held_out"] for r in group])),
                    "share_under_target_protecting": float(np.mean([r["sim_protecting"] < target for r in group])),
                    "share_under_target_held_out": float(np.mean([r["sim_held_out"] < target for r in group])),
                }
            )
    return out


def markdown(summary: dict[str, Any]) -> str:
    rows, enc = summary["table"], summary["encoders"]
    lines = [
        summary["first_line"],
        "",
        f"Conditioning / protecting encoder: `{enc['protecting']}`; held-out encoder (not used for protection, "
        f"metrics only): `{enc['held_out']}`"
        + (" — random weights stand in for a second real CLAP." if enc["held_out"].startswith("random:") else "."),
        f"Tracks: {summary['tracks']} ({summary['styles']} styles); mel 64 × {summary['frames']} at 16 kHz "
        "(torch.stft + librosa Slaney mel, fmax 8 kHz); vocoder: Griffin-Lim "
        f"(mel → magnitude by {summary['mel_inverse']}, then librosa.griffinlim, {summary['griffin_lim_iters']} "
        "iterations); "
        f"DDIM {summary['sample_steps']} steps, guidance {summary['guidance_scale']}.",
        "Similarity = cosine(CLAP(generated crop), CLAP(original clean crop)); *centred* subtracts the clean "
        "catalog's mean embedding first (random CLAP weights map all music to cosines > 0.85, so raw cosines "
        "barely separate styles); *style match* = the nearest style centroid is the track's own style.",
        "",
        "| model | prompt | median sim (prot. enc) | median sim (held-out) | centred (prot.) | centred (held-out) "
        "| style match (prot.) | style match (held-out) | median mel L1 | mel-profile L1 | share sim < "
        f"{summary['target']} (prot.) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['median_sim_protecting']:.3f} | {r['median_sim_held_out']:.3f} | "
            f"{r['median_sim_protecting_centred']:.3f} | {r['median_sim_held_out_centred']:.3f} | "
            f"{r['style_match_protecting']:.0%} | {r['style_match_held_out']:.0%} | {r['median_mel_l1']:.3f} | "
            f"{r['median_mel_profile_l1']:.3f} | {r['share_under_target_protecting']:.0%} |"
        )
    lines += ["", "| gap (conditional, median) | prot. enc | held-out | centred prot. | centred held-out |"]
    lines += ["|---|---:|---:|---:|---:|"]
    for name, gap in summary["gaps"].items():
        lines.append(
            f"| {name} | {gap['sim_protecting']:+.3f} | {gap['sim_held_out']:+.3f} | "
            f"{gap['sim_protecting_centred']:+.3f} | {gap['sim_held_out_centred']:+.3f} |"
        )
    lines += ["", "| model | training loss, end (mean of last 10 %) | steps |", "|---|---:|---:|"]
    for name, value in summary["loss_end"].items():
        lines.append(f"| {name} | {value:.4f} | {summary['train_steps']} |")
    lines += [
        "",
        f"Δe of the training conditions vs the clean ones (protecting encoder, median): protected "
        f"{summary['condition_delta_e']['protected']:.3f}, noise control {summary['condition_delta_e']['noise']:.3f}.",
        f"Clean model learns to imitate (conditional > unconditional, centred, protecting encoder): "
        f"{summary['clean_learns']}.",
        f"Wall time {summary['wall_seconds']:.0f} s ({summary['timings']}).",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ driver


def run(
    cfg: ImitationConfig,
    out_url: str,
    *,
    make_catalog_n: int = 0,
    clean_url: str | None = None,
    protected_url: str | None = None,
    items: list[CatalogItem] | None = None,
) -> dict[str, Any]:
    """The whole imitation test; writes imitation.parquet/.md, similarity.png, summary.json under
    `out_url` and returns the summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.encoders.load import emulated_precision_note, pick_device
    from pipeline.io.output import OutputFolder

    hub_offline(cfg)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    torch.set_num_threads(max(1, cfg.train.threads))
    storage = cfg.storage.storage_options()
    folder = OutputFolder(out_url, storage)
    folder.ensure()
    folder.write_atomic("imitation-config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    front = MelFrontEnd(cfg.mel)
    protecting = load_encoder_for(cfg, "protecting")
    device = pick_device(cfg.encoder.device)
    slow = emulated_precision_note(device, "bf16")
    if slow and "bf16" in (cfg.train.precision, cfg.attack.precision):
        logger.warning("%s: set train.precision=fp32 and attack.precision=fp32 here.", slow)

    source = "make" if make_catalog_n else "urls"
    data_digest = cfg.digest("catalog", "attack", "mel", "encoder") + f"-{source}-{make_catalog_n}"
    data = _load(folder, "prepared.pt")
    if data is None or data.get("digest") != data_digest or items is not None:
        t0 = time.perf_counter()
        if items is None:
            if make_catalog_n:
                items = make_catalog(cfg, make_catalog_n, protecting)
            elif clean_url and protected_url:
                items = load_catalog(clean_url, protected_url, storage)
            else:
                raise ValueError("give --make-catalog N, or both --clean and --protected")
        add_noise_control(items, cfg.attack.eps, cfg.attack.seed)
        timings["catalog+protect"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = prepare(cfg, items, protecting, front)
        data["digest"] = data_digest
        _save(folder, "prepared.pt", data)
        timings["prepare"] = time.perf_counter() - t0
    else:
        logger.info("reusing prepared data from %s/prepared.pt", out_url)
    keys, styles = list(data["keys"]), list(data["styles"])
    n_tracks, per = len(keys), cfg.mel.crops_per_track
    first_crop = torch.arange(n_tracks) * per

    # The imitator's prompt: e(x) of the clean crop; the reference: the clean crop itself.
    prompts = data["clean/cond"][first_crop]
    reference_wave = data["clean/wave"][first_crop].numpy()
    reference_logmel = data["clean/logmel"][first_crop]

    held_out = load_encoder_for(cfg, "held_out")
    t0 = time.perf_counter()
    ref_e = {
        "protecting": prompts,
        "held_out": clap_embed(held_out, reference_wave, cfg.mel.sample_rate, cfg.encoder.batch),
    }
    means = {k: v.mean(0) for k, v in ref_e.items()}
    timings["reference"] = time.perf_counter() - t0

    def score(model: str, mode: str, logmels: torch.Tensor, seconds: dict) -> list[dict]:
        t_gl = time.perf_counter()
        waves = np.stack(
            [front.griffin_lim(m.numpy(), cfg.sample.griffin_lim_iters, cfg.sample.mel_inverse) for m in logmels]
        )
        waves = peak_normalise(waves) if cfg.mel.peak_normalise else waves
        seconds["griffin_lim"] = seconds.get("griffin_lim", 0.0) + time.perf_counter() - t_gl
        t_e = time.perf_counter()
        gen_e = {
            "protecting": clap_embed(protecting, waves, cfg.mel.sample_rate, cfg.encoder.batch),
            "held_out": clap_embed(held_out, waves, cfg.mel.sample_rate, cfg.encoder.batch),
        }
        seconds["clap_eval"] = seconds.get("clap_eval", 0.0) + time.perf_counter() - t_e
        figures = {}
        for enc in ("protecting", "held_out"):
            figures[f"sim_{enc}"] = _cos(gen_e[enc], ref_e[enc])
            figures[f"sim_{enc}_centred"] = _centred(gen_e[enc], ref_e[enc], means[enc])
            figures[f"style_match_{enc}"] = _style_match(gen_e[enc], ref_e[enc], styles, means[enc])
        mel_l1 = (logmels - reference_logmel).abs().mean(dim=(1, 2)).numpy()
        profile_l1 = (logmels.mean(-1) - reference_logmel.mean(-1)).abs().mean(-1).numpy()
        cond_de = (data[f"{model}/cond"][first_crop] - prompts).norm(dim=-1).numpy() if model in MODELS else None
        rows = []
        for i, key in enumerate(keys):
            rows.append(
                {
                    "key": key,
                    "style": styles[i],
                    "model": model,
                    "mode": mode,
                    **{k: float(v[i]) if v.dtype != bool else bool(v[i]) for k, v in figures.items()},
                    "mel_l1": float(mel_l1[i]),
                    "mel_profile_l1": float(profile_l1[i]),
                    "condition_delta_e": float(cond_de[i]) if cond_de is not None else 0.0,
                    "delta_e_protect": float(data["delta_e_protect"][i]),
                }
            )
        return rows

    rows: list[dict] = []
    seconds: dict[str, float] = {}
    rows += score("reference", "griffin_lim", reference_logmel, seconds)
    losses: dict[str, list[float]] = {}
    for name in MODELS:
        t0 = time.perf_counter()
        model, losses[name] = train_model(cfg, name, data, front, device, folder)
        timings[f"train {name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        generated = {
            mode: sample_mels(cfg, model, prompts, mode == "conditional", front, device, f"sample {name} {mode[:6]}")
            for mode in MODES
        }
        timings[f"sample {name}"] = time.perf_counter() - t0
        for mode in MODES:
            rows += score(name, mode, generated[mode], seconds)
        del model
    timings.update(seconds)

    table = summarise(rows, cfg.target)
    by = {(r["model"], r["mode"]): r for r in table}
    columns = ("sim_protecting", "sim_held_out", "sim_protecting_centred", "sim_held_out_centred")
    gaps = {
        f"{a} − {b}": {
            c: by[(a, "conditional")][f"median_{c}"] - by[(b, "conditional")][f"median_{c}"] for c in columns
        }
        for a, b in (("clean", "protected"), ("clean", "noise"), ("noise", "protected"))
    }
    tail = {name: max(1, len(v) // 10) for name, v in losses.items()}
    clean_c, clean_u = by[("clean", "conditional")], by[("clean", "unconditional")]
    any_random = protecting.is_random or held_out.is_random
    summary = {
        "first_line": RANDOM_NOTE if any_random else REAL_NOTE,
        "encoders": {"protecting": protecting.encoder_id, "held_out": held_out.encoder_id},
        "tracks": n_tracks,
        "styles": len(set(styles)),
        "frames": front.frames,
        "target": cfg.target,
        "table": table,
        "gaps": gaps,
        "loss_end": {name: float(np.mean(v[-tail[name] :])) if v else float("nan") for name, v in losses.items()},
        "loss_curves": {name: v[:: max(1, len(v) // 200)] for name, v in losses.items()},
        "train_steps": cfg.train.steps,
        "sample_steps": cfg.sample.steps,
        "guidance_scale": cfg.sample.guidance_scale,
        "griffin_lim_iters": cfg.sample.griffin_lim_iters,
        "mel_inverse": "librosa mel_to_stft NNLS" if cfg.sample.mel_inverse == "nnls" else "pseudo-inverse",
        "condition_delta_e": {
            m: _median([r["condition_delta_e"] for r in rows if r["model"] == m and r["mode"] == "conditional"])
            for m in ("protected", "noise")
        },
        "clean_learns": bool(clean_c["median_sim_protecting_centred"] > clean_u["median_sim_protecting_centred"]),
        "clean_conditional_minus_unconditional": {c: clean_c[f"median_{c}"] - clean_u[f"median_{c}"] for c in columns},
        "wall_seconds": time.perf_counter() - started,
        "timings": ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        "versions": _versions(),
    }
    text = markdown(summary)
    summary["markdown"] = text
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    folder.write_atomic("imitation.parquet", buffer.getvalue().to_pybytes())
    folder.write_atomic("imitation.md", (text + "\n").encode())
    folder.write_atomic("summary.json", json.dumps(summary, indent=1, default=str).encode())
    _write_png(folder, table, rows, cfg.target)
    return summary


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "diffusers", "librosa", "laion-clap", "julius", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="unlearnable imitate", description=__doc__)
    parser.add_argument("--config", help="imitation YAML (configs/imitation-cpu.yaml, configs/imitation-gpu.yaml)")
    parser.add_argument("--clean", help="clean shards: folder, s3://bucket/prefix/, glob or .tar")
    parser.add_argument("--protected", help="protected shards (matched to --clean by key)")
    parser.add_argument("--make-catalog", type=int, default=0, metavar="N", help="synthesize and protect N tracks")
    parser.add_argument("--out", required=True, help="output folder (local or s3://)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.steps=50")
    parser.set_defaults(func=cmd_imitate)
    return parser


def hub_offline(cfg: ImitationConfig) -> None:
    """HF_HUB_OFFLINE=1 before anything imports huggingface_hub (diffusers does, and the hub
    library reads the variable once at import): laion-clap's import otherwise retries for minutes."""
    if cfg.encoder.hub_offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def cmd_imitate(args: argparse.Namespace) -> int:
    cfg = load_imitation_config(args.config, list(args.set or []))
    hub_offline(cfg)
    if importlib.util.find_spec("diffusers") is None:
        print("error: the imitation test needs diffusers (pip install 'diffusers==0.42.1')", file=sys.stderr)
        return 1
    if not args.make_catalog and not (args.clean and args.protected):
        raise ConfigError("give --make-catalog N, or both --clean URL and --protected URL")
    print(RANDOM_NOTE if "random:" in cfg.encoder.checkpoint + cfg.encoder.held_out else REAL_NOTE, flush=True)
    summary = run(cfg, args.out, make_catalog_n=args.make_catalog, clean_url=args.clean, protected_url=args.protected)
    print(summary["markdown"])
    print(f"outputs: {args.out}  (imitation.parquet, imitation.md, similarity.png, summary.json, ckpt-*.pt)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
