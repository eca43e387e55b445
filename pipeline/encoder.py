"""Frozen CLAP audio encoder built from laion-clap's own HTSAT branch and audio projection (unfused
or fused, detected from the checkpoint's parameter names), its checkpoint loading (any fsspec URL
or hf://, sha256 pin, weights_only), and the differentiable 48 kHz mono view CLAP takes of a track.

Both backends embed a clip as their library does (`get_audio_embedding_from_data` here,
`ClapFeatureExtractor` + `get_audio_features` in hf_encoder), except that the library's random
choices are fixed: a clip longer than 10 s is cut to its first 10 s (rand_trunc), and fusion's three
crops start at the middle of each third of the possible starts (`fusion_crop_starts`). See
docs/encoders.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

CLAP_RATE = 48_000  # Hz
CLAP_SAMPLES = 480_000  # one 10 s window at 48 kHz
EMBED_DIM = 512
AUDIO_PREFIXES = ("audio_branch.", "audio_projection.")
PADDINGS = ("repeatpad", "repeat", "pad")
# laion-clap's fusion kinds its own eval path can run (1-D kinds fail there on clips <= 10 s).
FUSION_TYPES = ("aff_2d", "iaff_2d", "daf_2d", "channel_map")
RANDOM_WARNING = (
    "RANDOM CLAP WEIGHTS ({spec}): this encoder protects NOTHING. Its Δe figures only show that "
    "the machinery runs. Point encoder.checkpoint at a real laion-clap checkpoint for protection."
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be fetched, verified or loaded; the message says which and why."""


class AudioEmbedder(Protocol):
    """What the PGD side needs of an encoder: 48 kHz mono windows [B, 480000] -> unit vectors [B, D]."""

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class CheckpointSpec:
    """A parsed encoder spec: which backend, which weights.

    Forms (laion = laion-clap HTSAT checkpoints, hf = transformers `ClapModel`/`ClapAudioModelWithProjection`):

        random:HTSAT-tiny:0            random laion-clap weights (also random:laion:HTSAT-base:0)
        random:hf:tiny:0               random transformers CLAP audio tower (presets tiny, base)
        /models/clap.pt, s3://..., https://..., hf://org/repo/file.pt, laion:<any of these>
                                       a laion-clap checkpoint file (architecture from encoder.amodel)
        hf:org/repo, hf:/local/folder, hf:s3://bucket/folder
                                       a transformers CLAP folder (save_pretrained layout)

    Example::

        CheckpointSpec.parse("random:HTSAT-tiny:0").backend   # "laion"
        CheckpointSpec.parse("hf:/models/musicldm/text_encoder").backend   # "hf"
    """

    backend: str  # laion | hf
    amodel: str  # laion architecture (HTSAT-tiny, HTSAT-base) or hf preset (tiny, base)
    url: str | None = None  # None for random weights
    seed: int = 0

    @property
    def is_random(self) -> bool:
        return self.url is None

    @classmethod
    def parse(cls, spec: str, amodel: str = "HTSAT-base") -> CheckpointSpec:
        if not spec:
            raise CheckpointError("encoder.checkpoint is empty")
        if spec.startswith("random:"):
            parts = spec.split(":")[1:]
            if len(parts) == 2:
                parts = ["laion", *parts]
            if len(parts) != 3 or parts[0] not in ("laion", "hf") or not parts[2].lstrip("-").isdigit():
                raise CheckpointError(
                    f"random encoder spec must be random:AMODEL:SEED or random:laion|hf:AMODEL:SEED, got {spec!r}"
                )
            return cls(backend=parts[0], amodel=parts[1], url=None, seed=int(parts[2]))
        if spec.startswith("hf:") and not spec.startswith("hf://"):
            return cls(backend="hf", amodel="hf", url=spec[len("hf:") :])
        return cls(backend="laion", amodel=amodel, url=spec.removeprefix("laion:"))

    def __str__(self) -> str:
        if self.is_random:
            return (
                f"random:{self.backend}:{self.amodel}:{self.seed}"
                if self.backend == "hf"
                else (f"random:{self.amodel}:{self.seed}")
            )
        return f"hf:{self.url}" if self.backend == "hf" else f"{self.amodel}@{self.url}"


def import_laion_clap(hub_offline: bool = True) -> Any:
    """Import laion_clap's model factory. Its package import fetches tokenizers from the hub and
    retries for minutes offline, so HF_HUB_OFFLINE=1 is set first unless the caller opts in."""
    if hub_offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from laion_clap.clap_module import factory, htsat, model

    return factory, htsat, model


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


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_checkpoint(
    url: str,
    cache_dir: str,
    sha256: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Path:
    """Return a local path for `url` (local path, s3://, https://, hf://org/repo/file, any fsspec
    URL), downloading remote files once into `cache_dir`. Enforces the sha256 pin when given."""
    import fsspec

    if "://" not in url or url.startswith("file://"):
        local = Path(url.removeprefix("file://")).expanduser()
        if not local.is_file():
            raise CheckpointError(f"checkpoint file not found: {local}")
    else:
        if url.startswith("hf://") and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise CheckpointError(f"{url}: hf:// needs the hub, but HF_HUB_OFFLINE=1 (set encoder.hub_offline=false)")
        cache = Path(cache_dir).expanduser()
        cache.mkdir(parents=True, exist_ok=True)
        name = url.rstrip("/").rsplit("/", 1)[-1] or "checkpoint.pt"
        local = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
        if not local.is_file() or (sha256 and file_sha256(local) != sha256.lower()):
            options = dict(storage_options or {}) if url.startswith("s3://") else {}
            fd, tmp = tempfile.mkstemp(dir=cache, prefix=".partial-")
            try:
                with os.fdopen(fd, "wb") as out, fsspec.open(url, "rb", **options) as src:
                    shutil.copyfileobj(src, out, length=1 << 22)
                os.replace(tmp, local)
            except Exception as exc:
                Path(tmp).unlink(missing_ok=True)
                raise CheckpointError(f"cannot fetch checkpoint {url}: {type(exc).__name__}: {exc}") from exc
    if sha256:
        actual = file_sha256(local)
        if actual != sha256.lower():
            raise CheckpointError(f"checkpoint {url} has sha256 {actual}, but the pin is {sha256}")
    return local


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


@dataclass
class LoadedEncoder:
    """An encoder ready for PGD, with the identity recorded in manifests."""

    model: nn.Module  # ClapAudioEncoder or hf_encoder.HFClapAudioEncoder: [B, 480000] -> [B, 512]
    # "random:HTSAT-tiny:0", "HTSAT-base@sha256:<12 hex>#fe=<8 hex>", "hf:<folder>#fe=<8 hex>":
    # `#fe=` digests the front-end settings (front_end_digest), so different processors never look alike.
    encoder_id: str
    is_random: bool
    device: torch.device


def load_configured_encoder(
    cfg: Any, storage_options: Mapping[str, Any] | None, spec: str | None = None
) -> LoadedEncoder:
    """`load_encoder` with the settings of an EncoderConfig; `spec` (default cfg.checkpoint) picks
    one of its encoders. The sha256 pin applies to cfg.checkpoint only."""
    spec = spec or cfg.checkpoint
    return load_encoder(
        spec,
        cfg.amodel,
        sha256=cfg.sha256 if spec == cfg.checkpoint else None,
        cache_dir=cfg.cache_dir,
        hub_offline=cfg.hub_offline,
        device=cfg.device,
        storage_options=storage_options,
    )


def check_configured_encoders(cfg: Any, storage_options: Mapping[str, Any] | None) -> None:
    """Refuse, before any shard is read, an encoder (cfg.checkpoint and cfg.ensemble: an
    EncoderConfig) whose front end the code cannot reproduce, without building a tower: hf folders'
    config.json + processor config; laion files' fusion kind from their parameter names (a
    memory-mapped weights_only load: the checkpoint is fetched into the cache, where the workers
    find it). Raises CheckpointError saying what and why."""
    for spec in (cfg.checkpoint, *getattr(cfg, "ensemble", ())):
        parsed = CheckpointSpec.parse(spec, cfg.amodel)
        if parsed.is_random:
            continue
        assert parsed.url is not None
        if parsed.backend == "hf":
            from pipeline.hf_encoder import check_hf_checkpoint

            if cfg.hub_offline:
                os.environ["HF_HUB_OFFLINE"] = "1"
            try:
                check_hf_checkpoint(parsed.url, cfg.cache_dir, dict(storage_options or {}))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot load transformers CLAP from {parsed.url}: {exc}") from exc
            continue
        sha256 = cfg.sha256 if spec == cfg.checkpoint else None
        path = resolve_checkpoint(parsed.url, cfg.cache_dir, sha256, storage_options)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # not the zip format mmap needs (a legacy torch.save)
            if "mmap" not in str(exc):
                raise CheckpointError(f"cannot load {path} with weights_only=True: {exc}") from exc
            checkpoint = read_audio_state(path)
        except Exception as exc:
            raise CheckpointError(f"cannot load {path} with weights_only=True: {type(exc).__name__}: {exc}") from exc
        fusion_type_of(audio_state_dict(checkpoint))


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def native_low_precision(device: torch.device) -> bool:
    """Whether bf16/fp16 autocast runs in hardware on `device`. On a CPU without AVX-512 (an
    AVX2-only EPYC, say) oneDNN emulates bf16: an HTSAT step measured ~15× slower than fp32
    (docs/benchmarks.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True
    try:  # torch's own check (AVX-512 BW/VL/DQ or Arm bf16); private, hence the fallback
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def emulated_precision_note(device: torch.device, precision: str = "bf16") -> str:
    """Why `precision` (bf16/fp16) will be slow on `device`, or "" where it runs in hardware (and
    for fp32). Callers add their own advice (a config key, a CLI flag)."""
    if precision not in ("bf16", "fp16") or native_low_precision(device):
        return ""
    capability = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else device.type
    return (
        f"{precision} on {device} has no hardware support (CPU capability {capability}), so it is emulated "
        "and runs many times slower than fp32 (~15× measured on an AVX2 EPYC)"
    )


def load_encoder(
    spec: str,
    amodel: str = "HTSAT-base",
    *,
    sha256: str | None = None,
    cache_dir: str = "~/.cache/music-unlearnable/checkpoints",
    hub_offline: bool = True,
    device: str = "auto",
    storage_options: Mapping[str, Any] | None = None,
) -> LoadedEncoder:
    """Build the frozen audio encoder for a checkpoint spec (see CheckpointSpec) on `device`.

    Raises:
        CheckpointError: unknown model, unreachable/unpinned-mismatch/corrupt checkpoint, missing keys,
            a front end the code cannot reproduce (a processor setting, a fusion kind): all before
            any audio is touched.
    """
    parsed = CheckpointSpec.parse(spec, amodel)
    model: nn.Module
    if parsed.backend == "hf":
        from pipeline.hf_encoder import HFClapAudioEncoder, load_hf_encoder, random_hf_model

        if hub_offline:
            os.environ["HF_HUB_OFFLINE"] = "1"
        if parsed.is_random:
            model = HFClapAudioEncoder(random_hf_model(parsed.amodel, parsed.seed))
            encoder_id = str(parsed)
        else:
            assert parsed.url is not None
            try:
                model = load_hf_encoder(parsed.url, cache_dir, dict(storage_options or {}))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot load transformers CLAP from {parsed.url}: {exc}") from exc
            encoder_id = f"{parsed}#fe={model.front_end.digest}"
    elif parsed.is_random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(parsed.seed)
            model = ClapAudioEncoder(parsed.amodel, hub_offline)
        encoder_id = str(parsed)
    else:
        assert parsed.url is not None
        path = resolve_checkpoint(parsed.url, cache_dir, sha256, storage_options)
        state = read_audio_state(path)
        laion = ClapAudioEncoder(parsed.amodel, hub_offline, fusion_type=fusion_type_of(state))
        load_weights(laion, path, state)
        model = laion
        digest = sha256.lower() if sha256 else file_sha256(path)
        encoder_id = f"{parsed.amodel}@sha256:{digest[:12]}#fe={front_end_digest(laion.front_end_settings())}"
    if parsed.is_random:
        logger.warning(RANDOM_WARNING.format(spec=parsed))
    target = pick_device(device)
    model = model.to(target).freeze()
    return LoadedEncoder(model=model, encoder_id=encoder_id, is_random=parsed.is_random, device=target)
