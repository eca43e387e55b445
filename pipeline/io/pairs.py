"""Clean and protected bytes of items of a completed unit, whatever the run's layout: members of
an input and an output tar, files of a tree and its mirror, or rows of a Parquet dataset and its
protected copy. What the evaluation commands (robustness, transfer, report) compare."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.io.output import OutputFolder
from pipeline.io.parquet_audio import read_parquet_samples
from pipeline.io.shards import read_samples
from pipeline.io.tree import UNIT_PREFIX, file_url, read_file
from pipeline.records import ShardStats

MAX_ITEM_BYTES = 1 << 30


def unit_layout(out: OutputFolder, unit_id: str) -> tuple[str, str]:
    """(layout, the unit's input path under the input root for parquet units, else '') of a
    completed unit, from its id and marker."""
    if not unit_id.startswith(UNIT_PREFIX):
        return "shards", ""
    recorded = ShardStats.from_json(out.read_text(out.marker_name(unit_id))).input
    if "files" in recorded:
        return "files", ""
    return "parquet", str(recorded.get("url", ""))


def read_pairs(
    out: OutputFolder,
    unit_id: str,
    clean_url: str,
    members: list[tuple[str, str]],
    storage_options: Mapping[str, Any] | None = None,
    audio_column: str = "audio",
) -> dict[tuple[str, str], tuple[bytes, bytes]]:
    """(input member, output member) -> (clean bytes, protected bytes) for the items of one
    completed unit; items whose bytes cannot be found on either side are left out.

    `clean_url` is the run's input: the folder of the input shards, the tree's root, or the
    dataset's root (the Parquet unit's file is found at its recorded path under it)."""
    clean_root = clean_url.rstrip("/")
    layout, source = unit_layout(out, unit_id)
    if layout == "files":
        found = {}
        for input_member, output_member in members:
            try:
                clean = read_file(clean_root, input_member, storage_options, MAX_ITEM_BYTES)
                protected = read_file(out.url, output_member, storage_options, MAX_ITEM_BYTES)
            except (OSError, ValueError):
                continue
            found[(input_member, output_member)] = (clean, protected)
        return found
    if layout == "parquet":
        rel = source[len(clean_root) :].lstrip("/") if source.startswith(clean_root) else source.rsplit("/", 1)[-1]
        limit = MAX_ITEM_BYTES
        clean_samples, _ = read_parquet_samples(file_url(clean_root, rel), storage_options, limit, audio_column)
        prot_samples, _ = read_parquet_samples(file_url(out.url, rel), storage_options, limit, audio_column)
    else:
        clean_samples, _ = read_samples(f"{clean_root}/{unit_id}.tar", storage_options)
        prot_samples, _ = read_samples(out.url + f"/{unit_id}.tar", storage_options)
    clean_members = {n: d for s in clean_samples for n, d in zip(s.names, s.data)}
    prot_members = {n: d for s in prot_samples for n, d in zip(s.names, s.data)}
    return {
        (i, o): (clean_members[i], prot_members[o]) for i, o in members if i in clean_members and o in prot_members
    }
