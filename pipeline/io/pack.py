"""`unlearnable pack` / `unpack`: a file tree of audio to WebDataset shards of a target size and
protected shards back to a tree (docs/storage.md, "pack and unpack").

Members: every file gets a key that is a zero-padded running index of the pack (`000042`: no dot,
so WebDataset's first-dot rule cannot merge two files), its bytes as `<key>.<last extension,
lowercased>` (`<key>.bin` for a non-audio file packed with `include_other`) and a companion
`<key>.json` = {"path": relative path} (+ "audio": false). The protect job keeps the companion and
may change the audio member's extension (mp3 -> flac); unpack restores `path` with its last
extension replaced by the audio member's when they differ (case-insensitively).

Resume: pack writes its plan `_pack.json` first (every shard's files with their fingerprints),
then each `shard-NNNNNN.tar` atomically, then the shard's marker `_pack/<shard>.<plan id>.json`; a
rerun writes only shards without a marker of this plan, and refuses a tree that changed since the
plan unless `overwrite` (a new plan). Unpack writes every file atomically and then
`_unpack/<shard>.json` once all the shard's files are out; a rerun skips shards with a marker whose
input fingerprint still holds. Nothing is unpickled or decoded: members are bytes and JSON only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline.io.output import OutputFolder, OutputLease
from pipeline.io.shards import build_tar, list_shards, read_samples, split_name, unsafe_name_reason
from pipeline.io.storage import ShardError, fingerprint_changed, input_fingerprint, with_retries
from pipeline.io.tree import has_extension, list_tree, read_file, reserved_reason

PLAN_NAME = "_pack.json"
PACK_DIR = "_pack"  # pack markers and failed.json
UNPACK_DIR = "_unpack"  # unpack markers, at the top of the restored tree
SHARD_PREFIX = "shard-"
DEFAULT_SHARD_SIZE = 256 << 20  # bytes
MIN_SHARD_SIZE = 64 << 10  # bytes
DEFAULT_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus", "oga", "aiff", "aif", "m4a", "aac")  # audio.extensions
OTHER_EXT = "bin"  # member extension of a non-audio file (its own may be 'json' or none)
PLAN_VERSION = 1
_BLOCK, _RECORD = 512, 10240  # tar block and record (bytes): build_tar pads the archive to records
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30})
_UNITS.update({"tib": 1 << 40})

Progress = Callable[[str], None]


def parse_size(text: str) -> int:
    """Bytes of '256MB' (10^6), '256MiB' or '256M' (2^20), '1.5GB', '1048576' (bytes).

    Raises:
        ValueError: not a size.
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 256MB, 256MiB, 1GB, or bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _blocks(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def record_bytes(rel: str, audio: bool = True) -> bytes:
    """The companion `<key>.json` member of a file (UTF-8 JSON)."""
    doc: dict[str, Any] = {"path": rel} if audio else {"path": rel, "audio": False}
    return json.dumps(doc, ensure_ascii=False, sort_keys=True).encode("utf-8")


def member_ext(rel: str, audio: bool = True) -> str:
    """The extension of a file's data member: its last extension lowercased, 'bin' if not audio."""
    return posixpath.basename(rel).rsplit(".", 1)[-1].lower() if audio else OTHER_EXT


@dataclass(frozen=True)
class PackedFile:
    """One file of the plan: where it is, what it looked like when planned, its key."""

    rel: str
    size: int  # bytes
    fingerprint: dict[str, Any]
    key: str
    audio: bool = True

    def tar_bytes(self) -> int:
        """Bytes this file's two members take in a shard (headers + padded data)."""
        return 2 * _BLOCK + _blocks(self.size) + _blocks(len(record_bytes(self.rel, self.audio)))


def tar_size(files: list[PackedFile]) -> int:
    """Exact size (bytes) of the shard build_tar writes for `files` (names < 100 bytes: no long-name
    headers; two zero blocks at the end, padded to a 10240-byte record)."""
    return _padded(sum(f.tar_bytes() for f in files))


def _padded(members: int) -> int:
    """A tar's size from its members' bytes: two zero blocks, then up to a whole record."""
    return -(-(members + 2 * _BLOCK) // _RECORD) * _RECORD


@dataclass
class PackPlan:
    """Which files go in which shard (`_pack.json`); `rejected` files cannot be packed."""

    input: str
    shard_size: int  # bytes, target
    extensions: tuple[str, ...]
    include_other: bool
    shards: list[list[PackedFile]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not audio (and include_other off)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def shard_id(self, index: int) -> str:
        return f"{SHARD_PREFIX}{index:06d}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "input": self.input,
            "shard_size": self.shard_size,
            "extensions": list(self.extensions),
            "include_other": self.include_other,
            "shards": [
                {
                    "id": self.shard_id(i),
                    "files": [
                        {"path": f.rel, "size": f.size, "fingerprint": f.fingerprint, "key": f.key, "audio": f.audio}
                        for f in files
                    ],
                }
                for i, files in enumerate(self.shards)
            ],
            "skipped": self.skipped,
            "rejected": [{"path": p, "why": w} for p, w in self.rejected],
        }

    @property
    def plan_id(self) -> str:
        """16 hex digits of the plan's content (the input URL aside): the same tree gives the same id."""
        doc = {k: v for k, v in self.to_dict().items() if k != "input"}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8", "surrogateescape")).hexdigest()[:16]

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> PackPlan:
        if doc.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {doc.get('version')!r}, expected {PLAN_VERSION}")
        shards = [
            [
                PackedFile(f["path"], int(f["size"]), dict(f["fingerprint"]), f["key"], bool(f["audio"]))
                for f in s["files"]
            ]
            for s in doc["shards"]
        ]
        return cls(
            input=str(doc["input"]),
            shard_size=int(doc["shard_size"]),
            extensions=tuple(doc["extensions"]),
            include_other=bool(doc["include_other"]),
            shards=shards,
            skipped=list(doc["skipped"]),
            rejected=[(r["path"], r["why"]) for r in doc["rejected"]],
        )


def restore_reason(rel: str) -> str:
    """Why a relative path cannot be written under an unpack output root ('' when it can)."""
    reason = unsafe_name_reason(rel) or reserved_reason(rel)
    if reason:
        return reason
    if rel.split("/", 1)[0] == UNPACK_DIR:
        return f"path {rel!r} collides with the output's own bookkeeping ({UNPACK_DIR})"
    if posixpath.normpath(rel) != rel or rel.endswith("/"):
        return f"path {rel!r} is not normalised ('.', '//' or a trailing '/')"
    return ""


def make_plan(
    files: list[Any], input_url: str, shard_size: int, extensions: tuple[str, ...], include_other: bool
) -> PackPlan:
    """Consecutive files (list_tree's order, so albums stay together) in shards of at most
    `shard_size` bytes (a larger file is a shard of its own); keys run over the whole pack."""
    plan = PackPlan(input_url, shard_size, tuple(extensions), include_other)
    eligible = []
    for f in files:
        audio = has_extension(f.rel, plan.extensions)
        if not audio and not include_other:
            plan.skipped.append(f.rel)
        elif why := restore_reason(f.rel):
            plan.rejected.append((f.rel, why))
        else:
            eligible.append((f, audio))
    width = max(6, len(str(max(len(eligible) - 1, 0))))
    current: list[PackedFile] = []
    running = 0  # tar_bytes of `current`
    for index, (f, audio) in enumerate(eligible):
        packed = PackedFile(f.rel, f.size, dict(f.fingerprint), f"{index:0{width}d}", audio)
        if current and _padded(running + packed.tar_bytes()) > shard_size:
            plan.shards.append(current)
            current, running = [], 0
        current.append(packed)
        running += packed.tar_bytes()
    if current:
        plan.shards.append(current)
    return plan


def plan_difference(old: PackPlan, new: PackPlan) -> str:
    """What changed between two plans of the same tree, in one line ('' when nothing did)."""
    parts = []
    for name in ("shard_size", "extensions", "include_other"):
        if getattr(old, name) != getattr(new, name):
            parts.append(f"{name} {getattr(old, name)} -> {getattr(new, name)}")

    def files(plan: PackPlan) -> dict[str, Any]:
        found: dict[str, Any] = {f.rel: f.fingerprint for s in plan.shards for f in s}
        found.update({rel: "rejected" for rel, _ in plan.rejected})
        return found

    before, after = files(old), files(new)
    for label, rels in (
        ("added", sorted(after.keys() - before.keys())),
        ("removed", sorted(before.keys() - after.keys())),
        ("changed", sorted(r for r in before.keys() & after.keys() if before[r] != after[r])),
    ):
        if rels:
            parts.append(f"{len(rels)} file(s) {label} (e.g. {', '.join(repr(r) for r in rels[:3])})")
    return "; ".join(parts)


@dataclass
class ShardResult:
    """What became of one shard in a pack or unpack run."""

    shard_id: str
    files: int = 0  # files packed / written
    bytes: int = 0  # shard bytes (pack) or file bytes written (unpack)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path or key, why)
    skipped: bool = False  # complete before this run
    error: str = ""  # shard-level: unreadable tar, storage error (nothing committed)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # unpack: the input shard's, from its marker


@dataclass
class RunSummary:
    """A pack or unpack run: one result per shard, and files refused before any shard."""

    shards: list[ShardResult] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    skipped_files: int = 0  # pack: non-audio files left out

    @property
    def failed_files(self) -> list[tuple[str, str]]:
        return [*self.rejected, *(f for s in self.shards for f in s.failed)]

    @property
    def failed_shards(self) -> list[ShardResult]:
        return [s for s in self.shards if s.error]

    @property
    def ok(self) -> bool:
        """Whether every file and every shard made it (the CLI's exit code)."""
        return not self.failed_files and not self.failed_shards

    def line(self) -> str:
        done = [s for s in self.shards if s.skipped]
        files = sum(s.files for s in self.shards)
        return (
            f"{len(self.shards)} shard(s): {len(self.shards) - len(done) - len(self.failed_shards)} written, "
            f"{len(done)} already complete, {len(self.failed_shards)} failed; {files} file(s), "
            f"{sum(s.bytes for s in self.shards) / 1e6:.1f} MB; {len(self.failed_files)} file(s) failed"
            + (f"; {self.skipped_files} non-audio file(s) skipped" if self.skipped_files else "")
        )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _load_plan(out: OutputFolder) -> PackPlan | None:
    if not out.exists(PLAN_NAME):
        return None
    try:
        return PackPlan.from_dict(json.loads(out.read_text(PLAN_NAME)))
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardError(
            f"{out.key(PLAN_NAME)} is unreadable ({_describe(exc)}); --overwrite makes a new plan"
        ) from exc


def _listing(out: OutputFolder, sub: str = "") -> list[str]:
    """Names (relative to the output) directly under `sub` of the output ([] when absent)."""
    path = out.key(sub) if sub else out.path

    def ls() -> list[str]:
        out.fs.invalidate_cache(path)
        return [posixpath.basename(str(p).rstrip("/")) for p in out.fs.ls(path, detail=False)]

    try:
        return [posixpath.join(sub, n) if sub else n for n in with_retries(ls, f"list {path}", out.retry)]
    except FileNotFoundError:
        return []


def _remove(out: OutputFolder, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        with_retries(lambda: out.fs.rm(out.key(name)), f"delete {out.key(name)}", out.retry)


def pack(
    input_url: str,
    output_url: str,
    storage_options: Mapping[str, Any] | None = None,
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
    shard_size: int | None = None,
    include_other: bool = False,
    overwrite: bool = False,
    threads: int = 4,
    progress: Progress | None = None,
) -> RunSummary:
    """Pack the audio files under `input_url` into `<output>/shard-NNNNNN.tar` of at most
    `shard_size` bytes (None: the plan's, else DEFAULT_SHARD_SIZE); reads `threads` files at a time,
    one shard in memory. An unreadable file is reported in the summary and `_pack/failed.json`.

    Raises:
        ShardError: the input cannot be listed, the output holds shards of no plan or a plan of a
            tree that changed since (without `overwrite`), or another run holds the output's lease.
    """
    say = progress or (lambda _line: None)
    out = OutputFolder(output_url, storage_options)
    out.ensure(clear_tmp=False)
    with OutputLease(out) as lease:
        out.clear_tmp()
        old = _load_plan(out) if not overwrite else None
        size = shard_size or (old.shard_size if old else DEFAULT_SHARD_SIZE)
        if size < MIN_SHARD_SIZE:
            raise ShardError(f"shard size {size} bytes is below the minimum {MIN_SHARD_SIZE}")
        plan = make_plan(list_tree(input_url, storage_options), input_url, size, extensions, include_other)
        if not plan.shards and not plan.rejected:
            raise ShardError(f"no audio files under {input_url} (extensions {', '.join(plan.extensions)})")
        top = _listing(out)
        if old is None and not overwrite and any(n.startswith(SHARD_PREFIX) and n.endswith(".tar") for n in top):
            raise ShardError(f"{output_url} holds shards but no {PLAN_NAME}; use an empty output or --overwrite")
        if old is not None and (why := plan_difference(old, plan)):
            raise ShardError(
                f"the input changed since the plan {out.key(PLAN_NAME)} was made: {why}. "
                "Rerun with --overwrite to pack it anew (every shard rewritten), or pack into a new output"
            )
        if old is None:
            out.write_atomic(PLAN_NAME, json.dumps(plan.to_dict(), ensure_ascii=False).encode("utf-8"))
        plan_id = plan.plan_id
        ids = [plan.shard_id(i) for i in range(len(plan.shards))]
        markers = set(_listing(out, PACK_DIR))
        _tidy(out, top, markers, ids, plan_id)
        summary = RunSummary(rejected=list(plan.rejected), skipped_files=len(plan.skipped))
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for shard_id, files in zip(ids, plan.shards, strict=True):
                if lease.lost:
                    raise ShardError(f"lost the lease on {output_url}: {lease.lost}")
                marker = f"{PACK_DIR}/{shard_id}.{plan_id}.json"
                result = _read_marker(out, marker, shard_id) if marker in markers and not overwrite else None
                if result is None:
                    result = _pack_shard(out, shard_id, files, plan, pool, marker, storage_options)
                summary.shards.append(result)
                say(_shard_line("pack", result))
        failed = [{"path": p, "why": w} for p, w in summary.failed_files]
        out.write_atomic(f"{PACK_DIR}/failed.json", json.dumps(failed, ensure_ascii=False, indent=1).encode("utf-8"))
        out.clear_tmp()
    return summary


def _tidy(out: OutputFolder, top: list[str], markers: set[str], ids: list[str], plan_id: str) -> None:
    """Delete shards and markers that are not of this plan (a replan to fewer shards)."""
    keep = set(ids)
    for name in top:
        if name.startswith(SHARD_PREFIX) and name.endswith(".tar") and name[: -len(".tar")] not in keep:
            _remove(out, name)
    for name in sorted(markers):
        base = posixpath.basename(name)
        if base.startswith(SHARD_PREFIX) and not base.endswith(f".{plan_id}.json"):
            _remove(out, name)
            markers.discard(name)


def _read_marker(out: OutputFolder, marker: str, shard_id: str) -> ShardResult | None:
    """A complete shard's result from its marker (None when the marker cannot be read: redo it)."""
    try:
        doc = json.loads(out.read_text(marker))
        failed = [(f["path"], f["why"]) for f in doc.get("failed", [])]
        found = ShardResult(shard_id, int(doc["files"]), int(doc["bytes"]), failed, skipped=True)
        found.fingerprint = dict(doc.get("fingerprint") or {})
        return found
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _pack_shard(
    out: OutputFolder,
    shard_id: str,
    files: list[PackedFile],
    plan: PackPlan,
    pool: ThreadPoolExecutor,
    marker: str,
    storage_options: Mapping[str, Any] | None,
) -> ShardResult:
    """Read a shard's files (in parallel), write its tar atomically, then its marker."""

    def read(f: PackedFile) -> bytes | str:
        try:
            data = read_file(plan.input, f.rel, storage_options, max_bytes=f.size)
        except Exception as exc:  # one file's problem, never the whole pack's
            return _describe(exc)
        if len(data) != f.size:
            return f"changed since the plan: {f.size} -> {len(data)} bytes"
        return data

    result = ShardResult(shard_id)
    members: list[tuple[str, bytes]] = []
    for f, data in zip(files, pool.map(read, files), strict=True):
        if isinstance(data, str):
            result.failed.append((f.rel, data))
            continue
        members += [(f"{f.key}.{member_ext(f.rel, f.audio)}", data), (f"{f.key}.json", record_bytes(f.rel, f.audio))]
        result.files += 1
    try:
        tar = build_tar(members)
        del members
        result.bytes = len(tar)
        out.write_atomic(f"{shard_id}.tar", tar)
        del tar
        doc = {
            "shard": f"{shard_id}.tar",
            "files": result.files,
            "bytes": result.bytes,
            "failed": [{"path": p, "why": w} for p, w in result.failed],
        }
        out.write_atomic(marker, json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8"))
    except (OSError, ShardError) as exc:
        result.error = f"not written: {_describe(exc)}"
    return result


def _shard_line(verb: str, r: ShardResult) -> str:
    if r.error:
        return f"{verb} {r.shard_id}: FAILED ({r.files} file(s) written): {r.error}"
    state = "already complete" if r.skipped else "done"
    failed = f", {len(r.failed)} failed" if r.failed else ""
    return f"{verb} {r.shard_id}: {state}, {r.files} file(s), {r.bytes / 1e6:.1f} MB{failed}"


def restore_path(record: Mapping[str, Any], member_name: str) -> str:
    """The relative path of a file from its companion record and the name of its data member:
    an audio file's last extension becomes the member's when they differ (case-insensitively).

    Raises:
        ValueError: the record has no usable path, or the path may not be written (unsafe,
            reserved, not normalised).
    """
    rel = record.get("path")
    if not isinstance(rel, str) or not rel:
        raise ValueError("companion JSON has no 'path' string")
    if record.get("audio", True) is not False:
        ext = split_name(posixpath.basename(member_name))[1]
        old = posixpath.basename(rel).rsplit(".", 1)[-1] if "." in posixpath.basename(rel) else ""
        if ext and old and ext.lower() != old.lower():
            rel = rel[: -len(old)] + ext
    if why := restore_reason(rel):
        raise ValueError(f"refusing to write {rel!r}: {why}")
    return rel


def unpack(
    input_url: str,
    output_url: str,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    threads: int = 4,
    max_member_bytes: int = 1 << 30,
    progress: Progress | None = None,
) -> RunSummary:
    """Write the files of packed (and protected) shards back as a tree under `output_url`, one
    shard in memory at a time, `threads` writes at a time. A damaged shard or a bad key is reported
    and the other shards proceed; a shard's marker is written only when all its files are out.

    Raises:
        ShardError: no shards at the input, or another run holds the output's lease.
    """
    say = progress or (lambda _line: None)
    refs = list_shards(input_url, storage_options)
    out = OutputFolder(output_url, storage_options)
    out.ensure(clear_tmp=False)
    summary = RunSummary()
    with OutputLease(out) as lease, ThreadPoolExecutor(max(1, threads)) as pool:
        out.clear_tmp()
        markers = set(_listing(out, UNPACK_DIR))
        written: dict[str, str] = {}  # path -> shard/key that wrote it in this run
        for ref in refs:
            if lease.lost:
                raise ShardError(f"lost the lease on {output_url}: {lease.lost}")
            marker = f"{UNPACK_DIR}/{ref.shard_id}.json"
            fingerprint = input_fingerprint(ref.url, storage_options)
            result = ShardResult(ref.shard_id)
            done = _read_marker(out, marker, ref.shard_id) if marker in markers and not overwrite else None
            if done is not None and not fingerprint_changed(done.fingerprint, fingerprint):
                summary.shards.append(done)
                say(_shard_line("unpack", done))
                continue
            _unpack_shard(out, ref.url, result, written, pool, storage_options, max_member_bytes)
            if not result.error and not result.failed:
                doc = {"shard": ref.url, "fingerprint": fingerprint, "files": result.files, "bytes": result.bytes}
                try:
                    out.write_atomic(marker, json.dumps(doc, ensure_ascii=False).encode("utf-8"))
                except OSError as exc:
                    result.error = f"marker not written: {_describe(exc)}"
            summary.shards.append(result)
            say(_shard_line("unpack", result))
        out.clear_tmp()
    return summary


def _unpack_shard(
    out: OutputFolder,
    url: str,
    result: ShardResult,
    written: dict[str, str],
    pool: ThreadPoolExecutor,
    storage_options: Mapping[str, Any] | None,
    max_member_bytes: int,
) -> None:
    """Write one shard's files (the good ones of a damaged shard too); problems go into `result`."""
    samples, shard_error = read_samples(url, storage_options, max_member_bytes)
    result.error = shard_error
    jobs: list[tuple[str, bytes]] = []
    for sample in samples:
        where = f"{result.shard_id}/{sample.key}"
        if sample.error:
            result.failed.append((where, sample.error))
            continue
        record = [i for i, n in enumerate(sample.names) if split_name(n)[1] == "json"]
        data = [i for i in range(len(sample.names)) if i not in record]
        if len(record) != 1 or len(data) != 1:
            why = "no data member (dropped by protect?)" if not data else f"members {sample.names} (not a pack key)"
            result.failed.append((where, why))
            continue
        try:
            doc = json.loads(sample.data[record[0]].decode("utf-8"))
            rel = restore_path(doc if isinstance(doc, dict) else {}, sample.names[data[0]])
        except (ValueError, UnicodeDecodeError) as exc:
            result.failed.append((where, _describe(exc)))
            continue
        if rel in written:
            result.failed.append((where, f"{rel!r} was already written from {written[rel]}"))
            continue
        written[rel] = where
        jobs.append((rel, sample.data[data[0]]))
    del samples

    def write(job: tuple[str, bytes]) -> str:
        rel, data = job
        try:
            if out.local:
                out.fs.makedirs(posixpath.dirname(out.key(rel)), exist_ok=True)
            out.write_atomic(rel, data)
        except Exception as exc:  # e.g. a file where a folder must go: this file fails, not the run
            return _describe(exc)
        return ""

    for (rel, data), why in zip(jobs, pool.map(write, jobs), strict=True):
        if why:
            result.failed.append((rel, why))
        else:
            result.files += 1
            result.bytes += len(data)
