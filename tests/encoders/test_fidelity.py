"""Encoder fidelity (issue 16): each checkpoint, saved in its real format with tiny random weights,
embeds as its own library embeds it, for a matrix of front ends × clip lengths × input rates.

References are the libraries' own code paths: transformers' `ClapFeatureExtractor` (from the saved
`preprocessor_config.json`) + `ClapModel.get_audio_features` (from the saved folder); laion-clap's
`CLAP_Module.get_audio_embedding_from_data(use_tensor=True)` (its `get_audio_features`, its HTSAT
forward). 44.1 kHz input goes to the libraries through librosa's resampler (laion-clap's README
path, `librosa.load(sr=48000)`), to ours through `ClapView` (julius). The libraries' random draws
(rand_trunc's crop, fusion's three crops) are pinned to the deterministic choices the encoders make
(`library_draws_pinned`). laion-clap's fusion front end needs torchaudio, which does not install
beside this torch: without it, `TORCHAUDIO_SHIM` (torchaudio's MelSpectrogram / AmplitudeToDB,
transcribed) stands in; with the real torchaudio 2.11 on the path the same tests pass.
"""

from __future__ import annotations

import contextlib
import functools
import json
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.demo import synthesize
from pipeline.encoders.base import CheckpointError, ClapView
from pipeline.encoders.laion import ClapAudioEncoder, fusion_type_of
from pipeline.encoders.load import load_encoder

COSINE = 0.9995
SECONDS = (4, 10, 25)
RATES = (44_100, 48_000)
HF_CASES = {
    # transformers' own defaults, but rand_trunc: its default `fusion` cannot run on an unfused tower
    "hf-defaults": (False, {"truncation": "rand_trunc"}),
    # what released CLAP processors save (the issue's case: cosine 0.981 before)
    "hf-fmin50": (False, {"truncation": "rand_trunc", "frequency_min": 50, "frequency_max": 14_000}),
    # a fused tower with ClapFeatureExtractor() exactly as constructed (truncation fusion, HTK filters)
    "hf-fused": (True, {}),
}


@functools.cache
def music(seconds: float, rate: int) -> np.ndarray:
    """A music-like mono clip whose harmony and tempo change every 2.5 s (so crops differ), [n]."""
    parts = [
        synthesize(2.5, rate, 1, 90 + 15 * i, 110.0 * 2 ** ((i % 7) / 12 * 5), seed=i)[:, 0]
        for i in range(int(np.ceil(seconds / 2.5)))
    ]
    return np.concatenate(parts)[: round(seconds * rate)].astype(np.float32)


@functools.cache
def library_48k(seconds: float, rate: int) -> np.ndarray:
    """`music` resampled by the libraries' side (cached: the matrix reuses each clip)."""
    return to_48k(music(seconds, rate), rate)


@functools.cache
def ours_48k_of(seconds: float, rate: int) -> torch.Tensor:
    """`music` through our side (cached: julius takes ~1 s per 25 s at 44.1 kHz on one core)."""
    return ours_48k(music(seconds, rate), rate)


def to_48k(audio: np.ndarray, rate: int) -> np.ndarray:
    """The libraries' side of resampling: librosa (soxr), as laion-clap's README loads audio."""
    if rate == 48_000:
        return audio
    import librosa

    # librosa rounds the length up (ceil of a float ratio): 10 s at 44.1 kHz -> 480,001 samples,
    # which both libraries would treat as longer than 10 s. Keep the exact duration.
    exact = audio.shape[0] * 48_000 // rate
    return librosa.resample(audio, orig_sr=rate, target_sr=48_000)[:exact].astype(np.float32)


def ours_48k(audio: np.ndarray, rate: int) -> torch.Tensor:
    """Our side: ClapView's mono + julius resampling of the whole clip, [1, samples at 48 kHz]."""
    with torch.no_grad():
        return ClapView(rate, full_track=True)(torch.from_numpy(audio)[None, None])


@contextlib.contextmanager
def library_draws_pinned() -> Iterator[None]:
    """The libraries' random crop choices pinned to the encoders' deterministic ones: rand_trunc's
    `np.random.randint(0, overflow + 1)` -> 0 (the first 10 s), fusion's `np.random.choice(third)`
    -> the middle of each third (encoder.fusion_crop_starts)."""
    randint, choice = np.random.randint, np.random.choice
    np.random.randint = lambda low, *args, **kwargs: low  # type: ignore[assignment]
    np.random.choice = lambda a, *args, **kwargs: a[len(a) // 2]  # type: ignore[assignment]
    try:
        yield
    finally:
        np.random.randint, np.random.choice = randint, choice


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float(), b.float()).item()


# --- transformers ------------------------------------------------------------------------------


def save_hf_checkpoint(folder: Path, fused: bool, processor: dict | None, seed: int = 0) -> None:
    """A tiny random `ClapModel` (text half included) and its extractor, as save_pretrained writes them."""
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig

    from pipeline.encoders.hf import HF_AUDIO_PRESETS

    config = ClapConfig(
        text_config=ClapTextConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=100
        ).to_dict(),
        audio_config=ClapAudioConfig(enable_fusion=fused, **HF_AUDIO_PRESETS["tiny"]).to_dict(),
        projection_dim=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ClapModel(config).save_pretrained(folder)
    if processor is not None:
        ClapFeatureExtractor(**processor).save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory) -> dict[str, tuple[object, object, object]]:
    """case -> (reference ClapModel, reference extractor, our LoadedEncoder), all from disk."""
    from transformers import ClapFeatureExtractor, ClapModel

    out = {}
    for case, (fused, processor) in HF_CASES.items():
        folder = tmp_path_factory.mktemp(case)
        save_hf_checkpoint(folder, fused, processor)
        reference = ClapModel.from_pretrained(folder).eval()
        extractor = ClapFeatureExtractor.from_pretrained(folder)
        out[case] = (reference, extractor, load_encoder(f"hf:{folder}", device="cpu"))
    return out


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("seconds", SECONDS)
@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_embeds_like_transformers(hf_checkpoints, case: str, seconds: int, rate: int) -> None:
    reference, extractor, loaded = hf_checkpoints[case]
    with library_draws_pinned():
        inputs = extractor(library_48k(seconds, rate), sampling_rate=48_000, return_tensors="pt")
    x = ours_48k_of(seconds, rate)
    with torch.no_grad():
        expected = reference.get_audio_features(**inputs)
        expected = getattr(expected, "pooler_output", expected)
        features, is_longer = loaded.model.inputs(x)
        ours = loaded.model(x)
    assert torch.equal(is_longer, inputs["is_longer"])
    if rate == 48_000:  # same samples on both sides: the features themselves agree (dB)
        torch.testing.assert_close(features, inputs["input_features"].float(), atol=1e-2, rtol=0)
    value = cosine(ours, expected)
    print(f"fidelity {case} {seconds}s {rate}Hz cosine={value:.6f} 1-cos={1 - value:.1e}")
    assert value >= COSINE


@pytest.mark.parametrize("padding", ["repeat", "pad"])
def test_hf_padding_modes(tmp_path: Path, padding: str) -> None:
    """Short clips are filled as the saved `padding` says, given their real length."""
    from transformers import ClapFeatureExtractor

    save_hf_checkpoint(tmp_path, False, {"truncation": "rand_trunc", "padding": padding, "frequency_min": 50})
    loaded = load_encoder(f"hf:{tmp_path}", device="cpu")
    audio = music(4, 48_000)
    inputs = ClapFeatureExtractor.from_pretrained(tmp_path)(audio, sampling_rate=48_000, return_tensors="pt")
    features = loaded.model.features(torch.from_numpy(audio)[None], torch.tensor([audio.shape[0]]))
    torch.testing.assert_close(features, inputs["input_features"].float(), atol=1e-2, rtol=0)


def test_processor_settings_reach_encoder_id(tmp_path: Path) -> None:
    """Same weights, different processors: different encoder_id; the digest is stable."""
    save_hf_checkpoint(tmp_path / "a", False, {"truncation": "rand_trunc"})
    save_hf_checkpoint(tmp_path / "b", False, {"truncation": "rand_trunc", "frequency_min": 50})
    a = load_encoder(f"hf:{tmp_path / 'a'}", device="cpu")
    b = load_encoder(f"hf:{tmp_path / 'b'}", device="cpu")
    assert a.encoder_id.startswith(f"hf:{tmp_path / 'a'}#fe=") and len(a.encoder_id.rsplit("=", 1)[1]) == 8
    assert a.encoder_id.rsplit("#", 1)[1] != b.encoder_id.rsplit("#", 1)[1]
    assert load_encoder(f"hf:{tmp_path / 'a'}", device="cpu").encoder_id == a.encoder_id


def test_diffusers_layout_finds_sibling_feature_extractor(tmp_path: Path) -> None:
    """MusicLDM's pipeline folder: text_encoder/ (ClapModel) beside feature_extractor/."""
    from transformers import ClapFeatureExtractor

    save_hf_checkpoint(tmp_path / "text_encoder", False, None)
    ClapFeatureExtractor(truncation="rand_trunc", frequency_min=50).save_pretrained(tmp_path / "feature_extractor")
    loaded = load_encoder(f"hf:{tmp_path / 'text_encoder'}", device="cpu")
    assert loaded.model.front_end.f_min == 50.0


@pytest.mark.parametrize(
    ("fused", "processor", "message"),
    [
        (False, None, "has no preprocessor_config.json"),
        (False, {}, "truncation: 'fusion' makes 4-channel features, but the audio tower is unfused"),
        (False, {"truncation": "rand_trunc", "padding": "reflect"}, "padding: 'reflect' is not one of"),
        (False, {"truncation": "head"}, "truncation: 'head' is not one of"),
        (False, {"truncation": "rand_trunc", "top_db": 80}, "top_db: 80"),
        (False, {"truncation": "rand_trunc", "frequency_max": 30_000}, "frequency_min/max"),
        (False, {"truncation": "rand_trunc", "max_length_s": 30}, "exceed the tower"),
        (True, {"feature_size": 32}, "feature_size: 'fusion' needs 64 mel bins"),
    ],
)
def test_unhonourable_hf_checkpoints_fail_at_load(tmp_path: Path, fused: bool, processor, message: str) -> None:
    save_hf_checkpoint(tmp_path, fused, processor)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        load_encoder(f"hf:{tmp_path}", device="cpu")


def test_ignored_setting_that_disagrees_fails(tmp_path: Path) -> None:
    save_hf_checkpoint(tmp_path, False, {"truncation": "rand_trunc"})
    path = tmp_path / "preprocessor_config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "nb_max_samples": 160_000}))
    with pytest.raises(CheckpointError, match="nb_max_samples: 160000 disagrees"):
        load_encoder(f"hf:{tmp_path}", device="cpu")


def test_a_protect_run_refuses_an_unhonourable_checkpoint_before_touching_storage(tmp_path: Path) -> None:
    """The driver's pre-flight: the run stops before listing input or creating the output folder."""
    from pipeline.config import config_from_dict
    from pipeline.stages.pipeline import run

    save_hf_checkpoint(tmp_path / "model", False, {"truncation": "rand_trunc", "padding": "reflect"})
    cfg = config_from_dict(
        {
            "io": {"input": str(tmp_path / "missing-input"), "output": str(tmp_path / "out")},
            "encoder": {"checkpoint": f"hf:{tmp_path / 'model'}", "device": "cpu"},
        }
    )
    with pytest.raises(CheckpointError, match="padding: 'reflect' is not one of"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_hf_gradient_reaches_the_whole_fused_track(hf_checkpoints) -> None:
    """fusion sees all of a 12 s clip (gradient in its last second); rand_trunc only its first 10 s."""
    for case, reaches_end in (("hf-fused", True), ("hf-fmin50", False)):
        x = torch.from_numpy(music(12, 48_000))[None].requires_grad_(True)
        hf_checkpoints[case][2].model(x).sum().backward()
        assert x.grad[0, :480_000].abs().sum() > 0
        assert (x.grad[0, -48_000:].abs().sum() > 0) == reaches_end, case


# --- laion-clap --------------------------------------------------------------------------------


def _mel_fbanks_htk(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> torch.Tensor:
    """torchaudio.functional.melscale_fbanks(norm=None, mel_scale="htk"), transcribed: [n_freqs, n_mels]."""
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    m_min, m_max = (2595.0 * np.log10(1.0 + f / 700.0) for f in (f_min, f_max))
    m_pts = torch.linspace(m_min, m_max, n_mels + 2)
    f_pts = 700.0 * (10 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)
    down = (-1.0 * slopes[:, :-2]) / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.max(torch.zeros(1), torch.min(down, up))


class _MelSpectrogram(torch.nn.Module):
    """torchaudio.transforms.MelSpectrogram for the arguments laion-clap's get_mel passes."""

    def __init__(self, sample_rate, n_fft, win_length, hop_length, f_min, f_max, n_mels, **kwargs):
        super().__init__()
        assert kwargs["center"] and kwargs["pad_mode"] == "reflect" and kwargs["power"] == 2.0
        assert kwargs["norm"] is None and win_length == n_fft
        self.n_fft, self.hop = n_fft, hop_length
        self.fb = _mel_fbanks_htk(n_fft // 2 + 1, f_min, f_max, n_mels, sample_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = torch.hann_window(self.n_fft)
        spec = torch.stft(x, self.n_fft, self.hop, self.n_fft, window, center=True, return_complex=True)
        return (spec.abs().pow(2.0).transpose(-1, -2) @ self.fb).transpose(-1, -2)


class _AmplitudeToDB(torch.nn.Module):
    def __init__(self, top_db=None):
        super().__init__()
        assert top_db is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 * torch.log10(torch.clamp(x, min=1e-10))  # stype power, ref 1.0, amin 1e-10


TORCHAUDIO_SHIM = types.SimpleNamespace(
    transforms=types.SimpleNamespace(MelSpectrogram=_MelSpectrogram, AmplitudeToDB=_AmplitudeToDB)
)


class _AudioOnlyCLAP(torch.nn.Module):
    """laion-clap's CLAP with only its audio half: its own get_audio_embedding / encode_audio."""

    def __init__(self, encoder: ClapAudioEncoder):
        from laion_clap.clap_module.model import CLAP

        super().__init__()
        self.audio_branch, self.audio_projection = encoder.audio_branch, encoder.audio_projection
        self.get_audio_embedding = types.MethodType(CLAP.get_audio_embedding, self)
        self.encode_audio = types.MethodType(CLAP.encode_audio, self)


def laion_reference(encoder: ClapAudioEncoder, monkeypatch) -> types.SimpleNamespace:
    """A stand-in `self` for CLAP_Module.get_audio_embedding_from_data: its model, cfg and flag."""
    import laion_clap
    from laion_clap.clap_module import factory
    from laion_clap.training import data

    if data.torchaudio is None:
        monkeypatch.setattr(data, "torchaudio", TORCHAUDIO_SHIM)
    module = types.SimpleNamespace(
        model=_AudioOnlyCLAP(encoder),
        model_cfg=factory._MODEL_CONFIGS[encoder.amodel],
        enable_fusion=encoder.fused,
    )
    module.embed = lambda x: laion_clap.CLAP_Module.get_audio_embedding_from_data(module, x, use_tensor=True)
    return module


@pytest.fixture(scope="module")
def fused_encoder(tmp_path_factory):
    """A random HTSAT-tiny aff_2d (the 630k fusion releases' kind), saved as laion-clap training
    writes it and loaded back: fusion detected from its parameter names."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        built = ClapAudioEncoder("HTSAT-tiny", fusion_type="aff_2d")
    path = tmp_path_factory.mktemp("fused") / "630k-fusion-like.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in built.state_dict().items()}}, path)
    return load_encoder(str(path), "HTSAT-tiny", device="cpu")


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("seconds", SECONDS)
@pytest.mark.parametrize("kind", ["laion-unfused", "laion-fused"])
def test_laion_embeds_like_laion_clap(request, monkeypatch, kind: str, seconds: int, rate: int) -> None:
    from laion_clap.training.data import get_audio_features

    encoder = request.getfixturevalue("fused_encoder" if kind == "laion-fused" else "tiny_encoder").model
    reference = laion_reference(encoder, monkeypatch)
    clip48 = torch.from_numpy(library_48k(seconds, rate))
    x = ours_48k_of(seconds, rate)
    with torch.no_grad(), library_draws_pinned():
        expected = reference.embed(clip48[None])
        sample = get_audio_features({}, clip48, 480_000, "fusion" if encoder.fused else "rand_trunc", "repeatpad",
                                    reference.model_cfg["audio_cfg"])  # fmt: skip
    with torch.no_grad():
        ours = encoder(x)
        if rate == 48_000 and encoder.fused:
            mel_fusion, longer = encoder.fusion_input(x[0])
            assert longer == bool(sample["longer"])
            torch.testing.assert_close(mel_fusion, sample["mel_fusion"], atol=1e-2, rtol=0)
    value = cosine(ours, expected)
    print(f"fidelity {kind} {seconds}s {rate}Hz cosine={value:.6f} 1-cos={1 - value:.1e}")
    assert value >= COSINE


def test_fused_checkpoint_detected_and_gradient_reaches_whole_track(fused_encoder) -> None:
    model = fused_encoder.model
    assert model.fused and model.fusion_type == "aff_2d"
    assert fused_encoder.encoder_id.startswith("HTSAT-tiny@sha256:") and "#fe=" in fused_encoder.encoder_id
    x = torch.from_numpy(music(12, 48_000))[None].requires_grad_(True)
    model(x).sum().backward()
    assert x.grad[0, -48_000:].abs().sum() > 0  # the last second counts: fusion saw the whole track
    window = (torch.rand(1, 480_000) * 0.2).requires_grad_(True)  # the pipeline's 10 s windows
    model(window).sum().backward()
    assert window.grad.abs().sum() > 0


def test_fusion_kinds_from_parameter_names(fused_encoder, tiny_encoder) -> None:
    fused = fused_encoder.model.state_dict()
    assert fusion_type_of(tiny_encoder.model.state_dict()) == "None"
    assert fusion_type_of(fused) == "aff_2d"
    assert fusion_type_of({k: v for k, v in fused.items() if ".fusion_model." not in k}) == "daf_2d"
    extra = {"audio_branch.patch_embed.fusion_model.local_att2.0.weight": torch.zeros(1)}
    assert fusion_type_of({**fused, **extra}) == "iaff_2d"
    channel_map = {"audio_branch.patch_embed.proj.weight": torch.zeros(96, 4, 4, 4)}
    assert fusion_type_of(channel_map) == "channel_map"
    with pytest.raises(CheckpointError, match="1-D fusion"):
        fusion_type_of({"audio_branch.mel_conv1d.0.weight": torch.zeros(1)})


def test_cosine_bar_is_discriminating(tiny_encoder, fused_encoder, monkeypatch) -> None:
    """The matrix's cosine bar would catch the issue's bug: a 25 s fused clip embedded by its first
    10 s only (what the pipeline did before) falls below it."""
    reference = laion_reference(fused_encoder.model, monkeypatch)
    clip = torch.from_numpy(music(25, 48_000))
    with torch.no_grad(), library_draws_pinned():
        expected = reference.embed(clip[None])
    with torch.no_grad():
        first_10s = fused_encoder.model(clip[None, :480_000])
    assert cosine(first_10s, expected) < COSINE


def test_cosine_bar_catches_the_issue_bug(hf_checkpoints) -> None:
    """The issue's bug, re-enacted: the same weights embedded with transformers' default range
    (frequency_min 0) instead of the saved processor's 50 Hz fall below the bar."""
    reference, extractor, _ = hf_checkpoints["hf-fmin50"]
    wrong = hf_checkpoints["hf-defaults"][2]  # same seed, same weights, frequency_min 0
    clip = library_48k(10, 48_000)
    with torch.no_grad():
        expected = reference.get_audio_features(**extractor(clip, sampling_rate=48_000, return_tensors="pt"))
        expected = getattr(expected, "pooler_output", expected)
        value = cosine(wrong.model(torch.from_numpy(clip)[None]), expected)
    print(f"fidelity wrong-front-end (frequency_min 0 vs 50) 10s cosine={value:.6f}")
    assert value < COSINE


def test_driver_preflight_refuses_before_any_shard(tmp_path: Path, fused_encoder) -> None:
    """check_configured_encoders: the front-end checks without building a tower."""
    from pipeline.config import EncoderConfig
    from pipeline.encoders.load import check_configured_encoders

    save_hf_checkpoint(tmp_path / "ok", False, {"truncation": "rand_trunc", "frequency_min": 50})
    save_hf_checkpoint(tmp_path / "bad", False, {"truncation": "rand_trunc", "padding": "mirror"})
    laion = tmp_path / "clap.pt"
    torch.save({"state_dict": dict(fused_encoder.model.state_dict())}, laion)
    cache = str(tmp_path / "cache")
    ok = EncoderConfig(checkpoint=f"hf:{tmp_path / 'ok'}", ensemble=(str(laion),), amodel="HTSAT-tiny", cache_dir=cache)
    check_configured_encoders(ok, None)
    with pytest.raises(CheckpointError, match="padding: 'mirror'"):
        check_configured_encoders(EncoderConfig(checkpoint=f"hf:{tmp_path / 'bad'}", cache_dir=cache), None)
    one_d = {"audio_branch.mel_conv1d.0.weight": torch.zeros(1), "audio_projection.0.weight": torch.zeros(1)}
    torch.save(one_d, tmp_path / "1d.pt")
    with pytest.raises(CheckpointError, match="1-D fusion"):
        check_configured_encoders(EncoderConfig(checkpoint=str(tmp_path / "1d.pt"), cache_dir=cache), None)


@pytest.mark.parametrize("seconds", [4, 25])
def test_hf_other_rate_hop_fft_and_padding(tmp_path: Path, seconds: int) -> None:
    """A processor that moves every remaining setting: 32 kHz, hop 400, FFT 2048, 20–12,000 Hz,
    padding `repeat`. Our encoder takes 48 kHz and resamples inside; the library gets librosa's 32 kHz."""
    import librosa
    from transformers import ClapFeatureExtractor, ClapModel

    processor = {
        "truncation": "rand_trunc",
        "padding": "repeat",
        "sampling_rate": 32_000,
        "hop_length": 400,
        "fft_window_size": 2048,
        "frequency_min": 20,
        "frequency_max": 12_000,
    }
    save_hf_checkpoint(tmp_path, False, processor, seed=1)
    loaded = load_encoder(f"hf:{tmp_path}", device="cpu")
    assert (loaded.model.front_end.max_samples, loaded.model.front_end.n_fft) == (320_000, 2048)
    clip48 = library_48k(seconds, 48_000)
    clip32 = librosa.resample(clip48, orig_sr=48_000, target_sr=32_000)[: clip48.shape[0] * 2 // 3]
    with library_draws_pinned():
        inputs = ClapFeatureExtractor.from_pretrained(tmp_path)(clip32, sampling_rate=32_000, return_tensors="pt")
    with torch.no_grad():
        expected = ClapModel.from_pretrained(tmp_path).eval().get_audio_features(**inputs)
        expected = getattr(expected, "pooler_output", expected)
        x = torch.from_numpy(clip48)[None]
        ours = loaded.model(x, torch.tensor([x.shape[-1]]))
    value = cosine(ours, expected)
    print(f"fidelity hf-32k-hop400-fft2048-repeat {seconds}s 48000Hz cosine={value:.6f}")
    assert value >= COSINE
