"""WebDataset shards on object storage (fsspec only here): list input shards, read a tar into
samples safely, write output shards atomically, the completion markers that make resume work, and
the retry-with-backoff rule for transient storage errors.

Tar members are only ever treated as bytes: nothing is unpickled or decoded here. Member names are
checked before anything is written: absolute names, `..`, control characters, non-UTF-8 bytes,
links and special files make their sample an error that is never written.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import posixpath
import random
import tarfile
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

logger = logging.getLogger(__name__)

SHARD_ERROR_KEY = "__shard__"  # manifest key of a row describing a shard-level problem
TMP_DIR = "_tmp"
SPILL_DIR = f"{TMP_DIR}/spill"  # rows of shards the writer has not committed yet (ShardWriter)
MARKER_SUFFIX = ".stats.json"

# Shard-level error kinds (the text before the first ':' of a shard error message).
SHARD_NOT_FOUND = "shard not found"  # permanent: the shard completes with one error row
UNREADABLE_TAR = "unreadable tar"  # permanent: truncated/corrupt tar; keys read before the damage kept
STORAGE_UNAVAILABLE = "storage unavailable"  # transient errors outlasted the retries: shard not committed
ACCESS_DENIED = "access denied"  # credentials/permissions: shard not committed
STORAGE_ERROR = "storage error"  # any other storage failure: shard not committed
# Kinds that fail the shard without a marker, so that the next run tries it again.
UNCOMMITTED_SHARD_ERRORS = (STORAGE_UNAVAILABLE, ACCESS_DENIED, STORAGE_ERROR)

CREDENTIALS_HINT = (
    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the instance role), io.storage.endpoint_url "
    "and the bucket policy"
)

T = TypeVar("T")


class ShardError(RuntimeError):
    """A whole shard (or the output prefix) cannot be listed, read or written."""


# ---------------------------------------------------------------------------------------------
# Transient errors and retries
# ---------------------------------------------------------------------------------------------

# Exception class names (anywhere in the cause chain) that mean "try again": connection refused or
# reset, timeouts, a server that went away mid-response. Matched by name so that botocore/aiohttp
# stay optional imports.
_TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectorError",
        "ClientConnectionError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ClientPayloadError",
        "IncompleteRead",
        "IncompleteReadError",
        "ResponseStreamingError",
        "FSTimeoutError",
        "HTTPClientError",
        "ProtocolError",
    }
)
_TRANSIENT_S3_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "503",
        "500",
        "502",
        "504",
    }
)
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EBUSY,
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        getattr(errno, "EREMOTEIO", 121),
    }
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 20:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying: connection errors, timeouts and HTTP 5xx /
    throttling are; 4xx (not found, access denied, bad request) and data errors are not."""
    chain = _chain(exc)
    for link in chain:  # an HTTP answer decides, whatever wraps it
        response = getattr(link, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = str(response["Error"].get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return code in _TRANSIENT_S3_CODES or int(status) >= 500 or int(status) == 429
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    for link in chain:
        if isinstance(link, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(link).__mro__):
            return True
        if isinstance(link, OSError) and link.errno in _TRANSIENT_ERRNOS:
            return True
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: delay_i = min(max_delay, base_delay · 2^i) · U(0.5, 1).

    The defaults wait about 35 s in all over 8 attempts, and each attempt of s3fs has its own
    few seconds of retries: a storage outage of up to about a minute is ridden out."""

    attempts: int = 8
    base_delay: float = 0.5  # seconds
    max_delay: float = 15.0  # seconds

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2**attempt) * random.uniform(0.5, 1.0)


DEFAULT_RETRY = RetryPolicy()


def with_retries(
    fn: Callable[[], T],
    what: str,
    policy: RetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn()`; on a transient storage error (see `is_transient`) wait and call it again.

    Raises:
        Exception: the last error when it is not transient or the attempts are used up.
    """
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt == policy.attempts - 1:
                raise
            delay = policy.delay(attempt)
            logger.warning(
                "%s: transient storage error (%s: %s); retry %d/%d in %.1f s",
                what,
                type(exc).__name__,
                exc,
                attempt + 1,
                policy.attempts - 1,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def describe_storage_error(exc: BaseException, what: str) -> str:
    """A one-line '<kind>: <what>: <reason>' for a storage failure (never credentials: error
    messages of S3 servers do not echo secrets, and nothing here adds them)."""
    reason = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, FileNotFoundError):
        return f"{SHARD_NOT_FOUND}: {what}: {reason}"
    if isinstance(exc, PermissionError):
        return f"{ACCESS_DENIED}: {what}: {reason} ({CREDENTIALS_HINT})"
    if is_transient(exc):
        return f"{STORAGE_UNAVAILABLE}: {what}: {reason} (gave up after {DEFAULT_RETRY.attempts} attempts)"
    return f"{STORAGE_ERROR}: {what}: {reason}"


# ---------------------------------------------------------------------------------------------
# Names and listing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRef:
    """One input shard and the id its outputs are named after (input basename without .tar)."""

    url: str
    shard_id: str


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


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path) for a URL; storage options apply to s3:// only."""
    options = dict(storage_options or {}) if url.startswith(("s3://", "s3a://")) else {}
    return url_to_fs(url, **options)


def is_local(fs: Any) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


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
            found = with_retries(lambda fs=fs, path=path: _expand(fs, path), f"list {pattern}")
        except FileNotFoundError:
            found = []
        except PermissionError as exc:
            raise ShardError(f"{ACCESS_DENIED}: cannot list {pattern}: {exc} ({CREDENTIALS_HINT})") from exc
        except Exception as exc:
            if not (isinstance(exc, OSError) or is_transient(exc)):
                raise
            raise ShardError(describe_storage_error(exc, f"cannot list {pattern}")) from exc
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


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


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


class OutputFolder:
    """The output prefix of a run: `<id>.tar`, `<id>.parquet`, then `<id>.stats.json` (the marker).

    Every file is written under `_tmp/` first and then moved into place (a rename locally, copy +
    delete on S3), so that readers never see a partial file; `_tmp/` is empty (locally: gone) after
    each write. Transient storage errors are retried with backoff.

    Example::

        out = OutputFolder("s3://bucket/protected", cfg.io.storage.storage_options())
        out.ensure()
        out.write_atomic("shard-000.tar", tar_bytes)
        "shard-000" in out.completed()  # False until the marker is written
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, retry: RetryPolicy = DEFAULT_RETRY):
        self.url = url.rstrip("/")
        self.fs, self.path = filesystem(self.url, storage_options)
        self.path = self.path.rstrip("/")
        self.local = is_local(self.fs)
        self.retry = retry

    def key(self, name: str) -> str:
        return join(self.path, name)

    def marker_name(self, shard_id: str) -> str:
        return f"{shard_id}{MARKER_SUFFIX}"

    def completed(self) -> set[str]:
        """Shard ids that have a completion marker (listed afresh, never from a cache).

        Raises:
            ShardError: the prefix cannot be listed (access denied, storage unavailable).
        """

        def listing() -> list[str]:
            self.fs.invalidate_cache(self.path)
            return self.fs.ls(self.path, detail=False)

        try:
            names = with_retries(listing, f"list {self.url}", self.retry)
        except FileNotFoundError:
            return set()
        except Exception as exc:
            if not (isinstance(exc, OSError) or is_transient(exc)):
                raise
            raise ShardError(describe_storage_error(exc, f"cannot list output {self.url}")) from exc
        return {posixpath.basename(n)[: -len(MARKER_SUFFIX)] for n in names if n.endswith(MARKER_SUFFIX)}

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write under a temporary key, then move into place: readers never see a partial file.

        Raises:
            OSError: a permanent storage error, or transient ones that outlasted the retries.
        """
        final = self.key(name)
        tmp = self.key(f"{TMP_DIR}/{name}.{uuid.uuid4().hex}")
        try:
            with_retries(lambda: self._put(tmp, data), f"write {tmp}", self.retry)
            self._move(tmp, final)
        finally:
            self._discard(tmp)

    def _move(self, tmp: str, final: str) -> None:
        """Put a fully written temporary file in its place."""
        if self.local:
            # os.replace, not fs.mv: a rename (atomic on one filesystem) that fails on a folder in
            # the way, where shutil.move would move the file into that folder.
            os.replace(tmp, final)
        else:
            # S3 has no rename: copy (idempotent, so safe to retry), then delete the temp key.
            with_retries(lambda: self.fs.copy(tmp, final), f"commit {final}", self.retry)
            self.fs.invalidate_cache(self.path)

    def _put(self, path: str, data: bytes) -> None:
        if self.local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def _discard(self, tmp: str) -> None:
        """Delete a temp key if it is still there, and (locally) the `_tmp` folder once empty."""
        try:
            with_retries(lambda: self._rm_quiet(tmp), f"delete {tmp}", self.retry)
        except Exception as exc:  # a leftover temp file is tidied by the next run, never fatal
            logger.warning("could not delete temporary %s: %s", tmp, exc)
        if self.local:
            with contextlib.suppress(OSError):  # not empty (another write under way) or gone
                self.fs.rmdir(self.key(TMP_DIR))

    def _rm_quiet(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path)

    def exists(self, name: str) -> bool:
        """Whether `<output>/<name>` exists (asked afresh, never from s3fs's listing cache)."""

        def ask() -> bool:
            self.fs.invalidate_cache(self.path)
            return bool(self.fs.exists(self.key(name)))

        return with_retries(ask, f"check {self.key(name)}", self.retry)

    def write_spill(self, shard_id: str, data: bytes) -> None:
        """Store one piece of a shard's not yet committed rows under `_tmp/spill/<shard>/`, whole or
        not at all (locally a rename; one PUT on S3)."""
        name = f"{SPILL_DIR}/{shard_id}/{uuid.uuid4().hex}"
        final = self.key(f"{name}.arrow")
        if not self.local:
            with_retries(lambda: self._put(final, data), f"write {final}", self.retry)
            return
        part = self.key(f"{name}.part")
        with_retries(lambda: self._put(part, data), f"write {part}", self.retry)
        os.replace(part, final)

    def read_spills(self, shard_id: str) -> list[bytes]:
        """Every spilled piece of a shard's rows (oldest order not guaranteed)."""
        prefix = self.key(f"{SPILL_DIR}/{shard_id}")

        def listing() -> list[str]:
            self.fs.invalidate_cache(prefix)
            try:
                return sorted(p for p in self.fs.find(prefix) if p.endswith(".arrow"))
            except FileNotFoundError:
                return []

        pieces = []
        for path in with_retries(listing, f"list {prefix}", self.retry):
            pieces.append(with_retries(lambda path=path: self.fs.cat_file(path), f"read {path}", self.retry))
        return pieces

    def remove_spill(self, shard_id: str) -> None:
        """Delete a shard's spilled rows (after its commit, or before it is done again)."""
        prefix = self.key(f"{SPILL_DIR}/{shard_id}")
        try:
            self.fs.invalidate_cache(prefix)
            paths = self.fs.find(prefix)
        except FileNotFoundError:
            paths = []
        for path in paths:
            with_retries(lambda path=path: self._rm_quiet(path), f"delete {path}", self.retry)
        if self.local:
            with contextlib.suppress(OSError):
                self.fs.rm(prefix, recursive=True)
            for folder in (self.key(SPILL_DIR), self.key(TMP_DIR)):
                with contextlib.suppress(OSError):
                    self.fs.rmdir(folder)

    def read_text(self, name: str) -> str:
        def read() -> str:
            with self.fs.open(self.key(name), "rb") as f:
                return f.read().decode()

        return with_retries(read, f"read {self.key(name)}", self.retry)

    def temp_files(self) -> list[str]:
        """Paths left under `_tmp/` (by an interrupted run, or a write under way)."""
        prefix = self.key(TMP_DIR)
        try:
            self.fs.invalidate_cache(prefix)
            found = self.fs.find(prefix)
        except FileNotFoundError:
            return []
        # Only objects below the prefix: some S3 servers (SeaweedFS) answer for the empty
        # "directory" itself, which is no object and holds nothing.
        return sorted(p for p in found if p.startswith(prefix + "/"))

    def clear_tmp(self) -> None:
        """Delete everything under `_tmp/` (and the folder itself locally). Only for a time when
        no writer of this output prefix is running, e.g. before a run starts."""
        for path in self.temp_files():
            with_retries(lambda path=path: self._rm_quiet(path), f"delete {path}", self.retry)
        if self.local:
            with contextlib.suppress(OSError):
                self.fs.rm(self.key(TMP_DIR), recursive=True)

    def remove_stale(self, shard_id: str) -> None:
        """Delete a shard's marker and temp files before it is (re)done."""
        marker = self.key(self.marker_name(shard_id))
        with_retries(lambda: self._rm_quiet(marker), f"delete {marker}", self.retry)
        try:
            stale = self.fs.glob(self.key(f"{TMP_DIR}/{shard_id}.*"))
        except FileNotFoundError:
            stale = []
        for path in stale:
            self._rm_quiet(path)
        self.remove_spill(shard_id)

    def ensure(self, clear_tmp: bool = True) -> None:
        """Make the output prefix usable before a run: create the folder (local) or check that the
        bucket exists (S3, never created implicitly), and (`clear_tmp`) remove temp files that an
        interrupted run left under `_tmp/`.

        Raises:
            ShardError: the bucket does not exist or cannot be reached.
        """
        if self.local:
            self.fs.makedirs(self.path, exist_ok=True)
        else:
            bucket = self.path.split("/", 1)[0]
            try:
                exists = with_retries(lambda: self.fs.exists(bucket), f"check {bucket}", self.retry)
            except Exception as exc:
                if not (isinstance(exc, OSError) or is_transient(exc)):
                    raise
                raise ShardError(describe_storage_error(exc, f"output bucket {bucket}")) from exc
            if not exists:
                raise ShardError(f"output bucket {bucket!r} does not exist or is not accessible ({CREDENTIALS_HINT})")
        if clear_tmp:
            self.clear_tmp()


def open_url(url: str, mode: str = "rb", storage_options: Mapping[str, Any] | None = None) -> Any:
    options = dict(storage_options or {}) if url.startswith("s3://") else {}
    return fsspec.open(url, mode, **options)


# ---------------------------------------------------------------------------------------------
# Input fingerprints
# ---------------------------------------------------------------------------------------------


def input_fingerprint(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What identifies an input shard's bytes without reading them: {"url", "size" (bytes), and
    "etag" on S3 or "mtime" (s, float) elsewhere}; {"url"} alone when the shard cannot be looked at."""
    fs, path = filesystem(url, storage_options)
    try:
        info = with_retries(lambda: fs.info(path), f"info {url}")
    except Exception as exc:  # a missing shard completes with an error row; it has no fingerprint
        logger.debug("no fingerprint for %s: %s", url, exc)
        return {"url": url}
    found: dict[str, Any] = {"url": url, "size": int(info.get("size") or 0)}
    etag = info.get("ETag") or info.get("etag")
    if etag:
        found["etag"] = str(etag).strip('"')
    elif info.get("mtime") is not None:
        found["mtime"] = float(info["mtime"])
    elif info.get("LastModified") is not None:
        found["mtime"] = str(info["LastModified"])
    return found


def fingerprint_changed(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """Why a shard's input differs from the one it was protected from ('' when it does not, or
    when the marker recorded nothing to compare: markers written before fingerprints)."""
    for field_name in ("size", "etag", "mtime"):
        if field_name in recorded and recorded[field_name] != current.get(field_name):
            return f"{field_name} {recorded[field_name]} -> {current.get(field_name)}"
    return ""


# ---------------------------------------------------------------------------------------------
# The output lease: one driver per output prefix
# ---------------------------------------------------------------------------------------------

LEASE_NAME = "_lease.json"
LEASE_TTL_S = 120.0  # a lease whose heartbeat is older than this (seconds) may be taken over
LEASE_HEARTBEAT_S = 20.0  # how often the holder renews it (seconds)


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an S3 error is HTTP 412 (a conditional request's condition did not hold)."""
    for link in _chain(exc):
        response = getattr(link, "response", None)
        code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
        if code in ("PreconditionFailed", "412"):
            return True
        if "pre-condition" in str(link).lower() or "precondition" in str(link).lower():
            return True
    return False


class LeaseHeld(ShardError):
    """Another driver holds the output's lease."""


class OutputLease:
    """An exclusive, expiring lock object `<output>/_lease.json`: {token, host, pid, started,
    heartbeat (epoch s), ttl_s}.

    Taken with an exclusive create (O_CREAT|O_EXCL locally; a conditional PUT, `If-None-Match: *`,
    on S3), renewed by a heartbeat thread every `heartbeat_s`, deleted on release. A lease whose
    heartbeat is older than `ttl_s` belongs to a dead driver and is taken over: locally by an
    atomic rename that is undone if it moved a fresh lease; on S3 by a delete, with a race window
    of one request between reading the stale lease and deleting it (two drivers taking over the
    same stale lease in that window: the heartbeat re-reads the lease and the one that lost it
    stops, `lost` set). Example::

        with OutputLease(out):  # raises LeaseHeld naming the holder
            ...                   # run
    """

    def __init__(
        self,
        out: OutputFolder,
        ttl_s: float = LEASE_TTL_S,
        heartbeat_s: float = LEASE_HEARTBEAT_S,
        clock: Callable[[], float] = time.time,
    ):
        import socket
        import threading

        self.out, self.ttl_s, self.heartbeat_s, self.clock = out, ttl_s, heartbeat_s, clock
        self.key = out.key(LEASE_NAME)
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.started = clock()
        self.lost = ""  # why the lease was lost while held ('' while it is ours)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        import json

        doc = {
            "token": self.token,
            "host": self.host,
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "heartbeat": self.clock(),
            "ttl_s": self.ttl_s,
        }
        return json.dumps(doc, sort_keys=True).encode()

    def read(self) -> dict[str, Any] | None:
        """The lease as stored (None when there is none; {} when it cannot be parsed)."""
        import json

        try:
            data = with_retries(lambda: self.out.fs.cat_file(self.key), f"read {self.key}", self.out.retry)
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(data.decode() or "{}")
        except (UnicodeDecodeError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _create(self) -> bool:
        """Exclusive create; False when a lease exists already."""
        data = self._body()
        try:
            if self.out.local:
                self.out.fs.makedirs(self.out.path, exist_ok=True)
                fd = os.open(self.key, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                self.out.fs.invalidate_cache(self.out.path)
                with self.out.fs.open(self.key, "xb") as f:
                    f.write(data)
        except FileExistsError:
            return False
        except OSError as exc:  # s3fs may report a 412 (If-None-Match: * failed) as EINVAL
            if self.out.local or not _precondition_failed(exc):
                raise
            return False
        # A store that ignored If-None-Match lets the last writer win: the lease is ours only if
        # it says so now.
        return (self.read() or {}).get("token") == self.token

    def _stale(self, holder: dict[str, Any]) -> bool:
        """Expired heartbeat, or a holder on this host whose process is gone (no need to wait)."""
        pid = holder.get("pid")
        if holder.get("host") == self.host and isinstance(pid, int) and pid != os.getpid() and not _alive(pid):
            return True
        beat = holder.get("heartbeat")
        if not isinstance(beat, (int, float)):  # unparseable: judged by the object's age
            try:
                info = self.out.fs.info(self.key)
                beat = float(info.get("mtime") or info["LastModified"].timestamp())
            except Exception:
                return False
        return self.clock() - float(beat) > float(holder.get("ttl_s") or self.ttl_s)

    def describe(self, holder: dict[str, Any]) -> str:
        """'host H, pid P, started T, last heartbeat N s ago' of a lease as stored."""
        beat = holder.get("heartbeat")
        ago = f"{self.clock() - float(beat):.0f} s ago" if isinstance(beat, (int, float)) else "unknown"
        return (
            f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}, "
            f"last heartbeat {ago}"
        )

    def acquire(self) -> None:
        """Take the lease (or take over a stale one) and start the heartbeat.

        Raises:
            LeaseHeld: another driver holds a live lease (the message names it).
        """
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return
            holder = self.read()
            if holder is None:
                continue  # released meanwhile: try again
            if not self._stale(holder):
                raise LeaseHeld(
                    f"output {self.out.url} is in use by another driver ({self.describe(holder)}; "
                    f"lease {self.key}, expires {self.ttl_s:.0f} s after its last heartbeat). Wait for that run "
                    "to end; if it is dead, its lease is taken over once it expires, or delete the lease object"
                )
            logger.warning("taking over the stale lease of %s (%s)", self.out.url, self.describe(holder))
            self._remove_stale(holder)
        raise LeaseHeld(f"output {self.out.url}: could not take the lease {self.key} (another driver is taking it)")

    def _remove_stale(self, holder: dict[str, Any]) -> None:
        """Delete the stale lease `holder` (and only it, locally)."""
        if not self.out.local:
            with contextlib.suppress(FileNotFoundError):
                self.out.fs.rm(self.key)
            return
        aside = f"{self.key}.stale.{uuid.uuid4().hex}"
        try:
            os.rename(self.key, aside)
        except FileNotFoundError:
            return
        import json

        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read().decode() or "{}")
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") != holder.get("token"):  # a fresh lease came in between: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.key)
        os.unlink(aside)

    def _start_heartbeat(self) -> None:
        import threading

        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="output-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception as exc:  # a missed heartbeat is not fatal until the TTL runs out
                logger.warning("lease heartbeat on %s failed: %s", self.out.url, exc)

    def renew(self) -> None:
        """Write a new heartbeat, if the lease is still ours (else set `lost`)."""
        holder = self.read()
        if not holder or holder.get("token") != self.token:
            self.lost = "taken over by " + (self.describe(holder) if holder else "nobody (deleted)")
            logger.error("lost the lease on %s: %s", self.out.url, self.lost)
            self._stop.set()
            return
        if self.out.local:
            part = f"{self.key}.{self.token}.part"
            with open(part, "wb") as f:
                f.write(self._body())
            os.replace(part, self.key)
        else:
            with self.out.fs.open(self.key, "wb") as f:
                f.write(self._body())

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self.read()
        if holder and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.out.fs.rm(self.key)

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
