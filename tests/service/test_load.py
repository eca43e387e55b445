"""The real service on loopback (slow suite): `unlearnable serve` in a subprocess (its own Ray and
Serve, random HTSAT-tiny, 2 PGD steps), many concurrent small uploads over real HTTP with a token.

Checks: every upload answered with its protected file (same rate/length, within ε, figures in the
headers), none lost (429s retried after Retry-After, counted on /metrics), several uploads per PGD
call, every kind of bad upload a 4xx JSON error and the replica still serving after them, replica
memory bounded, no temporary file left, and the token in no log, response or file the run wrote."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from pipeline.io.audio import decode, lsb
from tests.factories import audio_bytes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "svc-load-7c2e91b4d0a8-never-logged"
UPLOADS = 16
CLIENTS = 8
CONFIG = {
    "encoder": {"checkpoint": "random:HTSAT-tiny:0", "device": "cpu"},
    "attack": {"steps": 2, "precision": "fp32"},
    "quality": {"masking": False, "musicldm_view": False},
    "service": {
        "max_batch_uploads": 4,
        "batch_wait_s": 0.2,
        "max_pending_uploads": 6,
        "retry_after_s": 1,
        "max_upload_mb": 1.0,
        "max_duration_s": 5.0,
        "num_cpus_per_replica": 1,
        "request_timeout_s": 120,
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, body: bytes = b"", token: str | None = TOKEN, timeout: float = 180):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/octet-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=body if method == "POST" else None, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _replica_rss_mb() -> float:
    """RSS of this run's Serve replica process(es) (process title ray::ServeReplica:unlearnable:...), MB."""
    total = 0.0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"ServeReplica:unlearnable:ProtectService" not in cmdline.read_bytes():
                continue
            rss = re.search(r"VmRSS:\s+(\d+) kB", (cmdline.parent / "status").read_text())
        except OSError:
            continue
        total += int(rss.group(1)) / 1024 if rss else 0.0
    return total


def _protect_until_done(port: int, data: bytes) -> tuple[int, dict, bytes, int]:
    """POST /protect, retrying 429/503 after their Retry-After (a client that loses nothing)."""
    for refused in range(200):
        status, headers, body = _request(port, "POST", "/protect", data)
        if status not in (429, 503):
            return status, headers, body, refused
        assert int(headers["retry-after"]) >= 1, headers
        time.sleep(int(headers["retry-after"]))
    raise AssertionError("never admitted")


@pytest.fixture
def service(tmp_path):
    """`unlearnable serve` with a token on a free loopback port; yields (port, pid, paths)."""
    work = Path(tempfile.mkdtemp(prefix="ulsvc-", dir="/tmp"))  # short: Ray's socket paths live under it
    (work / "tmp").mkdir()
    config = work / "service.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(
        UNLEARNABLE_API_TOKEN=TOKEN, RAY_TMPDIR=str(work / "ray"), TMPDIR=str(work / "tmp"), PYTHONPATH=str(ROOT)
    )
    log = open(work / "serve.log", "wb")  # noqa: SIM115 (open for the subprocess's whole life)
    cmd = [sys.executable, "-m", "pipeline", "serve", "--config", str(config), "--host", "127.0.0.1"]
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, (work / "serve.log").read_text()[-3000:]
            try:
                if _request(port, "GET", "/readyz", token=None, timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (work / "serve.log").read_text()[-3000:]
            time.sleep(1)
        yield port, proc, work
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the CLI's finally: serve.shutdown(), ray.shutdown()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def _bad_uploads() -> dict[str, tuple[bytes, int, str]]:
    nan = np.zeros((8000, 1), dtype=np.float32)
    nan[10] = np.nan
    buffer = io.BytesIO()
    sf.write(buffer, nan, 8000, format="WAV", subtype="FLOAT")
    return {
        "empty": (b"", 400, "empty"),
        "undecodable": (b"not audio at all" * 64, 415, "undecodable"),
        "nan": (buffer.getvalue(), 422, "non_finite"),
        "oversized": (b"\0" * (1024 * 1024 + 10), 413, "too_large"),
        "too_long": (audio_bytes(6.0, 8000, 1), 413, "too_long"),
    }


def test_many_concurrent_uploads_over_http(service):
    port, proc, work = service
    # auth: no token / a wrong one -> 401 JSON; health routes need none
    for token in (None, "wrong"):
        status, headers, body = _request(port, "POST", "/protect", audio_bytes(1.0, 16000, 1), token=token)
        assert status == 401 and json.loads(body)["error"] == "unauthorized", body
        assert headers["www-authenticate"].startswith("Bearer")
    assert _request(port, "GET", "/healthz", token=None)[0] == 200
    ready = json.loads(_request(port, "GET", "/readyz", token=None)[2])
    assert ready["ready"] is True and ready["random_encoder"] is True

    # every kind of bad upload: a clear 4xx JSON error
    for name, (data, status_wanted, kind) in _bad_uploads().items():
        status, _, body = _request(port, "POST", "/protect", data)
        assert status == status_wanted and json.loads(body)["error"] == kind, (name, status, body)

    # two rounds: the first warms the replica up (PGD buffers, allocator pools), the second must
    # not grow it further (memory bounded, nothing kept per request)
    clips = [audio_bytes(1.0 + 0.1 * (i % 4), 16000, 1, "WAV", "PCM_16", seed=i) for i in range(UPLOADS)]
    half = UPLOADS // 2
    rss_start = _replica_rss_mb()
    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda data: _protect_until_done(port, data), clips[:half]))
        rss_warm = _replica_rss_mb()
        results += list(pool.map(lambda data: _protect_until_done(port, data), clips[half:]))
    wall = time.perf_counter() - started
    rss_after = _replica_rss_mb()

    eps = CONFIG.get("attack", {}).get("eps", 0.05)
    for data, (status, headers, body, _) in zip(clips, results):
        assert status == 200, body[:300]
        assert headers["content-type"] == "audio/wav" and headers["x-random-encoder"] == "true"
        assert float(headers["x-delta-e"]) > 0 and headers["x-eps-bound-holds"] == "true"
        clean, protected = decode(data), decode(body)
        assert protected.samples.shape == clean.samples.shape and protected.sample_rate == clean.sample_rate
        assert 0 < np.abs(protected.samples - clean.samples).max() <= eps + lsb("PCM_16")
    refused = sum(r[3] for r in results)

    # ?format=json: figures and the audio, base64
    status, _, body = _request(port, "POST", "/protect?format=json", clips[0])
    figures = json.loads(body)
    assert status == 200 and figures["figures"]["delta_e_mean"] > 0 and figures["audio_base64"]

    # no request lost, uploads batched, refusals counted: the replica's /metrics
    metrics = _request(port, "GET", "/metrics", token=None)[2].decode()
    ok = float(re.search(r'unlearnable_items_total\{status="ok"\} (\S+)', metrics).group(1))
    assert ok == UPLOADS + 1
    batches = float(re.search(r"unlearnable_service_batch_uploads_count (\S+)", metrics).group(1))
    batched = float(re.search(r"unlearnable_service_batch_uploads_sum (\S+)", metrics).group(1))
    assert batched == UPLOADS + 1 and batches < batched, metrics  # several uploads per PGD call
    busy = re.search(r'unlearnable_errors_total\{kind="busy"\} (\S+)', metrics)
    assert (float(busy.group(1)) if busy else 0.0) == refused
    assert refused > 0  # 8 clients, 6 admitted per replica: the first burst meets 429 + Retry-After
    # bounded: the second round grows the replica less than the first (allocator pools settling),
    # and all of it stays within 2.5 GB of the idle replica
    rss = (rss_start, rss_warm, rss_after)
    assert rss_start > 0 and rss_after - rss_warm < max(rss_warm - rss_start, 200), rss
    assert rss_after - rss_start < 2500, rss

    proc.send_signal(signal.SIGTERM)  # what k8s and systemd send: Serve and Ray shut down, exit 0
    assert proc.wait(60) == 0
    print(f"{UPLOADS} uploads, {CLIENTS} clients: {wall:.1f} s, {refused} x 429, replica RSS {rss} MB")

    # the token is in no log or file of the run; no temporary file outlived its request
    leaks = []
    for path in work.rglob("*"):
        if path.is_file() and path.name != "service.yaml":
            try:
                if TOKEN.encode() in path.read_bytes():
                    leaks.append(str(path))
            except OSError:
                continue
    assert not leaks, leaks
    log = (work / "serve.log").read_text()
    assert "RANDOM CLAP WEIGHTS" in log or any(
        "RANDOM CLAP WEIGHTS" in p.read_text(errors="ignore") for p in (work / "ray").rglob("*.log") if p.is_file()
    )
    assert not [p for p in (work / "tmp").rglob("*") if "unlearnable" in p.name], list((work / "tmp").rglob("*"))
