"""Exactly-once outputs: a run killed with SIGKILL and started again completes every shard once,
leaves no temp files and does not touch shards it had completed; the same input, config and seed
give the same manifests; a shard that cannot be written fails alone, never the run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import config_from_dict
from pipeline.io.output import TMP_DIR
from pipeline.records import ShardStats
from pipeline.stages import rows as R
from pipeline.stages.read import ReadSettings, read_shard
from pipeline.stages.write import SHARD_FAILED, ShardWriter, WriteSettings, encode_batch
from tests.factories import EXTENSIONS, audio_bytes, catalog, config_dict, fake_protect, manifest_keys, write_shard

REPO = Path(__file__).resolve().parents[2]


def fingerprint(path: Path) -> tuple[int, str]:
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- kill and resume


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_exactly_once(tmp_path: Path) -> None:
    keys = catalog(tmp_path / "in", shards=4, per_shard=2, seconds=2.0)
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(config_dict(str(tmp_path / "in"), str(out), steps=2)))
    command = [sys.executable, "-m", "pipeline", "protect", "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    log = (tmp_path / "first.log").open("wb")
    # A session of its own, so that SIGKILL reaches the driver and every Ray process it started.
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not list(out.glob("*.stats.json")):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard completed in time"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
        for _ in range(100):
            if not _alive(first.pid):
                break
            time.sleep(0.1)
    finally:
        if _alive(first.pid):
            os.killpg(first.pid, signal.SIGKILL)
        log.close()
    done = {p.name[: -len(".stats.json")] for p in out.glob("*.stats.json")}
    assert 1 <= len(done) < 4, f"the kill should land mid-run; completed: {sorted(done)}"
    before = {p.name: fingerprint(p) for s in done for p in out.glob(f"{s}.*")}
    assert len(before) == 3 * len(done)

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)

    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"{len(done)} already complete" in second.stdout
    assert sorted(p.name for p in out.glob("*.stats.json")) == [f"s-{i:03d}.stats.json" for i in range(4)]
    assert manifest_keys(out) == Counter(keys)  # every input key exactly once
    assert not (out / TMP_DIR).exists()
    after = {name: fingerprint(out / name) for name in before}
    assert after == before  # completed shards were not rewritten


# ------------------------------------------------------------------------------ determinism


def _comparable_manifest(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in pq.read_table(path).to_pylist()]


def _comparable_stats(path: Path) -> dict:
    stats = ShardStats.from_json(path.read_text()).__dict__.copy()
    stats.pop("wall_seconds")
    stats.pop("accelerator_seconds")
    return stats


def test_same_input_config_and_seed_give_the_same_outputs(tmp_path: Path, ray_session) -> None:
    from pipeline.stages.pipeline import run

    catalog(tmp_path / "in", shards=2, per_shard=2, seconds=1.5, bad=True)
    outs = [tmp_path / "out-a", tmp_path / "out-b"]
    for out in outs:
        cfg = config_dict(str(tmp_path / "in"), str(out), steps=2)
        # One track per actor call: which tracks share a PGD batch otherwise depends on the order
        # Ray streams them in, and the batch size changes float rounding (then sign steps).
        cfg["runtime"]["tracks_per_call"] = 1
        run(config_from_dict(cfg))
    a, b = outs
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for shard in ("s-000", "s-001"):
        rows_a, rows_b = _comparable_manifest(a / f"{shard}.parquet"), _comparable_manifest(b / f"{shard}.parquet")
        assert str(rows_a) == str(rows_b)  # str(): NaN == NaN
        assert _comparable_stats(a / f"{shard}.stats.json") == _comparable_stats(b / f"{shard}.stats.json")
        assert (a / f"{shard}.tar").read_bytes() == (b / f"{shard}.tar").read_bytes()
    assert any(r["status"] == "error" for r in _comparable_manifest(a / "s-000.parquet"))


# ---------------------------------------------------------------------- permanent failures


def _rows(tmp_path: Path, shard_id: str) -> list[dict]:
    path = write_shard(tmp_path / f"{shard_id}.tar", [("a.wav", audio_bytes(0.5, 16000, 1))])
    settings = ReadSettings(EXTENSIONS, 1 << 20, {})
    rows = fake_protect(list(read_shard({R.SHARD_ID: shard_id, R.SHARD_URL: str(path)}, settings)))
    return R.batch_to_rows(encode_batch(R.rows_to_batch(rows, list(rows[0]))))


def test_a_shard_that_cannot_be_written_fails_alone(tmp_path: Path, monkeypatch) -> None:
    from pipeline.io import output

    out = tmp_path / "out"
    writer = ShardWriter(WriteSettings(str(out), {}, "passthrough", "h", 0.5))
    writer.out.ensure()
    original = output.OutputFolder.write_atomic

    def refuse_s001(self, name: str, data: bytes) -> None:
        if name.startswith("s-001"):
            raise PermissionError(f"Access Denied: {name}")
        original(self, name, data)

    monkeypatch.setattr(output.OutputFolder, "write_atomic", refuse_s001)
    rows = _rows(tmp_path, "s-000") + _rows(tmp_path, "s-001")
    summary = R.batch_to_rows(writer(R.rows_to_batch(rows, list(rows[0]))))
    by_shard = {s["shard_id"]: s for s in summary}
    assert by_shard["s-000"]["failed"] == "" and (out / "s-000.stats.json").exists()
    assert by_shard["s-001"]["failed"] == "write: PermissionError: Access Denied: s-001.tar"
    assert not (out / "s-001.stats.json").exists()  # no marker: the next run does it again
    assert ShardStats.from_json(by_shard["s-001"]["stats_json"]).errors == {SHARD_FAILED: 1}
    assert not (out / TMP_DIR).exists()


def test_a_storage_failure_on_read_leaves_the_shard_pending(tmp_path: Path) -> None:
    out = tmp_path / "out"
    writer = ShardWriter(WriteSettings(str(out), {}, "passthrough", "h", 0.5))
    rows = _rows(tmp_path, "s-000")
    shard_row = next(r for r in rows if r[R.KIND] == R.KIND_SAMPLE) | {
        R.KIND: R.KIND_SHARD,
        R.KEY: "__shard__",
        R.STATUS: "error",
        R.ERROR: "storage unavailable: s3://b/s-000.tar: EndpointConnectionError: ...",
        R.INDEX: 1,
        R.SHARD_ITEMS: 2,
    }
    for row in rows:
        row[R.SHARD_ITEMS] = 2
    summary = R.batch_to_rows(writer(R.rows_to_batch([*rows, shard_row], list(rows[0]))))
    assert summary[0]["failed"].startswith("storage unavailable")
    assert not out.exists() or not list(out.glob("*"))


def test_run_goes_on_when_one_output_cannot_be_committed(tmp_path: Path, ray_session) -> None:
    """A folder squats the output name of s-001: its commit fails (IsADirectoryError, permanent),
    s-000 and s-002 complete, the run returns, and s-001 is pending for the next run."""
    from pipeline.stages.pipeline import run

    catalog(tmp_path / "in", shards=3, per_shard=1, seconds=1.0)
    out = tmp_path / "out"
    (out / "s-001.tar").mkdir(parents=True)
    summaries: list[dict] = []
    summary = run(config_from_dict(config_dict(str(tmp_path / "in"), str(out))), on_summary=summaries.append)
    assert summary.processed_shards == 3
    failed = {s["shard_id"]: s["failed"] for s in summaries}
    assert failed["s-000"] == failed["s-002"] == ""
    assert failed["s-001"].startswith("write: IsADirectoryError")
    assert sorted(p.name for p in out.glob("*.stats.json")) == ["s-000.stats.json", "s-002.stats.json"]
    assert not (out / TMP_DIR).exists()


def test_failed_shards_reach_the_summary_and_exit_code(tmp_path: Path, ray_session, capsys) -> None:
    """`unlearnable protect` lists the shard that could not be committed and exits 3."""
    from pipeline.cli import main

    catalog(tmp_path / "in", shards=2, per_shard=1, seconds=1.0)
    out = tmp_path / "out"
    (out / "s-001.tar").mkdir(parents=True)
    config = tmp_path / "c.yaml"
    config.write_text(config_from_dict(config_dict(str(tmp_path / "in"), str(out))).to_yaml())
    assert main(["protect", "--config", str(config)]) == 3
    assert "shard s-001 FAILED: write: IsADirectoryError" in capsys.readouterr().err
