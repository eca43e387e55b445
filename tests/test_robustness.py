"""Robustness evaluation with real ffmpeg codecs on the random encoder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import audio_bytes, write_shard

from pipeline.config import config_from_dict
from pipeline.core.engine import PGDParams
from pipeline.core.protect import Track, TrackProtector
from pipeline.evaluation.robustness import ATTACKS, MUSICLDM_VIEW, evaluate, main, summary_table
from pipeline.io.audio import decode, encode, output_format_for
from pipeline.io.manifest import commit_shard
from pipeline.io.output import OutputFolder
from pipeline.io.shards import build_tar
from pipeline.records import ManifestRow, SampleStatus, ShardStats

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def protected_run(tmp_path_factory, tiny_encoder) -> tuple[Path, Path]:
    """A clean shard and its protected output, made with TrackProtector (no Ray needed)."""
    root = tmp_path_factory.mktemp("robust")
    members = [
        ("k1.wav", audio_bytes(3.0, 44_100, 2, seed=1)),
        ("k2.flac", audio_bytes(2.0, 22_050, 1, "FLAC", seed=2)),
    ]
    write_shard(root / "clean" / "s0.tar", members)
    protector = TrackProtector(tiny_encoder, PGDParams(0.003, 0.0006, 3, 0.00075), batch_windows=2, perceptual="linf")
    out_members, rows = [], []
    for name, data in members:
        clean = decode(data)
        fmt = output_format_for(clean.format, clean.subtype, name.split(".")[1])
        result = protector.protect([Track(name.split(".")[0], clean.samples, clean.sample_rate, fmt.subtype)])[0]
        out_members.append((name, encode(result.samples, clean.sample_rate, fmt)))
        rows.append(ManifestRow(key=result.key, status=SampleStatus.OK, input_member=name, output_member=name))
    out = OutputFolder(str(root / "protected"))
    out.ensure()
    commit_shard(out, "s0", build_tar(out_members), rows, ShardStats(shards=1, items=2, ok=2))
    return root / "clean", root / "protected"


@pytest.mark.slow
def test_every_attack_runs_with_real_encoders(protected_run) -> None:
    clean, protected = protected_run
    cfg = config_from_dict({"encoder": {"checkpoint": "random:HTSAT-tiny:0", "device": "cpu"}})
    rows = evaluate(cfg, str(protected), str(clean), count=2)
    assert {r.attack for r in rows} == {*ATTACKS, MUSICLDM_VIEW}
    assert len(rows) == 2 * (len(ATTACKS) + 1)
    failed = [(r.attack, r.error) for r in rows if r.error]
    assert not failed, failed
    for row in rows:
        assert row.delta_e_before > 0 and np.isfinite(row.delta_e_after)
        assert row.retained == pytest.approx(row.delta_e_after / row.delta_e_before)
    # A mild attack keeps most of Δe; it moves clean audio far less than δ did.
    mp3 = [r for r in rows if r.attack == "mp3_320"]
    assert all(r.retained > 0.3 for r in mp3)
    table = summary_table(rows, 0.5)
    assert "| mp3_128 |" in table and "median retained" in table


def test_cli_writes_parquet_and_markdown(protected_run, tmp_path: Path, capsys) -> None:
    clean, protected = protected_run
    out = tmp_path / "report"
    code = main(
        [
            "--input",
            str(protected),
            "--clean",
            str(clean),
            "--count",
            "1",
            "--attacks",
            "resample_16k,lowpass_8k",
            "--set",
            "encoder.checkpoint=random:HTSAT-tiny:0",
            "--set",
            "encoder.device=cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    table = pq.read_table(out / "robustness.parquet").to_pylist()
    assert {r["attack"] for r in table} == {"resample_16k", "lowpass_8k"}
    text = (out / "robustness.md").read_text()
    assert text.startswith("RANDOM CLAP WEIGHTS") and "| lowpass_8k |" in capsys.readouterr().out
