"""Robustness evaluation with real ffmpeg codecs on the random encoder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import config_from_dict
from pipeline.evaluation.robustness import ATTACKS, MUSICLDM_VIEW, evaluate, main, summary_table

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed (.ci/run installs it)")


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
