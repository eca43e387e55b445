"""Hugging Face `transformers` CLAP audio encoder (the CLAP that diffusers' MusicLDM ships), with a
differentiable torch front end reproducing the checkpoint's own `ClapFeatureExtractor` (numpy).

Only the audio half is ever built (`ClapAudioModelWithProjection`); a full `ClapModel`
checkpoint loads into it (same `audio_model.*` / `audio_projection.*` names, text keys ignored).

The front end is read from the `preprocessor_config.json` saved with the model (the folder itself,
or `../feature_extractor/` in a diffusers pipeline folder) and validated at load time
(`HFFrontEnd.from_config`): every setting the extractor honours is reproduced, anything it cannot
run or that would silently not do what it says fails with a `CheckpointError` naming the setting.
The mel filter banks are transformers' own (`ClapFeatureExtractor(...).mel_filters[_slaney]`: HTK
without norm for `fusion`, Slaney for `rand_trunc`); the STFT (`encoder.power_spectrogram`) uses the
extractor's periodic Hann window, reflect padding and power 2, then 10·log10 with its 1e-10 floors.

Where the extractor draws at random, the encoder is deterministic (the attack needs a fixed
function): `rand_trunc` on a clip longer than `max_length_s` keeps its first `max_length_s`
(as `ClapView` always has), and `fusion` takes the middle start of each third for its three crops
(`encoder.fusion_crop_starts`). `is_longer` follows the extractor for one clip at a time: with
`fusion` it is always True (the extractor marks a lone clip longer when none is).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.encoders.base import (
    CLAP_RATE,
    CheckpointError,
    clips,
    fill_clip,
    front_end_digest,
    fusion_crop_starts,
    power_spectrogram,
)

logger = logging.getLogger(__name__)

MEL_FLOOR = 1e-10  # transformers' spectrogram(mel_floor) and power_to_db(min_value)
PROCESSOR_FILE = "preprocessor_config.json"
TRUNCATIONS = ("rand_trunc", "fusion")
PADDINGS = ("repeatpad", "repeat", "pad")
# Keys transformers' ClapFeatureExtractor reads, derives, or stores without effect (checked below).
_KNOWN_KEYS = {
    "feature_size",
    "sampling_rate",
    "hop_length",
    "max_length_s",
    "fft_window_size",
    "padding_value",
    "return_attention_mask",
    "frequency_min",
    "frequency_max",
    "top_db",
    "truncation",
    "padding",
    "nb_frequency_bins",
    "nb_max_samples",
    "padding_side",
    "feature_extractor_type",
    "processor_class",
}
_PASSED_KEYS = _KNOWN_KEYS - {"nb_max_samples", "nb_frequency_bins", "feature_extractor_type", "processor_class"}

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


@dataclass(frozen=True)
class HFFrontEnd:
    """The effective settings of a `ClapFeatureExtractor` (what it computes, not what its JSON says).

    Example::

        fe = HFFrontEnd.from_config({"frequency_min": 50, "truncation": "rand_trunc"}, tower_config)
        fe.max_samples   # 480000 (max_length_s · sampling_rate)
        fe.digest        # 8 hex digits, recorded in encoder_id as "#fe=<digest>"
    """

    sampling_rate: int  # Hz
    max_samples: int  # max_length_s · sampling_rate
    n_fft: int  # fft_window_size (= window length)
    hop: int  # hop_length, samples
    n_mels: int  # feature_size
    f_min: float  # frequency_min, Hz
    f_max: float  # frequency_max, Hz
    truncation: str  # rand_trunc | fusion
    padding: str  # repeatpad | repeat | pad

    @property
    def digest(self) -> str:
        return front_end_digest({"backend": "transformers", **asdict(self)})

    @classmethod
    def from_config(cls, raw: dict[str, Any], tower: Any, source: str = "preprocessor config") -> HFFrontEnd:
        """Validate a saved extractor config against transformers' semantics and the audio tower
        (`ClapAudioConfig`). Raises CheckpointError naming the setting it cannot honour."""
        from transformers import ClapFeatureExtractor

        def fail(setting: str, why: str) -> CheckpointError:
            return CheckpointError(f"{source}: {setting}: {why}")

        kind = raw.get("feature_extractor_type", "ClapFeatureExtractor")
        if kind != "ClapFeatureExtractor":
            raise fail("feature_extractor_type", f"{kind!r} is not a CLAP feature extractor")
        unknown = sorted(set(raw) - _KNOWN_KEYS)
        if unknown:
            logger.warning("%s: ignoring keys ClapFeatureExtractor does not read: %s", source, unknown)
        try:
            extractor = ClapFeatureExtractor(**{k: v for k, v in raw.items() if k in _PASSED_KEYS})
        except Exception as exc:  # any refusal by transformers itself
            raise fail("config", f"ClapFeatureExtractor refuses it: {type(exc).__name__}: {exc}") from exc
        truncation, padding = extractor.truncation, extractor.padding
        if truncation not in TRUNCATIONS:
            raise fail("truncation", f"{truncation!r} is not one of {TRUNCATIONS}")
        if padding not in PADDINGS:
            raise fail("padding", f"{padding!r} is not one of {PADDINGS}")
        for key in ("sampling_rate", "hop_length", "fft_window_size", "feature_size"):
            value = getattr(extractor, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise fail(key, f"{value!r} must be a positive integer")
        max_samples = extractor.max_length_s * extractor.sampling_rate
        if float(max_samples) != int(max_samples) or max_samples <= 0:
            raise fail("max_length_s", f"{extractor.max_length_s!r} s is not a whole number of samples")
        max_samples = int(max_samples)
        # Stored but ignored by transformers: refuse values that would not do what they say.
        if "nb_max_samples" in raw and raw["nb_max_samples"] != max_samples:
            raise fail(
                "nb_max_samples",
                f"{raw['nb_max_samples']} disagrees with max_length_s·sampling_rate = {max_samples}; "
                "ClapFeatureExtractor ignores nb_max_samples and uses the latter: fix the config",
            )
        if "nb_frequency_bins" in raw and raw["nb_frequency_bins"] != extractor.fft_window_size // 2 + 1:
            raise fail("nb_frequency_bins", f"{raw['nb_frequency_bins']} disagrees with fft_window_size")
        if extractor.padding_value not in (0, 0.0):
            raise fail("padding_value", f"{extractor.padding_value}: ClapFeatureExtractor always pads with 0")
        if extractor.top_db is not None:
            raise fail("top_db", f"{extractor.top_db}: ClapFeatureExtractor ignores top_db (no dB clipping)")
        if getattr(extractor, "padding_side", "right") != "right":
            raise fail("padding_side", "ClapFeatureExtractor always pads on the right")
        f_min, f_max = float(extractor.frequency_min), float(extractor.frequency_max)
        if not 0 <= f_min < f_max <= extractor.sampling_rate / 2:
            raise fail("frequency_min/max", f"[{f_min}, {f_max}] Hz is not inside [0, {extractor.sampling_rate / 2}]")
        # What the audio tower can take.
        fused = bool(getattr(tower, "enable_fusion", False))
        if truncation == "fusion" and not fused:
            raise fail(
                "truncation",
                "'fusion' makes 4-channel features, but the audio tower is unfused (enable_fusion=false): "
                "transformers' own ClapModel fails on them",
            )
        if truncation == "fusion" and extractor.feature_size != 64:
            raise fail("feature_size", "'fusion' needs 64 mel bins (the extractor resizes long clips to 64)")
        freq_ratio = tower.spec_size // tower.num_mel_bins
        frames = max_samples // extractor.hop_length + 1
        if frames > tower.spec_size * freq_ratio or extractor.feature_size > tower.spec_size // freq_ratio:
            raise fail(
                "max_length_s/hop_length/feature_size",
                f"{frames} frames × {extractor.feature_size} mels exceed the tower's "
                f"{tower.spec_size * freq_ratio} × {tower.spec_size // freq_ratio} input",
            )
        return cls(
            sampling_rate=extractor.sampling_rate,
            max_samples=max_samples,
            n_fft=extractor.fft_window_size,
            hop=extractor.hop_length,
            n_mels=extractor.feature_size,
            f_min=f_min,
            f_max=f_max,
            truncation=truncation,
            padding=padding,
        )

    @classmethod
    def default_for(cls, tower: Any) -> HFFrontEnd:
        """transformers' ClapFeatureExtractor defaults with the truncation the tower takes (random
        presets only: a real checkpoint must bring its own processor config)."""
        truncation = "fusion" if getattr(tower, "enable_fusion", False) else "rand_trunc"
        return cls.from_config({"truncation": truncation}, tower, "ClapFeatureExtractor defaults")

    def mel_filters(self) -> torch.Tensor:
        """transformers' own filter bank for this truncation: [n_fft/2 + 1, n_mels]."""
        from transformers import ClapFeatureExtractor

        extractor = ClapFeatureExtractor(
            feature_size=self.n_mels,
            sampling_rate=self.sampling_rate,
            hop_length=self.hop,
            fft_window_size=self.n_fft,
            frequency_min=self.f_min,
            frequency_max=self.f_max,
        )
        bank = extractor.mel_filters if self.truncation == "fusion" else extractor.mel_filters_slaney
        return torch.from_numpy(bank).float()


class HFClapAudioEncoder(nn.Module):
    """48 kHz mono [B, samples] -> unit-norm [B, 512] through a transformers CLAP audio tower and
    the checkpoint's own front end (`HFFrontEnd`; defaults for random presets).

    The front end runs in fp32 with autocast off; the tower follows the caller's autocast.
    """

    def __init__(self, model: nn.Module, front_end: HFFrontEnd | None = None):
        super().__init__()
        self.model = model
        self.front_end = front_end or HFFrontEnd.default_for(model.config)
        fe = self.front_end
        self.register_buffer("mel_filters", fe.mel_filters(), persistent=False)  # [freq, mels]
        self.register_buffer("window", torch.hann_window(fe.n_fft, periodic=True), persistent=False)
        self.resample: nn.Module | None = None
        if fe.sampling_rate != CLAP_RATE:
            import julius

            self.resample = julius.ResampleFrac(CLAP_RATE, fe.sampling_rate)
        self.amodel = "hf"
        self.freeze()

    def freeze(self) -> HFClapAudioEncoder:
        self.eval()
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> HFClapAudioEncoder:
        """Always stays in eval mode."""
        return super().train(False)

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, samples] at the extractor's rate -> dB log-mel [B, frames, n_mels] (fp32)."""
        power = power_spectrogram(waveform.float(), self.window, self.front_end.hop)  # [B, frames, freq]
        return 10.0 * torch.log10((power @ self.mel_filters).clamp(min=MEL_FLOOR))

    def _long_fusion(self, clip: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The extractor's fusion input of one clip longer than max_samples: [4, chunk, n_mels]."""
        fe = self.front_end
        mel = self.log_mel(clip[None])[0]  # [total, n_mels]
        chunk = fe.max_samples // fe.hop + 1
        if mel.shape[0] == chunk:
            return mel.expand(4, -1, -1), False
        starts = fusion_crop_starts(mel.shape[0], chunk)
        shrunk = F.interpolate(mel[None, None], size=[chunk, 64], mode="bilinear", align_corners=False)[0, 0]
        return torch.stack([shrunk, *(mel[s : s + chunk] for s in starts)]), True

    def inputs(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """48 kHz [B, samples] (lengths [B]: real samples per row, default all) -> the extractor's
        (input_features [B, 1 or 4, frames, n_mels], is_longer [B, 1])."""
        fe = self.front_end
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            x = waveform.float()
            if self.resample is not None:
                x = self.resample(x)
                if lengths is not None:
                    lengths = lengths * fe.sampling_rate // CLAP_RATE
            batch, n = x.shape
            fusion = fe.truncation == "fusion"
            if lengths is None and n == fe.max_samples:  # the pipeline's case: one batched STFT
                mel = self.log_mel(x)[:, None]
                features = mel.expand(-1, 4, -1, -1) if fusion else mel
                is_longer = torch.full((batch, 1), fusion, dtype=torch.bool, device=x.device)
                return features, is_longer
            rows, longer = [], []
            for clip in clips(x, lengths):
                is_long = clip.shape[0] > fe.max_samples
                if is_long and fusion:
                    mel, _ = self._long_fusion(clip)
                else:
                    clip = clip[: fe.max_samples] if is_long else fill_clip(clip, fe.max_samples, fe.padding)
                    mel = self.log_mel(clip[None])
                    mel = mel.expand(4, -1, -1) if fusion else mel
                rows.append(mel)
                longer.append(fusion or is_long)
            features = torch.stack(rows)
            return features, torch.tensor(longer, dtype=torch.bool, device=x.device)[:, None]

    def features(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The extractor's input_features of 48 kHz [B, samples]: [B, 1 or 4, frames, n_mels]."""
        return self.inputs(waveform, lengths)[0]

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """48 kHz mono [B, samples] (any length; lengths [B] optional) -> unit-norm [B, 512]."""
        features, is_longer = self.inputs(waveform, lengths)
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


def _fetch_folder(source: str, cache_dir: str, storage_options: dict | None) -> Path:
    """Copy a remote folder (any fsspec URL) into the cache once; with it, a diffusers-layout
    sibling `../feature_extractor/preprocessor_config.json` when the folder has no processor."""
    import hashlib

    import fsspec

    target = Path(cache_dir).expanduser() / hashlib.sha256(source.encode()).hexdigest()[:16]
    options = dict(storage_options or {}) if source.startswith("s3://") else {}
    fs, path = fsspec.core.url_to_fs(source, **options)
    if not (target / "config.json").is_file():
        partial = target.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        fs.get(path.rstrip("/") + "/", str(partial), recursive=True)
        os.replace(partial, target)
    sibling = path.rstrip("/").rsplit("/", 1)[0] + f"/feature_extractor/{PROCESSOR_FILE}"
    local_sibling = target / "_feature_extractor" / PROCESSOR_FILE
    if not (target / PROCESSOR_FILE).is_file() and not local_sibling.is_file() and fs.exists(sibling):
        local_sibling.parent.mkdir(exist_ok=True)
        fs.get(sibling, str(local_sibling))
    return target


def find_processor_config(folder: Path | None, repo_id: str | None = None) -> tuple[dict[str, Any], str]:
    """The extractor config saved with a checkpoint, and where it was found: `folder`, its
    diffusers sibling `../feature_extractor/`, or the hub repo. Raises CheckpointError if none."""
    candidates = []
    if folder is not None:
        candidates = [
            folder / PROCESSOR_FILE,
            folder / "_feature_extractor" / PROCESSOR_FILE,
            folder.parent / "feature_extractor" / PROCESSOR_FILE,
        ]
    elif repo_id is not None:
        from transformers.utils import cached_file

        found = cached_file(repo_id, PROCESSOR_FILE, _raise_exceptions_for_missing_entries=False)
        candidates = [Path(found)] if found else []
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text()), str(path)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot read {path}: {exc}") from exc
    where = folder if folder is not None else repo_id
    raise CheckpointError(
        f"{where} has no {PROCESSOR_FILE} (nor ../feature_extractor/{PROCESSOR_FILE}): the front end "
        "(frequency range, truncation, padding) the model was trained with is unknown, and transformers' "
        "defaults differ from released CLAP processors. Save the processor with the model: "
        "ClapProcessor.from_pretrained(...).save_pretrained(folder)"
    )


def _local_folder(source: str, cache_dir: str, storage_options: dict | None) -> Path:
    """A local path for `source`: the path itself, or a remote folder copied to the cache once (a
    hub repo id comes back as a path that is not a directory)."""
    if "://" in source and not source.startswith("file://"):
        return _fetch_folder(source, cache_dir, storage_options)
    return Path(source.removeprefix("file://")).expanduser()


def load_hf_encoder(source: str, cache_dir: str, storage_options: dict | None = None) -> HFClapAudioEncoder:
    """A transformers CLAP checkpoint with its own front end: `from_pretrained` on a local folder,
    a remote folder (any fsspec URL: copied to the cache once) or a hub repo id `org/repo` (needs
    encoder.hub_offline=false), plus its `preprocessor_config.json` (see find_processor_config)."""
    from transformers import ClapAudioModelWithProjection

    local = _local_folder(source, cache_dir, storage_options)
    if local.is_dir():
        raw, found = find_processor_config(local)
        model = ClapAudioModelWithProjection.from_pretrained(str(local))
    else:  # a hub repo id
        model = ClapAudioModelWithProjection.from_pretrained(source)
        raw, found = find_processor_config(None, source)
    return HFClapAudioEncoder(model, HFFrontEnd.from_config(raw, model.config, found))


def check_hf_checkpoint(source: str, cache_dir: str, storage_options: dict | None = None) -> HFFrontEnd:
    """`load_hf_encoder`'s front-end checks without building the tower (config.json and the
    processor config only): for a driver to refuse a checkpoint before any shard is read."""
    from transformers import ClapAudioConfig

    local = _local_folder(source, cache_dir, storage_options)
    if local.is_dir():
        raw, found = find_processor_config(local)
        tower = ClapAudioConfig.from_pretrained(str(local))
    else:
        raw, found = find_processor_config(None, source)
        tower = ClapAudioConfig.from_pretrained(source)
    return HFFrontEnd.from_config(raw, tower, found)
