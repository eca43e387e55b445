"""Parquet audio datasets (the layout Hugging Face `datasets` writes for an `Audio` feature: a
column of {bytes, path} structs next to any other columns): list the files, read one file's audio
as samples, and write the same file back with protected audio bytes.

Everything else in the file (other columns, row order, the schema and its metadata, e.g. the
`huggingface` features entry) is kept, so the output loads like the input did."""

from __future__ import annotations

import io
import posixpath
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.shards import Sample, ShardRef
from pipeline.io.storage import (
    ShardError,
    describe_storage_error,
    filesystem,
    is_transient,
    listing,
    with_retries,
)
from pipeline.io.tree import reserved_reason, unit_id

BAD_DATASET = "bad dataset"  # permanent: the file is no Parquet, or has no usable audio column
DEFAULT_EXTENSION = "flac"  # member name of a row whose audio has no path (decoding probes the bytes anyway)


def list_parquet(input_url: str, storage_options: Mapping[str, Any] | None = None) -> list[ShardRef]:
    """One unit per .parquet file under a folder/prefix (recursively), or the one file named; each
    unit remembers its path under the root (`files[0]`), where its output goes.

    Raises:
        ShardError: nothing found, or the input cannot be listed.
    """
    fs, path = filesystem(input_url, storage_options)
    path = path.rstrip("/")
    protocol = input_url.split("://", 1)[0] + "://" if "://" in input_url else ""
    try:
        if path.endswith(".parquet"):
            found, root = [path], posixpath.dirname(path)
        else:
            found, root = listing(lambda: sorted(fs.find(path)), input_url), path
    except FileNotFoundError as exc:
        raise ShardError(f"input not found: {input_url}") from exc
    refs = []
    for full in found:
        rel = str(full)[len(root) :].lstrip("/")
        if not rel.endswith(".parquet") or any(p.startswith((".", "_")) for p in rel.split("/")):
            continue
        if reserved_reason(rel):
            continue
        url = protocol + str(full) if protocol and not str(full).startswith(protocol) else str(full)
        refs.append(ShardRef(url=url, shard_id=unit_id([rel]), layout="parquet", files=(rel,)))
    if not refs:
        raise ShardError(f"no .parquet files at {input_url}")
    return refs


def _member_name(index: int, path: str | None) -> str:
    """`<8-digit row>.<extension of the row's path>` (the sample's only member)."""
    base = posixpath.basename(path or "")
    ext = base.rsplit(".", 1)[-1].lower() if "." in base else DEFAULT_EXTENSION
    return f"{index:08d}.{ext}"


def read_parquet_samples(
    url: str, storage_options: Mapping[str, Any] | None, max_member_bytes: int, column: str
) -> tuple[list[Sample], str]:
    """One sample per row of a Parquet file: key = the row number (8 digits), one member
    `<key>.<ext>` holding the row's audio bytes (read one record batch at a time, only `column`).

    Returns:
        (samples, file-level error: '' | "bad dataset: ..." (permanent) | a storage error, see
        `pipeline.io.storage.describe_storage_error`, which leaves the unit for the next run).
    """
    fs, path = filesystem(url, storage_options)
    samples: list[Sample] = []
    try:
        with fs.open(path, "rb") as handle:
            try:
                parquet = pq.ParquetFile(handle)
            except (pa.ArrowInvalid, OSError) as exc:
                if isinstance(exc, OSError) and is_transient(exc):
                    raise
                return [], f"{BAD_DATASET}: not a Parquet file ({exc})"
            problem = _audio_column_problem(parquet.schema_arrow, column)
            if problem:
                return [], f"{BAD_DATASET}: {problem}"
            index = 0
            for batch in parquet.iter_batches(columns=[column], batch_size=64):
                for value in batch.column(0).to_pylist():
                    samples.append(_sample(index, value, max_member_bytes))
                    index += 1
    except Exception as exc:
        if not (isinstance(exc, OSError) or is_transient(exc)):
            raise
        return [], describe_storage_error(exc, url)
    return samples, ""


def _audio_column_problem(schema: pa.Schema, column: str) -> str:
    """Why `column` cannot hold audio as {bytes, path} structs ('' when it can)."""
    if column not in schema.names:
        return f"no column {column!r} (columns: {', '.join(schema.names)}; set io.audio_column)"
    kind = schema.field(column).type
    if not pa.types.is_struct(kind) or kind.get_field_index("bytes") < 0:
        return f"column {column!r} is {kind}, not a struct with a 'bytes' field (Hugging Face Audio)"
    return ""


def _sample(index: int, value: Any, max_member_bytes: int) -> Sample:
    value = value or {}
    data, path = value.get("bytes"), value.get("path")
    name = _member_name(index, path)
    key = name.split(".", 1)[0]
    if not data:
        where = f" (path {path!r} is not embedded)" if path else ""
        return Sample(key=key, names=[name], data=[b""], error=f"row has no audio bytes{where}")
    if len(data) > max_member_bytes:
        return Sample(key=key, names=[name], data=[b""], error=f"member too large: {len(data)} > {max_member_bytes}")
    return Sample(key=key, names=[name], data=[bytes(data)])


def replace_audio(
    url: str,
    storage_options: Mapping[str, Any] | None,
    column: str,
    replacements: Mapping[int, tuple[bytes, str] | None],
) -> bytes:
    """The Parquet file at `url` with the audio of some rows replaced: row -> (bytes, new
    extension) or None to drop the row; other rows, columns, schema metadata and row order kept.
    A changed extension is applied to the row's `path` too (when it has one)."""
    fs, path = filesystem(url, storage_options)
    table = with_retries(lambda: pq.read_table(fs.open(path, "rb")), f"read {url}")
    audio = table.column(column).to_pylist()
    keep = []
    for index, value in enumerate(audio):
        if index not in replacements:
            keep.append(index)
            continue
        new = replacements[index]
        if new is None:
            continue
        data, extension = new
        value = dict(value or {})
        value["bytes"] = data
        if value.get("path") and "." in posixpath.basename(value["path"]):
            value["path"] = value["path"].rsplit(".", 1)[0] + "." + extension
        audio[index] = value
        keep.append(index)
    field = table.schema.field(column)
    new_column = pa.array([audio[i] for i in keep], type=field.type)
    table = table.take(pa.array(keep, type=pa.int64())) if len(keep) != table.num_rows else table
    table = table.set_column(table.schema.get_field_index(column), field, new_column)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()
