"""Config: YAML + overrides -> one validated, frozen tree."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.config import (
    STRENGTH_MARGIN_DB,
    AttackConfig,
    ConfigError,
    PipelineConfig,
    config_from_dict,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "musicldm.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, PipelineConfig)


# What a deployment may set in its attack section: its hardware (precision) and time (steps).
DEPLOYMENT_ATTACK_KEYS = {"steps", "precision"}


@pytest.mark.parametrize("name", ["demo.yaml", "musicldm.yaml"])
def test_shipped_configs_inherit_the_attack_defaults(name: str) -> None:
    """One set of defaults: the code's AttackConfig is the recommended protection; profiles set
    only what their deployment needs (tests/test_k8s_manifests.py checks the k8s overlays)."""
    import yaml

    written = yaml.safe_load((ROOT / "configs" / name).read_text()).get("attack") or {}
    assert set(written) <= DEPLOYMENT_ATTACK_KEYS, f"{name} sets {sorted(set(written) - DEPLOYMENT_ATTACK_KEYS)}"
    cfg, default = load_config(ROOT / "configs" / name).attack, AttackConfig()
    for key in set(dataclasses.asdict(default)) - DEPLOYMENT_ATTACK_KEYS:
        assert getattr(cfg, key) == getattr(default, key), key


def test_default_attack_is_the_measured_protection() -> None:
    """The defaults docs/quality.md measures: spectral mode at strength 3 (3 dB under the masking
    threshold), ε as a hard cap, δ below CLAP's 14 kHz."""
    a = AttackConfig()
    assert (a.perceptual, a.strength, STRENGTH_MARGIN_DB[a.strength]) == ("spectral", 3, -3.0)
    assert a.passband_hz == 14000.0 and a.eps == 0.05
    assert sorted(STRENGTH_MARGIN_DB) == [1, 2, 3, 4, 5]
    margins = [STRENGTH_MARGIN_DB[k] for k in sorted(STRENGTH_MARGIN_DB)]
    assert margins == sorted(margins)  # a higher strength never means less budget
    with pytest.raises(ConfigError, match=r"attack\.strength"):
        config_from_dict({}, ["attack.strength=6"])
    with pytest.raises(ConfigError, match=r"attack\.perceptual"):
        config_from_dict({}, ["attack.perceptual=louder"])


def test_overrides_are_typed() -> None:
    cfg = config_from_dict({}, ["attack.steps=7", "attack.eps=0.002", "io.overwrite=true", "audio.extensions=wav,flac"])
    assert cfg.attack.steps == 7 and isinstance(cfg.attack.steps, int)
    assert cfg.attack.eps == 0.002
    assert cfg.io.overwrite is True
    assert cfg.audio.extensions == ("wav", "flac")


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = config_from_dict({"attack": {"steps": 3}, "io": {"storage": {"endpoint_url": "http://127.0.0.1:1"}}})
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [
        ({"atack": {}}, [], "unknown key"),
        ({"attack": {"epsilon": 1}}, [], "unknown key"),
        ({}, ["attack.steps=many"], "attack.steps"),
        ({}, ["attack.eps=2"], "attack.eps"),
        ({}, ["attack.precision=int8"], "attack.precision"),
        ({}, ["audio.on_error=ignore"], "audio.on_error"),
        ({}, ["audio.overlap_seconds=6"], "overlap"),
        ({}, ["steps"], "section.key=value"),
    ],
)
def test_invalid_configs_name_the_key(data: dict, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data, overrides)


def test_output_hash_tracks_attack_not_runtime() -> None:
    base = config_from_dict({})
    assert base.output_hash() == config_from_dict({}, ["runtime.num_actors=4", "encoder.device=cpu"]).output_hash()
    assert base.output_hash() != config_from_dict({}, ["attack.eps=0.001"]).output_hash()


def test_storage_options_hold_no_credentials() -> None:
    cfg = config_from_dict({"io": {"storage": {"endpoint_url": "http://127.0.0.1:8333", "addressing_style": "path"}}})
    options = cfg.io.storage.storage_options()
    assert options["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:8333"
    assert "key" not in options and "secret" not in options
