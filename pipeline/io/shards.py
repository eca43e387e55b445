"""WebDataset shards: list input shards, read a tar into samples safely, build an output tar.

Tar members are only ever treated as bytes: nothing is unpickled or decoded here. Member names are
checked before anything is written: absolute names, `..`, control characters, non-UTF-8 bytes,
links and special files make their sample an error that is never written.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.io.storage import (
    DEFAULT_RETRY,
    UNREADABLE_TAR,
    RetryPolicy,
    ShardError,
    describe_storage_error,
    filesystem,
    is_transient,
    listing,
    with_retries,
)

SHARD_ERROR_KEY = "__shard__"  # manifest key of a row describing a shard-level problem


@dataclass(frozen=True)
class ShardRef:
    """One unit of work: an input shard (or Parquet file, or group of files under a root) and the
    id its manifest and marker are named after (a shard's basename without .tar)."""

    url: str
    shard_id: str
    layout: str = "shards"  # shards: a .tar | parquet: a .parquet file | files: `files` under the root `url`
    files: tuple[str, ...] = ()  # files layout: the unit's paths under `url`, '/'-separated


@dataclass
class Sample:
    """The members of one WebDataset key, in tar order. `error` is set for a sample that is bad as
    a whole (unsafe name, link member, oversized member, duplicate key, cut by a damaged tar); such
    a sample is never written. Names are printable: non-UTF-8 bytes appear as `\\xNN` escapes."""

    key: str
    names: list[str] = field(default_factory=list)  # full member names
    data: list[bytes] = field(default_factory=list)
    error: str = ""


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = path up to the first '.' of the basename; the rest is the extension."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext


def unsafe_name_reason(name: str) -> str:
    """Why a member name must not be written anywhere ('' when it is safe)."""
    if not name:
        return "empty member name"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "member name is not valid UTF-8"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "member name has control characters"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute member name"
    if ".." in name.replace("\\", "/").split("/"):
        return "member name escapes its folder ('..')"
    return ""


def printable_name(name: str) -> str:
    """A member name as valid UTF-8 text: undecodable bytes (surrogate escapes) become `\\xNN`."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def list_shards(input_url: str, storage_options: Mapping[str, Any] | None = None) -> list[ShardRef]:
    """Expand a folder, glob or brace list of .tar URLs into shards sorted by URL.

    A .tar named explicitly in a brace list of several entries that does not exist is kept: its
    read fails with 'shard not found' and the shard completes with that error row (every listed
    shard is accounted for). A single missing path, or a list where nothing exists, is an error.

    Raises:
        ShardError: nothing matches, access is denied, or two shards would write the same output name.
    """
    import braceexpand  # a webdataset dependency

    patterns = list(braceexpand.braceexpand(input_url))
    urls: list[str] = []
    missing: list[str] = []
    for pattern in patterns:
        fs, path = filesystem(pattern, storage_options)
        protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        try:
            found = listing(lambda fs=fs, path=path: _expand(fs, path), pattern)
        except FileNotFoundError:
            found = []
        if found is None:
            missing.append(pattern)
            continue
        urls.extend(protocol + p if protocol and not p.startswith(protocol) else p for p in found)
    if missing and (len(patterns) == 1 or not urls):
        raise ShardError(f"input shard not found: {', '.join(missing)}")
    urls.extend(m for m in missing if m.endswith(".tar"))
    urls = sorted({u for u in urls if u.endswith(".tar")})
    if not urls:
        raise ShardError(f"no .tar shards at {input_url}")
    refs = [ShardRef(url=u, shard_id=posixpath.basename(u)[: -len(".tar")]) for u in urls]
    seen: dict[str, str] = {}
    for ref in refs:
        if ref.shard_id in seen:
            raise ShardError(f"two input shards share the output name {ref.shard_id}: {seen[ref.shard_id]}, {ref.url}")
        seen[ref.shard_id] = ref.url
    return refs


def _expand(fs: Any, path: str) -> list[str] | None:
    """Paths a pattern stands for; None when a plain path does not exist."""
    if any(ch in path for ch in "*?["):
        return list(fs.glob(path))
    if fs.isdir(path):
        return [p for p in fs.find(path, maxdepth=1) if p.endswith(".tar")]
    if fs.exists(path):
        return [path]
    return None


def read_samples(
    shard_url: str,
    storage_options: Mapping[str, Any] | None = None,
    max_member_bytes: int = 1 << 30,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> tuple[list[Sample], str]:
    """Read every sample of a tar shard (streamed; members are bytes, never decoded or unpickled).

    A transient storage error restarts the read from the start of the shard (with backoff).

    Returns:
        (samples in tar order, shard-level error message or '' when the tar was read to its end).
        The message starts with its kind (SHARD_NOT_FOUND, UNREADABLE_TAR, or one of
        UNCOMMITTED_SHARD_ERRORS). A truncated or corrupt tar keeps the samples read before the
        damage; the key being read when it struck becomes an error sample.
    """
    try:
        return with_retries(
            lambda: _read_samples_once(shard_url, storage_options, max_member_bytes),
            f"read {shard_url}",
            retry,
        )
    except Exception as exc:
        if not (isinstance(exc, OSError) or is_transient(exc)):
            raise
        return [], describe_storage_error(exc, shard_url)


def _read_samples_once(
    shard_url: str, storage_options: Mapping[str, Any] | None, max_member_bytes: int
) -> tuple[list[Sample], str]:
    samples: list[Sample] = []
    seen_keys: set[str] = set()
    current: Sample | None = None

    def close_current() -> None:
        nonlocal current
        if current is not None:
            if current.key in seen_keys and not current.error:
                current.error = f"duplicate key: {current.key!r} appears again later in the shard"
            seen_keys.add(current.key)
            samples.append(current)
        current = None

    fs, path = filesystem(shard_url, storage_options)
    try:
        with (
            fs.open(path, "rb") as raw,
            tarfile.open(fileobj=raw, mode="r|*", encoding="utf-8", errors="surrogateescape") as tar,
        ):
            for member in tar:
                if member.isdir():
                    continue
                name = printable_name(member.name)
                key, _ = split_name(name)
                if current is None or key != current.key:
                    close_current()
                    current = Sample(key=key)
                reason = unsafe_name_reason(member.name)
                if not reason and not member.isfile():
                    reason = "link or special member (not followed)"
                if not reason and member.size > max_member_bytes:
                    # Never read: the stream skips its bytes in small blocks.
                    reason = f"member too large: {name} has {member.size} bytes > limit {max_member_bytes}"
                if not reason and name in current.names:
                    reason = f"duplicate member name: {name}"
                current.names.append(name)
                if reason:
                    current.error = current.error or reason
                    current.data.append(b"")
                    continue
                handle = tar.extractfile(member)
                current.data.append(handle.read() if handle is not None else b"")
            cut = _cut_short(tar, raw, fs, path)
            if cut:
                raise tarfile.ReadError(cut)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        if current is not None:
            current.error = current.error or f"tar damaged while reading this key ({type(exc).__name__})"
        close_current()
        return samples, f"{UNREADABLE_TAR}: {type(exc).__name__}: {exc}"
    except OSError as exc:
        if is_transient(exc) or isinstance(exc, (FileNotFoundError, PermissionError)):
            raise  # retried by the caller / reported as a storage error
        if current is not None:  # e.g. gzip 'Not a gzipped file' is an OSError
            current.error = current.error or f"tar damaged while reading this key ({type(exc).__name__})"
        close_current()
        return samples, f"{UNREADABLE_TAR}: {type(exc).__name__}: {exc}"
    close_current()
    return samples, ""


def _cut_short(tar: tarfile.TarFile, raw: Any, fs: Any, path: str) -> str:
    """Why an uncompressed tar that `tarfile` read to its "end" was in fact cut short ('' if not).

    `tarfile` takes a missing or partial header for the end of the archive, so a shard cut between
    members (or inside a header) would silently lose its later keys. A whole tar ends with
    zero blocks after the last member: at least 512 bytes past where the iteration stopped."""
    if getattr(tar.fileobj, "comptype", "tar") != "tar":
        return ""  # compressed: offsets are not file positions (gzip has its own length check)
    size = getattr(raw, "size", None)
    if not isinstance(size, int):
        size = int(fs.size(path))
    if size - tar.offset < tarfile.BLOCKSIZE:
        return f"truncated tar: {size} bytes end at or inside the header at byte {tar.offset}"
    return ""


def build_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A deterministic tar (mtime 0, mode 0644, no owner) of (name, bytes) pairs.

    Raises:
        ShardError: a member name is unsafe (absolute, '..', control characters, not UTF-8).
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            if unsafe_name_reason(name):
                raise ShardError(f"refusing to write unsafe member name {name!r}")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
