"""Encoder: laion-clap checkpoints load as they are; embeddings equal laion-clap's own CLAP path."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.encoders.base import CheckpointError, ClapView
from pipeline.encoders.laion import import_laion_clap
from pipeline.encoders.load import load_encoder


@pytest.fixture(scope="module")
def laion_clap_model(tiny_encoder):
    """laion-clap's full CLAP (transformer text tower: needs no hub) with the tiny encoder's weights."""
    factory, _, _ = import_laion_clap()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        model, _ = factory.create_model("HTSAT-tiny", "transformer", precision="fp32")
    model.eval()
    result = model.load_state_dict(tiny_encoder.model.state_dict(), strict=False)
    assert not result.unexpected_keys
    return model


def test_embeddings_equal_laion_clap(tiny_encoder, laion_clap_model) -> None:
    g = torch.Generator().manual_seed(0)
    audio = (torch.rand(3, 480_000, generator=g) * 2 - 1) * torch.tensor([[0.9], [0.3], [0.05]])
    with torch.no_grad():
        reference = laion_clap_model.get_audio_embedding([{"waveform": w} for w in audio])
        ours = tiny_encoder.model(audio)
    assert ours.shape == (3, 512)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))
    assert torch.nn.functional.cosine_similarity(ours, reference).min().item() >= 0.9999


def test_frozen_and_gradient_reaches_waveform(tiny_encoder) -> None:
    model = tiny_encoder.model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training
    x = (torch.rand(1, 480_000) * 0.2).requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_fft_front_end_equals_laion_clap_conv_stft(tiny_encoder) -> None:
    """The FFT STFT gives laion-clap's Conv1d power spectrogram and the same gradient."""
    model = tiny_encoder.model
    assert model.fft_front_end
    g = torch.Generator().manual_seed(3)
    audio = (torch.rand(2, 480_000, generator=g) * 2 - 1) * 0.5
    fft_in = audio.clone().requires_grad_(True)
    conv_in = audio.clone().requires_grad_(True)
    fft = model.power_spectrogram(fft_in)
    conv = model.audio_branch.spectrogram_extractor(conv_in)
    assert fft.shape == conv.shape == (2, 1, 1001, 513)
    assert ((fft - conv).abs().max() / conv.abs().max()).item() < 1e-5
    weights = torch.rand(conv.shape, generator=g)
    (fft * weights).sum().backward()
    (conv * weights).sum().backward()
    assert ((fft_in.grad - conv_in.grad).abs().max() / conv_in.grad.abs().max()).item() < 1e-4


def test_checkpoint_with_other_stft_kernels_keeps_the_conv(tmp_path: Path, tiny_encoder) -> None:
    """A checkpoint whose STFT kernels are not the windowed DFT is computed with its own kernels."""
    state = dict(tiny_encoder.model.state_dict())
    key = "audio_branch.spectrogram_extractor.stft.conv_real.weight"
    state[key] = state[key] * 1.01
    path = tmp_path / "odd-stft.pt"
    torch.save(state, path)
    loaded = load_encoder(str(path), "HTSAT-tiny", device="cpu")
    assert not loaded.model.fft_front_end
    x = torch.rand(1, 480_000) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model.power_spectrogram(x), loaded.model.audio_branch.spectrogram_extractor(x)
        )
    loaded.model.load_state_dict(tiny_encoder.model.state_dict())  # plain kernels again: FFT again
    assert loaded.model.fft_front_end


def test_random_weights_are_deterministic(tiny_encoder) -> None:
    again = load_encoder("random:HTSAT-tiny:0", device="cpu")
    other = load_encoder("random:HTSAT-tiny:1", device="cpu")
    key = "audio_projection.0.weight"
    assert torch.equal(again.model.state_dict()[key], tiny_encoder.model.state_dict()[key])
    assert not torch.equal(other.model.state_dict()[key], tiny_encoder.model.state_dict()[key])
    assert tiny_encoder.is_random and tiny_encoder.encoder_id == "random:HTSAT-tiny:0"


def _full_checkpoint(tiny_encoder, laion_clap_model) -> dict:
    """A checkpoint as laion-clap training writes it: DataParallel keys, text branch included."""
    state = {f"module.{k}": v for k, v in laion_clap_model.state_dict().items()}
    return {"epoch": 3, "name": "test", "state_dict": state}


@pytest.mark.parametrize("layout", ["wrapped", "raw", "raw_module_prefix"])
def test_loads_checkpoint_layouts(tmp_path: Path, tiny_encoder, laion_clap_model, layout: str) -> None:
    full = _full_checkpoint(tiny_encoder, laion_clap_model)
    if layout == "raw":
        payload = {k.removeprefix("module."): v for k, v in full["state_dict"].items()}
    elif layout == "raw_module_prefix":
        payload = full["state_dict"]
    else:
        payload = full
    path = tmp_path / "clap.pt"
    torch.save(payload, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_encoder(str(path), "HTSAT-tiny", sha256=digest, device="cpu")
    assert not loaded.is_random and loaded.encoder_id.startswith(f"HTSAT-tiny@sha256:{digest[:12]}#fe=")
    x = torch.rand(1, 480_000) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), tiny_encoder.model(x))


def test_file_url_and_cache(tmp_path: Path, tiny_encoder) -> None:
    path = tmp_path / "w.pt"
    torch.save(tiny_encoder.model.state_dict(), path)
    loaded = load_encoder(f"file://{path}", "HTSAT-tiny", device="cpu", cache_dir=str(tmp_path / "cache"))
    assert not loaded.is_random


def test_sha256_pin_mismatch_fails(tmp_path: Path, tiny_encoder) -> None:
    path = tmp_path / "w.pt"
    torch.save(tiny_encoder.model.state_dict(), path)
    with pytest.raises(CheckpointError, match="sha256"):
        load_encoder(str(path), "HTSAT-tiny", sha256="0" * 64, device="cpu")


def test_missing_audio_keys_are_listed(tmp_path: Path, tiny_encoder) -> None:
    state = {k: v for k, v in tiny_encoder.model.state_dict().items() if not k.startswith("audio_projection")}
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"lacks 4 audio key\(s\).*audio_projection\.0\.bias"):
        load_encoder(str(path), "HTSAT-tiny", device="cpu")


def test_wrong_architecture_is_explained(tmp_path: Path, tiny_encoder) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny_encoder.model.state_dict(), path)
    with pytest.raises(CheckpointError, match="HTSAT-base"):
        load_encoder(str(path), "HTSAT-base", device="cpu")


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    """weights_only=True: a checkpoint carrying arbitrary objects is never unpickled."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_encoder(str(path), "HTSAT-tiny", device="cpu")
    assert not marker.exists()


def test_missing_file_and_bad_spec() -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder("/nonexistent/clap.pt", "HTSAT-tiny", device="cpu")
    with pytest.raises(CheckpointError, match="random:AMODEL:SEED"):
        load_encoder("random:HTSAT-tiny", device="cpu")


def test_view_repeat_pads_like_laion_clap() -> None:
    rate = 48_000
    x = torch.rand(1, 2, 100_000) * 0.5
    view = ClapView(rate)(x, torch.tensor([100_000]))
    mono = x.mean(dim=1)[0].numpy()
    expected = np.pad(np.tile(mono, 4), (0, 80_000))  # laion-clap: repeat int(480000/n) times, then zeros
    np.testing.assert_allclose(view[0].numpy(), expected, atol=1e-6)


def test_view_resamples_to_48k() -> None:
    rate = 16_000
    t = torch.arange(160_000) / rate
    x = torch.sin(2 * torch.pi * 1000 * t)[None, None]
    view = ClapView(rate)(x, torch.tensor([160_000]))
    assert view.shape == (1, 480_000)
    spectrum = torch.fft.rfft(view[0, 10_000:-10_000]).abs()
    peak_hz = spectrum.argmax().item() * 48_000 / (480_000 - 20_000)
    assert abs(peak_hz - 1000) < 5


def test_emulated_precision_note(monkeypatch) -> None:
    from pipeline.encoders import load as encoder

    cpu = torch.device("cpu")
    monkeypatch.setattr(encoder, "native_low_precision", lambda device: False)
    note = encoder.emulated_precision_note(cpu, "bf16")
    assert note.startswith("bf16 on cpu has no hardware support") and "emulated" in note
    assert torch.backends.cpu.get_cpu_capability() in note
    assert encoder.emulated_precision_note(cpu, "fp32") == ""  # fp32 is never emulated
    monkeypatch.setattr(encoder, "native_low_precision", lambda device: True)
    assert encoder.emulated_precision_note(cpu, "bf16") == ""


@pytest.mark.parametrize("mode", ["repeatpad", "repeat", "pad"])
def test_fill_clip_matches_laion_clap(tiny_encoder, mode: str) -> None:
    """encoder.fill_clip fills a short clip as laion-clap's get_audio_features does."""
    from laion_clap.training.data import get_audio_features

    from pipeline.encoders.base import fill_clip

    clip = torch.rand(100_003) - 0.5
    sample = get_audio_features({}, clip, 480_000, "rand_trunc", mode, {})
    torch.testing.assert_close(fill_clip(clip, 480_000, mode), sample["waveform"], atol=0, rtol=0)


def test_fusion_crop_starts_are_the_middle_of_each_third() -> None:
    from pipeline.encoders.base import fusion_crop_starts

    thirds = np.array_split(np.arange(2501 - 1001 + 1), 3)  # a 25 s clip: 2501 frames
    assert fusion_crop_starts(2501, 1001) == tuple(int(t[len(t) // 2]) for t in thirds) == (250, 751, 1251)
    assert fusion_crop_starts(1002, 1001) == (0, 1, 0)  # empty thirds fall back to 0, as the libraries do
