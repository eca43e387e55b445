"""The service's refusals without a server: the bearer token (constant-time check, never shown),
the bind rule, every kind of bad upload as a clear 4xx, and the JSON error shape."""

from __future__ import annotations

import asyncio
import io
import json
import pickle
import sys

import numpy as np
import pytest
import soundfile as sf

from pipeline.config import ConfigError, ServiceConfig, config_from_dict
from pipeline.service.limits import (
    TOKEN_ENV,
    BearerToken,
    BindRefused,
    UploadRejected,
    busy,
    check_bind,
    check_declared_length,
    decode_upload,
    is_loopback,
    within_deadline,
)
from tests.factories import audio_bytes

SECRET = "tok-3f9c1e7a-do-not-log"


def test_token_check_is_exact_and_needs_the_bearer_scheme():
    token = BearerToken(SECRET)
    assert token.configured
    assert token.check(f"Bearer {SECRET}")
    assert token.check(f"bearer {SECRET}")
    for wrong in (None, "", SECRET, f"Basic {SECRET}", f"Bearer {SECRET}x", f"Bearer {SECRET[:-1]}", "Bearer "):
        assert not token.check(wrong), wrong


def test_no_token_configured_lets_every_request_in():
    token = BearerToken(None)
    assert not token.configured and token.check(None) and token.check("Bearer anything")
    assert not BearerToken("   ").configured  # a blank token is no token


def test_token_never_shows_in_repr_str_or_pickle(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, SECRET)
    token = BearerToken.from_env()
    assert token.configured
    for text in (repr(token), str(token), f"{token}", repr([token])):
        assert SECRET not in text
    blob = pickle.dumps(token)
    assert SECRET.encode() not in blob
    monkeypatch.setenv(TOKEN_ENV, "other-env")  # an unpickled token reads its own environment
    assert pickle.loads(blob).check("Bearer other-env")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts(host):
    assert is_loopback(host)
    check_bind(host, BearerToken(None))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.org", ""])
def test_other_hosts_need_a_token(host):
    assert not is_loopback(host)
    with pytest.raises(BindRefused, match=TOKEN_ENV):
        check_bind(host, BearerToken(None))
    check_bind(host, BearerToken(SECRET))


def _wav_float(samples: np.ndarray, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


SMALL = ServiceConfig(max_upload_mb=0.25, max_duration_s=2.0)


@pytest.mark.parametrize(
    ("name", "status", "kind"),
    [
        ("empty", 400, "empty"),
        ("garbage", 415, "undecodable"),
        ("truncated", 415, "undecodable"),
        ("nan", 422, "non_finite"),
        ("inf", 422, "non_finite"),
        ("too_short", 422, "too_short"),
        ("too_large", 413, "too_large"),
        ("too_long", 413, "too_long"),
    ],
)
def test_bad_uploads_are_clear_4xx(name, status, kind):
    good = audio_bytes(1.0, 16000, 1)
    nan = np.zeros((16000, 1), dtype=np.float32)
    nan[100] = np.nan
    data = {
        "empty": lambda: b"",
        "garbage": lambda: b"definitely not audio" * 20,
        "truncated": lambda: good[: len(good) // 2],
        "nan": lambda: _wav_float(nan),
        "inf": lambda: _wav_float(np.full((16000, 1), np.inf, dtype=np.float32)),
        "too_short": lambda: _wav_float(np.full((160, 1), 0.1, dtype=np.float32)),
        "too_large": lambda: b"\0" * (int(SMALL.max_upload_mb * 1024 * 1024) + 1),
        "too_long": lambda: audio_bytes(3.0, 8000, 1),
    }[name]()
    with pytest.raises(UploadRejected) as info:
        decode_upload(data, SMALL)
    rejected = info.value
    assert (rejected.status, rejected.kind) == (status, kind), str(rejected)
    body = json.loads(json.dumps(rejected.body()))
    assert body["error"] == kind and body["detail"]


def test_good_upload_decodes():
    decoded = decode_upload(audio_bytes(1.0, 22050, 2, "FLAC", "PCM_24"), SMALL)
    assert (decoded.format, decoded.subtype, decoded.sample_rate, decoded.channels) == ("FLAC", "PCM_24", 22050, 2)


def test_declared_length_refused_before_reading():
    with pytest.raises(UploadRejected) as info:
        check_declared_length(str(10 * 1024 * 1024), SMALL)
    assert info.value.status == 413
    with pytest.raises(UploadRejected) as info:
        check_declared_length("12abc", SMALL)
    assert info.value.status == 400
    check_declared_length(None, SMALL)
    check_declared_length("1000", SMALL)


def test_busy_is_429_with_retry_after():
    rejected = busy(7, ServiceConfig(retry_after_s=3))
    assert (rejected.status, rejected.kind, rejected.retry_after_s) == (429, "busy", 3)


def test_error_response_headers():
    from pipeline.service.app import error_response

    busy_response = error_response(busy(1, ServiceConfig(retry_after_s=4)))
    assert busy_response.status_code == 429 and busy_response.headers["retry-after"] == "4"
    body = json.loads(busy_response.body)
    assert body["error"] == "busy" and "retry later" in body["detail"]
    unauthorized = error_response(UploadRejected(401, "unauthorized", "missing or wrong bearer token"))
    assert unauthorized.headers["www-authenticate"].startswith("Bearer")
    assert "retry-after" not in unauthorized.headers


def test_service_section_is_validated():
    cfg = config_from_dict({"service": {"max_batch_uploads": 4, "max_upload_mb": 8}})
    assert cfg.service.max_batch_uploads == 4 and cfg.service.max_upload_mb == 8.0
    for bad in ("service.max_batch_uploads=0", "service.request_timeout_s=0", "service.max_upload_mb=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            config_from_dict({}, [bad])
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict({"service": {"max_batch": 4}})
    assert cfg.output_hash() == config_from_dict({}).output_hash()


def test_serve_refuses_a_public_host_without_a_token(monkeypatch, capsys):
    from pipeline.cli import main

    def ray_up() -> bool:  # the session's Ray may already be up (an earlier test's pipeline)
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    before = ray_up()
    code = main(["serve", "--host", "0.0.0.0", "--port", "8123"])
    err = capsys.readouterr().err
    assert code == 1 and TOKEN_ENV in err and "0.0.0.0" in err
    assert ray_up() == before  # refused before anything started


def test_shipped_service_config_loads_and_says_it_is_random():
    from pathlib import Path

    from pipeline.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "service.yaml"
    cfg = load_config(path)
    assert cfg.encoder.checkpoint.startswith("random:") and "NOT protected" in path.read_text()
    assert cfg.service.max_batch_uploads > 1 and cfg.service.max_pending_uploads >= cfg.service.max_batch_uploads


def test_rayservice_app_builder_needs_the_token_off_loopback(monkeypatch, tmp_path):
    """serveConfigV2's import path (k8s/overlays/service): refuses 0.0.0.0 without a token and
    builds the Serve application (nothing started) with one; the args carry no token."""
    from ray.serve import Application

    from pipeline.service.app import app_builder

    config = tmp_path / "service.yaml"
    config.write_text("service: {num_replicas: 2, max_batch_uploads: 4}\n")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(BindRefused):
        app_builder({"config": str(config), "host": "0.0.0.0"})
    assert isinstance(app_builder({"config": str(config), "host": "127.0.0.1"}), Application)
    monkeypatch.setenv(TOKEN_ENV, SECRET)
    assert isinstance(app_builder({"config": str(config), "host": "0.0.0.0"}), Application)


def test_work_past_the_deadline_is_a_504_and_cancelled():
    cancelled = []

    async def slow() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "late"

    async def fast() -> str:
        return "done"

    with pytest.raises(UploadRejected) as refused:
        asyncio.run(within_deadline(slow(), 0.05))
    assert refused.value.status == 504 and refused.value.kind == "timeout" and cancelled == [True]
    assert refused.value.body() == {"error": "timeout", "detail": "not done within 0.05 s"}
    assert asyncio.run(within_deadline(fast(), 0.05)) == "done"
