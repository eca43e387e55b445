"""Hostile shards: members are bytes, never unpickled; names never escape the output prefix; links
are not followed; the member size limit holds without reading the member."""

from __future__ import annotations

import io
import pickle
import tarfile
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import config_from_dict
from pipeline.io.shards import read_samples
from pipeline.stages import rows as R
from pipeline.stages.read import ReadSettings, read_shard
from tests.factories import EXTENSIONS, audio_bytes, read_members, written


class _CreatesFile:
    """Unpickling this calls open(path, 'w'): the file exists iff someone unpickled it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def payload(path: Path) -> bytes:
    return pickle.dumps(_CreatesFile(path))


def hostile_tar(path: Path, canary: Path, outside: Path) -> dict[str, bytes]:
    """A shard with pickles, traversal names, absolute names and links. Returns the safe members."""
    song = audio_bytes(1.0, 16000, 1)
    safe = {
        "song.wav": song,
        "song.pkl": payload(canary),
        "song.pt": payload(canary),
        "meta.pyd": payload(canary),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for name, data in safe.items():
            add(name, data)
        add("../escape.wav", song)
        add(f"{outside}/absolute.wav", song)  # an absolute name under the test's own folder
        add("a/../../escape2.wav", song)
        for name, kind, target in [
            ("symlink.wav", tarfile.SYMTYPE, "/etc/passwd"),
            ("hardlink.wav", tarfile.LNKTYPE, "song.wav"),
            ("dirlink.wav", tarfile.SYMTYPE, ".."),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
        fifo = tarfile.TarInfo("fifo.wav")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
    return safe


def test_pickles_are_bytes_and_never_unpickled(tmp_path: Path, monkeypatch) -> None:
    canary = tmp_path / "UNPICKLED"

    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled a shard member")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    shard = hostile_tar(tmp_path / "in" / "s.tar", canary, tmp_path / "outside")
    settings = ReadSettings(EXTENSIONS, 1 << 20, {})
    rows = list(read_shard({R.SHARD_ID: "s", R.SHARD_URL: str(tmp_path / "in" / "s.tar")}, settings))
    members, manifest, _ = written(rows, "passthrough")
    out = dict(members)
    assert out["song.pkl"] == shard["song.pkl"] and out["song.pt"] == shard["song.pt"]
    assert out["meta.pyd"] == shard["meta.pyd"]  # a non-audio key passed through as bytes
    assert not canary.exists()
    by_key = {m.key: m for m in manifest}
    assert by_key["song"].status.value == "ok" and by_key["meta"].status.value == "error"


def test_traversal_and_links_are_errors_never_written(tmp_path: Path) -> None:
    shard = tmp_path / "in" / "s.tar"
    hostile_tar(shard, tmp_path / "UNPICKLED", tmp_path / "outside")
    samples, error = read_samples(str(shard), max_member_bytes=1 << 20)
    assert error == ""
    errors = {s.key: s.error for s in samples if s.error}
    assert errors == {
        "../escape": "member name escapes its folder ('..')",
        f"{tmp_path}/outside/absolute": "absolute member name",
        "a/../../escape2": "member name escapes its folder ('..')",
        "symlink": "link or special member (not followed)",
        "hardlink": "link or special member (not followed)",
        "dirlink": "link or special member (not followed)",
        "fifo": "link or special member (not followed)",
    }
    assert all(d == b"" for s in samples if s.error for d in s.data)  # nothing read behind a link
    settings = ReadSettings(EXTENSIONS, 1 << 20, {})
    rows = list(read_shard({R.SHARD_ID: "s", R.SHARD_URL: str(shard)}, settings))
    for policy in ("passthrough", "drop"):
        members, _, _ = written(rows, policy)
        names = [n for n, _ in members]
        assert not any(n.startswith("/") or ".." in n.split("/") or "link" in n or "fifo" in n for n in names)


def test_size_limit_holds_without_reading_the_member(tmp_path: Path) -> None:
    big = 64 << 20
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("huge.wav")
        info.size = big
        tar.addfile(info, io.BytesIO(bytes(big)))  # zeros, written once here
        small = audio_bytes(0.2, 8000, 1)
        info = tarfile.TarInfo("small.wav")
        info.size = len(small)
        tar.addfile(info, io.BytesIO(small))
    tracemalloc.start()
    try:
        samples, error = read_samples(str(path), max_member_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error == ""
    assert "member too large: huge.wav has 67108864 bytes" in samples[0].error
    assert samples[0].data == [b""] and samples[1].data == [small]
    assert peak < 8 << 20, f"peak {peak} bytes while skipping a {big}-byte member"


@pytest.mark.slow
def test_hostile_shard_through_the_pipeline(tmp_path: Path, ray_session) -> None:
    from pipeline.stages.pipeline import run

    canary = tmp_path / "UNPICKLED"
    outside = tmp_path / "outside"
    shard = hostile_tar(tmp_path / "in" / "s.tar", canary, outside)
    before = {p for p in tmp_path.rglob("*")}
    cfg = config_from_dict(
        {
            "io": {"input": str(tmp_path / "in"), "output": str(tmp_path / "out" / "run")},
            "encoder": {"checkpoint": "random:HTSAT-tiny:0"},
            "attack": {"steps": 1},
            "audio": {"window_seconds": 1.0, "overlap_seconds": 0.25},
            "runtime": {"progress": False},
        }
    )
    summary = run(cfg)
    assert summary.processed_shards == 1
    assert not canary.exists()
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(str(p).startswith(str(tmp_path / "out" / "run")) or p == tmp_path / "out" for p in created)
    assert not outside.exists() and not (tmp_path / "escape.wav").exists()
    output = read_members(tmp_path / "out" / "run" / "s.tar")
    assert set(output) == {"song.wav", "song.pkl", "song.pt", "meta.pyd"}
    assert output["song.pkl"] == shard["song.pkl"] and output["meta.pyd"] == shard["meta.pyd"]
    manifest = pq.read_table(tmp_path / "out" / "run" / "s.parquet").to_pylist()
    assert len(manifest) == 9 and sum(r["status"] == "ok" for r in manifest) == 1
