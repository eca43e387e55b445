"""Encode stage (CPU tasks) and the shard writer (one CPU actor that regroups keys into shards and
commits each shard once all its keys have arrived: tar, Parquet manifest, then the stats marker)."""

from __future__ import annotations

import bisect
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.io.audio import AudioEncodeError, OutputFormat, check_written, encode
from pipeline.io.manifest import commit_files, commit_shard, parquet_bytes
from pipeline.io.output import OutputFolder
from pipeline.io.parquet_audio import replace_audio
from pipeline.io.shards import build_tar, split_name
from pipeline.io.storage import UNCOMMITTED_SHARD_ERRORS
from pipeline.records import ManifestRow, SampleStatus, ShardStats
from pipeline.stages import rows as R
from pipeline.stages.read import ReadSettings, read_unit_samples
from pipeline.stages.segments import assemble, is_segment

logger = logging.getLogger(__name__)

# One summary row per shard. `failed` is '' for a committed shard, else why it was not committed
# (no marker: the next run does it again); its stats then count no items, only the error kind.
SUMMARY_COLUMNS = ["shard_id", "items", "ok", "error", "delta_e_sum", "audio_seconds", "stats_json", "failed"]
SHARD_FAILED = "shard failed"  # error kind in the stats of a shard that was not committed


@dataclass(frozen=True)
class EncodeSettings:
    eps: float  # attack.eps: the bound a lossless output must still hold once written


def output_format(row: dict[str, Any]) -> OutputFormat:
    return OutputFormat(row[R.OUT_FORMAT], row[R.OUT_SUBTYPE], row[R.OUT_EXT], int(row.get(R.OUT_BITRATE) or 0))


def encode_row(row: dict[str, Any], eps: float) -> None:
    """One ok row's protected float32 PCM -> AUDIO_BYTES in its output format, then those bytes
    decoded again and measured against the clean PCM (when the row carries it): LINF_WRITTEN,
    EPS_BOUND_HOLDS, LOSSY_OUTPUT, DELTA_E_WRITTEN. A failure makes the row an 'encode:' error."""
    shape = (row[R.N_SAMPLES], row[R.CHANNELS])
    samples = np.frombuffer(row[R.PCM], dtype=np.float32).reshape(shape)
    clean_pcm = row.get(R.CLEAN_PCM) or b""
    clean = np.frombuffer(clean_pcm, dtype=np.float32).reshape(shape) if clean_pcm else None
    out = output_format(row)
    row[R.LOSSY_OUTPUT] = out.lossy
    try:
        row[R.AUDIO_BYTES] = encode(samples, row[R.SAMPLE_RATE], out)
        check = check_written(row[R.AUDIO_BYTES], clean, samples, row[R.SAMPLE_RATE], out, eps)
    except AudioEncodeError as exc:
        row.update({R.STATUS: SampleStatus.ERROR, R.ERROR: f"encode: {exc}", R.AUDIO_BYTES: b""})
        return
    row[R.LINF_WRITTEN] = check.linf
    row[R.EPS_BOUND_HOLDS] = check.bound_holds
    # The actor measured Δe on exactly these samples when they decode back unchanged.
    row[R.DELTA_E_WRITTEN] = float(row.get("delta_e_mean", float("nan"))) if check.exact else float("nan")


def encode_batch(batch: dict[str, Any], settings: EncodeSettings | None = None) -> dict[str, Any]:
    """map_batches body: protected float32 PCM -> encoded bytes in the output format, measured
    again after decoding (see encode_row); drops the float32 PCM and the clean PCM."""
    eps = settings.eps if settings is not None else float("nan")  # NaN: the bound is never claimed
    rows = R.batch_to_rows(batch)
    for row in rows:
        row.update({R.AUDIO_BYTES: b"", R.LOSSY_OUTPUT: False, R.EPS_BOUND_HOLDS: False})
        row.update({R.LINF_WRITTEN: float("nan"), R.DELTA_E_WRITTEN: float("nan")})
        if is_segment(row):
            continue  # one part of a long track: the writer assembles, then encodes it (encode_row)
        if row[R.STATUS] == SampleStatus.OK and row[R.KIND] == R.KIND_SAMPLE:
            encode_row(row, eps)
        row[R.PCM] = b""
        row[R.CLEAN_PCM] = b""
    columns = list(rows[0].keys()) if rows else list(dict.fromkeys([*batch.keys(), R.AUDIO_BYTES, *R.WRITTEN]))
    return R.rows_to_batch(rows, columns)


@dataclass(frozen=True)
class WriteSettings:
    output: str
    storage_options: dict[str, Any]
    on_error: str  # passthrough | drop
    config_hash: str
    target_delta_e: float
    eps: float = float("nan")  # attack.eps: the bound checked on assembled long tracks (NaN: never claimed)
    max_member_bytes: int = 1 << 30  # for fetching a failed long track's original bytes again
    # Spill the rows of incomplete shards under _tmp/spill/ so that a restarted writer rebuilds its
    # state; False keeps them in memory only (a lost writer then fails those shards, see ShardWriter).
    durable: bool = True
    # shard id -> fingerprint of its input (size, ETag / mtime), recorded in the marker
    fingerprints: dict[str, dict[str, Any]] = field(default_factory=dict)
    layout: str = "shards"  # shards: one tar per unit | files: a mirrored tree | parquet: the file again
    audio_column: str = "audio"  # parquet layout: the column of {bytes, path} structs
    # parquet layout: unit id -> the input file's path under the input root (written at the same path)
    unit_paths: dict[str, str] = field(default_factory=dict)


def shard_outputs(
    rows: list[dict[str, Any]], settings: WriteSettings
) -> tuple[list[tuple[str, bytes]], list[ManifestRow], ShardStats]:
    """Tar members, manifest rows and stats of one complete shard (rows in any order)."""
    members: list[tuple[str, bytes]] = []
    manifest: list[ManifestRow] = []
    stats = ShardStats(shards=1, config_hash=settings.config_hash)
    for row in sorted(rows, key=lambda r: r[R.INDEX]):
        names, data, audio = row[R.MEMBER_NAMES] or [], row[R.MEMBER_DATA] or [], row[R.AUDIO_MEMBER]
        stats.encoder_id = stats.encoder_id or row.get(R.ENCODER_ID) or ""
        if row[R.KIND] == R.KIND_SHARD:
            if row[R.STATUS] == SampleStatus.ERROR:
                stats.add_error(row[R.ERROR])
                manifest.append(ManifestRow(key=row[R.KEY], status=SampleStatus.ERROR, error=row[R.ERROR]))
            continue
        if row[R.KIND] == R.KIND_COPY:  # a non-audio file of a tree, copied as it is (no manifest row)
            members.extend(zip(names, data, strict=True))
            continue
        stats.items += 1
        entry = ManifestRow(
            key=row[R.KEY],
            status=SampleStatus(row[R.STATUS]),
            error=row[R.ERROR],
            input_member=names[audio] if audio >= 0 else "",
            sample_rate=int(row[R.SAMPLE_RATE]),
            channels=int(row[R.CHANNELS]),
            duration_s=row[R.N_SAMPLES] / row[R.SAMPLE_RATE] if row[R.SAMPLE_RATE] else 0.0,
            encoder_id=row.get(R.ENCODER_ID) or "",
            config_hash=settings.config_hash,
        )
        if entry.status is SampleStatus.OK:
            for name in R.STATS:
                setattr(entry, name, int(row[name]) if name == "n_windows" else float(row[name]))
            entry.delta_e_by_encoder = json.loads(row.get(R.DELTA_E_BY_ENCODER) or "{}")
            entry.visqol_excerpt_starts_s, entry.visqol_excerpt_moslqo = R.visqol_lists(row)
            entry.visqol_measured = bool(row.get(R.VISQOL_MEASURED, False)) and bool(entry.visqol_excerpt_moslqo)
            if not entry.visqol_measured:
                entry.visqol_moslqo = float("nan")
            key, _ = split_name(names[audio])
            entry.output_member = f"{key}.{_replace_last(split_name(names[audio])[1], row[R.OUT_EXT])}"
            entry.output_format = output_format(row).label
            entry.lossy_output = bool(row.get(R.LOSSY_OUTPUT, False))
            entry.linf_written = float(row.get(R.LINF_WRITTEN, float("nan")))
            entry.eps_bound_holds = bool(row.get(R.EPS_BOUND_HOLDS, False))
            entry.delta_e_written = float(row.get(R.DELTA_E_WRITTEN, float("nan")))
            entry.written = True
            members.extend(
                (entry.output_member, row[R.AUDIO_BYTES]) if i == audio else (n, d)
                for i, (n, d) in enumerate(zip(names, data, strict=True))
            )
            stats.ok += 1
            stats.windows += entry.n_windows
            stats.audio_seconds += entry.duration_s
            stats.accelerator_seconds += entry.seconds
            stats.delta_e_sum += entry.delta_e_mean
            stats.delta_e_below_target += int(entry.delta_e_min < settings.target_delta_e)
        else:
            stats.error += 1
            stats.add_error(entry.error)
            if settings.on_error == "passthrough" and not entry.error.startswith("bad member") and any(data):
                members.extend(zip(names, data, strict=True))
                entry.written = True
                entry.output_member = entry.input_member
                stats.passthrough += 1
            else:
                stats.dropped += 1
        manifest.append(entry)
    return members, manifest, stats


def _plain(value: Any) -> Any:
    """A row value as plain Python (numpy arrays and scalars from Ray's batches -> lists, items)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def spill_bytes(rows: list[dict[str, Any]]) -> bytes:
    """Rows -> one Arrow IPC stream (plain columns only: no pickling, safe to read back)."""
    table = pa.Table.from_pylist([{k: _plain(v) for k, v in row.items()} for row in rows])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def spill_rows(data: bytes) -> list[dict[str, Any]]:
    """The rows of one spill object (inverse of spill_bytes)."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all().to_pylist()


def _replace_last(extension: str, new_last: str) -> str:
    """'audio.mp3' with 'flac' -> 'audio.flac' (keeps any inner extension parts)."""
    head, _, _ = extension.rpartition(".")
    return f"{head}.{new_last}" if head else new_last


def shard_summary(shard_id: str, stats: ShardStats, failed: str) -> dict[str, Any]:
    """The one summary row per shard the driver receives ("failed": empty, or why it failed)."""
    return {
        "shard_id": shard_id,
        "items": stats.items,
        "ok": stats.ok,
        "error": stats.error,
        "delta_e_sum": stats.delta_e_sum,
        "audio_seconds": stats.audio_seconds,
        "stats_json": stats.to_json(),
        "failed": failed,
    }


class ShardWriter:
    """map_batches callable class (a single actor): gathers rows per shard until all `shard_items`
    rows have arrived, then commits the shard and emits one summary row for it.

    Its state survives its own death (Ray restarts the actor and replays only the batch in flight):
    with `settings.durable`, rows of a shard still incomplete at the end of a call are first
    written under `_tmp/spill/<shard>/` (Arrow IPC, one object per call and shard), and a restarted
    writer reloads them the first time it sees that shard again. Rows are keyed by (index,
    segment), so a replayed batch adds nothing twice, and rows of a shard whose marker exists
    (committed by this run before the restart) are ignored. A shard that still never completes is
    failed by the driver (no summary), never lost silently."""

    def __init__(self, settings: WriteSettings):
        self.settings = settings
        self.out = OutputFolder(settings.output, settings.storage_options)
        self.pending: dict[str, list[dict[str, Any]]] = {}  # shard -> complete track rows
        self.seen: dict[str, set[tuple[int, int]]] = {}  # shard -> (index, segment) of rows received
        self.segments: dict[tuple[str, int], list[dict[str, Any]]] = {}  # (shard, index) -> parts
        self.started: dict[str, float] = {}
        self.committed: set[str] = set()  # shards this writer found committed: later rows are replays

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        summaries = []
        fresh: dict[str, list[dict[str, Any]]] = {}  # rows of this call, per shard, to spill
        for row in R.batch_to_rows(batch):
            shard_id = row[R.SHARD_ID]
            if shard_id not in self.seen and shard_id not in self.committed:
                self._restore(shard_id)
            if shard_id in self.committed:
                continue
            copy = dict(row)
            if not self._accept(row):
                continue  # a replayed row already held
            fresh.setdefault(shard_id, []).append(copy)
            if len(self.seen[shard_id]) == row[R.SHARD_ITEMS]:
                summaries.append(self._commit(shard_id, self.pending.pop(shard_id)))
                del self.seen[shard_id]
                self.committed.add(shard_id)
                fresh.pop(shard_id, None)
                if self.settings.durable:
                    self.out.remove_spill(shard_id)
        if self.settings.durable:
            for shard_id, rows in fresh.items():
                self.out.write_spill(shard_id, spill_bytes(rows))
        return {c: [s[c] for s in summaries] for c in SUMMARY_COLUMNS}

    def _accept(self, row: dict[str, Any]) -> bool:
        """Take one row into the shard's state; False when the same (index, segment) was already held."""
        shard_id = row[R.SHARD_ID]
        seen = self.seen.setdefault(shard_id, set())
        ident = (int(row[R.INDEX]), int(row.get(R.SEGMENT) or 0))
        if ident in seen:
            return False
        seen.add(ident)
        self.started.setdefault(shard_id, time.perf_counter())
        bucket = self.pending.setdefault(shard_id, [])
        if is_segment(row):
            parts = self.segments.setdefault((shard_id, row[R.INDEX]), [])
            parts.append(row)
            if len(parts) == row[R.SEGMENTS]:
                bucket.append(self._assemble(self.segments.pop((shard_id, row[R.INDEX]))))
        else:
            bucket.append(row)
        return True

    def _restore(self, shard_id: str) -> None:
        """First sight of a shard in this writer process: is it committed already (by an earlier
        instance of this writer, in this run), or did an earlier instance spill rows of it?"""
        if not self.settings.durable:
            return
        if self.out.exists(self.out.marker_name(shard_id)):
            self.committed.add(shard_id)
            return
        restored = 0
        for data in self.out.read_spills(shard_id):
            for row in spill_rows(data):
                restored += self._accept(row)
        if restored:
            logger.warning("shard %s: %d row(s) restored from the spill of an earlier writer", shard_id, restored)

    def _assemble(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """The segment rows of one long track -> one encoded track row (as encode_batch makes).
        A failed track gets its original audio bytes back from the input shard, for passthrough."""
        try:
            row = assemble(parts, self.settings.eps)
        except Exception as exc:  # a track that cannot be put together fails alone
            row = {**parts[0], R.STATUS: SampleStatus.ERROR, R.ERROR: f"assemble: {type(exc).__name__}: {exc}"}
        parts.clear()
        row.update({R.AUDIO_BYTES: b"", R.LOSSY_OUTPUT: False, R.EPS_BOUND_HOLDS: False})
        row.update({R.LINF_WRITTEN: float("nan"), R.DELTA_E_WRITTEN: float("nan")})
        if row[R.STATUS] == SampleStatus.OK:
            encode_row(row, self.settings.eps)
        row[R.PCM] = row[R.CLEAN_PCM] = b""
        if row[R.STATUS] != SampleStatus.OK and self.settings.on_error == "passthrough":
            self._restore_original_members(row)
        return row

    def _restore_original_members(self, row: dict[str, Any]) -> None:
        """Put the item's original member bytes back, read again from the input shard (segment
        rows carry the long audio member's bytes nowhere, to keep it out of the actors' memory).
        If the shard no longer holds them, only the other members pass through, and the error says so."""
        unit = {R.LAYOUT: self.settings.layout, R.SHARD_URL: row[R.SHARD_URL], R.UNIT_FILES: json.dumps([row[R.KEY]])}
        read = ReadSettings(
            extensions=(),
            max_member_bytes=self.settings.max_member_bytes,
            storage_options=self.settings.storage_options,
            audio_column=self.settings.audio_column,
        )
        samples, problem = read_unit_samples(unit, read)
        names = list(row[R.MEMBER_NAMES])
        matches = [s for s in samples if s.key == row[R.KEY] and list(s.names) == names and not s.error]
        if matches:
            row[R.MEMBER_DATA] = [bytes(d) for d in matches[0].data]
            return
        audio = row[R.AUDIO_MEMBER]
        why = problem or "member not found"
        row[R.ERROR] += f"; the original audio could not be read again ({why}), so it is left out"
        row[R.MEMBER_NAMES] = [n for i, n in enumerate(names) if i != audio]
        row[R.MEMBER_DATA] = [d for i, d in enumerate(row[R.MEMBER_DATA]) if i != audio]
        row[R.AUDIO_MEMBER] = -1

    def _commit(self, shard_id: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        started = self.started.pop(shard_id, time.perf_counter())
        storage = [
            r[R.ERROR] for r in rows if r[R.KIND] == R.KIND_SHARD and r[R.ERROR].startswith(UNCOMMITTED_SHARD_ERRORS)
        ]
        if storage:
            return self._failed(shard_id, storage[0])
        try:
            members, manifest, stats = shard_outputs(rows, self.settings)
            stats.wall_seconds = time.perf_counter() - started
            stats.input = dict(self.settings.fingerprints.get(shard_id, {}))
            self._write_unit(shard_id, rows, members, manifest, stats)
        except Exception as exc:  # a shard that cannot be written fails alone, never the run
            return self._failed(shard_id, f"write: {type(exc).__name__}: {exc}")
        return shard_summary(shard_id, stats, "")

    def _write_unit(
        self,
        shard_id: str,
        rows: list[dict[str, Any]],
        members: list[tuple[str, bytes]],
        manifest: list[ManifestRow],
        stats: ShardStats,
    ) -> None:
        """Write a complete unit in its layout; the marker always last."""
        if self.settings.layout == "files":
            commit_files(self.out, shard_id, members, manifest, stats)
            return
        if self.settings.layout == "parquet":
            self._write_parquet(shard_id, rows, manifest, stats)
            return
        commit_shard(self.out, shard_id, build_tar(members), manifest, stats)

    def _write_parquet(
        self, shard_id: str, rows: list[dict[str, Any]], manifest: list[ManifestRow], stats: ShardStats
    ) -> None:
        """The input Parquet file again at its path, with each protected row's audio replaced (a
        failed row keeps its audio under passthrough, is left out under drop, and the manifest's
        output_member then names each kept row by its new position), then manifest and marker.
        A file that could not be read as a dataset at all is not written (its manifest says why)."""
        readable = not any(r[R.KIND] == R.KIND_SHARD and r[R.STATUS] == SampleStatus.ERROR for r in rows)
        if readable:
            entries = {entry.key: entry for entry in manifest}
            replacements: dict[int, tuple[bytes, str] | None] = {}
            for row in rows:
                entry = entries.get(row[R.KEY])
                if row[R.KIND] != R.KIND_SAMPLE or entry is None:
                    continue
                if entry.status is SampleStatus.OK:
                    replacements[int(row[R.INDEX])] = (row[R.AUDIO_BYTES], row[R.OUT_EXT])
                elif not entry.written:
                    replacements[int(row[R.INDEX])] = None
            dropped = sorted(index for index, value in replacements.items() if value is None)
            if dropped:  # later rows move up: output_member names the row where it now is
                for row in rows:
                    entry = entries.get(row[R.KEY])
                    if row[R.KIND] == R.KIND_SAMPLE and entry is not None and entry.written:
                        index = int(row[R.INDEX])  # output_member is f"{key}.{ext}", key the input row
                        new_key = f"{index - bisect.bisect_left(dropped, index):08d}"
                        entry.output_member = new_key + entry.output_member[len(entry.key) :]
            url = rows[0][R.SHARD_URL]
            data = replace_audio(url, self.settings.storage_options, self.settings.audio_column, replacements)
            self.out.write_atomic(self.settings.unit_paths[shard_id], data)
        self.out.write_atomic(f"{shard_id}.parquet", parquet_bytes(manifest))
        self.out.write_atomic(self.out.marker_name(shard_id), stats.to_json().encode())

    def _failed(self, shard_id: str, reason: str) -> dict[str, Any]:
        """Summary of a shard left without a marker (so it stays pending for the next run)."""
        logger.error("shard %s not committed (it stays pending): %s", shard_id, reason)
        stats = ShardStats(config_hash=self.settings.config_hash)
        stats.add_error(f"{SHARD_FAILED}: {reason}")
        summary: dict[str, Any] = {"shard_id": shard_id, "items": 0, "ok": 0, "error": 0, "delta_e_sum": 0.0}
        return {**summary, "audio_seconds": 0.0, "stats_json": stats.to_json(), "failed": reason}
