"""`unlearnable verify`: a protected file passes, the clean file itself, other audio, a file pushed
outside ε and a lossy re-encode each get their verdict and exit code."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.io.audio import OutputFormat, decode, encode
from pipeline.service.limits import decode_upload
from pipeline.service.uploads import prepare_upload
from pipeline.verify import VERSION_MIN_SNR_DB, verify_audio
from tests.factories import audio_bytes


@pytest.fixture(scope="module")
def pair(upload_protector, service_cfg):
    """(clean bytes, protected bytes, Δe the service reported) of a 2 s 16 kHz mono WAV."""
    data = audio_bytes(2.0, 16000, 1, "WAV", "PCM_16", seed=5)
    [result] = upload_protector.protect(
        [prepare_upload("v", data, decode_upload(data, service_cfg.service), service_cfg)]
    )
    return data, result.payload, result.figures["delta_e_mean"]


def _verify(clean: bytes, delivered: bytes, cfg, encoder, threshold: float, reencode: bool = False):
    return verify_audio(
        decode(clean), decode(delivered), cfg, encoder=encoder, min_delta_e=threshold, reencode=reencode
    )


def test_protected_file_passes(pair, service_cfg, tiny_encoder):
    clean, protected, delta_e = pair
    report = _verify(clean, protected, service_cfg, tiny_encoder, 0.5 * delta_e, reencode=True)
    assert report.verdict == "protected" and report.exit_code == 0, report.reasons
    assert report.within_bound and report.lag == 0 and report.aligned_snr_db > VERSION_MIN_SNR_DB
    assert report.delta_e == pytest.approx(delta_e, rel=0.05)  # the figure the service reported
    assert report.delta_e_musicldm > 0 and np.isfinite(report.delta_e_mp3_128)
    assert report.random_encoder and any("RANDOM" in r for r in report.reasons)
    data = json.loads(report.to_json())
    assert data["verdict"] == "protected" and data["exit_code"] == 0


def test_clean_file_is_unprotected(pair, service_cfg, tiny_encoder):
    clean, _, delta_e = pair
    report = _verify(clean, clean, service_cfg, tiny_encoder, 0.5 * delta_e)
    assert (report.verdict, report.exit_code, report.delta_e) == ("unprotected", 4, 0.0)


def test_other_audio_is_not_a_version(pair, service_cfg, tiny_encoder):
    clean, _, delta_e = pair
    other = audio_bytes(2.0, 16000, 1, "WAV", "PCM_16", seed=99)
    report = _verify(clean, other, service_cfg, tiny_encoder, 0.5 * delta_e)
    assert (report.verdict, report.exit_code) == ("not_a_version", 3)
    resampled = audio_bytes(2.0, 22050, 1, seed=5)
    assert _verify(clean, resampled, service_cfg, tiny_encoder, 0.5 * delta_e).verdict == "not_a_version"


def test_outside_the_bound(pair, service_cfg, tiny_encoder):
    clean, protected, delta_e = pair
    decoded = decode(protected)
    samples = decoded.samples.copy()
    samples[1000:1010] += 3 * service_cfg.attack.eps  # a click well past ε, the rest untouched
    pushed = encode(np.clip(samples, -1, 1 - 2**-15), 16000, OutputFormat("WAV", "PCM_16", "wav"))
    report = _verify(clean, pushed, service_cfg, tiny_encoder, 0.5 * delta_e)
    assert (report.verdict, report.exit_code) == ("out_of_bound", 5), report.reasons
    assert report.linf > service_cfg.attack.eps


def test_lossy_reencode_is_reported(pair, service_cfg, tiny_encoder):
    clean, protected, _ = pair
    decoded = decode(protected)
    mp3 = encode(decoded.samples, 16000, OutputFormat("MP3", "MPEG_LAYER_III", "mp3", 32))
    report = _verify(clean, mp3, service_cfg, tiny_encoder, 1e6)  # a threshold no Δe reaches
    assert report.lossy_delivered and not report.within_bound
    assert (report.verdict, report.exit_code) == ("protection_lost", 4), report.reasons
    assert any("lossy re-encode" in r for r in report.reasons)


def test_cli_verify_json(pair, tmp_path, capsys):
    from pipeline.cli import main

    clean, protected, delta_e = pair
    (tmp_path / "a.wav").write_bytes(clean)
    (tmp_path / "b.wav").write_bytes(protected)
    argv = ["verify", "--clean", str(tmp_path / "a.wav"), "--delivered", str(tmp_path / "b.wav"), "--json"]
    argv += ["--set", "encoder.device=cpu", "--set", "quality.masking=false", "--set", "attack.steps=0"]
    argv += ["--set", "attack.seed=3", "--no-reencode", "--min-delta-e", str(0.5 * delta_e)]
    code = main(argv)
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["verdict"] == "protected" and out["exit_code"] == 0
