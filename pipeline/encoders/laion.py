"""laion-clap's audio tower: HTSAT branch + audio projection built from laion-clap's own code
(unfused or fused, detected from the checkpoint's parameter names), loaded with weights_only."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.encoders.base import (
    CLAP_RATE,
    CLAP_SAMPLES,
    EMBED_DIM,
    CheckpointError,
    clips,
    fill_clip,
    fusion_crop_starts,
    power_spectrogram,
    set_hub_offline,
)

AUDIO_PREFIXES = ("audio_branch.", "audio_projection.")

# laion-clap's fusion kinds its own eval path can run (1-D kinds fail there on clips <= 10 s).
FUSION_TYPES = ("aff_2d", "iaff_2d", "daf_2d", "channel_map")


def import_laion_clap(hub_offline: bool = True) -> Any:
    """Import laion_clap's model factory. Its package import fetches tokenizers from the hub and
    retries for minutes offline, so HF_HUB_OFFLINE=1 is set first unless the caller opts in."""
    if hub_offline:
        set_hub_offline()
    from laion_clap.clap_module import factory, htsat, model

    return factory, htsat, model


def fusion_type_of(state: Mapping[str, Any]) -> str:
    """laion-clap fusion kind from an audio state dict's parameter names: "None" (unfused),
    aff_2d / iaff_2d / daf_2d (patch_embed.mel_conv2d, fusion_model.local_att[2]), channel_map
    (a 4-channel patch projection). 1-D fusion is refused: laion-clap's own eval path fails on it."""
    keys = set(state)
    if any(k.startswith("audio_branch.mel_conv1d.") for k in keys):
        raise CheckpointError(
            "checkpoint is a laion-clap 1-D fusion model (audio_branch.mel_conv1d.*: aff_1d/iaff_1d/daf_1d): "
            "not supported; laion-clap's own eval path cannot embed clips of 10 s or less with it"
        )
    if "audio_branch.patch_embed.mel_conv2d.weight" in keys:
        if any(k.startswith("audio_branch.patch_embed.fusion_model.local_att2.") for k in keys):
            return "iaff_2d"
        if any(k.startswith("audio_branch.patch_embed.fusion_model.local_att.") for k in keys):
            return "aff_2d"
        return "daf_2d"
    proj = state.get("audio_branch.patch_embed.proj.weight")
    if isinstance(proj, torch.Tensor) and proj.ndim == 4 and proj.shape[1] == 4:
        return "channel_map"
    return "None"


class ClapAudioEncoder(nn.Module):
    """laion-clap's audio tower only: `audio_branch` (HTSAT) + `audio_projection`, with laion-clap's
    parameter names, frozen. Gradients flow to the waveform only.

    The STFT/log-mel front end always runs in fp32 (autocast off): its bf16 backward is ~40× slower
    on CPU and loses precision; the transformer body follows the caller's autocast.

    The STFT itself is an FFT (`torch.fft.rfft` of the frames) instead of laion-clap's torchlibrosa
    Conv1d, whose kernels are the Hann-windowed DFT matrix (frozen in training, so the same in every
    checkpoint): the same power spectrogram to float rounding, for ~40 % of the conv's forward +
    backward time on CPU (an HTSAT-tiny PGD step at one thread: 1.18× faster). The kernels are
    checked against the windowed DFT at construction and after every `load_state_dict`; a
    checkpoint whose kernels differ keeps the conv (`fft_front_end` False).

    `fusion_type` other than "None" builds laion-clap's fused branch (see `fusion_type_of`). Its
    input is `get_audio_features(..., "fusion")`'s: the HTK log-mel (torchaudio's MelSpectrogram,
    norm None, then AmplitudeToDB) of the repeat-padded clip four times over, or, for a clip longer
    than 10 s, the whole clip's mel resized to 1001 frames (torchvision's antialiased bilinear
    Resize) plus three 10 s crops; `longer` marks the latter.
    """

    def __init__(self, amodel: str = "HTSAT-base", hub_offline: bool = True, fusion_type: str = "None"):
        super().__init__()
        factory, htsat, model = import_laion_clap(hub_offline)
        if amodel not in factory._MODEL_CONFIGS:
            known = sorted(k for k in factory._MODEL_CONFIGS if k.startswith(("HTSAT", "PANN")))
            raise CheckpointError(f"unknown audio model {amodel!r}; laion-clap knows {known}")
        cfg = factory._MODEL_CONFIGS[amodel]
        audio_cfg = model.CLAPAudioCfp(**cfg["audio_cfg"])
        if audio_cfg.model_type != "HTSAT":
            raise CheckpointError(f"only HTSAT audio models are supported, {amodel} is {audio_cfg.model_type}")
        if fusion_type != "None" and fusion_type not in FUSION_TYPES:
            raise CheckpointError(f"unsupported laion-clap fusion type {fusion_type!r}; supported: {FUSION_TYPES}")
        if audio_cfg.sample_rate != CLAP_RATE or audio_cfg.mel_bins != 64:
            raise CheckpointError(
                f"{amodel}: sample_rate {audio_cfg.sample_rate} / mel_bins {audio_cfg.mel_bins}: laion-clap's "
                f"get_audio_embedding_from_data takes {CLAP_RATE} Hz clips and fusion resizes to 64 mel bins"
            )
        self.amodel = amodel
        self.fusion_type = fusion_type
        self.audio_cfg = audio_cfg
        self.audio_branch = htsat.create_htsat_model(
            audio_cfg, enable_fusion=fusion_type != "None", fusion_type=fusion_type
        )
        self.audio_projection = nn.Sequential(
            nn.Linear(cfg["embed_dim"], EMBED_DIM), nn.ReLU(), nn.Linear(EMBED_DIM, EMBED_DIM)
        )
        self.fft_front_end = False
        self.register_buffer("fft_window", torch.empty(0), persistent=False)
        self.register_buffer("htk_filters", self._htk_filters(), persistent=False)  # [freq, mels]
        self._check_fft_front_end()
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._check_fft_front_end())
        self.freeze()

    @torch.no_grad()
    def _check_fft_front_end(self) -> None:
        """Use the FFT STFT when the conv kernels are exactly the windowed DFT (real = w·cos, imag =
        −w·sin, window = the DC row) with reflect-padded centring and power 2."""
        extractor = self.audio_branch.spectrogram_extractor
        stft = extractor.stft
        real = stft.conv_real.weight[:, 0, :].double()  # [n_fft/2 + 1, n_fft]
        imag = stft.conv_imag.weight[:, 0, :].double()
        n_fft = real.shape[-1]
        window = real[0]
        k = torch.arange(real.shape[0], dtype=torch.float64, device=real.device)[:, None]
        n = torch.arange(n_fft, dtype=torch.float64, device=real.device)[None, :]
        phase = 2 * torch.pi * torch.remainder(k * n, n_fft) / n_fft
        self.fft_front_end = bool(
            extractor.power == 2.0
            and stft.center
            and stft.pad_mode == "reflect"
            and real.shape[0] == n_fft // 2 + 1
            and torch.allclose(real, torch.cos(phase) * window, rtol=0, atol=1e-6)
            and torch.allclose(imag, -torch.sin(phase) * window, rtol=0, atol=1e-6)
        )
        self.fft_window = window.float() if self.fft_front_end else torch.empty(0, device=real.device)

    @property
    def fused(self) -> bool:
        return self.fusion_type != "None"

    def front_end_settings(self) -> dict[str, Any]:
        """What decides this encoder's input features (hashed into encoder_id's `#fe=`)."""
        cfg = self.audio_cfg
        return {
            "backend": "laion-clap",
            "truncation": "fusion" if self.fused else "rand_trunc",
            "fusion_type": self.fusion_type,
            "padding": "repeatpad",
            "sampling_rate": cfg.sample_rate,
            "max_samples": CLAP_SAMPLES,
            "n_fft": cfg.window_size,
            "hop": cfg.hop_size,
            "n_mels": cfg.mel_bins,
            "f_min": cfg.fmin,
            "f_max": cfg.fmax,
        }

    def _htk_filters(self) -> torch.Tensor:
        """torchaudio's MelSpectrogram bank as laion-clap's `get_mel` builds it (HTK, norm None);
        transformers' `mel_filter_bank` computes the same triangles: [n_fft/2 + 1, mel_bins]."""
        from transformers.audio_utils import mel_filter_bank

        cfg = self.audio_cfg
        bank = mel_filter_bank(
            num_frequency_bins=cfg.window_size // 2 + 1,
            num_mel_filters=cfg.mel_bins,
            min_frequency=cfg.fmin,
            max_frequency=cfg.fmax,
            sampling_rate=cfg.sample_rate,
            norm=None,
            mel_scale="htk",
        )
        return torch.from_numpy(bank).float()

    def fusion_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """laion-clap's `get_mel`: [B, samples] -> HTK log-mel in dB [B, frames, mel_bins] (fp32)."""
        window = torch.hann_window(self.audio_cfg.window_size, periodic=True, device=waveform.device)
        power = power_spectrogram(waveform.float(), window, self.audio_cfg.hop_size)
        return 10.0 * torch.log10((power @ self.htk_filters).clamp(min=1e-10))

    def fusion_input(self, clip: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """One clip [n] -> (mel_fusion [4, 1001, mel_bins], longer), as get_audio_features makes it."""
        if clip.shape[0] <= CLAP_SAMPLES:
            return self.fusion_mel(fill_clip(clip, CLAP_SAMPLES)[None]).expand(4, -1, -1), False
        mel = self.fusion_mel(clip[None])[0]  # [total, mel_bins]
        chunk = CLAP_SAMPLES // self.audio_cfg.hop_size + 1
        if mel.shape[0] == chunk:
            return mel.expand(4, -1, -1), False
        starts = fusion_crop_starts(mel.shape[0], chunk)
        shrunk = F.interpolate(
            mel[None, None], size=[chunk, self.audio_cfg.mel_bins], mode="bilinear", align_corners=False, antialias=True
        )[0, 0]
        return torch.stack([shrunk, *(mel[s : s + chunk] for s in starts)]), True

    def power_spectrogram(self, waveform: torch.Tensor) -> torch.Tensor:
        """|STFT|² of 48 kHz mono [B, samples] -> [B, 1, frames, n_fft/2 + 1], as laion-clap's
        `spectrogram_extractor` computes it (FFT when the kernels allow; see the class docstring)."""
        if not self.fft_front_end:
            return self.audio_branch.spectrogram_extractor(waveform)
        stft = self.audio_branch.spectrogram_extractor.stft
        return power_spectrogram(waveform, self.fft_window, stft.hop_length)[:, None]

    def freeze(self) -> ClapAudioEncoder:
        self.eval()
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> ClapAudioEncoder:
        """Always stays in eval mode (no SpecAugment, frozen batch-norm statistics)."""
        return super().train(False)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """48 kHz mono [B, samples] -> unit-norm embeddings [B, 512] (float32 when autocast is off).

        Any length: rows (their first `lengths[b]` samples when given) are filled or cut as
        laion-clap's get_audio_embedding_from_data does (repeatpad; see the module docstring for
        clips over 10 s). The pipeline's [B, 480000] windows go straight through."""
        if self.fused:
            return self._forward_fused(waveform, lengths)
        if lengths is not None or waveform.shape[-1] != CLAP_SAMPLES:
            waveform = torch.stack([fill_clip(clip, CLAP_SAMPLES) for clip in clips(waveform, lengths)])
        branch = self.audio_branch
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            spec = self.power_spectrogram(waveform.float())  # [B, 1, frames, freq bins]
            mel = branch.logmel_extractor(spec)  # [B, 1, frames, mel bins]
        # The rest of HTSAT_Swin_Transformer.forward for enable_fusion=False in eval mode.
        x = branch.bn0(mel.transpose(1, 3)).transpose(1, 3)
        x = branch.reshape_wav2img(x)
        features = branch.forward_features(x)["embedding"]
        return F.normalize(self.audio_projection(features).float(), dim=-1)

    def _forward_fused(self, waveform: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """The fused branch through laion-clap's own HTSAT forward (eval), our fp32 mel_fusion."""
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            if lengths is None and waveform.shape[-1] == CLAP_SAMPLES:
                mel_fusion = self.fusion_mel(waveform)[:, None].expand(-1, 4, -1, -1)
                longer = torch.zeros(waveform.shape[0], 1, dtype=torch.bool, device=waveform.device)
            else:
                pairs = [self.fusion_input(clip) for clip in clips(waveform, lengths)]
                mel_fusion = torch.stack([mel for mel, _ in pairs])
                longer = torch.tensor([[flag] for _, flag in pairs], dtype=torch.bool, device=waveform.device)
        out = self.audio_branch({"mel_fusion": mel_fusion, "longer": longer}, device=waveform.device)
        return F.normalize(self.audio_projection(out["embedding"]).float(), dim=-1)


def audio_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The audio-tower tensors of a laion-clap checkpoint: accepts a raw state dict or
    {"state_dict": ...}, strips DataParallel's `module.` prefix, drops the text branch."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise CheckpointError("checkpoint is not a state dict (nor a dict with 'state_dict')")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name.startswith(AUDIO_PREFIXES) and isinstance(value, torch.Tensor):
            out[name] = value
    return out


def read_audio_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The audio tensors of a laion-clap checkpoint file (torch.load with weights_only=True)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling refusal, a truncated file, not a torch file...
        raise CheckpointError(f"cannot load {path} with weights_only=True: {type(exc).__name__}: {exc}") from exc
    return audio_state_dict(checkpoint)


def load_weights(encoder: ClapAudioEncoder, path: str | Path, state: Mapping[str, torch.Tensor] | None = None) -> None:
    """Load laion-clap checkpoint weights (`state`, or read from `path`) into `encoder`."""
    state = read_audio_state(path) if state is None else state
    found = fusion_type_of(state)
    if found != encoder.fusion_type:
        raise CheckpointError(
            f"{path} is a laion-clap checkpoint with fusion {found!r}, "
            f"the encoder was built with {encoder.fusion_type!r}"
        )
    expected = encoder.state_dict()
    missing = sorted(k for k in expected if k not in state)
    if missing:
        shown = ", ".join(missing[:12]) + (f" (+{len(missing) - 12} more)" if len(missing) > 12 else "")
        raise CheckpointError(
            f"{path} lacks {len(missing)} audio key(s) of {encoder.amodel}: {shown}. "
            "Is encoder.amodel right for this checkpoint?"
        )
    mismatched = [k for k in expected if state[k].shape != expected[k].shape]
    if mismatched:
        k = mismatched[0]
        raise CheckpointError(
            f"{path}: {len(mismatched)} tensor shape(s) differ from {encoder.amodel}, e.g. {k}: "
            f"checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        )
    encoder.load_state_dict({k: state[k] for k in expected}, strict=True)
