"""A run's output prefix: atomic writes through `_tmp/`, the completion markers that make resume
work, the writer's spill of uncommitted rows, and the driver's lease on the folder (docs/storage.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.io.storage import (
    CREDENTIALS_HINT,
    DEFAULT_RETRY,
    RetryPolicy,
    ShardError,
    describe_storage_error,
    exception_chain,
    filesystem,
    is_local,
    is_transient,
    join,
    with_retries,
)

logger = logging.getLogger(__name__)

TMP_DIR = "_tmp"
SPILL_DIR = f"{TMP_DIR}/spill"  # rows of shards the writer has not committed yet (ShardWriter)
MARKER_SUFFIX = ".stats.json"


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
        # A nested name (a mirrored file) gets a flat temporary name under _tmp/files/ (the tree is
        # not rebuilt under _tmp/; that folder stays until the run's final sweep, so parallel writes
        # never race a folder removal).
        flat = f"{name}.{uuid.uuid4().hex}" if "/" not in name else f"files/{uuid.uuid4().hex}"
        tmp = self.key(f"{TMP_DIR}/{flat}")
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
            self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
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
    for link in exception_chain(exc):
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
