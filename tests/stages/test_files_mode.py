"""File trees and Parquet audio datasets as catalogs (issue 19): planning units of a tree, reading
them, writing a mirrored tree / the dataset back; the real Ray pipeline on a mixed local tree and
on SeaweedFS with a SIGKILLed protect actor and a rerun (every file exactly once)."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.config import ConfigError, config_from_dict
from pipeline.demo import synthesize
from pipeline.evaluation.common import sample_pairs
from pipeline.io.audio import decode, ffmpeg_encode
from pipeline.io.parquet_audio import read_parquet_samples
from pipeline.io.tree import UNIT_PREFIX, detect_layout, read_unit
from pipeline.records import ShardStats
from pipeline.stages import rows as R
from pipeline.stages.plan import list_input, plan
from pipeline.stages.read import ReadSettings, read_shard
from pipeline.stages.write import ShardWriter, WriteSettings, encode_batch
from tests.factories import EXTENSIONS, audio_bytes, config_dict, fake_protect, process_ids, write_shard

AUDIO_EXTENSIONS = (*EXTENSIONS, "m4a", "aac")


def _tree(root: Path) -> dict[str, bytes]:
    """A label's folder: nested, spaces, unicode, names sharing a stem up to the first dot, mixed
    formats (FLAC, 24-bit WAV, AIFF, Ogg, MP3, M4A), an undecodable .flac and a cover image."""
    music = synthesize(2.0, 44_100, 2, 120, 220.0, seed=3)
    files = {
        "Artist One/Album ü/01. Intro.flac": audio_bytes(1.5, 22050, 2, "FLAC", "PCM_16", seed=1),
        "Artist One/Album ü/01. Outro.wav": audio_bytes(1.5, 16000, 1, "WAV", "PCM_24", seed=2),
        "Artist One/Album ü/cover.jpg": b"\xff\xd8\xff\xe0 not really a jpeg",
        "Second Artist/b side.aiff": audio_bytes(1.2, 32000, 2, "AIFF", "PCM_16", seed=4),
        "Second Artist/live.ogg": audio_bytes(1.2, 22050, 1, "OGG", "VORBIS", seed=5),
        "Second Artist/radio.mp3": ffmpeg_encode(music, 44_100, "mp3", 128),
        "Second Artist/store.m4a": ffmpeg_encode(music, 44_100, "aac", 128),
        "broken.flac": b"fLaC but nothing after",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _cfg(tmp_path: Path, **io_settings: Any):
    d = config_dict(str(tmp_path / "in"), str(tmp_path / "out"), steps=1)
    d["io"].update(io_settings)
    d["runtime"].update({"progress": False, "torch_threads": 2})
    d["quality"] = {"visqol": "off"}
    return config_from_dict(d)


def _read(unit, settings: ReadSettings) -> list[dict[str, Any]]:
    item = {R.SHARD_ID: unit.shard_id, R.SHARD_URL: unit.url, R.LAYOUT: unit.layout}
    item[R.UNIT_FILES] = json.dumps(list(unit.files))
    return list(read_shard(item, settings))


def _write(rows: list[dict[str, Any]], settings: WriteSettings) -> list[dict[str, Any]]:
    """Rows through δ = 0 'protection', the encode stage and a writer (no Ray): its summaries."""
    encoded = encode_batch(R.rows_to_batch(fake_protect(rows), list(fake_protect(rows)[0])))
    summary = ShardWriter(settings)(encoded)
    return [dict(zip(summary, values)) for values in zip(*summary.values())]


def _write_settings(tmp_path: Path, run_plan, layout: str, **kw: Any) -> WriteSettings:
    """A writer of `layout` into tmp_path/out for the units of `run_plan` (passthrough, ε 0.01)."""
    return WriteSettings(
        **{"on_error": "passthrough", **kw},
        output=str(tmp_path / "out"),
        storage_options={},
        config_hash="h",
        target_delta_e=0.5,
        eps=0.01,
        layout=layout,
        fingerprints=run_plan.fingerprints,
        unit_paths={u.shard_id: u.files[0] for u in run_plan.pending if u.layout == "parquet"},
    )


def _read_settings(**kw: Any) -> ReadSettings:
    return ReadSettings(extensions=AUDIO_EXTENSIONS, max_member_bytes=1 << 20, storage_options={}, **kw)


def test_plan_groups_files_and_resumes_by_fingerprint(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / "in" / "d").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "d" / f"{i}.flac").write_bytes(b"x" * (i + 1))
    (tmp_path / "in" / "notes.txt").write_text("not audio")
    cfg = _cfg(tmp_path, files_per_unit=2)
    listing = list_input(cfg)
    assert listing.layout == "files" and [f.rel for f in listing.files] == [f"d/{i}.flac" for i in range(5)]
    first = plan(cfg, listing)
    assert [u.files for u in first.pending] == [("d/0.flac", "d/1.flac"), ("d/2.flac", "d/3.flac"), ("d/4.flac",)]
    assert all(u.shard_id.startswith(UNIT_PREFIX) for u in first.pending)
    assert [u.shard_id for u in plan(cfg).pending] == [u.shard_id for u in first.pending]  # same units again

    # The first unit completed (its marker records its files): a rerun plans only the rest.
    done = first.pending[0]
    (tmp_path / "out").mkdir()
    stats = ShardStats(shards=1, input=first.fingerprints[done.shard_id])
    (tmp_path / "out" / f"{done.shard_id}.stats.json").write_text(stats.to_json())
    (tmp_path / "in" / "d" / "5.flac").write_bytes(b"new")  # a file added since
    second = plan(cfg)
    assert second.skipped == [done.shard_id]
    assert [u.files for u in second.pending] == [("d/2.flac", "d/3.flac"), ("d/4.flac", "d/5.flac")]

    # A finished file that changed: its whole unit is redone under the same id (no second row).
    (tmp_path / "in" / "d" / "1.flac").write_bytes(b"changed, longer")
    third = plan(cfg)
    assert third.changed and third.changed[0][0] == done.shard_id and "d/1.flac: size" in third.changed[0][1]
    assert done.shard_id in [u.shard_id for u in third.pending]
    assert next(u for u in third.pending if u.shard_id == done.shard_id).files == done.files

    with pytest.raises(ConfigError, match="must not contain each other"):
        list_input(_cfg(tmp_path, output=str(tmp_path / "in" / "protected")))


def test_layout_is_detected(tmp_path: Path) -> None:
    write_shard(tmp_path / "shards" / "a.tar", [("k.wav", b"")])
    (tmp_path / "hub" / "data").mkdir(parents=True)
    (tmp_path / "hub" / "data" / "train-00000-of-00001.parquet").write_bytes(b"")
    (tmp_path / "tree" / "x").mkdir(parents=True)
    (tmp_path / "tree" / "x" / "a.flac").write_bytes(b"")
    found = [detect_layout(str(tmp_path / n)) for n in ("shards", "hub", "tree")]
    assert found == ["shards", "parquet", "files"]
    assert detect_layout(str(tmp_path / "shards" / "*.tar")) == "shards"


def test_read_unit_turns_bad_files_into_error_samples(tmp_path: Path) -> None:
    (tmp_path / "big.wav").write_bytes(b"x" * 2000)
    (tmp_path / "ok.wav").write_bytes(b"RIFF")
    samples, unit_error = read_unit(str(tmp_path), ["big.wav", "gone.wav", "ok.wav", "_tmp/x.wav"], {}, 1000)
    assert unit_error == ""
    errors = {s.key: s.error for s in samples}
    assert "too large" in errors["big.wav"] and errors["gone.wav"] == "file not found" and errors["ok.wav"] == ""
    assert "collides with the output's own bookkeeping" in errors["_tmp/x.wav"]


def test_writer_mirrors_the_tree(tmp_path: Path) -> None:
    """Every audio file at its relative path in its format family (MP3/Ogg/M4A -> FLAC, recorded
    in the manifest), the broken file passed through, the cover copied, one manifest row per file."""
    files = _tree(tmp_path / "in")
    cfg = _cfg(tmp_path, copy_other_files=True, files_per_unit=100)
    run_plan = plan(cfg)
    (unit,) = run_plan.pending
    rows = _read(unit, _read_settings())
    (summary,) = _write(rows, _write_settings(tmp_path, run_plan, "files"))
    assert summary["failed"] == "" and (summary["ok"], summary["error"]) == (6, 1)
    out = tmp_path / "out"
    manifest = {r["key"]: r for r in pq.read_table(out / f"{unit.shard_id}.parquet").to_pylist()}
    assert set(manifest) == {rel for rel in files if not rel.endswith(".jpg")}
    assert manifest["broken.flac"]["status"] == "error" and (out / "broken.flac").read_bytes() == files["broken.flac"]
    assert (out / "Artist One/Album ü/cover.jpg").read_bytes() == files["Artist One/Album ü/cover.jpg"]
    expect = {
        "Artist One/Album ü/01. Intro.flac": ("Artist One/Album ü/01. Intro.flac", "FLAC", "PCM_16"),
        "Artist One/Album ü/01. Outro.wav": ("Artist One/Album ü/01. Outro.wav", "WAV", "PCM_24"),
        "Second Artist/b side.aiff": ("Second Artist/b side.aiff", "AIFF", "PCM_16"),
        "Second Artist/live.ogg": ("Second Artist/live.flac", "FLAC", "PCM_16"),
        "Second Artist/radio.mp3": ("Second Artist/radio.flac", "FLAC", "PCM_16"),
        "Second Artist/store.m4a": ("Second Artist/store.flac", "FLAC", "PCM_16"),
    }
    for rel, (written, fmt, subtype) in expect.items():
        assert manifest[rel]["output_member"] == written
        decoded = decode((out / written).read_bytes())
        clean = decode(files[rel])
        assert (decoded.format, decoded.subtype) == (fmt, subtype)
        assert (decoded.sample_rate, decoded.channels) == (clean.sample_rate, clean.channels)
    marker = ShardStats.from_json((out / f"{unit.shard_id}.stats.json").read_text())
    assert set(marker.input["files"]) == set(files)  # every file of the unit, for the next plan
    # What robustness / transfer compare: clean and protected bytes of the ok files.
    pairs = {
        key: (clean, protected) for _, key, clean, protected in sample_pairs(str(out), str(tmp_path / "in"), {}, 10, 0)
    }
    assert set(pairs) == set(expect) and pairs["Second Artist/radio.mp3"][0] == files["Second Artist/radio.mp3"]
    assert pairs["Second Artist/radio.mp3"][1] == (out / "Second Artist/radio.flac").read_bytes()
    assert not (out / "_tmp").exists() or not any((out / "_tmp").rglob("*.*"))


def _hf_dataset(path: Path, column: str = "audio") -> list[bytes]:
    """A Parquet file as Hugging Face `datasets` writes one (Audio feature `column` + a text
    column), with one row whose audio is not decodable."""
    import datasets

    clips = [audio_bytes(1.2, 16000, 1, "FLAC", "PCM_16", seed=i) for i in range(3)] + [b"junk bytes"]
    names = ["a.flac", "b.flac", "c.flac", "d.flac"]
    ds = datasets.Dataset.from_dict(
        {column: [{"bytes": b, "path": n} for b, n in zip(clips, names)], "caption": ["one", "two", "three", "four"]}
    ).cast_column(column, datasets.Audio(decode=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))
    return clips


def test_parquet_dataset_round_trips_and_loads_with_datasets(tmp_path: Path) -> None:
    import datasets

    source = tmp_path / "in" / "data" / "train-00000-of-00001.parquet"
    clips = _hf_dataset(source, "recording")  # not the default column name: io.audio_column
    cfg = _cfg(tmp_path, audio_column="recording")
    run_plan = plan(cfg)
    (unit,) = run_plan.pending
    assert unit.layout == "parquet" and unit.files == ("data/train-00000-of-00001.parquet",)
    rows = _read(unit, _read_settings(audio_column="recording"))
    (summary,) = _write(rows, _write_settings(tmp_path, run_plan, "parquet", audio_column="recording"))
    assert (summary["ok"], summary["error"]) == (3, 1)
    written = tmp_path / "out" / unit.files[0]
    loaded = datasets.load_dataset("parquet", data_files=str(written), split="train")
    assert isinstance(loaded.features["recording"], datasets.Audio)  # the HF feature kept
    loaded = loaded.cast_column("recording", datasets.Audio(decode=False))
    assert loaded["caption"] == ["one", "two", "three", "four"]
    audio = loaded["recording"]
    assert audio[3]["bytes"] == clips[3]  # the failed row passes through untouched
    for clean, row in zip(clips[:3], audio[:3]):
        a, b = decode(clean), decode(row["bytes"])
        assert a.samples.shape == b.samples.shape and np.max(np.abs(a.samples - b.samples)) <= 0.01 + 1e-6
    assert pq.read_schema(written).metadata == pq.read_schema(source).metadata  # HF features kept

    assert list(sample_pairs(str(tmp_path / "out"), str(tmp_path / "in"), {}, 10, 0)) == []  # no 'audio' column
    pairs = list(sample_pairs(str(tmp_path / "out"), str(tmp_path / "in"), {}, 10, 0, "recording"))
    assert sorted(p[1] for p in pairs) == ["00000000", "00000001", "00000002"]
    assert {p[2] for p in pairs} == set(clips[:3]) and {p[3] for p in pairs} == {a["bytes"] for a in audio[:3]}

    # The report reads the unit's manifest and takes a dataset file at the top for data, not an orphan.
    from pipeline.evaluation.report.read import load_output

    (tmp_path / "out" / "top.parquet").write_bytes(written.read_bytes())
    report = load_output(str(tmp_path / "out"))
    assert report.orphans == [] and report.stats.items == 4

    missing, problem = read_parquet_samples(str(source), {}, 1 << 20, "sound")
    assert missing == [] and problem.startswith("bad dataset: no column 'sound'")


def test_dropped_dataset_rows_keep_the_pairing_exact(tmp_path: Path) -> None:
    """Under `audio.on_error: drop` a failed row leaves the dataset and later rows move up; the
    manifest's output_member names each kept row where it now is, so evaluation pairs stay exact."""
    import datasets

    source = tmp_path / "in" / "train.parquet"
    clips = [b"junk bytes"] + [audio_bytes(1.0, 16000, 1, "FLAC", "PCM_16", seed=i) for i in range(3)]
    ds = datasets.Dataset.from_dict({"audio": [{"bytes": b, "path": f"{i}.flac"} for i, b in enumerate(clips)]})
    ds.cast_column("audio", datasets.Audio(decode=False)).to_parquet(str(source))
    cfg = _cfg(tmp_path)
    run_plan = plan(cfg)
    (unit,) = run_plan.pending
    (summary,) = _write(_read(unit, _read_settings()), _write_settings(tmp_path, run_plan, "parquet", on_error="drop"))
    assert (summary["ok"], summary["error"]) == (3, 1)
    written = pq.read_table(tmp_path / "out" / "train.parquet").column("audio").to_pylist()
    assert [row["path"] for row in written] == ["1.flac", "2.flac", "3.flac"]  # row 0 dropped
    manifest = {
        r["key"]: r["output_member"] for r in pq.read_table(tmp_path / "out" / f"{unit.shard_id}.parquet").to_pylist()
    }
    assert manifest == {
        "00000000": "",
        "00000001": "00000000.flac",
        "00000002": "00000001.flac",
        "00000003": "00000002.flac",
    }
    pairs = {
        key: (clean, prot)
        for _, key, clean, prot in sample_pairs(str(tmp_path / "out"), str(tmp_path / "in"), {}, 10, 0)
    }
    assert sorted(pairs) == ["00000001", "00000002", "00000003"]
    for key, (clean, prot) in pairs.items():
        assert clean == clips[int(key)] and prot == written[int(key) - 1]["bytes"]


@pytest.mark.slow
def test_tree_pipeline_end_to_end_resume_and_dataset(tmp_path: Path, ray_session) -> None:
    """The real Ray pipeline on a mixed tree: mirrored output, one manifest row per audio file; a
    rerun redoes nothing and rewrites no finished file; then a Parquet dataset through the same job."""
    from pipeline.stages.pipeline import run

    files = _tree(tmp_path / "in")
    cfg = _cfg(tmp_path, files_per_unit=3, copy_other_files=True)
    summary = run(cfg)
    out = tmp_path / "out"
    assert not summary.failed_shards and summary.processed_shards == 3
    assert (summary.this_run.ok, summary.this_run.error) == (6, 1)
    rows = [r for p in sorted(out.glob(f"{UNIT_PREFIX}*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert Counter(r["key"] for r in rows) == Counter(rel for rel in files if not rel.endswith(".jpg"))
    for r in rows:
        assert (out / r["output_member"]).is_file() or r["status"] == "error"
        assert r["eps_bound_holds"] or r["status"] == "error"  # written within ε, measured after encoding
    assert (out / "Second Artist/radio.flac").is_file() and not (out / "Second Artist/radio.mp3").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    again = run(cfg)
    assert again.processed_shards == 0 and again.skipped_shards == 3
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes

    _hf_dataset(tmp_path / "hub" / "data" / "train.parquet")
    d = config_dict(str(tmp_path / "hub"), str(tmp_path / "hub-out"), steps=1)
    d["quality"] = {"visqol": "off"}
    summary = run(config_from_dict(d))
    assert (summary.this_run.ok, summary.this_run.error) == (3, 1)
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "hub-out/data/train.parquet"), split="train")
    assert loaded.num_rows == 4 and loaded["caption"][0] == "one"


@pytest.mark.slow
def test_tree_on_s3_survives_a_sigkilled_actor(s3_store, tmp_path: Path, ray_session) -> None:
    """A tree on SeaweedFS (with a broken file), a protect actor SIGKILLed after the first unit,
    then a rerun: every file has exactly one manifest row and one output object, nothing under
    _tmp/, no lease left."""
    from pipeline.stages.pipeline import run

    server, _ = s3_store
    fs = server.filesystem()
    fs.mkdir("tree")
    names = [f"Artist {i // 3}/Album/{i:02d} - Song {i}.wav" for i in range(6)] + ["Artist 0/broken.wav"]
    for i, rel in enumerate(names):
        data = audio_bytes(1.0, 16000, 1, seed=i) if "broken" not in rel else b"RIFF junk"
        with fs.open(f"tree/in/{rel}", "wb") as handle:
            handle.write(data)
    d = config_dict("s3://tree/in/", "s3://tree/out", steps=1)
    storage = {"endpoint_url": server.endpoint_url, "addressing_style": "path", "region": "us-east-1"}
    d["io"].update({"storage": storage, "files_per_unit": 2})
    d["runtime"].update({"tracks_per_call": 1, "progress": False})
    d["quality"] = {"visqol": "off"}
    cfg = config_from_dict(d)

    def markers() -> int:
        fs.invalidate_cache()
        return len([p for p in fs.find("tree/out") if p.endswith(".stats.json")])

    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.setdefault("summary", run(cfg)))
    thread.start()
    killed = False
    deadline = time.monotonic() + 300
    while thread.is_alive() and not killed and time.monotonic() < deadline:
        pids = process_ids("MapBatches(ProtectActor)")
        if markers() >= 1 and pids:
            os.kill(pids[0], signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    thread.join(400)
    assert killed and "summary" in result
    rerun = run(cfg)
    assert not rerun.failed_shards
    fs.invalidate_cache()
    keys: Counter = Counter()
    for path in fs.find("tree/out"):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(UNIT_PREFIX) and name.endswith(".parquet"):
            keys.update(pq.read_table(io.BytesIO(fs.cat_file(path)), columns=["key"]).column("key").to_pylist())
    assert keys == Counter(names)
    written = {p[len("tree/out/") :] for p in fs.find("tree/out")}
    assert set(names) <= written
    assert not [p for p in written if p.startswith("_tmp/")] and "_lease.json" not in written
    assert sf.info(io.BytesIO(fs.cat_file("tree/out/Artist 1/Album/05 - Song 5.wav"))).samplerate == 16000
