"""File trees of audio (a label's folder of masters, a platform's prefix of uploads): what kind of
input a URL is, listing a tree in one request stream, grouping its files into units of work, and
reading one file with a size limit.

Files are only ever bytes here: decoding happens in the read stage (`pipeline.io.audio.decode`
probes the content; the extension only decides which files are audio at all)."""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline.io.shards import Sample, unsafe_name_reason
from pipeline.io.storage import (
    ShardError,
    describe_storage_error,
    filesystem,
    fingerprint_of,
    is_transient,
    join,
    listing,
    with_retries,
)

LAYOUTS = ("shards", "files", "parquet")  # io.input_format, besides "auto"
UNIT_PREFIX = "_unit-"  # manifests and markers of file units sit at the output root under this prefix
RESERVED_TOP = ("_tmp", "_lease.json", "_config.yaml")  # output names a mirrored file must not take


@dataclass(frozen=True)
class TreeFile:
    """One file under a tree's root."""

    rel: str  # path under the root, '/'-separated, no leading '/'
    size: int  # bytes
    fingerprint: dict[str, Any] = field(default_factory=dict)  # size + etag (S3) or mtime: see fingerprint_of


def detect_layout(input_url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """'shards' for .tar URLs, globs, brace lists and folders holding .tar files at their top;
    'parquet' for .parquet URLs and folders whose top (or data/) holds .parquet files; else 'files'."""
    if any(ch in input_url for ch in "{*?[") or input_url.endswith(".tar"):
        return "shards"
    if input_url.endswith(".parquet"):
        return "parquet"
    fs, path = filesystem(input_url, storage_options)
    try:
        top = listing(lambda: fs.ls(path.rstrip("/"), detail=False), input_url)
    except FileNotFoundError as exc:
        raise ShardError(f"input not found: {input_url}") from exc
    names = [str(n) for n in top]
    if any(n.endswith(".tar") for n in names):
        return "shards"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    data = [n for n in names if posixpath.basename(n.rstrip("/")) == "data"]
    if data:
        try:
            inner = fs.ls(data[0], detail=False)
        except OSError:
            inner = []
        if any(str(n).endswith(".parquet") for n in inner):
            return "parquet"
    return "files"


def list_tree(root: str, storage_options: Mapping[str, Any] | None = None) -> list[TreeFile]:
    """Every file under `root` (recursively; one paginated listing on S3), sorted by relative path.
    Hidden entries (a path part starting with '.') are left out.

    Raises:
        ShardError: the root does not exist, holds no file, or cannot be listed.
    """
    fs, path = filesystem(root, storage_options)
    path = path.rstrip("/")
    try:
        found = listing(lambda: fs.find(path, detail=True, withdirs=False), root)
    except FileNotFoundError:
        found = {}
    files = []
    for full, info in found.items():
        if info.get("type", "file") != "file":
            continue
        rel = str(full)[len(path) :].lstrip("/")
        if not rel or any(part.startswith(".") for part in rel.split("/")):
            continue
        files.append(TreeFile(rel=rel, size=int(info.get("size") or 0), fingerprint=fingerprint_of(info)))
    if not files:
        raise ShardError(f"no files under {root}")
    return sorted(files, key=lambda f: f.rel)


def has_extension(rel: str, extensions: tuple[str, ...]) -> bool:
    """Whether the file's last extension (case-insensitive) is one of `extensions` ('flac', ...)."""
    base = posixpath.basename(rel)
    return "." in base and base.rsplit(".", 1)[-1].lower() in extensions


def reserved_reason(rel: str) -> str:
    """Why a relative path cannot be mirrored under an output root ('' when it can)."""
    top = rel.split("/", 1)[0]
    if top in RESERVED_TOP or top.startswith(UNIT_PREFIX):
        return f"path {rel!r} collides with the output's own bookkeeping ({top})"
    return ""


def unit_id(rels: list[str]) -> str:
    """A unit's id from the files it holds: the same files give the same id in every run."""
    digest = hashlib.sha1("\n".join(rels).encode("utf-8", "surrogateescape")).hexdigest()
    return f"{UNIT_PREFIX}{digest[:16]}"


def group_units(files: list[TreeFile], files_per_unit: int, max_unit_bytes: int) -> list[list[TreeFile]]:
    """Consecutive files (in the given order) in units of at most `files_per_unit` files and
    `max_unit_bytes` bytes (a larger file is a unit of its own)."""
    units: list[list[TreeFile]] = []
    current: list[TreeFile] = []
    size = 0
    for f in files:
        if current and (len(current) >= files_per_unit or size + f.size > max_unit_bytes):
            units.append(current)
            current, size = [], 0
        current.append(f)
        size += f.size
    if current:
        units.append(current)
    return units


def file_url(root: str, rel: str) -> str:
    """The URL of `rel` under `root` (local path or scheme://bucket/prefix)."""
    return join(root.rstrip("/"), rel)


def read_file(root: str, rel: str, storage_options: Mapping[str, Any] | None, max_bytes: int) -> bytes:
    """The bytes of one file under `root` (transient storage errors retried).

    Raises:
        ValueError: the file is larger than `max_bytes` (it is not read).
        OSError: storage errors (FileNotFoundError, PermissionError, transient ones that outlasted
            the retries).
    """
    fs, path = filesystem(file_url(root, rel), storage_options)

    def once() -> bytes:
        with fs.open(path, "rb") as handle:
            size = getattr(handle, "size", None)
            if isinstance(size, int) and size > max_bytes:
                raise ValueError(f"file too large: {size} bytes > limit {max_bytes}")
            data = handle.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ValueError(f"file too large: more than {max_bytes} bytes")
        return data

    return with_retries(once, f"read {rel}")


READ_THREADS = 8  # parallel reads of one unit's files (small objects on S3)
FILE_NOT_FOUND = "file not found"  # the file went away between listing and reading: an error row


def read_unit(
    root: str, rels: list[str] | tuple[str, ...], storage_options: Mapping[str, Any] | None, max_bytes: int
) -> tuple[list[Sample], str]:
    """One unit's files as samples (key and only member name: the relative path), in the given order.

    A file that is unsafe to mirror, missing, or larger than `max_bytes` is an error sample; a
    storage failure (access denied, unavailable after retries) stops the unit instead.

    Returns:
        (samples, unit-level error: '' or a message starting with one of
        `pipeline.io.storage.UNCOMMITTED_SHARD_ERRORS`, so the unit is left for the next run).
    """

    def one(rel: str) -> Sample | BaseException:
        reason = unsafe_name_reason(rel) or reserved_reason(rel)
        if reason:
            return Sample(key=rel, names=[rel], data=[b""], error=reason)
        try:
            return Sample(key=rel, names=[rel], data=[read_file(root, rel, storage_options, max_bytes)])
        except ValueError as exc:
            return Sample(key=rel, names=[rel], data=[b""], error=str(exc))
        except FileNotFoundError:
            return Sample(key=rel, names=[rel], data=[b""], error=FILE_NOT_FOUND)
        except Exception as exc:
            if not (isinstance(exc, OSError) or is_transient(exc)):
                raise
            return exc

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        results = list(pool.map(one, rels))
    samples = [r for r in results if isinstance(r, Sample)]
    failures = [(rel, r) for rel, r in zip(rels, results) if not isinstance(r, Sample)]
    if failures:
        rel, exc = failures[0]
        return samples, describe_storage_error(exc, file_url(root, rel))
    return samples, ""
