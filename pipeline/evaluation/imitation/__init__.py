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

from pipeline.evaluation.imitation.catalog import CatalogItem, add_noise_control, load_catalog, make_catalog
from pipeline.evaluation.imitation.config import (
    MODELS,
    MODES,
    RANDOM_NOTE,
    REAL_NOTE,
    ImitationConfig,
    load_imitation_config,
)
from pipeline.evaluation.imitation.data import MelFrontEnd
from pipeline.evaluation.imitation.run import build_parser, cmd_imitate, main, run
from pipeline.evaluation.imitation.styles import STYLES, Style, synthesize_style

__all__ = [
    "MODELS",
    "MODES",
    "RANDOM_NOTE",
    "REAL_NOTE",
    "STYLES",
    "CatalogItem",
    "ImitationConfig",
    "MelFrontEnd",
    "Style",
    "add_noise_control",
    "build_parser",
    "cmd_imitate",
    "load_catalog",
    "load_imitation_config",
    "main",
    "make_catalog",
    "run",
    "synthesize_style",
]
