"""transformers CLAP backend: torch front end ≡ ClapFeatureExtractor; checkpoints; ensembles; transfer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.engine import PGDParams
from pipeline.core.protect import Track, TrackProtector
from pipeline.demo import synthesize
from pipeline.encoders.base import ClapView
from pipeline.encoders.checkpoints import CheckpointSpec
from pipeline.encoders.load import load_encoder


@pytest.fixture(scope="module")
def hf_encoder():
    return load_encoder("random:hf:tiny:0", device="cpu")


@pytest.mark.parametrize("seconds", [10, 4])
def test_embeddings_equal_transformers_pipeline(hf_encoder, seconds: int) -> None:
    from transformers import ClapFeatureExtractor

    extractor = ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad")
    audio = (np.random.default_rng(seconds).uniform(-1, 1, seconds * 48_000) * 0.3).astype(np.float32)
    inputs = extractor(audio, sampling_rate=48_000, return_tensors="pt")
    tower = hf_encoder.model.model
    with torch.no_grad():
        reference = torch.nn.functional.normalize(tower(**inputs).audio_embeds, dim=-1)
        x = torch.from_numpy(audio)[None, None]
        ours = hf_encoder.model(ClapView(48_000)(x, torch.tensor([audio.shape[0]])))
        features = hf_encoder.model.features(ClapView(48_000)(x, torch.tensor([audio.shape[0]])))
    torch.testing.assert_close(features, inputs["input_features"], atol=1e-3, rtol=1e-5)  # dB values
    assert torch.nn.functional.cosine_similarity(ours, reference).item() >= 0.9999


def test_full_clap_model_folder_loads_audio_half(tmp_path: Path) -> None:
    """A diffusers-style `ClapModel` folder (text half included) loads; embeddings match
    `ClapModel.get_audio_features`."""
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig

    from pipeline.encoders.hf import HF_AUDIO_PRESETS

    config = ClapConfig(
        text_config=ClapTextConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=100
        ).to_dict(),
        audio_config=ClapAudioConfig(enable_fusion=False, **HF_AUDIO_PRESETS["tiny"]).to_dict(),
        projection_dim=512,
    )
    torch.manual_seed(3)
    full = ClapModel(config).eval()
    full.save_pretrained(tmp_path / "text_encoder")
    extractor = ClapFeatureExtractor(truncation="rand_trunc")
    extractor.save_pretrained(tmp_path / "text_encoder")
    loaded = load_encoder(f"hf:{tmp_path / 'text_encoder'}", device="cpu")
    assert not loaded.is_random and loaded.encoder_id.startswith(f"hf:{tmp_path / 'text_encoder'}#fe=")
    audio = (np.random.default_rng(0).uniform(-1, 1, 480_000) * 0.2).astype(np.float32)
    inputs = extractor(audio, sampling_rate=48_000, return_tensors="pt")
    with torch.no_grad():
        reference = full.get_audio_features(**inputs)
        reference = getattr(reference, "pooler_output", reference)
        ours = loaded.model(torch.from_numpy(audio)[None])
    assert torch.nn.functional.cosine_similarity(ours, reference).item() >= 0.9999


def test_spec_forms() -> None:
    assert CheckpointSpec.parse("random:HTSAT-tiny:0") == CheckpointSpec("laion", "HTSAT-tiny", None, 0)
    assert CheckpointSpec.parse("random:laion:HTSAT-base:2") == CheckpointSpec("laion", "HTSAT-base", None, 2)
    assert CheckpointSpec.parse("random:hf:tiny:1") == CheckpointSpec("hf", "tiny", None, 1)
    assert CheckpointSpec.parse("hf:org/repo").backend == "hf"
    assert CheckpointSpec.parse("hf://org/repo/clap.pt").backend == "laion"  # a laion file on the hub
    assert CheckpointSpec.parse("laion:/m/clap.pt", "HTSAT-base").url == "/m/clap.pt"


def test_ensemble_reports_every_encoder(tiny_encoder, hf_encoder) -> None:
    track = Track("t", synthesize(2.0, 16_000, 1, 120, 220.0), 16_000, "FLOAT")
    params = PGDParams(0.003, 0.0006, 2, 0.00075)
    results = {}
    for objective in ("mean", "min"):
        protector = TrackProtector(
            [tiny_encoder, hf_encoder], params, batch_windows=2, ensemble=objective, perceptual="linf"
        )
        results[objective] = protector.protect([track])[0]
    for objective, result in results.items():
        assert not result.error
        assert set(result.delta_e_by_encoder) == {"random:HTSAT-tiny:0", "random:hf:tiny:0"}
        values = list(result.delta_e_by_encoder.values())
        expected = np.mean(values) if objective == "mean" else np.min(values)
        assert result.objective == pytest.approx(expected)
        assert result.delta_e_mean == result.delta_e_by_encoder["random:HTSAT-tiny:0"]
