"""Unit tests of pipeline.io (storage, shards, output): names, listing, streamed reads, transient-error retries, atomic
writes and markers, temp-file hygiene (local folders; S3 is in test_s3.py)."""

from __future__ import annotations

import errno
import io
import tarfile
from pathlib import Path

import pytest

from pipeline.io import output, shards, storage
from pipeline.io.manifest import commit_shard, merge_stats
from pipeline.records import ManifestRow, SampleStatus, ShardStats
from tests.factories import audio_bytes, write_shard

FAST = storage.RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.002)


# ------------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("name", "key", "ext"),
    [
        ("a.wav", "a", "wav"),
        ("dir/a.b.flac", "dir/a", "b.flac"),
        ("noext", "noext", ""),
    ],
)
def test_split_name(name: str, key: str, ext: str) -> None:
    assert shards.split_name(name) == (key, ext)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("ok/a.wav", ""),
        ("", "empty"),
        ("../x.wav", "escapes"),
        ("a/../../x.wav", "escapes"),
        ("/etc/x.wav", "absolute"),
        ("C:/x.wav", "absolute"),
        ("\\x.wav", "absolute"),
        ("a\nb.wav", "control"),
        (b"caf\xe9.wav".decode("utf-8", "surrogateescape"), "UTF-8"),
    ],
)
def test_unsafe_name_reason(name: str, reason: str) -> None:
    got = shards.unsafe_name_reason(name)
    assert (reason in got) if reason else got == ""


# ---------------------------------------------------------------------------------- listing


def test_list_shards_folder_glob_and_brace(tmp_path: Path) -> None:
    for i in range(3):
        write_shard(tmp_path / f"s-{i:03d}.tar", [("a.wav", b"x")])
    (tmp_path / "notes.txt").write_text("not a shard")
    assert [r.shard_id for r in shards.list_shards(str(tmp_path))] == ["s-000", "s-001", "s-002"]
    assert [r.shard_id for r in shards.list_shards(str(tmp_path / "s-00[12].tar"))] == ["s-001", "s-002"]
    refs = shards.list_shards(str(tmp_path) + "/s-{000..001}.tar")
    assert [r.url for r in refs] == [str(tmp_path / "s-000.tar"), str(tmp_path / "s-001.tar")]


def test_missing_shard_in_a_brace_list_is_kept_for_an_error_row(tmp_path: Path) -> None:
    write_shard(tmp_path / "s-000.tar", [("a.wav", b"x")])
    refs = shards.list_shards(str(tmp_path) + "/s-{000..001}.tar")
    assert [r.shard_id for r in refs] == ["s-000", "s-001"]
    samples, error = shards.read_samples(refs[1].url, retry=FAST)
    assert samples == [] and error.startswith(storage.SHARD_NOT_FOUND)


def test_missing_input_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(storage.ShardError, match="not found"):
        shards.list_shards(str(tmp_path / "nope.tar"))
    with pytest.raises(storage.ShardError, match="not found"):
        shards.list_shards(str(tmp_path) + "/nope-{0..1}.tar")
    with pytest.raises(storage.ShardError, match=r"no \.tar shards"):
        shards.list_shards(str(tmp_path))


def test_two_shards_with_one_output_name_are_refused(tmp_path: Path) -> None:
    write_shard(tmp_path / "a" / "s.tar", [("a.wav", b"x")])
    write_shard(tmp_path / "b" / "s.tar", [("a.wav", b"x")])
    with pytest.raises(storage.ShardError, match="share the output name"):
        shards.list_shards(str(tmp_path) + "/{a,b}/s.tar")


# ---------------------------------------------------------------------------------- reading


def test_read_samples_groups_members_by_key_in_tar_order(tmp_path: Path) -> None:
    wav = audio_bytes(0.2, 8000, 1)
    path = write_shard(
        tmp_path / "s.tar",
        [("b.wav", wav), ("b.json", b"{}"), ("a.flac", b"f"), ("dir/c.wav", wav)],
    )
    samples, error = shards.read_samples(str(path))
    assert error == ""
    assert [(s.key, s.names) for s in samples] == [
        ("b", ["b.wav", "b.json"]),
        ("a", ["a.flac"]),
        ("dir/c", ["dir/c.wav"]),
    ]
    assert samples[0].data == [wav, b"{}"]
    assert all(not s.error for s in samples)


def test_duplicate_key_and_duplicate_member(tmp_path: Path) -> None:
    path = write_shard(
        tmp_path / "s.tar",
        [("a.wav", b"1"), ("b.wav", b"2"), ("a.wav", b"3"), ("c.wav", b"4"), ("c.wav", b"5")],
    )
    samples, _ = shards.read_samples(str(path))
    assert [s.key for s in samples] == ["a", "b", "a", "c"]
    assert samples[0].error == "" and "duplicate key" in samples[2].error
    assert "duplicate member name" in samples[3].error


def test_truncated_tar_keeps_keys_before_the_damage(tmp_path: Path) -> None:
    wav = audio_bytes(0.5, 16000, 1)
    full = write_shard(tmp_path / "full.tar", [(f"k{i}.wav", wav) for i in range(3)]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: 512 + len(wav) + 512 + len(wav) // 2])  # inside k1's data
    samples, error = shards.read_samples(str(cut))
    assert error.startswith(storage.UNREADABLE_TAR)
    assert [s.key for s in samples] == ["k0", "k1"]
    assert samples[0].error == "" and samples[0].data == [wav]
    assert "tar damaged" in samples[1].error


def test_not_a_tar(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    path.write_bytes(b"this is not a tar file at all" * 40)
    samples, error = shards.read_samples(str(path))
    assert samples == [] and error.startswith(storage.UNREADABLE_TAR)


# ---------------------------------------------------------------------------------- retries


def _boto_client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")


def _wrapped(inner: Exception, outer: Exception) -> Exception:
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (TimeoutError("timed out"), True),
        (OSError(errno.EBUSY, "SlowDown"), True),
        (_wrapped(_boto_client_error(503, "ServiceUnavailable"), OSError(errno.EBUSY, "x")), True),
        (_wrapped(_boto_client_error(500, "InternalError"), OSError(errno.EIO, "x")), True),
        (_wrapped(_boto_client_error(404, "NoSuchKey"), FileNotFoundError("k")), False),
        (_wrapped(_boto_client_error(403, "AccessDenied"), PermissionError("denied")), False),
        (_wrapped(_boto_client_error(400, "InvalidRequest"), OSError(errno.EIO, "x")), False),
        (FileNotFoundError("gone"), False),
        (PermissionError("denied"), False),
        (ValueError("bad data"), False),
        (tarfile.ReadError("unexpected end of data"), False),
    ],
)
def test_is_transient(exc: Exception, transient: bool) -> None:
    assert storage.is_transient(exc) is transient


def test_endpoint_connection_error_is_transient() -> None:
    from botocore.exceptions import EndpointConnectionError

    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))


def test_with_retries_backs_off_then_succeeds() -> None:
    calls, sleeps = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        return "done"

    policy = storage.RetryPolicy(attempts=5, base_delay=1.0, max_delay=3.0)
    assert storage.with_retries(flaky, "op", policy, sleep=sleeps.append) == "done"
    assert len(calls) == 3 and len(sleeps) == 2
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0  # exponential, jittered


def test_with_retries_gives_up_and_never_retries_permanent_errors() -> None:
    sleeps: list[float] = []
    attempts = []

    def down() -> None:
        attempts.append(1)
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    with pytest.raises(ConnectionRefusedError):
        storage.with_retries(down, "op", storage.RetryPolicy(attempts=3, base_delay=0.01), sleep=sleeps.append)
    assert len(attempts) == 3 and len(sleeps) == 2

    attempts.clear()

    def missing() -> None:
        attempts.append(1)
        raise FileNotFoundError("no such key")

    with pytest.raises(FileNotFoundError):
        storage.with_retries(missing, "op", storage.RetryPolicy(attempts=5), sleep=sleeps.append)
    assert len(attempts) == 1


class FlakyFS:
    """A filesystem proxy whose first `failures` opens raise a connection error."""

    def __init__(self, fs, failures: int):
        self.fs, self.failures, self.opens = fs, failures, 0

    def open(self, *args, **kwargs):
        self.opens += 1
        if self.opens <= self.failures:
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
        return self.fs.open(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fs, name)


def test_read_retries_transient_errors_from_the_start(tmp_path: Path, monkeypatch) -> None:
    path = write_shard(tmp_path / "s.tar", [("a.wav", b"1"), ("b.wav", b"2")])
    fs, _ = storage.filesystem(str(path))
    flaky = FlakyFS(fs, failures=2)
    monkeypatch.setattr(shards, "filesystem", lambda url, options=None: (flaky, str(path)))
    samples, error = shards.read_samples(str(path), retry=FAST)
    assert error == "" and [s.key for s in samples] == ["a", "b"] and flaky.opens == 3

    flaky.opens, flaky.failures = 0, 100
    samples, error = shards.read_samples(str(path), retry=FAST)
    assert samples == [] and error.startswith(storage.STORAGE_UNAVAILABLE) and flaky.opens == FAST.attempts


# ---------------------------------------------------------------------------------- writing


def test_build_tar_is_deterministic_and_refuses_unsafe_names() -> None:
    members = [("a.wav", b"abc"), ("a.json", b"{}")]
    assert shards.build_tar(members) == shards.build_tar(members)
    with tarfile.open(fileobj=io.BytesIO(shards.build_tar(members))) as tar:
        assert [(m.name, m.mtime, m.mode) for m in tar] == [("a.wav", 0, 0o644), ("a.json", 0, 0o644)]
    for bad in ("../x.wav", "/etc/x.wav"):
        with pytest.raises(storage.ShardError, match="unsafe"):
            shards.build_tar([(bad, b"x")])


def test_write_atomic_leaves_no_temp_folder(tmp_path: Path) -> None:
    out = output.OutputFolder(str(tmp_path / "out"))
    out.ensure()
    out.write_atomic("x.bin", b"payload")
    assert (tmp_path / "out" / "x.bin").read_bytes() == b"payload"
    assert not (tmp_path / "out" / output.TMP_DIR).exists()
    assert out.temp_files() == []


def test_failed_write_leaves_neither_temp_nor_final_file(tmp_path: Path, monkeypatch) -> None:
    out = output.OutputFolder(str(tmp_path / "out"), retry=FAST)
    out.ensure()

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(out, "_move", refuse)
    with pytest.raises(PermissionError):
        out.write_atomic("x.bin", b"payload")
    assert not (tmp_path / "out" / "x.bin").exists()
    assert not (tmp_path / "out" / output.TMP_DIR).exists()


def test_commit_writes_the_marker_last(tmp_path: Path, monkeypatch) -> None:
    out = output.OutputFolder(str(tmp_path / "out"))
    out.ensure()
    order: list[str] = []
    original = out._move

    def recording_move(src: str, dst: str) -> None:
        order.append(Path(dst).name)
        assert f"/{output.TMP_DIR}/" in src and Path(src).read_bytes()  # fully written under _tmp/ first
        assert not Path(dst).exists()
        original(src, dst)

    monkeypatch.setattr(out, "_move", recording_move)
    stats = ShardStats(shards=1, items=1, ok=1)
    commit_shard(out, "s-000", shards.build_tar([("a.wav", b"x")]), [ManifestRow("a", SampleStatus.OK)], stats)
    assert order == ["s-000.tar", "s-000.parquet", "s-000.stats.json"]
    assert out.completed() == {"s-000"}
    assert merge_stats(out).ok == 1
    assert not (tmp_path / "out" / output.TMP_DIR).exists()


def test_clear_tmp_and_remove_stale(tmp_path: Path) -> None:
    out = output.OutputFolder(str(tmp_path / "out"))
    out.ensure()
    tmp = tmp_path / "out" / output.TMP_DIR
    tmp.mkdir()
    (tmp / "s-000.tar.abc").write_bytes(b"partial")
    (tmp / "s-001.tar.def").write_bytes(b"partial")
    (tmp_path / "out" / "s-000.stats.json").write_text("{}")
    out.remove_stale("s-000")
    assert not (tmp_path / "out" / "s-000.stats.json").exists()
    assert [Path(p).name for p in out.temp_files()] == ["s-001.tar.def"]
    out.ensure()  # a new run starts: leftovers of an interrupted one go
    assert out.temp_files() == [] and not tmp.exists()


def test_a_folder_in_the_way_fails_the_write(tmp_path: Path) -> None:
    out = output.OutputFolder(str(tmp_path / "out"), retry=FAST)
    out.ensure()
    (tmp_path / "out" / "s.tar").mkdir()
    with pytest.raises(IsADirectoryError):
        out.write_atomic("s.tar", b"x")
    assert list((tmp_path / "out" / "s.tar").iterdir()) == []
    assert not (tmp_path / "out" / output.TMP_DIR).exists()


def test_completed_ignores_other_files_and_missing_prefix(tmp_path: Path) -> None:
    assert output.OutputFolder(str(tmp_path / "absent")).completed() == set()
    out = output.OutputFolder(str(tmp_path))
    (tmp_path / "a.stats.json").write_text("{}")
    (tmp_path / "b.tar").write_bytes(b"")
    assert out.completed() == {"a"}
