"""Per-shard Parquet manifests and stats markers on storage; totals merged from the markers."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq

from pipeline.io.output import OutputFolder
from pipeline.records import ManifestRow, ShardStats, manifest_table


def parquet_bytes(rows: list[ManifestRow]) -> bytes:
    """Rows -> Parquet file bytes with the fixed manifest schema."""
    buffer = io.BytesIO()
    pq.write_table(manifest_table(rows), buffer, compression="zstd")
    return buffer.getvalue()


def commit_shard(out: OutputFolder, shard_id: str, tar: bytes, rows: list[ManifestRow], stats: ShardStats) -> None:
    """Write `<id>.tar` and `<id>.parquet` atomically, then `<id>.stats.json` last (the marker)."""
    out.write_atomic(f"{shard_id}.tar", tar)
    out.write_atomic(f"{shard_id}.parquet", parquet_bytes(rows))
    out.write_atomic(out.marker_name(shard_id), stats.to_json().encode())


FILE_WRITE_THREADS = 8  # parallel uploads of a unit's mirrored files


def commit_files(
    out: OutputFolder, unit_id: str, files: list[tuple[str, bytes]], rows: list[ManifestRow], stats: ShardStats
) -> None:
    """Files mode: write each (relative path, bytes) atomically at its path under the output (in
    parallel), then `<unit>.parquet`, then `<unit>.stats.json` last (the marker)."""
    with ThreadPoolExecutor(max_workers=FILE_WRITE_THREADS) as pool:
        list(pool.map(lambda item: out.write_atomic(*item), files))
    out.write_atomic(f"{unit_id}.parquet", parquet_bytes(rows))
    out.write_atomic(out.marker_name(unit_id), stats.to_json().encode())


def merge_stats(out: OutputFolder) -> ShardStats:
    """Sum the stats markers of every completed shard under `out` (earlier runs included)."""
    total = ShardStats()
    for shard_id in sorted(out.completed()):
        total = total + ShardStats.from_json(out.read_text(out.marker_name(shard_id)))
    return total
