"""WebDataset shards on object storage (fsspec only here): list input shards, read a tar into
samples safely, write output shards atomically, and the completion markers that make resume work.

Tar members are only ever treated as bytes: nothing is unpickled or decoded here.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.core import url_to_fs

SHARD_ERROR_KEY = "__shard__"  # manifest key of a row describing a shard-level problem
TMP_DIR = "_tmp"


class ShardError(RuntimeError):
    """A whole shard cannot be listed, read or written."""


@dataclass(frozen=True)
class ShardRef:
    """One input shard and the id its outputs are named after (input basename without .tar)."""

    url: str
    shard_id: str


@dataclass
class Sample:
    """The members of one WebDataset key, in tar order. `error` is set for a sample that is bad as
    a whole (unsafe name, link member, oversized member, duplicate key)."""

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
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute member name"
    if ".." in name.split("/"):
        return "member name escapes its folder ('..')"
    return ""


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path) for a URL; storage options apply to s3:// only."""
    options = dict(storage_options or {}) if url.startswith(("s3://", "s3a://")) else {}
    return url_to_fs(url, **options)


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def list_shards(input_url: str, storage_options: Mapping[str, Any] | None = None) -> list[ShardRef]:
    """Expand a folder, glob or brace list of .tar URLs into shards sorted by URL.

    Raises:
        ShardError: nothing matches, or two shards would write the same output name.
    """
    import braceexpand  # noqa: PLC0415  (a webdataset dependency)

    urls: list[str] = []
    for pattern in braceexpand.braceexpand(input_url):
        fs, path = filesystem(pattern, storage_options)
        protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        if any(ch in path for ch in "*?["):
            found = fs.glob(path)
        elif fs.isdir(path):
            found = [p for p in fs.find(path, maxdepth=1) if p.endswith(".tar")]
        elif fs.exists(path):
            found = [path]
        else:
            raise ShardError(f"input shard not found: {pattern}")
        urls.extend(protocol + p if protocol and not p.startswith(protocol) else p for p in found)
    urls = sorted(set(u for u in urls if u.endswith(".tar")))
    if not urls:
        raise ShardError(f"no .tar shards at {input_url}")
    refs = [ShardRef(url=u, shard_id=posixpath.basename(u)[: -len(".tar")]) for u in urls]
    seen: dict[str, str] = {}
    for ref in refs:
        if ref.shard_id in seen:
            raise ShardError(f"two input shards share the output name {ref.shard_id}: {seen[ref.shard_id]}, {ref.url}")
        seen[ref.shard_id] = ref.url
    return refs


def read_samples(
    shard_url: str,
    storage_options: Mapping[str, Any] | None = None,
    max_member_bytes: int = 1 << 30,
) -> tuple[list[Sample], str]:
    """Read every sample of a tar shard (streamed; members are bytes, never decoded or unpickled).

    Returns:
        (samples in tar order, shard-level error message or '' when the tar was read to its end).
        A truncated or corrupt tar keeps the samples read before the damage.
    """
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

    try:
        fs, path = filesystem(shard_url, storage_options)
        with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                name = member.name
                key, _ = split_name(name)
                if current is None or key != current.key:
                    close_current()
                    current = Sample(key=key)
                reason = unsafe_name_reason(name)
                if not reason and not member.isfile():
                    reason = "link or special member (not followed)"
                if not reason and member.size > max_member_bytes:
                    reason = f"member too large: {name} has {member.size} bytes > limit {max_member_bytes}"
                if reason:
                    current.error = current.error or reason
                    current.names.append(name)
                    current.data.append(b"")
                    continue
                handle = tar.extractfile(member)
                current.names.append(name)
                current.data.append(handle.read() if handle is not None else b"")
        close_current()
        return samples, ""
    except FileNotFoundError as exc:
        return samples, f"shard not found: {exc}"
    except (tarfile.TarError, EOFError, OSError) as exc:
        close_current()
        return samples, f"unreadable tar: {type(exc).__name__}: {exc}"


def build_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A deterministic tar (mtime 0, mode 0644, no owner) of (name, bytes) pairs."""
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


class OutputFolder:
    """The output prefix of a run: `<id>.tar`, `<id>.parquet`, then `<id>.stats.json` (the marker)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.fs, self.path = filesystem(self.url, storage_options)
        self.path = self.path.rstrip("/")

    def key(self, name: str) -> str:
        return join(self.path, name)

    def marker_name(self, shard_id: str) -> str:
        return f"{shard_id}.stats.json"

    def completed(self) -> set[str]:
        """Shard ids that have a completion marker."""
        try:
            names = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return set()
        suffix = ".stats.json"
        return {posixpath.basename(n)[: -len(suffix)] for n in names if n.endswith(suffix)}

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write under a temporary key, then move into place: readers never see a partial file."""
        tmp = self.key(f"{TMP_DIR}/{name}.{uuid.uuid4().hex}")
        self.fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        try:
            self.fs.mv(tmp, self.key(name))
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def read_text(self, name: str) -> str:
        with self.fs.open(self.key(name), "rb") as f:
            return f.read().decode()

    def remove_stale(self, shard_id: str) -> None:
        """Delete a shard's marker and temp files before it is (re)done."""
        for name in (self.marker_name(shard_id),):
            if self.fs.exists(self.key(name)):
                self.fs.rm(self.key(name))
        try:
            stale = self.fs.glob(self.key(f"{TMP_DIR}/{shard_id}.*"))
        except FileNotFoundError:
            stale = []
        for path in stale:
            self.fs.rm(path)

    def ensure(self) -> None:
        self.fs.makedirs(self.path, exist_ok=True)


def open_url(url: str, mode: str = "rb", storage_options: Mapping[str, Any] | None = None) -> Any:
    options = dict(storage_options or {}) if url.startswith("s3://") else {}
    return fsspec.open(url, mode, **options)
