"""Issue 17: a lost writer, a second driver, a changed input or a changed config never costs data
silently. Cheap tests drive the ShardWriter and the driver directly; the `slow` ones SIGKILL real
Ray worker processes (a read task, a protect actor, the shard writer) by PID mid-run with
multi-block shards, several kills per run (each run costs a minute of Ray start-up and pipeline)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import ConfigError, config_from_dict
from pipeline.io.output import LEASE_NAME, SPILL_DIR, TMP_DIR, LeaseHeld, OutputFolder, OutputLease
from pipeline.records import ShardStats
from pipeline.stages import pipeline as P
from pipeline.stages import rows as R
from pipeline.stages.read import ReadSettings, read_shard
from pipeline.stages.write import ShardWriter, WriteSettings, encode_batch
from tests.factories import (
    EXTENSIONS,
    audio_bytes,
    catalog,
    config_dict,
    fake_protect,
    manifest_keys,
    process_ids,
    write_shard,
)

# ------------------------------------------------------------------ writer state across restarts


def _shard_rows(tmp_path: Path, shard_id: str, keys: int) -> list[dict[str, Any]]:
    members = [(f"k{i}.wav", audio_bytes(0.5, 16000, 1, seed=i)) for i in range(keys)]
    path = write_shard(tmp_path / "in" / f"{shard_id}.tar", members)
    settings = ReadSettings(EXTENSIONS, 1 << 20, {})
    rows = fake_protect(list(read_shard({R.SHARD_ID: shard_id, R.SHARD_URL: str(path)}, settings)))
    return R.batch_to_rows(encode_batch(R.rows_to_batch(rows, list(rows[0]))))


def _call(writer: ShardWriter, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return R.batch_to_rows(writer(R.rows_to_batch(rows, list(rows[0]))))


def _writer(out: Path, durable: bool = True) -> ShardWriter:
    return ShardWriter(WriteSettings(str(out), {}, "passthrough", "h", 0.5, durable=durable))


def test_a_restarted_writer_rebuilds_its_partial_shards_from_the_spill(tmp_path: Path) -> None:
    """Rows of an incomplete shard survive the writer: a new instance (what Ray starts after a
    SIGKILL) reloads them, ignores the replayed batch's duplicates and commits every key once."""
    out = tmp_path / "out"
    rows = _shard_rows(tmp_path, "s-000", 4)
    first = _writer(out)
    assert _call(first, rows[:2]) == []
    assert len(list((out / SPILL_DIR / "s-000").glob("*.arrow"))) == 1
    del first  # killed: its memory is gone
    second = _writer(out)
    assert _call(second, rows[1:3]) == []  # row 1 again: Ray replays the batch in flight
    summary = _call(second, rows[3:])
    assert [s["shard_id"] for s in summary] == ["s-000"] and summary[0]["failed"] == ""
    assert manifest_keys(out) == Counter({"k0": 1, "k1": 1, "k2": 1, "k3": 1})
    assert not (out / TMP_DIR).exists()  # the spill goes with the commit
    whole = tmp_path / "whole"
    _call(_writer(whole), rows)  # the same rows in one call, never spilled: the same bytes
    assert (whole / "s-000.tar").read_bytes() == (out / "s-000.tar").read_bytes()
    assert (whole / "s-000.parquet").read_bytes() == (out / "s-000.parquet").read_bytes()


def test_rows_of_a_shard_committed_before_the_restart_are_ignored(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = _shard_rows(tmp_path, "s-000", 2)
    assert len(_call(_writer(out), rows)) == 1
    marker = (out / "s-000.stats.json").read_bytes()
    second = _writer(out)  # the first died before its summary reached the driver: Ray replays
    assert _call(second, rows) == []
    assert (out / "s-000.stats.json").read_bytes() == marker
    assert not (out / TMP_DIR).exists()


def test_without_the_spill_a_restarted_writer_never_completes_the_shard(tmp_path: Path) -> None:
    """The old design (durable=False): what the driver must catch as a missing summary."""
    out = tmp_path / "out"
    rows = _shard_rows(tmp_path, "s-000", 3)
    _call(_writer(out, durable=False), rows[:2])
    assert _call(_writer(out, durable=False), rows[2:]) == []
    assert not (out / "s-000.stats.json").exists()


def test_spill_keeps_segment_rows_and_member_bytes(tmp_path: Path) -> None:
    from pipeline.stages.write import spill_bytes, spill_rows

    rows = _shard_rows(tmp_path, "s-000", 2)
    back = spill_rows(spill_bytes(rows))
    assert [r[R.KEY] for r in back] == [r[R.KEY] for r in rows]
    assert [bytes(d) for d in back[0][R.MEMBER_DATA]] == [bytes(d) for d in rows[0][R.MEMBER_DATA]]
    assert back[0][R.AUDIO_BYTES] == rows[0][R.AUDIO_BYTES]


# ------------------------------------------------------------------ the driver's accounting


class _FakeDataset:
    def __init__(self, summaries: list[dict[str, Any]], error: Exception | None = None):
        self.summaries, self.error = summaries, error

    def iter_rows(self):
        yield from self.summaries
        if self.error is not None:
            raise self.error


def _ok_summary(shard_id: str) -> dict[str, Any]:
    stats = ShardStats(shards=1, items=1, ok=1)
    return P._summary(shard_id, stats, "")


def _fake_pipeline(monkeypatch, out: Path, summaries_for, error: Exception | None = None) -> None:
    """build_dataset replaced: commits markers for the shards `summaries_for` names, no Ray."""

    def build(cfg, pending, fingerprints=None, durable=True):
        summaries = []
        folder = OutputFolder(str(out))
        for shard in pending:
            if shard.shard_id in summaries_for:
                summary = _ok_summary(shard.shard_id)
                folder.write_atomic(f"{shard.shard_id}.stats.json", summary["stats_json"].encode())
                if summaries_for[shard.shard_id]:
                    summaries.append(summary)
        return _FakeDataset(summaries, error)

    monkeypatch.setattr(P, "build_dataset", build)
    monkeypatch.setattr(P, "init_ray", lambda cfg: None)


def _cfg(tmp_path: Path, **extra: Any):
    d = config_dict(str(tmp_path / "in"), str(tmp_path / "out"))
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        d.setdefault(section, {})[key] = value
    return config_from_dict(d)


def test_a_shard_whose_summary_never_arrives_is_failed_and_named(tmp_path: Path, monkeypatch, capsys) -> None:
    """s-000 committed and reported; s-001 committed but its summary lost (the writer died after the
    commit): counted as committed from its marker; s-002 never heard of: FAILED, exit 3."""
    from pipeline.cli import main

    catalog(tmp_path / "in", shards=3, per_shard=1, seconds=0.2)
    _fake_pipeline(monkeypatch, tmp_path / "out", {"s-000": True, "s-001": False})
    config = tmp_path / "c.yaml"
    config.write_text(_cfg(tmp_path).to_yaml())
    assert main(["protect", "--config", str(config)]) == 3
    captured = capsys.readouterr()
    assert "s-002: FAILED (no summary from the shard writer" in captured.out
    assert "shard s-002 FAILED: no summary from the shard writer" in captured.err
    assert "[3/3 shards]" in captured.out and "1 shard(s) not committed" in captured.err
    assert not (tmp_path / "out" / LEASE_NAME).exists()


def test_a_ray_error_fails_every_shard_not_heard_of(tmp_path: Path, monkeypatch) -> None:
    catalog(tmp_path / "in", shards=2, per_shard=1, seconds=0.2)
    _fake_pipeline(monkeypatch, tmp_path / "out", {"s-000": True}, error=RuntimeError("actor died 5 times"))
    summary = P.run(_cfg(tmp_path))
    assert summary.failed_shards == [("s-001", "run aborted: RuntimeError: actor died 5 times")]


def test_tmp_is_swept_at_the_end_of_a_run(tmp_path: Path, monkeypatch) -> None:
    catalog(tmp_path / "in", shards=1, per_shard=1, seconds=0.2)
    out = tmp_path / "out"

    def build(cfg, pending, fingerprints=None, durable=True):
        (out / TMP_DIR / "spill" / "s-000").mkdir(parents=True)
        (out / TMP_DIR / "spill" / "s-000" / "x.arrow").write_bytes(b"left by a lost writer")
        (out / TMP_DIR / "s-000.tar.123").write_bytes(b"a delete that failed")
        return _FakeDataset([])

    monkeypatch.setattr(P, "build_dataset", build)
    monkeypatch.setattr(P, "init_ray", lambda cfg: None)
    P.run(_cfg(tmp_path))
    assert not (out / TMP_DIR).exists()


# ------------------------------------------------------------------ config written once


def test_config_is_written_once_and_a_changed_audio_setting_is_refused(tmp_path: Path, monkeypatch) -> None:
    catalog(tmp_path / "in", shards=1, per_shard=1, seconds=0.2)
    out = tmp_path / "out"
    _fake_pipeline(monkeypatch, out, {"s-000": True})
    P.run(_cfg(tmp_path))
    written = (out / "_config.yaml").read_bytes()
    P.run(_cfg(tmp_path, runtime__tracks_per_call=3))  # no audio change: the file stays as it was
    assert (out / "_config.yaml").read_bytes() == written
    with pytest.raises(ConfigError, match=r"attack\.steps: 1 -> 5.*--overwrite"):
        P.run(_cfg(tmp_path, attack__steps=5))
    assert (out / "_config.yaml").read_bytes() == written
    assert not (out / LEASE_NAME).exists()  # released on the way out
    P.run(_cfg(tmp_path, attack__steps=5, io__overwrite=True))
    assert yaml.safe_load((out / "_config.yaml").read_text())["attack"]["steps"] == 5


def test_cli_reports_a_config_conflict_with_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    from pipeline.cli import main

    catalog(tmp_path / "in", shards=1, per_shard=1, seconds=0.2)
    _fake_pipeline(monkeypatch, tmp_path / "out", {"s-000": True})
    config = tmp_path / "c.yaml"
    config.write_text(_cfg(tmp_path).to_yaml())
    assert main(["protect", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["protect", "--config", str(config), "--set", "attack.steps=5"]) == 2
    err = capsys.readouterr().err
    assert "\nconfig error:" in err and "attack.steps: 1 -> 5" in err and "--overwrite" in err


# ------------------------------------------------------------------ input fingerprints


def test_a_changed_input_is_reported_and_redone(tmp_path: Path, monkeypatch, capsys) -> None:
    from pipeline.cli import main

    catalog(tmp_path / "in", shards=2, per_shard=1, seconds=0.2)
    out = tmp_path / "out"
    done: list[str] = []

    def build(cfg, pending, fingerprints=None, durable=True):
        folder = OutputFolder(str(out))
        summaries = []
        for shard in pending:
            stats = ShardStats(shards=1, items=1, ok=1, input=fingerprints[shard.shard_id])
            folder.write_atomic(f"{shard.shard_id}.stats.json", stats.to_json().encode())
            summaries.append(P._summary(shard.shard_id, stats, ""))
            done.append(shard.shard_id)
        return _FakeDataset(summaries)

    monkeypatch.setattr(P, "build_dataset", build)
    monkeypatch.setattr(P, "init_ray", lambda cfg: None)
    config = tmp_path / "c.yaml"
    config.write_text(_cfg(tmp_path).to_yaml())
    assert main(["protect", "--config", str(config)]) == 0
    assert json.loads((out / "s-001.stats.json").read_text())["input"]["size"] > 0
    write_shard(tmp_path / "in" / "s-001.tar", [("new.wav", audio_bytes(0.3, 16000, 1))])  # replaced
    capsys.readouterr()
    assert main(["status", "--config", str(config)]) == 0
    status = capsys.readouterr().out
    assert "1 complete, 1 pending" in status and "s-001: size" in status
    done.clear()
    assert main(["protect", "--config", str(config)]) == 0
    assert "input of s-001 changed since it was protected (size" in capsys.readouterr().out
    assert done == ["s-001"]


# ------------------------------------------------------------------ the lease


def test_a_second_driver_is_refused_naming_the_holder(tmp_path: Path, monkeypatch, capsys) -> None:
    from pipeline.cli import main

    catalog(tmp_path / "in", shards=1, per_shard=1, seconds=0.2)
    out = tmp_path / "out"
    holder = OutputLease(OutputFolder(str(out)))
    holder.acquire()
    try:
        config = tmp_path / "c.yaml"
        config.write_text(_cfg(tmp_path).to_yaml())
        assert main(["protect", "--config", str(config)]) == 1
        err = capsys.readouterr().err
        assert "is in use by another driver" in err and f"pid {os.getpid()}" in err and "started 20" in err
    finally:
        holder.release()
    assert not (out / LEASE_NAME).exists()


def test_a_stale_lease_is_taken_over_and_a_live_one_is_not(tmp_path: Path) -> None:
    out = OutputFolder(str(tmp_path / "out"))
    now = [1000.0]
    dead = OutputLease(out, ttl_s=60, clock=lambda: now[0])
    dead.acquire()
    dead._stop.set()  # the driver died: no more heartbeats
    now[0] += 30
    with pytest.raises(LeaseHeld, match="last heartbeat 30 s ago"):
        OutputLease(out, ttl_s=60, clock=lambda: now[0]).acquire()
    now[0] += 31
    taker = OutputLease(out, ttl_s=60, clock=lambda: now[0])
    taker.acquire()
    assert taker.read()["token"] == taker.token
    dead.renew()  # the old holder comes back: it learns that it lost the lease
    assert dead.lost.startswith("taken over by")
    taker.release()
    assert taker.read() is None


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    """A driver killed with SIGKILL on this machine: the rerun need not wait for the TTL."""
    import subprocess
    import sys

    out = OutputFolder(str(tmp_path / "out"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = OutputLease(out)
    body = json.loads(lease._body())
    body.update(pid=int(dead.stdout), token="old")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LEASE_NAME).write_text(json.dumps(body))
    lease.acquire()
    try:
        assert lease.read()["token"] == lease.token
    finally:
        lease.release()


def test_the_heartbeat_keeps_a_lease_alive(tmp_path: Path) -> None:
    out = OutputFolder(str(tmp_path / "out"))
    lease = OutputLease(out, ttl_s=0.6, heartbeat_s=0.1)
    lease.acquire()
    try:
        time.sleep(1.0)
        with pytest.raises(LeaseHeld):
            OutputLease(out, ttl_s=0.6).acquire()
    finally:
        lease.release()


# ------------------------------------------------------------------ SIGKILL of real Ray workers


WRITER = "MapWorker(MapBatches(ShardWriter))"  # Ray's process titles
ACTOR = "MapWorker(MapBatches(ProtectActor))"
READ = "ray::FlatMap(read_shard)"


@dataclass
class Kill:
    """SIGKILL the first process titled `title`: 4 s after `after` shards committed (so that the
    writer holds partial shards), or with `at_once` as soon as such a process is seen (a read task
    lives for a moment only)."""

    title: str
    after: int = 1
    at_once: bool = False
    done: bool = False


def _run_with_kills(
    tmp_path: Path,
    kills: list[Kill],
    durable: bool = True,
    s3: tuple[Any, dict[str, Any], str] | None = None,
):
    """A run of 4 shards × 5 keys, one track per call, 64 KiB blocks (every shard reaches the
    writer in several blocks), with the `kills` of the plan made as their moment comes (in any
    order). With `s3` = (server, storage settings, bucket prefix) input and output live on that
    S3 server. Returns (keys, out, summary, the titles killed in order)."""
    import ray

    keys = catalog(tmp_path / "in", shards=4, per_shard=5, seconds=1.0)
    out = tmp_path / "out"
    d = config_dict(str(tmp_path / "in"), str(out), steps=1)
    count_markers = lambda: len(list(out.glob("*.stats.json")))  # noqa: E731
    if s3 is not None:
        server, storage, prefix = s3
        fs = server.filesystem()
        for shard in sorted((tmp_path / "in").glob("*.tar")):
            fs.put(str(shard), f"{prefix}/in/{shard.name}")
        d["io"] = {"input": f"s3://{prefix}/in/", "output": f"s3://{prefix}/out", "storage": storage}

        def count_markers() -> int:
            fs.invalidate_cache()
            return len([p for p in fs.find(f"{prefix}/out") if p.endswith(".stats.json")])

    d["runtime"]["tracks_per_call"] = 1
    ctx = ray.data.DataContext.get_current()
    old_block = ctx.target_max_block_size
    ctx.target_max_block_size = 64 * 1024
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["summary"] = P.run(config_from_dict(d), durable=durable)
        except Exception as exc:  # reported by the test
            result["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    killed: list[str] = []
    reached: dict[int, float] = {}  # markers count -> when first seen
    try:
        deadline = time.monotonic() + 400
        while thread.is_alive() and not all(k.done for k in kills) and time.monotonic() < deadline:
            markers = count_markers()
            reached.setdefault(markers, time.monotonic())
            for kill in kills:
                due = kill.at_once or (markers >= kill.after and time.monotonic() - reached[markers] > 4)
                pids = process_ids(kill.title) if due and not kill.done else []
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    kill.done = True
                    killed.append(kill.title)
                    reached[markers] = time.monotonic()  # the next kill comes 4 s later
            time.sleep(0.01 if any(k.at_once and not k.done for k in kills) else 0.05)
        thread.join(500)
    finally:
        ctx.target_max_block_size = old_block
    assert "error" not in result, result.get("error")
    return keys, out, result["summary"], killed


@pytest.mark.slow
def test_sigkill_of_a_read_task_a_protect_actor_and_the_writer_loses_nothing(tmp_path: Path, ray_session) -> None:
    """One run, four kills: a read task mid-read (Ray Data retries it), a protect actor (Ray
    restarts it and replays the batch in flight) and the shard writer twice while it holds partial
    multi-block shards (the successor rebuilds them from the spill). Every key exactly once."""
    plan = [Kill(READ, at_once=True), Kill(ACTOR, after=1), Kill(WRITER, after=1), Kill(WRITER, after=2)]
    keys, out, summary, killed = _run_with_kills(tmp_path, plan)
    assert sorted(killed) == sorted([READ, ACTOR, WRITER, WRITER]), killed
    assert summary.failed_shards == []
    assert sorted(p.name for p in out.glob("*.stats.json")) == [f"s-{i:03d}.stats.json" for i in range(4)]
    assert manifest_keys(out) == Counter(keys)  # every key exactly once
    assert not (out / TMP_DIR).exists() and not (out / LEASE_NAME).exists()


@pytest.mark.slow
def test_sigkill_of_a_memory_only_writer_is_never_silent(tmp_path: Path, ray_session) -> None:
    """The old in-memory writer loses the partial shards it held; the driver now names them (a
    rerun would redo them): committed + failed = every shard, exactly once."""
    _, out, summary, killed = _run_with_kills(tmp_path, [Kill(WRITER, after=1), Kill(WRITER, after=2)], durable=False)
    assert killed == [WRITER, WRITER]
    committed = {p.name[: -len(".stats.json")] for p in out.glob("*.stats.json")}
    failed = {shard_id for shard_id, _ in summary.failed_shards}
    assert committed | failed == {f"s-{i:03d}" for i in range(4)} and not committed & failed
    assert sum(manifest_keys(out).values()) == 5 * len(committed)
    assert all(why.startswith("no summary from the shard writer") for _, why in summary.failed_shards)


# ------------------------------------------------------------------ the same on a real S3 server


def test_lease_spill_and_fingerprint_on_s3(s3_store, tmp_path: Path) -> None:
    from pipeline.io.storage import input_fingerprint
    from pipeline.stages.write import spill_bytes, spill_rows

    server, options = s3_store
    out = OutputFolder("s3://lease/run-1", options)
    now = [1000.0]
    first = OutputLease(out, ttl_s=60, clock=lambda: now[0])
    first.acquire()
    first._stop.set()
    with pytest.raises(LeaseHeld, match=r"in use by another driver \(host .*pid"):
        OutputLease(out, ttl_s=60, clock=lambda: now[0]).acquire()
    now[0] += 61
    second = OutputLease(out, ttl_s=60, clock=lambda: now[0])
    second.acquire()  # stale: taken over
    assert second.read()["token"] == second.token
    second.release()
    assert second.read() is None

    rows = _shard_rows(tmp_path, "s-000", 2)
    out.write_spill("s-000", spill_bytes(rows[:1]))
    out.write_spill("s-000", spill_bytes(rows[1:]))
    back = [r[R.KEY] for data in out.read_spills("s-000") for r in spill_rows(data)]
    assert sorted(back) == ["k0", "k1"]
    out.remove_spill("s-000")
    assert out.read_spills("s-000") == [] and out.temp_files() == []

    server.filesystem().put(str(tmp_path / "in" / "s-000.tar"), "lease/in/s-000.tar")
    found = input_fingerprint("s3://lease/in/s-000.tar", options)
    assert found["size"] == (tmp_path / "in" / "s-000.tar").stat().st_size and found["etag"]


def _s3_manifest_keys(fs: Any, prefix: str) -> Counter:
    import pyarrow.parquet as pq

    fs.invalidate_cache()
    keys: Counter = Counter()
    for path in sorted(p for p in fs.find(prefix) if p.endswith(".parquet")):
        with fs.open(path, "rb") as f:
            keys.update(pq.read_table(f, columns=["key"]).column("key").to_pylist())
    return keys


def _s3_storage(server: Any) -> dict[str, Any]:
    return {"endpoint_url": server.endpoint_url, "addressing_style": "path", "region": "us-east-1"}


@pytest.mark.slow
def test_sigkill_on_s3_loses_nothing(s3_store, tmp_path: Path, ray_session) -> None:
    """A protect actor and the writer (multi-block shards, spill on S3) killed while input and
    output are on SeaweedFS: every key exactly once, no temp object, no lease left."""
    server, _ = s3_store
    prefix = "lease/kill"
    plan = [Kill(ACTOR, after=1), Kill(WRITER, after=1), Kill(WRITER, after=2)]
    keys, _, summary, killed = _run_with_kills(tmp_path, plan, s3=(server, _s3_storage(server), prefix))
    assert sorted(killed) == sorted([ACTOR, WRITER, WRITER]), killed
    assert summary.failed_shards == []
    fs = server.filesystem()
    assert _s3_manifest_keys(fs, f"{prefix}/out") == Counter(keys)
    left = [p for p in fs.find(f"{prefix}/out") if "/_tmp/" in p or p.endswith(LEASE_NAME)]
    assert left == []
