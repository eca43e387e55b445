"""`pack` / `unpack` (pipeline/io/pack.py): a tree with spaces, unicode, nested folders and names
that share a stem up to the first dot goes to shards of a target size and back byte for byte; the
protect job's extension change is followed; unsafe paths in a crafted shard are refused; an
unreadable file or a damaged shard is reported without stopping the run; a SIGKILLed pack resumes
from its plan with every file exactly once; a changed tree is refused; the same on SeaweedFS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.io import pack as pk
from pipeline.io.output import LEASE_NAME, TMP_DIR, OutputFolder
from pipeline.io.shards import build_tar, read_samples
from pipeline.io.storage import ShardError

REPO = Path(__file__).resolve().parents[2]
SHARD = 64 << 10  # bytes: a few files per shard
# rel path -> size (bytes); contents are random bytes (pack never decodes)
TREE = {
    "Ärtist Ünïcode/Album One (2001)/01. Intro.flac": 20_000,
    "Ärtist Ünïcode/Album One (2001)/01. Outro.flac": 25_000,  # same key up to the first dot
    "Ärtist Ünïcode/Album One (2001)/02 - Song.WAV": 30_000,
    "Ärtist Ünïcode/Album One (2001)/cover.jpg": 3_000,  # not audio
    "Band/Deep/Nested/Folder/track 1.mp3": 9_000,
    "Band/Deep/Nested/Folder/track 2.m4a": 150_000,  # larger than a shard: a shard of its own
    "Band/Deep/Nested/Folder/unreadable.flac": 4_000,
    "日本語/曲.ogg": 12_000,
    "top level.aiff": 7_000,
}
BROKEN = "Band/Deep/Nested/Folder/unreadable.flac"


def make_tree(root: Path, tree: dict[str, int] = TREE) -> dict[str, bytes]:
    files = {}
    for rel, size in tree.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(size)
        path.write_bytes(data)
        files[rel] = data
    return files


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.relative_to(root).as_posix().startswith(pk.UNPACK_DIR + "/")
    }


def shard_paths(folder: Path) -> Counter:
    """Paths recorded in every shard of `folder` (from the companion JSON members)."""
    found: Counter = Counter()
    for tar in sorted(folder.glob("shard-*.tar")):
        samples, error = read_samples(str(tar))
        assert error == ""
        for s in samples:
            assert s.error == "" and len(s.names) == 2
            found[json.loads(s.data[s.names.index(f"{s.key}.json")])["path"]] += 1
    return found


@pytest.fixture
def unreadable(monkeypatch: pytest.MonkeyPatch) -> None:
    """BROKEN cannot be read (as root, chmod does not stop reads: the read is made to fail)."""
    real = pk.read_file

    def read(root, rel, options, max_bytes):
        if rel == BROKEN:
            raise PermissionError(13, "Permission denied", rel)
        return real(root, rel, options, max_bytes)

    monkeypatch.setattr(pk, "read_file", read)


def test_parse_size() -> None:
    assert pk.parse_size("256MB") == 256_000_000
    assert pk.parse_size("256MiB") == pk.parse_size("256M") == 256 << 20 == pk.DEFAULT_SHARD_SIZE
    assert pk.parse_size("1.5GB") == 1_500_000_000 and pk.parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        pk.parse_size("12 parsecs")


def test_round_trip(tmp_path: Path, unreadable: None) -> None:
    files = make_tree(tmp_path / "in")
    lines: list[str] = []
    summary = pk.pack(str(tmp_path / "in"), str(tmp_path / "shards"), shard_size=SHARD, progress=lines.append)
    shards = tmp_path / "shards"
    # the unreadable file is reported and listed, the rest packed; the non-audio file is left out
    assert [p for p, _ in summary.failed_files] == [BROKEN] and "PermissionError" in summary.failed_files[0][1]
    assert not summary.ok and summary.skipped_files == 1
    assert json.loads((shards / "_pack" / "failed.json").read_text())[0]["path"] == BROKEN
    assert len(lines) == len(summary.shards) >= 4
    audio = {r for r in files if not r.endswith(".jpg")}
    assert shard_paths(shards) == Counter(audio - {BROKEN})
    plan = pk.PackPlan.from_dict(json.loads((shards / pk.PLAN_NAME).read_text()))
    for files_in, result in zip(plan.shards, summary.shards, strict=True):
        size = (shards / f"{result.shard_id}.tar").stat().st_size
        assert size == result.bytes and (size <= SHARD or len(files_in) == 1)
        if not result.failed:
            assert size == pk.tar_size(files_in)  # the plan's estimate is exact
    keys = [f.key for s in plan.shards for f in s]
    assert len(set(keys)) == len(keys) and all("." not in k for k in keys)
    assert not (shards / TMP_DIR).exists() and not (shards / LEASE_NAME).exists()

    back = pk.unpack(str(shards), str(tmp_path / "out"), progress=lines.append)
    assert back.ok and sum(s.files for s in back.shards) == len(audio) - 1
    expected = {r: d for r, d in files.items() if r in audio and r != BROKEN}
    assert tree_bytes(tmp_path / "out") == expected
    assert not (tmp_path / "out" / TMP_DIR).exists() and not (tmp_path / "out" / LEASE_NAME).exists()
    again = pk.unpack(str(shards), str(tmp_path / "out"))
    assert again.ok and all(s.skipped for s in again.shards)


def test_include_other_restores_non_audio_files_as_they_are(tmp_path: Path) -> None:
    files = make_tree(tmp_path / "in", {"a/01. x.flac": 100, "a/info.json": 50, "a/README": 10, "a/c.JPG": 20})
    summary = pk.pack(str(tmp_path / "in"), str(tmp_path / "sh"), include_other=True)
    assert summary.ok and summary.skipped_files == 0
    names = sorted(n for s in read_samples(str(tmp_path / "sh" / "shard-000000.tar"))[0] for n in s.names)
    assert names == [
        "000000.flac",
        "000000.json",
        "000001.bin",
        "000001.json",
        "000002.bin",
        "000002.json",
        "000003.bin",
        "000003.json",
    ]
    assert pk.unpack(str(tmp_path / "sh"), str(tmp_path / "out")).ok
    assert tree_bytes(tmp_path / "out") == files


def test_unpack_follows_the_extension_the_protect_job_wrote(tmp_path: Path) -> None:
    members = [
        ("000000.flac", b"was mp3"),  # protect wrote FLAC for an MP3 master
        ("000000.json", pk.record_bytes("Artist/01. Song.mp3")),
        ("000001.wav", b"same codec"),  # extension case of the master kept
        ("000001.json", pk.record_bytes("Artist/02. Other.WAV")),
        ("000002.bin", b"{}"),
        ("000002.json", pk.record_bytes("Artist/meta.json", audio=False)),
    ]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "shard-000000.tar").write_bytes(build_tar(members))
    assert pk.unpack(str(tmp_path / "in"), str(tmp_path / "out")).ok
    assert tree_bytes(tmp_path / "out") == {
        "Artist/01. Song.flac": b"was mp3",
        "Artist/02. Other.WAV": b"same codec",
        "Artist/meta.json": b"{}",
    }


def test_unpack_refuses_unsafe_paths(tmp_path: Path) -> None:
    bad = ["../escape.flac", "/etc/abs.flac", "a/\x07bell.flac", "_unpack/x.flac", "_tmp/x.flac", "a/./b.flac", ""]
    members = [("000000.flac", b"ok"), ("000000.json", pk.record_bytes("fine/ok.flac"))]
    for i, path in enumerate(bad, start=1):
        members += [(f"{i:06d}.flac", b"evil"), (f"{i:06d}.json", pk.record_bytes(path))]
    members += [("000099.flac", b"no record")]  # data without its JSON
    members += [("000098.flac", b"x"), ("000098.json", b"\x80\x03pickle")]  # not JSON: never unpickled
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "shard-000000.tar").write_bytes(build_tar(members))
    out = tmp_path / "deep" / "out"
    summary = pk.unpack(str(tmp_path / "in"), str(out))
    assert not summary.ok and len(summary.failed_files) == len(bad) + 2
    assert tree_bytes(out) == {"fine/ok.flac": b"ok"}
    assert not (tmp_path / "deep" / "escape.flac").exists() and not (out / pk.UNPACK_DIR).exists()  # no marker
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"evil"] == []


def test_damaged_shard_is_reported_and_the_others_proceed(tmp_path: Path) -> None:
    make_tree(tmp_path / "in", {f"a/{i:02d} track.flac": 25_000 for i in range(6)})
    assert pk.pack(str(tmp_path / "in"), str(tmp_path / "sh"), shard_size=SHARD).ok
    tars = sorted((tmp_path / "sh").glob("shard-*.tar"))
    assert len(tars) == 3
    tars[1].write_bytes(tars[1].read_bytes()[:40_000])  # cut inside its second file
    summary = pk.unpack(str(tmp_path / "sh"), str(tmp_path / "out"))
    assert not summary.ok and [s.shard_id for s in summary.failed_shards] == ["shard-000001"]
    assert "unreadable tar" in summary.failed_shards[0].error
    restored = tree_bytes(tmp_path / "out")
    assert len(restored) == 5 and all(restored[r] == (tmp_path / "in" / r).read_bytes() for r in restored)
    assert sorted(p.name for p in (tmp_path / "out" / pk.UNPACK_DIR).iterdir()) == [
        "shard-000000.json",
        "shard-000002.json",
    ]


_KILLER = """
import os, signal, sys
from pipeline.io import output, pack
real, count = output.OutputFolder._move, [0]
def move(self, tmp, final):
    if final.endswith(sys.argv[2]):
        count[0] += 1
        if count[0] == 3:  # the third shard (pack) or file (unpack) is in _tmp/, not yet in place
            os.kill(os.getpid(), signal.SIGKILL)
    real(self, tmp, final)
output.OutputFolder._move = move
if sys.argv[1] == "pack":
    pack.pack(sys.argv[3], sys.argv[4], shard_size=65536)
else:
    pack.unpack(sys.argv[3], sys.argv[4], threads=1)
"""


def killed(command: str, suffix: str, source: Path, target: Path) -> None:
    """Run pack or unpack in a subprocess that SIGKILLs itself at the third move of a `suffix` file."""
    argv = [sys.executable, "-c", _KILLER, command, suffix, str(source), str(target)]
    run = subprocess.run(argv, cwd=REPO, capture_output=True, timeout=60)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()
    assert (target / TMP_DIR).exists() and (target / LEASE_NAME).exists()


def test_sigkill_during_pack_and_unpack_then_rerun_every_file_once(tmp_path: Path) -> None:
    files = make_tree(tmp_path / "in", {f"Artist {i % 3}/{i:02d}. Song.flac": 20_000 for i in range(14)})
    shards = tmp_path / "sh"
    killed("pack", ".tar", tmp_path / "in", shards)
    assert len(list(shards.glob("shard-*.tar"))) == 2
    first = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.tar")}
    summary = pk.pack(str(tmp_path / "in"), str(shards))  # shard size from the plan
    assert summary.ok and [s.skipped for s in summary.shards][:2] == [True, True]
    assert not any(s.skipped for s in summary.shards[2:])
    assert {n: (shards / n).stat().st_mtime_ns for n in first} == first  # finished shards untouched
    assert shard_paths(shards) == Counter(list(files))
    assert not (shards / TMP_DIR).exists() and not (shards / LEASE_NAME).exists()

    out = tmp_path / "out"
    killed("unpack", ".flac", shards, out)
    assert [p.name for p in (out / pk.UNPACK_DIR).iterdir()] == ["shard-000000.json"]  # 2 files, then killed
    back = pk.unpack(str(shards), str(out))
    assert back.ok and [s.skipped for s in back.shards][:2] == [True, False]
    assert sum(s.files for s in back.shards) == len(files)
    assert tree_bytes(out) == files
    assert not (out / TMP_DIR).exists() and not (out / LEASE_NAME).exists()


def test_a_changed_tree_is_refused_and_overwrite_replans(tmp_path: Path) -> None:
    make_tree(tmp_path / "in", {f"a/{i}.flac": 25_000 for i in range(6)})
    assert len(pk.pack(str(tmp_path / "in"), str(tmp_path / "sh"), shard_size=SHARD).shards) == 3
    (tmp_path / "in" / "a" / "new.flac").write_bytes(b"new")
    (tmp_path / "in" / "a" / "0.flac").write_bytes(b"changed")
    with pytest.raises(ShardError, match=r"changed since the plan.*1 file\(s\) added.*1 file\(s\) changed"):
        pk.pack(str(tmp_path / "in"), str(tmp_path / "sh"))
    with pytest.raises(ShardError, match="shard_size"):
        pk.pack(str(tmp_path / "in"), str(tmp_path / "sh"), shard_size=2 * SHARD)
    for i in range(1, 6):
        (tmp_path / "in" / "a" / f"{i}.flac").unlink()
    summary = pk.pack(str(tmp_path / "in"), str(tmp_path / "sh"), overwrite=True)
    assert summary.ok and len(summary.shards) == 1  # stale shards of the old plan removed
    assert sorted(p.name for p in (tmp_path / "sh").glob("shard-*.tar")) == ["shard-000000.tar"]
    assert shard_paths(tmp_path / "sh") == Counter({"a/0.flac": 1, "a/new.flac": 1})
    plan = pk.PackPlan.from_dict(json.loads((tmp_path / "sh" / pk.PLAN_NAME).read_text()))
    markers = sorted(p.name for p in (tmp_path / "sh" / pk.PACK_DIR).iterdir())
    assert markers == ["failed.json", f"shard-000000.{plan.plan_id}.json"]


def test_an_output_with_shards_of_no_plan_is_refused(tmp_path: Path) -> None:
    make_tree(tmp_path / "in", {"a.flac": 10})
    (tmp_path / "sh").mkdir()
    (tmp_path / "sh" / "shard-000000.tar").write_bytes(build_tar([]))
    with pytest.raises(ShardError, match=r"no _pack\.json"):
        pk.pack(str(tmp_path / "in"), str(tmp_path / "sh"))


def test_cli_pack_and_unpack(tmp_path: Path, capsys: pytest.CaptureFixture[str], unreadable: None) -> None:
    make_tree(tmp_path / "in", {"x/01. a.flac": 5_000, BROKEN: 10})
    assert main(["pack", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "sh"), "--shard-size", "1MB"]) == 3
    captured = capsys.readouterr()
    assert "pack shard-000000: done, 1 file(s)" in captured.out and f"FAILED {BROKEN}: PermissionError" in captured.err
    assert main(["unpack", "--input", str(tmp_path / "sh"), "--output", str(tmp_path / "out")]) == 0
    assert "1 shard(s): 1 written" in capsys.readouterr().out
    assert main(["pack", "--input", "x", "--output", "y", "--shard-size", "lots"]) == 2


# ------------------------------------------------------------------ the same on a real S3 server


def test_pack_and_unpack_on_s3(s3_store, tmp_path: Path) -> None:
    server, options = s3_store
    fs = server.filesystem()
    bucket = f"pack-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    tree = {
        "Ärtist/Album 1/01. Intro.flac": 20_000,
        "Ärtist/Album 1/01. Outro.flac": 30_000,
        "Ärtist/Album 1/02 - Song.mp3": 40_000,
        "B/cover.jpg": 100,
    }
    files = make_tree(tmp_path / "tree", tree)
    for rel, data in files.items():
        fs.pipe(f"{bucket}/masters/{rel}", data)
    summary = pk.pack(f"s3://{bucket}/masters", f"s3://{bucket}/shards", options, shard_size=SHARD)
    assert summary.ok and len(summary.shards) == 2 and summary.skipped_files == 1
    back = pk.unpack(f"s3://{bucket}/shards", f"s3://{bucket}/restored", options)
    assert back.ok
    fs.invalidate_cache()
    restored = {
        p[len(f"{bucket}/restored/") :]: fs.cat_file(p)
        for p in fs.find(f"{bucket}/restored")
        if not p.startswith(f"{bucket}/restored/{pk.UNPACK_DIR}/")
    }
    assert restored == {r: d for r, d in files.items() if not r.endswith(".jpg")}
    assert OutputFolder(f"s3://{bucket}/restored", options).temp_files() == []
    assert OutputFolder(f"s3://{bucket}/shards", options).temp_files() == []
    assert not fs.exists(f"{bucket}/shards/{LEASE_NAME}") and not fs.exists(f"{bucket}/restored/{LEASE_NAME}")
    again = pk.pack(f"s3://{bucket}/masters", f"s3://{bucket}/shards", options)
    assert again.ok and all(s.skipped for s in again.shards)


def test_pack_protect_unpack_through_the_read_and_write_stages(tmp_path: Path) -> None:
    """A packed shard through the read stage and the shard writer (δ = 0, no Ray): the MP3 comes
    back as FLAC at its path, the WAV as WAV, an undecodable file passed through as it was."""
    from pipeline.stages import rows as R
    from pipeline.stages.read import ReadSettings, read_shard
    from tests.factories import audio_bytes, written

    make_tree(tmp_path / "in", {})
    masters = {
        "Ärtist/01. Intro.mp3": audio_bytes(1.0, 16000, 1, fmt="MP3", subtype="MPEG_LAYER_III"),
        "Ärtist/01. Outro.wav": audio_bytes(1.0, 16000, 1, seed=1),
        "Ärtist/02. Broken.flac": b"not audio" * 50,
    }
    for rel, data in masters.items():
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / rel).write_bytes(data)
    assert pk.pack(str(tmp_path / "in"), str(tmp_path / "sh")).ok
    settings = ReadSettings(extensions=pk.DEFAULT_EXTENSIONS, max_member_bytes=1 << 30, storage_options={})
    shard = {R.SHARD_ID: "shard-000000", R.SHARD_URL: str(tmp_path / "sh" / "shard-000000.tar")}
    members, manifest, _ = written(list(read_shard(shard, settings)), on_error="passthrough")
    assert [m.status.value for m in manifest] == ["ok", "ok", "error"]
    (tmp_path / "protected").mkdir()
    (tmp_path / "protected" / "shard-000000.tar").write_bytes(build_tar(members))
    assert pk.unpack(str(tmp_path / "protected"), str(tmp_path / "out")).ok
    restored = tree_bytes(tmp_path / "out")
    assert sorted(restored) == ["Ärtist/01. Intro.flac", "Ärtist/01. Outro.wav", "Ärtist/02. Broken.flac"]
    assert restored["Ärtist/01. Intro.flac"][:4] == b"fLaC" and restored["Ärtist/01. Outro.wav"][:4] == b"RIFF"
    assert restored["Ärtist/02. Broken.flac"] == masters["Ärtist/02. Broken.flac"]


def test_unpack_redoes_a_shard_whose_input_changed_or_whose_marker_is_damaged(tmp_path: Path) -> None:
    make_tree(tmp_path / "in", {f"a/{i}.flac": 25_000 for i in range(6)})
    assert pk.pack(str(tmp_path / "in"), str(tmp_path / "sh"), shard_size=SHARD).ok
    assert pk.unpack(str(tmp_path / "sh"), str(tmp_path / "out")).ok
    members = [("000000.flac", b"protected again"), ("000000.json", pk.record_bytes("a/0.flac"))]
    (tmp_path / "sh" / "shard-000000.tar").write_bytes(build_tar(members))  # re-protected: new size
    (tmp_path / "out" / pk.UNPACK_DIR / "shard-000002.json").write_text("{not json")
    summary = pk.unpack(str(tmp_path / "sh"), str(tmp_path / "out"))
    assert summary.ok and [s.skipped for s in summary.shards] == [False, True, False]
    assert (tmp_path / "out" / "a" / "0.flac").read_bytes() == b"protected again"
    (
        tmp_path / "sh" / pk.PACK_DIR / next(p.name for p in (tmp_path / "sh" / pk.PACK_DIR).glob("shard-000001.*"))
    ).write_text("")
    again = pk.pack(str(tmp_path / "in"), str(tmp_path / "sh"))
    assert again.ok and [s.skipped for s in again.shards] == [True, False, True]
