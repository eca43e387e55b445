"""The imitation test's configuration: a YAML file + `--set section.key=value` (docs/imitation.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import (
    AttackConfig,
    ConfigError,
    EncoderConfig,
    PipelineConfig,
    QualityConfig,
    RuntimeConfig,
    StorageConfig,
    apply_override,
    build_dataclass,
)
from pipeline.evaluation.imitation.styles import STYLES

RANDOM_NOTE = "NOTE: with random CLAP weights this validates the mechanism and the harness, not real-world protection."
REAL_NOTE = "Imitation test with real CLAP weights (see the encoder rows below)."
MODELS = ("clean", "protected", "noise")
MODES = ("conditional", "unconditional")
EMBED_DIM = 512


# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class EncoderSection(EncoderConfig):
    """The protecting encoder (= the imitator's CLAP: pipeline.config.EncoderConfig's fields and
    YAML keys) and a held-out one used only for metrics."""

    held_out: str = "random:HTSAT-tiny:1"  # an encoder NOT used for protection (metrics only)
    held_out_amodel: str = "HTSAT-base"
    held_out_sha256: str | None = None
    batch: int = 8  # CLAP windows per forward


@dataclass(frozen=True)
class CatalogSection:
    """The synthetic catalog of `--make-catalog N` (N tracks spread over `styles` styles)."""

    styles: int = 4  # at most len(STYLES)
    seconds: float = 2.56
    sample_rate: int = 16_000
    seed: int = 0


@dataclass(frozen=True)
class AttackSection(AttackConfig):
    """PGD settings used to protect the synthetic catalog (and ε for the noise control):
    pipeline.config.AttackConfig's fields and YAML keys, with this test's defaults, plus the
    protector's windows per batch (the job's runtime.batch_windows)."""

    eps: float = 0.003
    steps: int = 12
    target_delta_e: float = 10.0  # no early stop by default
    precision: str = "fp32"
    batch_windows: int = 8

    def protect_config(self, encoder: EncoderConfig) -> PipelineConfig:
        """The PipelineConfig that pipeline.api.build_protector builds this test's protector from:
        this attack, `encoder`, the job's audio windows, no MusicLDM-view or masking statistics."""
        attack = AttackConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AttackConfig)})
        base = EncoderConfig(**{f.name: getattr(encoder, f.name) for f in dataclasses.fields(EncoderConfig)})
        return PipelineConfig(
            encoder=base,
            attack=attack,
            quality=QualityConfig(musicldm_view=False, masking=False),
            runtime=RuntimeConfig(batch_windows=self.batch_windows),
        )


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
    # Partial coverage (coverage.py): one more imitator per share < 1, trained on a set in which
    # that share of each style's tracks is protected (--protected-share 25,50,80,100).
    protected_shares: tuple[float, ...] = ()

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
        (all(0 < s <= 1 for s in cfg.protected_shares), "protected_shares must be in (0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    frames = round(cfg.mel.crop_seconds * cfg.mel.sample_rate) // cfg.mel.hop
    factor = 2 ** (len(cfg.model.block_out_channels) - 1)
    if frames % factor or cfg.mel.n_mels % factor:
        raise ConfigError(f"mel frames ({frames}) and n_mels must be divisible by {factor} (UNet downsampling)")
    return cfg
