"""The Python API without Ray: protect_array and protect_file, and `unlearnable protect-file`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.api import build_protector, protect_array, protect_file
from pipeline.cli import main
from pipeline.config import config_from_dict
from pipeline.core.protect import Track
from pipeline.demo import synthesize
from pipeline.io.audio import AudioDecodeError
from tests.factories import encode_audio

FAST = {"attack": {"steps": 2}, "encoder": {"device": "cpu"}, "quality": {"musicldm_view": False}}


@pytest.fixture(scope="module")
def cfg():
    return config_from_dict(FAST)


@pytest.fixture(scope="module")
def protector(cfg, tiny_encoder):
    return build_protector(cfg, [tiny_encoder])


def test_protect_array_keeps_shape_bound_and_grid(cfg, protector) -> None:
    stereo = synthesize(3.0, 22_050, 2, 120, 220.0)
    protected, figures = protect_array(stereo, 22_050, cfg, subtype="PCM_16", protector=protector)
    assert protected.shape == stereo.shape and protected.dtype == np.float32
    assert np.abs(protected.astype(np.float64) - stereo).max() <= cfg.attack.eps + 1e-7
    assert np.array_equal(np.round(protected * 32768), protected * 32768)  # on the PCM_16 grid
    assert figures["delta_e_mean"] > 0 and figures["random_encoder"] is True
    assert figures["encoder_id"] == "random:HTSAT-tiny:0"
    mono, _ = protect_array(stereo[:, 0], 22_050, cfg, protector=protector)
    assert mono.shape == (stereo.shape[0],)


def test_protect_array_is_the_job_s_protector(cfg, protector) -> None:
    """Same config and seed as the job's actor: the same samples as TrackProtector gives there."""
    clip = synthesize(2.0, 16_000, 1, 100, 330.0)
    protected, _ = protect_array(clip, 16_000, cfg, subtype="PCM_16", protector=protector)
    [direct] = build_protector(cfg, protector.encoders).protect([Track("array", clip, 16_000, "PCM_16")])
    np.testing.assert_array_equal(protected, direct.samples)


def test_fixed_shape_steps_protect_the_same(cfg, protector) -> None:
    """attack.fixed_shape reaches the engine through the config (the spectral method here; the
    engine tests compare both methods' loops) and gives the default's samples."""
    clip = synthesize(1.75, 16_000, 1, 100, 330.0)  # two 1 s windows in one batch
    tracks = [Track("same", clip, 16_000, "PCM_16")]
    settings = {**FAST, "audio": {"window_seconds": 1.0, "overlap_seconds": 0.25}}
    default = build_protector(config_from_dict(settings), protector.encoders)
    settings["attack"] = {**FAST["attack"], "fixed_shape": True}
    fixed = build_protector(config_from_dict(settings), protector.encoders)
    assert fixed.params.fixed_shape and not default.params.fixed_shape
    [a], [b] = default.protect(tracks), fixed.protect(tracks)
    np.testing.assert_allclose(b.samples, a.samples, rtol=0, atol=1e-6)
    assert abs(a.delta_e_mean - b.delta_e_mean) < 1e-5


def test_bad_arrays_are_refused(protector) -> None:
    with pytest.raises(ValueError, match="samples must be"):
        protect_array(np.zeros((0, 2), np.float32), 16_000, protector=protector)
    with pytest.raises(ValueError, match="finite"):
        protect_array(np.full((16_000, 1), np.nan, np.float32), 16_000, protector=protector)


def test_protect_file_flac_in_flac_out_within_eps(tmp_path: Path, cfg, protector) -> None:
    source = tmp_path / "in put é.flac"
    source.write_bytes(encode_audio(synthesize(2.5, 44_100, 2, 120, 220.0), 44_100, "FLAC", "PCM_24"))
    figures = protect_file(str(source), str(tmp_path / "out.flac"), cfg, protector=protector)
    info = sf.info(figures["output"])
    assert figures["output"] == str(tmp_path / "out.flac") and (info.format, info.subtype) == ("FLAC", "PCM_24")
    assert figures["eps_bound_holds"] and figures["linf_written"] <= cfg.attack.eps + 2**-23
    written, _ = sf.read(figures["output"], dtype="float32")
    clean, _ = sf.read(source, dtype="float32")
    assert 0 < np.abs(written - clean).max() <= cfg.attack.eps + 2**-23


def test_protect_file_lossy_input_becomes_flac(tmp_path: Path, cfg, protector) -> None:
    source = tmp_path / "in.ogg"
    source.write_bytes(encode_audio(synthesize(2.0, 44_100, 1, 120, 220.0), 44_100, "OGG", "VORBIS"))
    figures = protect_file(str(source), str(tmp_path / "out.ogg"), cfg, protector=protector)
    assert figures["output"] == str(tmp_path / "out.flac") and figures["output_format"] == "FLAC/PCM_16"
    assert (tmp_path / "out.flac").exists() and not (tmp_path / "out.ogg").exists()


def test_protect_file_refuses_what_is_not_audio(tmp_path: Path, cfg, protector) -> None:
    source = tmp_path / "notes.wav"
    source.write_bytes(b"not audio at all" * 20)
    with pytest.raises(AudioDecodeError):
        protect_file(str(source), str(tmp_path / "out.wav"), cfg, protector=protector)
    assert not (tmp_path / "out.wav").exists()


def test_protect_file_command(tmp_path: Path, capsys) -> None:
    source = tmp_path / "a.wav"
    source.write_bytes(encode_audio(synthesize(1.5, 16_000, 1, 120, 220.0), 16_000))
    sets = ["--set", "attack.steps=1", "--set", "encoder.device=cpu", "--set", "quality.musicldm_view=false"]
    assert main(["protect-file", str(source), str(tmp_path / "b.wav"), *sets]) == 0
    out, err = capsys.readouterr()
    assert "b.wav: WAV/PCM_16 (from WAV/PCM_16)" in out and "ε bound holds" in out
    assert "NOT protected" in err
    (tmp_path / "bad.wav").write_bytes(b"junk" * 50)
    assert main(["protect-file", str(tmp_path / "bad.wav"), str(tmp_path / "c.wav"), *sets]) == 1
    assert "not decodable audio" in capsys.readouterr().err


def test_protect_file_m4a_aac_becomes_flac(tmp_path: Path, cfg, protector) -> None:
    from pipeline.io.audio import ffmpeg_encode

    source = tmp_path / "Artist" / "01 - Title.m4a"
    source.parent.mkdir()
    source.write_bytes(ffmpeg_encode(synthesize(2.0, 44_100, 2, 120, 220.0), 44_100, "aac", 128))
    figures = protect_file(str(source), str(tmp_path / "out" / "01 - Title.m4a"), cfg, protector=protector)
    assert figures["input_format"] == "AAC/AAC" and figures["output_format"] == "FLAC/PCM_16"
    assert figures["output"].endswith("01 - Title.flac") and figures["eps_bound_holds"]
