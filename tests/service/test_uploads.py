"""Several uploads in one PGD call: each comes back in its format family, within ε, with its
figures; a lossy upload becomes FLAC (audio.lossy_output flac)."""

from __future__ import annotations

import logging

import numpy as np

from pipeline.io.audio import decode, lsb
from pipeline.service.limits import decode_upload
from pipeline.service.uploads import Delivered, UploadProtector, figure_headers, json_figures, prepare_upload
from tests.factories import audio_bytes


def _uploads(cfg, specs):
    out = []
    for i, (seconds, rate, channels, fmt, subtype) in enumerate(specs):
        data = audio_bytes(seconds, rate, channels, fmt, subtype, seed=i)
        out.append((data, prepare_upload(f"u{i}", data, decode_upload(data, cfg.service), cfg)))
    return out


def test_uploads_share_one_call_and_keep_their_format(upload_protector, service_cfg):
    # same rate and channels: their windows share one PGD batch
    specs = [(1.5, 16000, 1, "WAV", "PCM_16"), (1.0, 16000, 1, "FLAC", "PCM_24"), (1.2, 16000, 1, "OGG", "VORBIS")]
    pairs = _uploads(service_cfg, specs)
    results = upload_protector.protect([u for _, u in pairs])
    assert len(results) == 3 and all(isinstance(r, Delivered) for r in results), results
    expected = [
        ("WAV/PCM_16", "wav", "audio/wav"),
        ("FLAC/PCM_24", "flac", "audio/flac"),
        ("FLAC/PCM_16", "flac", "audio/flac"),
    ]
    for (_data, upload), result, (label, extension, media) in zip(pairs, results, expected):
        assert (result.figures["output_format"], result.extension, result.media_type) == (label, extension, media)
        out = decode(result.payload)
        assert out.sample_rate == upload.decoded.sample_rate and out.samples.shape == upload.decoded.samples.shape
        linf = float(np.abs(out.samples - upload.decoded.samples).max())
        assert 0 < linf <= service_cfg.attack.eps + lsb(out.subtype)
        assert result.figures["eps_bound_holds"] is True
        assert result.figures["batch_uploads"] == 3  # one TrackProtector call for the three uploads
        headers = figure_headers(result.figures)
        assert float(headers["X-Delta-E"]) > 0 and headers["X-Random-Encoder"] == "true"
        assert headers["X-Config-Hash"] == service_cfg.output_hash()
        assert headers["X-Encoder-Id"] == "random:HTSAT-tiny:0"
        assert "X-MOS-LQO" not in headers  # quality.visqol is not `all`: not measured, not faked
        figures = json_figures(result.figures)
        assert figures["mos_lqo"] is None and figures["delta_e_mean"] > 0


def test_random_encoder_is_announced(tiny_encoder, service_cfg, caplog):
    from pipeline.api import build_protector

    with caplog.at_level(logging.WARNING, logger="pipeline.service.uploads"):
        UploadProtector(service_cfg, build_protector(service_cfg, [tiny_encoder]))
    assert "RANDOM CLAP WEIGHTS" in caplog.text
