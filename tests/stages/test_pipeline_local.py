"""The real Ray Data pipeline on local folders: shards in, protected shards + manifests out,
resume, a corrupt member, and stock readers (webdataset, pyarrow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import config_from_dict
from pipeline.io.audio import decode
from pipeline.records import MANIFEST_SCHEMA, ShardStats
from tests.factories import audio_bytes, read_members, write_shard

EPS = 0.003


def _catalog(folder: Path) -> None:
    write_shard(
        folder / "part-a.tar",
        [
            ("a1.flac", audio_bytes(11.0, 22050, 2, "FLAC", "PCM_16", seed=1)),
            ("a1.json", b'{"title": "one"}'),
            ("a2.wav", audio_bytes(1.5, 16000, 1, "WAV", "PCM_16", seed=2)),
            ("a3.wav", b"RIFF....this is not audio"),
            ("a3.txt", b"lyrics"),
        ],
    )
    write_shard(
        folder / "part-b.tar",
        [
            ("b1.wav", audio_bytes(1.0, 8000, 1, "WAV", "FLOAT", seed=3)),
            ("b2.ogg", audio_bytes(1.0, 22050, 2, "OGG", "VORBIS", seed=4)),
        ],
    )


def _cfg(tmp_path: Path, **attack):
    return config_from_dict(
        {
            "io": {"input": str(tmp_path / "in"), "output": str(tmp_path / "out")},
            "encoder": {"checkpoint": "random:HTSAT-tiny:0", "device": "cpu"},
            "attack": {"eps": EPS, "steps": 1, "precision": "fp32", **attack},
            "runtime": {"tracks_per_call": 2, "batch_windows": 4, "progress": False, "torch_threads": 2},
        }
    )


@pytest.mark.slow
def test_local_pipeline_end_to_end_and_resume(tmp_path: Path, ray_session) -> None:
    import webdataset as wds

    from pipeline.stages.pipeline import run

    _catalog(tmp_path / "in")
    cfg = _cfg(tmp_path)
    summary = run(cfg)
    out = tmp_path / "out"
    assert summary.processed_shards == 2
    assert (summary.this_run.ok, summary.this_run.error) == (4, 1)
    assert summary.random_encoder

    # Manifest: one row per key, fixed schema, the corrupt member is an error row.
    table = pq.read_table(out / "part-a.parquet")
    assert table.schema.names == MANIFEST_SCHEMA.names
    rows = {r["key"]: r for r in table.to_pylist()}
    assert set(rows) == {"a1", "a2", "a3"}
    assert rows["a3"]["status"] == "error" and rows["a3"]["error"].startswith("decode:")
    assert rows["a1"]["status"] == "ok" and rows["a1"]["n_windows"] == 2 and rows["a1"]["channels"] == 2
    assert rows["a1"]["delta_e_mean"] > 0 and rows["a1"]["linf"] <= EPS + 1e-7
    assert rows["a1"]["encoder_id"] == "random:HTSAT-tiny:0" and len(rows["a1"]["config_hash"]) == 12

    # Output tar: same keys; non-audio members byte-identical; audio within ε, same rate/channels/length.
    original = read_members(tmp_path / "in" / "part-a.tar")
    protected = read_members(out / "part-a.tar")
    assert set(protected) == set(original)
    for name in ("a1.json", "a3.wav", "a3.txt"):
        assert protected[name] == original[name]
    clean, prot = decode(original["a1.flac"]), decode(protected["a1.flac"])
    assert (prot.sample_rate, prot.channels, prot.samples.shape, prot.format, prot.subtype) == (
        clean.sample_rate,
        clean.channels,
        clean.samples.shape,
        "FLAC",
        "PCM_16",
    )
    assert 0 < np.abs(prot.samples.astype(np.float64) - clean.samples).max() <= EPS + 1e-7

    # Lossy input -> FLAC with the mapping in the manifest; float WAV keeps its subtype.
    rows_b = {r["key"]: r for r in pq.read_table(out / "part-b.parquet").to_pylist()}
    assert rows_b["b2"]["output_member"] == "b2.flac" and rows_b["b2"]["output_format"] == "FLAC/PCM_16"
    assert rows_b["b1"]["output_format"] == "WAV/FLOAT"
    assert decode(read_members(out / "part-b.tar")["b1.wav"]).subtype == "FLOAT"

    # Stock readers.
    keys = [s["__key__"] for s in wds.WebDataset(str(out / "part-a.tar"), shardshuffle=False)]
    assert keys == ["a1", "a2", "a3"]
    stats = ShardStats.from_json((out / "part-a.stats.json").read_text())
    assert (stats.items, stats.ok, stats.error, stats.passthrough) == (3, 2, 1, 1)
    assert "decode" in stats.errors

    # Resume: a second run skips both shards; removing one marker redoes only that shard.
    tar_b_mtime = (out / "part-b.tar").stat().st_mtime_ns
    again = run(cfg)
    assert (again.processed_shards, again.skipped_shards) == (0, 2)
    (out / "part-a.stats.json").unlink()
    third = run(cfg)
    assert (third.processed_shards, third.skipped_shards) == (1, 1)
    assert (out / "part-b.tar").stat().st_mtime_ns == tar_b_mtime
    assert third.all_outputs.items == 5
    assert json.loads((out / "part-a.stats.json").read_text())["items"] == 3


@pytest.mark.slow
def test_drop_policy_leaves_failed_items_out(tmp_path: Path, ray_session) -> None:
    from pipeline.stages.pipeline import run

    write_shard(tmp_path / "in" / "s.tar", [("good.wav", audio_bytes(1.0, 16000, 1)), ("bad.wav", b"\x00" * 64)])
    cfg = config_from_dict(_cfg(tmp_path).to_dict(), ["audio.on_error=drop"])
    run(cfg)
    assert set(read_members(tmp_path / "out" / "s.tar")) == {"good.wav"}
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "s.parquet").to_pylist()}
    assert rows["bad"]["status"] == "error" and rows["bad"]["written"] is False
