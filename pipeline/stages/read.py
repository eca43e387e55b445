"""Read stage (CPU): one shard URL -> one row per WebDataset key, audio decoded to float32 PCM."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.io.audio import LOSSY_FORMATS, AudioDecodeError, decode, output_format_for, probe_bitrate_kbps
from pipeline.io.parquet_audio import read_parquet_samples
from pipeline.io.shards import SHARD_ERROR_KEY, Sample, read_samples, split_name
from pipeline.io.tree import has_extension, read_unit
from pipeline.records import SampleStatus
from pipeline.stages import rows as R
from pipeline.stages.segments import segment_count, track_rows


@dataclass(frozen=True)
class ReadSettings:
    """What the read stage needs of the config (plain values: shipped to Ray workers)."""

    extensions: tuple[str, ...]
    max_member_bytes: int
    storage_options: dict[str, Any]
    lossy_output: str = "flac"  # flac | same: how MP3/Ogg members are written (audio.lossy_output)
    segment_seconds: float = float("inf")  # longer tracks become segment rows (audio.segment_seconds)
    overlap_seconds: float = 1.0  # crossfade between segments (audio.overlap_seconds)
    audio_column: str = "audio"  # parquet layout: the column of {bytes, path} structs (io.audio_column)


_ADDRESS = re.compile(r"<[^<>]* (object )?at 0x[0-9a-fA-F]+>")


def stable_message(message: str) -> str:
    """An error message without object addresses (libsndfile names its `<BytesIO at 0x..>`), so
    that the same bad input gives the same manifest on every run."""
    return _ADDRESS.sub("<bytes>", message)


def sample_row(sample: Sample, settings: ReadSettings) -> dict[str, Any]:
    """Classify and decode one sample; errors become data (status 'error' + message)."""
    row: dict[str, Any] = {
        R.KEY: sample.key,
        R.KIND: R.KIND_SAMPLE,
        R.STATUS: SampleStatus.OK,
        R.ERROR: "",
        R.MEMBER_NAMES: list(sample.names),
        R.MEMBER_DATA: list(sample.data),
        R.AUDIO_MEMBER: -1,
        R.PCM: b"",
        R.N_SAMPLES: 0,
        R.CHANNELS: 0,
        R.SAMPLE_RATE: 0,
        R.OUT_FORMAT: "",
        R.OUT_SUBTYPE: "",
        R.OUT_EXT: "",
        R.OUT_BITRATE: 0,
    }
    audio = [
        i for i, n in enumerate(sample.names) if split_name(n)[1].rsplit(".", 1)[-1].lower() in settings.extensions
    ]
    if sample.error:
        row.update({R.STATUS: SampleStatus.ERROR, R.ERROR: f"bad member: {sample.error}"})
    elif not audio:
        row.update({R.STATUS: SampleStatus.ERROR, R.ERROR: "no audio member: none of " + ", ".join(sample.names)})
    elif len(audio) > 1:
        names = ", ".join(sample.names[i] for i in audio)
        row.update({R.STATUS: SampleStatus.ERROR, R.ERROR: f"multiple audio members: {names}"})
    if row[R.STATUS] == SampleStatus.ERROR:
        if audio:
            row[R.AUDIO_MEMBER] = audio[0]
        return row
    index = audio[0]
    row[R.AUDIO_MEMBER] = index
    try:
        decoded = decode(sample.data[index])
    except AudioDecodeError as exc:
        row.update({R.STATUS: SampleStatus.ERROR, R.ERROR: f"decode: {stable_message(str(exc))}"})
        return row
    ext = split_name(sample.names[index])[1].rsplit(".", 1)[-1]
    bitrate = 0
    if settings.lossy_output == "same" and decoded.format in LOSSY_FORMATS:
        bitrate = probe_bitrate_kbps(sample.data[index], decoded.duration_s)  # ffprobe; 0: FLAC after all
    out = output_format_for(decoded.format, decoded.subtype, ext, settings.lossy_output, bitrate)
    row.update(
        {
            R.PCM: decoded.samples.tobytes(),
            R.N_SAMPLES: decoded.samples.shape[0],
            R.CHANNELS: decoded.channels,
            R.SAMPLE_RATE: decoded.sample_rate,
            R.OUT_FORMAT: out.format,
            R.OUT_SUBTYPE: out.subtype,
            R.OUT_EXT: out.extension,
            R.OUT_BITRATE: out.bitrate_kbps,
        }
    )
    return row


def read_unit_samples(shard: dict[str, Any], settings: ReadSettings) -> tuple[list[Sample], str]:
    """The samples of one unit of work, whatever its layout: a tar shard's keys, a Parquet file's
    rows, or a group of files under a root (see `pipeline.io.shards.read_samples` for the error)."""
    layout, url = shard.get(R.LAYOUT) or "shards", shard[R.SHARD_URL]
    if layout == "files":
        return read_unit(url, json.loads(shard[R.UNIT_FILES]), settings.storage_options, settings.max_member_bytes)
    if layout == "parquet":
        return read_parquet_samples(url, settings.storage_options, settings.max_member_bytes, settings.audio_column)
    return read_samples(url, settings.storage_options, settings.max_member_bytes)


def read_shard(shard: dict[str, Any], settings: ReadSettings) -> Iterator[dict[str, Any]]:
    """flat_map body: every key of the shard as a row; a shard-level problem (missing, truncated
    tar, storage failure) or an empty shard adds one row of kind 'shard' (key `__shard__`) whose
    error starts with the problem's kind (see `pipeline.io.storage`), so that the writer still hears
    of the shard: it completes it, or for storage failures leaves it for the next run."""
    samples, shard_error = read_unit_samples(shard, settings)
    rows = [sample_row(s, settings) for s in samples]
    if shard.get(R.LAYOUT) == "files":  # a unit's non-audio files (io.copy_other_files) are copied as they are
        for row in rows:
            if not has_extension(row[R.KEY], settings.extensions) and not row[R.ERROR].startswith("bad member"):
                row.update({R.KIND: R.KIND_COPY, R.STATUS: SampleStatus.OK, R.ERROR: "", R.AUDIO_MEMBER: -1})
    if shard_error or not samples:
        rows.append(
            {
                **sample_row(Sample(key=SHARD_ERROR_KEY), settings),
                R.KIND: R.KIND_SHARD,
                R.STATUS: SampleStatus.ERROR if shard_error else "ok",
                R.ERROR: stable_message(shard_error),
            }
        )
    # A long track becomes several rows sharing its INDEX; SHARD_ITEMS counts rows, so the writer
    # knows when every row of the shard has arrived. Tracks are split one at a time, and each
    # decoded track is released once its rows are handed on.
    split = (settings.segment_seconds, settings.overlap_seconds)
    total = sum(segment_count(row, *split) for row in rows)
    for index in range(len(rows)):
        row, rows[index] = rows[index], None
        for part in track_rows(row, *split):
            part.update(
                {
                    R.SHARD_ID: shard[R.SHARD_ID],
                    R.SHARD_URL: shard[R.SHARD_URL],
                    R.SHARD_ITEMS: total,
                    R.INDEX: index,
                }
            )
            yield part
