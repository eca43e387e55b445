"""Bad input never sinks a run: every key of every listed shard ends up as exactly one manifest row,
failed ones with status 'error' and a specific message, counted in the shard's stats.

Most cases run at the read stage (`read_shard` / `sample_row`) and the writer (`shard_outputs`);
one test sends a shard that mixes them through the real Ray pipeline."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import config_from_dict
from pipeline.io.shards import SHARD_ERROR_KEY, list_shards
from pipeline.stages import rows as R
from pipeline.stages.read import ReadSettings, read_shard
from tests.factories import EXTENSIONS, audio_bytes, encode_audio, read_members, write_shard, written

SETTINGS = ReadSettings(extensions=EXTENSIONS, max_member_bytes=1 << 20, storage_options={})


def float_wav_with(value: float) -> bytes:
    x = np.full((8000, 1), 0.1, dtype=np.float32)
    x[100] = value
    return encode_audio(x, 16000, subtype="FLOAT")


def unsupported_wav_subtype() -> bytes:
    """A WAV whose fmt chunk names a codec libsndfile does not decode (0x0050: MPEG)."""
    data = bytearray(audio_bytes(0.5, 16000, 1))
    data[20:22] = struct.pack("<H", 0x0050)
    return bytes(data)


def read(tmp_path: Path, members: list[tuple[str, bytes]], settings: ReadSettings = SETTINGS) -> list[dict]:
    path = write_shard(tmp_path / "s.tar", members)
    return list(read_shard({R.SHARD_ID: "s", R.SHARD_URL: str(path)}, settings))


def by_key(rows: list[dict]) -> dict[str, dict]:
    return {r[R.KEY]: r for r in rows}


# One member each: (name, bytes, expected status, expected error substring).
CASES: dict[str, tuple[str, bytes, str, str]] = {
    "corrupt": ("corrupt.wav", b"RIFF\x00\x00garbage" * 50, "error", "decode: not decodable audio"),
    "truncated_flac": (
        "truncated_flac.flac",
        audio_bytes(1.0, 16000, 1, "FLAC")[:3000],
        "error",
        "decode: not decodable audio",
    ),
    "zero_length": ("zero_length.wav", b"", "error", "decode: empty member (0 bytes)"),
    "nan": ("nan.wav", float_wav_with(float("nan")), "error", "decode: non-finite samples"),
    "inf": ("inf.wav", float_wav_with(float("inf")), "error", "decode: non-finite samples"),
    "too_short": ("too_short.wav", audio_bytes(0.05, 16000, 1), "error", "decode: too short"),
    "random_opus": (
        "random_opus.opus",
        np.random.default_rng(0).bytes(4000),
        "error",
        "decode: not decodable audio",
    ),
    "unsupported_subtype": ("unsupported_subtype.wav", unsupported_wav_subtype(), "error", "decode:"),
    "silence": ("silence.wav", encode_audio(np.zeros((16000, 2), np.float32), 16000), "ok", ""),
    "six_channels": ("six_channels.flac", audio_bytes(0.5, 16000, 6, "FLAC"), "ok", ""),
    "rate_8k": ("rate_8k.wav", audio_bytes(0.5, 8000, 1), "ok", ""),
    "rate_192k": ("rate_192k.wav", audio_bytes(0.3, 192000, 2, subtype="PCM_24"), "ok", ""),
    "metadata_only": ("metadata_only.json", b'{"title": "x"}', "error", "no audio member"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_bad_input_gives_one_specific_row(tmp_path: Path, case: str) -> None:
    name, data, status, message = CASES[case]
    good = audio_bytes(0.5, 16000, 1)
    rows = read(tmp_path, [("before.wav", good), (name, data), ("after.wav", good)])
    assert [r[R.KEY] for r in rows] == ["before", case, "after"]  # the shard goes on past it
    row = by_key(rows)[case]
    assert row[R.STATUS] == status, row[R.ERROR]
    assert message in row[R.ERROR]
    assert by_key(rows)["before"][R.STATUS] == by_key(rows)["after"][R.STATUS] == "ok"
    if status == "ok":
        assert row[R.N_SAMPLES] > 0 and row[R.PCM]


def test_ok_cases_keep_channels_and_rate(tmp_path: Path) -> None:
    rows = by_key(read(tmp_path, [CASES[c][:2] for c in ("six_channels", "rate_8k", "rate_192k", "silence")]))
    assert rows["six_channels"][R.CHANNELS] == 6
    assert rows["rate_8k"][R.SAMPLE_RATE] == 8000
    assert rows["rate_192k"][R.SAMPLE_RATE] == 192000 and rows["rate_192k"][R.OUT_SUBTYPE] == "PCM_24"
    silence = np.frombuffer(rows["silence"][R.PCM], np.float32)
    assert silence.size == 32000 and not silence.any()


def test_truncated_wav_is_an_error(tmp_path: Path) -> None:
    data = audio_bytes(1.0, 16000, 1)
    rows = read(tmp_path, [("cut.wav", data[: len(data) // 2])])
    assert rows[0][R.STATUS] == "error" and "truncated" in rows[0][R.ERROR]


def test_error_messages_are_stable_across_runs(tmp_path: Path) -> None:
    """libsndfile names the in-memory file by its address; manifests must not carry that."""
    first = read(tmp_path, [CASES["corrupt"][:2]])[0][R.ERROR]
    second = read(tmp_path, [CASES["corrupt"][:2]])[0][R.ERROR]
    assert first == second and " at 0x" not in first


def test_several_audio_members_in_one_key(tmp_path: Path) -> None:
    wav = audio_bytes(0.5, 16000, 1)
    rows = read(tmp_path, [("a.wav", wav), ("a.flac", audio_bytes(0.5, 16000, 1, "FLAC"))])
    assert rows[0][R.STATUS] == "error" and "multiple audio members: a.wav, a.flac" in rows[0][R.ERROR]


def test_duplicate_keys(tmp_path: Path) -> None:
    wav = audio_bytes(0.5, 16000, 1)
    rows = read(tmp_path, [("a.wav", wav), ("b.wav", wav), ("a.wav", wav)])
    assert [(r[R.KEY], r[R.STATUS]) for r in rows] == [("a", "ok"), ("b", "ok"), ("a", "error")]
    assert "bad member: duplicate key" in rows[2][R.ERROR]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../escape.wav", "member name escapes its folder"),
        ("a/../../escape.wav", "member name escapes its folder"),
        ("/etc/abs.wav", "absolute member name"),
        (b"caf\xe9.wav".decode("utf-8", "surrogateescape"), "member name is not valid UTF-8"),
    ],
)
def test_unsafe_member_names(tmp_path: Path, name: str, message: str) -> None:
    rows = read(tmp_path, [(name, audio_bytes(0.5, 16000, 1)), ("good.wav", audio_bytes(0.5, 16000, 1))])
    assert rows[0][R.STATUS] == "error" and f"bad member: {message}" in rows[0][R.ERROR]
    assert rows[1][R.STATUS] == "ok"
    # Every name that travels on (Ray/Arrow, Parquet) is valid UTF-8.
    for value in (rows[0][R.KEY], *rows[0][R.MEMBER_NAMES]):
        value.encode("utf-8")


def test_member_over_the_size_limit(tmp_path: Path) -> None:
    small = ReadSettings(EXTENSIONS, max_member_bytes=10_000, storage_options={})
    rows = read(tmp_path, [("big.wav", audio_bytes(1.0, 16000, 1)), ("ok.wav", audio_bytes(0.2, 16000, 1))], small)
    assert rows[0][R.STATUS] == "error" and "bad member: member too large: big.wav has" in rows[0][R.ERROR]
    assert rows[0][R.MEMBER_DATA] == [b""]  # never read
    assert rows[1][R.STATUS] == "ok"


def test_truncated_tar(tmp_path: Path) -> None:
    wav = audio_bytes(0.5, 16000, 1)
    full = write_shard(tmp_path / "full.tar", [(f"k{i}.wav", wav) for i in range(3)]).read_bytes()
    k1_header = 512 + -(-len(wav) // 512) * 512
    for name, cut, expected in [
        ("in_data", k1_header + 512 + 100, [("k0", "ok"), ("k1", "error")]),
        # Cut inside a header or between members: tarfile alone would call that a clean end.
        ("in_header", k1_header + 100, [("k0", "error")]),
        ("at_boundary", k1_header, [("k0", "error")]),
    ]:
        (tmp_path / f"{name}.tar").write_bytes(full[:cut])
        rows = list(read_shard({R.SHARD_ID: name, R.SHARD_URL: str(tmp_path / f"{name}.tar")}, SETTINGS))
        assert [(r[R.KEY], r[R.STATUS]) for r in rows] == [*expected, (SHARD_ERROR_KEY, "error")], name
        assert rows[-1][R.KIND] == "shard" and rows[-1][R.ERROR].startswith("unreadable tar: ReadError")
        assert all(r[R.SHARD_ITEMS] == len(rows) for r in rows)
        assert "tar damaged while reading this key" in rows[-2][R.ERROR]


def test_empty_shard_and_missing_shard(tmp_path: Path) -> None:
    write_shard(tmp_path / "empty.tar", [])
    refs = list_shards(str(tmp_path) + "/{empty,missing}.tar")
    empty, missing = (list(read_shard({R.SHARD_ID: r.shard_id, R.SHARD_URL: r.url}, SETTINGS)) for r in refs)
    assert [(r[R.KIND], r[R.STATUS], r[R.ERROR]) for r in empty] == [("shard", "ok", "")]
    assert [(r[R.KIND], r[R.STATUS]) for r in missing] == [("shard", "error")]
    assert missing[0][R.ERROR].startswith("shard not found:")


def test_thirty_minute_track_reads_as_bounded_segments(tmp_path: Path) -> None:
    """The read task decodes a whole track (here 30 min mono at 8 kHz: 58 MB) but hands it on as
    segment rows of at most `segment_seconds`, so no actor ever holds the whole track."""
    rate, seconds = 8000, 30 * 60
    t = np.arange(rate * seconds, dtype=np.float32) / rate
    data = encode_audio((0.3 * np.sin(2 * np.pi * 220 * t))[:, None], rate)
    del t
    settings = ReadSettings(EXTENSIONS, 1 << 30, {}, segment_seconds=60.0, overlap_seconds=1.0)
    rows = read(tmp_path, [("long.wav", data)], settings)
    assert all(r[R.STATUS] == "ok" and r[R.TRACK_SAMPLES] == rate * seconds for r in rows)
    assert len(rows) == 31 and max(r[R.N_SAMPLES] for r in rows) == 60 * rate
    assert rows[-1][R.SEGMENT_START] + rows[-1][R.N_SAMPLES] == rate * seconds
    assert [r[R.SEGMENT] for r in rows] == list(range(31)) and {r[R.SHARD_ITEMS] for r in rows} == {31}


# ------------------------------------------------------------------------------ the writer


MIXED = [
    ("good.wav", audio_bytes(0.5, 16000, 1)),
    ("good.json", b'{"title": "good"}'),
    ("corrupt.wav", b"not audio at all" * 10),
    ("corrupt.json", b"{}"),
    ("meta.txt", b"only metadata"),
    ("../evil.wav", audio_bytes(0.5, 16000, 1)),
    ("good.wav", audio_bytes(0.5, 16000, 1)),  # a duplicate key
]


@pytest.mark.parametrize("on_error", ["passthrough", "drop"])
def test_writer_policy_and_counts(tmp_path: Path, on_error: str) -> None:
    rows = read(tmp_path, MIXED)
    members, manifest, stats = written(rows, on_error)
    assert [(m.key, m.status.value) for m in manifest] == [
        ("good", "ok"),
        ("corrupt", "error"),
        ("meta", "error"),
        ("../evil", "error"),
        ("good", "error"),
    ]
    names = [n for n, _ in members]
    if on_error == "passthrough":
        # Undecodable and non-audio keys keep their original bytes; unsafe or duplicate never do.
        assert names == ["good.wav", "good.json", "corrupt.wav", "corrupt.json", "meta.txt"]
        assert dict(members)["corrupt.wav"] == b"not audio at all" * 10
        assert (stats.passthrough, stats.dropped) == (2, 2)
    else:
        assert names == ["good.wav", "good.json"]
        assert (stats.passthrough, stats.dropped) == (0, 4)
    assert (stats.items, stats.ok, stats.error) == (5, 1, 4)
    assert stats.errors == {"decode": 1, "no audio member": 1, "bad member": 2}
    assert [m.written for m in manifest] == [True, *(on_error == "passthrough" for _ in range(2)), False, False]


def test_writer_records_shard_level_errors(tmp_path: Path) -> None:
    write_shard(tmp_path / "present.tar", [("a.wav", audio_bytes(0.5, 16000, 1))])
    (ref,) = [r for r in list_shards(str(tmp_path) + "/{present,missing}.tar") if r.shard_id == "missing"]
    rows = list(read_shard({R.SHARD_ID: ref.shard_id, R.SHARD_URL: ref.url}, SETTINGS))
    members, manifest, stats = written(rows, "passthrough")
    assert members == [] and stats.items == 0
    assert [(m.key, m.status.value) for m in manifest] == [(SHARD_ERROR_KEY, "error")]
    assert manifest[0].error.startswith("shard not found")
    assert stats.errors == {"shard not found": 1}


# -------------------------------------------------------------------- through the Ray pipeline


@pytest.mark.slow
def test_mixed_bad_shard_through_the_pipeline(tmp_path: Path, ray_session) -> None:
    from pipeline.stages.pipeline import run

    good = {
        "music": audio_bytes(1.0, 16000, 1),
        "silence": encode_audio(np.zeros((16000, 1), np.float32), 16000),
        "surround": audio_bytes(1.0, 8000, 6, "FLAC"),
    }
    bad = {name: data for name, data, status, _ in CASES.values() if status == "error"}
    members = [(f"{k}.{'flac' if k == 'surround' else 'wav'}", v) for k, v in good.items()]
    members += [*bad.items(), ("../escape.wav", good["music"]), ("music.wav", good["music"])]
    write_shard(tmp_path / "in" / "mixed.tar", members)
    write_shard(tmp_path / "in" / "empty.tar", [])
    cfg = config_from_dict(
        {
            "io": {"input": str(tmp_path / "in") + "/{mixed,empty,missing}.tar", "output": str(tmp_path / "out")},
            "encoder": {"checkpoint": "random:HTSAT-tiny:0"},
            "attack": {"steps": 1},
            "audio": {"window_seconds": 1.0, "overlap_seconds": 0.25, "on_error": "passthrough"},
            "runtime": {"progress": False, "tracks_per_call": 4},
        }
    )
    summary = run(cfg)
    out = tmp_path / "out"
    assert summary.processed_shards == 3
    assert sorted(p.name for p in out.glob("*.stats.json")) == [
        "empty.stats.json",
        "missing.stats.json",
        "mixed.stats.json",
    ]
    manifest = pq.read_table(out / "mixed.parquet").to_pylist()
    status = [(r["key"], r["status"]) for r in manifest]
    expected_keys = [*good, *(Path(n).name.split(".")[0] for n in bad), "../escape", "music"]
    assert [k for k, _ in status] == expected_keys  # every key, once per occurrence, in tar order
    assert [s for _, s in status[:3]] == ["ok", "ok", "ok"], manifest[:3]
    assert all(s == "error" and r["error"] for (_, s), r in zip(status[3:], manifest[3:], strict=True))
    assert "duplicate key" in manifest[-1]["error"]
    output = read_members(out / "mixed.tar")
    assert {"music.wav", "silence.wav", "surround.flac"} <= set(output)
    assert output["music.wav"] != good["music"]  # protected, not copied
    assert not any(".." in n or n.startswith("/") for n in output)
    stats = summary.all_outputs
    assert (stats.items, stats.ok, stats.error) == (len(members), 3, len(bad) + 2)  # + traversal, duplicate
    assert stats.passthrough + stats.dropped == stats.error
    assert stats.errors["shard not found"] == 1  # the missing shard: no item, one error row
    assert read_members(out / "empty.tar") == {} and pq.read_table(out / "empty.parquet").num_rows == 0
    missing = pq.read_table(out / "missing.parquet").to_pylist()
    assert [(r["key"], r["status"]) for r in missing] == [(SHARD_ERROR_KEY, "error")]
    assert not (out / "_tmp").exists()
